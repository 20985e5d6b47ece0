"""Turning a diffusion model into latents and latents into files, shared by periodic sampling in
training, `scripts.sample` and `scripts.decode_latents`.

Latent files: one `.safetensors` per sample with tensor `latent` [C,T,h,w] (whitened, as the
model produces it) and metadata `lvd` = JSON {stats {mean,std}, autoencoder_sha256, fps, label,
label_name, frames, ...}; decoding un-whitens with the recorded stats.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.files import atomic_write
from data.stats import load_stats, un_whiten
from diffusion.conditioning import noise_augment
from diffusion.guidance import (
    extend_video,
    fill_video,
    interpolate_video,
    reconstruction_guided,
    replace_known,
)
from diffusion.sampling import autoguidance, classifier_free_guidance, sample
from diffusion.schedules import make_alphas_cumprod

FORMATS = ("mp4", "gif", "png")


def alphas_for(diff_cfg) -> torch.Tensor:
    return make_alphas_cumprod(diff_cfg.schedule, diff_cfg.num_timesteps, beta_start=diff_cfg.beta_start,
                               beta_end=diff_cfg.beta_end, zero_terminal_snr=diff_cfg.zero_terminal_snr,
                               shift=diff_cfg.schedule_shift)


@torch.no_grad()
def generate(model, unet_cfg, diff_cfg, *, num: int, frames: int, latent_shape, labels=None,
             guidance_scale: float = 1.0, sampler: str = "dpmpp_2m", steps: int = 25, eta: float = 0.0, seed: int = 0,
             batch_size: int = 8, window: int | None = None, overlap: int | None = None, known=None,
             method: str = "condition", guidance_weight: float = 2.0, device="cpu", progress=False,
             text=None, negative_text=None, interpolate: int = 0, low_res=None, aug_level: int = 0,
             guidance_interval: tuple[float, float] | None = None, guide=None,
             autoguidance_scale: float = 1.0) -> torch.Tensor:
    """Whitened latents [num, C, frames, h, w].

    `guide`: a weaker model (`scripts.runtime.export.load_guide`) for autoguidance at
    `autoguidance_scale` (`diffusion.sampling.autoguidance`; 1: off), inside any classifier-free
    guidance.

    `guidance_interval` (lo, hi), fractions of the schedule: classifier-free guidance only at the
    steps whose timestep t has lo <= t / num_timesteps <= hi (None or (0, 1): at every step).

    A super-resolution stage is given `low_res` [num, C', frames, h', w'] (whitened with the
    stage's low-resolution stats, noise-augmented to `aug_level` already: `upsample_latents`); its
    frames are sampled in windows of `window` overlapping by `overlap`, each window given the
    overlap frames the one before it made (frame conditioning) and its slice of `low_res`.

    `interpolate` = K > 0: temporal interpolation of `known` [num, C, N, h, w] to N x K frames
    (`diffusion.guidance.interpolate_video`; `frames` is then N x K).

    `text`: (tokens [num, L, D], mask [num, L]) of each sample's prompt for a text-conditioned
    model; `negative_text` (tokens [1, L, D], mask [1, L]) replaces the null text in guidance.

    Clips longer than `window` (the training clip length), or with `known` frames
    [num, C, K, h, w] given, are generated autoregressively in windows that overlap by `overlap`
    frames; the known/overlap frames reach the model through its frame-conditioning inputs
    (`method="condition"`) or through reconstruction guidance (`method="reconstruction"`)."""
    c, h, w = latent_shape
    if method not in ("condition", "reconstruction"):
        raise ValueError(f"unknown method {method!r} (expected 'condition' or 'reconstruction')")
    if method == "condition" and not unet_cfg.frame_conditioning and (known is not None or frames > (window or frames)):
        raise ValueError("this model was trained without frame conditioning (model.frame_conditioning=false), "
                         "so it cannot be given frames: use --method reconstruction")
    window = window or frames
    overlap = min(overlap if overlap is not None else window // 2, window - 1)
    ab = alphas_for(diff_cfg)
    interval = None
    if guidance_interval is not None:
        lo, hi = guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"the guidance interval is (lo, hi) with 0 <= lo <= hi <= 1 (fractions of the schedule), "
                             f"got {tuple(guidance_interval)}")
        if (lo, hi) != (0, 1):
            interval = (lo * diff_cfg.num_timesteps, hi * diff_cfg.num_timesteps)
    outs = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        g = torch.Generator(device="cpu").manual_seed(seed + start)
        lab = None if labels is None or not unet_cfg.num_classes else torch.as_tensor(labels[start : start + n], dtype=torch.long, device=device)
        kn = (known[start : start + n] if known is not None else torch.zeros(n, c, 0, h, w)).to(device)
        txt = None if text is None else {"text": text[0][start : start + n].to(device),
                                         "text_mask": text[1][start : start + n].to(device)}
        low = None if low_res is None else low_res[start : start + n].to(device)

        def sample_fn(context, mask, frames=None, lab=lab, g=g, n=n, txt=txt, low=low):
            cond = ({} if lab is None else {"class_labels": lab}) | (txt or {})
            if low is not None:
                cond.update(low_res=low[:, :, frames], aug_level=torch.full((n,), aug_level, device=device))
            base = model if guide is None else autoguidance(model, guide, autoguidance_scale)
            net = base
            if ((unet_cfg.num_classes and lab is not None) or txt) and guidance_scale != 1.0:
                net = classifier_free_guidance(base, guidance_scale, null_label=unet_cfg.num_classes or None,
                                               negative_text=negative_text, interval=interval)
            if method == "reconstruction" and mask.any():
                net = reconstruction_guided(net, context, mask, ab, diff_cfg.prediction, guidance_weight)
            if unet_cfg.frame_conditioning:
                given = mask if method == "condition" else torch.zeros_like(mask)
                cond.update(cond_frames=context * given, cond_mask=given)
            x = sample(net, (n, c, context.shape[2], h, w), alphas_cumprod=ab, prediction=diff_cfg.prediction,
                       sampler=sampler, steps=steps, eta=eta, cond=cond, generator=g, device=device, progress=progress,
                       noise_correlation=diff_cfg.frame_noise_correlation, self_condition=unet_cfg.self_condition)
            return replace_known(x, context, mask)

        if low is not None:
            video = torch.zeros(n, c, low.shape[2], h, w, device=device)
            fixed = torch.zeros(low.shape[2], dtype=torch.bool)
            outs.append(fill_video(sample_fn, video, fixed, window, overlap).cpu())
        elif interpolate:
            outs.append(interpolate_video(sample_fn, kn, interpolate, window, overlap).cpu())
        else:
            outs.append(extend_video(sample_fn, kn, frames, window, overlap).cpu())
    return torch.cat(outs)


@torch.no_grad()
def upsample_latents(model, meta: dict, low: torch.Tensor, *, labels=None, text=None, negative_text=None,
                     guidance_scale: float = 1.0, sampler: str = "ddpm", steps: int = 100, eta: float = 0.0,
                     seed: int = 0, batch_size: int = 8, overlap: int | None = None, aug: float | None = None,
                     window: int | None = None, device="cpu", progress=False) -> torch.Tensor:
    """A super-resolution export's latents [N, C, T, H, W] (whitened with its own stats) from
    low-resolution latents [N, C', T, h, w] whitened with its `low_res_stats`. The
    input is noise-augmented once, to `aug` (a fraction of the schedule; default: the export's
    `sample_aug`), with a seeded draw. Frames are made in windows of `window` frames (default twice
    the training clip) overlapping by `overlap` (default half a window)."""
    sr = meta.get("super_resolution")
    if not sr:
        raise ValueError("this diffusion export is not a super-resolution stage (trained without sr.low_res_shards)")
    want = sr["low_res_shape"]
    if low.ndim != 5 or [low.shape[1], *low.shape[3:]] != [want[0], *want[1:]]:
        raise ValueError(f"the super-resolution stage takes low-resolution latents [N, {want[0]}, T, {want[1]}, "
                         f"{want[2]}], got {list(low.shape)}")
    unet_cfg, diff_cfg, lat = meta["unet_config"], meta["diffusion_config"], meta["latent"]
    aug = sr.get("sample_aug", 0.0) if aug is None else aug
    if not 0 <= aug <= 1:
        raise ValueError(f"the augmentation level is a fraction of the schedule in [0, 1], got {aug}")
    level = min(int(round(aug * diff_cfg.num_timesteps)), diff_cfg.num_timesteps - 1)
    g = torch.Generator().manual_seed(seed + 7919)
    augmented = noise_augment(low.float(), torch.full((low.shape[0],), level), alphas_for(diff_cfg), g)
    # one window of up to twice the training clip: each window boundary adds a visible jump (measured:
    # 1.33x the data's frame-to-frame change there, against 1.1x inside a window; README "The cascade")
    window = window or 2 * (lat.get("clip_len") or low.shape[2])
    return generate(model, unet_cfg, diff_cfg, num=low.shape[0], frames=low.shape[2], latent_shape=lat["shape"],
                    labels=labels, guidance_scale=guidance_scale, sampler=sampler, steps=steps, eta=eta, seed=seed,
                    batch_size=batch_size, window=window, overlap=overlap, device=device, progress=progress,
                    text=text, negative_text=negative_text, low_res=augmented, aug_level=level)


def save_latent_file(path: Path, latent: torch.Tensor, meta: dict) -> Path:
    """Atomically write one sample's whitened latent [C,T,h,w] with JSON metadata."""
    with atomic_write(path) as tmp:
        save_file({"latent": latent.detach().cpu().float().contiguous()}, str(tmp), metadata={"lvd": json.dumps(meta)})
    return Path(path)


def load_latent_file(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lvd", "{}"))
            latent = f.get_tensor("latent")
    except Exception as e:  # safetensors raises its own types for damaged files
        raise ValueError(f"{path}: not a latent file written by scripts.sample ({e})") from None
    if latent.ndim != 4:
        raise ValueError(f"{path}: latent must be [C,T,h,w], got {tuple(latent.shape)}")
    return latent, meta


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor, chunk_size: int = 8, device="cpu") -> np.ndarray:
    """Un-whitened latents [N,C,T,h,w] -> uint8 frames [N,T,H,W,3], decoded frame-chunk by chunk.

    One sample at a time: the convolutions then see the same batch shapes whether a latent is
    decoded alone (scripts.decode_latents) or with others (scripts.sample), so both give the same
    bytes (kernels may round differently for different batch sizes)."""
    from autoencoder.video import decode_video
    from data.transforms import to_uint8

    out = [decode_video(vae, z[None].to(device), chunk_size=chunk_size).clamp(-1, 1).cpu() for z in latents]
    return np.concatenate([to_uint8(v) for v in out])


def write_outputs(frames: np.ndarray, stem: Path, fps: float, formats=("mp4",), upscale: int = 1) -> list[Path]:
    """Write one clip uint8 [T,H,W,3] as stem.mp4 / stem.gif / stem-frames/*.png + stem-strip.png."""
    from data.video_io import make_grid, write_png, write_png_frames, write_video

    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    written = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r} (expected one of {FORMATS})")
        if fmt in ("mp4", "gif"):
            written.append(write_video(stem.with_suffix(f".{fmt}"), frames, fps))
        else:
            write_png_frames(stem.parent / f"{stem.name}-frames", frames)
            written.append(write_png(stem.parent / f"{stem.name}-strip.png", make_grid(frames, nrow=len(frames))))
    return written


def sample_and_save(model, unet_cfg, diff_cfg, *, latent_shape, frames: int, class_names: list[str],
                    stats: dict | None, fps: float, out_dir: Path, tag: str, num: int, steps: int, sampler: str,
                    guidance_scale: float, autoencoder: str | None, seed: int,
                    autoencoder_sha256: str | None = None, text_encoder=None,
                    prompts=()) -> tuple[list[Path], np.ndarray | None]:
    """Periodic samples during training: latent files (recording the shards' autoencoder hash, so
    decode_latents can refuse another VAE), and mp4 + PNG strip when a VAE is given.
    Returns (paths written, decoded uint8 frames [N,T,H,W,3] or None without a VAE)."""
    device = next(model.parameters()).device
    labels = [i % len(class_names) for i in range(num)] if unet_cfg.num_classes else None
    texts, text = [None] * num, None
    if text_encoder is not None and prompts:
        texts = [prompts[i % len(prompts)] for i in range(num)]
        text = text_encoder.encode(texts)
    lat = generate(model, unet_cfg, diff_cfg, num=num, frames=frames, latent_shape=latent_shape, labels=labels,
                   guidance_scale=guidance_scale, sampler=sampler, steps=steps, seed=seed, device=device, text=text)
    paths, frames_u8 = [], None
    for i in range(num):
        meta = {"stats": stats, "autoencoder_sha256": autoencoder_sha256, "fps": fps, "label": labels[i] if labels else None,
                "label_name": class_names[labels[i]] if labels else None, **({"prompt": texts[i]} if texts[i] else {})}
        paths.append(save_latent_file(Path(out_dir) / f"{tag}-{i:03d}.safetensors", lat[i], meta))
    if autoencoder:
        from autoencoder.model import FrameVAE

        vae = FrameVAE.from_pretrained(autoencoder).to(device)
        frames_u8 = decode_to_uint8(vae, un_whiten(lat, stats), device=device)
        for i in range(num):
            paths += write_outputs(frames_u8[i], Path(out_dir) / f"{tag}-{i:03d}", fps=fps, formats=("mp4", "png"))
    return paths, frames_u8


@functools.lru_cache(maxsize=2)
def reference_clips(shards: str, num: int) -> tuple[torch.Tensor, tuple, tuple]:
    """The first `num` video clips of the shards (posterior means, whitened) [num, C, T, h, w],
    their labels and captions: the same clips every time a run scores against its data."""
    from data.latents import make_latent_loader

    lat, labels, captions = [], [], []
    for batch in make_latent_loader(shards, kind="video", batch_size=min(16, num), shuffle_buffer=0, use_mean=True):
        lat.append(batch["latent"])
        labels += [int(x) for x in batch.get("label", [-1] * len(batch["latent"]))]
        captions += list(batch.get("caption", [None] * len(batch["latent"])))
        if sum(len(x) for x in lat) >= num:
            break
    return torch.cat(lat)[:num], tuple(labels[:num]), tuple(captions[:num])


@functools.lru_cache(maxsize=2)
def _decoded_reference(shards: str, autoencoder: str, num: int, device: str) -> np.ndarray:
    """`reference_clips` un-whitened with the shards' stats.json and decoded by the autoencoder ->
    uint8 [num,T,H,W,3]. Cached: periodic samples and evaluations of one run compare against the
    same clips every time, so they are read and decoded once."""
    from autoencoder.model import FrameVAE

    vae = FrameVAE.from_pretrained(autoencoder).to(device)
    return decode_to_uint8(vae, un_whiten(reference_clips(shards, num)[0], load_stats(shards)), device=device)


def sample_quality(samples_u8, shards, autoencoder: str, *, num_reference: int = 32, device="cpu") -> dict[str, float]:
    """data.synthetic.video_quality of decoded samples (uint8 [N,T,H,W,3]) against the first
    `num_reference` clips of the shards decoded by the same autoencoder (posterior means): whether
    objects come out whole, in the data's colours, constant along the clip, and move like the data."""
    from data.synthetic import video_quality

    reference = _decoded_reference(str(shards), str(autoencoder), num_reference, str(device))
    return video_quality(list(samples_u8), list(reference))


def periodic_samples(model, unet_cfg, diff_cfg, manifest: dict, shards, out_dir: Path, *, step: int, num: int,
                     steps: int, sampler: str, guidance_scale: float, autoencoder: str | None, seed: int,
                     fps: float | None, device, text_encoder=None, prompts=()) -> dict | None:
    """Stage 2's periodic samples (`sample.every`): latents (and, with an autoencoder, videos) in
    `out_dir` tagged with the step; with an autoencoder, also a `"split": "sample"` metrics row of
    what a person would see: objects whole, in the data's colours, constant, moving like the data."""
    _, frames = sample_and_save(model, unet_cfg, diff_cfg, latent_shape=manifest["latent_shape"],
                                frames=manifest["clip_len"], class_names=list(manifest.get("labels") or []),
                                stats=load_stats(shards).to_dict(), fps=fps or 8.0, out_dir=out_dir,
                                tag=f"step{step:07d}", num=num, steps=steps, sampler=sampler,
                                guidance_scale=guidance_scale, autoencoder=autoencoder, seed=seed,
                                autoencoder_sha256=(manifest.get("autoencoder") or {}).get("weights_sha256"),
                                text_encoder=text_encoder, prompts=prompts)
    if frames is None:
        return None
    return {"step": step, "split": "sample", **sample_quality(frames, shards, autoencoder, device=device)}
