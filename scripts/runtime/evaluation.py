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
                       sampler=spec["sampler"], steps=spec["steps"], eta=spec.get("eta", 0.0), seed=spec["seed"],
                       batch_size=n, device=device,
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


def _filled_metrics(truth, videos, filled) -> dict:
    """Tracked-centre error (px) and PSNR (dB) on the `filled` frames of uint8 clips against the truth."""
    import numpy as np

    from data.synthetic import track_object

    errors, psnrs = [], []
    for true, got in zip(truth, videos):
        a, b = track_object(true)["centre"][filled], track_object(got)["centre"][filled]
        errors += list(np.where(np.isfinite(b).all(1), np.hypot(*(a - b).T), np.inf))
        mse = ((true[filled].astype(np.float64) - got[filled].astype(np.float64)) ** 2).mean()
        psnrs.append(10 * np.log10(255**2 / max(mse, 1e-10)))
    errors = np.asarray(errors)
    return {"centre_err_median": float(np.median(errors)), "centre_err_mean": float(errors[np.isfinite(errors)].mean()),
            "object_lost": float(np.mean(~np.isfinite(errors))), "psnr": float(np.mean(psnrs))}


def interpolation_quality(spec: dict) -> dict:
    """Temporal interpolation (issue 15) on held-out synthetic clips (another seed than the data):
    every `factor`-th frame given, the rest filled by the model (`generate(..., interpolate=)`,
    each clip's own caption for a text model), by repeating the last given frame, and by
    cross-fading between the given frames; tracked-centre error and PSNR on the filled frames,
    and the VAE round trip of the true frames (the floor for anything decoded by it)."""
    import numpy as np
    import torch

    from autoencoder.model import FrameVAE
    from autoencoder.video import decode_video, encode_video
    from data.stats import un_whiten, whiten
    from data.synthetic import make_synthetic_video, synthetic_caption
    from data.transforms import to_tensor, to_uint8
    from scripts.runtime.export import load_diffusion_export, load_export_text_encoder
    from scripts.runtime.generation import decode_to_uint8, generate

    device, _, sync = setup(spec)
    demo, k, n = Path(spec["demo_dir"]), spec["factor"], spec["N"]
    model, meta = load_diffusion_export(demo / "diffusion" / "export", map_location=device)
    vae = FrameVAE.from_pretrained(demo / "vae" / "export").to(device).eval()
    lat = meta["latent"]
    t, size = lat["clip_len"], lat["shape"][1] * vae.downsample_factor
    truth = np.stack([make_synthetic_video(i, num_frames=t, size=size, seed=spec["seed"])[0] for i in range(n)])
    video = torch.stack([to_tensor(c) for c in truth]).to(device)  # [N, 3, T, H, W]
    with torch.no_grad():
        mean, _ = encode_video(vae, video[:, :, ::k], chunk_size=8)
        round_trip = np.stack([to_uint8(decode_video(vae, encode_video(vae, v[None], chunk_size=8)[0]).clamp(-1, 1))[0]
                               for v in video])  # fmt: skip
    known = whiten(mean.cpu(), lat["stats"])
    text = None
    if meta["unet_config"].text_dim:
        text = load_export_text_encoder(demo / "diffusion" / "export", meta).encode(
            [synthetic_caption(i, size=size, seed=spec["seed"]) for i in range(n)])
    start = time.perf_counter()
    out = generate(model, meta["unet_config"], meta["diffusion_config"], num=n, frames=known.shape[2] * k,
                   latent_shape=lat["shape"], known=known, interpolate=k, sampler=spec["sampler"], steps=spec["steps"],
                   seed=spec["seed"], batch_size=n, device=device, text=text)
    sync()
    seconds = time.perf_counter() - start
    ours = decode_to_uint8(vae, un_whiten(out, lat["stats"]), device=device)[:, :t]
    idx = np.arange(t)
    filled = idx % k != 0
    lo, hi = (idx // k) * k, np.minimum((idx // k + 1) * k, ((t - 1) // k) * k)
    w = np.where(hi > lo, (idx - lo) / np.maximum(hi - lo, 1), 0.0)[None, :, None, None, None]
    crossfade = ((1 - w) * truth[:, lo] + w * truth[:, hi]).round().astype(np.uint8)
    rows = {"model": ours, "crossfade": crossfade, "repeat": truth[:, lo], "vae_round_trip": round_trip}
    result = {name: _filled_metrics(truth, v, filled) for name, v in rows.items()}
    return {"clips": n, "filled_frames_per_clip": int(filled.sum()), "s_per_clip": seconds / n, **result}
