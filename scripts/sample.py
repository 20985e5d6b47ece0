"""Sample videos from a trained diffusion export: latents (.safetensors) and, when the
autoencoder is known, decoded video files.

    python -m scripts.sample --checkpoint runs/diffusion/export --num-samples 8 --frames 16 --output-dir samples/
    python -m scripts.sample --checkpoint runs/diffusion/export --init-video clip.mp4 --known-frames 4 --frames 24 --output-dir pred/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError


@dataclass
class SampleConfig:
    checkpoint: str = ""  # diffusion export folder
    num_samples: int = 8
    frames: int = 0  # 0: the training clip length
    classes: list[str] = field(default_factory=list)  # names or indices; cycled; empty: all classes in turn
    guidance_scale: float = 3.0
    sampler: str = "dpmpp_2m"  # dpmpp_2m, ddim, ddpm
    steps: int = 25
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 8
    overlap: int = 0  # frames shared by consecutive windows when extending (0: half the window)
    init_video: str = ""  # prediction / extension from this video's first frames
    known_frames: int = 0
    method: str = "auto"  # condition (frame-conditioning inputs), reconstruction (guidance), auto: condition if the model has it
    guidance_weight: float = 2.0  # w_r of reconstruction guidance
    autoencoder: str = ""  # VAE export to decode with ('' = the one recorded in the export, if present)
    formats: list[str] = field(default_factory=lambda: ["mp4"])
    upscale: int = 1  # nearest-neighbour upscaling of written videos (small demo frames)
    device: str = "auto"


FLAGS = {"checkpoint": str, "num_samples": int, "frames": int, "classes": str, "guidance_scale": float,
         "sampler": str, "steps": int, "seed": int, "batch_size": int, "init_video": str, "known_frames": int,
         "method": str, "autoencoder": str, "formats": str, "device": str, "upscale": int, "eta": float,
         "overlap": int, "guidance_weight": float}


def parse_args(argv):
    p = build_parser(__doc__.split("\n")[0], prog="python -m scripts.sample")
    for name in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=f"sets {name}")
    p.add_argument("--format", dest="formats", default=None, help="mp4,gif,png (comma separated)")
    args = p.parse_args(argv)
    args.overrides = [f"{k}={v}" for k in FLAGS if (v := getattr(args, k)) is not None] + args.overrides
    return args


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), (ValueError, FileNotFoundError))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_labels(cfg: SampleConfig, class_names: list[str]) -> list[int] | None:
    if not class_names:
        if cfg.classes:
            raise ConfigError("this model is unconditional; drop classes=")
        return None
    wanted = cfg.classes or class_names
    idx = []
    for c in wanted:
        if str(c).isdigit() and int(c) < len(class_names):
            idx.append(int(c))
        elif c in class_names:
            idx.append(class_names.index(c))
        else:
            raise ConfigError(f"unknown class {c!r}; this model knows {', '.join(class_names)}")
    return [idx[i % len(idx)] for i in range(cfg.num_samples)]


def find_autoencoder(cfg: SampleConfig, meta: dict):
    """The VAE to decode with, or None; a VAE other than the one the model was trained on is an error."""
    from autoencoder.model import FrameVAE, weights_hash

    recorded = meta.get("autoencoder") or {}
    if cfg.autoencoder and not Path(cfg.autoencoder).is_dir():
        raise FileNotFoundError(f"--autoencoder {cfg.autoencoder}: no such folder (an exported FrameVAE)")
    path = cfg.autoencoder or recorded.get("path") or ""
    if not path or not Path(path).is_dir():
        return None, None  # the recorded VAE has moved: latents only (decode them later with decode_latents)
    found = weights_hash(path)
    want = recorded.get("weights_sha256")
    if want and found != want:
        raise ValueError(f"autoencoder {path} (weights {found[:12]}) is not the one this diffusion model was "
                         f"trained on (weights {want[:12]}); pass the matching --autoencoder")
    return FrameVAE.from_pretrained(path), path


def encode_init_video(cfg, vae, meta, device) -> torch.Tensor:
    """Whitened latents [1, C, K, h, w] of the first `known_frames` frames of the init video."""
    from autoencoder.video import encode_video
    from data.clips import stride_for_fps
    from data.stats import whiten
    from data.transforms import resize_and_crop, to_tensor
    from data.video_io import read_video, video_info

    if vae is None:
        raise ValueError("--init-video needs the autoencoder: pass --autoencoder DIR")
    k = cfg.known_frames
    if k < 1:
        raise ConfigError("--init-video needs --known-frames K >= 1")
    fps_out = (meta.get("latent") or {}).get("fps")
    stride = stride_for_fps(video_info(cfg.init_video)["fps"], fps_out) if fps_out else 1
    frames, _ = read_video(cfg.init_video, stride=stride, num_frames=k)
    size = meta["latent"]["shape"][1] * vae.downsample_factor
    video = to_tensor(resize_and_crop(frames, size))[None].to(device)  # [1,3,K,H,W]
    mean, _ = encode_video(vae.to(device), video, chunk_size=8)
    return whiten(mean, meta["latent"]["stats"]).cpu()


def run(args) -> list[Path]:
    from data.stats import un_whiten
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import (
        decode_to_uint8,
        generate,
        save_latent_file,
        write_outputs,
    )

    cfg = resolve_config(SampleConfig, args)
    if not cfg.checkpoint:
        raise ConfigError("pass --checkpoint DIR (a diffusion export folder)")
    out = Path(args.output_dir)
    device = pick_device(cfg.device)
    model, meta = load_diffusion_export(Path(cfg.checkpoint), map_location=device)
    unet_cfg, diff_cfg, lat = meta["unet_config"], meta["diffusion_config"], meta["latent"]
    names = meta.get("class_names") or []
    labels = resolve_labels(cfg, names)
    vae, vae_path = find_autoencoder(cfg, meta)
    known = None
    if cfg.init_video:
        known = encode_init_video(cfg, vae, meta, device).expand(cfg.num_samples, -1, -1, -1, -1)
    window = lat.get("clip_len") or 16
    frames = cfg.frames or window
    method = cfg.method if cfg.method != "auto" else ("condition" if unet_cfg.frame_conditioning else "reconstruction")
    latents = generate(model, unet_cfg, diff_cfg, num=cfg.num_samples, frames=frames, latent_shape=lat["shape"],
                       labels=labels, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler, steps=cfg.steps,
                       eta=cfg.eta, seed=cfg.seed, batch_size=cfg.batch_size, window=window, overlap=cfg.overlap or None,
                       known=known, method=method, guidance_weight=cfg.guidance_weight, device=device,
                       progress=True)
    fps = lat.get("fps") or 8.0
    written = []
    for i in range(cfg.num_samples):
        name = f"sample-{i:03d}" + (f"-{names[labels[i]]}" if labels else "")
        info = {"stats": lat.get("stats"), "autoencoder_sha256": (meta.get("autoencoder") or {}).get("weights_sha256"),
                "fps": fps, "label": labels[i] if labels else None, "label_name": names[labels[i]] if labels else None,
                "frames": frames, "known_frames": cfg.known_frames if known is not None else 0,
                "diffusion_export": str(Path(cfg.checkpoint).resolve()), "seed": cfg.seed}
        written.append(save_latent_file(out / f"{name}.safetensors", latents[i], info))
    if vae is not None:
        videos = decode_to_uint8(vae.to(device), un_whiten(latents, lat.get("stats")), device=device)
        for i, lat_path in enumerate(list(written)):
            written += write_outputs(videos[i], lat_path.with_suffix(""), fps, cfg.formats, cfg.upscale)
    else:
        print("no autoencoder found: wrote latents only; decode them with scripts.decode_latents --autoencoder DIR")
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
