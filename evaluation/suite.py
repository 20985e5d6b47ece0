"""Scoring a set of generated clips against reference clips: FVD and FID (with detectors), and the
metrics that need no weights: the latent Fréchet distance, temporal flicker, the synthetic
tracker's figures and prompt adherence. Each metric is one row {"metric", "value", ...}."""

from __future__ import annotations

import math

import numpy as np

from data.synthetic import prompt_adherence, track_object, video_quality

from .detectors import Detector, frame_features, video_features
from .frechet import clip_features, frechet_distance

TRACKER_KEYS = ("found_whole", "colour_match", "colour_drift_de", "smoothness", "speed_px", "jump_rate")
# the tracker's figures mean something only on one-object synthetic data: the reference must have
# its object found whole in this share of frames, and the object must be small (its median area at
# most this share of the frame; noise or natural video makes one frame-sized "object")
TRACKER_MIN_FOUND = 0.9
TRACKER_MAX_AREA = 0.25


def one_small_object(reference, data_own: dict) -> bool:
    """Whether `reference` looks like the synthetic data the tracker is made for."""
    if not data_own["found_whole"] >= TRACKER_MIN_FOUND:
        return False
    shares = [np.nanmedian(track_object(np.asarray(v))["area"]) / (v.shape[1] * v.shape[2]) for v in reference[:16]]
    return bool(np.nanmedian(shares) <= TRACKER_MAX_AREA)


def frame_change(videos) -> float:
    """Mean |v[t+1] - v[t]| over all pixels and frame pairs, on the 0-255 scale."""
    diffs = [np.abs(np.diff(np.asarray(v, dtype=np.float32), axis=0)).mean() for v in videos if len(v) > 1]
    return float(np.mean(diffs)) if diffs else float("nan")


def fvd(det: Detector, samples: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet video distance: I3D features of uint8 clips [N, T, H, W, 3]."""
    return frechet_distance(video_features(det, samples), video_features(det, reference))


def fid(det: Detector, samples: np.ndarray, reference: np.ndarray, max_frames: int, seed: int) -> tuple[float, int]:
    """Fréchet Inception distance over frames of the clips (at most `max_frames` from each set, drawn
    with `seed`) -> (FID, frames per set)."""
    a, b = (np.asarray(v).reshape(-1, *np.asarray(v).shape[2:]) for v in (samples, reference))
    n = min(len(a), len(b), max_frames)

    def pick(x):  # the same draw for both sets: identical sets give identical frames
        return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]

    a, b = pick(a), pick(b)
    return frechet_distance(frame_features(det, a), frame_features(det, b)), n


def _clean(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def weight_free(samples, reference, *, sample_latents=None, reference_latents=None, prompts=None,
                pixels: bool = True) -> list[dict]:
    """Rows for the metrics that need no downloaded weights. `samples`/`reference`: uint8 clips
    [T, H, W, 3] of one size; latents: whitened [N, C, T, h, w] (latent FD when both are given);
    `prompts`: one per sample in `data.synthetic.caption_text` form (prompt adherence);
    `pixels=False`: latents only (no decoded clips)."""
    rows = []
    if sample_latents is not None and reference_latents is not None:
        rows.append({"metric": "latent_fd", "value": frechet_distance(clip_features(sample_latents),
                                                                      clip_features(reference_latents))})
    if not pixels:
        return rows
    change_s, change_r = frame_change(samples), frame_change(reference)
    rows.append({"metric": "flicker_ratio", "value": change_s / change_r if change_r else None,
                 "samples_frame_change": change_s, "reference_frame_change": change_r})
    data_own = video_quality(reference, reference)
    if one_small_object(reference, data_own):
        got = video_quality(samples, reference)
        rows += [{"metric": f"tracker/{k}", "value": _clean(got[k]), "data_value": _clean(data_own[k])}
                 for k in TRACKER_KEYS]  # fmt: skip
        rows.append({"metric": "tracker/videos_tracked", "value": got["videos_tracked"]})
    if prompts and all(prompts):
        try:
            adherence = prompt_adherence(samples, prompts)
        except ValueError:  # prompts not in the synthetic caption form: nothing to check them with
            adherence = None
        if adherence:
            rows += [{"metric": f"prompt/{k}", "value": _clean(adherence[k])}
                     for k in ("colour", "shape", "direction", "direction_near", "all")]  # fmt: skip
    return rows


def with_detectors(samples: np.ndarray, reference: np.ndarray, *, i3d: Detector | None = None,
                   inception: Detector | None = None, fid_frames: int = 2048, seed: int = 0) -> list[dict]:
    """FVD / FID rows for the detectors given (a skipped row, value None, for each one missing)."""
    rows = []
    if i3d is None:
        rows.append({"metric": "fvd", "value": None, "skipped": "no I3D file given (--i3d)"})
    else:
        rows.append({"metric": "fvd", "value": fvd(i3d, samples, reference), "detector_sha256": i3d.sha256,
                     "detector_pinned": i3d.pinned})
    if inception is None:
        rows.append({"metric": "fid", "value": None, "skipped": "no Inception file given (--inception)"})
    else:
        value, frames = fid(inception, samples, reference, fid_frames, seed)
        rows.append({"metric": "fid", "value": value, "frames_per_set": frames, "detector_sha256": inception.sha256,
                     "detector_pinned": inception.pinned})
    return rows

