"""Tests for data/synthetic.py and scripts/make_synthetic.py: determinism, visible smooth motion,
the on-disk H.264 dataset in class folders, and the motion metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.discovery import discover
from data.synthetic import (
    BACKGROUND,
    SYNTHETIC_CLASSES,
    SyntheticVideoDataset,
    make_synthetic_video,
    mean_speed,
    object_centres,
    path_smoothness,
    write_synthetic,
)
from data.video_io import read_video, video_codec
from scripts import make_synthetic


def object_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels at least half-covered by the object (anti-aliased edges partly excluded)."""
    return np.abs(frame.astype(int) - BACKGROUND).max(-1) > 120


def test_deterministic_per_seed_and_index():
    a, la = make_synthetic_video(4, num_frames=6, size=32, seed=3)
    b, lb = make_synthetic_video(4, num_frames=6, size=32, seed=3)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    assert (a == b).all() and la == lb == 4 % len(SYNTHETIC_CLASSES)
    assert not (a == make_synthetic_video(5, num_frames=6, size=32, seed=3)[0]).all()
    assert not (a == make_synthetic_video(4, num_frames=6, size=32, seed=4)[0]).all()
    assert [make_synthetic_video(i, num_frames=2, size=16)[1] for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_classes_are_sorted_shapes():
    assert SYNTHETIC_CLASSES == sorted(SYNTHETIC_CLASSES) and len(set(SYNTHETIC_CLASSES)) >= 3


def test_object_moves_smoothly_and_scales_with_size():
    for index in range(6):
        frames, _ = make_synthetic_video(index, num_frames=16, size=64)
        assert (frames[:, 0, 0] == BACKGROUND).all()
        c = object_centres(frames)
        assert np.isfinite(c).all()
        assert mean_speed(c) > 1.5  # pixels per frame: clearly visible motion
        assert not (frames[0] == frames[-1]).all()
        assert path_smoothness(c) < 0.5  # constant velocity apart from bounces
    small, large = (
        object_mask(make_synthetic_video(0, num_frames=1, size=s)[0][0]).mean() for s in (32, 128)
    )
    assert small == pytest.approx(large, rel=0.15)  # object area is a fixed fraction of the frame


def test_shapes_differ_between_classes():
    """Same random draws (seed, index) differ only in label; compare filled fractions of the
    object's bounding box: circle ~ 0.79, square 1.0, triangle ~ 0.5."""
    fills = {}
    for index in range(3):
        frame = make_synthetic_video(index, num_frames=1, size=96)[0][0]
        mask = object_mask(frame)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills[SYNTHETIC_CLASSES[index]] = mask.sum() / box
    assert fills["square"] > 0.9 and 0.7 < fills["circle"] < 0.88 and fills["triangle"] < 0.6


def test_metrics_on_known_paths():
    t = np.arange(10, dtype=float)
    line = np.stack([2 * t, 5 + t], axis=1)
    assert path_smoothness(line) == pytest.approx(0.0, abs=1e-12)
    assert mean_speed(line) == pytest.approx(np.sqrt(5))
    jitter = np.random.default_rng(0).uniform(0, 64, (16, 2))
    assert path_smoothness(jitter) > 1.0
    assert np.isnan(path_smoothness(np.full((5, 2), np.nan)))
    blank = np.zeros((3, 8, 8, 3), np.uint8)
    blank[1, 2:4, 4:6] = 255  # object only in frame 1, pixels x 4-5, y 2-3
    c = object_centres(blank)
    assert np.isnan(c[0]).all() and c[1].tolist() == [4.5, 2.5] and np.isnan(c[2]).all()


def test_dataset_items():
    ds = SyntheticVideoDataset(5, num_frames=4, size=16, seed=1)
    item = ds[2]
    assert len(ds) == 5 and item["label"] == 2
    assert item["video"].shape == (3, 4, 16, 16) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert torch.equal(item["video"], ds[2]["video"])
    with pytest.raises(IndexError):
        ds[5]


def test_write_synthetic_is_h264_in_class_folders_and_idempotent(tmp_path):
    paths = write_synthetic(tmp_path, 4, num_frames=5, size=32, fps=8, seed=0)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "circle/video_00000.mp4",
        "square/video_00001.mp4",
        "triangle/video_00002.mp4",
        "circle/video_00003.mp4",
    ]
    frames, fps = read_video(paths[1])
    assert frames.shape == (5, 32, 32, 3) and fps == pytest.approx(8.0) and video_codec(paths[1]) == "h264"
    original = make_synthetic_video(1, num_frames=5, size=32)[0]
    assert np.abs(frames.astype(int) - original).mean() < 3
    items, classes = discover(tmp_path)
    assert classes == SYNTHETIC_CLASSES[:3] and [it.label for it in items] == [0, 0, 1, 2]

    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[2].write_bytes(b"broken")  # an incomplete file is rewritten, complete ones are kept
    assert write_synthetic(tmp_path, 4, num_frames=5, size=32, fps=8) == paths
    assert [p.stat().st_mtime_ns for p in paths][:2] == stamps[:2]
    assert read_video(paths[2])[0].shape == (5, 32, 32, 3)


def test_make_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        make_synthetic.main(["--output-dir", str(out), "--num-videos", "3", "--frames", "4", "--size", "16"])
        == 0
    )
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert files == ["circle/video_00000.mp4", "square/video_00001.mp4", "triangle/video_00002.mp4"]
    assert all(
        video_codec(out / f) == "h264" and read_video(out / f)[0].shape == (4, 16, 16, 3) for f in files
    )
    assert "wrote 3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        make_synthetic.main(["--help"])
    assert info.value.code == 0 and "--output-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_synthetic.main(["--output-dir", str(out), "--num-videos", "0"])


def test_motion_summary_counts_jumps_at_the_generated_size():
    """A square moving 1 px per frame with one 6 px teleport: 1 jump in 7 moves; the same video
    upscaled x4 and measured at size 32 gives the same figures; a video without the object is left out."""
    from data.synthetic import motion_summary

    xs = [4, 5, 6, 7, 13, 14, 15, 16]
    video = np.zeros((len(xs), 32, 32, 3), np.uint8)
    for t, x in enumerate(xs):
        video[t, 10:14, x : x + 4] = 255
    empty = np.zeros_like(video)
    m = motion_summary([video, empty])
    assert m["videos"] == 1 and m["jump_rate"] == pytest.approx(1 / 7) and m["speed_px"] == pytest.approx(12 / 7)
    big = video.repeat(4, axis=1).repeat(4, axis=2)
    assert motion_summary([big], size=32) == pytest.approx(m)
    assert motion_summary([big])["speed_px"] == pytest.approx(4 * 12 / 7)  # at its own 128 px width
    assert np.isnan(motion_summary([empty])["smoothness"])
