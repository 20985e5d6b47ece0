"""Captions for the files of a data folder, from the layouts text-video datasets already have:

  - a sidecar `NAME.txt` beside `NAME.mp4` (or an image): one caption per non-empty line;
  - a caption table at the data root: `captions.csv` (header `path,caption`, one row per caption)
    or `captions.jsonl` (`{"path": ..., "caption": "..." or [...]}` per line), paths relative to
    the root with `/` separators (WebVid-style tables).

A file may have several captions (training draws one per sample each epoch). In a captioned
folder (any caption found) every file without a caption, every table row naming a file that is
not in the folder and every unreadable row is reported as a problem, never dropped silently: the
encoder writes them to failures.jsonl (stage "caption") and still encodes the file, which then
trains as the null (unconditional) text."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError

TABLES = ("captions.csv", "captions.jsonl")


@dataclass
class CaptionSet:
    """relpath -> its captions (in file order, duplicates removed), plus the problems found."""

    captions: dict[str, list[str]] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)  # {"relpath", "stage": "caption", "reason"}
    sources: list[str] = field(default_factory=list)  # tables read, and "sidecar" when any were

    @property
    def captioned(self) -> bool:
        return bool(self.captions)

    def of(self, relpath: str) -> tuple[str, ...]:
        return tuple(self.captions.get(relpath, ()))


def _clean(text) -> str | None:
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return text or None


def _add(out: dict[str, list[str]], relpath: str, caption: str) -> None:
    have = out.setdefault(relpath, [])
    if caption not in have:
        have.append(caption)


def _problem(relpath: str, reason: str) -> dict:
    return {"relpath": relpath, "stage": "caption", "reason": reason}


def _norm(path: str) -> str:
    return path.strip().replace("\\", "/").removeprefix("./")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise BadInputError(path, f"cannot read ({e.strerror})") from None


def _table_rows(path: Path):
    """(line number, path, caption or None, error or None) for each row of a caption table."""
    text = _read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise BadInputError(path, f"needs a header row with columns path,caption (found {reader.fieldnames})")
        for row in reader:
            yield reader.line_num, row.get("path") or "", row.get("caption"), None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, "", None, f"not valid JSON ({e.msg})"
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            yield n, "", None, 'needs an object with a "path" string'
            continue
        caps = row.get("caption")
        for cap in caps if isinstance(caps, list) else [caps]:
            yield n, row["path"], cap, None


def load_captions(root, relpaths) -> CaptionSet:
    """Captions of `relpaths` (POSIX, relative to `root`) from sidecars and the root's tables."""
    root, relpaths = Path(root), list(relpaths)
    known = set(relpaths)
    out = CaptionSet()
    for name in TABLES:
        table = root / name
        if not table.is_file():
            continue
        out.sources.append(name)
        for line, rel, cap, error in _table_rows(table):
            where = f"{name} line {line}"
            rel = _norm(rel)
            if error is not None or not rel:
                out.problems.append(_problem(rel or name, f"{where}: {error or 'empty path'}"))
            elif rel not in known:
                out.problems.append(_problem(rel, f"{where}: caption names a file that is not in the data folder"))
            elif (text := _clean(cap)) is None:
                out.problems.append(_problem(rel, f"{where}: empty or non-text caption"))
            else:
                _add(out.captions, rel, text)
    sidecars = 0
    for rel in relpaths:
        side = (root / rel).with_suffix(".txt")
        if side.is_file():
            sidecars += 1
            try:
                lines = _read_text(side).splitlines()
            except BadInputError as e:
                out.problems.append(_problem(rel, f"sidecar {side.name}: {e.reason}"))
                continue
            for line in lines:
                if (text := _clean(line)) is not None:
                    _add(out.captions, rel, text)
    if sidecars:
        out.sources.append("sidecar")
    if out.captioned:
        out.problems += [_problem(rel, "no caption (trains as the null text)") for rel in relpaths if rel not in out.captions]
    out.problems.sort(key=lambda p: (p["relpath"], p["reason"]))
    return out
