"""Sample videos from a trained diffusion export: latents (.safetensors) and, when the
autoencoder is known, decoded video files.

    python -m scripts.sample --checkpoint runs/diffusion/export --num-samples 8 --frames 16 --output-dir samples/
    python -m scripts.sample --checkpoint runs/diffusion/export --init-video clip.mp4 --known-frames 4 --frames 24 --output-dir pred/
    python -m scripts.sample --checkpoint runs/demo/diffusion/export --prompt "a red circle moves to the left" --output-dir txt/
    python -m scripts.sample --checkpoint runs/diffusion/export --init-video clip.mp4 --interpolate 2 --output-dir interp/
    python -m scripts.sample --checkpoint runs/diffusion/export --latents samples/ --interpolate 4 --output-dir interp/

--interpolate K: every frame of the input (--init-video, read at its own frame rate, or each of
our latent files given by --latents FILE_OR_DIR) becomes every K-th frame of the output, which has
K x the frames at K x the frame rate; the frames between are sampled in sliding windows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
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
    prompt_file: str = ""  # text models: one prompt per line (with --prompt: the --prompt ones first)
    negative_prompt: str = ""  # replaces the null text in classifier-free guidance
    interpolate: int = 0  # K > 0: K x the frames of --init-video / --latents at K x the fps
    latents: str = ""  # with --interpolate: a latent file of ours, or a folder of them


FLAGS = {"checkpoint": str, "num_samples": int, "frames": int, "classes": str, "guidance_scale": float,
         "sampler": str, "steps": int, "seed": int, "batch_size": int, "init_video": str, "known_frames": int,
         "method": str, "autoencoder": str, "formats": str, "device": str, "upscale": int, "eta": float,
         "overlap": int, "guidance_weight": float, "interpolate": int, "latents": str}


def parse_args(argv):
    p = build_parser(__doc__.split("\n")[0], prog="python -m scripts.sample")
    for name in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=f"sets {name}")
    p.add_argument("--format", dest="formats", default=None, help="mp4,gif,png (comma separated)")
    p.add_argument("--prompt", dest="prompt", action="append", default=[],
                   help="text models: a prompt (repeatable; cycled over --num-samples)")
    p.add_argument("--prompts", dest="prompt_file", default=None, help="text models: a file with one prompt per line")
    p.add_argument("--negative-prompt", dest="negative_prompt", default=None,
                   help="text models: replaces the null text in classifier-free guidance")
    args = p.parse_args(argv)
    args.overrides = [f"{k}={v}" for k in (*FLAGS, "prompt_file") if (v := getattr(args, k)) is not None] + args.overrides
    return args


def read_prompts(cfg: SampleConfig, given: list[str], has_text: bool) -> list[str]:
    """The prompts of this run (--prompt ones, then the file's non-empty lines); errors when a text
    model gets none or a model without text gets some."""
    prompts = [p.strip() for p in given if p.strip()]
    if cfg.prompt_file:
        try:
            text = Path(cfg.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts {cfg.prompt_file}: cannot read it as UTF-8 text ({e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if has_text and not prompts:
        raise ConfigError("this model is text-conditioned: pass --prompt TEXT (repeatable) or --prompts FILE")
    if not has_text and (prompts or cfg.negative_prompt):
        raise ConfigError("this model has no text conditioning: drop --prompt / --prompts / --negative-prompt")
    return prompts


def slug(text: str, limit: int = 48) -> str:
    """A readable file-name part: 'a red circle moves to the left' -> 'a-red-circle-moves-to-the-left'."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, out.split("-")))[:limit].strip("-") or "prompt"


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), (ValueError, FileNotFoundError))  # TextEncoderError is a ValueError


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
    if k < 1 and not cfg.interpolate:
        raise ConfigError("--init-video needs --known-frames K >= 1")
    fps_out = (meta.get("latent") or {}).get("fps")
    stride = stride_for_fps(video_info(cfg.init_video)["fps"], fps_out) if fps_out and not cfg.interpolate else 1
    frames, _ = read_video(cfg.init_video, stride=stride, num_frames=k or None)  # interpolation: every frame
    size = meta["latent"]["shape"][1] * vae.downsample_factor
    video = to_tensor(resize_and_crop(frames, size))[None].to(device)  # [1,3,K,H,W]
    mean, _ = encode_video(vae.to(device), video, chunk_size=8)
    return whiten(mean, meta["latent"]["stats"]).cpu()


def latent_inputs(path: str, meta: dict) -> list[tuple[Path, torch.Tensor, dict]]:
    """Our latent files (a file, or every .safetensors in a folder) to interpolate: the model's latent
    shape and autoencoder, one frame count."""
    from scripts.runtime.generation import load_latent_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"--latents {path}: no latent files (.safetensors written by scripts.sample) there")
    out = []
    for f in files:
        try:
            z, info = load_latent_file(f)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        want = list(meta["latent"]["shape"])
        if [z.shape[0], *z.shape[2:]] != want:
            raise ConfigError(f"--latents {f}: latent {list(z.shape)} does not fit this model's [C, T, h, w] with "
                              f"[C, h, w] = {want}")
        ae = (meta.get("autoencoder") or {}).get("weights_sha256")
        if info.get("autoencoder_sha256") and ae and info["autoencoder_sha256"] != ae:
            raise ConfigError(f"--latents {f}: made with another autoencoder than this model's")
        out.append((f, z, info))
    if len({z.shape[1] for _, z, _ in out}) > 1:
        raise ConfigError(f"--latents {path}: the files differ in frame count; interpolate them one at a time")
    return out


def interpolation_input(cfg: SampleConfig, vae, meta, device, files) -> tuple[torch.Tensor, float]:
    """(known latents [num_samples, C, N, h, w], their frame rate) for --interpolate."""
    from data.video_io import video_info

    if bool(cfg.init_video) == bool(cfg.latents):
        raise ConfigError("--interpolate K needs exactly one input: --init-video FILE or --latents FILE_OR_DIR")
    if cfg.interpolate < 1:
        raise ConfigError(f"--interpolate must be >= 1, got {cfg.interpolate}")
    if files:
        fps = float(files[0][2].get("fps") or (meta.get("latent") or {}).get("fps") or 8.0)
        return torch.stack([z for _, z, _ in files]), fps
    known = encode_init_video(cfg, vae, meta, device)
    return known.expand(cfg.num_samples, -1, -1, -1, -1), float(video_info(cfg.init_video)["fps"])


def run(args) -> list[Path]:
    from data.stats import un_whiten
    from scripts.runtime.export import load_diffusion_export, load_export_text_encoder
    from scripts.runtime.generation import (
        decode_to_uint8,
        generate,
        save_latent_file,
        write_outputs,
    )

    cfg = resolve_config(SampleConfig, args)
    if args.negative_prompt is not None:  # taken verbatim (not through YAML like other overrides)
        cfg = replace(cfg, negative_prompt=args.negative_prompt)
    if not cfg.checkpoint:
        raise ConfigError("pass --checkpoint DIR (a diffusion export folder)")
    out = Path(args.output_dir)
    device = pick_device(cfg.device)
    model, meta = load_diffusion_export(Path(cfg.checkpoint), map_location=device)
    unet_cfg, diff_cfg, lat = meta["unet_config"], meta["diffusion_config"], meta["latent"]
    if cfg.latents and not cfg.interpolate:
        raise ConfigError("--latents is the input of --interpolate K (to decode latent files: scripts.decode_latents)")
    files = latent_inputs(cfg.latents, meta) if cfg.latents else []
    if files:  # one output per latent file
        cfg = replace(cfg, num_samples=len(files))
    names = (meta.get("class_names") or []) if unet_cfg.num_classes else []  # trained without labels: none
    labels = resolve_labels(cfg, names)
    prompts = read_prompts(cfg, args.prompt, bool(unet_cfg.text_dim))
    texts, text, negative = [None] * cfg.num_samples, None, None
    if prompts:
        encoder = load_export_text_encoder(Path(cfg.checkpoint), meta)
        texts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]
        warning = encoder.truncation_warning(prompts + [cfg.negative_prompt or ""], "prompts",
                                             "the model's text.max_length", "shorten them: the model was trained "
                                             "with this length")
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        text = encoder.encode(texts)
        negative = encoder.encode([cfg.negative_prompt]) if cfg.negative_prompt else None
    vae, vae_path = find_autoencoder(cfg, meta)
    known, fps = None, lat.get("fps") or 8.0
    window = lat.get("clip_len") or 16
    frames = cfg.frames or window
    if cfg.interpolate:
        known, fps_in = interpolation_input(cfg, vae, meta, device, files)
        frames, fps = known.shape[2] * cfg.interpolate, fps_in * cfg.interpolate
    elif cfg.init_video:
        known = encode_init_video(cfg, vae, meta, device).expand(cfg.num_samples, -1, -1, -1, -1)
    method = cfg.method if cfg.method != "auto" else ("condition" if unet_cfg.frame_conditioning else "reconstruction")
    latents = generate(model, unet_cfg, diff_cfg, num=cfg.num_samples, frames=frames, latent_shape=lat["shape"],
                       labels=labels, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler, steps=cfg.steps,
                       eta=cfg.eta, seed=cfg.seed, batch_size=cfg.batch_size, window=window, overlap=cfg.overlap or None,
                       known=known, method=method, guidance_weight=cfg.guidance_weight, device=device,
                       progress=True, text=text, negative_text=negative, interpolate=cfg.interpolate)
    written = []
    for i in range(cfg.num_samples):
        name = f"sample-{i:03d}" + (f"-{names[labels[i]]}" if labels else "") + (f"-{slug(texts[i])}" if texts[i] else "")
        info = {"stats": lat.get("stats"), "autoencoder_sha256": (meta.get("autoencoder") or {}).get("weights_sha256"),
                "fps": fps, "label": labels[i] if labels else None, "label_name": names[labels[i]] if labels else None,
                "frames": frames, "known_frames": cfg.known_frames if known is not None else 0,
                **({"interpolate": cfg.interpolate, "interpolated_from": str(files[i][0] if files else cfg.init_video)}
                   if cfg.interpolate else {}),
                "diffusion_export": str(Path(cfg.checkpoint).resolve()), "seed": cfg.seed,
                **({"prompt": texts[i], "negative_prompt": cfg.negative_prompt or None} if texts[i] else {})}
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
