"""Colour fidelity (data/colour.py) and the sample-quality tracker (data/synthetic.py): the figures
that catch a VAE or a diffusion model that loses colour, objects or motion while PSNR looks fine."""

from __future__ import annotations

import numpy as np
import pytest

from data.colour import background_colour, colour_fidelity, foreground_mask, srgb_to_lab
from data.synthetic import (
    BACKGROUND,
    SMALL_RADIUS,
    make_synthetic_video,
    shuffled_frames,
    track_object,
    video_quality,
)

PINK = (198, 115, 140)  # the colour the VAE turned every object into


def _videos(n=12, frames=8, size=64, seed=7):
    return [make_synthetic_video(i, num_frames=frames, size=size, seed=seed, radius=SMALL_RADIUS)[0] for i in range(n)]


def _psnr(a, b) -> float:
    return float(10 * np.log10(255**2 / ((a.astype(float) - b.astype(float)) ** 2).mean()))


def test_lab_matches_published_values():
    lab = srgb_to_lab([[255, 0, 0], [255, 255, 255], [0, 0, 0], [0, 255, 0]])
    # sRGB primaries in CIELAB (D65), e.g. Bruce Lindbloom's calculator
    np.testing.assert_allclose(lab[0], [53.24, 80.09, 67.20], atol=0.02)
    np.testing.assert_allclose(lab[1], [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[2], [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(lab[3], [87.73, -86.18, 83.18], atol=0.02)


def test_foreground_is_the_object():
    frames = _videos(1)[0]
    mask = foreground_mask(frames)
    np.testing.assert_array_equal(background_colour(frames)[0], BACKGROUND)
    assert not mask[:, 0].any() and not mask[:, :, 0].any()  # the border is background
    assert 0.005 < mask.mean() < 0.1  # a small object
    obj = np.abs(frames.astype(int) - BACKGROUND).max(-1) > 100
    assert mask[obj].all()  # every clearly-object pixel is in it


def test_one_colour_for_every_object_fails_even_at_high_psnr():
    original = np.concatenate(_videos(14, frames=4))
    collapsed = original.copy()
    collapsed[foreground_mask(original)] = PINK
    rng = np.random.default_rng(0)
    faithful = np.clip(original + rng.normal(0, 3, original.shape), 0, 255).astype(np.uint8)
    bad, good = colour_fidelity(original, collapsed), colour_fidelity(original, faithful)
    assert _psnr(original, collapsed) > 24  # PSNR alone calls this a fair reconstruction
    assert bad["delta_e"] > 40 and bad["fg_colour_error"] > 60 and bad["fg_psnr"] < 12
    assert good["delta_e"] < 5 and good["fg_colour_error"] < 2 and good["fg_psnr"] > 35


def test_a_fading_object_and_a_ghost_both_count():
    original = _videos(1)[0]
    faded = np.full_like(original, BACKGROUND)  # the object is gone
    ghost = original.copy()
    ghost[:, 2:8, 2:8] = (240, 240, 240)  # a second object the original does not have
    assert colour_fidelity(original, faded)["delta_e"] > 30
    assert colour_fidelity(original, ghost)["delta_e"] > colour_fidelity(original, original)["delta_e"] + 5
    assert colour_fidelity(original, original)["delta_e"] == 0.0


def test_colour_fidelity_checks_shapes():
    with pytest.raises(ValueError, match="shape"):
        colour_fidelity(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 9, 3), np.uint8))


def test_track_object_follows_one_object():
    frames = _videos(1)[0]
    tr = track_object(frames)
    assert np.isfinite(tr["centre"]).all() and (tr["share"] == 1).all() and (tr["area"] > 20).all()
    true_colour = frames[0, tr["centre"][0, 1].round().astype(int), tr["centre"][0, 0].round().astype(int)]
    assert np.abs(tr["colour"] - true_colour).max() < 3  # interior colour, edges left out
    empty = np.full_like(frames, BACKGROUND)
    assert np.isnan(track_object(empty)["centre"]).all() and (track_object(empty)["area"] == 0).all()


def test_video_quality_scores_the_data_as_perfect_and_each_fault_as_a_fault():
    data = _videos(12, frames=12)
    ref = _videos(48, frames=2, seed=8)  # other videos from the same generator (every palette colour)
    same = video_quality(data, ref)
    assert same["found_whole"] == 1.0 and same["colour_match"] == 1.0
    assert same["colour_drift_de"] < 1.0 and same["jump_rate"] == 0.0 and same["videos_tracked"] == 12

    shuffled = video_quality(shuffled_frames(data), ref)  # the data's frames, no motion
    assert shuffled["smoothness"] > 3 * same["smoothness"] and shuffled["jump_rate"] > 0.2
    assert shuffled["found_whole"] == 1.0 and shuffled["speed_px"] > 1.5 * same["speed_px"]

    pink = []
    for v in data:
        v = v.copy()
        v[foreground_mask(v)] = PINK
        pink.append(v)
    assert video_quality(pink, ref)["colour_match"] < 0.2

    flicker = []  # each frame's object brighter or darker: the colour is not constant along the clip
    for v in data:
        v = v.astype(float)
        m = foreground_mask(v.astype(np.uint8))
        gain = 0.6 + 0.8 * (np.arange(len(v)) % 2)
        v[m] = (v * gain[:, None, None, None])[m]
        flicker.append(np.clip(v, 0, 255).astype(np.uint8))
    assert video_quality(flicker, ref)["colour_drift_de"] > 10 * max(same["colour_drift_de"], 0.5)

    faded = [np.where(np.arange(len(v))[:, None, None, None] % 2 == 0, v, np.uint8(BACKGROUND)) for v in data]
    q = video_quality(faded, ref)
    assert q["found_whole"] == pytest.approx(0.5) and q["videos_tracked"] == 0

    split = []  # the object broken in two halves: not "whole"
    for v in data:
        v = v.copy()
        c = track_object(v)["centre"][:, 0].round().astype(int)
        for t in range(len(v)):
            v[t, :, c[t] - 1 : c[t] + 2] = BACKGROUND
        split.append(v)
    assert video_quality(split, ref)["found_whole"] < 0.2


def test_video_quality_needs_videos():
    with pytest.raises(ValueError, match="at least one"):
        video_quality([], _videos(1))
