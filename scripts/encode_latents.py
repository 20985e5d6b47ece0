"""Encode videos (clips) and images into WebDataset shards of VAE latents, resumably (docs/design.md).

Inputs are sorted and cut into fixed "work units" before anything is decoded, so shard N always
holds the same inputs: `video-N.tar` holds the clips of `encode.videos_per_shard` videos and
`image-N.tar` up to `encode.samples_per_shard` images. A rerun skips units whose shard and sidecar
(`*.meta.json`: sample keys, failures, partial stats) are complete, and rebuilds manifest.json,
stats.json and failures.jsonl from the sidecars. Decoding, planning and crash recovery live in
data/encoding.py: an input whose decoder raises becomes a failure record, and one that kills its
worker process (segfault) is retried alone in a fresh worker and recorded as a failure if it
crashes again. With --num-workers 0 decoding runs in this process and a hard crash ends the run (a rerun
resumes, but would crash on the same file): use workers for untrusted data. Under `accelerate
launch` each process encodes units rank::world_size; the main process then merges the sidecars.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from autoencoder.model import FrameVAE, weights_hash
from autoencoder.video import encode_video
from data.captions import load_captions
from data.discovery import discover
from data.encoding import (
    Decoded,
    DecodeSession,
    Failure,
    InputSpec,
    Unit,
    plan_units,
    synthetic_specs,
)
from data.errors import BadInputError
from data.shards import ShardError, ShardWriter, finalize, sample_key, sample_members, sidecar_name
from data.stats import RunningStats
from data.transforms import to_tensor
from diffusion.text import TextEncoderError, load_text_encoder
from scripts.runtime.cli import build_parser, resolve_config, run_main
from scripts.runtime.config import ConfigError, config_to_dict
from scripts.runtime.training import limit_cpu_threads


@dataclass
class EncodeConfig:
    """How inputs become latent samples and shards."""

    clip_len: int = 16
    stride: int = 1  # keep every stride-th frame (used when target_fps is 0)
    target_fps: float = 0.0  # > 0: per file, stride = round(file fps / target_fps)
    clips_per_video: str = "all"  # "all" (or 0): consecutive non-overlapping clips; N: N clips spread evenly
    size: int = 64  # short side resized to this, then a centre crop size x size
    chunk_size: int = 16  # frames per VAE call inside encode_video (memory is flat in T)
    batch_size: int = 8  # clips per encode_video call
    samples_per_shard: int = 256  # images per image shard; sets videos per shard when that is 0
    videos_per_shard: int = 0  # 0: samples_per_shard // clips_per_video (// 8 for "all")
    num_workers: int = 2  # decoding processes (--num-workers overrides)
    images: bool = True  # encode the images found in DATA as image shards (T = 1)
    # a text encoder (hub id or folder, diffusion/text.py): store each caption's token embeddings in
    # the shards; "": captions as text only (the trainer encodes them with its own encoder)
    text_encoder: str = ""
    text_max_length: int = 32

    def __post_init__(self):
        if self.clips_per_video != "all" and not (self.clips_per_video.isdigit()):
            raise ConfigError(f"encode.clips_per_video must be 'all' or a number >= 0, got {self.clips_per_video!r}")
        for name in ("clip_len", "stride", "size", "chunk_size", "batch_size", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"encode.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_clips(self) -> int | None:
        """None: all clips of a video; N: N clips spread evenly (clip_starts mode 'uniform')."""
        n = 0 if self.clips_per_video == "all" else int(self.clips_per_video)
        return n or None

    def inputs_per_video_shard(self) -> int:
        if self.videos_per_shard > 0:
            return self.videos_per_shard
        # "all": assume ~8 clips per video; set encode.videos_per_shard when that is far off
        return max(1, self.samples_per_shard // (self.max_clips or 8))


@dataclass
class SyntheticConfig:
    """The built-in dataset used when DATA is the word `synthetic`."""

    num_videos: int = 64
    num_frames: int = 16
    size: int = 64
    fps: float = 8.0
    seed: int = 0


@dataclass
class EncodeRunConfig:
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ----------------------------------------------------------------------------- encoding


class UnitEncoder:
    """Collects one unit's decoded clips, encodes them in fixed batches and writes its shard."""

    def __init__(self, vae: FrameVAE, cfg: EncodeConfig, device: torch.device, text_encoder=None):
        self.vae, self.cfg, self.device, self.text_encoder = vae, cfg, device, text_encoder
        self.channels = vae.config.latent_channels
        self._text = {}  # captions -> (embeddings, mask): the clips of one file share them

    def text(self, captions: tuple[str, ...]):
        if self.text_encoder is None or not captions:
            return None
        if captions not in self._text:
            emb, mask = self.text_encoder.encode(list(captions))
            self._text = {captions: (emb.half().numpy(), mask.numpy())}
        return self._text[captions]

    def start(self, unit: Unit) -> None:
        self.unit, self.pending, self.samples, self.failures = unit, [], [], []
        self.stats, self.frames, self.counts = RunningStats(self.channels), 0, {"video": 0, "image": 0}
        self.latent_shape = None

    def add(self, spec: InputSpec, result: Decoded | Failure) -> None:
        if isinstance(result, Failure):
            self.failures.append(result.to_dict())
            return
        self.counts[spec.kind] += 1
        for start, clip in result.clips:
            self.pending.append((spec, result, start, clip))
            if len(self.pending) >= self.cfg.batch_size:
                self._encode_pending()

    @torch.no_grad()
    def _encode_pending(self) -> None:
        if not self.pending:
            return
        video = torch.stack([to_tensor(clip.numpy()) for *_, clip in self.pending]).to(self.device)
        mean, logvar = encode_video(self.vae, video, chunk_size=self.cfg.chunk_size)  # [B, C, T, h, w]
        mean, logvar = mean.float().cpu().half().numpy(), logvar.float().cpu().half().numpy()
        for (spec, result, start, _), m, lv in zip(self.pending, mean, logvar):
            if not (torch.isfinite(torch.from_numpy(m)).all() and torch.isfinite(torch.from_numpy(lv)).all()):
                raise RuntimeError(f"{spec.relpath}: the autoencoder produced non-finite latents")
            self.stats.update(m)  # statistics of the stored float16 posterior means
            self.frames += m.shape[1]
            self.latent_shape = list(m.shape)
            self.samples.append(sample_members(sample_key(spec.relpath, start), m, lv, _meta(spec, result, start, m),
                                               self.text(spec.captions)))
        self.pending = []

    def finish(self, writer: ShardWriter, fingerprint: str) -> dict:
        self._encode_pending()
        record = dict(
            fingerprint=fingerprint, inputs=[s.relpath for s in self.unit.specs], videos=self.counts["video"],
            images=self.counts["image"], frames=self.frames, failures=self.failures,
            stats=self.stats.to_dict(), latent_shape=self.latent_shape,
        )  # fmt: skip
        return writer.write_shard(self.unit.kind, self.unit.index, self.samples, record)


def _meta(spec: InputSpec, result: Decoded, start: int, mean) -> dict:
    stride, fps = result.stride, result.fps
    return {
        "source": spec.relpath, "kind": spec.kind, "start": start, "stride": stride,
        "fps": None if fps is None else fps / stride, "source_fps": fps, "clip_len": int(mean.shape[1]),
        "orig_size": result.orig_size, "label": spec.label, "label_name": spec.label_name,
        "latent_shape": list(mean.shape), **({"captions": list(spec.captions)} if spec.captions else {}),
    }  # fmt: skip


def encode_units(todo: list[Unit], vae, cfg: EncodeConfig, writer: ShardWriter, device, session: DecodeSession,
                 text_encoder=None):
    """Decode every input of the `todo` units (in order) and write one shard per unit."""
    enc = UnitEncoder(vae, cfg, device, text_encoder)
    order = [(u, spec) for u in todo for spec in u.specs]
    results = session.results([s for _, s in order])
    current, left = None, 0
    try:
        for (unit, spec), result in zip(order, results):
            if unit is not current:
                current, left = unit, len(unit.specs)
                enc.start(unit)
            enc.add(spec, result)
            left -= 1
            if left == 0:
                side = enc.finish(writer, unit.fingerprint)
                print(f"{side['name'] or sidecar_name(unit.kind, unit.index)}: {side['samples']} samples, "
                      f"{len(side['failures'])} failures", flush=True)  # fmt: skip
    finally:
        results.close()  # shuts the DataLoader workers down


def encode_with_retries(mine: list[Unit], vae, run_cfg, writer: ShardWriter, device, text_encoder=None) -> None:
    """encode_units until done; a dead worker makes its suspect input be decoded alone, then the
    unfinished units restart (finished shards are kept)."""
    session = DecodeSession(run_cfg.encode, run_cfg.synthetic, run_cfg.encode.num_workers)
    while True:
        todo = [u for u in mine if writer.completed(u.kind, u.index, u.fingerprint) is None]
        try:
            return encode_units(todo, vae, run_cfg.encode, writer, device, session, text_encoder)
        except RuntimeError:  # raised by DataLoader's SIGCHLD handler wherever the main process was
            if session.dead_worker is None or session.next is None:  # not a decoding crash
                raise
            print(f"a decoding worker process died (exit code {session.dead_worker}); "
                  f"retrying {session.recover().relpath} alone", flush=True)


# ----------------------------------------------------------------------------- entry point


def parse_args(argv):
    p = build_parser(__doc__.splitlines()[0], prog="python -m scripts.encode_latents")
    p.add_argument("--autoencoder", type=Path, required=True, help="FrameVAE export folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="folder of videos/images, or 'synthetic'")
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes (overrides encode.num_workers)")
    args = p.parse_args(argv)
    if args.num_workers is not None:
        args.overrides.append(f"encode.num_workers={args.num_workers}")
    return args


def load_autoencoder(folder: Path, device) -> tuple[FrameVAE, dict]:
    if not folder.is_dir():
        raise ConfigError(f"--autoencoder {folder}: folder not found (expected a FrameVAE export: config.json + model.safetensors)")
    try:
        vae = FrameVAE.from_pretrained(folder, map_location=device)
        info = {"config": vae.config.to_dict(), "weights_sha256": weights_hash(folder),
                "path": str(folder.resolve())}
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--autoencoder {folder}: {e}") from None
    return vae, info


def encoding_settings(run: EncodeRunConfig, data: str) -> dict:
    settings = config_to_dict(run.encode)
    settings.pop("num_workers")  # does not change a single output byte
    settings["videos_per_shard"] = run.encode.inputs_per_video_shard()
    settings["data"] = data
    if not run.encode.text_encoder:  # as before the keys existed: shards made then stay complete
        settings.pop("text_encoder"), settings.pop("text_max_length")
    if data == "synthetic":
        settings["synthetic"] = config_to_dict(run.synthetic)
    return settings


def run(args) -> dict:
    t0 = time.perf_counter()
    run_cfg = resolve_config(EncodeRunConfig, args)
    cfg, out = run_cfg.encode, Path(args.output_dir)
    acc = Accelerator()
    limit_cpu_threads(cfg.num_workers, acc.device)
    vae, ae_info = load_autoencoder(args.autoencoder, acc.device)
    caption_problems = []
    if args.data == "synthetic":
        sc = run_cfg.synthetic
        specs, class_names = synthetic_specs(sc.num_videos, sc.size, sc.seed)
    else:
        items, class_names = discover(args.data)
        items = [it for it in items if cfg.images or it.kind == "video"]
        found = load_captions(args.data, [it.relpath for it in items])
        caption_problems = found.problems
        specs = [InputSpec(it.kind, it.relpath, str(it.path), it.label, it.label_name, captions=found.of(it.relpath))
                 for it in items]  # fmt: skip
    text_encoder = load_text_encoder(cfg.text_encoder, cfg.text_max_length, acc.device) if cfg.text_encoder else None
    settings = encoding_settings(run_cfg, args.data)
    truncated = 0
    if text_encoder is not None:
        settings["text_encoder"] = text_encoder.fingerprint()
        all_captions = [c for s in specs for c in (s.captions or ())]
        cut = text_encoder.truncated(all_captions)  # tokenizes every distinct caption once
        truncated = len(cut)
        for warning in text_encoder.caption_warnings(all_captions, "captions", "encode.text_max_length", cut=cut):
            if acc.is_main_process:
                print(f"warning: {warning}", flush=True)
    units = plan_units(specs, cfg.inputs_per_video_shard(), cfg.samples_per_shard,
                       {**settings, "autoencoder": ae_info["weights_sha256"]})
    writer = ShardWriter(out)
    fresh = [writer.completed(u.kind, u.index, u.fingerprint, check_hash=False) is None for u in units]
    mine = units[acc.process_index :: acc.num_processes]
    if acc.is_main_process:
        print(f"{len(specs)} inputs in {len(units)} shards; {len(units) - sum(fresh)} complete already", flush=True)
    encode_with_retries(mine, vae, run_cfg, writer, acc.device, text_encoder)
    acc.wait_for_everyone()
    summary = {}
    if acc.is_main_process:
        sides = [writer.completed(u.kind, u.index, u.fingerprint, check_hash=False) for u in units]
        missing = [sidecar_name(u.kind, u.index) for u, side in zip(units, sides) if side is None]
        if missing:
            raise ShardError(f"{out}: units not finished: {', '.join(missing[:5])} (did a process fail?)")
        captioned = sum(1 for s in specs if s.captions)
        text = {"captioned_files": captioned, "caption_problems": len(caption_problems),
                "text_encoder": text_encoder.fingerprint() if text_encoder else None,
                **({"truncated_captions": truncated} if text_encoder else {})}
        manifest = finalize(out, sides, clip_len=cfg.clip_len, autoencoder=ae_info, encoding=settings,
                            labels=class_names, caption_problems=caption_problems,
                            text=text if captioned or caption_problems else None)  # fmt: skip
        summary = dict(manifest["totals"], seconds=time.perf_counter() - t0, caption_problems=len(caption_problems))
        ran = [(u, side) for u, side, new in zip(units, sides, fresh) if new]
        summary["run_clips"] = sum(side["samples"] for u, side in ran if u.kind == "video")
        summary["run_frames"] = sum(side["frames"] for _, side in ran)
        print_summary(summary, out)
        if not manifest["totals"]["samples"]:
            raise ShardError(f"{out}: nothing could be encoded; reasons in {out / 'failures.jsonl'}")
    acc.wait_for_everyone()
    return summary


def print_summary(s: dict, out: Path) -> None:
    secs = max(s["seconds"], 1e-9)
    print(
        f"{out}: {s['video_samples']} clips from {s['videos']} videos, {s['images']} images, {s['failures']} "
        f"failures ({s['samples']} samples, {s['frames']} frames). This run: {s['run_clips']} clips in {secs:.1f} s, "
        f"{s['run_clips'] / secs:.2f} clips/s, {s['run_frames'] / secs:.1f} frames/s",
        flush=True,
    )
    if s["failures"]:
        print(f"skipped inputs and reasons: {out / 'failures.jsonl'}", flush=True)
    if s.get("caption_problems"):
        print(f"{s['caption_problems']} caption problems (files without a caption, captions naming no file; "
              f"stage 'caption' in {out / 'failures.jsonl'})", flush=True)


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), (BadInputError, ShardError, TextEncoderError))


if __name__ == "__main__":
    sys.exit(main())
