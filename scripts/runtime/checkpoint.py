"""Atomic, rotated, verifiable training checkpoints (docs/design.md, "Hand-written on purpose").

Layout: ``DIR/checkpoints/step-0000123/`` holding ``<name>.safetensors`` (tensor state dicts),
``<name>.pt`` (optimizer/scheduler/scaler states, loaded with ``weights_only=True``),
``rng-rank<R>.json`` (every RNG state of each process), ``trainer.json`` (step, data position,
counters) and, written last, ``COMPLETE`` listing every file's size and sha256. A folder is
written as ``step-0000123.tmp``, fsynced, then renamed; older checkpoints are deleted only after
the new one is complete. Loading verifies the marker and falls back, with a warning, to the
previous complete checkpoint when a folder is incomplete or a file was truncated or altered.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data.files import fsync_dir, fsync_file, sha256_file

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (names the folder and the reason)."""


# ----------------------------------------------------------------------------- file helpers


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage: clone tensors whose storage was already seen."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(out, str(path))


def _maybe_fault(stage: str) -> None:
    """Fault injection for the reliability tests: LVD_FAULT_KILL_CHECKPOINT=<stage> SIGKILLs
    this process in the middle of writing a checkpoint (stages: 'tensors', 'marker')."""
    if os.environ.get("LVD_FAULT_KILL_CHECKPOINT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, tensors for torch CPU/CUDA generators)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    js = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def restore_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes and finds checkpoints under ``root`` (usually ``DIR/checkpoints``).

    `is_main`, `rank` and `barrier` come from accelerate (or defaults for one process), so
    every process writes its own RNG state and only the main process writes the rest.
    """

    def __init__(self, root: str | Path, keep: int = 2, *, is_main=True, rank: int = 0, barrier=None):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.is_main, self.rank = is_main, rank
        self.barrier = barrier or (lambda: None)

    # -- writing ---------------------------------------------------------------------------
    def save(self, step: int, *, tensors: dict, objects: dict, meta: dict) -> Path:
        """tensors: name -> state dict of tensors; objects: name -> torch-saveable state
        (plain containers of tensors/numbers, checked by loading with weights_only);
        meta: JSON-able trainer state (step, data position, counters)."""
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f"step-{step:07d}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        js, rng_tensors = capture_rng_state()
        _write_json(tmp / f"rng-rank{self.rank}.json", js)
        _save_tensors(rng_tensors, tmp / f"rng-rank{self.rank}.safetensors")
        self.barrier()
        if self.is_main:
            for name, state in tensors.items():
                _save_tensors(state, tmp / f"{name}.safetensors")
            _maybe_fault("tensors")
            for name, obj in objects.items():
                torch.save(obj, tmp / f"{name}.pt")
            _write_json(tmp / "trainer.json", {"step": step, **meta})
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for p in files:
                fsync_file(p)
            entries = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
            _maybe_fault("marker")
            _write_json(tmp / MARKER, {"step": step, "files": entries})
            fsync_file(tmp / MARKER)
            fsync_dir(tmp)
            if final.exists():  # a complete one for this step already exists: replace it
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            self._rotate()
        self.barrier()
        return final

    def _rotate(self) -> None:
        complete = [p for p in self._candidates() if (p / MARKER).exists()]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- finding and loading ---------------------------------------------------------------
    def _candidates(self) -> list[Path]:
        return [p for _, p in step_folders(self.root)]

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; warns about every newer one it skips."""
        for path in reversed(self._candidates()):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            msg = f"skipping checkpoint {path}: {problem}; falling back to an older one"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        return None

    def load(self, path: Path, *, map_location="cpu") -> tuple[dict, dict, dict]:
        """(tensors, objects, meta) from a verified checkpoint; restores this rank's RNG state."""
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        tensors, objects = {}, {}
        for p in sorted(path.iterdir()):
            if p.suffix == ".safetensors" and not p.name.startswith("rng-"):
                tensors[p.stem] = load_file(str(p), device=str(map_location))
            elif p.suffix == ".pt":
                objects[p.stem] = torch.load(p, map_location=map_location, weights_only=True)
        meta = json.loads((path / "trainer.json").read_text())
        rng_json = path / f"rng-rank{self.rank}.json"
        if rng_json.exists():
            restore_rng_state(
                json.loads(rng_json.read_text()), load_file(str(path / f"rng-rank{self.rank}.safetensors"))
            )
        else:
            log.warning("%s has no RNG state for rank %d (different number of processes?)", path, self.rank)
        return tensors, objects, meta


def differing_keys(saved: dict | None, current: dict) -> list[str]:
    """The keys, sorted, whose values differ between two flat config dicts (a missing key differs
    from any value but None; a missing dict has no keys)."""
    saved = saved or {}
    return sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))


def step_folders(root: Path, *, complete: bool = False) -> list[tuple[int, Path]]:
    """(step, folder) of every step-NNNNNNN checkpoint folder under root, oldest first; with
    `complete`, only those whose COMPLETE marker was written (not verified: see verify_checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [(step, p) for step, p in sorted(found) if not complete or (p / MARKER).is_file()]


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is complete and every file matches the marker; else the reason."""
    marker = path / MARKER
    if not marker.exists():
        return "no completion marker (the write was interrupted)"
    try:
        entries = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable completion marker ({e})"
    for name, info in entries.items():
        p = path / name
        if not p.exists():
            return f"missing file {name}"
        if p.stat().st_size != info["bytes"]:
            return f"file {name} has {p.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        if sha256_file(p) != info["sha256"]:
            return f"file {name} does not match its recorded sha256 (altered or corrupt)"
    return None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))
