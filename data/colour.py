"""Colour fidelity of reconstructions and samples: CIELAB conversion, a foreground mask, ΔE and
foreground PSNR on uint8 RGB frames.

PSNR and SSIM are averages over every pixel, so on videos of small objects on a plain background
they are dominated by the background: a VAE that turns every object pink still scores ~26 dB. The
figures here look only at the pixels that carry the content (those that differ from the frame's
background colour, or that hold a saturated colour) and measure colour the way people see it
(CIELAB, D65). As a guide, ΔE ≈ 2.3 is a just-noticeable difference; above ~10 two colours are
plainly different.
"""

from __future__ import annotations

import numpy as np

# sRGB (D65) -> XYZ, IEC 61966-2-1
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])

# foreground: any channel differs from the background by more than this (0-255), or Lab chroma above
FG_THRESHOLD = 24
FG_CHROMA = 30.0


def srgb_to_lab(rgb) -> np.ndarray:
    """uint8 (or 0-255 float) RGB [..., 3] -> CIELAB [..., 3] (L in 0-100), D65 white point."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE_D65
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _clip(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [T,H,W,3] or an image [H,W,3], got shape {frames.shape}")
    return frames


def background_colour(frames) -> np.ndarray:
    """Per-frame background colour: the median of the border pixels -> float [T, 3]."""
    f = _clip(frames).astype(np.float64)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # [T, 2W+2H, 3]
    return np.median(border, axis=1)


def foreground_mask(frames, threshold: float = FG_THRESHOLD, chroma: float = FG_CHROMA) -> np.ndarray:
    """bool [T, H, W]: pixels that differ from the frame's background colour by more than `threshold`
    in any channel, or whose CIELAB chroma exceeds `chroma` (saturated colour)."""
    f = _clip(frames)
    return _foreground(f, srgb_to_lab(f), threshold, chroma)


def _foreground(f: np.ndarray, lab: np.ndarray, threshold: float = FG_THRESHOLD, chroma: float = FG_CHROMA):
    diff = np.abs(f.astype(np.float64) - background_colour(f)[:, None, None, :]).max(axis=-1)
    return (diff > threshold) | (np.hypot(lab[..., 1], lab[..., 2]) > chroma)


def colour_fidelity(original, recon) -> dict[str, float]:
    """Colour figures of a reconstruction (uint8 RGB [T,H,W,3] or [H,W,3] each, same shape).

    The foreground is the union of both frames' foreground masks, so an object that fades and a
    ghost that appears both count. Returns
      `delta_e`: mean CIE76 ΔE (Euclidean distance in CIELAB) over foreground pixels;
      `fg_psnr`: PSNR (dB, 0-255 scale) over foreground pixels only;
      `fg_colour_error`: mean over frames of the worst channel's error (0-255) of the foreground's
        mean colour (the object's colour as a whole, ignoring its edges);
      `fg_fraction`: the share of pixels in the foreground.
    With no foreground pixel at all, every pixel counts.
    """
    a, b = _clip(original), _clip(recon)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and reconstruction {b.shape} differ in shape")
    lab_a, lab_b = srgb_to_lab(a), srgb_to_lab(b)
    mask = _foreground(a, lab_a) | _foreground(b, lab_b)
    if not mask.any():
        mask = np.ones_like(mask)
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    de = delta_e(lab_a, lab_b)[mask]
    mse = ((fa - fb) ** 2)[mask].mean()
    errors = []
    for t in range(a.shape[0]):
        m = mask[t]
        if m.any():
            errors.append(np.abs(fa[t][m].mean(axis=0) - fb[t][m].mean(axis=0)).max())
    return {
        "delta_e": float(de.mean()),
        "fg_psnr": float(10 * np.log10(255.0**2 / max(mse, 1e-10))),
        "fg_colour_error": float(np.mean(errors)),
        "fg_fraction": float(mask.mean()),
    }


def delta_e(lab_a, lab_b) -> np.ndarray:
    """CIE76 colour difference between CIELAB colours (broadcasting over leading axes)."""
    return np.linalg.norm(np.asarray(lab_a, dtype=np.float64) - np.asarray(lab_b, dtype=np.float64), axis=-1)
