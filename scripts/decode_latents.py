"""Decode sampled latents (.safetensors from scripts.sample) into video files with the VAE.

    python -m scripts.decode_latents --autoencoder runs/vae/export --latents samples/ --output-dir videos/ --format mp4
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError

log = logging.getLogger("decode_latents")


@dataclass
class DecodeConfig:
    autoencoder: str = ""
    latents: str = ""  # a .safetensors file or a folder of them
    formats: list[str] = field(default_factory=lambda: ["mp4"])
    chunk_size: int = 8  # frames decoded at once: memory stays flat in T
    upscale: int = 1
    fps: float = 0.0  # 0: the fps recorded in each latent file
    device: str = "auto"


def parse_args(argv):
    p = build_parser(__doc__.split("\n")[0], prog="python -m scripts.decode_latents")
    p.add_argument("--autoencoder", default=None, help="FrameVAE export folder")
    p.add_argument("--latents", default=None, help="a latent .safetensors file or a folder of them")
    p.add_argument("--format", dest="formats", default=None, help="mp4,gif,png (comma separated)")
    p.add_argument("--upscale", default=None, help="integer nearest-neighbour upscaling")
    args = p.parse_args(argv)
    args.overrides = [f"{k}={v}" for k in ("autoencoder", "latents", "formats", "upscale")
                      if (v := getattr(args, k)) is not None] + args.overrides
    return args


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), (ValueError, FileNotFoundError))


def run(args) -> list[Path]:
    from autoencoder.model import FrameVAE, weights_hash
    from data.stats import un_whiten
    from scripts.runtime.generation import decode_to_uint8, load_latent_file, write_outputs
    from scripts.sample import pick_device

    cfg = resolve_config(DecodeConfig, args)
    if not cfg.autoencoder or not cfg.latents:
        raise ConfigError("pass --autoencoder DIR and --latents FILE_OR_DIR")
    src = Path(cfg.latents)
    files = sorted(src.glob("*.safetensors")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{src}: no latent .safetensors files found")
    device = pick_device(cfg.device)
    vae = FrameVAE.from_pretrained(cfg.autoencoder).to(device)
    vae_hash = weights_hash(cfg.autoencoder)
    loaded = [(f, *load_latent_file(f)) for f in files]
    for f, latent, meta in loaded:  # every file is checked before any output is written
        want = meta.get("autoencoder_sha256")
        if want and want != vae_hash:
            raise ValueError(f"{f} was made for autoencoder weights {want[:12]}, but {cfg.autoencoder} has "
                             f"{vae_hash[:12]}: decode with the autoencoder the diffusion model was trained on")
        if not want:
            log.warning("%s records no autoencoder hash: cannot check that %s is the VAE it was made for",
                        f, cfg.autoencoder)
        if latent.shape[0] != vae.config.latent_channels:
            raise ValueError(f"{f}: {latent.shape[0]} latent channels, {cfg.autoencoder} expects "
                             f"{vae.config.latent_channels}")
    out, written = Path(args.output_dir), []
    for f, latent, meta in loaded:
        frames = decode_to_uint8(vae, un_whiten(latent, meta.get("stats"))[None], cfg.chunk_size, device)[0]
        fps = cfg.fps or meta.get("fps") or 8.0
        written += write_outputs(frames, out / f.stem, fps, cfg.formats, cfg.upscale)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
