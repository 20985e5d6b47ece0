"""Tests for data/video_io.py and data/errors.py: readers on files from our writer and from
cv2.VideoWriter, every kind of bad input, image modes, and the atomic verified writers."""

from __future__ import annotations

import os
import pickle

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from data import video_io
from data.errors import BadInputError, VideoWriteError
from data.video_io import (
    count_frames,
    make_grid,
    read_image,
    read_video,
    video_codec,
    video_info,
    write_png,
    write_png_frames,
    write_video,
)

T, H, W = 8, 32, 32


def moving_red_disc(t=T, h=H, w=W) -> np.ndarray:
    """RGB frames: a pure red disc moving right on black."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        cv2.circle(frames[i], (6 + 2 * i, h // 2), 5, (255, 0, 0), -1, cv2.LINE_AA)
    return frames


def brightness_ramp(t: int = 10) -> np.ndarray:
    """Frame i is grey 20 + 20 i plus texture (so frames are big, not just header), which
    identifies the index of each decoded frame by its mean."""
    noise = np.random.default_rng(0).integers(-10, 11, (t, H, W, 3))
    return (20 + 20 * np.arange(t)[:, None, None, None] + noise).clip(0, 255).astype(np.uint8)


def cv2_write(path, frames_rgb: np.ndarray, fourcc: str, fps: float = 8.0) -> None:
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames_rgb.shape[2], frames_rgb.shape[1])
    )
    assert writer.isOpened(), f"this OpenCV build cannot write {fourcc} {path}"
    for f in frames_rgb:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def mp4_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("mp4") / "clip.mp4", moving_red_disc(), fps=8.0)


# ----------------------------------------------------------------------------- errors


def test_bad_input_error_message_and_pickle():
    e = BadInputError("/data/a.mp4", "empty file (0 bytes)")
    assert str(e) == "/data/a.mp4: empty file (0 bytes)"
    back = pickle.loads(pickle.dumps(e))
    assert (
        type(back) is BadInputError and (back.path, back.reason) == (e.path, e.reason) and str(back) == str(e)
    )


# ----------------------------------------------------------------------------- our writer -> readers


def test_mp4_round_trip_is_h264_rgb_and_atomic(mp4_file):
    frames, fps = read_video(mp4_file)
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8 and fps == pytest.approx(8.0)
    assert video_codec(mp4_file) == "h264"
    with av.open(str(mp4_file)) as f:  # browsers play H.264 in yuv420p only
        assert f.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert np.abs(frames.astype(int) - moving_red_disc().astype(int)).mean() < 4
    r, g, b = frames[0, H // 2, 6].astype(int)  # disc centre: red stays red (no BGR mix-up)
    assert r > 200 and g < 60 and b < 60
    assert count_frames(mp4_file) == T
    assert video_info(mp4_file) == {"fps": pytest.approx(8.0), "num_frames": T, "height": H, "width": W}
    assert sorted(os.listdir(mp4_file.parent)) == ["clip.mp4"]  # no temporary file left behind


def test_odd_size_is_padded_to_even(tmp_path):
    frames = moving_red_disc(5, 33, 27)
    path = write_video(tmp_path / "odd.mp4", frames, fps=10)
    got, _ = read_video(path)
    assert got.shape == (5, 34, 28, 3) and video_codec(path) == "h264"
    # the padding replicates the last row / column
    assert np.abs(got[:, -1].astype(int) - got[:, -2].astype(int)).mean() < 6


def test_gif_round_trip_counts_merged_duplicates(tmp_path):
    frames = moving_red_disc()
    path = write_video(tmp_path / "a.gif", frames, fps=8)
    with Image.open(path) as im:
        assert im.n_frames == T and im.size == (W, H)
    dup = np.concatenate([frames[:2], frames[1:2], frames[2:4]])  # frame 1 twice in a row
    path = write_video(tmp_path / "dup.gif", dup, fps=8)
    with Image.open(path) as im:
        assert im.n_frames == 4  # Pillow merges identical neighbours; we expect that, not an error


def test_webm_round_trip(tmp_path):
    path = write_video(tmp_path / "a.webm", moving_red_disc(), fps=8)
    assert video_codec(path) == "vp9" and read_video(path)[0].shape == (T, H, W, 3)


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(
        video_io, "video_info", lambda p: {"fps": 8.0, "num_frames": 1, "height": H, "width": W}
    )
    with pytest.raises(VideoWriteError, match="reads back as"):
        write_video(tmp_path / "x.mp4", moving_red_disc(), fps=8)
    assert os.listdir(tmp_path) == []


def test_write_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=8)
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="unsupported"):
        write_video(tmp_path / "x.flv", moving_red_disc(), fps=8)


# ----------------------------------------------------------------------------- OpenCV-written files


@pytest.mark.parametrize(
    "name,fourcc", [("a.mp4", "mp4v"), ("a.avi", "MJPG"), ("a.webm", "VP90"), ("a.mkv", "VP90")]
)
def test_reads_files_written_by_opencv(tmp_path, name, fourcc):
    path = tmp_path / name
    cv2_write(path, moving_red_disc(), fourcc)
    frames, fps = read_video(path)
    assert frames.shape == (T, H, W, 3) and fps == pytest.approx(8.0)
    r, g, b = frames[3, H // 2, 12].astype(int)  # disc centre in frame 3
    assert r > 180 and g < 80 and b < 80


def test_start_stride_num_frames_pick_the_right_frames(tmp_path):
    path = tmp_path / "ramp.avi"
    cv2_write(path, brightness_ramp(10), "MJPG")
    frames, _ = read_video(path, start=1, stride=3, num_frames=3)
    levels = np.round((frames.reshape(3, -1).mean(1) - 20) / 20).astype(int)
    assert levels.tolist() == [1, 4, 7]
    assert len(read_video(path, start=4)[0]) == 6
    with pytest.raises(BadInputError, match=r"only 3 frames from start 1 with stride 3, need 4") as info:
        read_video(path, start=1, stride=3, num_frames=4)
    assert info.value.path == str(path)
    with pytest.raises(BadInputError, match="none at or after start 10"):
        read_video(path, start=10)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_empty_and_not_a_video(tmp_path):
    with pytest.raises(BadInputError, match="file not found") as info:
        read_video(tmp_path / "nope.mp4")
    assert str(tmp_path / "nope.mp4") in str(info.value)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty file"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video at all\n" * 20)
    with pytest.raises(BadInputError, match="cannot open as a video") as info:
        read_video(tmp_path / "text.mp4")
    assert info.value.path == str(tmp_path / "text.mp4")
    with pytest.raises(BadInputError, match="is a folder"):
        count_frames(tmp_path)


def test_truncated_mp4(mp4_file, tmp_path):
    """Our mp4s are faststart (index first); cut in half, OpenCV opens them but decodes nothing."""
    data = mp4_file.read_bytes()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="no decodable frames") as info:
        read_video(half)
    assert info.value.path == str(half)
    with pytest.raises(BadInputError):
        count_frames(half)


def test_truncated_avi_decodes_fewer_frames(tmp_path):
    """A cut MJPG avi still decodes its first frames: asking for the full clip must fail."""
    path = tmp_path / "cut.avi"
    noise = np.random.default_rng(0).integers(0, 256, (10, 96, 96, 3), dtype=np.uint8)  # big frames
    cv2_write(path, noise, "MJPG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    n = count_frames(path)
    assert 0 < n < 10
    assert len(read_video(path)[0]) == n
    with pytest.raises(BadInputError, match=f"only {n} frames from start 0 with stride 1, need 10"):
        read_video(path, num_frames=10)


def test_zero_frame_video(tmp_path):
    path = tmp_path / "zero.avi"
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8, (W, H)).release()
    assert path.stat().st_size > 0  # a valid container with no frames
    with pytest.raises(BadInputError, match="no decodable frames"):
        read_video(path)


def test_unreadable_file(mp4_file, tmp_path, monkeypatch):
    path = tmp_path / "locked.mp4"
    path.write_bytes(mp4_file.read_bytes())
    path.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(BadInputError, match="permission denied"):
                read_video(path)
        else:  # root ignores file modes: the file reads; simulate the OS refusing instead
            assert len(read_video(path)[0]) == T

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(video_io, "open", refuse, raising=False)
            with pytest.raises(BadInputError, match="permission denied") as info:
                read_video(path)
            assert info.value.path == str(path)
    finally:
        path.chmod(0o644)


def test_fps_fallback():
    assert video_io._valid_fps(25.0) == 25.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), 90000.0, None):
        assert video_io._valid_fps(bad) == video_io.DEFAULT_FPS == 30.0


def test_read_video_rejects_bad_arguments(mp4_file):
    for kwargs in ({"start": -1}, {"stride": 0}, {"num_frames": 0}):
        with pytest.raises(ValueError):
            read_video(mp4_file, **kwargs)


def test_non_utf8_video_name(mp4_file, tmp_path):
    path = tmp_path / os.fsdecode(b"caf\xe9-\xff.mp4")
    path.write_bytes(mp4_file.read_bytes())
    assert read_video(path)[0].shape == (T, H, W, 3)


# ----------------------------------------------------------------------------- images


def test_read_image_modes(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 2] = 10, 200  # OpenCV order: B=10, R=200
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    assert read_image(tmp_path / "c.png")[0, 0].tolist() == [200, 0, 10]

    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    got = read_image(tmp_path / "g.png")
    assert got.shape == (4, 5, 3) and (got == gray[..., None]).all()

    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., :3] = (50, 100, 200)
    bgra[..., 3] = [[255, 128], [0, 64]]
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    got = read_image(tmp_path / "a.png").astype(int)
    for (y, x), a in {(0, 0): 255, (0, 1): 128, (1, 0): 0, (1, 1): 64}.items():  # over black
        assert got[y, x].tolist() == [round(c * a / 255) for c in (200, 100, 50)]

    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), np.stack([deep] * 3, axis=-1))
    got = read_image(tmp_path / "d.png")
    assert got.dtype == np.uint8 and got[0, :, 0].tolist() == [0, 100, 255]
    cv2.imwrite(str(tmp_path / "d1.png"), deep)  # 16-bit gray
    assert read_image(tmp_path / "d1.png")[0, :, 1].tolist() == [0, 100, 255]


def test_float_image_conversion():
    img = np.array([[[0.0, 0.5, 1.5]]], np.float32)  # BGR, out of range clipped
    assert video_io.to_rgb_uint8(img).tolist() == [[[255, 128, 0]]]


def test_read_image_bad_and_unicode(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BadInputError, match="cannot decode") as info:
        read_image(tmp_path / "bad.png")
    assert info.value.path == str(tmp_path / "bad.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        read_image(tmp_path / "empty.jpg")
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    for name in ("bild-ä-图.png", os.fsdecode(b"raw-\xff.png")):
        write_png(tmp_path / name, img)
        assert (read_image(tmp_path / name) == img).all()


def test_png_that_does_not_read_back_is_refused_and_not_left(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io.cv2, "imdecode", lambda *a: None)  # as if the bytes on disk were damaged
    with pytest.raises(VideoWriteError, match="reads back"):
        write_png(tmp_path / "x.png", np.zeros((4, 5, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_png_frames_and_grid(tmp_path):
    frames = moving_red_disc(3, 8, 10)
    paths = write_png_frames(tmp_path / "f", frames)
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert all((read_image(p) == f).all() for p, f in zip(paths, frames))
    assert len(write_png_frames(tmp_path / "f", frames[:2])) == 2  # a shorter clip into the same folder
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    images = np.stack([np.full((8, 10, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=3, pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 12 + 2, 3)
    assert grid[2, 2, 0] == 10 and grid[2, 14, 0] == 20 and grid[12, 14, 0] == 50  # row-major
    assert grid[0, 0, 0] == 0 and grid[12, 26, 0] == 0  # padding and the empty sixth cell
