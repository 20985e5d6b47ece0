"""Captions: the three layouts, several captions per file, every problem reported; synthetic captions
say what the video shows (checked against the frames with the tracker, not the caption code)."""

import json

import numpy as np
import pytest

from data.captions import load_captions
from data.colour import delta_e, srgb_to_lab
from data.errors import BadInputError
from data.synthetic import (
    COLOUR_NAMES,
    DIRECTIONS,
    PALETTE,
    SYNTHETIC_CLASSES,
    make_synthetic_video,
    object_centres,
    synthetic_caption,
    write_synthetic,
)

FILES = ["a/one.mp4", "a/two.mp4", "b/three.png", "b/four.mp4"]


def _touch(root, rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_sidecars_csv_and_jsonl_with_several_captions(tmp_path):
    _touch(tmp_path, FILES)
    (tmp_path / "a" / "one.txt").write_text("a red circle\n\n  a   red  ball \n")
    (tmp_path / "captions.csv").write_text('path,caption\na/two.mp4,"two, with a comma"\n./b/three.png,three\n')
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"path": "b/four.mp4", "caption": ["four", "vier"]}) + "\n"
        + json.dumps({"path": "a/one.mp4", "caption": "a red circle"}) + "\n"  # a duplicate is kept once
    )
    cs = load_captions(tmp_path, FILES)
    assert cs.captioned and cs.problems == []
    assert cs.of("a/one.mp4") == ("a red circle", "a red ball")
    assert cs.of("a/two.mp4") == ("two, with a comma",)
    assert cs.of("b/three.png") == ("three",)
    assert cs.of("b/four.mp4") == ("four", "vier")
    assert set(cs.sources) == {"captions.csv", "captions.jsonl", "sidecar"}


def test_missing_orphan_and_bad_rows_are_reported(tmp_path):
    _touch(tmp_path, FILES)
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"path": "a/one.mp4", "caption": "one"}) + "\n"
        + json.dumps({"path": "gone/five.mp4", "caption": "five"}) + "\n"
        + "{not json\n"
        + json.dumps({"path": "a/two.mp4", "caption": ""}) + "\n"
    )
    cs = load_captions(tmp_path, FILES)
    reasons = {(p["relpath"], p["reason"].split(": ", 1)[-1]) for p in cs.problems}
    assert ("gone/five.mp4", "caption names a file that is not in the data folder") in reasons
    assert any("line 3" in p["reason"] and "JSON" in p["reason"] for p in cs.problems)
    assert ("a/two.mp4", "empty or non-text caption") in reasons
    for rel in ("a/two.mp4", "b/three.png", "b/four.mp4"):  # captioned folder: the rest are missing ones
        assert (rel, "no caption (trains as the null text)") in reasons
    assert all(p["stage"] == "caption" for p in cs.problems)


def test_uncaptioned_folder_has_no_problems_and_bad_header_is_an_error(tmp_path):
    _touch(tmp_path, FILES)
    cs = load_captions(tmp_path, FILES)
    assert not cs.captioned and cs.problems == []
    (tmp_path / "captions.csv").write_text("file,text\na/one.mp4,x\n")
    with pytest.raises(BadInputError, match="captions.csv.*path,caption"):
        load_captions(tmp_path, FILES)


def test_synthetic_captions_say_colour_shape_and_direction():
    for index in range(24):
        frames, label = make_synthetic_video(index, num_frames=4, size=64, seed=5)
        words = synthetic_caption(index, size=64, seed=5)
        assert SYNTHETIC_CLASSES[label] in words
        # colour: the palette entry nearest the object's drawn pixels
        mask = np.abs(frames[0].astype(int) - frames[0, 0, 0]).sum(-1) > 60
        mean = frames[0][mask].reshape(-1, 3).mean(0)
        nearest = int(np.argmin([delta_e(srgb_to_lab(mean[None]), srgb_to_lab(np.array([p]))).item() for p in PALETTE]))
        assert f" {COLOUR_NAMES[nearest]} " in words
        # direction: the tracked displacement over the first frames (before most bounces), in 8 sectors
        c = object_centres(frames)
        dx, dy = c[1] - c[0]
        angle = np.degrees(np.arctan2(-dy, dx)) % 360
        said = next(i for i, d in enumerate(DIRECTIONS) if words.endswith(d))
        assert min(abs(angle - 45 * said), 360 - abs(angle - 45 * said)) <= 22.5 + 8, (index, words, angle)


def test_write_synthetic_writes_sidecars(tmp_path):
    paths = write_synthetic(tmp_path, 3, num_frames=2, size=16)
    cs = load_captions(tmp_path, [p.relative_to(tmp_path).as_posix() for p in paths])
    assert cs.problems == [] and len(cs.captions) == 3
    assert cs.of("circle/video_00000.mp4") == (synthetic_caption(0, size=16),)


def test_partial_captions_name_the_shape_with_one_other_attribute(tmp_path):
    from data.synthetic import caption_words, parse_caption

    paths = write_synthetic(tmp_path, 6, num_frames=2, size=16, partial_captions=True)
    cs = load_captions(tmp_path, [p.relative_to(tmp_path).as_posix() for p in paths])
    assert cs.problems == [] and len(cs.captions) == 6
    for p in paths:
        full, *short = cs.of(p.relative_to(tmp_path).as_posix())
        assert full == synthetic_caption(int(p.stem[-5:]), size=16)  # the whole caption stays the first
        a = parse_caption(full)
        colour, shape, direction = COLOUR_NAMES[a["colour"]], SYNTHETIC_CLASSES[a["shape"]], DIRECTIONS[a["direction"]]
        assert short == [f"a {colour} {shape}", f"a {shape} moves {direction}"]
        assert p.parent.name == shape  # the class folder the video was written to
        assert {w for c in short for w in c.split()} <= set(caption_words())  # no word a words tokenizer lacks
    # written again without: the sidecars go back to the one caption
    write_synthetic(tmp_path, 6, num_frames=2, size=16)
    assert load_captions(tmp_path, ["circle/video_00000.mp4"]).of("circle/video_00000.mp4") == (synthetic_caption(0, size=16),)


def test_hold_out_leaves_its_combinations_out_and_keeps_every_other_video(tmp_path):
    from data.synthetic import held_out_combinations, parse_caption

    # the first K of the order that cycles colour (7), shape (3) and direction (8), written out here
    held = {(k % 7, k % 3, k % 8) for k in range(84)}
    assert held_out_combinations(84) == held and len(held) == 84
    with pytest.raises(ValueError, match="0 to 167"):
        held_out_combinations(168)
    # up to 24: every pair of attributes of a held-out combination is still among the others
    rest = {(c, s, d) for c in range(7) for s in range(3) for d in range(8)} - held_out_combinations(24)
    for c, s, d in held_out_combinations(24):
        assert any(r[:2] == (c, s) for r in rest) and any(r[1:] == (s, d) for r in rest)
        assert any((r[0], r[2]) == (c, d) for r in rest)

    plain = write_synthetic(tmp_path / "plain", 24, num_frames=2, size=16)
    kept = write_synthetic(tmp_path / "held", 10, num_frames=2, size=16, hold_out=84)
    assert len(kept) == 10
    combo = {}
    for p in plain:
        a = parse_caption(p.with_suffix(".txt").read_text())
        combo[p.relative_to(tmp_path / "plain")] = (a["colour"], a["shape"], a["direction"])
    # the held-out set is the plain set without the held-out combinations, the same files in the same order
    expected = [rel for rel in combo if combo[rel] not in held][:10]
    last = int(expected[-1].stem[-5:])  # video indices: the files are named by them
    assert len(expected) < len([rel for rel in combo if int(rel.stem[-5:]) <= last])  # some were skipped
    assert [p.relative_to(tmp_path / "held") for p in kept] == expected
    for p in kept:
        twin = tmp_path / "plain" / p.relative_to(tmp_path / "held")
        assert p.read_bytes() == twin.read_bytes() and p.with_suffix(".txt").read_text() == twin.with_suffix(".txt").read_text()
    # a folder written before without the hold-out loses the held-out videos (and their captions)
    again = write_synthetic(tmp_path / "plain", 10, num_frames=2, size=16, hold_out=84)
    assert [p.relative_to(tmp_path / "plain") for p in again] == expected
    for rel in combo:
        if combo[rel] in held and int(rel.stem[-5:]) <= last:
            assert not (tmp_path / "plain" / rel).exists() and not (tmp_path / "plain" / rel).with_suffix(".txt").exists()


def test_class_adherence_reads_the_real_shapes_and_catches_wrong_labels():
    from data.synthetic import SMALL_RADIUS, SYNTHETIC_CLASSES, class_adherence

    made = [make_synthetic_video(i, num_frames=4, size=64, seed=5, radius=SMALL_RADIUS) for i in range(30)]
    vids, names = [v for v, _ in made], [SYNTHETIC_CLASSES[label] for _, label in made]
    assert class_adherence(vids, names) == {"shape": 1.0, "videos": 30}
    wrong = class_adherence(vids, names[1:] + names[:1])  # each video asked for its neighbour's class
    assert wrong["shape"] < 0.2
    with pytest.raises(ValueError, match="not one of the synthetic classes"):
        class_adherence(vids[:1], ["dog"])


def test_prompt_adherence_detector_reads_the_real_videos_and_catches_wrong_ones():
    from data.synthetic import SMALL_RADIUS, prompt_adherence

    vids = [make_synthetic_video(i, num_frames=4, size=64, seed=3, radius=SMALL_RADIUS)[0] for i in range(60)]
    caps = [synthetic_caption(i, size=64, seed=3, radius=SMALL_RADIUS) for i in range(60)]
    real = prompt_adherence(vids, caps)
    assert real["colour"] == 1.0 and real["shape"] == 1.0 and real["direction"] >= 0.85 and real["videos"] == 60
    shifted = caps[1:] + caps[:1]  # each video asked for its neighbour's caption
    wrong = prompt_adherence(vids, shifted)
    assert wrong["all"] < 0.2 and wrong["shape"] < 0.2  # neighbours always differ in shape (label = index % 3)
    backwards = prompt_adherence([v[::-1] for v in vids], caps)
    assert backwards["direction"] < 0.2
    with pytest.raises(ValueError, match="not of the form"):
        prompt_adherence(vids[:1], ["a purple dog"])
