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
