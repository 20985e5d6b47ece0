"""File safety and stable hashing, in one leaf module that every library may import
(docs/design.md, "Import rules"): it imports nothing from the project.

- `sha256_file`: the hex digest that ties shards, exports and checkpoints to their bytes.
- `fsync_file`, `fsync_dir`: make a write, and a rename inside a folder, durable.
- `atomic_write(path)`: write to `path.tmp`, fsync, rename over `path`:
  a reader sees the old file or the new one, never half of one. `write_json_atomic` uses it.
- `write_export(folder, ...)`: the one export writer of both model kinds (FrameVAE, UNet3D).
- `stable_hash`, `seed_from`: numbers that are a pure function of their parts (sha256, never
  Python's salted hash()), for seeds, splits and per-sample noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(*parts, byteorder: str = "little") -> int:
    """A 64-bit integer from sha256 of the parts joined by ':' (file names may hold surrogates)."""
    text = ":".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], byteorder)


def seed_from(*parts) -> int:
    """A 63-bit seed (valid for torch.manual_seed and numpy) from the parts: see `stable_hash`."""
    return stable_hash(*parts) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- durable writes


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary name `path.tmp` for the body to write; on success it is fsynced
    and renamed over `path` (and the folder fsynced); on failure it is removed and `path` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """JSON (indent 1, sorted keys, final newline) written with `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- exports


def write_export(folder: str | os.PathLike, state: dict, meta: dict, model_type: str, extras: dict | None = None) -> Path:
    """Write an export folder: WEIGHTS_NAME (safetensors `state`) and CONFIG_NAME (`meta` plus
    model_type and the weights' sha256, which the loaders check), plus `extras` {name: write(path)}
    (files or folders written by the callables, e.g. the text encoder), inside the same swap.

    The guarantee: `folder` is always either the complete old export or the complete new one. The
    new one is built in a hidden temporary folder (other files already in `folder` are copied
    into it), fsynced, then swapped in by two renames; in the instant between them the old export
    is complete at `.NAME.old` (`missing_export_hint` names it)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = folder.with_name(f".{folder.name}.old")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"model_type": model_type})
        meta = {"model_type": model_type, **meta, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        extras = extras or {}
        for name, write in extras.items():
            write(tmp / name)
        if folder.is_dir():  # keep the user's other files (notes, samples) with the export
            for p in folder.iterdir():
                if p.name not in (CONFIG_NAME, WEIGHTS_NAME, *extras):
                    (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, 0o666 & ~_umask())  # the usual permissions (safetensors writes 0600)
        for dirpath, _, names in os.walk(tmp):
            for n in names:
                fsync_file(Path(dirpath) / n)
            fsync_dir(Path(dirpath))
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def missing_export_hint(folder: str | os.PathLike) -> str:
    """'' or a sentence naming the complete previous export left by an interrupted `write_export`."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.is_dir():
        return f"; an interrupted export left the previous one complete at {old}: rename it to {folder.name}"
    return ""
