"""Sample videos from a trained diffusion export: latents (.safetensors) and, when the
autoencoder is known, decoded video files.

    python -m scripts.sample --checkpoint runs/diffusion/export --num-samples 8 --frames 16 --output-dir samples/
    python -m scripts.sample --checkpoint runs/diffusion/export --init-video clip.mp4 --known-frames 4 --frames 24 --output-dir pred/
    python -m scripts.sample --checkpoint runs/demo/diffusion/export --prompt "a red circle moves to the left" --output-dir txt/
    python -m scripts.sample --checkpoint runs/diffusion/export --init-video clip.mp4 --interpolate 2 --output-dir interp/
    python -m scripts.sample --checkpoint runs/diffusion/export --latents samples/ --interpolate 4 --output-dir interp/
    python -m scripts.sample --upsample runs/sr/diffusion/export --latents samples/ --output-dir big/
    python -m scripts.sample --checkpoint BASE --interpolate 2 --upsample SR --output-dir cascade/   # the chain

--interpolate K: every frame of the input (--init-video, read at its own frame rate, or each of
our latent files given by --latents FILE_OR_DIR; with neither, the clips --checkpoint samples
first) becomes every K-th frame of the output, which has K x the frames at K x the frame rate; the
frames between are sampled in sliding windows by --interpolator (default: --checkpoint).

--guidance-interval LO,HI: classifier-free guidance only at the steps whose timestep t has
LO <= t / num_timesteps <= HI (1 is pure noise; Kynkaanniemi et al. 2024); the conditional model
alone, at the cost of one call, at the others. Default 0,1: every step.

--autoguide GUIDE [--autoguidance-scale W]: autoguidance (Karras et al. 2024) of --checkpoint's
stage: each step uses guide + W (model - guide), GUIDE a weaker version of the same model -- an
earlier checkpoint of its run (RUN/checkpoints/step-N) or an export trained on the same latents.
It pushes samples away from the errors the weaker model makes more of; it costs a second model
call per step (README "Autoguidance": on the quality benchmark about +2 points of colour match on
average, not at every model).

--upsample SR_EXPORT: a spatial super-resolution stage (trained with sr.low_res_shards) upsamples
what the stages before made, or, without --checkpoint, --latents / --init-video. Each written
latent file records every stage (`cascade`: the export, and what it did).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError, save_config


@dataclass
class SampleConfig:
    checkpoint: str = ""  # diffusion export folder
    num_samples: int = 8
    frames: int = 0  # 0: the training clip length
    classes: list[str] = field(default_factory=list)  # names or indices; cycled; empty: all classes in turn
    guidance_scale: float = 3.0
    # classifier-free guidance only where lo <= t / num_timesteps <= hi (fractions of the schedule; 1 is pure
    # noise); elsewhere the conditional model alone. [0, 1]: every step
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
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
    # autoguidance (Karras et al. 2024): a weaker model of the same run -- an export, or a training checkpoint
    # folder (RUN/checkpoints/step-N, its EMA) -- guides --checkpoint's stage at this scale ('' / 1: off)
    autoguide: str = ""
    autoguidance_scale: float = 2.0
    autoencoder: str = ""  # VAE export to decode with ('' = the one recorded in the export, if present)
    formats: list[str] = field(default_factory=lambda: ["mp4"])
    upscale: int = 1  # nearest-neighbour upscaling of written videos (small demo frames)
    device: str = "auto"
    prompt_file: str = ""  # text models: one prompt per line (with --prompt: the --prompt ones first)
    negative_prompt: str = ""  # replaces the null text in classifier-free guidance
    interpolate: int = 0  # K > 0: K x the frames of --init-video / --latents (or of the samples) at K x the fps
    interpolator: str = ""  # the export that interpolates ('' = --checkpoint)
    latents: str = ""  # with --interpolate / --upsample: a latent file of ours, or a folder of them
    upsample: str = ""  # a super-resolution export, run after the stages before
    upsample_aug: float = -1.0  # its noise-augmentation level (fraction of the schedule); < 0: the export's
    upsample_steps: int = 0  # 0: --steps
    upsample_sampler: str = ""  # '': --sampler
    upsample_window: int = 0  # frames per SR window; 0: twice the SR stage's training clip


FLAGS = {"checkpoint": str, "num_samples": int, "frames": int, "classes": str, "guidance_scale": float,
         "guidance_interval": str,
         "sampler": str, "steps": int, "seed": int, "batch_size": int, "init_video": str, "known_frames": int,
         "method": str, "autoencoder": str, "formats": str, "device": str, "upscale": int, "eta": float,
         "overlap": int, "guidance_weight": float, "interpolate": int, "latents": str, "interpolator": str,
         "upsample": str, "upsample_aug": float, "upsample_steps": int, "upsample_sampler": str,
         "upsample_window": int, "autoguide": str, "autoguidance_scale": float}


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


def _interval(cfg: SampleConfig) -> tuple[float, float]:
    """--guidance-interval LO,HI checked: two fractions of the schedule, 0 <= LO <= HI <= 1."""
    iv = cfg.guidance_interval
    if len(iv) != 2 or not 0 <= iv[0] <= iv[1] <= 1:
        raise ConfigError(f"--guidance-interval takes LO,HI with 0 <= LO <= HI <= 1 (fractions of the schedule, "
                          f"1 = pure noise), got {','.join(map(str, iv))}")
    return float(iv[0]), float(iv[1])


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


def latent_inputs(path: str, shape, autoencoder_sha256: str | None) -> list[tuple[Path, torch.Tensor, dict]]:
    """Our latent files (a file, or every .safetensors in a folder) as the input of a stage: latents
    of `shape` [C, h, w] made with the same autoencoder, one frame count."""
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
        want = list(shape)
        if [z.shape[0], *z.shape[2:]] != want:
            raise ConfigError(f"--latents {f}: latent {list(z.shape)} does not fit this model's [C, T, h, w] with "
                              f"[C, h, w] = {want}")
        if info.get("autoencoder_sha256") and autoencoder_sha256 and info["autoencoder_sha256"] != autoencoder_sha256:
            raise ConfigError(f"--latents {f}: made with another autoencoder than this model's")
        out.append((f, z, info))
    if len({z.shape[1] for _, z, _ in out}) > 1:
        raise ConfigError(f"--latents {path}: the files differ in frame count; give them one at a time")
    return out


def _ae_hash(meta: dict) -> str | None:
    return (meta.get("autoencoder") or {}).get("weights_sha256")


@dataclass
class Made:
    """What the stages so far made: whitened latents [N, C, T, h, w] (with `stats`), the export
    that made the last stage (`meta`), per-sample labels / prompts, and the provenance."""

    latents: torch.Tensor
    meta: dict
    stats: dict | None
    fps: float
    labels: list[int] | None = None
    names: list[str] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)  # the input file of each sample, if any
    cascade: list[dict] = field(default_factory=list)
    known_frames: int = 0
    vae: object = None  # the autoencoder a stage loaded (found and checked once), reused to decode


def _encode_prompts(cfg, folder, meta, texts: list[str | None]):
    """(tokens, mask) of each sample's prompt with an export's own encoder, the negative prompt's, or
    (None, None) for a model without text; warns when the encoder cuts a prompt short."""
    from scripts.runtime.export import load_export_text_encoder

    if not meta["unet_config"].text_dim or not any(texts):
        return None, None
    encoder = load_export_text_encoder(Path(folder), meta)
    for warning in encoder.caption_warnings([t for t in texts if t] + [cfg.negative_prompt or ""], "prompts",
                                            "the model's text.max_length",
                                            "shorten them: the model was trained with this length"):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    negative = encoder.encode([cfg.negative_prompt]) if cfg.negative_prompt else None
    return encoder.encode([t or "" for t in texts]), negative


def _method(cfg: SampleConfig, unet_cfg) -> str:
    """--method, with auto: condition when the model was trained with frame conditioning."""
    return cfg.method if cfg.method != "auto" else ("condition" if unet_cfg.frame_conditioning else "reconstruction")


def _labels_for(meta: dict, made: Made) -> list[int] | None:
    """The samples' class labels for a later stage: kept where the stage knows the same classes."""
    if not meta["unet_config"].num_classes or made.labels is None:
        return None
    if list(meta.get("class_names") or []) != made.names:
        raise ConfigError("the stages were trained on different class names; they cannot share labels")
    return made.labels


def _rewhiten(made: Made, to_stats: dict | None) -> torch.Tensor:
    from data.stats import un_whiten, whiten

    return whiten(un_whiten(made.latents.float(), made.stats), to_stats)


def base_stage(cfg: SampleConfig, args, device) -> Made:
    """--checkpoint: sample (class / text / prediction / extension), or interpolate --init-video or
    --latents; with --interpolate and no input, sample first, then interpolate the samples."""
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import generate

    model, meta = load_diffusion_export(Path(cfg.checkpoint), map_location=device)
    if meta.get("super_resolution"):
        raise ConfigError(f"--checkpoint {cfg.checkpoint} is a super-resolution stage: pass it as --upsample")
    unet_cfg, diff_cfg, lat = meta["unet_config"], meta["diffusion_config"], meta["latent"]
    if cfg.latents and not cfg.interpolate:
        raise ConfigError("--latents is the input of --interpolate K or --upsample SR (to decode latent files: "
                          "scripts.decode_latents)")
    if cfg.latents and cfg.init_video:
        raise ConfigError("give one input: --init-video FILE or --latents FILE_OR_DIR")
    files = latent_inputs(cfg.latents, lat["shape"], _ae_hash(meta)) if cfg.latents else []
    if files:  # one output per latent file
        cfg = replace(cfg, num_samples=len(files))
    names = (meta.get("class_names") or []) if unet_cfg.num_classes else []  # trained without labels: none
    labels = resolve_labels(cfg, names)
    prompts = read_prompts(cfg, args.prompt, bool(unet_cfg.text_dim))
    texts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)] if prompts else [None] * cfg.num_samples
    text, negative = _encode_prompts(cfg, cfg.checkpoint, meta, texts)
    vae, _ = find_autoencoder(cfg, meta)  # checked before sampling; decoding reuses it (Made.vae)
    guide = None
    if cfg.autoguide and cfg.autoguidance_scale != 1:
        from scripts.runtime.export import load_guide

        guide = load_guide(Path(cfg.autoguide), meta, map_location=device)
    window = lat.get("clip_len") or 16
    chain_interp = cfg.interpolate and not cfg.init_video and not files
    if cfg.interpolate and cfg.interpolate < 1:
        raise ConfigError(f"--interpolate must be >= 1, got {cfg.interpolate}")
    made = Made(latents=None, meta=meta, stats=lat.get("stats"), fps=lat.get("fps") or 8.0, labels=labels,
                names=list(names), texts=texts, sources=[None] * cfg.num_samples, vae=vae)
    known, frames = None, cfg.frames or window
    interp_here = cfg.interpolate and not chain_interp
    if interp_here:
        known, fps_in = interpolation_input(cfg, vae, meta, device, files)
        frames, made.fps = known.shape[2] * cfg.interpolate, fps_in * cfg.interpolate
        made.sources = [str(f) for f, _, _ in files] if files else [cfg.init_video] * cfg.num_samples
    elif cfg.init_video:
        known = encode_init_video(cfg, vae, meta, device).expand(cfg.num_samples, -1, -1, -1, -1)
        made.known_frames = cfg.known_frames
        made.sources = [cfg.init_video] * cfg.num_samples
    made.latents = generate(model, unet_cfg, diff_cfg, num=cfg.num_samples, frames=frames, latent_shape=lat["shape"],
                            labels=labels, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler, steps=cfg.steps,
                            eta=cfg.eta, seed=cfg.seed, batch_size=cfg.batch_size, window=window,
                            overlap=cfg.overlap or None, known=known, method=_method(cfg, unet_cfg),
                            guidance_weight=cfg.guidance_weight, device=device, progress=True, text=text,
                            negative_text=negative, interpolate=cfg.interpolate if interp_here else 0,
                            guidance_interval=_interval(cfg), guide=guide,
                            autoguidance_scale=cfg.autoguidance_scale)
    stage = {"stage": "interpolate" if interp_here else "base", "export": str(Path(cfg.checkpoint).resolve()),
             "frames": made.latents.shape[2], "sampler": cfg.sampler, "steps": cfg.steps,
             "guidance_scale": cfg.guidance_scale, "guidance_interval": list(_interval(cfg))}
    if guide is not None:
        stage.update(autoguide=str(Path(cfg.autoguide).resolve()), autoguidance_scale=cfg.autoguidance_scale)
    if interp_here:
        stage["factor"] = cfg.interpolate
    made.cascade.append(stage)
    if chain_interp:
        made = interpolate_stage(cfg, made, device, model)
    return made


def interpolate_stage(cfg: SampleConfig, made: Made, device, base_model) -> Made:
    """The chain's temporal interpolation of what the base stage sampled, by --interpolator (or by
    the base model itself, `base_model`)."""
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import generate

    path = cfg.interpolator or cfg.checkpoint
    model, meta = (load_diffusion_export(Path(path), map_location=device) if cfg.interpolator
                   else (base_model, made.meta))
    unet_cfg, diff_cfg, lat = meta["unet_config"], meta["diffusion_config"], meta["latent"]
    if meta.get("super_resolution") or list(lat["shape"]) != list(made.meta["latent"]["shape"]):
        raise ConfigError(f"--interpolator {path}: works on latents {lat['shape']}, the base stage made "
                          f"{made.meta['latent']['shape']}")
    if _ae_hash(meta) != _ae_hash(made.meta):
        raise ConfigError(f"--interpolator {path}: trained with another autoencoder than --checkpoint")
    text, negative = _encode_prompts(cfg, path, meta, made.texts)
    known = _rewhiten(made, lat.get("stats"))
    out = generate(model, unet_cfg, diff_cfg, num=known.shape[0], frames=known.shape[2] * cfg.interpolate,
                   latent_shape=lat["shape"], labels=_labels_for(meta, made), guidance_scale=cfg.guidance_scale,
                   sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, seed=cfg.seed + 1, batch_size=cfg.batch_size,
                   window=lat.get("clip_len") or 16, overlap=cfg.overlap or None, known=known,
                   method=_method(cfg, unet_cfg),
                   guidance_weight=cfg.guidance_weight, device=device, progress=True, text=text, negative_text=negative,
                   interpolate=cfg.interpolate, guidance_interval=_interval(cfg))
    made = replace(made, latents=out, meta=meta, stats=lat.get("stats"), fps=made.fps * cfg.interpolate,
                   cascade=[*made.cascade, {"stage": "interpolate", "export": str(Path(path).resolve()),
                                            "factor": cfg.interpolate, "frames": out.shape[2], "sampler": cfg.sampler,
                                            "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                                            "guidance_interval": list(_interval(cfg))}])
    return made


def sr_inputs(cfg: SampleConfig, meta: dict, device) -> Made:
    """Standalone --upsample: the low-resolution latents of --latents files or of --init-video
    (every frame, encoded at the stage's low-resolution size)."""
    from autoencoder.video import encode_video
    from data.transforms import resize_and_crop, to_tensor
    from data.video_io import read_video, video_info

    sr = meta["super_resolution"]
    if bool(cfg.latents) == bool(cfg.init_video):
        raise ConfigError("--upsample without --checkpoint needs one input: --latents FILE_OR_DIR or --init-video FILE")
    if cfg.latents:
        from data.stats import un_whiten

        files = latent_inputs(cfg.latents, sr["low_res_shape"], _ae_hash(meta))
        # each file un-whitened with its own stats (stats=None: the latents are raw)
        made = Made(latents=torch.stack([un_whiten(z.float(), info.get("stats")) for _, z, info in files]),
                    meta=meta, stats=None, fps=float(files[0][2].get("fps") or 8.0),
                    sources=[str(f) for f, _, _ in files], texts=[info.get("prompt") for _, _, info in files])
        labels = [info.get("label") for _, _, info in files]
        if all(isinstance(v, int) for v in labels) and meta["unet_config"].num_classes:
            made.labels, made.names = labels, list(meta.get("class_names") or [])
        return made
    vae, _ = find_autoencoder(cfg, meta)
    if vae is None:
        raise ConfigError("--init-video needs the autoencoder: pass --autoencoder DIR")
    frames, _ = read_video(cfg.init_video, num_frames=cfg.frames or None)
    size = sr["low_res_shape"][1] * vae.downsample_factor
    video = to_tensor(resize_and_crop(frames, size))[None].to(device)
    mean, _ = encode_video(vae.to(device), video, chunk_size=8)
    return Made(latents=mean.cpu(), meta=meta, stats=None, fps=float(video_info(cfg.init_video)["fps"]),
                sources=[cfg.init_video], texts=[None], vae=vae)


def upsample_stage(cfg: SampleConfig, made: Made | None, device) -> Made:
    """--upsample SR_EXPORT on what the stages before made (or on the standalone inputs)."""
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import upsample_latents

    model, meta = load_diffusion_export(Path(cfg.upsample), map_location=device)
    sr = meta.get("super_resolution")
    if not sr:
        raise ConfigError(f"--upsample {cfg.upsample}: not a super-resolution stage (trained without sr.low_res_shards)")
    if made is None:
        made = sr_inputs(cfg, meta, device)
    elif list(made.meta["latent"]["shape"]) != list(sr["low_res_shape"]):
        raise ConfigError(f"--upsample {cfg.upsample}: takes latents {sr['low_res_shape']}, the stage before made "
                          f"{made.meta['latent']['shape']}")
    elif _ae_hash(meta) != _ae_hash(made.meta):
        raise ConfigError(f"--upsample {cfg.upsample}: trained with another autoencoder than the stage before")
    if meta["unet_config"].text_dim and not any(made.texts):
        raise ConfigError(f"--upsample {cfg.upsample} is text-conditioned: give prompts (--prompt) or latent files "
                          "that carry them")
    text, negative = _encode_prompts(cfg, cfg.upsample, meta, made.texts)
    low = _rewhiten(made, sr["low_res_stats"])
    aug = None if cfg.upsample_aug < 0 else cfg.upsample_aug
    out = upsample_latents(model, meta, low, labels=_labels_for(meta, made), text=text, negative_text=negative,
                           sampler=cfg.upsample_sampler or cfg.sampler, steps=cfg.upsample_steps or cfg.steps,
                           eta=cfg.eta, seed=cfg.seed + 2, batch_size=cfg.batch_size, overlap=cfg.overlap or None,
                           aug=aug, window=cfg.upsample_window or None, device=device, progress=True)
    level = sr.get("sample_aug", 0.0) if aug is None else aug
    return replace(made, latents=out, meta=meta, stats=meta["latent"].get("stats"),
                   cascade=[*made.cascade, {"stage": "upsample", "export": str(Path(cfg.upsample).resolve()),
                                            "factor": sr["factor"], "aug": level, "frames": out.shape[2],
                                            "sampler": cfg.upsample_sampler or cfg.sampler,
                                            "steps": cfg.upsample_steps or cfg.steps}])


def interpolation_input(cfg: SampleConfig, vae, meta, device, files) -> tuple[torch.Tensor, float]:
    """(known latents [num_samples, C, N, h, w], their frame rate) for --interpolate."""
    from data.video_io import video_info

    if files:
        fps = float(files[0][2].get("fps") or (meta.get("latent") or {}).get("fps") or 8.0)
        return torch.stack([z for _, z, _ in files]), fps
    known = encode_init_video(cfg, vae, meta, device)
    return known.expand(cfg.num_samples, -1, -1, -1, -1), float(video_info(cfg.init_video)["fps"])


def run(args) -> list[Path]:
    from data.stats import un_whiten
    from scripts.runtime.generation import decode_to_uint8, save_latent_file, write_outputs

    cfg = resolve_config(SampleConfig, args, write=False)
    if args.negative_prompt is not None:  # taken verbatim (not through YAML like other overrides)
        cfg = replace(cfg, negative_prompt=args.negative_prompt)
    save_config(cfg, Path(args.output_dir) / "config.yaml")  # what ran, the negative prompt included
    if not cfg.checkpoint and not cfg.upsample:
        raise ConfigError("pass --checkpoint DIR (a diffusion export folder), or --upsample SR_EXPORT with "
                          "--latents / --init-video")
    if cfg.interpolator and not (cfg.checkpoint and cfg.interpolate):
        raise ConfigError("--interpolator is the model of --interpolate K after --checkpoint's samples")
    _interval(cfg)  # a bad --guidance-interval stops here, before any model is loaded
    if cfg.autoguide and not cfg.checkpoint:
        raise ConfigError("--autoguide guides --checkpoint's stage: pass --checkpoint too")
    out = Path(args.output_dir)
    device = pick_device(cfg.device)
    made = base_stage(cfg, args, device) if cfg.checkpoint else None
    if cfg.upsample:
        made = upsample_stage(cfg, made, device)
    meta = made.meta
    vae = made.vae if made.vae is not None else find_autoencoder(cfg, meta)[0]  # one autoencoder for all stages
    written = []
    for i in range(len(made.latents)):
        label = made.labels[i] if made.labels else None
        text, src = made.texts[i], made.sources[i]
        name = (f"sample-{i:03d}" + (f"-{made.names[label]}" if label is not None and made.names else "")
                + (f"-{slug(text)}" if text else ""))
        info = {"stats": made.stats, "autoencoder_sha256": _ae_hash(meta), "fps": made.fps, "label": label,
                "label_name": made.names[label] if label is not None and made.names else None,
                "frames": made.latents.shape[2], "known_frames": made.known_frames,
                **({"interpolate": cfg.interpolate, "interpolated_from": src}
                   if cfg.interpolate and src else {}),
                **({"upsampled_from": src} if cfg.upsample and not cfg.checkpoint else {}),
                "diffusion_export": made.cascade[-1]["export"], "seed": cfg.seed, "cascade": made.cascade,
                **({"prompt": text, "negative_prompt": cfg.negative_prompt or None} if text else {})}
        written.append(save_latent_file(out / f"{name}.safetensors", made.latents[i], info))
    if vae is not None:
        videos = decode_to_uint8(vae.to(device), un_whiten(made.latents, made.stats), device=device)
        for i, lat_path in enumerate(list(written)):
            written += write_outputs(videos[i], lat_path.with_suffix(""), made.fps, cfg.formats, cfg.upscale)
    else:
        print("no autoencoder found: wrote latents only; decode them with scripts.decode_latents --autoencoder DIR")
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
