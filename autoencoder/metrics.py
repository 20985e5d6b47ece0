"""Reconstruction quality measures for validation: PSNR, SSIM and temporal flicker.
Inputs are float tensors in [-1, 1]; images [N,3,H,W], videos [B,3,T,H,W]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB on the [0, 1] scale: 10 log10(1 / MSE)."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 3, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5) on the
    [0, 1] scale, constants C1 = (0.01)^2, C2 = (0.03)^2; the window shrinks for tiny images."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(window, 1.5 * window / 11, c, x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def temporal_flicker(original: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """How much frame-to-frame change the reconstruction adds over the original's.

    With d(v)_t = v_{t+1} - v_t: `flicker` = mean |d(recon) - d(original)| on the [0, 1] scale
    (0 when the reconstruction changes between frames exactly as the original does), and
    `motion_ratio` = mean |d(recon)| / mean |d(original)| (1 is ideal; > 1 means added flicker)."""
    d_orig = (original[:, :, 1:] - original[:, :, :-1]) / 2
    d_rec = (recon[:, :, 1:] - recon[:, :, :-1]) / 2
    flicker = (d_rec - d_orig).abs().mean().item()
    ratio = (d_rec.abs().mean() / d_orig.abs().mean().clamp_min(1e-8)).item()
    return {"flicker": flicker, "motion_ratio": ratio}


@torch.no_grad()
def latent_separation(vae, probes: torch.Tensor, masks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How far apart stage 1 puts different objects in the space stage 2 works in.

    probes [K,3,H,W] in [-1, 1] (e.g. one object per palette colour, at one place), masks [K,H,W]
    (bool: the object's pixels), reference [N,C,h,w] (the posterior means of data frames, already
    encoded by `vae`). Each probe is encoded (posterior mean), standardised per channel with the
    reference latents' mean and (population) std (the whitening of
    `stats.json`, which stage 2 trains in), and averaged over the latent pixels that the object covers
    at least half of (or most of, for an object smaller than one latent pixel); returns the pairwise
    Euclidean distances [K,K] in units of the latent's std.
    Two colours a few units apart are told apart by stage 2's denoiser only late in sampling, where
    each frame decides more on its own: the pairs that switch within a clip (README, "Quality
    benchmark")."""
    z_ref = reference.double()
    mean = z_ref.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = z_ref.std(dim=(0, 2, 3), correction=0).clamp_min(1e-6).view(1, -1, 1, 1)
    z = (vae.encode(probes).mean.double() - mean) / std  # [K, C, h, w]
    share = F.adaptive_avg_pool2d(masks[:, None].double(), z.shape[-2:])[:, 0]  # [K, h, w]
    best = share.flatten(1).max(dim=1).values
    if not (best > 0).all():
        raise ValueError("a probe's mask is empty: no object to encode")
    # an object smaller than one latent pixel: the latent pixels it covers most
    cover = share >= torch.minimum(best, torch.tensor(0.5, dtype=best.dtype)).view(-1, 1, 1)
    codes = torch.stack([z[k][:, cover[k]].mean(dim=1) for k in range(len(z))])  # [K, C]
    return torch.cdist(codes, codes)
