"""Frame transforms on uint8 [T,H,W,3] (or [H,W,3]) arrays, and conversion to/from model tensors
(float [3,T,H,W] in [-1, 1])."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def _as_clip(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    """[H,W,3] -> [1,H,W,3] (and remember to squeeze back); [T,H,W,3] unchanged."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        return frames[None], True
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T,H,W,C] or an image [H,W,C], got shape {frames.shape}")
    return frames, False


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size`, keeping the aspect ratio (INTER_AREA when shrinking)."""
    clip, single = _as_clip(frames)
    h, w = clip.shape[1:3]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        clip = np.stack([cv2.resize(f, (new_w, new_h), interpolation=interp) for f in clip])
        clip = clip.reshape(clip.shape[0], new_h, new_w, -1)  # cv2 drops a single channel axis
    return clip[0] if single else clip


def _crop(frames: np.ndarray, top: int, left: int, size) -> np.ndarray:
    clip, single = _as_clip(frames)
    ch, cw = _pair(size)
    h, w = clip.shape[1:3]
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {ch}x{cw} from frames of {h}x{w}")
    out = np.ascontiguousarray(clip[:, top : top + ch, left : left + cw])
    return out[0] if single else out


def center_crop(frames: np.ndarray, size) -> np.ndarray:
    """Crop the centre size x size (or (h, w)) of every frame."""
    h, w = np.asarray(frames).shape[-3:-1]
    ch, cw = _pair(size)
    return _crop(frames, (h - ch) // 2, (w - cw) // 2, size)


def random_crop(frames: np.ndarray, size, rng: np.random.Generator) -> np.ndarray:
    """Crop the same random size x size window from every frame (one draw per call)."""
    h, w = np.asarray(frames).shape[-3:-1]
    ch, cw = _pair(size)
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {ch}x{cw} from frames of {h}x{w}")
    return _crop(frames, int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), size)


def resize_and_crop(frames: np.ndarray, size: int, *, random: bool = False, rng=None) -> np.ndarray:
    """Short side -> size, then a size x size crop (random with `rng` when random=True, else centre)."""
    frames = resize_short_side(frames, size)
    if random:
        if rng is None:
            raise ValueError("resize_and_crop(random=True) needs an rng (np.random.Generator)")
        return random_crop(frames, size, rng)
    return center_crop(frames, size)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float32 [3,T,H,W] in [-1, 1]; an image [H,W,3] -> [3,H,W]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T,H,W,3] or [H,W,3], got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, 0).contiguous()  # [T,H,W,3] -> [3,T,H,W]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float [3,T,H,W] or [B,3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3] / [B,T,H,W,3] (clamped, rounded).

    A 3-D input [3,H,W] is treated as one image -> [H,W,3].
    """
    if not isinstance(video, torch.Tensor):
        video = torch.as_tensor(video)
    if video.ndim not in (3, 4, 5) or video.shape[-4 if video.ndim >= 4 else 0] != 3:
        raise ValueError(f"expected [3,T,H,W], [B,3,T,H,W] or [3,H,W], got {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    channel_dim = 0 if video.ndim in (3, 4) else 1
    return x.movedim(channel_dim, -1).numpy()
