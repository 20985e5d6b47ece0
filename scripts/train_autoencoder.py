"""Stage 1: train the frame-wise VAE (reconstruction + LPIPS + KL + PatchGAN) with accelerate.

    python -m scripts.train_autoencoder --config configs/autoencoder/tiny.yaml --data DATA --output-dir runs/vae

Resumes from the newest complete checkpoint in DIR/checkpoints/, logs DIR/metrics.jsonl,
validates every `val.every` steps (PSNR, SSIM, LPIPS, flicker; PNG grid and side-by-side mp4)
and exports the EMA weights to DIR/export/ (config.json + model.safetensors).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoencoder.config import LossConfig, VAEConfig
from autoencoder.losses import VAELoss
from autoencoder.model import FrameVAE
from data.errors import BadInputError
from data.frames import FrameBatches
from scripts.runtime.checkpoint import CheckpointError
from scripts.runtime.cli import parse_training_args, resolve_config, run_logged_main
from scripts.runtime.config import ConfigError, TrainConfig
from scripts.runtime.loop import Periodic, Task, run_training
from scripts.runtime.training import (
    EMA,
    MetricsLog,
    NonFiniteGuard,
    TrainingStopped,
    adamw,
    fast_path,
    finish_step,
    grad_norms,
    inject_inf_gradient,
    injected_nonfinite,
    limit_cpu_threads,
    lr_lambda,
    make_accelerator,
    seed_init,
    seed_step,
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
    """The sections of a stage-1 config file (configs/autoencoder/*.yaml)."""

    model: VAEConfig = field(default_factory=VAEConfig)  # architecture (autoencoder/config.py)
    loss: LossConfig = field(default_factory=LossConfig)  # the four terms and the GAN's start
    data: AEDataConfig = field(default_factory=AEDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # shared by both trainers
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


def main(argv=None) -> int:
    args = parse_training_args(argv, __doc__.split("\n")[0], "python -m scripts.train_autoencoder", "--data",
                                "data.source", "folder of videos/images, or 'synthetic' (sets data.source)")
    return run_logged_main(lambda: train(args), (BadInputError, CheckpointError, TrainingStopped, ValueError))


def train(args) -> None:
    out = Path(args.output_dir)
    cfg = resolve_config(AutoencoderRunConfig, args, write=False)
    tc = cfg.train
    if tc.fsdp:  # README "Known limits": the VAE is small; FSDP is built for the U-Net
        raise ConfigError("train.fsdp shards stage 2 (train_diffusion) only; stage 1 trains with DDP")
    if tc.mixed_precision == "fp16":
        # one GradScaler for two optimizers: accelerate updates it after each optimizer's step, so the
        # discriminator's gradients would be unscaled twice. bf16 needs no scaler.
        raise ConfigError("train.mixed_precision=fp16 is not supported for the VAE + discriminator; use bf16 or no")
    acc = make_accelerator(tc, out)
    device = acc.device
    limit_cpu_threads(tc.num_workers, device)

    train_set, val_images, val_clips = build_datasets(cfg)
    seed_init(tc.seed)  # initial weights and the (uncheckpointed) LPIPS backbone depend on the seed only
    model = fast_path(FrameVAE(cfg.model).to(device), tc)
    criterion = VAELoss(cfg.loss).to(device)
    disc = criterion.discriminator
    opt = adamw(model.parameters(), tc, device, betas=(0.5, 0.9), weight_decay=tc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=tc.lr * cfg.loss.disc_lr_mult, betas=(0.5, 0.9),
                              fused=opt.defaults.get("fused"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(tc))
    model, disc, opt, opt_d = acc.prepare(model, disc, opt, opt_d)
    raw_model, raw_disc = acc.unwrap_model(model), acc.unwrap_model(disc)
    ema, guard = EMA(raw_model, tc.ema_decay), NonFiniteGuard(tc.max_nonfinite)

    def step(batch, step: int):
        x = batch["image"].to(device)
        logs = train_step(acc, model, disc, raw_model, criterion, opt, opt_d, sched, sched_d, guard, x, step, tc)
        if logs is not None and criterion.disc_start.started_at is None:  # the same decision on every process
            rec = acc.reduce(torch.tensor(logs["rec"], device=device), "mean").item()
            criterion.disc_start.update(step, rec)
            if criterion.disc_start.started_at is not None:
                acc.print(f"adversarial term on from step {criterion.disc_start.started_at}")
        return logs if logs is None else {**logs, "samples": x.shape[0]}

    def validate(step: int):
        result = validate_autoencoder(ema.averaged_model(raw_model).to(device), criterion.lpips, val_images,
                                      val_clips, out / "validation", step=step, num_images=cfg.val.num_images,
                                      max_clips=cfg.data.val_clips)
        MetricsLog(out / "metrics.jsonl").write({"step": step, "split": "val", **result})
        log.info("validation at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))

    task = Task(
        name="autoencoder", model=raw_model, ema=ema, guard=guard, step=step,
        batches=FrameBatches(train_set, tc.batch_size, seed=tc.seed, rank=acc.process_index,
                             world_size=acc.num_processes, num_workers=tc.num_workers),
        export=lambda: ema.averaged_model(raw_model).cpu().save_pretrained(out / "export"),
        modules={"discriminator": raw_disc}, optimizers={"optimizer": opt, "optimizer_disc": opt_d},
        schedulers={"scheduler": sched, "scheduler_disc": sched_d}, state={"disc_start": criterion.disc_start},
        configs={"model_config": cfg.model.to_dict()}, periodic=[Periodic(cfg.val.every, validate, at_end=True)],
    )  # fmt: skip
    run_training(acc, task, cfg, out)


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


if __name__ == "__main__":
    raise SystemExit(main())
