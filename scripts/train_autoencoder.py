"""Stage 1: train the frame-wise VAE (reconstruction + LPIPS + KL + PatchGAN) with accelerate.

    python -m scripts.train_autoencoder --config configs/autoencoder/tiny.yaml --data DATA --output-dir runs/vae

Resumes from the newest complete checkpoint in DIR/checkpoints/, logs DIR/metrics.jsonl,
validates every `val.every` steps (PSNR, SSIM, LPIPS, flicker; PNG grid and side-by-side mp4)
and exports the EMA weights to DIR/export/ (config.json + model.safetensors).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from autoencoder.config import LossConfig, VAEConfig
from autoencoder.losses import VAELoss
from autoencoder.model import FrameVAE
from data.errors import BadInputError
from scripts.runtime.checkpoint import CheckpointError, CheckpointManager
from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError, TrainConfig, save_config
from scripts.runtime.training import (
    EMA,
    EpochBatchSampler,
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
from scripts.runtime.vae_validation import validate_autoencoder

log = logging.getLogger("train_autoencoder")


@dataclass
class AEDataConfig:
    source: str = "synthetic"  # a folder, or "synthetic"; --data overrides it
    size: int = 64  # frames are resized (short side) and centre/random-cropped to size x size
    val_fraction: float = 0.1
    frames_per_video: int = 8  # random frames a video contributes per epoch
    synthetic_videos: int = 64
    synthetic_frames: int = 16
    val_clip_len: int = 8
    val_clips: int = 4


@dataclass
class AEValConfig:
    every: int = 500  # 0 disables periodic validation (it still runs at the end)
    num_images: int = 16


@dataclass
class AutoencoderRunConfig:
    model: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: AEValConfig = field(default_factory=AEValConfig)


def build_datasets(cfg: AutoencoderRunConfig):
    from data.frames import ClipDataset, FrameDataset

    common = dict(
        size=cfg.data.size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.train.seed,
        synthetic_videos=cfg.data.synthetic_videos,
        synthetic_frames=cfg.data.synthetic_frames,
    )
    train = FrameDataset(cfg.data.source, split="train", frames_per_video=cfg.data.frames_per_video, **common)
    try:
        val_images = FrameDataset(cfg.data.source, split="val", frames_per_video=1, **common)
    except BadInputError as e:  # a handful of files: the hash split may put none in validation
        log.warning("no validation: %s; raise data.val_fraction or add files", e)
        return train, [], []
    if not any(it.kind == "video" for it in val_images.items):
        log.warning("no videos in the validation split: temporal flicker is not measured")
        return train, val_images, []
    val_clips = ClipDataset(cfg.data.source, split="val", clip_len=cfg.data.val_clip_len, stride=1, **common)
    return train, val_images, val_clips


def parse_args(argv):
    p = build_parser(__doc__.split("\n")[0], prog="python -m scripts.train_autoencoder", training=True)
    p.add_argument("--data", default=None, help="folder of videos/images, or 'synthetic' (sets data.source)")
    args = p.parse_args(argv)
    if args.data is not None:
        args.overrides.insert(0, f"data.source={args.data}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_main(lambda: train(parse_args(argv)), (BadInputError, CheckpointError, TrainingStopped, ValueError))


def train(args) -> None:  # noqa: C901 - the loop is kept in one place on purpose
    out = Path(args.output_dir)
    cfg = resolve_config(AutoencoderRunConfig, args, write=False)
    tc = cfg.train
    if tc.mixed_precision == "fp16":
        # one GradScaler for two optimizers: accelerate updates it after each optimizer's step, so the
        # discriminator's gradients would be unscaled twice. bf16 needs no scaler.
        raise ConfigError("train.mixed_precision=fp16 is not supported for the VAE + discriminator; use bf16 or no")
    acc = make_accelerator(tc, out)
    device = acc.device
    limit_cpu_threads(tc.num_workers, device)

    train_set, val_images, val_clips = build_datasets(cfg)
    seed_init(tc.seed)  # initial weights and the (uncheckpointed) LPIPS backbone depend on the seed only
    model = FrameVAE(cfg.model)
    criterion = VAELoss(cfg.loss).to(device)
    disc = criterion.discriminator
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.5, 0.9), weight_decay=tc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=tc.lr * cfg.loss.disc_lr_mult, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(tc.warmup_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup_lambda(tc.warmup_steps))
    model, disc, opt, opt_d = acc.prepare(model, disc, opt, opt_d)
    raw_model, raw_disc = acc.unwrap_model(model), acc.unwrap_model(disc)
    ema = EMA(raw_model, tc.ema_decay)
    guard = NonFiniteGuard(tc.max_nonfinite)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    ckpt = CheckpointManager(out / "checkpoints", tc.keep_checkpoints, is_main=acc.is_main_process,
                             rank=acc.process_index, barrier=acc.wait_for_everyone)

    step, epoch, batch_in_epoch = 0, 0, 0
    latest = ckpt.latest()
    if latest is not None:
        tensors, objects, meta = ckpt.load(latest)
        _check_same_model(meta, cfg, latest)
        raw_model.load_state_dict(tensors["model"])
        raw_disc.load_state_dict(tensors["discriminator"])
        ema.load_state_dict(tensors["ema"], meta["ema_updates"])
        opt.load_state_dict(objects["optimizer"])
        opt_d.load_state_dict(objects["optimizer_disc"])
        sched.load_state_dict(objects["scheduler"])
        sched_d.load_state_dict(objects["scheduler_disc"])
        if acc.scaler is not None and "scaler" in objects:
            acc.scaler.load_state_dict(objects["scaler"])
        guard.load_state_dict(meta["guard"])
        if "disc_start" in meta:
            criterion.disc_start.load_state_dict(meta["disc_start"])
        step, epoch, batch_in_epoch = meta["step"], meta["data"]["epoch"], meta["data"]["batch"]
        acc.print(f"resumed from {latest} at step {step}")
    metrics.truncate_after(step)  # also drops the lines of a run that died before its first checkpoint
    if acc.is_main_process:  # after the resume checks: a refused run leaves the run's config.yaml alone
        save_config(cfg, out / "config.yaml")
    if tc.tensorboard:
        acc.init_trackers("train_autoencoder")

    def save_checkpoint():
        objects = {"optimizer": opt.state_dict(), "optimizer_disc": opt_d.state_dict(),
                   "scheduler": sched.state_dict(), "scheduler_disc": sched_d.state_dict()}
        if acc.scaler is not None:
            objects["scaler"] = acc.scaler.state_dict()
        ckpt.save(step, tensors={"model": raw_model.state_dict(), "discriminator": raw_disc.state_dict(),
                                 "ema": ema.state_dict()},
                  objects=objects,
                  meta={"data": {"epoch": epoch, "batch": batch_in_epoch}, "guard": guard.state_dict(),
                        "disc_start": criterion.disc_start.state_dict(),
                        "ema_updates": ema.num_updates, "model_config": cfg.model.to_dict()})

    bar = tqdm(total=tc.max_steps, initial=step, disable=not acc.is_main_process, desc="vae")
    t_last, samples_since = time.time(), 0
    while step < tc.max_steps:
        train_set.set_epoch(epoch)
        sampler = EpochBatchSampler(len(train_set), tc.batch_size, seed=tc.seed, epoch=epoch,
                                    rank=acc.process_index, world_size=acc.num_processes, skip=batch_in_epoch)
        if len(sampler) == 0 and batch_in_epoch == 0:
            raise ValueError(f"the training set has {len(train_set)} frames: fewer than one batch of "
                             f"{tc.batch_size} per process; lower train.batch_size or add data")
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=tc.num_workers,
                                             worker_init_fn=_seed_worker(), pin_memory=False)
        for batch in loader:
            x = batch["image"].to(device)
            batch_in_epoch += 1
            logs = train_step(acc, model, disc, raw_model, criterion, opt, opt_d, sched, sched_d, guard, x, step, tc)
            if logs is None:  # gradient accumulation micro-step
                continue
            ema.update(raw_model)
            if criterion.disc_start.started_at is None:  # the same decision on every process
                rec = acc.reduce(torch.tensor(logs["rec"], device=device), "mean").item()
                criterion.disc_start.update(step, rec)
                if criterion.disc_start.started_at is not None:
                    acc.print(f"adversarial term on from step {criterion.disc_start.started_at}")
            step += 1
            samples_since += x.shape[0] * acc.num_processes
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.time()
                rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], **logs,
                       "nonfinite_total": guard.total, "samples_per_s": samples_since / max(now - t_last, 1e-9)}
                metrics.write(rec)
                if tc.tensorboard:
                    acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                t_last, samples_since = now, 0
            if cfg.val.every and step % cfg.val.every == 0 and step < tc.max_steps and acc.is_main_process:
                _validate(cfg, ema, raw_model, criterion, val_images, val_clips, out, step, metrics, device)
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                save_checkpoint()
            if step >= tc.max_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if acc.is_main_process:
        _validate(cfg, ema, raw_model, criterion, val_images, val_clips, out, step, metrics, device)
        export = ema.averaged_model(raw_model).cpu()
        export.save_pretrained(out / "export")
        acc.print(f"exported EMA weights to {out / 'export'}")
    acc.wait_for_everyone()
    acc.end_training()


def train_step(acc, model, disc, raw_model, criterion, opt, opt_d, sched, sched_d, guard, x, step, tc):
    """One micro-batch: VAE (generator) loss and discriminator loss, both backpropagated on every
    micro-batch; on the accumulation boundary both optimizers step, unless the (all-reduced)
    gradient norm is non-finite. Returns the logs on an optimizer step, None otherwise."""
    micro = acc.step % tc.grad_accum  # index inside the accumulation window (0 after a resume)
    g = seed_step(tc.seed, step, acc.process_index, x.device, micro=micro)
    with acc.accumulate(model, disc):
        with acc.autocast():
            recon, posterior = model(x, sample_posterior=True, generator=g)
            # the discriminator is called with detached parameters here, so this loss gives it no gradient
            loss, logs = criterion.generator_loss(x, recon, posterior, step, raw_model.last_layer_weight())
        if injected_nonfinite(step + 1):
            loss = loss * float("nan")
        acc.backward(loss)
        with acc.autocast():
            loss_d, logs_d = criterion.discriminator_loss(x, recon.detach(), step, disc=disc)
        acc.backward(loss_d)
        if not acc.sync_gradients:
            return None
        inject_inf_gradient(model, step + 1)
        norm, norm_d = grad_norms(acc, [model.parameters(), disc.parameters()], tc.grad_clip)
        ok = guard.check(norm if math.isfinite(norm_d) else norm_d, step + 1)
        finish_step(acc, ok, opt, sched)
        finish_step(acc, ok, opt_d, sched_d)
    return {"loss": loss.item(), "grad_norm": norm, **logs, **logs_d, "skipped": int(not ok)}


def _validate(cfg, ema, raw_model, criterion, val_images, val_clips, out, step, metrics, device):
    model = ema.averaged_model(raw_model).to(device)
    result = validate_autoencoder(model, criterion.lpips, val_images, val_clips, out / "validation",
                                  step=step, num_images=cfg.val.num_images, max_clips=cfg.data.val_clips)
    metrics.write({"step": step, "split": "val", **result})
    log.info("validation at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))


def _check_same_model(meta, cfg, path):
    saved = meta.get("model_config")
    if saved is not None and saved != cfg.model.to_dict():
        diff = sorted(k for k in saved if saved.get(k) != cfg.model.to_dict().get(k))
        raise CheckpointError(
            f"{path} was written for a different model (model.{', model.'.join(diff)} differ); "
            "use another --output-dir or the same model config"
        )


def _seed_worker():
    from data.frames import seed_worker

    return seed_worker


if __name__ == "__main__":
    raise SystemExit(main())
