"""Shard writing, manifest and verification: deterministic bytes, resumable units, tamper detection."""

import ast
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data.shards import (
    ShardError,
    ShardWriter,
    finalize,
    load_manifest,
    sample_key,
    sample_members,
    shard_name,
    verify_shards,
    write_tar,
)
from data.stats import load_stats

C, T, H, W = 4, 3, 2, 2


def _unit(writer, kind, index, n, rng, fingerprint="fp"):
    """Write one shard of n random samples (as encode_latents would) and return its sidecar."""
    from data.stats import RunningStats

    t = T if kind == "video" else 1
    samples, stats = [], RunningStats(C)
    for i in range(n):
        mean = rng.normal(3.0, 2.0, size=(C, t, H, W)).astype(np.float16)
        stats.update(mean)
        rel = f"{kind}/{index}/file {i}.x"
        meta = {"source": rel, "start": 0, "label": i % 2, "kind": kind}
        samples.append(sample_members(sample_key(rel, 0), mean, np.zeros_like(mean), meta))
    failures = [{"relpath": f"{kind}/{index}/bad.x", "reason": "corrupt", "stage": "decode"}]
    record = dict(
        fingerprint=fingerprint, inputs=[s[0] for s in samples] + ["bad"], videos=n if kind == "video" else 0,
        images=n if kind == "image" else 0, frames=n * t, failures=failures, stats=stats.to_dict(),
        latent_shape=[C, t, H, W],
    )  # fmt: skip
    return writer.write_shard(kind, index, samples, record)


def _folder(tmp_path, counts=(("video", 0, 3), ("video", 1, 2), ("image", 0, 4))):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path)
    sides = [_unit(writer, k, i, n, rng) for k, i, n in counts]
    finalize(tmp_path, sides, clip_len=T, autoencoder={"weights_sha256": "ab" * 32}, encoding={}, labels=["a", "b"])
    return sides


def test_keys_are_webdataset_safe_and_stable():
    k = sample_key("class a/clip.v1.mp4", 12)
    assert k == sample_key("class a/clip.v1.mp4", 12)
    assert "." not in k and "/" not in k and k.endswith("_000012")
    assert len({sample_key(p, s) for p in ("a.mp4", "b.mp4") for s in (0, 1)}) == 4
    with pytest.raises(ValueError, match="must not contain"):
        sample_members("a.b", np.zeros(1), np.zeros(1), {})


def test_tar_bytes_are_deterministic_with_fixed_headers(tmp_path):
    s = [sample_members("k1", np.ones((C, 1, H, W)), np.zeros((C, 1, H, W)), {"x": 1})]
    a = write_tar(tmp_path / "a.tar", s)
    b = write_tar(tmp_path / "b.tar", s)
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["k1.json", "k1.logvar.npy", "k1.mean.npy"]
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    arr = np.load(io.BytesIO(tarfile.open(tmp_path / "a.tar").extractfile("k1.mean.npy").read()))
    assert arr.dtype == np.float16 and arr.shape == (C, 1, H, W)


def test_manifest_totals_stats_and_failures(tmp_path):
    sides = _folder(tmp_path)
    m = load_manifest(tmp_path)
    assert [s["name"] for s in m["shards"]] == ["image-000000.tar", "video-000000.tar", "video-000001.tar"]
    assert m["totals"]["samples"] == 9 and m["totals"]["video_samples"] == 5 and m["totals"]["images"] == 4
    assert m["totals"]["failures"] == 3 and m["totals"]["frames"] == 5 * T + 4
    assert m["latent_shape"] == [C, H, W] and m["clip_len"] == T
    for entry in m["shards"]:
        assert entry["bytes"] == (tmp_path / entry["name"]).stat().st_size
    fails = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 3 and all(f["reason"] and f["stage"] for f in fails)
    # stats.json equals a direct computation over every stored float16 mean
    means = []
    for entry in m["shards"]:
        with tarfile.open(tmp_path / entry["name"]) as tar:
            for info in tar:
                if info.name.endswith(".mean.npy"):
                    means.append(np.load(io.BytesIO(tar.extractfile(info).read()), allow_pickle=False))
    flat = np.concatenate([x.reshape(C, -1) for x in means], axis=1).astype(np.float64)
    st = load_stats(tmp_path)
    np.testing.assert_allclose(st.mean, flat.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(st.std, flat.std(axis=1), rtol=1e-10)
    assert sum(s["samples"] for s in sides) == 9


def test_completed_detects_bad_shards_and_foreign_settings(tmp_path):
    _folder(tmp_path)
    w = ShardWriter(tmp_path)
    assert w.completed("video", 0, "fp")["samples"] == 3
    assert w.completed("video", 7, "fp") is None  # never written
    p = tmp_path / shard_name("video", 0)
    p.write_bytes(p.read_bytes()[:-1024])  # truncated
    assert w.completed("video", 0, "fp") is None
    with pytest.raises(ShardError, match=r"video-000001\.meta\.json.*different"):
        w.completed("video", 1, "other settings")


def test_verify_reports_each_problem_naming_the_file(tmp_path):
    _folder(tmp_path)
    ok = verify_shards(tmp_path)
    assert ok.ok and ok.samples == 9 and "OK" in ok.summary()
    v0, v1, i0 = (tmp_path / n for n in ("video-000000.tar", "video-000001.tar", "image-000000.tar"))
    data = bytearray(v0.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    v0.write_bytes(bytes(data))
    v1.write_bytes(v1.read_bytes()[:512])
    i0.unlink()
    (tmp_path / "video-000009.tar").write_bytes(b"")
    (tmp_path / "video-000002.tar.tmp").write_bytes(b"x")
    rep = verify_shards(tmp_path)
    text = rep.summary()
    assert not rep.ok and len(rep.problems) == 5
    for needle in ("video-000000.tar: sha256", "video-000001.tar: size", "image-000000.tar: missing",
                   "video-000009.tar: shard not listed", "video-000002.tar.tmp: leftover"):  # fmt: skip
        assert needle in text
    cheap = verify_shards(tmp_path, full_hash=False)  # sizes only: the same-size edit goes unseen
    assert len(cheap.problems) == 4 and "sha256" not in cheap.summary()


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ShardError, match=r"manifest\.json: manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"shards": [')
    with pytest.raises(ShardError, match=r"manifest\.json: manifest is corrupt"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other", "shards": []}')
    with pytest.raises(ShardError, match="not a latent-shard manifest"):
        load_manifest(tmp_path)
    assert "manifest not found" in verify_shards(tmp_path / "nowhere").summary()


def test_data_modules_import_no_model_or_script_code():
    root = Path(__file__).resolve().parents[1] / "data"
    for name in ("stats.py", "shards.py", "latents.py"):
        tree = ast.parse((root / name).read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [m for m in mods if m.split(".")[0] in ("autoencoder", "diffusion", "scripts")], name
