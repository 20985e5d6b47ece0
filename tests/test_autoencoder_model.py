"""FrameVAE: shapes, input checks, posterior maths, export round trip and errors, and a tiny overfit run."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from autoencoder import DiagonalGaussian, FrameVAE, LossConfig, VAEConfig, VAELoss, weights_hash
from autoencoder.layers import AttnBlock2d, num_groups


def tiny_config(**overrides) -> VAEConfig:
    kw = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
    kw.update(overrides)
    return VAEConfig(**kw)


@pytest.mark.parametrize("mult, factor", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
@pytest.mark.parametrize("latent_channels", [4, 8])
def test_shapes(mult, factor, latent_channels):
    torch.manual_seed(0)
    vae = FrameVAE(tiny_config(channel_mult=mult, latent_channels=latent_channels))
    assert vae.downsample_factor == factor
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square on purpose
    q = vae.encode(x)
    assert q.mean.shape == q.logvar.shape == (2, latent_channels, 32 // factor, 48 // factor)
    assert vae.decode(q.sample()).shape == x.shape
    recon, posterior = vae(x)
    assert recon.shape == x.shape and posterior.kl().shape == (2,)
    assert vae.last_layer_weight() is vae.decoder.conv_out.weight
    assert vae.last_layer_weight().shape[0] == 3


@pytest.mark.parametrize("size", [(30, 32), (32, 36)])
def test_size_not_divisible_names_size_and_factor(size):
    vae = FrameVAE(tiny_config(channel_mult=(1, 2, 2, 2)))
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}.*factor 8"):
        vae.encode(torch.zeros(1, 3, *size))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32))


def test_group_count_divides_channels():
    assert [num_groups(c, 32) for c in (8, 24, 48, 64, 96)] == [8, 24, 24, 32, 32]
    assert num_groups(12, 8) == 6
    vae = FrameVAE(tiny_config(base_channels=12, norm_groups=8, channel_mult=(1, 2)))
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_matches_reference(heads):
    torch.manual_seed(0)
    attn = AttnBlock2d(8, num_heads=heads, norm_groups=4)
    x = torch.randn(2, 8, 3, 5)
    y = attn.norm(x)
    q, k, v = (p(y).reshape(2, heads, 8 // heads, 15).transpose(-1, -2) for p in (attn.q, attn.k, attn.v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8 // heads), dim=-1)  # [N, heads, HW, HW]
    ref = (w @ v).transpose(-1, -2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(attn(x), x + attn.proj_out(ref), rtol=1e-5, atol=1e-5)


def test_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = DiagonalGaussian(torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2).clamp(-2, 2))
    z = q.mean + q.std * torch.randn(200_000, *q.shape)  # [S, N, ...] samples of q
    log_q = torch.distributions.Normal(q.mean, q.std).log_prob(z).flatten(2).sum(-1)  # [S, N]
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(2).sum(-1)
    estimate, stderr = (log_q - log_p).mean(0), (log_q - log_p).std(0) / math.sqrt(z.shape[0])
    kl = q.kl()
    assert kl.shape == (3,)
    assert torch.all((estimate - kl).abs() < 5 * stderr + 1e-3), (estimate, kl, stderr)
    x = torch.randn(3, 2, 2, 2)
    expected_nll = -torch.distributions.Normal(q.mean, q.std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(q.nll(x), expected_nll)


def test_moments_sampling_and_mode():
    moments = torch.randn(2, 8, 4, 4)
    q = DiagonalGaussian.from_moments(moments)
    assert torch.equal(q.mode(), moments[:, :4]) and torch.equal(q.logvar, moments[:, 4:])
    torch.testing.assert_close(q.var, q.std**2)
    a = q.sample(torch.Generator().manual_seed(3))
    b = q.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, q.sample(torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussian.from_moments(torch.zeros(1, 3, 2, 2))


def test_logvar_is_clamped():
    q = DiagonalGaussian(
        torch.zeros(1, 3), torch.tensor([[-100.0, 0.5, 100.0]]), logvar_min=-30, logvar_max=20
    )
    assert q.logvar.tolist() == [[-30.0, 0.5, 20.0]]
    assert torch.isfinite(q.kl()).all() and torch.isfinite(q.std).all()
    vae = FrameVAE(tiny_config(logvar_min=-1.0, logvar_max=1.5))
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 1e4  # logvar half of the moments
    assert torch.all(vae.encode(torch.zeros(1, 3, 16, 16)).logvar == 1.5)


def _random_model(**overrides) -> FrameVAE:
    torch.manual_seed(0)
    vae = FrameVAE(tiny_config(**overrides))
    with torch.no_grad():  # move norms off their default init so every tensor matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def test_save_load_round_trip(tmp_path):
    vae = _random_model(mid_attention=True)
    folder = vae.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "FrameVAE" and meta["config"]["channel_mult"] == [1, 2, 2]
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights_hash(folder) == meta["weights_sha256"] == digest
    loaded = FrameVAE.from_pretrained(folder)
    assert loaded.config == vae.config and not loaded.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        q1, q2 = vae.encode(x), loaded.encode(x)
        assert torch.equal(q1.mean, q2.mean) and torch.equal(q1.logvar, q2.logvar)
        assert torch.equal(vae.decode(q1.mean), loaded.decode(q2.mean))


def test_save_over_existing_folder_keeps_other_files(tmp_path):
    folder = _random_model().save_pretrained(tmp_path / "export")
    (folder / "NOTES.txt").write_text("kept")
    other = _random_model(latent_channels=8)
    other.save_pretrained(folder)
    assert (folder / "NOTES.txt").read_text() == "kept"
    assert FrameVAE.from_pretrained(folder).config.latent_channels == 8
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temp folders left behind


def test_load_wrong_model_type(tmp_path):
    folder = _random_model().save_pretrained(tmp_path / "export")
    meta = json.loads((folder / "config.json").read_text())
    meta["model_type"] = "UNet3D"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"export.*UNet3D.*FrameVAE"):
        FrameVAE.from_pretrained(folder)


def test_load_missing_and_unexpected_tensors(tmp_path):
    folder = _random_model().save_pretrained(tmp_path / "export")
    state = load_file(folder / "model.safetensors")
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"export.*missing: decoder\.conv_out\.bias.*unexpected: decoder\.extra"
    ):
        FrameVAE.from_pretrained(folder)


def test_load_config_mismatch_names_shapes(tmp_path):
    folder = _random_model().save_pretrained(tmp_path / "export")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["latent_channels"] = 8
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatch: decoder\.conv_in\.weight"):
        FrameVAE.from_pretrained(folder)
    meta["config"]["bogus_key"] = 1
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bogus_key"):
        FrameVAE.from_pretrained(folder)


def test_load_tampered_values_fail_hash(tmp_path):
    folder = _random_model().save_pretrained(tmp_path / "export")
    state = load_file(folder / "model.safetensors")
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        FrameVAE.from_pretrained(folder)


def test_load_missing_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrameVAE.from_pretrained(tmp_path / "nope")
    folder = _random_model().save_pretrained(tmp_path / "export")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FrameVAE.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        weights_hash(folder)


def synthetic_shapes(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n images [n, 3, size, size] in [-1, 1]: flat background, a rectangle and a disc in random colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        img = np.ones((size, size, 3)) * rng.uniform(-1, 1, 3)
        x0, y0 = rng.integers(2, size // 2, 2)
        w, h = rng.integers(6, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(-1, 1, 3)
        cx, cy = rng.integers(8, size - 8, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 8) ** 2] = rng.uniform(-1, 1, 3)
        images.append(img)
    return torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()


@pytest.fixture
def one_thread():
    """Small convs gain nothing from 2 threads, and a busy 2-core box makes 2 threads ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_vae_overfits_one_batch(one_thread):
    """200 Adam steps (lr 2e-3, L1 + KL) reach > 24 dB PSNR on 4 fixed 32x32 images (~26.4 dB measured)."""
    torch.manual_seed(0)
    x = synthetic_shapes()
    vae = FrameVAE(tiny_config(base_channels=16, channel_mult=(1, 2), mid_attention=False, norm_groups=8))
    loss_fn = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=10**9, disc_channels=8, disc_layers=2))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def psnr() -> float:
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        return float(10 * torch.log10(4.0 / ((recon - x) ** 2).mean()))  # peak-to-peak range 2 -> 2^2

    start = psnr()
    for step in range(200):
        recon, posterior = vae(x, generator=gen)
        loss, logs = loss_fn.generator_loss(x, recon, posterior, step, vae.last_layer_weight())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert logs["g"] == 0.0 and logs["kl"] > 0
    assert start < 15 and psnr() > 24.0, (start, psnr())
