"""FrameVAE: LDM-style KL autoencoder for single frames, with a safetensors export folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from autoencoder.config import VAEConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.layers import AttnBlock2d, Downsample, ResnetBlock2d, Upsample, group_norm
from data.files import CONFIG_NAME, WEIGHTS_NAME, missing_export_hint, sha256_file, write_export

MODEL_TYPE = "FrameVAE"
FORMAT_VERSION = 1


class MidBlock(nn.Module):
    """ResNet -> self-attention (optional) -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        g, p = config.norm_groups, config.dropout
        self.block_1 = ResnetBlock2d(channels, channels, p, g)
        self.attn_1 = AttnBlock2d(channels, norm_groups=g) if config.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock2d(channels, channels, p, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[N, 3, H, W] -> moments [N, 2 * latent_channels, H/f, W/f]; module names follow LDM."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mult = config.base_channels, tuple(config.channel_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock2d(block_in, ch * m, config.dropout, config.norm_groups))
                block_in = ch * m
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in, config)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [N, ch, H, W]
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # halves H, W
        h = self.mid(h)  # [N, ch * mult[-1], H/f, W/f]
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # [N, 2C, H/f, W/f]


class Decoder(nn.Module):
    """z [N, latent_channels, h, w] -> [N, 3, h*f, w*f]; mirror of the encoder with one extra block per level."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mult = config.base_channels, tuple(config.channel_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(
                    ResnetBlock2d(block_in, ch * mult[level], config.dropout, config.norm_groups)
                )
                block_in = ch * mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.up.insert(0, stage)  # up[i] works at the resolution of encoder level i (as in LDM)
        self.norm_out = group_norm(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [N, ch * mult[-1], h, w]
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # doubles H, W
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # [N, 3, H, W]


class FrameVAE(nn.Module):
    """KL-regularised autoencoder applied frame by frame (fold video frames in with autoencoder.video)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)  # as in LDM, so SD-style weights map one to one
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"FrameVAE.encode expects [N, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
                " (fold video frames into the batch with autoencoder.video.encode_video)"
            )
        f = self.downsample_factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"input size {h}x{w} is not divisible by the downsample factor {f}; "
                f"resize or crop frames to a multiple of {f}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [N, 3, H, W] in [-1, 1] -> q(z|x) over latents [N, latent_channels, H/f, W/f]."""
        self._check_input(x)
        moments = self.quant_conv(self.encoder(x))  # [N, 2C, H/f, W/f]
        return DiagonalGaussian.from_moments(moments, self.config.logvar_min, self.config.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, latent_channels, h, w] -> reconstruction [N, 3, h*f, w*f] (unbounded; ~[-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"FrameVAE.decode expects [N, {self.config.latent_channels}, h, w], got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final conv: the adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` atomically; returns the folder."""
        return _save_export(self, Path(folder))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> FrameVAE:
        """Load an export written by `save_pretrained` (safetensors only, never pickle); returns eval mode."""
        return _load_export(cls, Path(folder), map_location)


def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 (hex) of `folder/model.safetensors`: ties latent shards to the autoencoder that made them."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (not a FrameVAE export folder?)")
    return sha256_file(path)


def _save_export(model: FrameVAE, folder: Path) -> Path:
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "weights_file": WEIGHTS_NAME}
    return write_export(folder, model.state_dict(), meta, MODEL_TYPE)


def _read_config(folder: Path) -> tuple[VAEConfig, dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: FrameVAE export folder does not exist{missing_export_hint(folder)}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG_NAME}: not valid JSON ({e})") from e
    model_type = meta.get("model_type") if isinstance(meta, dict) else None
    if model_type != MODEL_TYPE:
        raise ValueError(f"{folder}: config.json says model_type={model_type!r}, expected {MODEL_TYPE!r}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{folder / CONFIG_NAME}: no 'config' mapping")
    return VAEConfig.from_dict(meta["config"], source=str(folder / CONFIG_NAME)), meta


def _check_state(folder: Path, expected: dict, found: dict) -> None:
    """ValueError naming the first few missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not match its config.json architecture: " + "; ".join(problems)
        )


def _load_export(cls, folder: Path, map_location) -> FrameVAE:
    config, meta = _read_config(folder)
    model = cls(config)
    try:
        state = load_file(folder / WEIGHTS_NAME, device="cpu")
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"{folder / WEIGHTS_NAME}: cannot read safetensors file ({e})") from e
    _check_state(folder, model.state_dict(), state)
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != sha256_file(folder / WEIGHTS_NAME):
        raise ValueError(
            f"{folder}: {WEIGHTS_NAME} does not match the weights_sha256 in config.json "
            "(file replaced or partially written); re-export the model"
        )
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
