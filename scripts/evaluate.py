"""Score generated videos against reference data: FVD (I3D), FID (Inception; both from
user-supplied TorchScript files) and the metrics that need no weights (latent Fréchet distance,
temporal flicker, the synthetic tracker's figures, prompt adherence). One JSON line per metric.

    python -m scripts.evaluate --samples samples/ --reference DATA_OR_SHARDS [--i3d FILE] [--inception FILE]
    python -m scripts.evaluate --checkpoint runs/demo/diffusion/export --samples eval/ --num-samples 32 \\
        --reference runs/demo/shards   # sample into eval/ first, then score

--samples: a folder written by scripts.sample (videos, with their latent files and prompts when
present). --reference: a data folder (videos; clips of the samples' length from their start) or a
shards folder (latents; decoded with the autoencoder that made them for the pixel metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from data.discovery import discover, media_kind
from data.files import atomic_write
from evaluation.detectors import DetectorError, load_detector
from evaluation.suite import weight_free, with_detectors
from scripts.runtime.config import ConfigError
from scripts.runtime.generation import load_latent_file


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=Path, required=True, help="folder of generated videos (scripts.sample output)")
    p.add_argument("--reference", type=Path, required=True, help="data folder or latent-shards folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="diffusion export: sample --num-samples into --samples first")
    p.add_argument("--num-samples", type=int, default=32, help="with --checkpoint: how many to sample (default 32)")
    p.add_argument("--sample-arg", action="append", default=[], metavar="ARG",
                   help="with --checkpoint: an extra scripts.sample argument (repeat; e.g. --sample-arg=--prompts=p.txt)")
    p.add_argument("--autoencoder", type=Path, default=None,
                   help="autoencoder export for decoding shards (default: the one the manifest records)")
    p.add_argument("--num-reference", type=int, default=None, help="reference clips (default: as many as samples)")
    p.add_argument("--i3d", type=Path, default=None, help="I3D TorchScript file (i3d_torchscript.pt) for FVD")
    p.add_argument("--i3d-sha256", default="", help="refuse an --i3d file with another sha256")
    p.add_argument("--inception", type=Path, default=None, help="Inception TorchScript file (inception-2015-12-05.pt) for FID")
    p.add_argument("--inception-sha256", default="", help="refuse an --inception file with another sha256")
    p.add_argument("--fid-frames", type=int, default=2048, help="at most this many frames per set for FID")
    p.add_argument("--seed", type=int, default=0, help="which reference clips and FID frames are drawn")
    p.add_argument("--output", type=Path, default=None, help="JSON lines file (default SAMPLES/evaluation.jsonl)")
    return p.parse_args(argv)


def resize_clip(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, *size, 3] (area averaging down, nearest for whole-number upscales)."""
    h, w = frames.shape[1:3]
    if (h, w) == size:
        return frames
    up = size[0] % h == 0 and size[1] % w == 0
    interp = cv2.INTER_NEAREST if up else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (size[1], size[0]), interpolation=interp) for f in frames])


def load_samples(folder: Path) -> tuple[np.ndarray, torch.Tensor | None, list]:
    """The folder's videos (one per name; mp4 first) -> uint8 clips [N, T, H, W, 3], their
    latents [N, C, T, h, w] when every video has its latent file, and their prompts."""
    from data.video_io import read_video

    if not folder.is_dir():
        raise ConfigError(f"--samples {folder}: no such folder")
    stems: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda q: (q.suffix.lower() != ".mp4", q.name)):
        if p.is_file() and media_kind(p.name) == "video" and p.suffix.lower() != ".gif":
            stems.setdefault(p.stem, p)
    if len(stems) < 2:
        raise ConfigError(f"--samples {folder}: {len(stems)} video files; the Fréchet distances need at least 2")
    clips, latents, prompts = [], [], []
    for stem, path in sorted(stems.items()):
        clips.append(read_video(path)[0])
        lat_path = folder / f"{stem}.safetensors"
        if lat_path.is_file():
            z, meta = load_latent_file(lat_path)
            latents.append(z)
            prompts.append(meta.get("prompt"))
        else:
            prompts.append(None)
    shapes = {c.shape for c in clips}
    if len(shapes) > 1:
        raise ConfigError(f"--samples {folder}: the videos differ in shape ({sorted(shapes)[:3]}); score one kind at a time")
    lat = torch.stack(latents) if len(latents) == len(clips) else None
    return np.stack(clips), lat, prompts


def _shard_reference(folder: Path, args, frames: int, size, num: int):
    from autoencoder.model import FrameVAE, weights_hash
    from data.latents import make_latent_loader
    from data.shards import load_manifest
    from data.stats import load_stats, un_whiten
    from scripts.runtime.generation import decode_to_uint8

    manifest = load_manifest(folder)
    lat = torch.cat([b["latent"] for b in make_latent_loader(folder, kind="video", batch_size=64, use_mean=True,
                                                              shuffle_buffer=0)])
    if lat.shape[2] < frames:
        raise ConfigError(f"--reference {folder}: clips of {lat.shape[2]} frames, shorter than the samples' {frames}")
    lat = lat[torch.randperm(len(lat), generator=torch.Generator().manual_seed(args.seed))[:num], :, :frames]
    ae = args.autoencoder or Path(manifest["autoencoder"].get("path", ""))
    if not (ae / "model.safetensors").is_file():
        raise ConfigError(f"--reference {folder}: the autoencoder that made it ({ae}) is not there; pass --autoencoder")
    if weights_hash(ae) != manifest["autoencoder"]["weights_sha256"]:
        raise ConfigError(f"--autoencoder {ae}: not the autoencoder these shards were encoded with (weights differ)")
    vae = FrameVAE.from_pretrained(ae).eval()
    clips = decode_to_uint8(vae, un_whiten(lat, load_stats(folder)))
    return np.stack([resize_clip(c, size) for c in clips]), lat


def _data_reference(folder: Path, args, frames: int, size, num: int):
    from data.video_io import read_video

    items = [it for it in discover(folder)[0] if it.kind == "video"]
    order = np.random.default_rng(args.seed).permutation(len(items))
    clips, short = [], 0
    for i in order:
        if len(clips) == num:
            break
        try:
            video = read_video(items[i].path)[0]
        except Exception as e:  # noqa: BLE001 - a broken reference file is skipped with a note, not fatal
            print(f"note: --reference {items[i].relpath}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if len(video) < frames:
            short += 1
            continue
        clips.append(resize_clip(video[:frames], size))
    if short:
        print(f"note: {short} reference videos are shorter than {frames} frames and were skipped", file=sys.stderr)
    if len(clips) < 2:
        raise ConfigError(f"--reference {folder}: {len(clips)} usable videos of >= {frames} frames; need at least 2")
    return np.stack(clips), None


def load_reference(args, frames: int, size, num: int):
    folder = args.reference
    if not folder.is_dir():
        raise ConfigError(f"--reference {folder}: no such folder")
    if (folder / "manifest.json").is_file():
        return _shard_reference(folder, args, frames, size, num)
    return _data_reference(folder, args, frames, size, num)


def sample_first(args) -> None:
    from scripts import sample

    argv = ["--checkpoint", str(args.checkpoint), "--num-samples", str(args.num_samples), "--output-dir",
            str(args.samples), "--format", "mp4", "--seed", str(args.seed), *args.sample_arg]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the metric lines
        rc = sample.main(argv)
    if rc != 0:
        raise ConfigError(f"--checkpoint {args.checkpoint}: sampling failed (see above)")


def evaluate(args) -> list[dict]:
    # the detectors first: a wrong file is reported before minutes of sampling and decoding
    i3d = load_detector(args.i3d, "i3d", args.i3d_sha256) if args.i3d else None
    inception = load_detector(args.inception, "inception", args.inception_sha256) if args.inception else None
    if args.checkpoint is not None:
        sample_first(args)
    clips, latents, prompts = load_samples(args.samples)
    n, frames, size = len(clips), clips.shape[1], clips.shape[2:4]
    reference, ref_latents = load_reference(args, frames, size, args.num_reference or n)
    if latents is not None and ref_latents is not None and latents.shape[1:] != ref_latents.shape[1:]:
        print(f"note: sample latents {list(latents.shape[1:])} and reference latents {list(ref_latents.shape[1:])} "
              "differ in shape: no latent_fd", file=sys.stderr)
        latents = None
    rows = with_detectors(clips, reference, i3d=i3d, inception=inception, fid_frames=args.fid_frames, seed=args.seed)
    rows += weight_free(clips, reference, sample_latents=latents, reference_latents=ref_latents, prompts=prompts)
    common = {"clips": n, "reference_clips": len(reference), "frames": frames, "seed": args.seed,
              "samples": str(args.samples), "reference": str(args.reference)}
    return [{**r, **common} for r in rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = evaluate(args)
    except (ConfigError, DetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    out = args.output or args.samples / "evaluation.jsonl"
    with atomic_write(out) as tmp:
        tmp.write_text(lines)
    sys.stdout.write(lines)
    print(f"[evaluate] {len(rows)} metrics -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
