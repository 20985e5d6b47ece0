"""Video and image files <-> uint8 RGB arrays: OpenCV readers that trust decoded frames, and
atomic, verified writers (H.264 mp4 / VP9 webm via PyAV, GIF via Pillow, PNG via OpenCV)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

from .errors import BadInputError, VideoWriteError
from .files import atomic_write

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_FPS = 30.0  # used when a file's fps metadata is missing, zero, NaN or absurd
_CODEC_ALIASES = {
    "avc1": "h264",
    "avc3": "h264",
    "x264": "h264",
    "vp90": "vp9",
    "vp09": "vp9",
    "fmp4": "mp4v",
}


# ----------------------------------------------------------------------------- helpers


def _check_file(path) -> Path:
    """Fail early, with a clear reason, for missing, empty or unreadable files."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise BadInputError(path, f"broken symbolic link (to {os.readlink(path)}, which does not resolve)")
        raise BadInputError(path, "file not found")
    if path.is_dir():
        raise BadInputError(path, "is a folder, not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except PermissionError:
        raise BadInputError(path, "permission denied (cannot read the file)") from None
    except OSError as e:
        raise BadInputError(path, f"cannot read the file ({e.strerror})") from None
    if not head:
        raise BadInputError(path, "empty file (0 bytes)")
    return path


@contextmanager
def _cv2_path(path: Path) -> Iterator[str]:
    """OpenCV wants UTF-8 paths; a non-UTF-8 name is reached through a temporary ASCII symlink."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="lvd-") as tmp:
            alias = os.path.join(tmp, "input" + path.suffix.encode("ascii", "replace").decode())
            os.symlink(os.path.abspath(path), alias)
            yield alias
        return
    yield name


@contextmanager
def _capture(path: Path) -> Iterator[cv2.VideoCapture]:
    with _cv2_path(path) as name:
        cap = cv2.VideoCapture(name)
        try:
            if not cap.isOpened():
                raise BadInputError(
                    path, "cannot open as a video (not a video file, or a codec OpenCV lacks)"
                )
            yield cap
        finally:
            cap.release()


def _valid_fps(value) -> float:
    """A file's fps, or DEFAULT_FPS when the metadata is unusable (<=0, NaN, inf, > 1000)."""
    try:
        fps = float(value)
    except (TypeError, ValueError):
        return DEFAULT_FPS
    return fps if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS


def _unit_float(img: np.ndarray) -> np.ndarray:
    """Any bit depth -> float32 in [0, 1] (16-bit / 65535, so 8-bit values come out as x/257)."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if np.issubdtype(img.dtype, np.integer):
        return np.clip(img.astype(np.float32) / np.iinfo(img.dtype).max, 0.0, 1.0)
    return np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0)  # float images: assumed [0, 1]


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """OpenCV's BGR/gray/BGRA image of any depth -> uint8 [H,W,3] RGB.

    Alpha is composited over black (transparent pixels become black, like padding in a video).
    """
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype == np.uint8 and img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.dtype == np.uint8 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x = _unit_float(img if img.ndim == 3 else img[:, :, None])
    channels = x.shape[2]
    if channels in (2, 4):  # gray+alpha or BGRA: premultiply = composite over black
        x = x[:, :, : channels - 1] * x[:, :, channels - 1 :]
    x = x[:, :, :3]
    x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, ::-1]  # gray -> RGB, BGR -> RGB
    return np.ascontiguousarray(np.round(x * 255.0).astype(np.uint8))


# ----------------------------------------------------------------------------- readers


def read_video(
    path, *, start: int = 0, stride: int = 1, num_frames: int | None = None, transform=None, info: dict | None = None
) -> tuple[np.ndarray, float]:
    """Decode frames start, start+stride, ... (num_frames of them, or all) -> (uint8 [T,H,W,3] RGB, fps).

    Decodes sequentially and trusts what decodes, never CAP_PROP_FRAME_COUNT. Skipped frames are
    only grabbed (not converted). `transform` (uint8 [H,W,3] -> uint8 [h,w,3], e.g. a resize and
    crop) is applied to each frame as it is decoded, so memory holds only transformed frames (a long
    1080p file is never held whole); `info`, when given, receives the original `size` [H, W].
    Any unusable file raises BadInputError naming it.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            f"need start >= 0, stride >= 1, num_frames >= 1; got {start}, {stride}, {num_frames}"
        )
    path = _check_file(path)
    frames: list[np.ndarray] = []
    decoded, size = 0, None
    with _capture(path) as cap:
        fps = _valid_fps(cap.get(cv2.CAP_PROP_FPS))
        while num_frames is None or len(frames) < num_frames:
            if not cap.grab():
                break
            if decoded >= start and (decoded - start) % stride == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                if size is None:
                    size = frame.shape[:2]
                elif frame.shape[:2] != size:
                    raise BadInputError(path, "frame size changes within the video")
                frame = to_rgb_uint8(frame)
                frames.append(frame if transform is None else transform(frame))
            decoded += 1
    if decoded == 0:
        raise BadInputError(path, "no decodable frames (truncated or corrupt video?)")
    if num_frames is not None and len(frames) < num_frames:
        raise BadInputError(
            path,
            f"only {len(frames)} frames from start {start} with stride {stride}, need {num_frames} "
            f"(the file decodes to {decoded} frames)",
        )
    if not frames:
        raise BadInputError(path, f"only {decoded} decodable frames, none at or after start {start}")
    if info is not None:
        info["size"] = list(size)
    return np.stack(frames), fps


def count_frames(path) -> int:
    """Number of frames that actually decode (grab() until it fails). Zero frames is a BadInputError."""
    return video_info(path)["num_frames"]


def video_info(path) -> dict:
    """dict(fps, num_frames (decoded, not metadata), height, width (of the first decoded frame))."""
    path = _check_file(path)
    count, height, width = 0, 0, 0
    with _capture(path) as cap:
        fps = _valid_fps(cap.get(cv2.CAP_PROP_FPS))
        while cap.grab():
            if count == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                height, width = frame.shape[:2]
            count += 1
    if count == 0:
        raise BadInputError(path, "no decodable frames (truncated or corrupt video?)")
    return {"fps": fps, "num_frames": count, "height": height, "width": width}


def video_codec(path) -> str:
    """The video stream's fourcc as OpenCV reports it, lower-case ('avc1' -> 'h264', 'vp90' -> 'vp9')."""
    path = _check_file(path)
    with _capture(path) as cap:
        code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    name = code.to_bytes(4, "little").decode("latin-1").strip("\x00 ").lower()
    return _CODEC_ALIASES.get(name, name)


def read_image(path) -> np.ndarray:
    """Image file -> uint8 [H,W,3] RGB. Gray -> RGB, alpha composited over black, 16-bit / 257.

    Reads bytes with numpy and decodes with cv2.imdecode, so any file name works. EXIF
    orientation is ignored (IMREAD_UNCHANGED).
    """
    path = _check_file(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BadInputError(path, f"cannot read the file ({e.strerror})") from None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise BadInputError(path, "cannot decode as an image (corrupt or unsupported format)")
    return to_rgb_uint8(img)


# ----------------------------------------------------------------------------- writers


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [T,H,W,3] with T >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """4:2:0 chroma needs even H and W: replicate the last row/column when odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _encode_pyav(tmp: Path, frames: np.ndarray, fps: float, fmt: str, codec: str, options: dict) -> None:
    with av.open(
        str(tmp), "w", format=fmt, options={"movflags": "+faststart"} if fmt == "mp4" else {}
    ) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder


def _gif_frames(frames: np.ndarray) -> list[Image.Image]:
    """Quantise each frame ourselves (no dithering: it flickers) so we know what Pillow will store."""
    return [Image.fromarray(f).quantize(256, dither=Image.Dither.NONE) for f in frames]


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> int:
    """Write a looping GIF; returns the frame count Pillow stores (it merges identical neighbours)."""
    images = _gif_frames(frames)
    rgb = [np.asarray(im.convert("RGB")) for im in images]
    stored = 1 + sum(not np.array_equal(a, b) for a, b in zip(rgb[:-1], rgb[1:]))
    duration = max(20, round(1000.0 / fps))  # ms; GIF stores centiseconds, most viewers clamp < 20 ms
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return stored


def _verify_gif(tmp: Path, final: Path, stored: int, size: tuple[int, int]) -> None:
    with Image.open(tmp) as im:
        got = (im.n_frames, im.height, im.width)
    if got != (stored, *size):
        raise VideoWriteError(f"{final}: GIF reads back as {got} (frames, H, W), expected {(stored, *size)}")


def _verify_video(tmp: Path, final: Path, num_frames: int, size: tuple[int, int]) -> None:
    try:
        info = video_info(tmp)
    except BadInputError as e:
        raise VideoWriteError(f"{final}: the written video does not read back: {e.reason}") from None
    got = (info["num_frames"], info["height"], info["width"])
    if got != (num_frames, *size):
        raise VideoWriteError(
            f"{final}: video reads back as {got} (frames, H, W), expected {(num_frames, *size)}"
        )


def write_video(path, frames: np.ndarray, fps: float, *, crf: int = 18) -> Path:
    """Write uint8 [T,H,W,3] RGB frames; the suffix picks the format, then the file is re-read and checked.

    .mp4: H.264 yuv420p (libx264, faststart) - odd H or W is padded to even by edge replication,
    so the stored size is then even. .webm: VP9 yuv420p (same padding). .gif: Pillow, looping;
    identical neighbouring frames are merged by Pillow (their durations add up). The file
    appears under its final name only once complete and verified (VideoWriteError otherwise).
    """
    path = Path(path)
    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    suffix = path.suffix.lower()
    with atomic_write(path) as tmp:
        if suffix == ".gif":
            stored = _write_gif(tmp, frames, fps)
            _verify_gif(tmp, path, stored, frames.shape[1:3])
        elif suffix in (".mp4", ".webm"):
            frames = _pad_to_even(frames)
            if suffix == ".mp4":
                _encode_pyav(tmp, frames, fps, "mp4", "libx264", {"crf": str(crf), "preset": "medium"})
            else:
                _encode_pyav(tmp, frames, fps, "webm", "libvpx-vp9", {"crf": str(crf + 14), "b": "0"})
            _verify_video(tmp, path, len(frames), frames.shape[1:3])
        else:
            raise ValueError(f"{path}: unsupported video format {suffix!r} (use .mp4, .webm or .gif)")
    return path


def write_png(path, image: np.ndarray) -> Path:
    """Write a uint8 [H,W,3] RGB (or [H,W] gray) image as PNG, atomically."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be uint8 [H,W,3] or [H,W], got {image.dtype} {image.shape}")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise VideoWriteError(f"{path}: PNG encoding failed")
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        with open(tmp, "rb") as f:  # re-read before the file takes its name (bytes: any file name)
            back = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
        if back is None or back.shape[:2] != image.shape[:2]:
            got = None if back is None else back.shape[:2]
            raise VideoWriteError(f"{path}: PNG reads back as {got}, expected {image.shape[:2]} (H, W)")
    return path


def write_png_frames(folder, frames: np.ndarray) -> list[Path]:
    """Write frames [T,H,W,3] as folder/frame_00000.png, frame_00001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = _check_frames(frames)
    written = [write_png(folder / f"frame_{i:05d}.png", frame) for i, frame in enumerate(frames)]
    stale = sorted(set(folder.glob("frame_*.png")) - set(written))  # a longer earlier clip's frames
    for p in stale:
        p.unlink()
    return written


def make_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 [N,H,W,3] into one image with `nrow` images per row (torchvision's convention;
    kept rather than torchvision.utils.make_grid, which takes float [N,C,H,W] tensors)."""
    images = _check_frames(images)
    n, h, w, _ = images.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


__all__ = [
    "DEFAULT_FPS",
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "count_frames",
    "make_grid",
    "read_image",
    "read_video",
    "to_rgb_uint8",
    "video_codec",
    "video_info",
    "write_png",
    "write_png_frames",
    "write_video",
]
