"""Stage-1 losses: hinge, adaptive GAN weight, PatchGAN, LPIPS offline fallback, VAELoss before/after disc_start."""

from __future__ import annotations

import os

import pytest
import torch

from autoencoder import (
    DiagonalGaussian,
    FrameVAE,
    LossConfig,
    PatchDiscriminator,
    VAEConfig,
    VAELoss,
    adaptive_weight,
    build_lpips,
    hinge_d_loss,
)
from autoencoder.losses import lpips_backbone_file


def test_hinge_d_loss_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    # a perfect discriminator (margins met) has zero loss
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    nll = (3.0 * w).sum()  # grad [3, 3] -> norm 3*sqrt(2)
    g = (w**2).sum()  # grad [2, -4] -> norm sqrt(20)
    d = adaptive_weight(nll, g, w)
    assert d.item() == pytest.approx(3 * 2**0.5 / (20**0.5 + 1e-4), rel=1e-5)
    assert not d.requires_grad
    (nll + d * g).backward()  # the graph was retained for the real backward pass
    assert adaptive_weight(nll.detach(), g, w).item() == 0.0
    assert adaptive_weight((3.0 * w).sum(), (1e-12 * w).sum(), w, max_weight=7.0).item() == 7.0
    with torch.no_grad():
        assert adaptive_weight((3.0 * w).sum(), (w**2).sum(), w).item() == 0.0


def test_patch_discriminator_shapes_and_init():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=8, n_layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6
    d3 = PatchDiscriminator(3, channels=8, n_layers=3)
    widths = [m.out_channels for m in d3.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32, 64, 1]  # doubling, capped at 8x
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d3.modules())
    big = PatchDiscriminator(3, channels=64, n_layers=3).main[0].weight
    assert abs(big.std().item() - 0.02) < 0.002 and abs(big.mean().item()) < 0.002
    with pytest.raises(ValueError, match="disc_layers"):
        d3(torch.zeros(1, 3, 16, 16))


def test_lpips_random_backbone_builds_offline():
    torch.manual_seed(0)
    model = build_lpips(pretrained=False, net="alex")
    assert model is not None and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert model(x, x).abs().max().item() < 1e-6
    dist = model(x, y)
    assert dist.shape == (2, 1, 1, 1) and torch.all(dist > 0)
    dist.sum().backward()  # gradients reach the input even though LPIPS is frozen
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_pretrained_without_weights_warns_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    url, path = lpips_backbone_file("alex")
    assert path.startswith(str(tmp_path)) and not os.path.exists(path)
    with pytest.warns(UserWarning, match=r"RANDOMLY INITIALISED") as record:
        model = build_lpips(pretrained=True, net="alex")
    message = str(record[0].message)
    for hint in (url, path, "loss.perceptual_weight=0", "loss.lpips_pretrained=false"):
        assert hint in message
    assert "RANDOMLY INITIALISED" in caplog.text  # also in the log, not only as a warning
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.isfinite(model(x, -x)).all()


def _vae_and_batch():
    torch.manual_seed(0)
    vae = FrameVAE(
        VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, mid_attention=False, norm_groups=4)
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return vae, x


def _loss(**overrides) -> VAELoss:
    kw = dict(recon="l1", perceptual_weight=0.0, disc_start=10, disc_channels=8, disc_layers=2, kl_weight=1e-6)
    kw.update(overrides)
    return VAELoss(LossConfig(**kw))


def test_generator_loss_before_and_after_disc_start():
    vae, x = _vae_and_batch()
    loss_fn = _loss()
    recon, q = vae(x)
    loss, logs = loss_fn.generator_loss(x, recon, q, step=9, last_layer=vae.last_layer_weight())
    assert logs["g"] == 0.0 and logs["d_weight"] == 0.0
    rec = (x - recon).abs().mean()
    expected = rec + 1e-6 * q.kl().mean() / x[0].numel()
    torch.testing.assert_close(loss, expected)
    assert logs["rec"] == pytest.approx(rec.item()) and logs["kl"] == pytest.approx(q.kl().mean().item())
    disc_grads = torch.autograd.grad(loss, list(loss_fn.discriminator.parameters()), allow_unused=True)
    assert all(g is None for g in disc_grads)  # no GAN term at all before disc_start

    loss, logs = loss_fn.generator_loss(x, recon, q, step=10, last_layer=vae.last_layer_weight())
    assert logs["d_weight"] > 0 and torch.isfinite(loss)
    assert logs["d_weight"] <= 0.5 * 1e4  # disc_weight * max_adaptive_weight
    g = -loss_fn.discriminator(recon).mean()
    assert logs["g"] == pytest.approx(g.item())
    assert loss.item() == pytest.approx(expected.item() + logs["d_weight"] * logs["g"], rel=1e-5)
    # the GAN term trains the generator only: D's weights get no gradient from the generator loss
    params = list(loss_fn.discriminator.parameters())
    grads = torch.autograd.grad(loss, [recon, *params], allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(g is None for g in grads[1:])


def test_generator_loss_l2_lpips_and_eval():
    vae, x = _vae_and_batch()
    loss_fn = _loss(
        recon="l2", perceptual_weight=1.0, lpips_pretrained=False, lpips_net="alex", kl_weight=0.0
    )
    loss_fn.train()
    assert loss_fn.lpips is not None and not loss_fn.lpips.training
    recon, q = vae(x)
    loss, logs = loss_fn.generator_loss(x, recon, q, step=0, last_layer=None)
    assert logs["lpips"] > 0
    assert loss.item() == pytest.approx(((x - recon) ** 2).mean().item() + logs["lpips"], rel=1e-5)
    with torch.no_grad():  # evaluation: GAN term logged but its adaptive weight is 0
        _, logs = loss_fn.generator_loss(x, recon, q, step=100, last_layer=vae.last_layer_weight())
    assert logs["d_weight"] == 0.0 and logs["g"] != 0.0
    with pytest.raises(ValueError, match="l1"):
        _loss(recon="huber")


class CountingWrapper(torch.nn.Module):
    """Stands in for a DDP wrapper: counts forward calls (DDP wants one forward per backward)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


def test_discriminator_loss_before_and_after_disc_start():
    vae, x = _vae_and_batch()
    loss_fn = _loss()
    recon, _ = vae(x)
    wrapper = CountingWrapper(loss_fn.discriminator)
    loss, logs = loss_fn.discriminator_loss(x, recon, step=3, disc=wrapper)
    assert wrapper.calls == 1
    assert loss.item() == 0.0 and logs["d_loss"] == 0.0
    loss.backward()  # graph-connected: every discriminator parameter gets a (zero) gradient
    params = list(loss_fn.discriminator.parameters())
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in params)
    assert vae.last_layer_weight().grad is None

    loss, logs = loss_fn.discriminator_loss(x, recon, step=10, disc=wrapper)
    assert wrapper.calls == 2
    d = loss_fn.discriminator
    torch.testing.assert_close(loss, hinge_d_loss(d(x), d(recon.detach())))
    assert logs["logits_real"] == pytest.approx(d(x).mean().item())
    loss.backward()
    assert vae.last_layer_weight().grad is None  # recon was detached: no gradient into the VAE
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_kl_term_scales_like_ldm():
    """kl_weight keeps LDM's meaning: KL sum / (C*H*W) against per-pixel mean terms."""
    x = torch.zeros(2, 3, 8, 8)
    q = DiagonalGaussian(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))  # KL per sample = 0.5 * 16
    loss, logs = _loss(kl_weight=1.0).generator_loss(x, x, q, step=0, last_layer=None)
    assert logs["kl"] == pytest.approx(8.0) and loss.item() == pytest.approx(8.0 / 192)


def test_lpips_uses_cached_backbone_weights_without_warning(tmp_path, monkeypatch, recwarn):
    """A backbone file already in the torch hub cache is used as is (squeezenet: the smallest one)."""
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    _, path = lpips_backbone_file("squeeze")
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(1)
    state = tvm.squeezenet1_1().state_dict()
    torch.save(state, path)
    model = build_lpips(pretrained=True, net="squeeze")
    assert not [w for w in recwarn if "RANDOMLY" in str(w.message)]
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])


def test_reconstruction_losses():
    from autoencoder.losses import reconstruction_loss

    x, r = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(x, r, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, r, "l2").item() == pytest.approx(0.25)
    assert reconstruction_loss(x, r, "l1+l2").item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="l1\\+l2"):
        reconstruction_loss(x, r, "huber")
    with pytest.raises(ValueError, match="loss.recon"):
        VAELoss(LossConfig(recon="huber", perceptual_weight=0.0))


def test_l2_gives_a_small_objects_colour_error_more_of_the_gradient_than_l1():
    """Why the stage-1 recipe uses L2: a frame whose background is almost right (error 0.02 on 95%
    of the pixels) and whose small object has the wrong colour (error 0.5 on 5%)."""
    from autoencoder.losses import reconstruction_loss

    x = torch.zeros(1, 3, 20, 20)
    obj = torch.zeros(1, 3, 20, 20, dtype=torch.bool)
    obj[..., 9:11, 8:13] = True  # 10 of 400 pixels: 2.5%
    for kind, at_least, at_most in (("l1", 0.0, 0.05), ("l2", 0.3, 1.0)):
        recon = torch.where(obj, torch.tensor(0.5), torch.tensor(0.02)).requires_grad_()
        (grad,) = torch.autograd.grad(reconstruction_loss(x, recon, kind), recon)
        share = (grad.abs()[obj].sum() / grad.abs().sum()).item()
        assert at_least <= share <= at_most, (kind, share)


def test_discriminator_start_waits_for_the_reconstruction_to_converge():
    from autoencoder.losses import DiscriminatorStart

    cfg = LossConfig(disc_start=5, disc_plateau_tol=0.05, disc_plateau_window=4)
    start = DiscriminatorStart(cfg)
    falling = [1.0 * 0.8**i for i in range(20)]  # improves 20% per step: never converged
    for step, loss in enumerate(falling):
        start.update(step, loss)
        assert not start.active(step + 1)
    for step in range(20, 40):  # flat from here: the first full flat window pair starts it
        start.update(step, 0.01)
    assert start.started_at == 28 and start.active(28) and not start.active(27)
    start.update(40, 5.0)  # once on, it stays on
    assert start.started_at == 28

    fixed = DiscriminatorStart(LossConfig(disc_start=7))  # tol 0: exactly at disc_start, as before
    assert fixed.active(7) and not fixed.active(6)
    early = DiscriminatorStart(LossConfig(disc_start=30, disc_plateau_tol=0.05, disc_plateau_window=2))
    for step in range(10):
        early.update(step, 0.5)  # flat at once, but not before disc_start
    assert early.started_at is None

    resumed = DiscriminatorStart(cfg)
    half = DiscriminatorStart(cfg)
    for step, loss in enumerate(falling + [0.01] * 5):
        half.update(step, loss)
    resumed.load_state_dict(half.state_dict())
    for step in range(25, 40):
        resumed.update(step, 0.01)
    assert resumed.started_at == 28
    with pytest.raises(ValueError, match="disc_plateau"):
        DiscriminatorStart(LossConfig(disc_plateau_tol=-1))
