"""data.files: the one place for hashing, durable and atomic writes, and the export writer."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from data.files import (
    atomic_write,
    missing_export_hint,
    seed_from,
    sha256_file,
    stable_hash,
    write_export,
    write_json_atomic,
)


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(range(256)) * 5000)  # more than one read chunk
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_seeds_keep_the_numbers_of_the_formulas_they_replace():
    # the per-step seed, the per-sample noise seed and the split hash, as written before this module
    digest = hashlib.sha256(b"3:17:1:draws").digest()
    assert seed_from(3, 17, 1, "draws") == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    digest = hashlib.sha256("0:cat/\udcffvideo.mp4".encode("utf-8", "surrogateescape")).digest()
    assert stable_hash(0, "cat/\udcffvideo.mp4", byteorder="big") == int.from_bytes(digest[:8], "big")
    assert seed_from(1, 2) != seed_from(2, 1) and 0 <= seed_from(1, 2) < 2**63


def test_atomic_write_keeps_the_old_file_when_the_body_fails(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _export(folder: Path, value: float) -> Path:
    return write_export(folder, {"w": torch.full((3,), value)}, {"note": value}, "Toy")


def test_write_export_replaces_whole_and_keeps_other_files(tmp_path):
    folder = _export(tmp_path / "export", 1.0)
    (folder / "NOTES.txt").write_text("kept")
    _export(folder, 2.0)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["note"] == 2.0 and meta["model_type"] == "Toy"
    assert meta["weights_sha256"] == sha256_file(folder / "model.safetensors")
    assert (folder / "NOTES.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or old folder left


def test_write_export_interrupted_leaves_the_old_export_whole(tmp_path, monkeypatch):
    folder = _export(tmp_path / "export", 1.0)
    before = (folder / "model.safetensors").read_bytes()
    real = Path.rename
    calls = []

    def rename(self, target):
        calls.append(self)
        if len(calls) == 2:  # the new folder's rename into place: the process dies here
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _export(folder, 2.0)
    monkeypatch.undo()
    old = tmp_path / ".export.old"
    assert not folder.exists() and (old / "model.safetensors").read_bytes() == before
    assert str(old) in missing_export_hint(folder)
    # the error a loader gives names it
    from autoencoder.model import FrameVAE

    with pytest.raises(FileNotFoundError, match=r"\.export\.old"):
        FrameVAE.from_pretrained(folder)
