"""Find the videos and images under a data folder, with class labels from first-level sub-folders,
and a deterministic hash-based train/val split."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .files import stable_hash
from .video_io import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaItem:
    """One input file. `relpath` is POSIX and relative to the data root; label -1 = unlabelled."""

    path: Path
    relpath: str
    kind: str  # "video" or "image"
    label: int = -1
    label_name: str | None = None


def media_kind(name: str) -> str | None:
    """'video', 'image' or None from a file name's extension (case-insensitive)."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in VIDEO_EXTS:
        return "video"
    if suffix in IMAGE_EXTS:
        return "image"
    return None


def _walk_media(root: Path) -> list[tuple[str, str]]:
    """(relpath, kind) of every media file under root, sorted; hidden files/folders are skipped.

    Symlinked folders are followed, but each real folder is visited once, so loops end. Broken
    file links are listed (their readers raise BadInputError).
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(os.path.relpath(dirpath, root))
        for name in filenames:
            kind = media_kind(name)
            if kind is None or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            # a broken link (or a link loop) to a media name is kept: its reader reports it, so a lost
            # input is listed as a failure rather than silently missing
            if os.path.isfile(full) or os.path.islink(full):
                found.append(((rel_dir / name).as_posix().removeprefix("./"), kind))
    return sorted(found)


def discover(root) -> tuple[list[MediaItem], list[str]]:
    """All media under `root` (recursive, sorted by relpath) and the class names.

    Classes are the first-level sub-folders that contain media, sorted by name; label = index.
    With no such sub-folders the data is unconditional (labels -1, class_names []). Files lying
    directly in root next to class folders are kept with label -1 (unlabelled; a warning is
    logged). Hidden files and folders (".name") are ignored. Nothing found -> BadInputError.
    """
    root = Path(root)
    if not root.exists():
        raise BadInputError(root, "data folder does not exist")
    if not root.is_dir():
        raise BadInputError(root, "data path is not a folder")
    entries = _walk_media(root)
    if not entries:
        exts = " ".join(VIDEO_EXTS + IMAGE_EXTS)
        raise BadInputError(root, f"no videos or images found (looked recursively for {exts})")
    class_names = sorted({rel.split("/", 1)[0] for rel, _ in entries if "/" in rel})
    index = {name: i for i, name in enumerate(class_names)}
    items = []
    for rel, kind in entries:
        top = rel.split("/", 1)[0] if "/" in rel else None
        items.append(MediaItem(root / rel, rel, kind, index.get(top, -1), top))
    loose = sum(1 for it in items if it.label < 0)
    if class_names and loose:
        log.warning(
            "%s: %d files lie directly in the data folder next to class folders; "
            "they are used with label -1 (unlabelled)",
            root,
            loose,
        )
    return items, class_names


def _unit_hash(relpath: str, seed: int) -> float:
    """A stable number in [0, 1) from (seed, relpath): sha256, not Python's salted hash()."""
    return stable_hash(seed, relpath, byteorder="big") / 2.0**64


def split_of(relpath: str, val_fraction: float = 0.1, seed: int = 0) -> str:
    """'val' for about `val_fraction` of paths, else 'train'; depends only on (relpath, seed)."""
    return "val" if _unit_hash(relpath, seed) < val_fraction else "train"


def assign_splits(relpaths: list[str], val_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """split_of for each path, except that with >= 2 paths and val_fraction > 0 neither split is
    left empty: the path with the smallest (largest) hash is moved to val (train) if needed."""
    splits = [split_of(r, val_fraction, seed) for r in relpaths]
    if len(relpaths) >= 2 and 0 < val_fraction < 1:
        order = sorted(range(len(relpaths)), key=lambda i: _unit_hash(relpaths[i], seed))
        if "val" not in splits:
            splits[order[0]] = "val"
        if "train" not in splits:
            splits[order[-1]] = "train"
    return splits
