"""Video prediction / extension from known frames: frame conditioning, reconstruction guidance, sliding windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.sampling import Model
from diffusion.schedules import alpha_sigma, to_x0_eps

# Shapes: videos [B, C, T, h, w]; masks [B, 1, T, 1, 1] with 1 where a frame is known.


def frame_conditioning_kwargs(
    known: torch.Tensor, total_frames: int, positions: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Model kwargs for a frame-conditioned network (UNet3D's cond_frames / cond_mask inputs).

    known: [B, C, K, h, w] latents placed at frame `positions` (default the first K) of a
    `total_frames` clip. Returns cond_frames [B, C, T, h, w] (zeros where unknown) and
    cond_mask [B, 1, T, 1, 1] (1 where known)."""
    b, c, k, h, w = known.shape
    positions = list(range(k)) if positions is None else [int(p) for p in positions]
    if len(positions) != k or len(set(positions)) != k or not all(0 <= p < total_frames for p in positions):
        raise ValueError(f"need {k} distinct frame positions in [0, {total_frames}), got {positions}")
    cond_frames = known.new_zeros(b, c, total_frames, h, w)
    cond_mask = known.new_zeros(b, 1, total_frames, 1, 1)
    cond_frames[:, :, positions] = known
    cond_mask[:, :, positions] = 1.0
    return {"cond_frames": cond_frames, "cond_mask": cond_mask}


def replace_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Frames where mask = 1 taken from `known` [B, C, T, h, w] (exactly), the rest from `x`."""
    return torch.where(mask.bool(), known.to(x.dtype), x)


def raw_from_x0(prediction: str, x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The raw model output that `to_x0_eps` maps back to `x0` at this x_t (inverse at fixed x_t).

    eps = (x_t - alpha x0) / sigma.
    v   = alpha eps - sigma x0 = (alpha x_t - alpha^2 x0 - sigma^2 x0) / sigma = (alpha x_t - x0) / sigma,
          and indeed alpha x_t - sigma v = x0. At alpha = 0 (SNR 0) this is v = -x0, still defined.
    sigma > 0 at every training timestep."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return (x_t - alpha * x0) / sigma
    if prediction == "v":
        return (alpha * x_t - x0) / sigma
    raise ValueError(f"unknown prediction type {prediction!r} (expected 'eps', 'v' or 'x0')")


def reconstruction_guided(
    model: Model,
    known: torch.Tensor,
    mask: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    weight: float,
    *,
    replace: bool = True,
) -> Model:
    """Reconstruction guidance (Ho et al. 2022, Sec. 3.1, eq. 7) as a model wrapper for any sampler.

    At each call, with x_hat = the model's x0 estimate (a = known frames, b = unknown):
        x_tilde^b = x_hat^b - (w_r alpha_t / 2) grad_{x_t^b} || x^a - x_hat^a(x_t) ||^2
    and, with `replace`, x_tilde^a = x^a (the replacement method), else x_hat^a. The result is
    returned in the model's own parameterisation (`raw_from_x0`), so samplers use it unchanged.
    w_r = 1 is the Gaussian approximation p(x^a | x_t) = N(x_hat^a, sigma_t^2 / alpha_t^2); the
    paper finds larger weights (w_r > 1) sample better. known: [B, C, T, h, w], mask: [B, 1, T, 1, 1]."""

    def guided(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        alpha, sigma = alpha_sigma(alphas_cumprod, t, x.ndim, dtype=x.dtype)
        m = mask.to(x.dtype)
        if weight == 0:
            x0 = to_x0_eps(prediction, model(x, t, **cond), x, alpha, sigma)[0]
        else:
            with torch.enable_grad():  # samplers run under no_grad
                x_in = x.detach().requires_grad_(True)
                x0_hat = to_x0_eps(prediction, model(x_in, t, **cond), x_in, alpha, sigma)[0]
                # summed over the batch: samples are independent, so each gets its own gradient
                err = ((known.to(x.dtype) - x0_hat) * m).square().sum()
                (grad,) = torch.autograd.grad(err, x_in)
            x0 = x0_hat.detach() - (weight * alpha / 2) * grad * (1 - m)
        if replace:
            x0 = replace_known(x0, known, m)
        return raw_from_x0(prediction, x0, x, alpha, sigma)

    return guided


SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extend_video(
    sample_fn: SampleFn, known: torch.Tensor, total_frames: int, window: int, overlap: int
) -> torch.Tensor:
    """Autoregressive extension with a sliding window (Ho et al. 2022, Sec. 3.1).

    Starting from `known` [B, C, K, h, w] (K may be 0), the first window is sampled given the last
    min(K, window - 1) known frames, and each later window of `window` frames given the last
    min(overlap, frames so far) frames, by
    `sample_fn(known [B, C, window, h, w], mask [B, 1, window, 1, 1]) -> [B, C, window, h, w]`
    (known values at the leading masked frames, zeros elsewhere), so it works with frame
    conditioning or reconstruction guidance alike. The given frames are kept exactly.
    Returns [B, C, total_frames, h, w]."""
    b, c, k, h, w = known.shape
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    if total_frames < k:
        raise ValueError(f"total_frames={total_frames} is fewer than the {k} known frames")
    video = known
    while video.shape[2] < total_frames:
        # the first window sees as many given frames as fit; later ones overlap the previous window
        n_ctx = min(window - 1, k) if video.shape[2] == k else min(overlap, video.shape[2])
        context = known.new_zeros(b, c, window, h, w)
        mask = known.new_zeros(b, 1, window, 1, 1)
        if n_ctx > 0:
            context[:, :, :n_ctx] = video[:, :, -n_ctx:]
            mask[:, :, :n_ctx] = 1.0
        new = sample_fn(context, mask)  # [B, C, window, h, w]
        n_new = min(window - n_ctx, total_frames - video.shape[2])
        video = torch.cat([video, new[:, :, n_ctx : n_ctx + n_new].to(video.dtype)], dim=2)
    return video


def interpolate_video(sample_fn: SampleFn, known: torch.Tensor, factor: int, window: int, overlap: int) -> torch.Tensor:
    """Temporal interpolation (frame-rate upsampling) with a sliding window: `known` [B, C, N, h, w]
    becomes [B, C, N * factor, h, w] with known frame i at position i * factor, kept exactly, and
    the frames between (and the factor - 1 after the last) sampled. Each window of `window` frames
    (the last one moved back to end at the last frame) is given every frame already fixed inside
    it (the known ones, and those an earlier window generated in the `overlap`), by the same
    `sample_fn(context, mask)` as `extend_video`, so frame conditioning and reconstruction
    guidance both work."""
    b, c, n, h, w = known.shape
    if factor < 1 or n < 1:
        raise ValueError(f"need factor >= 1 and at least one known frame, got factor={factor}, {n} frames")
    total = n * factor
    video = known.new_zeros(b, c, total, h, w)
    fixed = torch.zeros(total, dtype=torch.bool)
    video[:, :, ::factor] = known
    fixed[::factor] = True
    return fill_video(lambda context, mask, frames: sample_fn(context, mask), video, fixed, window, overlap)


def fill_video(sample_fn, video: torch.Tensor, fixed: torch.Tensor, window: int, overlap: int) -> torch.Tensor:
    """Sample the frames of `video` [B, C, N, h, w] not marked in `fixed` [N] bool, in windows of
    `window` frames stepping by window - overlap (the last moved back to end at frame N), each
    given every frame already fixed inside it: `sample_fn(context, mask, frames)` with `frames` the
    window's slice of the whole video (a super-resolution stage takes its low-resolution input
    there). Fixed frames are kept exactly; `video` is filled in place and returned."""
    b, total = video.shape[0], video.shape[2]
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    span = min(window, total)
    start = 0
    while not fixed.all():
        start = min(start, total - span)
        frames = slice(start, start + span)
        if not fixed[frames].all():
            mask = fixed[frames].to(video.dtype).to(video.device)[None, None, :, None, None].expand(b, 1, -1, 1, 1)
            new = sample_fn(video[:, :, frames] * mask, mask, frames)  # [B, C, span, h, w]
            todo = ~fixed[frames]
            video[:, :, frames][:, :, todo] = new[:, :, todo].to(video.dtype)  # a view: writes into video
            fixed[frames] = True
        start += span - overlap
    return video
