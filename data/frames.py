"""Pixel-space datasets: FrameDataset (single frames and images, for training the frame-wise VAE)
and ClipDataset (the first clip of each video, for validation), from a folder or "synthetic"."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from .clips import clip_span
from .discovery import MediaItem, assign_splits, discover
from .errors import BadInputError
from .files import seed_from
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_video
from .transforms import resize_and_crop, to_tensor
from .video_io import count_frames, read_image, read_video

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "all")


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and random from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _MediaDataset(torch.utils.data.Dataset):
    """Items of one split of a folder (via discover) or of the synthetic set, with bad-file skipping.

    Subclasses implement `_load(index, rng) -> dict`. A BadInputError there is logged once per
    file, the file is remembered as bad, and the sample of the next index whose file is not known
    to be bad is returned instead (so the fallback is deterministic). `.skipped` lists the bad
    paths seen in this process (with DataLoader workers, each worker has its own list).
    """

    def __init__(self, source, *, size, split, val_fraction, seed, synthetic_videos, synthetic_frames):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.source, self.size, self.split, self.seed, self.epoch = str(source), size, split, seed, 0
        self.synthetic_frames = synthetic_frames
        self.synthetic = self.source == "synthetic"
        if self.synthetic:
            self.class_names = list(SYNTHETIC_CLASSES)
            n = len(SYNTHETIC_CLASSES)
            items = [
                MediaItem(
                    Path("synthetic") / f"video_{i:05d}",
                    f"synthetic/video_{i:05d}",
                    "video",
                    i % n,
                    SYNTHETIC_CLASSES[i % n],
                )
                for i in range(synthetic_videos)
            ]
        else:
            items, self.class_names = discover(source)
        if split != "all":
            splits = assign_splits([it.relpath for it in items], val_fraction, seed)
            items = [it for it, s in zip(items, splits) if s == split]
        if not items:
            raise BadInputError(self.source, f"split {split!r} is empty (val_fraction={val_fraction})")
        self.items: list[MediaItem] = items
        self.skipped: list[str] = []
        self._bad_items: set[int] = set()
        self._entries: list[int] = []  # dataset index -> position in self.items

    def set_epoch(self, epoch: int) -> None:
        """Change the random frames/crops drawn (same epoch + index -> same sample)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._entries)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _synthetic_frames(self, item: MediaItem) -> np.ndarray:
        number = int(item.relpath.rsplit("_", 1)[1])
        frames, _ = make_synthetic_video(
            number, num_frames=self.synthetic_frames, size=self.size, seed=self.seed
        )
        return frames

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        first_error = None
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            item_pos = self._entries[candidate]
            if item_pos in self._bad_items:
                continue
            try:
                return self._load(candidate, self._rng(candidate))
            except BadInputError as e:
                first_error = first_error or e
                self._bad_items.add(item_pos)
                self.skipped.append(e.path)
                log.warning("skipping bad input %s", e)
        raise BadInputError(
            self.source, f"every item of split {self.split!r} failed to load; first: {first_error}"
        )

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError


class FrameDataset(_MediaDataset):
    """Single frames for stage 1: dict(image float [3,size,size] in [-1,1], label int, -1 = none).

    `source` is a folder (videos and images, see discover) or "synthetic". Each video contributes
    `frames_per_video` entries per epoch, each a uniformly random frame; each image one entry.
    The frame choice and the crop (random for split "train", centre otherwise, unless
    `random_crop` says) come from an RNG seeded by (seed, epoch, index). Nothing is decoded at
    construction; a video's decoded frame count is measured on first use (one decode pass) and
    cached, then each sample decodes up to its chosen frame.
    """

    def __init__(
        self,
        source,
        *,
        size: int = 64,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        frames_per_video: int = 8,
        synthetic_videos: int = 256,
        synthetic_frames: int = 16,
        random_crop: bool | None = None,
    ):
        super().__init__(
            source,
            size=size,
            split=split,
            val_fraction=val_fraction,
            seed=seed,
            synthetic_videos=synthetic_videos,
            synthetic_frames=synthetic_frames,
        )
        self.random_crop = split == "train" if random_crop is None else random_crop
        for pos, item in enumerate(self.items):
            self._entries.extend([pos] * (frames_per_video if item.kind == "video" else 1))
        self._frame_counts: dict[int, int] = {}

    def _frame(self, item_pos: int, item: MediaItem, rng: np.random.Generator) -> np.ndarray:
        if item.kind == "image":
            return read_image(item.path)
        if self.synthetic:
            frames = self._synthetic_frames(item)
            return frames[rng.integers(len(frames))]
        if item_pos not in self._frame_counts:
            self._frame_counts[item_pos] = count_frames(item.path)
        start = int(rng.integers(self._frame_counts[item_pos]))
        frames, _ = read_video(item.path, start=start, num_frames=1)
        return frames[0]

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        item_pos = self._entries[index]
        item = self.items[item_pos]
        frame = self._frame(item_pos, item, rng)
        frame = resize_and_crop(frame, self.size, random=self.random_crop, rng=rng)
        return {"image": to_tensor(frame), "label": item.label}


class ClipDataset(_MediaDataset):
    """The first clip of every video (frames 0, stride, ..., clip_len of them), centre-cropped:
    dict(video float [3,clip_len,size,size] in [-1,1], label int). For validation; deterministic.
    Images are ignored; a video shorter than the clip is a bad input (skipped, see .skipped)."""

    def __init__(
        self,
        source,
        *,
        clip_len: int = 16,
        stride: int = 1,
        size: int = 64,
        split: str = "val",
        val_fraction: float = 0.1,
        seed: int = 0,
        synthetic_videos: int = 256,
        synthetic_frames: int = 16,
    ):
        super().__init__(
            source,
            size=size,
            split=split,
            val_fraction=val_fraction,
            seed=seed,
            synthetic_videos=synthetic_videos,
            synthetic_frames=synthetic_frames,
        )
        self.clip_len, self.stride = clip_len, stride
        self.span = clip_span(clip_len, stride)
        self._entries = [pos for pos, item in enumerate(self.items) if item.kind == "video"]
        if not self._entries:
            raise BadInputError(self.source, f"no videos in split {split!r} (ClipDataset needs videos)")

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        item = self.items[self._entries[index]]
        if self.synthetic:
            frames = self._synthetic_frames(item)
            if len(frames) < self.span:
                raise BadInputError(item.relpath, f"only {len(frames)} frames, a clip needs {self.span}")
            frames = frames[: self.span : self.stride]
        else:
            frames, _ = read_video(item.path, start=0, stride=self.stride, num_frames=self.clip_len)
        return {"video": to_tensor(resize_and_crop(frames, self.size)), "label": item.label}


# ----------------------------------------------------------------------------- batch order


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one epoch on one process: a permutation that is a pure
    function of (seed, epoch), cut into per-process slices (rank::world_size, remainder
    dropped so every process takes the same number of steps), minus the first `skip` batches
    already consumed before a resume. No decoding happens for skipped batches."""

    def __init__(self, n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 skip: int = 0):
        g = torch.Generator().manual_seed(seed_from(seed, epoch, 0, "epoch-order"))
        perm = torch.randperm(n, generator=g).tolist()
        per_rank = (n // world_size) // batch_size * batch_size
        mine = perm[rank::world_size][:per_rank]
        self.batches = [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)][skip:]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FrameBatches:
    """Stage 1's batch source, with the interface of the latent loader (`data.latents.LatentLoader`):
    each `for` loop runs one epoch of `EpochBatchSampler` batches through a DataLoader, counting
    them, and advances the epoch when it ends; `state_dict()` = {"epoch", "batch"} (batches of this
    epoch already read), and after `load_state_dict` the next batch is the one an uninterrupted run
    would read next."""

    def __init__(self, dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.position = 0, 0

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        sampler = EpochBatchSampler(len(self.dataset), self.batch_size, seed=self.seed, epoch=self.epoch,
                                    rank=self.rank, world_size=self.world_size, skip=self.position)
        if len(sampler) == 0 and self.position == 0:
            raise ValueError(f"the training set has {len(self.dataset)} frames: fewer than one batch of "
                             f"{self.batch_size} per process; lower train.batch_size or add data")
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                             worker_init_fn=seed_worker, pin_memory=False)
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["batch"])
