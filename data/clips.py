"""Clip sampling arithmetic: frame stride for a target fps and clip start frames within a video."""

from __future__ import annotations

import math

import numpy as np


def stride_for_fps(src_fps: float, target_fps: float | None) -> int:
    """Keep every k-th frame so src_fps / k is close to target_fps: k = round(src/target), at least 1.

    target_fps None or <= 0 means "native rate" (stride 1).
    """
    if target_fps is None or target_fps <= 0:
        return 1
    if not (src_fps > 0 and math.isfinite(src_fps)):
        raise ValueError(f"source fps must be a positive number, got {src_fps}")
    return max(1, round(src_fps / target_fps))


def clip_span(clip_len: int, stride: int) -> int:
    """Number of source frames a clip covers: (clip_len - 1) * stride + 1."""
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len}, {stride}")
    return (clip_len - 1) * stride + 1


def clip_starts(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    mode: str = "all",
    max_clips: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Start frames of clips of `clip_len` frames taken every `stride` frames.

    "all": consecutive non-overlapping clips from frame 0 (the first `max_clips` of them).
    "uniform": `max_clips` (default: as many as "all") starts spread evenly from 0 to the last one.
    "random": `max_clips` (default 1) independent uniform starts drawn from `rng`, sorted.
    A video shorter than one clip raises ValueError with the numbers (callers wrap it in
    BadInputError with the path); it never silently yields no clips.
    """
    span = clip_span(clip_len, stride)
    if num_frames < span:
        raise ValueError(
            f"video has {num_frames} frames; a clip of {clip_len} frames with stride {stride} needs {span}"
        )
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips must be >= 1 or None, got {max_clips}")
    last = num_frames - span
    if mode == "all":
        starts = list(range(0, last + 1, span))
        return starts[:max_clips] if max_clips is not None else starts
    if mode == "uniform":
        n = max_clips if max_clips is not None else last // span + 1
        return sorted({int(round(s)) for s in np.linspace(0, last, n)})
    if mode == "random":
        if rng is None:
            raise ValueError("clip_starts(mode='random') needs rng (np.random.Generator) for reproducibility")
        return sorted(int(s) for s in rng.integers(0, last + 1, size=max_clips or 1))
    raise ValueError(f"mode must be 'all', 'uniform' or 'random', got {mode!r}")
