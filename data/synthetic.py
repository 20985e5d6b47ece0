"""Built-in synthetic dataset: one bright shape (class = shape) bouncing at constant velocity on a
dark background, plus motion metrics (object centres, path smoothness) for checking samples."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import BadInputError
from .transforms import to_tensor
from .video_io import video_info, write_video

# Sorted, so that discover() on the folders written by write_synthetic gives the same labels.
SYNTHETIC_CLASSES: list[str] = ["circle", "square", "triangle"]
BACKGROUND = (20, 20, 30)  # dark, plain: the object is everything that differs from it
PALETTE = [
    (230, 60, 60),
    (60, 200, 80),
    (70, 110, 240),
    (240, 210, 60),
    (60, 210, 220),
    (220, 80, 220),
    (240, 240, 240),
]
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel positions give smooth motion


def _bounce(pos: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold free-flight positions into [lo, hi] as if reflecting off the walls (a triangle wave)."""
    span = hi - lo
    x = np.mod(pos - lo, 2 * span)
    return lo + np.where(x > span, 2 * span - x, x)


def _draw(img: np.ndarray, shape: str, centre: np.ndarray, radius: float, colour) -> None:
    """Draw a filled, anti-aliased shape of circumradius ~`radius` centred at (x, y)."""
    scale = 1 << _SHIFT
    if shape == "circle":
        cx, cy = (centre * scale).round().astype(int)
        cv2.circle(img, (int(cx), int(cy)), int(round(radius * 0.9 * scale)), colour, -1, cv2.LINE_AA, _SHIFT)
        return
    if shape == "square":
        angles = np.deg2rad([45, 135, 225, 315])
    elif shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pts = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cv2.fillPoly(img, [(pts * scale).round().astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)


def make_synthetic_video(
    index: int, *, num_frames: int = 16, size: int = 64, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Video `index` of the synthetic set -> (uint8 [T,size,size,3] RGB, label = index % classes).

    Deterministic in (seed, index). The shape's size, colour, start and velocity are random; it
    moves at 3-6% of the frame size per frame and bounces off the borders.
    """
    label = index % len(SYNTHETIC_CLASSES)
    rng = np.random.default_rng([seed, index])
    radius = size * rng.uniform(0.14, 0.2)
    colour = tuple(int(c) for c in PALETTE[rng.integers(len(PALETTE))])
    lo, hi = radius + 1.0, size - 2.0 - radius
    start = rng.uniform(lo, hi, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    velocity = size * rng.uniform(0.03, 0.06) * np.array([np.cos(angle), np.sin(angle)])
    centres = _bounce(start + velocity * np.arange(num_frames)[:, None], lo, hi)  # [T, 2] (x, y)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for frame, centre in zip(frames, centres):
        _draw(frame, SYNTHETIC_CLASSES[label], centre, radius, colour)
    return frames, label


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """In-memory synthetic videos (generated on access, deterministic): dict(video [3,T,H,W], label)."""

    class_names = SYNTHETIC_CLASSES

    def __init__(self, num_videos: int, *, num_frames: int = 16, size: int = 64, seed: int = 0):
        self.num_videos, self.num_frames, self.size, self.seed = num_videos, num_frames, size, seed

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_videos:
            raise IndexError(index)
        frames, label = make_synthetic_video(
            index, num_frames=self.num_frames, size=self.size, seed=self.seed
        )
        return {"video": to_tensor(frames), "label": label}


def _is_complete(path: Path, num_frames: int, size: int) -> bool:
    if not path.is_file():
        return False
    try:
        info = video_info(path)
    except BadInputError:
        return False
    return (info["num_frames"], info["height"], info["width"]) == (num_frames, size, size)


def write_synthetic(
    out_dir, num_videos: int, *, num_frames: int = 16, size: int = 64, fps: float = 8.0, seed: int = 0
) -> list[Path]:
    """Write the synthetic set as H.264 mp4 files OUT/<class>/video_00003.mp4; returns their paths.

    Idempotent: a file that already decodes to the right frame count and size is kept as is.
    Odd sizes are stored padded to even (see write_video).
    """
    out_dir = Path(out_dir)
    stored = size + size % 2
    paths = []
    for index in range(num_videos):
        label = index % len(SYNTHETIC_CLASSES)
        path = out_dir / SYNTHETIC_CLASSES[label] / f"video_{index:05d}.mp4"
        if not _is_complete(path, num_frames, stored):
            frames, _ = make_synthetic_video(index, num_frames=num_frames, size=size, seed=seed)
            write_video(path, frames, fps)
        paths.append(path)
    return paths


def object_centres(frames: np.ndarray, threshold: int = 40) -> np.ndarray:
    """Centroid (x, y) of the pixels that differ from the background, per frame -> [T, 2].

    The background colour is the per-frame median of the border pixels; a pixel is "object" when
    any channel differs from it by more than `threshold`. Frames with no object give NaN.
    """
    frames = np.asarray(frames).astype(np.int16)
    border = np.concatenate(
        [frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1
    )  # [T, 2W+2H, 3]
    background = np.median(border, axis=1)[:, None, None, :]  # [T,1,1,3]
    mask = (np.abs(frames - background).max(axis=-1) > threshold).astype(np.float64)  # [T,H,W]
    area = mask.sum(axis=(1, 2))
    ys, xs = np.arange(frames.shape[1]), np.arange(frames.shape[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(axis=1) * xs).sum(axis=1) / area
        cy = (mask.sum(axis=2) * ys).sum(axis=1) / area
    return np.stack([cx, cy], axis=1)


def mean_speed(centres: np.ndarray) -> float:
    """Mean distance the centre moves per frame (NaN frames ignored)."""
    steps = np.linalg.norm(np.diff(np.asarray(centres, dtype=np.float64), axis=0), axis=1)
    return float(np.nanmean(steps)) if np.isfinite(steps).any() else float("nan")


def path_smoothness(centres: np.ndarray) -> float:
    """Mean |second difference| / mean |first difference| of the centre path (lower = smoother).

    About 0 for constant velocity (a bounce adds a spike), around 1 or more for jittery or
    random positions. NaN with fewer than 3 usable frames; 0 for an object that never moves.
    """
    c = np.asarray(centres, dtype=np.float64)
    accel = np.linalg.norm(np.diff(c, n=2, axis=0), axis=1)
    if not np.isfinite(accel).any():
        return float("nan")
    speed = mean_speed(c)
    acc = float(np.nanmean(accel))
    return 0.0 if speed < 1e-9 and acc < 1e-9 else acc / max(speed, 1e-9)


def motion_summary(videos, *, size: int | None = None, jump_px: float = 4.0) -> dict:
    """Track the object in each video (uint8 [T,H,W,3]) and summarise its motion over the videos in
    which it is found in every frame: `videos` (how many), mean `smoothness` (path_smoothness), mean
    `speed_px` (mean_speed) and `jump_rate` (share of frame-to-frame moves over `jump_px`). Distances
    are in pixels of a `size`-wide frame (default: each video's own width; upscaled videos are
    measured at the size they were generated at). NaN figures when no video is tracked."""
    smooth, speed, jumps = [], [], []
    for frames in videos:
        c = object_centres(frames)
        if np.isnan(c).any():
            continue
        c = c * ((size or frames.shape[2]) / frames.shape[2])
        smooth.append(path_smoothness(c))
        speed.append(mean_speed(c))
        jumps.append(float((np.linalg.norm(np.diff(c, axis=0), axis=1) > jump_px).mean()))
    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")

    return {"videos": len(smooth), "smoothness": mean(smooth), "speed_px": mean(speed), "jump_rate": mean(jumps)}
