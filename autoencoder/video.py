"""The one place video frames are folded into the batch for the 2D VAE, in chunks so memory stays flat in T."""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange

from autoencoder.distributions import DiagonalGaussian
from autoencoder.model import FrameVAE


def _check_chunk(chunk_size: int) -> None:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _map_frames(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    video: torch.Tensor,
    out_channels: tuple[int, ...],
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """Apply a 2D fn to every frame of video [B, C, T, H, W], chunk_size frames at a time.

    fn maps [n, C, H, W] to a tuple of [n, C_i, H*scale, W*scale]; returns a tuple of [B, C_i, T, H', W'].
    Outputs are written into preallocated tensors (works with autograd: slice assignment is recorded),
    so besides the outputs only one chunk's activations are alive at a time under no_grad.
    """
    _check_chunk(chunk_size)
    b, _, t, h, w = video.shape
    # frames are taken in '(b t)' order, i.e. rearrange(video, "b c t h w -> (b t) c h w"), but gathered
    # one chunk at a time from a permuted view so the whole folded copy of the video is never made
    frames = rearrange(video, "b c t h w -> b t c h w")  # view, [B, T, C, H, W]
    oh, ow = round(h * scale), round(w * scale)
    outs = None
    for start in range(0, b * t, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, b * t), device=video.device)
        results = fn(frames[idx // t, idx % t])  # [n, C, H, W] -> each [n, C_i, H', W']
        if outs is None:  # dtype/device from the first chunk (autocast may change the dtype)
            outs = [
                torch.empty(b * t, c, oh, ow, dtype=r.dtype, device=r.device)
                for c, r in zip(out_channels, results)
            ]
        for out, r in zip(outs, results):
            out[start : start + r.shape[0]] = r
    # [B*T, C_i, H', W'] -> [B, C_i, T, H', W'] (contiguous, so callers can .view / .numpy() freely)
    return tuple(rearrange(o, "(b t) c h w -> b c t h w", b=b, t=t).contiguous() for o in outs)


def _check_video(video: torch.Tensor, channels: int, name: str) -> None:
    if video.ndim != 5 or video.shape[1] != channels:
        raise ValueError(f"{name} expects [B, {channels}, T, H, W], got {tuple(video.shape)}")
    if video.shape[0] * video.shape[2] == 0:
        raise ValueError(f"{name}: empty video {tuple(video.shape)}")


def encode_video_posterior(vae: FrameVAE, video: torch.Tensor, *, chunk_size: int = 16) -> DiagonalGaussian:
    """video [B, 3, T, H, W] in [-1, 1] -> q(z|x) with mean/logvar [B, C, T, H/f, W/f]."""
    _check_video(video, vae.config.in_channels, "encode_video")
    c, f = vae.config.latent_channels, vae.downsample_factor

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = vae.encode(x)  # FrameVAE checks H, W divisible by f
        return q.mean, q.logvar

    mean, logvar = _map_frames(encode, video, (c, c), 1.0 / f, chunk_size)
    # logvar is already clamped by FrameVAE.encode; re-wrapping clamps nothing further
    return DiagonalGaussian(mean, logvar, vae.config.logvar_min, vae.config.logvar_max)


def encode_video(
    vae: FrameVAE, video: torch.Tensor, *, chunk_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """video [B, 3, T, H, W] in [-1, 1] -> (mean, logvar), each [B, latent_channels, T, H/f, W/f]."""
    q = encode_video_posterior(vae, video, chunk_size=chunk_size)
    return q.mean, q.logvar


def decode_video(vae: FrameVAE, z: torch.Tensor, *, chunk_size: int = 16) -> torch.Tensor:
    """z [B, latent_channels, T, h, w] -> frames [B, 3, T, h*f, w*f] (roughly in [-1, 1], not clamped)."""
    _check_video(z, vae.config.latent_channels, "decode_video")
    (frames,) = _map_frames(
        lambda x: (vae.decode(x),), z, (vae.config.in_channels,), float(vae.downsample_factor), chunk_size
    )
    return frames
