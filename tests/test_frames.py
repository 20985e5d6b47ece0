"""Tests for data/transforms.py, data/clips.py and data/frames.py: crop/resize shapes and content,
tensor conversion, clip arithmetic, and the reproducible, bad-file-tolerant datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.clips import clip_span, clip_starts, stride_for_fps
from data.errors import BadInputError
from data.frames import ClipDataset, FrameDataset, seed_worker
from data.synthetic import make_synthetic_video
from data.transforms import center_crop, random_crop, resize_and_crop, resize_short_side, to_tensor, to_uint8
from data.video_io import read_video, write_png, write_video

# ----------------------------------------------------------------------------- transforms


def coords(t: int, h: int, w: int) -> np.ndarray:
    """Frames whose R channel is the row, G the column and B the frame index."""
    y, x = np.mgrid[0:h, 0:w]
    one = np.stack([y, x, np.zeros_like(y)], axis=-1)
    frames = np.repeat(one[None], t, axis=0)
    frames[..., 2] = np.arange(t)[:, None, None]
    return frames.astype(np.uint8)


def test_resize_short_side_shapes():
    assert resize_short_side(np.zeros((3, 40, 80, 3), np.uint8), 20).shape == (3, 20, 40, 3)
    assert resize_short_side(np.zeros((90, 30, 3), np.uint8), 10).shape == (30, 10, 3)
    assert resize_short_side(np.zeros((2, 8, 12, 3), np.uint8), 16).shape == (2, 16, 24, 3)
    flat = np.full((1, 40, 60, 3), 77, np.uint8)
    assert (resize_short_side(flat, 20) == 77).all()  # area interpolation keeps flat colour


def test_crops_take_the_right_window():
    frames = coords(2, 10, 16)
    c = center_crop(frames, 4)
    assert c.shape == (2, 4, 4, 3) and c[0, 0, 0, :2].tolist() == [3, 6] and c[1, 0, 0, 2] == 1
    assert center_crop(frames[0], (2, 6))[0, 0, :2].tolist() == [4, 5]
    r1 = random_crop(frames, 4, np.random.default_rng(5))
    r2 = random_crop(frames, 4, np.random.default_rng(5))
    assert np.array_equal(r1, r2) and r1.shape == (2, 4, 4, 3)
    top, left = r1[0, 0, 0, :2]
    assert np.array_equal(r1, frames[:, top : top + 4, left : left + 4])  # same window in every frame
    corners = {tuple(random_crop(frames, 4, np.random.default_rng(s))[0, 0, 0, :2]) for s in range(20)}
    assert len(corners) > 5
    with pytest.raises(ValueError):
        center_crop(frames, 11)


def test_resize_and_crop_is_square():
    frames = coords(3, 30, 50)
    out = resize_and_crop(frames, 16)
    assert out.shape == (3, 16, 16, 3)
    assert resize_and_crop(frames, 16, random=True, rng=np.random.default_rng(0)).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError):
        resize_and_crop(frames, 16, random=True)


def test_tensor_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    x = to_tensor(frames)
    assert x.shape == (3, 4, 6, 5) and x.dtype == torch.float32
    assert x[0, 1, 2, 3] == pytest.approx(frames[1, 2, 3, 0] / 127.5 - 1)  # channel 0 = R
    assert to_tensor(np.zeros((2, 2, 3), np.uint8)).shape == (3, 2, 2)
    assert np.array_equal(to_uint8(x), frames)
    batch = torch.stack([x, x.flip(0)])
    back = to_uint8(batch)
    assert back.shape == (2, 4, 6, 5, 3) and np.array_equal(back[1], frames[..., ::-1])
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0]).view(3, 1, 1, 1)).ravel().tolist() == [0, 255, 128]


# ----------------------------------------------------------------------------- clips


def test_stride_for_fps():
    assert stride_for_fps(30, 8) == 4 and stride_for_fps(24, 8) == 3 and stride_for_fps(25, 8) == 3
    assert stride_for_fps(5, 8) == 1 and stride_for_fps(30, None) == 1
    with pytest.raises(ValueError):
        stride_for_fps(0, 8)


def test_clip_starts():
    assert clip_span(4, 2) == 7
    assert clip_starts(22, 4, 2) == [0, 7, 14]  # non-overlapping, last fits (14 + 7 = 21 <= 22)
    assert clip_starts(22, 4, 2, max_clips=2) == [0, 7]
    assert clip_starts(22, 4, 2, mode="uniform", max_clips=3) == [0, 8, 15]
    rng_starts = clip_starts(100, 4, 2, mode="random", max_clips=5, rng=np.random.default_rng(0))
    assert rng_starts == clip_starts(100, 4, 2, mode="random", max_clips=5, rng=np.random.default_rng(0))
    assert len(rng_starts) == 5 and all(0 <= s <= 93 for s in rng_starts)
    assert clip_starts(7, 4, 2) == [0]
    with pytest.raises(ValueError, match="video has 6 frames; a clip of 4 frames with stride 2 needs 7"):
        clip_starts(6, 4, 2)
    with pytest.raises(ValueError):
        clip_starts(20, 4, 1, mode="random")
    with pytest.raises(ValueError):
        clip_starts(20, 4, 1, mode="sideways")


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of tiny mp4s, one image, one corrupt video."""
    root = tmp_path_factory.mktemp("data")
    for i in range(4):
        frames, _ = make_synthetic_video(i, num_frames=6, size=24)
        write_video(root / ("a" if i % 2 else "b") / f"v{i}.mp4", frames, fps=8)
    write_png(root / "a" / "still.png", make_synthetic_video(9, num_frames=1, size=20)[0][0])
    (root / "b" / "corrupt.mp4").write_bytes(b"not a video" * 50)
    return root


def test_frame_dataset_reproducible_per_seed_and_epoch():
    kwargs = dict(size=16, synthetic_videos=12, synthetic_frames=8, frames_per_video=3, seed=7)
    ds, same = FrameDataset("synthetic", **kwargs), FrameDataset("synthetic", **kwargs)
    assert len(ds) == 3 * len(ds.items) and ds.class_names == ["circle", "square", "triangle"]
    item = ds[4]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1 and item["label"] == ds.items[1].label
    assert all(torch.equal(ds[i]["image"], same[i]["image"]) for i in range(len(ds)))
    before = [ds[i]["image"] for i in range(len(ds))]
    ds.set_epoch(1)
    after = [ds[i]["image"] for i in range(len(ds))]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(ds) // 2  # new random frames
    ds.set_epoch(0)
    assert torch.equal(ds[4]["image"], before[4])


def test_frame_dataset_splits_are_disjoint_and_complete():
    train = FrameDataset(
        "synthetic", split="train", val_fraction=0.25, synthetic_videos=40, frames_per_video=1
    )
    val = FrameDataset("synthetic", split="val", val_fraction=0.25, synthetic_videos=40, frames_per_video=1)
    names_t, names_v = {it.relpath for it in train.items}, {it.relpath for it in val.items}
    assert not names_t & names_v and len(names_t | names_v) == 40 and 4 <= len(names_v) <= 16


def test_frame_dataset_skips_a_corrupt_file(folder, caplog):
    ds = FrameDataset(folder, size=16, split="all", frames_per_video=2, seed=0)
    assert ds.class_names == ["a", "b"] and len(ds) == 5 * 2 + 1
    corrupt = [i for i in range(len(ds)) if ds.items[ds._entries[i]].path.name == "corrupt.mp4"]
    assert len(corrupt) == 2
    got = [ds[i] for i in range(len(ds))]
    assert all(g["image"].shape == (3, 16, 16) for g in got)
    assert ds.skipped == [str(folder / "b" / "corrupt.mp4")]  # logged and recorded once
    assert sum("corrupt.mp4" in r.getMessage() for r in caplog.records) == 1
    nxt = corrupt[-1] + 1  # the fallback is the next index's sample
    assert torch.equal(got[corrupt[-1]]["image"], ds[nxt % len(ds)]["image"])
    assert torch.equal(
        ds[corrupt[0]]["image"],
        FrameDataset(folder, size=16, split="all", frames_per_video=2)[corrupt[0]]["image"],
    )
    labels = {ds.items[ds._entries[i]].path.name: got[i]["label"] for i in range(len(ds)) if i not in corrupt}
    assert labels == {"v1.mp4": 0, "v3.mp4": 0, "still.png": 0, "v0.mp4": 1, "v2.mp4": 1}


def test_frame_dataset_all_bad_raises(tmp_path):
    for name in ("x.mp4", "y.mp4"):
        (tmp_path / name).write_bytes(b"")
    ds = FrameDataset(tmp_path, split="all", frames_per_video=1)
    with pytest.raises(BadInputError, match="every item"):
        ds[0]
    assert sorted(ds.skipped) == [str(tmp_path / "x.mp4"), str(tmp_path / "y.mp4")]


def test_frame_dataset_frame_comes_from_the_video(folder):
    """A sample is exactly one of the video's decoded frames (no crop at this size), and the
    frames_per_video samples of a video do not all pick the same frame."""
    ds = FrameDataset(folder, size=24, split="all", frames_per_video=4, random_crop=False)
    entries = [i for i in range(len(ds)) if ds.items[ds._entries[i]].path.name == "v0.mp4"]
    decoded = read_video(folder / "b" / "v0.mp4")[0]
    picked = set()
    for i in entries:
        image = to_uint8(ds[i]["image"])
        matches = [t for t, f in enumerate(decoded) if np.array_equal(f, image)]
        assert len(matches) >= 1
        picked.add(matches[0])
    assert len(picked) > 1


def test_clip_dataset(folder):
    ds = ClipDataset(folder, clip_len=3, stride=2, size=16, split="all")
    assert len(ds) == 5  # images are ignored
    items = [ds[i] for i in range(len(ds))]
    assert all(it["video"].shape == (3, 3, 16, 16) for it in items) and ds.skipped == [
        str(folder / "b/corrupt.mp4")
    ]
    assert torch.equal(
        items[0]["video"], ClipDataset(folder, clip_len=3, stride=2, size=16, split="all")[0]["video"]
    )
    too_long = ClipDataset(folder, clip_len=4, stride=2, size=16, split="all")  # needs 7 > 6 frames
    with pytest.raises(BadInputError, match="every item"):
        too_long[0]
    syn = ClipDataset(
        "synthetic", clip_len=4, stride=2, size=16, synthetic_videos=6, synthetic_frames=8, split="all"
    )
    frames = make_synthetic_video(1, num_frames=8, size=16)[0]
    assert torch.equal(syn[1]["video"], to_tensor(frames[0:8:2])) and syn[1]["label"] == 1


def test_seed_worker_seeds_numpy_from_torch():
    torch.manual_seed(123)
    seed_worker(0)
    a = np.random.rand()
    torch.manual_seed(123)
    seed_worker(0)
    assert np.random.rand() == a
