"""Periodic evaluation during stage-2 training (`eval.every`): `eval.num_samples` samples from the
EMA model scored against as many training clips with the weight-free metrics of
`evaluation.suite` (latent Fréchet distance; with `sample.autoencoder`, also temporal flicker, the
synthetic tracker's figures and prompt adherence). One `"split": "eval"` row in metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass

from data.stats import load_stats, un_whiten
from evaluation.suite import weight_free
from scripts.runtime.generation import _decoded_reference, decode_to_uint8, generate, reference_clips


@dataclass
class EvalConfig:
    every: int = 0  # 0: no periodic evaluation
    num_samples: int = 16  # samples and training clips compared (the Fréchet distance needs >= 2)
    steps: int = 25
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 1.0


def periodic_eval(model, unet_cfg, diff_cfg, manifest: dict, shards, ec: EvalConfig, *, step: int, seed: int,
                  autoencoder: str | None, device, text_encoder=None) -> dict:
    """Sample like the reference clips (their labels, their captions) and score; returns the row."""
    if ec.num_samples < 2:
        raise ValueError(f"eval.num_samples is {ec.num_samples}; the Fréchet distance needs at least 2")
    ref, labels, captions = reference_clips(str(shards), ec.num_samples)
    n = len(ref)
    text = None
    if text_encoder is not None and unet_cfg.text_dim:
        text = text_encoder.encode([c or "" for c in captions])
    lat = generate(model, unet_cfg, diff_cfg, num=n, frames=ref.shape[2], latent_shape=manifest["latent_shape"],
                   labels=[max(x, 0) for x in labels] if unet_cfg.num_classes else None,
                   guidance_scale=ec.guidance_scale, sampler=ec.sampler, steps=ec.steps, seed=seed, device=device,
                   text=text)
    frames = reference = None
    if autoencoder:
        from autoencoder.model import FrameVAE

        vae = FrameVAE.from_pretrained(autoencoder).to(device)
        frames = decode_to_uint8(vae, un_whiten(lat, load_stats(shards)), device=device)
        reference = _decoded_reference(str(shards), str(autoencoder), n, str(device))
    rows = weight_free(list(frames) if frames is not None else [], list(reference) if reference is not None else [],
                       sample_latents=lat, reference_latents=ref, prompts=list(captions) if text is not None else None,
                       pixels=frames is not None)
    return {"step": step, "split": "eval", "clips": n, "seed": seed, **{r["metric"]: r["value"] for r in rows}}
