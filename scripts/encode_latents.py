"""Encode videos (clips) and images into WebDataset shards of VAE latents, resumably (docs/design.md).

Inputs are sorted and cut into fixed "work units" before anything is decoded, so shard N always
holds the same inputs: `video-N.tar` holds the clips of `encode.videos_per_shard` videos and
`image-N.tar` up to `encode.samples_per_shard` images. A rerun skips units whose shard and sidecar
(`*.meta.json`: sample keys, failures, partial stats) are complete, and rebuilds manifest.json,
stats.json and failures.jsonl from the sidecars. Decoding runs in a DataLoader (one item = one
file); an input whose decoder raises becomes a failure record, and one that kills its worker
process (segfault) is retried alone in a fresh worker and recorded as a failure if it crashes
again. With --num-workers 0 decoding runs in this process and a hard crash ends the run (a rerun
resumes, but would crash on the same file): use workers for untrusted data. Under `accelerate
launch` each process encodes units rank::world_size; the main process then merges the sidecars.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from autoencoder.model import FrameVAE, weights_hash
from autoencoder.video import encode_video
from data.clips import clip_starts, stride_for_fps
from data.discovery import discover
from data.errors import BadInputError
from data.shards import ShardError, ShardWriter, finalize, sample_key, sample_members, sidecar_name
from data.stats import RunningStats
from data.synthetic import SYNTHETIC_CLASSES, make_synthetic_video
from data.transforms import resize_and_crop, to_tensor
from data.video_io import read_image, read_video
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


# ----------------------------------------------------------------------------- decoding (DataLoader workers)


@dataclass(frozen=True)
class InputSpec:
    """One input file (or synthetic video number `index` when path is None)."""

    kind: str
    relpath: str
    path: str | None
    label: int = -1
    label_name: str | None = None
    index: int = -1


def synthetic_specs(sc: SyntheticConfig) -> tuple[list[InputSpec], list[str]]:
    """The synthetic set named like make_synthetic's folders; label = index % classes (checked on decode)."""
    names = SYNTHETIC_CLASSES
    specs = [InputSpec("video", f"{names[i % len(names)]}/{i:06d}", None, i % len(names), names[i % len(names)], i)
             for i in range(sc.num_videos)]  # fmt: skip
    return specs, list(names)


def _failure(spec: InputSpec, reason: str, stage: str) -> dict:
    return {"ok": False, "failure": {"relpath": spec.relpath, "kind": spec.kind, "reason": reason, "stage": stage}}


def decode_input(spec: InputSpec, cfg: EncodeConfig, sc: SyntheticConfig) -> dict:
    """One file -> its clips, uint8 [T, size, size, 3] each (uint8 crosses processes 4x cheaper)."""
    if spec.kind == "image":
        img = read_image(spec.path)
        clip = resize_and_crop(img, cfg.size)[None]
        return {"ok": True, "clips": [(0, torch.from_numpy(clip))], "stride": 1, "fps": None, "orig_size": list(img.shape[:2])}
    if spec.path is None:
        frames, label = make_synthetic_video(spec.index, num_frames=sc.num_frames, size=sc.size, seed=sc.seed)
        assert label == spec.label, "make_synthetic_video labels changed"
        fps, orig_size = sc.fps, list(frames.shape[1:3])
        frames = resize_and_crop(frames, cfg.size)
    else:  # one decode pass, each frame resized and cropped as it is read (memory: the small frames)
        info = {}
        frames, fps = read_video(spec.path, transform=lambda f: resize_and_crop(f, cfg.size), info=info)
        orig_size = info["size"]
    stride = stride_for_fps(fps, cfg.target_fps) if cfg.target_fps > 0 else cfg.stride
    mode = "all" if cfg.max_clips is None else "uniform"
    try:
        starts = clip_starts(len(frames), cfg.clip_len, stride, mode=mode, max_clips=cfg.max_clips)
    except ValueError as e:
        return _failure(spec, str(e), "clips")
    span = (cfg.clip_len - 1) * stride + 1
    clips = [(s, torch.from_numpy(np.ascontiguousarray(frames[s : s + span : stride]))) for s in starts]
    return {"ok": True, "clips": clips, "stride": stride, "fps": fps, "orig_size": orig_size}


class InputDecoder(Dataset):
    """Item i = every clip of input i, or a failure record: an exception never escapes a worker."""

    def __init__(self, specs: list[InputSpec], cfg: EncodeConfig, sc: SyntheticConfig):
        self.specs, self.cfg, self.sc = specs, cfg, sc

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        spec = self.specs[i]
        try:
            return decode_input(spec, self.cfg, self.sc)
        except BadInputError as e:
            return _failure(spec, e.reason, "decode")
        except Exception as e:  # a decoder bug on one odd file must not end the run
            return _failure(spec, f"{type(e).__name__}: {e}", "decode")


def _identity(x):
    return x


def _loader(dataset: Dataset, num_workers: int):
    if num_workers > 0:
        # One OpenCV thread per decoding process, set here in the parent before the workers are
        # forked: calling cv2.setNumThreads in a forked child can deadlock (it waits on the
        # parent's thread pool, whose threads the child does not have), which hung a test run.
        # The DataLoader itself gives each worker one torch thread.
        import cv2

        cv2.setNumThreads(1)
    kw = dict(num_workers=num_workers) if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_identity, **kw)


class Progress:
    """The first input not yet handed to the encoder: the suspect when a worker process dies."""

    next: InputSpec | None = None


def decode_results(specs, cfg, sc, num_workers: int, known: dict, progress: Progress):
    """Yield each spec's decode result in order; results in `known` (by relpath) are not re-decoded."""
    todo = [s for s in specs if s.relpath not in known]
    it = iter(_loader(InputDecoder(todo, cfg, sc), min(num_workers, len(todo))))
    fetched = 0
    progress.next = todo[0] if todo else None  # never an input in `known`: each retry makes progress
    for spec in specs:
        if spec.relpath in known:
            yield known[spec.relpath]
            continue
        result = next(it)
        fetched += 1
        progress.next = todo[fetched] if fetched < len(todo) else None
        yield result


def decode_alone(spec, cfg, sc) -> dict:
    """Decode one input in a fresh worker process; if that process dies too, it is a failure."""
    try:
        return list(_loader(InputDecoder([spec], cfg, sc), 1))[0]
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        return _failure(spec, f"decoder process crashed ({e})", "decode")


# ----------------------------------------------------------------------------- work units


@dataclass
class Unit:
    kind: str
    index: int
    specs: list[InputSpec]


def plan_units(specs: list[InputSpec], cfg: EncodeConfig) -> list[Unit]:
    """Fixed groups of sorted inputs, one per shard index (separate numbering per kind)."""
    units = []
    for kind, per in (("video", cfg.inputs_per_video_shard()), ("image", cfg.samples_per_shard)):
        chosen = sorted((s for s in specs if s.kind == kind), key=lambda s: s.relpath)
        units += [Unit(kind, i // per, chosen[i : i + per]) for i in range(0, len(chosen), per)]
    return units


def unit_fingerprint(unit: Unit, settings: dict) -> str:
    text = json.dumps({"settings": settings, "inputs": [s.relpath for s in unit.specs]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- encoding


class UnitEncoder:
    """Collects one unit's decoded clips, encodes them in fixed batches and writes its shard."""

    def __init__(self, vae: FrameVAE, cfg: EncodeConfig, device: torch.device):
        self.vae, self.cfg, self.device = vae, cfg, device
        self.channels = vae.config.latent_channels

    def start(self, unit: Unit) -> None:
        self.unit, self.pending, self.samples, self.failures = unit, [], [], []
        self.stats, self.frames, self.counts = RunningStats(self.channels), 0, {"video": 0, "image": 0}
        self.latent_shape = None

    def add(self, spec: InputSpec, result: dict) -> None:
        if not result["ok"]:
            self.failures.append(result["failure"])
            return
        self.counts[spec.kind] += 1
        for start, clip in result["clips"]:
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
            self.samples.append(sample_members(sample_key(spec.relpath, start), m, lv, _meta(spec, result, start, m)))
        self.pending = []

    def finish(self, writer: ShardWriter, fingerprint: str) -> dict:
        self._encode_pending()
        record = dict(
            fingerprint=fingerprint, inputs=[s.relpath for s in self.unit.specs], videos=self.counts["video"],
            images=self.counts["image"], frames=self.frames, failures=self.failures,
            stats=self.stats.to_dict(), latent_shape=self.latent_shape,
        )  # fmt: skip
        return writer.write_shard(self.unit.kind, self.unit.index, self.samples, record)


def _meta(spec: InputSpec, result: dict, start: int, mean) -> dict:
    stride, fps = result["stride"], result["fps"]
    return {
        "source": spec.relpath, "kind": spec.kind, "start": start, "stride": stride,
        "fps": None if fps is None else fps / stride, "source_fps": fps, "clip_len": int(mean.shape[1]),
        "orig_size": result["orig_size"], "label": spec.label, "label_name": spec.label_name,
        "latent_shape": list(mean.shape),
    }  # fmt: skip


def encode_units(todo, vae, run_cfg, writer, fingerprints, device, known, progress) -> None:
    """Decode every input of the `todo` units (in order) and write one shard per unit."""
    cfg = run_cfg.encode
    enc = UnitEncoder(vae, cfg, device)
    order = [(u, spec) for u in todo for spec in u.specs]
    results = decode_results([s for _, s in order], cfg, run_cfg.synthetic, cfg.num_workers, known, progress)
    current, left = None, 0
    try:
        for (unit, spec), result in zip(order, results):
            if unit is not current:
                current, left = unit, len(unit.specs)
                enc.start(unit)
            enc.add(spec, result)
            left -= 1
            if left == 0:
                side = enc.finish(writer, fingerprints[id(unit)])
                print(f"{side['name'] or sidecar_name(unit.kind, unit.index)}: {side['samples']} samples, "
                      f"{len(side['failures'])} failures", flush=True)  # fmt: skip
    finally:
        results.close()  # shuts the DataLoader workers down


def encode_with_retries(mine, vae, run_cfg, writer, fingerprints, device) -> None:
    """encode_units until done; a dead worker makes its suspect input be decoded alone, then the
    unfinished units restart (finished shards are kept)."""
    known, progress = {}, Progress()
    while True:
        todo = [u for u in mine if writer.completed(u.kind, u.index, fingerprints[id(u)]) is None]
        try:
            return encode_units(todo, vae, run_cfg, writer, fingerprints, device, known, progress)
        except RuntimeError as e:  # raised by DataLoader's SIGCHLD handler or its queue watchdog
            if "DataLoader worker" not in str(e) or progress.next is None:
                raise
            print(f"a decoding worker died ({e}); retrying {progress.next.relpath} alone", flush=True)
            known[progress.next.relpath] = decode_alone(progress.next, run_cfg.encode, run_cfg.synthetic)


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
    if args.data == "synthetic":
        specs, class_names = synthetic_specs(run_cfg.synthetic)
    else:
        items, class_names = discover(args.data)
        specs = [InputSpec(it.kind, it.relpath, str(it.path), it.label, it.label_name) for it in items]
        specs = [s for s in specs if cfg.images or s.kind == "video"]
    units = plan_units(specs, cfg)
    settings = encoding_settings(run_cfg, args.data)
    fingerprints = {id(u): unit_fingerprint(u, {**settings, "autoencoder": ae_info["weights_sha256"]}) for u in units}
    writer = ShardWriter(out)
    fresh = [u for u in units if writer.completed(u.kind, u.index, fingerprints[id(u)], check_hash=False) is None]
    mine = units[acc.process_index :: acc.num_processes]
    if acc.is_main_process:
        print(f"{len(specs)} inputs in {len(units)} shards; {len(units) - len(fresh)} complete already", flush=True)
    encode_with_retries(mine, vae, run_cfg, writer, fingerprints, acc.device)
    acc.wait_for_everyone()
    summary = {}
    if acc.is_main_process:
        sides = {id(u): writer.completed(u.kind, u.index, fingerprints[id(u)], check_hash=False) for u in units}
        missing = [sidecar_name(u.kind, u.index) for u in units if sides[id(u)] is None]
        if missing:
            raise ShardError(f"{out}: units not finished: {', '.join(missing[:5])} (did a process fail?)")
        manifest = finalize(out, list(sides.values()), clip_len=cfg.clip_len, autoencoder=ae_info,
                            encoding=settings, labels=class_names)  # fmt: skip
        summary = dict(manifest["totals"], seconds=time.perf_counter() - t0)
        summary["run_clips"] = sum(sides[id(u)]["samples"] for u in fresh if u.kind == "video")
        summary["run_frames"] = sum(sides[id(u)]["frames"] for u in fresh)
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


def main(argv=None) -> int:
    return run_main(lambda: run(parse_args(argv)), (BadInputError, ShardError))


if __name__ == "__main__":
    sys.exit(main())
