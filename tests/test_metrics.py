"""PSNR / SSIM / flicker on cases with known answers."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from autoencoder.metrics import latent_separation, psnr, ssim, temporal_flicker


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


class _PoolVAE:
    """A stand-in stage 1 whose latent is the frame average-pooled 4x4 (then mapped by `fn`)."""

    def __init__(self, fn=lambda z: z):
        self.fn = fn

    def encode(self, x):
        return SimpleNamespace(mean=self.fn(F.avg_pool2d(x, 4)))


def test_latent_separation_is_distance_in_units_of_the_datas_latent_std():
    # frames filled with one colour, red and blue; the reference is those two frames, so each channel
    # that differs has (population) std |r - b| / 2 and the standardised codes differ by 2 in it: red
    # and blue differ in R and B -> 2 sqrt(2)
    red, blue = torch.tensor([0.8, -0.6, -0.6]), torch.tensor([-0.6, -0.6, 0.8])
    frames = torch.stack([c.view(3, 1, 1).expand(3, 8, 8) for c in (red, blue)])
    masks = torch.ones(2, 8, 8, dtype=torch.bool)
    vae = _PoolVAE()
    d = latent_separation(vae, frames, masks, vae.encode(frames).mean)
    assert d.shape == (2, 2) and d[0, 0] == 0 and d[1, 1] == 0
    assert torch.allclose(d[0, 1], torch.tensor(8.0, dtype=d.dtype).sqrt()) and d[0, 1] == d[1, 0]


def test_latent_separation_sees_colours_that_one_latent_direction_holds():
    """A stage 1 that encodes colour faithfully separates the probes however its latents are scaled;
    one that maps every colour to the same code (a colour-blind stage 1) separates none, whatever its
    reconstructions' PSNR; and an object covering a quarter of a latent pixel is still measured."""
    background = torch.tensor([-0.85, -0.85, -0.75]).view(3, 1, 1)
    colours = [torch.tensor(c) for c in ([0.8, -0.5, -0.5], [-0.5, 0.6, -0.4], [-0.4, -0.1, 0.9])]
    probes = background.expand(3, 3, 16, 16).clone()
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    probes[:, :, 4:12, 4:12] = torch.stack(colours).view(3, 3, 1, 1)
    masks[:, 4:12, 4:12] = True
    reference = torch.cat([probes, background.expand(5, 3, 16, 16)])
    vae = _PoolVAE()
    d = latent_separation(vae, probes, masks, vae.encode(reference).mean)
    off = d[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)]
    assert (off > 1).all()
    scaled_vae = _PoolVAE(lambda z: 10 * z + 3)
    scaled = latent_separation(scaled_vae, probes, masks, scaled_vae.encode(reference).mean)
    torch.testing.assert_close(scaled, d)
    # colour-blind: the latent says where the object is, not its colour
    blind_vae = _PoolVAE(lambda z: (z - background.view(1, 3, 1, 1).mean()).abs().amax(1, keepdim=True)
                         .gt(0.2).double().expand_as(z))
    blind = latent_separation(blind_vae, probes, masks, blind_vae.encode(reference).mean)
    assert blind.abs().max() < 1e-9
    small = torch.zeros(3, 16, 16, dtype=torch.bool)
    small[:, 6:8, 6:8] = True  # 2x2 pixels: a quarter of one 4x4 latent pixel
    tiny = background.expand(3, 3, 16, 16).clone()
    tiny[:, :, 6:8, 6:8] = torch.stack(colours).view(3, 3, 1, 1)
    assert (latent_separation(vae, tiny, small, vae.encode(reference).mean)[0, 1:] > 0).all()
    with pytest.raises(ValueError, match="mask is empty"):
        latent_separation(vae, probes, torch.zeros_like(masks), vae.encode(reference).mean)
