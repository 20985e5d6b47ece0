"""Stage-1 validation: PSNR / SSIM / LPIPS and colour fidelity (CIELAB ΔE and PSNR over the
foreground, data.colour) on held-out frames, temporal flicker on held-out clips, a PNG grid
(originals above reconstructions) and a side-by-side mp4 of one clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autoencoder.metrics import psnr, ssim, temporal_flicker
from autoencoder.video import decode_video, encode_video
from data.colour import colour_fidelity
from data.transforms import to_uint8
from data.video_io import make_grid, write_png, write_video


@torch.no_grad()
def validate_autoencoder(model, lpips_fn, val_images, val_clips, out_dir: Path, *, step: int,
                         num_images: int = 16, max_clips: int = 4, fps: float = 8.0) -> dict[str, float]:
    """Reconstruct with the posterior mode; returns mean metrics and writes the visual checks."""
    model.eval()
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    n = min(num_images, len(val_images))
    result: dict[str, float] = {}
    if n > 0:
        x = torch.stack([val_images[i]["image"] for i in range(n)]).to(device)  # [N,3,H,W]
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
        result["psnr"] = psnr(x, recon).mean().item()
        result["ssim"] = ssim(x, recon).mean().item()
        if lpips_fn is not None:
            result["lpips"] = lpips_fn(x, recon).mean().item()
        pair = to_uint8(torch.cat([x, recon])[:, :, None])[:, 0]  # [2N,H,W,3] uint8
        # the frames as one "clip" of N frames: each gets its own background and foreground
        result.update({k: v for k, v in colour_fidelity(pair[:n], pair[n:]).items() if k != "fg_fraction"})
        grid = make_grid(pair, nrow=n)
        write_png(out_dir / f"recon-step{step:07d}.png", grid)
    clips = [val_clips[i]["video"] for i in range(min(max_clips, len(val_clips)))]
    if clips:
        v = torch.stack(clips).to(device)  # [B,3,T,H,W]
        mean, _ = encode_video(model, v, chunk_size=8)
        rv = decode_video(model, mean, chunk_size=8).clamp(-1, 1)
        result.update(temporal_flicker(v, rv))
        side = np.concatenate([to_uint8(v[0]), to_uint8(rv[0])], axis=2)  # [T,H,2W,3]
        write_video(out_dir / f"clip-step{step:07d}.mp4", side, fps)
    return result
