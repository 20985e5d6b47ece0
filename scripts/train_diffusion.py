"""Stage 2: train the factorized 3D U-Net as a diffusion model jointly on video clips and images.

    python -m scripts.train_diffusion --config configs/diffusion/tiny.yaml --shards shards/ --output-dir runs/diffusion

Each optimizer step sees B whitened video-clip latents [B,C,T,h,w] and round(image_ratio*B)
image latents [B_img,C,1,h,w] (from image shards, else single random frames of video latents)
through the same network; images skip the temporal layers. Resumes from DIR/checkpoints/,
logs DIR/metrics.jsonl, samples every `sample.every` steps, exports EMA weights to DIR/export/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from autoencoder.model import weights_hash
from data.errors import BadInputError
from data.latents import make_training_batches
from data.pairs import LowResLatents, check_pairing
from data.remote import as_location
from data.shards import ShardError, load_manifest
from diffusion.conditioning import (
    augmentation_levels,
    drop_labels,
    drop_text,
    image_frames,
    noise_augment,
    training_frame_masks,
)
from diffusion.config import DiffusionConfig, UNetConfig
from diffusion.process import GaussianDiffusion
from diffusion.text import TextConfig, TextEncoderError, check_same_encoder, load_text_encoder
from diffusion.unet3d import UNet3D, UNetBlock
from scripts.runtime import sharding
from scripts.runtime import training as rt
from scripts.runtime.checkpoint import CheckpointError
from scripts.runtime.cli import parse_training_args, resolve_config, run_logged_main
from scripts.runtime.config import ConfigError, TrainConfig
from scripts.runtime.export import save_diffusion_export
from scripts.runtime.generation import periodic_samples
from scripts.runtime.loop import Periodic, Task, run_training
from scripts.runtime.periodic_eval import EvalConfig, periodic_eval

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
    text_dropout: float = 0.1  # captions replaced by the null text (drawn with the labels' draw)
    frame_cond_prob: float = 0.3  # clips that get some frames given (prediction / extension)
    frame_cond_prefix_prob: float = 0.7  # of those: a prefix (else a random subset) is given
    # of the conditioned clips: every k-th frame given (temporal interpolation), k from the strides
    frame_cond_interp_prob: float = 0.0
    frame_cond_interp_strides: tuple[int, ...] = (2, 4)


@dataclass
class SampleEveryConfig:
    every: int = 0  # 0: no periodic sampling
    num: int = 4
    steps: int = 20
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 1.0
    autoencoder: str = ""  # an exported VAE to decode samples to mp4/PNG (optional)
    prompts: list[str] = field(default_factory=list)  # text models: cycled over the samples


@dataclass
class SuperResConfig:
    """A spatial super-resolution stage of the cascade (README "The cascade")."""

    low_res_shards: str = ""  # the same data encoded at a lower size ('' = a base model)
    aug_max: float = 0.5  # training: augmentation level ~ U over the first aug_max of the schedule
    sample_aug: float = 0.1  # the level sampling uses by default (a fraction of the schedule; exported)


@dataclass
class DiffusionRunConfig:
    """The sections of a stage-2 config file (configs/diffusion/*.yaml); the shards decide
    model.in_channels and model.num_classes (`resolve_model_config`)."""

    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DiffDataConfig = field(default_factory=DiffDataConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleEveryConfig = field(default_factory=SampleEveryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sr: SuperResConfig = field(default_factory=SuperResConfig)


def main(argv=None) -> int:
    args = parse_training_args(argv, __doc__.split("\n")[0], "python -m scripts.train_diffusion", "--shards",
                                "data.shards", "folder written by encode_latents (sets data.shards)")
    errors = (BadInputError, ShardError, CheckpointError, rt.TrainingStopped, ValueError, TextEncoderError)
    return run_logged_main(lambda: train(args), errors)


def resolve_model_config(cfg: DiffusionRunConfig, manifest: dict, text_encoder=None, low_res=None) -> DiffusionRunConfig:
    """Fill in what the shards (and the text encoder, and a super-resolution stage's low-resolution
    latents) decide: latent channels, the number of classes, the text width, the low-res channels."""
    if not cfg.data.shards:
        raise ConfigError("no shards given: pass --shards DIR (a folder written by encode_latents)")
    if cfg.cond.frame_cond_interp_prob and (not cfg.cond.frame_cond_interp_strides
                                            or min(cfg.cond.frame_cond_interp_strides) < 2):
        raise ConfigError(f"cond.frame_cond_interp_strides must be >= 2 (got {cfg.cond.frame_cond_interp_strides})")
    if cfg.eval.every and cfg.eval.num_samples < 2:
        raise ConfigError(f"eval.num_samples is {cfg.eval.num_samples}; the Fréchet distance needs at least 2")
    if cfg.sr.low_res_shards and (cfg.sample.every or cfg.eval.every):
        raise ConfigError("sample.every / eval.every sample a base model; a super-resolution stage (sr.low_res_shards) "
                          "is measured by scripts.cascade's evaluation: set them to 0")
    if not 0 < cfg.sr.aug_max <= 1 or not 0 <= cfg.sr.sample_aug <= 1:
        raise ConfigError(f"sr.aug_max must be in (0, 1] and sr.sample_aug in [0, 1] (fractions of the schedule), "
                          f"got {cfg.sr.aug_max} and {cfg.sr.sample_aug}")
    channels = manifest["latent_shape"][0]
    classes = len(manifest.get("labels") or []) if cfg.data.class_conditional else 0
    width = text_encoder.width if text_encoder is not None else 0
    low = low_res.channels if low_res is not None else 0
    return replace(cfg, model=replace(cfg.model, in_channels=channels, num_classes=classes, text_dim=width,
                                      low_res_channels=low))


def open_low_res(cfg) -> tuple:
    """(LowResLatents, spatial factor) of a super-resolution stage, or (None, 0): the low-resolution
    folder must pair with data.shards (same sources, clips and autoencoder; `data.pairs`)."""
    if not cfg.sr.low_res_shards:
        return None, 0
    factor = check_pairing(cfg.data.shards, cfg.sr.low_res_shards)
    return LowResLatents(cfg.sr.low_res_shards), factor


def open_text_encoder(cfg, manifest: dict, device):
    """The frozen text encoder of a text-conditioned run (text.encoder set), checked against the
    shards: they must hold captions, and caption embeddings stored in them must come from it."""
    if not cfg.text.encoder:
        return None
    text = manifest.get("text") or {}
    if not text.get("captioned_files"):
        raise ShardError(f"{cfg.data.shards}: text.encoder is set but the shards hold no captions "
                         "(caption the data: NAME.txt sidecars, captions.csv or captions.jsonl; then re-encode)")
    enc = load_text_encoder(cfg.text.encoder, cfg.text.max_length, device)
    check_same_encoder(enc.fingerprint(), text.get("text_encoder"), f"{as_location(cfg.data.shards) / 'manifest.json'}: the shards")
    return enc


class CaptionText:
    """Text inputs of a batch: the shards' caption embeddings, or the captions encoded here (cached
    per caption); samples without a caption get the null text (mask all False)."""

    def __init__(self, encoder):
        self.encoder, self.cache, self.warned = encoder, {}, 0

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "text" in batch:
            return batch["text"], batch["text_mask"]
        missing = [c for c in dict.fromkeys(batch["caption"]) if c is not None and c not in self.cache]
        if missing and self.warned < 3:  # past three warnings, new captions are no longer tokenized to check them
            for warning in self.encoder.caption_warnings(missing, "captions", "text.max_length")[:3 - self.warned]:
                self.warned += 1
                print(f"warning: {warning}", flush=True)
        if missing:
            for c, e, m in zip(missing, *self.encoder.encode(missing)):
                self.cache[c] = (e, m)
        length, width = self.encoder.max_length, self.encoder.width
        blank = (torch.zeros(length, width), torch.zeros(length, dtype=torch.bool))
        pairs = [self.cache[c] if c is not None else blank for c in batch["caption"]]
        return torch.stack([e for e, _ in pairs]), torch.stack([m for _, m in pairs])


def make_batches(cfg, rank: int, world_size: int, autoencoder_hash: str | None):
    tc, dc = cfg.train, cfg.data
    return make_training_batches(dc.shards, batch_size=tc.batch_size, image_ratio=dc.image_ratio, seed=tc.seed,
                                 use_mean=dc.use_posterior_mean, rank=rank, world_size=world_size,
                                 shuffle_buffer=dc.shuffle_buffer, num_workers=tc.num_workers, drop_last=True,
                                 expected_autoencoder_hash=autoencoder_hash)


def expected_autoencoder(cfg) -> str | None:
    """The weights hash of `sample.autoencoder`, when set: the shards must have been encoded by it
    (checked at start-up, rather than decoding periodic samples with the wrong VAE)."""
    if not cfg.sample.autoencoder:
        return None
    try:
        return weights_hash(cfg.sample.autoencoder)
    except FileNotFoundError as e:
        raise ConfigError(f"sample.autoencoder: {e}") from None


def train(args) -> None:
    out = Path(args.output_dir)
    cfg = resolve_config(DiffusionRunConfig, args, write=False)
    manifest = load_manifest(cfg.data.shards) if cfg.data.shards else {}
    tc = cfg.train
    acc = rt.make_accelerator(tc, out)
    device = acc.device
    rt.limit_cpu_threads(tc.num_workers, device)
    text_encoder = open_text_encoder(cfg, manifest, "cpu")  # frozen; CPU, it runs once per caption
    low_res, factor = open_low_res(cfg) if cfg.data.shards else (None, 0)
    cfg = resolve_model_config(cfg, manifest, text_encoder, low_res)
    text = CaptionText(text_encoder) if text_encoder is not None else None

    rt.seed_init(tc.seed)  # initial weights depend on the seed only (same on every run and rank)
    model = rt.fast_path(UNet3D(cfg.model).to(device), tc)
    if tc.fsdp:  # each process keeps 1/N of every block's parameters (scripts/runtime/sharding.py)
        sharding.shard(model, UNetBlock)
    diffusion = GaussianDiffusion(cfg.diffusion)
    opt = rt.adamw(model.parameters(), tc, device, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, rt.lr_lambda(tc))
    if tc.fsdp:
        opt = acc.prepare(opt)  # the model is sharded already: accelerate must not wrap it in DDP
    else:
        model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    ema, guard = rt.EMA(raw, tc.ema_decay), rt.NonFiniteGuard(tc.max_nonfinite)
    full_ema: dict = {}  # train.fsdp: the gathered averages, for the main process's jobs

    def averaged():  # a plain UNet3D with the averaged weights (sharded: from the gathered copy)
        return ema.copy_to(UNet3D(cfg.model), full_ema).eval() if tc.fsdp else ema.averaged_model(raw)
    batches = make_batches(cfg, acc.process_index, acc.num_processes, expected_autoencoder(cfg))
    debug = rt.DebugLogs(out, acc.process_index)
    fps = None  # the training clips' frame rate, recorded in the export

    def step(batch, step: int):
        nonlocal fps
        vb, ib = batch
        debug.keys.write({"step": step + 1, "epoch": batches.epoch, "keys": vb["key"]})
        fps = fps or vb["meta"][0].get("fps")
        logs = train_step(acc, model, diffusion, opt, sched, guard, cfg, vb, ib, step, text, low_res)
        if logs is not None and debug.hashes.enabled:
            debug.hashes.write({"step": step + 1, "sha256": rt.param_hash(raw)})
        return logs

    def samples(step: int):  # decoded and scored against the data when sample.autoencoder is set
        s = cfg.sample
        quality = periodic_samples(averaged().to(device), cfg.model, cfg.diffusion, manifest,
                                   cfg.data.shards, out / "samples", step=step, num=s.num, steps=s.steps,
                                   sampler=s.sampler, guidance_scale=s.guidance_scale,
                                   autoencoder=s.autoencoder or None, seed=tc.seed, fps=fps, device=device,
                                   text_encoder=text_encoder, prompts=s.prompts)
        if quality is not None:
            rt.MetricsLog(out / "metrics.jsonl").write(quality)

    def evaluate(step: int):  # eval.every: weight-free metrics against the training clips
        row = periodic_eval(averaged().to(device), cfg.model, cfg.diffusion, manifest, cfg.data.shards,
                            cfg.eval, step=step, seed=tc.seed, autoencoder=cfg.sample.autoencoder or None,
                            device=device, text_encoder=text_encoder)
        rt.MetricsLog(out / "metrics.jsonl").write(row)
        if tc.tensorboard:
            acc.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)

    sr_meta = None
    if low_res is not None:
        sr_meta = {"low_res_shape": list(low_res.shape), "factor": factor, "low_res_stats": low_res.stats_dict(),
                   "low_res_shards": cfg.sr.low_res_shards, "aug_max": cfg.sr.aug_max, "sample_aug": cfg.sr.sample_aug}

    def export():
        save_diffusion_export(out / "export", averaged().cpu(), cfg.model, cfg.diffusion, manifest,
                              cfg.data.shards, fps=fps, text_encoder=text_encoder, super_resolution=sr_meta)

    task = Task(name="diffusion", model=raw, ema=ema, guard=guard, batches=batches, step=step, export=export,
                optimizers={"optimizer": opt}, schedulers={"scheduler": sched},
                configs={"model_config": cfg.model.to_dict(), "diffusion_config": cfg.diffusion.to_dict(),
                         **({"text_encoder": text_encoder.fingerprint()} if text_encoder else {})},
                periodic=[Periodic(cfg.sample.every, samples), Periodic(cfg.eval.every, evaluate)], logs=[debug.hashes, debug.keys],
                gather=(lambda: full_ema.update(ema.full_state_dict(keep=acc.is_main_process))) if tc.fsdp else None)
    run_training(acc, task, cfg, out)


def train_step(acc, model, diffusion, opt, sched, guard, cfg, vb, ib, step, text=None, low_res=None):
    """One micro-batch of B clips + B_img images. The image pass runs first under no_sync, so its
    gradient is summed locally and all-reduced once with the video pass (DDP-safe even though
    images leave the temporal parameters unused). A super-resolution stage (`low_res`) gets each
    sample's low-resolution latents, noise-augmented at a random level. Returns logs on an
    optimizer step."""
    tc, cc, device = cfg.train, cfg.cond, acc.device
    micro = acc.step % tc.grad_accum  # index inside the accumulation window (0 after a resume)
    g = rt.seed_step(tc.seed, step, acc.process_index, "cpu", micro=micro)
    x_vid = vb["latent"].to(device)  # [B,C,T,h,w]
    n_img = 0 if ib is None else ib["latent"].shape[0]
    total = x_vid.shape[0] + n_img
    logs = {"samples": total}
    with acc.accumulate(model):
        if ib is not None:
            # the frames are drawn before the conditions, as in runs from before the SR stage
            if low_res is None:
                x_img, low_img = image_frames(ib["latent"], g), None
            else:
                kind = "image" if ib["latent"].shape[2] == 1 else "video"
                x_img, low_img = image_frames(ib["latent"], g, paired=low_res.batch(ib["key"], kind))
            x_img = x_img.to(device)  # [B_img,C,1,h,w]
            img_kwargs = _conditions(ib, cfg, g, text, device)
            if low_img is not None:
                img_kwargs.update(_augmented(low_img, diffusion, cfg, g, device))
            with acc.no_sync(model), acc.autocast():
                out = diffusion.training_losses(model, x_img, model_kwargs=img_kwargs, generator=g,
                                               self_condition=cfg.model.self_condition)
                loss_img = out["loss"].sum() / total
            acc.backward(_poison(loss_img, step + 1))
            logs["loss_image"] = out["loss"].mean().item()
        kwargs, loss_mask = {}, None  # a model without frame conditioning is given no frames: loss on all
        if cfg.model.frame_conditioning:
            cond_mask, loss_mask = training_frame_masks(x_vid, cc.frame_cond_prob, cc.frame_cond_prefix_prob, g,
                                                        cc.frame_cond_interp_prob, cc.frame_cond_interp_strides)
            kwargs.update(cond_frames=x_vid * cond_mask, cond_mask=cond_mask)
        kwargs.update(_conditions(vb, cfg, g, text, device))
        if low_res is not None:
            kwargs.update(_augmented(low_res.batch(vb["key"], "video"), diffusion, cfg, g, device))
        with acc.autocast():
            out = diffusion.training_losses(model, x_vid, model_kwargs=kwargs, frame_mask=loss_mask, generator=g,
                                           self_condition=cfg.model.self_condition)
            loss_vid = out["loss"].sum() / total
        acc.backward(_poison(loss_vid, step + 1))
        logs["loss_video"] = out["loss"].mean().item()
        if diffusion.config.temporal_loss_weight > 0:  # the plain error, comparable with runs without the term
            logs["mse_video"] = out["mse"].mean().item()
        if not acc.sync_gradients:
            return None
        rt.inject_inf_gradient(model, step + 1)
        (norm,) = rt.grad_norms(acc, [model.parameters()], tc.grad_clip)
        ok = guard.check(norm, step + 1)
        rt.finish_step(acc, ok, opt, sched)
    loss = loss_vid.item() + (loss_img.item() if ib is not None else 0.0)
    return {"loss": loss, "grad_norm": norm, "skipped": int(not ok), **logs}


def _conditions(batch, cfg, g, text, device) -> dict:
    """Class labels and text of a batch with classifier-free-guidance dropout: one uniform draw
    per sample decides both (labels below cond.class_dropout, text below cond.text_dropout). A
    model without text draws exactly as before text existed."""
    cc, nc = cfg.cond, cfg.model.num_classes
    if text is None:
        labels = drop_labels(batch["label"], nc, cc.class_dropout, g)
        return {} if labels is None else {"class_labels": labels.to(device)}
    u = torch.rand(batch["label"].shape, generator=g)
    kwargs = {}
    if nc:
        kwargs["class_labels"] = drop_labels(batch["label"], nc, cc.class_dropout, u=u).to(device)
    tokens, mask = text(batch)
    kwargs["text"], kwargs["text_mask"] = tokens.to(device), drop_text(mask, cc.text_dropout, u).to(device)
    return kwargs


def _augmented(low, diffusion, cfg, g, device) -> dict:
    """A super-resolution batch's model inputs: the low-resolution latents noise-augmented at
    random levels, and the levels."""
    levels = augmentation_levels(low.shape[0], cfg.sr.aug_max, diffusion.num_timesteps, g)
    return {"low_res": noise_augment(low, levels, diffusion.alphas_cumprod, g).to(device), "aug_level": levels.to(device)}


def _poison(loss, step):
    return loss * float("nan") if rt.injected_nonfinite(step) else loss


if __name__ == "__main__":
    raise SystemExit(main())
