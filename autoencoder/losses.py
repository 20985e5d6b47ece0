"""Stage-1 objective: L1/L2 reconstruction + LPIPS + KL + hinge PatchGAN with LDM's adaptive weight."""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.config import LossConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.layers import num_groups

log = logging.getLogger(__name__)

# torchvision weights that lpips' backbones load through torch.hub (url's last part = cached file name)
_BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def lpips_backbone_file(net: str) -> tuple[str, str]:
    """(url, expected local path) of the ImageNet weights of an LPIPS backbone in the torch hub cache."""
    import torchvision.models as tvm

    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(_BACKBONE_WEIGHTS)}")
    url = getattr(tvm, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])


def _missing_weights_message(net: str, url: str, path: str) -> str:
    return (
        f"LPIPS: ImageNet weights of the '{net}' backbone are not on this machine (looked for {path}). "
        f"The perceptual loss falls back to a RANDOMLY INITIALISED {net} backbone (LPIPS linear heads "
        f"still calibrated), a much weaker perceptual signal. Nothing is downloaded. To fix, either: "
        f"download {url} and put it at {path} (the torch hub cache: TORCH_HOME moves it); or set "
        f"loss.perceptual_weight=0 to turn the term off; or set loss.lpips_pretrained=false to use the "
        f"random backbone on purpose (silences this warning)."
    )


def build_lpips(pretrained: bool, net: str = "vgg") -> nn.Module | None:
    """Frozen LPIPS(x, y) -> [N, 1, 1, 1] for inputs in [-1, 1]; None if the lpips package is missing.

    The calibrated linear heads ship inside the lpips package and always load. The backbone uses
    ImageNet weights only when pretrained=True and the torchvision file is already cached; otherwise
    it is random (with a loud warning when pretrained weights were asked for). Never touches the network.
    """
    try:
        import lpips
    except ImportError:
        warnings.warn("lpips is not installed: perceptual loss disabled (pip install lpips)", stacklevel=2)
        return None
    url, path = lpips_backbone_file(net)
    use_backbone = pretrained and os.path.isfile(path)
    if pretrained and not use_backbone:
        msg = _missing_weights_message(net, url, path)
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    elif not pretrained:
        log.info("LPIPS: random %s backbone (lpips_pretrained=false)", net)
    with warnings.catch_warnings():  # torchvision's 'pretrained=' deprecation notices from inside lpips
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not use_backbone, verbose=False)
    model.eval()
    model.requires_grad_(False)
    return model


def _weights_init(m: nn.Module) -> None:
    """pix2pix / taming init: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): [N, C, H, W] -> logit map [N, 1, H', W'].

    Norm is GroupNorm rather than taming's BatchNorm: no running statistics, so it behaves the same
    at batch size 1, under DDP (no SyncBatchNorm needed) and in train/eval mode.
    Receptive field grows with n_layers; the input needs H, W >= 3 * 2**n_layers.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm_groups: int = 32):
        super().__init__()
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c_in = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, 8)  # channel doubling capped at 8x
            stride = 2 if n < n_layers else 1  # last hidden conv keeps the resolution (as in taming)
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False),  # the norm's shift replaces the bias
                nn.GroupNorm(num_groups(c_out, norm_groups), c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, 1, 1))  # one real/fake logit per patch
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 3 * 2**self.n_layers
        if min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"PatchDiscriminator with {self.n_layers} layers needs H, W >= {min_size}, "
                f"got {tuple(x.shape[-2:])}; lower loss.disc_layers"
            )
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))), as in taming-transformers."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None, max_weight: float = 1e4
) -> torch.Tensor:
    """LDM's balance of the GAN term: ||grad_last nll|| / (||grad_last g|| + 1e-4), clamped, detached.

    Returns 0 when gradients are unavailable (no_grad / eval, no last layer, or a loss not reaching it).
    """
    zero = torch.zeros((), device=nll_loss.device)
    if (
        last_layer is None
        or not torch.is_grad_enabled()
        or not (nll_loss.requires_grad and g_loss.requires_grad)
    ):
        return zero
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        return zero
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()


class DiscriminatorStart:
    """When the adversarial term switches on (and then stays on): at step `disc_start`, or, with
    `disc_plateau_tol` > 0, at the first step from `disc_start` on at which the reconstruction loss has
    converged: mean(last W losses) > (1 - tol) * mean(the W before), W = `disc_plateau_window`.
    The trainer feeds it one (all-process mean) reconstruction loss per optimizer step; its state
    (the last 2W losses, the start step) goes into checkpoints, so a resumed run starts it at the
    same step as an uninterrupted one."""

    def __init__(self, config: LossConfig):
        if config.disc_plateau_tol < 0 or config.disc_plateau_window < 1:
            raise ValueError("loss.disc_plateau_tol must be >= 0 and loss.disc_plateau_window >= 1")
        self.first, self.tol, self.window = config.disc_start, config.disc_plateau_tol, config.disc_plateau_window
        self.started_at: int | None = None if self.tol > 0 else self.first
        self.history: list[float] = []

    def active(self, step: int) -> bool:
        return self.started_at is not None and step >= self.started_at

    def update(self, step: int, rec_loss: float) -> None:
        """After optimizer step `step` (0-based) with reconstruction loss `rec_loss`: decides whether the
        adversarial term is on from step + 1."""
        if self.started_at is not None:
            return
        self.history = (self.history + [float(rec_loss)])[-2 * self.window :]
        if step + 1 < self.first or len(self.history) < 2 * self.window:
            return
        before, last = self.history[: self.window], self.history[self.window :]
        if sum(last) > (1.0 - self.tol) * sum(before):
            self.started_at = step + 1

    def state_dict(self) -> dict:
        return {"started_at": self.started_at, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.started_at, self.history = state["started_at"], [float(x) for x in state["history"]]


RECON_LOSSES = ("l1", "l2", "l1+l2")


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel error: "l1" |d|, "l2" d^2, "l1+l2" their sum (d = x - recon, pixels in [-1, 1]).

    L1's gradient has the same size at every pixel, whatever the error: on frames where a small
    object covers a few percent of the pixels, the background's tiny errors outvote the object's
    large colour error, and colour is learned very slowly (README, "Stage-1 recipe"). L2's gradient
    grows with the error, so the largest errors are fixed first."""
    d = x - recon
    if kind == "l1":
        return d.abs().mean()
    if kind == "l2":
        return d.pow(2).mean()
    if kind == "l1+l2":
        return d.abs().mean() + d.pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose one of {', '.join(RECON_LOSSES)}")


class VAELoss(nn.Module):
    """Generator and discriminator objectives; `discriminator` gets its own optimizer in the training script."""

    def __init__(self, config: LossConfig, disc_in_channels: int = 3):
        super().__init__()
        if config.recon not in RECON_LOSSES:
            raise ValueError(f"loss.recon must be one of {', '.join(RECON_LOSSES)}, got {config.recon!r}")
        self.config = config
        # frozen LPIPS(x, y) -> [N, 1, 1, 1], or None when perceptual_weight is 0 (also used for validation)
        self.lpips = (
            build_lpips(config.lpips_pretrained, config.lpips_net) if config.perceptual_weight > 0 else None
        )
        self.discriminator = PatchDiscriminator(disc_in_channels, config.disc_channels, config.disc_layers)
        self.disc_start = DiscriminatorStart(config)

    def train(self, mode: bool = True) -> VAELoss:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # LPIPS has dropout in its heads: keep it a fixed metric
        return self

    def gan_active(self, step: int) -> bool:
        return self.disc_start.active(step)

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with detached parameters: gradients reach x (the generator) but never D's own weights,
        so the generator's backward leaves D's .grad untouched (both losses can share one step)."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x, recon [N, 3, H, W]; posterior over [N, C, h, w] -> (scalar loss, float logs)."""
        cfg = self.config
        rec = reconstruction_loss(x, recon, cfg.recon)
        p_loss = self.lpips(x, recon).mean() if self.lpips is not None else torch.zeros_like(rec)
        nll = cfg.recon_weight * rec + cfg.perceptual_weight * p_loss
        kl = posterior.kl().mean()  # per-sample sum over latent dims, averaged over the batch (LDM)
        # LDM sums the pixel terms over C*H*W; we average them, so KL is divided by C*H*W too:
        # kl_weight then means exactly what it means in LDM configs (1e-6), at any resolution.
        loss = nll + cfg.kl_weight * kl / x[0].numel()
        g_loss = torch.zeros_like(rec)
        d_weight = torch.zeros_like(rec)
        if self.gan_active(step):
            g_loss = -self._frozen_discriminator(recon).mean()
            d_weight = adaptive_weight(nll, g_loss, last_layer, cfg.max_adaptive_weight) * cfg.disc_weight
            loss = loss + d_weight * g_loss
        logs = {"loss": loss, "rec": rec, "lpips": p_loss, "kl": kl, "g": g_loss, "d_weight": d_weight}
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int, disc: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss on D(x) vs D(recon) (both detached from the VAE) -> (scalar loss, float logs).

        `disc` is the discriminator to call, e.g. its DDP wrapper (default: self.discriminator). It is
        called exactly once per step (real and fake concatenated; GroupNorm keeps samples independent),
        as DDP expects one forward per backward.
        """
        disc = self.discriminator if disc is None else disc
        if not self.gan_active(step):
            # exact zero that still runs D and reaches every parameter (zero grads): DDP sees no unused params
            zero = disc(x[:1].detach()).mean() * 0.0
            return zero, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        n = x.shape[0]
        logits = disc(torch.cat([x.detach(), recon.detach()]))  # [2N, 1, h', w']
        logits_real, logits_fake = logits[:n], logits[n:]
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: float(v.detach()) for k, v in logs.items()}
