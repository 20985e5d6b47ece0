"""Built-in synthetic dataset: one bright shape (class = shape) bouncing at constant velocity on a
dark background, plus motion metrics (object centres, path smoothness) for checking samples."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import torch

from .colour import background_colour, delta_e, srgb_to_lab
from .errors import BadInputError
from .files import atomic_write
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


DEFAULT_RADIUS = (0.14, 0.2)  # circumradius as a fraction of the frame size (min, max)
SMALL_RADIUS = (0.08, 0.12)  # "small objects": the quality benchmark's data


COLOUR_NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta", "white"]  # PALETTE's, in order
# compass directions in image coordinates (y down), counter-clockwise from +x in 45-degree steps
DIRECTIONS = ["to the right", "to the upper right", "up", "to the upper left",
              "to the left", "to the lower left", "down", "to the lower right"]


def direction_index(dx: float, dy: float) -> int:
    """The nearest of the 8 DIRECTIONS to a displacement (dx, dy) in image coordinates (y down)."""
    return int(np.round(np.arctan2(-dy, dx) / (np.pi / 4))) % 8


def _params(index: int, seed: int, size: int, radius: tuple[float, float]) -> dict:
    rng = np.random.default_rng([seed, index])
    r = size * rng.uniform(*radius)
    colour = int(rng.integers(len(PALETTE)))
    lo, hi = r + 1.0, size - 2.0 - r
    start = rng.uniform(lo, hi, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    velocity = size * rng.uniform(0.03, 0.06) * np.array([np.cos(angle), np.sin(angle)])
    return {"label": index % len(SYNTHETIC_CLASSES), "radius": r, "colour": colour, "lo": lo, "hi": hi,
            "start": start, "velocity": velocity}


def caption_text(colour: int, shape: int, direction: int) -> str:
    """"a red circle moves to the upper left": COLOUR_NAMES, SYNTHETIC_CLASSES, DIRECTIONS indices."""
    return f"a {COLOUR_NAMES[colour]} {SYNTHETIC_CLASSES[shape]} moves {DIRECTIONS[direction]}"


def caption_words() -> list[str]:
    """Every word `caption_text` can write (the captions' closed vocabulary)."""
    return sorted({w for phrase in ["a moves", *COLOUR_NAMES, *SYNTHETIC_CLASSES, *DIRECTIONS] for w in phrase.split()})


def partial_captions(colour: int, shape: int, direction: int) -> list[str]:
    """Shorter captions of the same video, each naming the shape with one other attribute: "a red
    square" and "a square moves to the upper left" (the words of `caption_text`, no new ones)."""
    return [f"a {COLOUR_NAMES[colour]} {SYNTHETIC_CLASSES[shape]}", f"a {SYNTHETIC_CLASSES[shape]} moves {DIRECTIONS[direction]}"]


def combination_order() -> list[tuple[int, int, int]]:
    """Every (colour, shape, direction) index triple once (7 x 3 x 8 = 168), in an order that cycles all
    three (k -> colour k % 7, shape k % 3, direction k % 8): any run of it is spread over every colour,
    shape and direction. The order of `held_out_combinations` and of the quality benchmark's prompts."""
    total = len(COLOUR_NAMES) * len(SYNTHETIC_CLASSES) * len(DIRECTIONS)
    return [(k % len(COLOUR_NAMES), k % len(SYNTHETIC_CLASSES), k % len(DIRECTIONS)) for k in range(total)]


def held_out_combinations(count: int) -> set[tuple[int, int, int]]:
    """The first `count` of `combination_order`: combinations a training set can leave out on purpose.
    Up to 24, every pair of attributes (colour and shape, shape and direction, colour and direction)
    of a held-out combination is still in the other 144, so each can be composed from seen parts."""
    order = combination_order()
    if not 0 <= count < len(order):
        raise ValueError(f"can hold out 0 to {len(order) - 1} of the {len(order)} combinations, not {count}")
    return set(order[:count])


def synthetic_attributes(index: int, *, size: int = 64, seed: int = 0,
                         radius: tuple[float, float] = DEFAULT_RADIUS) -> tuple[int, int, int]:
    """(colour, shape, direction) indices of video `index`: its colour, shape and the direction of its
    first move (8 compass directions; the object keeps it until it bounces off a border)."""
    p = _params(index, seed, size, radius)
    first = _bounce(p["start"] + p["velocity"] * np.arange(2)[:, None], p["lo"], p["hi"])
    return p["colour"], p["label"], direction_index(*(first[1] - first[0]))


def synthetic_captions(index: int, *, size: int = 64, seed: int = 0, radius: tuple[float, float] = DEFAULT_RADIUS,
                       partial: bool = False) -> list[str]:
    """What video `index` shows (`synthetic_attributes` as `caption_text`); with `partial`, that
    caption's `partial_captions` after it."""
    attrs = synthetic_attributes(index, size=size, seed=seed, radius=radius)
    return [caption_text(*attrs), *(partial_captions(*attrs) if partial else [])]


def synthetic_caption(index: int, *, size: int = 64, seed: int = 0, radius: tuple[float, float] = DEFAULT_RADIUS) -> str:
    """The whole caption of video `index` (`synthetic_captions`' first)."""
    return synthetic_captions(index, size=size, seed=seed, radius=radius)[0]


def make_synthetic_video(
    index: int, *, num_frames: int = 16, size: int = 64, seed: int = 0,
    radius: tuple[float, float] = DEFAULT_RADIUS,
) -> tuple[np.ndarray, int]:
    """Video `index` of the synthetic set -> (uint8 [T,size,size,3] RGB, label = index % classes).

    Deterministic in (seed, index). The shape's size (circumradius drawn from `radius` x size),
    colour, start and velocity are random; it moves at 3-6% of the frame size per frame and bounces
    off the borders. `synthetic_caption` describes it.
    """
    p = _params(index, seed, size, radius)
    centres = _bounce(p["start"] + p["velocity"] * np.arange(num_frames)[:, None], p["lo"], p["hi"])  # [T, 2]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    colour = tuple(int(c) for c in PALETTE[p["colour"]])
    for frame, centre in zip(frames, centres):
        _draw(frame, SYNTHETIC_CLASSES[p["label"]], centre, p["radius"], colour)
    return frames, p["label"]


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """In-memory synthetic videos (generated on access, deterministic): dict(video [3,T,H,W], label)."""

    class_names = SYNTHETIC_CLASSES

    def __init__(self, num_videos: int, *, num_frames: int = 16, size: int = 64, seed: int = 0,
                 radius: tuple[float, float] = DEFAULT_RADIUS):
        self.num_videos, self.num_frames, self.size, self.seed = num_videos, num_frames, size, seed
        self.radius = radius

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_videos:
            raise IndexError(index)
        frames, label = make_synthetic_video(
            index, num_frames=self.num_frames, size=self.size, seed=self.seed, radius=self.radius
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
    out_dir, num_videos: int, *, num_frames: int = 16, size: int = 64, fps: float = 8.0, seed: int = 0,
    radius: tuple[float, float] = DEFAULT_RADIUS, partial_captions: bool = False, hold_out: int = 0,
) -> list[Path]:
    """Write the synthetic set as H.264 mp4 files OUT/<class>/video_00003.mp4, each with its caption
    in a sidecar OUT/<class>/video_00003.txt (`synthetic_captions`); returns the video paths. With
    `partial_captions` the sidecar holds, after that caption, one line per shorter caption of the same
    video (training draws one of a file's captions per sample each epoch).

    With `hold_out` > 0, no video shows one of `held_out_combinations(hold_out)`: such an index is
    skipped (its files, left by an earlier run without the hold-out, removed) and the next one taken
    until there are `num_videos`; every video written is the one the same index gives without it.

    Idempotent: a file that already decodes to the right frame count and size is kept as is.
    Odd sizes are stored padded to even (see write_video).
    """
    out_dir = Path(out_dir)
    stored = size + size % 2
    excluded = held_out_combinations(hold_out)
    paths = []
    for index in itertools.count():
        if len(paths) == num_videos:
            break
        label = index % len(SYNTHETIC_CLASSES)
        path = out_dir / SYNTHETIC_CLASSES[label] / f"video_{index:05d}.mp4"
        if excluded and synthetic_attributes(index, size=size, seed=seed, radius=radius) in excluded:
            path.unlink(missing_ok=True)
            path.with_suffix(".txt").unlink(missing_ok=True)
            continue
        if not _is_complete(path, num_frames, stored):
            frames, _ = make_synthetic_video(index, num_frames=num_frames, size=size, seed=seed, radius=radius)
            write_video(path, frames, fps)
        caption = "".join(c + "\n" for c in synthetic_captions(index, size=size, seed=seed, radius=radius,
                                                            partial=partial_captions))
        side = path.with_suffix(".txt")
        if not side.is_file() or side.read_text() != caption:
            with atomic_write(side) as tmp:
                tmp.write_text(caption)
        paths.append(path)
    return paths


def object_centres(frames: np.ndarray, threshold: int = 40) -> np.ndarray:
    """Centroid (x, y) of the pixels that differ from the background, per frame -> [T, 2].

    The background colour is the per-frame median of the border pixels; a pixel is "object" when
    any channel differs from it by more than `threshold`. Frames with no object give NaN.
    """
    frames = np.asarray(frames).astype(np.int16)
    background = background_colour(frames)[:, None, None, :]  # [T,1,1,3]
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


def track_object(frames: np.ndarray, threshold: int = 40) -> dict[str, np.ndarray]:
    """Follow the largest object in each frame (uint8 [T,H,W,3]) -> per-frame arrays:
    `centre` [T,2] (x, y; NaN where nothing differs from the background), `area` [T] (pixels of the
    largest connected object), `share` [T] (its share of all object pixels: 1 for one clean object,
    lower with ghosts or fragments), `colour` [T,3] (mean RGB of its interior, its anti-aliased
    edge left out when the object is large enough; NaN where nothing is found) and `shape` [T]
    (its SYNTHETIC_CLASSES index by `_shape_of`; -1 where nothing is found)."""
    frames = np.asarray(frames)
    diff = np.abs(frames.astype(np.int16) - background_colour(frames)[:, None, None, :].astype(np.int16))
    masks = (diff.max(axis=-1) > threshold).astype(np.uint8)
    t = frames.shape[0]
    centre, colour = np.full((t, 2), np.nan), np.full((t, 3), np.nan)
    area, share, shape = np.zeros(t), np.zeros(t), np.full(t, -1)
    kernel = np.ones((3, 3), np.uint8)
    for i, m in enumerate(masks):
        n, labels, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n < 2:
            continue
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area[i] = stats[k, cv2.CC_STAT_AREA]
        share[i] = area[i] / m.sum()
        centre[i] = cents[k]
        obj = (labels == k).astype(np.uint8)
        shape[i] = _shape_of(obj)
        inner = cv2.erode(obj, kernel)
        colour[i] = frames[i][(inner if inner.sum() >= 4 else obj).astype(bool)].mean(axis=0)
    return {"centre": centre, "area": area, "share": share, "colour": colour, "shape": shape}


def video_quality(videos, reference, *, size: int | None = None, jump_fraction: float = 0.125,
                  colour_match_de: float = 15.0) -> dict:
    """What a person checks in generated videos of one moving object, against `reference` videos
    (the data). Both are iterables of uint8 [T,H,W,3]; distances are in pixels of a `size`-wide frame
    (default: the reference's width).

    - `found_whole`: share of frames whose largest object holds >= 90% of the object pixels and has
      an area within [0.6 x, 1.5 x] the reference's smallest and largest object areas.
    - `colour_match`: share of videos whose object colour (median over frames, CIELAB) lies within
      `colour_match_de` ΔE of some reference video's object colour; `colour_match_de_median`: the
      median of that nearest distance.
    - `colour_drift_de`: mean over videos of the mean ΔE of each frame's object colour from the
      video's own; `colour_drift_rgb`: mean over videos of the largest per-channel range (0-255) of
      the object's mean colour across frames (the "varies by N/255" figure).
    - `smoothness`, `speed_px`, `jump_rate`, `videos_tracked`: motion_summary over the videos where
      the object is found in every frame; a jump is a move over `jump_fraction` x size in one frame.
    """
    reference, videos = [np.asarray(v) for v in reference], [np.asarray(v) for v in videos]
    if not reference or not videos:
        raise ValueError("video_quality needs at least one video and one reference video")
    size = size or reference[0].shape[2]

    def clip_stats(vs):
        out = []
        for v in vs:
            tr = track_object(v)
            scale = size / v.shape[2]
            tr["area_scaled"] = tr["area"] * scale**2
            lab = srgb_to_lab(tr["colour"])
            found = np.isfinite(lab).all(axis=1)
            tr["lab"] = np.nanmedian(lab[found], axis=0) if found.any() else np.full(3, np.nan)
            tr["drift_de"] = float(delta_e(lab[found], tr["lab"]).mean()) if found.any() else np.nan
            rgb = tr["colour"][found]
            tr["drift_rgb"] = float((rgb.max(axis=0) - rgb.min(axis=0)).max()) if len(rgb) else np.nan
            out.append(tr)
        return out

    ref, gen = clip_stats(reference), clip_stats(videos)
    # a reference with no object found at all (an untrained VAE's decodes) bounds nothing: NaN figures
    ref_areas = np.concatenate([r["area_scaled"][r["area"] > 0] for r in ref])
    lo, hi = (0.6 * ref_areas.min(), 1.5 * ref_areas.max()) if len(ref_areas) else (np.nan, np.nan)
    whole = np.concatenate([(g["share"] >= 0.9) & (g["area_scaled"] >= lo) & (g["area_scaled"] <= hi) for g in gen])
    ref_labs = [r["lab"] for r in ref if np.isfinite(r["lab"]).all()]
    nearest = np.array([delta_e(np.stack(ref_labs), g["lab"]).min() if np.isfinite(g["lab"]).all() else np.inf
                        for g in gen]) if ref_labs else np.full(len(gen), np.nan)  # fmt: skip
    motion = motion_summary(videos, size=size, jump_px=jump_fraction * size)

    def nanmean(xs):
        xs = [x for x in xs if np.isfinite(x)]
        return float(np.mean(xs)) if xs else float("nan")

    return {
        "videos": len(videos),
        "found_whole": float(whole.mean()) if len(ref_areas) else float("nan"),
        "colour_match": float((nearest <= colour_match_de).mean()) if ref_labs else float("nan"),
        "colour_match_de_median": float(np.median(nearest)),
        "colour_drift_de": nanmean(g["drift_de"] for g in gen),
        "colour_drift_rgb": nanmean(g["drift_rgb"] for g in gen),
        "videos_tracked": motion["videos"],
        "smoothness": motion["smoothness"],
        "speed_px": motion["speed_px"],
        "jump_rate": motion["jump_rate"],
    }


def shuffled_frames(videos, seed: int = 0) -> list[np.ndarray]:
    """Each video with its frames in a random order: the baseline that has the data's frames but no
    motion (what a model that ignores time would score)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(v)[rng.permutation(len(v))] for v in videos]


# ----------------------------------------------------------------------------- prompt adherence


def parse_caption(text: str) -> dict | None:
    """{"colour", "shape", "direction"} (indices into COLOUR_NAMES, SYNTHETIC_CLASSES, DIRECTIONS) of a
    caption in `caption_text`'s form, else None."""
    words = text.strip().lower()
    for c, colour in enumerate(COLOUR_NAMES):
        for s, shape in enumerate(SYNTHETIC_CLASSES):
            head = f"a {colour} {shape} moves "
            if words.startswith(head) and words[len(head):] in DIRECTIONS:
                return {"colour": c, "shape": s, "direction": DIRECTIONS.index(words[len(head):])}
    return None


def _shape_of(mask: np.ndarray) -> int:
    """SYNTHETIC_CLASSES index from one object's mask. The square is axis-aligned, so it fills its
    bounding box (> 0.86 measured; circles 0.66-0.83, triangles 0.55-0.67); a circle fills its
    smallest enclosing circle (radius + half a pixel: > 0.78 measured) and a triangle does not
    (< 0.66), at 32 and 64 px."""
    _, _, w, h = cv2.boundingRect(mask)
    area = float(mask.sum())
    if area / max(w * h, 1) > 0.86:
        return 1
    (_, _), r = cv2.minEnclosingCircle(cv2.findNonZero(mask))
    return 0 if area / (np.pi * (r + 0.5) ** 2) > 0.72 else 2


def describe_video(frames: np.ndarray, threshold: int = 40) -> dict:
    """What a viewer would say a synthetic-style video shows: {"colour", "shape", "direction"} as
    indices (None where no object is found). Colour: the palette entry nearest (CIELAB) the object's
    median colour; shape: the majority vote of `_shape_of` over frames; direction: the 8-way
    direction of the tracked centre's move from the first frame to the second (the caption's "first
    move")."""
    frames = np.asarray(frames)
    tr = track_object(frames, threshold)
    found = np.isfinite(tr["centre"]).all(axis=1)
    if not found.any():
        return {"colour": None, "shape": None, "direction": None}
    lab = np.nanmedian(srgb_to_lab(tr["colour"][found]), axis=0)
    colour = int(np.argmin(delta_e(srgb_to_lab(np.array(PALETTE, dtype=np.float64)), lab[None])))
    shape = int(np.bincount(tr["shape"][found], minlength=3).argmax())
    c = tr["centre"]
    move = c[1] - c[0] if len(c) > 1 else None
    direction = None if move is None or not np.isfinite(move).all() or np.hypot(*move) < 1e-6 else direction_index(*move)
    return {"colour": colour, "shape": shape, "direction": direction}


def class_adherence(videos, class_names) -> dict:
    """Share of videos whose object has the asked class's shape (`describe_video`'s majority vote;
    class names from SYNTHETIC_CLASSES): how far a class-conditional model follows its label."""
    asked = []
    for name in class_names:
        if name not in SYNTHETIC_CLASSES:
            raise ValueError(f"class {name!r} is not one of the synthetic classes {SYNTHETIC_CLASSES}")
        asked.append(SYNTHETIC_CLASSES.index(name))
    hits = [describe_video(frames)["shape"] == a for frames, a in zip(videos, asked)]
    return {"shape": float(np.mean(hits)) if hits else float("nan"), "videos": len(hits)}


def prompt_adherence(videos, captions) -> dict:
    """Share of videos whose object has the asked colour, the asked shape, moves in the asked
    direction (the same one of the 8 sectors), and all three; `direction_near`: within one sector
    (45 degrees) of the asked one. Captions in `caption_text` form."""
    hits = {"colour": [], "shape": [], "direction": []}
    near = []
    for frames, text in zip(videos, captions):
        asked, seen = parse_caption(text), describe_video(frames)
        if asked is None:
            raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> moves <direction>'")
        for k in hits:
            hits[k].append(seen[k] == asked[k])
        near.append(seen["direction"] is not None and min((seen["direction"] - asked["direction"]) % 8,
                                                          (asked["direction"] - seen["direction"]) % 8) <= 1)
    n = len(near)
    out = {k: float(np.mean(v)) if n else float("nan") for k, v in hits.items()}
    out["all"] = float(np.mean([a and b and c for a, b, c in zip(*hits.values())])) if n else float("nan")
    out["direction_near"] = float(np.mean(near)) if n else float("nan")
    out["videos"] = n
    return out
