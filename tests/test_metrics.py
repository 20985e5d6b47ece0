"""PSNR / SSIM / flicker on cases with known answers."""

import math

import torch

from autoencoder.metrics import psnr, ssim, temporal_flicker


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0,1] scale -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_identity_and_degradation():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    s = ssim(x, noisy)
    assert (s < 0.9).all() and (s > 0).all()
    assert (ssim(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)) > s).all()


def test_flicker_zero_for_exact_and_positive_for_noise():
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 6)
    v = torch.sin(2 * math.pi * t).view(1, 1, 6, 1, 1).expand(1, 3, 6, 4, 4).clone()
    assert temporal_flicker(v, v)["flicker"] == 0.0
    assert abs(temporal_flicker(v, v)["motion_ratio"] - 1) < 1e-6
    noisy = v + 0.1 * torch.randn_like(v)
    f = temporal_flicker(v, noisy)
    assert f["flicker"] > 0.02 and f["motion_ratio"] > 1
    # a constant offset adds no flicker
    assert temporal_flicker(v, v + 0.2)["flicker"] < 1e-7
