"""Training-time conditioning rules: which frames a clip is given (frame conditioning, for
prediction / extension) and which labels are dropped to the null label (classifier-free guidance).
Sampling-time counterparts are in diffusion/guidance.py and diffusion/sampling.py.

Both draw from a caller's `torch.Generator` in a fixed order, so a training step's draws are a
pure function of its seed (exact resume)."""

from __future__ import annotations

import torch


def training_frame_masks(x0: torch.Tensor, cond_prob: float, prefix_prob: float,
                         generator: torch.Generator | None = None, interp_prob: float = 0.0,
                         interp_strides: tuple[int, ...] = (2, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frames given to the model for some clips of x0 [B, C, T, h, w].

    With probability `cond_prob` a clip gets frames given (at least one is always generated): with
    probability `interp_prob` every k-th frame from the first (k drawn from `interp_strides`: the
    temporal-interpolation pattern), else K ~ U{1..T-1} frames: its first K with probability
    `prefix_prob`, else K at random. Returns cond_mask [B, 1, T, 1, 1] (1 = given, x0's dtype and
    device) and the loss mask [B, T] (0 on given frames: no loss there). Images (T = 1) are never
    given frames. With interp_prob = 0 no extra numbers are drawn (runs from before it repeat)."""
    b, _, t = x0.shape[:3]
    mask = torch.zeros(b, t)
    if t > 1 and cond_prob > 0:
        use = torch.rand(b, generator=generator) < cond_prob
        prefix = torch.rand(b, generator=generator) < prefix_prob
        k = torch.randint(1, t, (b,), generator=generator)  # 1..T-1 frames given
        interp, stride = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long)
        if interp_prob > 0:
            interp = torch.rand(b, generator=generator) < interp_prob
            stride = torch.as_tensor(interp_strides)[torch.randint(len(interp_strides), (b,), generator=generator)]
        for i in torch.nonzero(use).flatten().tolist():
            if interp[i]:
                mask[i, :: int(stride[i])] = 1  # frames 0, k, 2k, ...; a stride >= 2 leaves frame 1 to generate
            elif prefix[i]:
                mask[i, : k[i]] = 1
            else:
                mask[i, torch.randperm(t, generator=generator)[: k[i]]] = 1
    mask = mask.to(x0.device)
    return mask[:, None, :, None, None].to(x0.dtype), 1 - mask


def drop_labels(labels: torch.Tensor, num_classes: int, p: float,
                generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor | None:
    """Class labels [B] for a training step of a classifier-free-guidance model: each replaced by
    the null label (index `num_classes`) with probability `p`; unlabelled samples (label < 0) always
    get the null label. None for an unconditional model (num_classes == 0). `u` [B]: uniform draws
    shared with `drop_text`, so a model with labels and text sees both dropped together (the
    unconditional branch of guidance) at rate min(p_class, p_text)."""
    if num_classes == 0:
        return None
    labels = labels.clone()
    labels[labels < 0] = num_classes
    drop = (torch.rand(labels.shape, generator=generator) if u is None else u) < p
    labels[drop.to(labels.device)] = num_classes
    return labels


def image_frames(latents: torch.Tensor, generator: torch.Generator | None = None, paired: torch.Tensor | None = None):
    """The image half of joint training: [B, C, T, h, w] -> [B, C, 1, h, w], one random frame of
    each clip (images from image shards, T = 1, pass through without a draw). With `paired`
    [B, C', T, h', w'] (a super-resolution stage's low-resolution clips) the same frames of it are
    returned too: (frames, paired frames)."""
    n, t = latents.shape[0], latents.shape[2]
    if t == 1:
        return latents if paired is None else (latents, paired)
    idx = torch.randint(0, t, (n,), generator=generator)
    pick = lambda x: x[torch.arange(n), :, idx][:, :, None]  # noqa: E731
    return pick(latents) if paired is None else (pick(latents), pick(paired))


def augmentation_levels(batch: int, aug_max: float, num_timesteps: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A super-resolution stage's training levels of noise augmentation [B] long, uniform over the
    first `aug_max` of the schedule (0 = the low-resolution input as it is)."""
    top = max(1, int(round(aug_max * num_timesteps)))
    return torch.randint(0, top, (batch,), generator=generator)


def noise_augment(low: torch.Tensor, levels: torch.Tensor, alphas_cumprod: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models"): the low-resolution
    latents diffused to `levels` [B], alpha_s * z + sigma_s * eps, with level 0 taken as clean (so
    "no augmentation" is exactly the input). Training draws the levels; sampling picks one."""
    from diffusion.schedules import alpha_sigma

    eps = torch.randn(low.shape, generator=generator).to(low)
    alpha, sigma = alpha_sigma(alphas_cumprod, levels.cpu(), low.ndim, dtype=low.dtype)
    clean = (levels.cpu() == 0).view(alpha.shape)
    alpha, sigma = torch.where(clean, 1.0, alpha).to(low.device), torch.where(clean, 0.0, sigma).to(low.device)
    return alpha * low + sigma * eps


def drop_text(text_mask: torch.Tensor, p: float, u: torch.Tensor) -> torch.Tensor:
    """Token masks [B, L] with the rows where u < p (u [B] uniform) cleared: those samples get the
    null text (UNet3D's learned null token), for classifier-free guidance on text."""
    keep = (u >= p).to(text_mask.device)
    return text_mask.bool() & keep[:, None]
