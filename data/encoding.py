"""Encoding inputs into shards, the data side (scripts/encode_latents.py keeps the command line,
the autoencoder and the orchestration): what one input decodes to, how inputs are planned into
shards ("work units"), and decoding in worker processes that survives a worker's crash.

Inputs are sorted and cut into fixed units before anything is decoded, so shard N always holds
the same inputs. Decoding runs in a DataLoader (one item = one file); an input whose decoder
raises becomes a `Failure`, and one that kills its worker process (segfault) is found by the
worker's exit status (`WorkerCrash`), decoded alone in a fresh worker by `DecodeSession.recover`,
and recorded as a failure if it crashes again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .clips import clip_starts, stride_for_fps
from .errors import BadInputError
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_video, synthetic_caption
from .transforms import resize_and_crop
from .video_io import read_image, read_video


@dataclass(frozen=True)
class InputSpec:
    """One input file (or synthetic video number `index` when path is None)."""

    kind: str  # "video" or "image"
    relpath: str
    path: str | None
    label: int = -1
    label_name: str | None = None
    index: int = -1
    captions: tuple[str, ...] = ()  # data/captions.py; empty in an uncaptioned folder


@dataclass
class Decoded:
    """An input's clips: (first frame index, uint8 [T, size, size, 3]) each (uint8 crosses
    processes 4x cheaper than float), the frame stride used, the file's fps and its frame size."""

    clips: list[tuple[int, torch.Tensor]]
    stride: int
    fps: float | None
    orig_size: list[int]


@dataclass
class Failure:
    """An input that gave no samples, and why; `stage` is "decode" or "clips" (too short)."""

    relpath: str
    kind: str
    reason: str
    stage: str

    def to_dict(self) -> dict:  # a line of failures.jsonl
        return asdict(self)


def synthetic_specs(num_videos: int, size: int = 64, seed: int = 0) -> tuple[list[InputSpec], list[str]]:
    """The synthetic set named like make_synthetic's folders, with its captions; label = index %
    classes (checked on decode)."""
    names = SYNTHETIC_CLASSES
    specs = [InputSpec("video", f"{names[i % len(names)]}/{i:06d}", None, i % len(names), names[i % len(names)], i,
                       (synthetic_caption(i, size=size, seed=seed),))
             for i in range(num_videos)]  # fmt: skip
    return specs, list(names)


def decode_input(spec: InputSpec, cfg, sc) -> Decoded | Failure:
    """One input -> its clips, with the encoding config `cfg` (size, clip_len, stride, target_fps,
    max_clips) and, for synthetic inputs, the synthetic config `sc` (num_frames, size, fps, seed)."""
    if spec.kind == "image":
        img = read_image(spec.path)
        return Decoded([(0, torch.from_numpy(resize_and_crop(img, cfg.size)[None]))], 1, None, list(img.shape[:2]))
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
        return Failure(spec.relpath, spec.kind, str(e), "clips")
    span = (cfg.clip_len - 1) * stride + 1
    clips = [(s, torch.from_numpy(np.ascontiguousarray(frames[s : s + span : stride]))) for s in starts]
    return Decoded(clips, stride, fps, orig_size)


class InputDecoder(Dataset):
    """Item i = `decode_input` of input i, or a Failure: an exception never escapes a worker."""

    def __init__(self, specs: list[InputSpec], cfg, sc):
        self.specs, self.cfg, self.sc = specs, cfg, sc

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> Decoded | Failure:
        spec = self.specs[i]
        try:
            return decode_input(spec, self.cfg, self.sc)
        except BadInputError as e:
            return Failure(spec.relpath, spec.kind, e.reason, "decode")
        except Exception as e:  # a decoder bug on one odd file must not end the run
            return Failure(spec.relpath, spec.kind, f"{type(e).__name__}: {e}", "decode")


# ----------------------------------------------------------------------------- crash-safe decoding


class WorkerCrash(RuntimeError):
    """A decoding worker process died (a segfault in a decoder, an out-of-memory kill)."""


def _identity(x):
    return x


def _loader(dataset: Dataset, num_workers: int) -> DataLoader:
    if num_workers > 0:
        # One OpenCV thread per decoding process, set here in the parent before the workers are
        # forked: calling cv2.setNumThreads in a forked child can deadlock (it waits on the
        # parent's thread pool, whose threads the child does not have), which hung a test run.
        # The DataLoader itself gives each worker one torch thread.
        import cv2

        cv2.setNumThreads(1)
    kw = dict(num_workers=num_workers) if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_identity, **kw)


def _dead_worker(it) -> int | None:
    """The exit code of a worker process of DataLoader iterator `it` that exited abnormally, if any."""
    dead = [w.exitcode for w in getattr(it, "_workers", []) if w.exitcode not in (None, 0)]
    return dead[0] if dead else None


def _next(it):
    """next(it), with a RuntimeError from a DataLoader whose worker process exited abnormally
    turned into WorkerCrash (decided by the workers' exit codes, not by the error's text)."""
    try:
        return next(it)
    except RuntimeError as e:
        if (code := _dead_worker(it)) is not None:
            raise WorkerCrash(f"a decoding worker process died (exit code {code}): {e}") from e
        raise


@dataclass
class DecodeSession:
    """Decoding of a run's inputs, in order, across retries: `known` holds the results of inputs
    decoded alone after a crash (by relpath), `next` is the first input not yet received: the
    suspect when a worker dies. It is never an input in `known`, so each retry makes progress.

    DataLoader reports a dead worker from a SIGCHLD handler, which can raise its RuntimeError at
    any line of the main process (while it encodes, say), not only inside next(): so when a
    `results` generator ends, `dead_worker` records the exit code of a worker that died, and the
    caller asks it rather than reading the error's text."""

    cfg: object
    sc: object
    num_workers: int
    known: dict[str, Decoded | Failure] = field(default_factory=dict)
    next: InputSpec | None = None
    dead_worker: int | None = None

    def results(self, specs: list[InputSpec]):
        """Yield each spec's result in order; raises WorkerCrash when a worker process dies."""
        todo = [s for s in specs if s.relpath not in self.known]
        it = iter(_loader(InputDecoder(todo, self.cfg, self.sc), min(self.num_workers, len(todo))))
        fetched, self.dead_worker = 0, None
        self.next = todo[0] if todo else None
        try:
            for spec in specs:
                if spec.relpath in self.known:
                    yield self.known[spec.relpath]
                    continue
                result = _next(it)
                fetched += 1
                self.next = todo[fetched] if fetched < len(todo) else None
                yield result
        finally:  # before the iterator shuts its workers down
            self.dead_worker = _dead_worker(it)

    def recover(self) -> InputSpec:
        """After a WorkerCrash: decode the suspect alone in a fresh worker process and remember the
        result (a Failure if that process dies too). Returns the suspect."""
        spec = self.next
        if spec is None:
            raise RuntimeError("no input to retry: the crash happened outside decoding")
        try:
            self.known[spec.relpath] = _next(iter(_loader(InputDecoder([spec], self.cfg, self.sc), 1)))
        except WorkerCrash as e:
            self.known[spec.relpath] = Failure(spec.relpath, spec.kind, f"decoder process crashed ({e})", "decode")
        return spec


# ----------------------------------------------------------------------------- work units


@dataclass
class Unit:
    """The inputs of one shard (separate numbering per kind) and the fingerprint of everything
    that decides its bytes (settings, inputs, autoencoder): a rerun reuses a shard only when equal."""

    kind: str
    index: int
    specs: list[InputSpec]
    fingerprint: str = ""


def plan_units(specs: list[InputSpec], per_video_shard: int, per_image_shard: int, settings: dict) -> list[Unit]:
    """Fixed groups of sorted inputs, one per shard index, each with its fingerprint."""
    units = []
    for kind, per in (("video", per_video_shard), ("image", per_image_shard)):
        chosen = sorted((s for s in specs if s.kind == kind), key=lambda s: s.relpath)
        units += [Unit(kind, i // per, chosen[i : i + per]) for i in range(0, len(chosen), per)]
    for u in units:
        what = {"settings": settings, "inputs": [s.relpath for s in u.specs]}
        if any(s.captions for s in u.specs):  # an edited caption re-encodes its unit
            what["captions"] = [list(s.captions) for s in u.specs]
        text = json.dumps(what, sort_keys=True)
        u.fingerprint = hashlib.sha256(text.encode()).hexdigest()
    return units
