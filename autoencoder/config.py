"""Typed configuration of the frame-wise VAE (architecture) and its training losses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class VAEConfig:
    """Architecture of `FrameVAE`. The spatial factor is 2 ** (len(channel_mult) - 1)."""

    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)  # 3 levels -> factor 4; 4 levels -> factor 8
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    # log-variance is clamped to this range so exp() never overflows or underflows
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> VAEConfig:
        return _strict_from_dict(cls, d, source)


@dataclass
class LossConfig:
    """Weights of the stage-1 objective: recon + perceptual + KL + adversarial (hinge PatchGAN)."""

    # "l2" (default: keeps the colour of small objects, README "Stage-1 recipe"), "l1" (LDM's
    # choice for natural images) or "l1+l2" (autoencoder.losses.reconstruction_loss)
    recon: str = "l2"
    recon_weight: float = 1.0
    perceptual_weight: float = 1.0  # 0 turns LPIPS off entirely
    lpips_pretrained: bool = True  # False: random backbone (tests, offline without weights)
    lpips_net: str = "vgg"  # LPIPS backbone: "vgg" (as in LDM) or "alex" (smaller, faster)
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 5000  # generator's adversarial term and discriminator updates start here at the earliest
    # > 0: the adversarial term also waits until the reconstruction loss has converged, as in LDM's
    # recipe: the mean over the last `disc_plateau_window` steps improved by less than this fraction
    # on the window before (losses.DiscriminatorStart). 0: start at disc_start exactly.
    disc_plateau_tol: float = 0.0
    disc_plateau_window: int = 100
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr_mult: float = 1.0
    max_adaptive_weight: float = 1e4


def _strict_from_dict(cls, d: dict, source: str):
    """Build a flat dataclass from a dict, naming any unknown key (used for config.json)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)
