"""Tests for data/discovery.py: recursive media discovery, class labels, errors, symlink loops,
odd file names, and the deterministic hash split."""

from __future__ import annotations

import os

import pytest

from data.discovery import MediaItem, assign_splits, discover, media_kind, split_of
from data.errors import BadInputError
from data.video_io import read_video


def touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_class_labels_from_sorted_first_level_folders(tmp_path):
    for rel in [
        "zebra/b.mp4",
        "zebra/sub/deep.PNG",
        "apple/a.MOV",
        "apple/x.txt",
        "mango/img.jpeg",
        "empty_class/readme.md",
        ".hidden/h.mp4",
        "apple/.partial.mp4",
    ]:
        touch(tmp_path / rel)
    items, classes = discover(tmp_path)
    assert classes == ["apple", "mango", "zebra"]  # sorted; folders without media are no class
    assert [(it.relpath, it.kind, it.label, it.label_name) for it in items] == [
        ("apple/a.MOV", "video", 0, "apple"),
        ("mango/img.jpeg", "image", 1, "mango"),
        ("zebra/b.mp4", "video", 2, "zebra"),
        ("zebra/sub/deep.PNG", "image", 2, "zebra"),
    ]
    assert all(isinstance(it, MediaItem) and it.path == tmp_path / it.relpath for it in items)
    # stable: adding a new class folder later in the alphabet keeps existing labels
    touch(tmp_path / "zzz/new.webm")
    items2, classes2 = discover(tmp_path)
    assert classes2[:3] == classes and {it.relpath: it.label for it in items2}["zebra/b.mp4"] == 2


def test_unconditional_and_loose_files(tmp_path):
    touch(tmp_path / "b.avi")
    touch(tmp_path / "a.webp")
    items, classes = discover(tmp_path)
    assert classes == [] and [(it.relpath, it.label, it.label_name) for it in items] == [
        ("a.webp", -1, None),
        ("b.avi", -1, None),
    ]
    touch(tmp_path / "cats/c.mp4")  # now a class folder exists: root files stay, unlabelled
    items, classes = discover(tmp_path)
    assert classes == ["cats"]
    assert {it.relpath: it.label for it in items} == {"a.webp": -1, "b.avi": -1, "cats/c.mp4": 0}


def test_missing_empty_and_no_media_are_errors(tmp_path):
    with pytest.raises(BadInputError, match="does not exist") as info:
        discover(tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope")
    with pytest.raises(BadInputError, match="no videos or images found"):
        discover(tmp_path)
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub/data.csv")
    with pytest.raises(BadInputError, match=r"no videos or images found \(looked recursively for .*\.mp4"):
        discover(tmp_path)
    with pytest.raises(BadInputError, match="not a folder"):
        discover(tmp_path / "notes.txt")


def test_symlink_loop_terminates_and_odd_names(tmp_path):
    touch(tmp_path / "a/clip.mp4")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a/loop -> root: a cycle
    os.symlink(tmp_path / "missing.mp4", tmp_path / "a" / "broken.mp4")  # dangling link: listed, its reader fails
    os.symlink(tmp_path / "a" / "self.mp4", tmp_path / "a" / "self.mp4")  # a link to itself
    raw = tmp_path / "a" / os.fsdecode(b"\xff\xfe-raw.mp4")  # not valid UTF-8
    touch(raw)
    items, classes = discover(tmp_path)
    assert classes == ["a"]
    assert [it.relpath for it in items] == ["a/broken.mp4", "a/clip.mp4", "a/self.mp4",
                                            "a/" + os.fsdecode(b"\xff\xfe-raw.mp4")]  # fmt: skip
    assert items[3].path.exists()
    for broken in (items[0], items[2]):
        with pytest.raises(BadInputError, match="broken symbolic link") as e:
            read_video(broken.path)
        assert e.value.path == str(broken.path)
    split_of(items[3].relpath)  # hashing a surrogate-escaped name must not raise


def test_media_kind():
    assert media_kind("x.MKV") == "video" and media_kind("y.Jpg") == "image" and media_kind("z.gif") is None


def test_split_is_deterministic_and_about_the_fraction():
    names = [f"class{i % 7}/video_{i:05d}.mp4" for i in range(2000)]
    splits = [split_of(n, 0.2, seed=0) for n in names]
    assert splits == [split_of(n, 0.2, seed=0) for n in names]
    assert 0.17 < splits.count("val") / len(names) < 0.23
    other = [split_of(n, 0.2, seed=1) for n in names]
    assert other != splits and 0.17 < other.count("val") / len(names) < 0.23
    # the split of a file never depends on the other files
    assert split_of("class3/video_00003.mp4", 0.2) == splits[3]
    assert all(split_of(n, 0.0) == "train" for n in names[:50])
    assert all(split_of(n, 1.0) == "val" for n in names[:50])


def test_assign_splits_never_leaves_a_split_empty():
    names = ["a.mp4", "b.mp4", "c.mp4"]
    splits = assign_splits(names, 0.01)
    assert sorted(set(splits)) == ["train", "val"] and splits.count("val") == 1
    assert assign_splits(names, 0.01) == splits
    assert assign_splits(["only.mp4"], 0.5) in (["train"], ["val"])
    big = [f"v{i}.mp4" for i in range(200)]
    assert assign_splits(big, 0.1) == [split_of(n, 0.1) for n in big]  # no change when both exist
