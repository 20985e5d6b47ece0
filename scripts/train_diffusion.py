"""Stage 2: train the factorized 3D U-Net as a diffusion model jointly on video clips and images.

    python -m scripts.train_diffusion --config configs/diffusion/tiny.yaml --shards shards/ --output-dir runs/diffusion

Each optimizer step sees B whitened video-clip latents [B,C,T,h,w] and round(image_ratio*B)
image latents [B_img,C,1,h,w] (from image shards, else single random frames of video latents)
through the same network; images skip the temporal layers. Resumes from DIR/checkpoints/,
logs DIR/metrics.jsonl, samples every `sample.every` steps, exports EMA weights to DIR/export/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from autoencoder.model import weights_hash
from data.errors import BadInputError
from data.latents import make_latent_loader
from data.shards import ShardError, load_manifest
from diffusion.conditioning import drop_labels, training_frame_masks
from diffusion.config import DiffusionConfig, UNetConfig
from diffusion.process import GaussianDiffusion
from diffusion.unet3d import UNet3D
from scripts.runtime.checkpoint import CheckpointError, CheckpointManager
from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError, TrainConfig, save_config
from scripts.runtime.export import save_diffusion_export
from scripts.runtime.training import (
    EMA,
    MetricsLog,
    NonFiniteGuard,
    TrainingStopped,
    finish_step,
    grad_norms,
    inject_inf_gradient,
    injected_nonfinite,
    limit_cpu_threads,
    make_accelerator,
    seed_init,
    seed_step,
    warmup_lambda,
)

log = logging.getLogger("train_diffusion")


@dataclass
class DiffDataConfig:
    shards: str = ""  # --shards sets it
    image_ratio: float = 0.5  # images per video clip in a batch; 0 = video only
    class_conditional: bool = True  # take num_classes from the shards' manifest
    use_posterior_mean: bool = False  # False: sample z ~ q(z|x) each time (a little augmentation)
    shuffle_buffer: int = 256


@dataclass
class CondConfig:
    class_dropout: float = 0.1  # labels replaced by the null label, for classifier-free guidance
    frame_cond_prob: float = 0.3  # clips that get some frames given (prediction / extension)
    frame_cond_prefix_prob: float = 0.7  # of those: a prefix (else a random subset) is given


@dataclass
class SampleEveryConfig:
    every: int = 0  # 0: no periodic sampling
    num: int = 4
    steps: int = 20
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 1.0
    autoencoder: str = ""  # an exported VAE to decode samples to mp4/PNG (optional)


@dataclass
class DiffusionRunConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DiffDataConfig = field(default_factory=DiffDataConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleEveryConfig = field(default_factory=SampleEveryConfig)


def parse_args(argv):
    p = build_parser(__doc__.split("\n")[0], prog="python -m scripts.train_diffusion", training=True)
    p.add_argument("--shards", default=None, help="folder written by encode_latents (sets data.shards)")
    args = p.parse_args(argv)
    if args.shards is not None:
        args.overrides.insert(0, f"data.shards={args.shards}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    errors = (BadInputError, ShardError, CheckpointError, TrainingStopped, ValueError)
    return run_main(lambda: train(parse_args(argv)), errors)


def resolve_model_config(cfg: DiffusionRunConfig, manifest: dict) -> DiffusionRunConfig:
    """Fill in what the shards decide: latent channels and the number of classes."""
    if not cfg.data.shards:
        raise ConfigError("no shards given: pass --shards DIR (a folder written by encode_latents)")
    channels = manifest["latent_shape"][0]
    classes = len(manifest.get("labels") or []) if cfg.data.class_conditional else 0
    return replace(cfg, model=replace(cfg.model, in_channels=channels, num_classes=classes))


def make_loaders(cfg, acc, state: dict | None):
    tc, dc = cfg.train, cfg.data
    kinds = {e["kind"] for e in load_manifest(dc.shards)["shards"]}
    common = dict(seed=tc.seed, use_mean=dc.use_posterior_mean, rank=acc.process_index, world_size=acc.num_processes,
                  shuffle_buffer=dc.shuffle_buffer, num_workers=tc.num_workers, drop_last=True,
                  expected_autoencoder_hash=expected_autoencoder(cfg))
    video = make_latent_loader(dc.shards, kind="video", batch_size=tc.batch_size, **common)
    images, n_img = None, int(round(dc.image_ratio * tc.batch_size))
    if n_img > 0:
        kind = "image" if "image" in kinds else "video"
        images = make_latent_loader(dc.shards, kind=kind, batch_size=n_img, **{**common, "seed": tc.seed + 1})
    if state is not None:
        video.load_state_dict(state["video"])
        if images is not None and "images" in state:
            images.load_state_dict(state["images"])
    for loader, what in ((video, "video"), (images, "image")):
        if loader is not None and len(loader) == 0:
            raise ShardError(f"{dc.shards}: not one full {what} batch per process; lower train.batch_size")
    return video, images


def expected_autoencoder(cfg) -> str | None:
    """The weights hash of `sample.autoencoder`, when set: the shards must have been encoded by it
    (checked at start-up, rather than decoding periodic samples with the wrong VAE)."""
    if not cfg.sample.autoencoder:
        return None
    try:
        return weights_hash(cfg.sample.autoencoder)
    except FileNotFoundError as e:
        raise ConfigError(f"sample.autoencoder: {e}") from None


def forever(loader):
    while True:
        yield from loader


def train(args) -> None:  # noqa: C901 - the loop is kept in one place on purpose
    out = Path(args.output_dir)
    cfg = resolve_config(DiffusionRunConfig, args, write=False)
    manifest = load_manifest(cfg.data.shards) if cfg.data.shards else {}
    cfg = resolve_model_config(cfg, manifest)
    tc = cfg.train
    acc = make_accelerator(tc, out)
    device = acc.device
    limit_cpu_threads(tc.num_workers, device)

    seed_init(tc.seed)  # initial weights depend on the seed only (same on every run and rank)
    model = UNet3D(cfg.model)
    diffusion = GaussianDiffusion(cfg.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(tc.warmup_steps))
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    ema = EMA(raw, tc.ema_decay)
    guard = NonFiniteGuard(tc.max_nonfinite)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    ckpt = CheckpointManager(out / "checkpoints", tc.keep_checkpoints, is_main=acc.is_main_process,
                             rank=acc.process_index, barrier=acc.wait_for_everyone)

    step, data_state = 0, None
    latest = ckpt.latest()
    if latest is not None:
        tensors, objects, meta = ckpt.load(latest)
        check_same_model(meta, cfg, latest)
        raw.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"], meta["ema_updates"])
        opt.load_state_dict(objects["optimizer"])
        sched.load_state_dict(objects["scheduler"])
        if acc.scaler is not None and "scaler" in objects:
            acc.scaler.load_state_dict(objects["scaler"])
        guard.load_state_dict(meta["guard"])
        step, data_state = meta["step"], meta["data"]
        acc.print(f"resumed from {latest} at step {step}")
    metrics.truncate_after(step)  # also drops the lines of a run that died before its first checkpoint
    if acc.is_main_process:  # after the resume checks: a refused run leaves the run's config.yaml alone
        save_config(cfg, out / "config.yaml")
    debug_hashes, debug_keys = debug_logs(out, acc.process_index, step)
    video_loader, image_loader = make_loaders(cfg, acc, data_state)
    videos = forever(video_loader)
    images = forever(image_loader) if image_loader is not None else None
    if tc.tensorboard:
        acc.init_trackers("train_diffusion")

    def save_checkpoint():
        objects = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        if acc.scaler is not None:
            objects["scaler"] = acc.scaler.state_dict()
        data = {"video": video_loader.state_dict()}
        if image_loader is not None:
            data["images"] = image_loader.state_dict()
        ckpt.save(step, tensors={"model": raw.state_dict(), "ema": ema.state_dict()}, objects=objects,
                  meta={"data": data, "guard": guard.state_dict(), "ema_updates": ema.num_updates,
                        "model_config": cfg.model.to_dict(), "diffusion_config": cfg.diffusion.to_dict()})

    bar = tqdm(total=tc.max_steps, initial=step, disable=not acc.is_main_process, desc="diffusion")
    t_last, samples_since, logs, fps = time.time(), 0, {}, None
    while step < tc.max_steps:
        vb = next(videos)
        ib = next(images) if images is not None else None
        debug_keys.write({"step": step + 1, "epoch": video_loader.epoch, "keys": vb["key"]})
        fps = fps or vb["meta"][0].get("fps")
        logs = train_step(acc, model, diffusion, opt, sched, guard, cfg, vb, ib, step)
        if logs is None:
            continue
        ema.update(raw)
        step += 1
        if debug_hashes.enabled:
            debug_hashes.write({"step": step, "sha256": param_hash(raw)})
        samples_since += logs.pop("samples") * acc.num_processes
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.time()
            rec = {"step": step, "lr": sched.get_last_lr()[0], **logs, "nonfinite_total": guard.total,
                   "epoch": video_loader.epoch, "samples_per_s": samples_since / max(now - t_last, 1e-9)}
            metrics.write(rec)
            if tc.tensorboard:
                acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            t_last, samples_since = now, 0
        if cfg.sample.every and step % cfg.sample.every == 0 and acc.is_main_process:
            quality = periodic_samples(cfg, ema, raw, manifest, out / "samples", step, device, fps=fps)
            if quality is not None:
                metrics.write(quality)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            save_checkpoint()
    bar.close()
    if acc.is_main_process:
        save_diffusion_export(out / "export", ema.averaged_model(raw).cpu(), cfg.model, cfg.diffusion, manifest,
                              Path(cfg.data.shards), fps=fps)
        acc.print(f"exported EMA weights to {out / 'export'}")
    acc.wait_for_everyone()
    acc.end_training()


def train_step(acc, model, diffusion, opt, sched, guard, cfg, vb, ib, step):
    """One micro-batch of B clips + B_img images. The image pass runs first under no_sync, so its
    gradient is summed locally and all-reduced once with the video pass (DDP-safe even though
    images leave the temporal parameters unused). Returns logs on an optimizer step."""
    tc, cc, device = cfg.train, cfg.cond, acc.device
    micro = acc.step % tc.grad_accum  # index inside the accumulation window (0 after a resume)
    g = seed_step(tc.seed, step, acc.process_index, "cpu", micro=micro)
    x_vid = vb["latent"].to(device)  # [B,C,T,h,w]
    n_img = 0 if ib is None else ib["latent"].shape[0]
    total = x_vid.shape[0] + n_img
    logs = {"samples": total}
    with acc.accumulate(model):
        if ib is not None:
            x_img = ib["latent"]
            if x_img.shape[2] > 1:  # single random frames of video latents
                idx = torch.randint(0, x_img.shape[2], (n_img,), generator=g)
                x_img = x_img[torch.arange(n_img), :, idx][:, :, None]  # [B_img,C,1,h,w]
            x_img = x_img.to(device)
            labels = drop_labels(ib["label"], cfg.model.num_classes, cc.class_dropout, g)
            with acc.no_sync(model), acc.autocast():
                out = diffusion.training_losses(model, x_img, model_kwargs=_kw(labels, device), generator=g)
                loss_img = out["loss"].sum() / total
            acc.backward(_poison(loss_img, step + 1))
            logs["loss_image"] = out["loss"].mean().item()
        kwargs, loss_mask = {}, None  # a model without frame conditioning is given no frames: loss on all
        if cfg.model.frame_conditioning:
            cond_mask, loss_mask = training_frame_masks(x_vid, cc.frame_cond_prob, cc.frame_cond_prefix_prob, g)
            kwargs.update(cond_frames=x_vid * cond_mask, cond_mask=cond_mask)
        labels = drop_labels(vb["label"], cfg.model.num_classes, cc.class_dropout, g)
        kwargs.update(_kw(labels, device))
        with acc.autocast():
            out = diffusion.training_losses(model, x_vid, model_kwargs=kwargs, frame_mask=loss_mask, generator=g)
            loss_vid = out["loss"].sum() / total
        acc.backward(_poison(loss_vid, step + 1))
        logs["loss_video"] = out["loss"].mean().item()
        if not acc.sync_gradients:
            return None
        inject_inf_gradient(model, step + 1)
        (norm,) = grad_norms(acc, [model.parameters()], tc.grad_clip)
        ok = guard.check(norm, step + 1)
        finish_step(acc, ok, opt, sched)
    loss = loss_vid.item() + (loss_img.item() if ib is not None else 0.0)
    return {"loss": loss, "grad_norm": norm, "skipped": int(not ok), **logs}


def debug_logs(out: Path, rank: int, step: int) -> tuple[MetricsLog, MetricsLog]:
    """Debug hooks for the multi-process tests, off unless set in the environment: with
    LVD_DEBUG_PARAM_HASH=1 every rank appends {step, sha256 of its parameters} after each optimizer
    step to DIR/param-hash-rank{R}.jsonl; with LVD_DEBUG_SAMPLE_KEYS=1 the keys of every video
    batch it trains on to DIR/sample-keys-rank{R}.jsonl. Lines after a resumed step are dropped."""
    logs = []
    for env, name in (("LVD_DEBUG_PARAM_HASH", "param-hash"), ("LVD_DEBUG_SAMPLE_KEYS", "sample-keys")):
        log_ = MetricsLog(out / f"{name}-rank{rank}.jsonl", enabled=os.environ.get(env, "") not in ("", "0"))
        log_.truncate_after(step)
        logs.append(log_)
    return logs[0], logs[1]


def param_hash(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _kw(labels, device):
    return {} if labels is None else {"class_labels": labels.to(device)}


def _poison(loss, step):
    return loss * float("nan") if injected_nonfinite(step) else loss


def check_same_model(meta, cfg, path):
    for key, current in (("model_config", cfg.model.to_dict()), ("diffusion_config", cfg.diffusion.to_dict())):
        saved = meta.get(key)
        if saved is not None and saved != current:
            diff = sorted(k for k in saved if saved.get(k) != current.get(k))
            raise CheckpointError(f"{path} was written for a different {key.split('_')[0]} "
                                  f"({', '.join(diff)} differ); use another --output-dir or the same config")


def periodic_samples(cfg, ema, raw, manifest, out_dir, step, device, fps):
    import json

    from scripts.runtime.generation import sample_and_save, sample_quality

    model = ema.averaged_model(raw).to(device)
    stats = json.loads((Path(cfg.data.shards) / "stats.json").read_text())
    _, frames = sample_and_save(model, cfg.model, cfg.diffusion, latent_shape=manifest["latent_shape"],
                    frames=manifest["clip_len"], class_names=list(manifest.get("labels") or []), stats=stats,
                    fps=fps or 8.0, out_dir=out_dir,
                    tag=f"step{step:07d}", num=cfg.sample.num, steps=cfg.sample.steps, sampler=cfg.sample.sampler,
                    guidance_scale=cfg.sample.guidance_scale, autoencoder=cfg.sample.autoencoder or None,
                    seed=cfg.train.seed, autoencoder_sha256=(manifest.get("autoencoder") or {}).get("weights_sha256"))
    if frames is None:
        return None
    # what a person would see: objects whole, in the data's colours, constant, moving like the data
    quality = sample_quality(frames, cfg.data.shards, cfg.sample.autoencoder, device=device)
    return {"step": step, "split": "sample", **quality}


if __name__ == "__main__":
    raise SystemExit(main())
