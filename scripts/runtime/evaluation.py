"""Sample-quality evaluation of a trained model (scripts.benchmark --only sampler_quality): the
latent Fréchet distance of samples to training clips and to DDPM-250 samples, and the decoded
object's motion (data.synthetic.motion_summary), for one sampler and step count."""

from __future__ import annotations

import time
from pathlib import Path

from evaluation.frechet import clip_features, frechet_distance
from scripts.runtime.measure import setup

JUMP_PX = 4.0  # a frame-to-frame move of the object's centre this large (32x32 frames) counts as a jump


def sampler_quality(spec: dict) -> dict:
    """One sampler/step count on a trained demo model: latent Fréchet distance of `N` samples to `N`
    training clips and to the DDPM-250 samples (cached by the parent); and, tracking the decoded
    object's centre, its path smoothness (data.synthetic.path_smoothness), mean speed in pixels per
    frame and the share of frame-to-frame moves over JUMP_PX (the "training" row is the target)."""
    import torch

    from autoencoder.model import FrameVAE
    from data.latents import make_latent_loader
    from data.stats import un_whiten
    from data.synthetic import motion_summary
    from scripts.runtime.export import load_diffusion_export, load_export_text_encoder
    from scripts.runtime.generation import decode_to_uint8, generate

    device, _, sync = setup(spec)
    demo = Path(spec["demo_dir"])
    model, meta = load_diffusion_export(demo / "diffusion" / "export", map_location=device)
    lat, n = meta["latent"], spec["N"]
    labels = [i % len(meta["class_names"]) for i in range(n)] if meta["unet_config"].num_classes else None
    train, captions = [], []
    for batch in make_latent_loader(demo / "shards", kind="video", batch_size=n, use_mean=True, shuffle_buffer=0):
        train.append(batch["latent"])
        captions += batch["caption"]
    text = None
    if meta["unet_config"].text_dim:  # a text model (the text demo): the training clips' own captions
        encoder = load_export_text_encoder(demo / "diffusion" / "export", meta)
        text = encoder.encode([c or "" for c in captions[:n]])
    train = torch.cat(train)[torch.randperm(sum(len(b) for b in train), generator=torch.Generator().manual_seed(0))]
    if len(train) < 2 * n:
        raise SystemExit(f"{demo / 'shards'} has {len(train)} clips; the comparison needs 2 x N = {2 * n}")
    start = time.perf_counter()
    if spec["sampler"] == "training":  # the noise floor: N other training clips in place of samples
        out = train[n : 2 * n]
    else:
        out = generate(model, meta["unet_config"], meta["diffusion_config"], num=n, frames=lat["clip_len"],
                       latent_shape=lat["shape"], labels=labels, guidance_scale=spec["guidance_scale"],
                       sampler=spec["sampler"], steps=spec["steps"], seed=spec["seed"], batch_size=n, device=device,
                       text=text)
    sync()
    seconds = time.perf_counter() - start
    feats = clip_features(out)
    result = {"fd_to_training": frechet_distance(feats, clip_features(train[:n])), "s_per_video": seconds / n}
    cache = Path(spec["cache"])
    if spec["sampler"] == "ddpm" and spec["steps"] == 250:
        torch.save(out, cache)
    elif cache.exists():
        result["fd_to_ddpm250"] = frechet_distance(feats, clip_features(torch.load(cache, weights_only=True)))
    vae = FrameVAE.from_pretrained(demo / "vae" / "export").to(device).eval()
    frames = decode_to_uint8(vae, un_whiten(out, lat["stats"]), device=device)
    motion = motion_summary(frames, jump_px=JUMP_PX)  # videos with the object found in every frame
    result["tracked_videos"] = motion.pop("videos")
    return {**result, **motion}
