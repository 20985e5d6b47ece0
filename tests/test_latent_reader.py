"""Training reader: whitening round trip, exactly-once across ranks x workers, resume, safety checks."""

import io
import json
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from data.files import sha256_file
from data.latents import LatentShardDataset, make_latent_loader, worker_skips
from data.shards import ShardError, ShardWriter, finalize, sample_key, sample_members
from data.stats import RunningStats, load_stats, un_whiten

C, T, H, W = 4, 2, 2, 2
LOGVAR = float(np.log(0.25))  # posterior std 0.5


def make_folder(tmp_path, counts, kind="video"):
    """Shards of random latents with sample counts `counts`; returns {key: float16 mean}."""
    rng, writer, sides, means = np.random.default_rng(0), ShardWriter(tmp_path), [], {}
    for index, n in enumerate(counts):
        samples, stats = [], RunningStats(C)
        for i in range(n):
            mean = rng.normal(2.0, 3.0, size=(C, T if kind == "video" else 1, H, W)).astype(np.float16)
            stats.update(mean)
            key = sample_key(f"c{i % 3}/v{index}_{i}.mp4", 0)
            means[key] = mean
            meta = {"source": f"c{i % 3}/v{index}_{i}.mp4", "label": i % 3, "kind": kind}
            samples.append(sample_members(key, mean, np.full_like(mean, LOGVAR), meta))
        record = dict(fingerprint="fp", inputs=n, videos=n, images=0, frames=n * T, failures=[],
                      stats=stats.to_dict(), latent_shape=[C, T, H, W])  # fmt: skip
        sides.append(writer.write_shard(kind, index, samples, record))
    finalize(tmp_path, sides, clip_len=T, autoencoder={"weights_sha256": "ab" * 32}, encoding={}, labels=[])
    return means


def keys_of(loader):
    return [k for batch in loader for k in batch["key"]]


def test_whitened_means_round_trip(tmp_path):
    means = make_folder(tmp_path, [3, 2])
    loader = make_latent_loader(tmp_path, batch_size=2, shuffle_buffer=0, use_mean=True)
    stats = load_stats(tmp_path)
    seen = 0
    for batch in loader:
        assert batch["latent"].dtype == torch.float32 and batch["latent"].shape[1:] == (C, T, H, W)
        for x, key, label, meta in zip(batch["latent"], batch["key"], batch["label"], batch["meta"]):
            np.testing.assert_allclose(un_whiten(x, stats).numpy(), means[key].astype(np.float32), atol=1e-5)
            assert label == meta["label"]
            seen += 1
    assert seen == 5 and len(loader) == 3
    flat = torch.cat([b["latent"] for b in make_latent_loader(tmp_path, batch_size=5, use_mean=True)])
    assert flat.transpose(0, 1).reshape(C, -1).mean(1).abs().max() < 1e-5  # whitened: zero mean
    assert (flat.transpose(0, 1).reshape(C, -1).std(1, unbiased=False) - 1).abs().max() < 1e-4


def test_posterior_samples_are_seeded_per_sample(tmp_path):
    means = make_folder(tmp_path, [6])
    stats = load_stats(tmp_path)

    def draw(seed, epoch, workers=0):
        out = {}
        for b in make_latent_loader(tmp_path, batch_size=4, seed=seed, epoch=epoch, num_workers=workers):
            out.update({k: un_whiten(x, stats) for k, x in zip(b["key"], b["latent"])})
        return out

    a, b, c = draw(0, 0), draw(0, 0, workers=2), draw(0, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # independent of worker placement
    assert not any(torch.equal(a[k], c[k]) for k in a)  # fresh noise each epoch
    noise = torch.stack([a[k] - torch.from_numpy(means[k].astype(np.float32)) for k in a])
    assert abs(noise.std().item() - 0.5) < 0.1  # exp(0.5 * logvar)


@pytest.mark.parametrize("counts", [[3, 1, 4, 1, 5, 2], [4, 3]], ids=["shard-split", "sample-split"])
def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, counts):
    means = make_folder(tmp_path, counts)
    got = Counter()
    for rank in range(2):
        loader = make_latent_loader(tmp_path, batch_size=2, shuffle_buffer=4, seed=3, epoch=1,
                                    num_workers=2, rank=rank, world_size=2)  # fmt: skip
        expected = loader.dataset().num_samples
        keys = keys_of(loader)
        assert len(keys) == expected
        got.update(keys)
    assert got == Counter(means.keys())


def test_order_is_deterministic_and_resume_is_exact(tmp_path):
    make_folder(tmp_path, [3, 4, 2, 5])
    kw = dict(batch_size=2, shuffle_buffer=5, seed=4, num_workers=2)
    assert make_latent_loader(tmp_path, **kw).dataset().batches_per_worker == [3, 5]  # one worker runs dry
    full = [b["key"] for b in make_latent_loader(tmp_path, **kw)]
    assert full == [b["key"] for b in make_latent_loader(tmp_path, **kw)]
    assert full != [b["key"] for b in make_latent_loader(tmp_path, epoch=1, **kw)]
    loader = make_latent_loader(tmp_path, **kw)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = make_latent_loader(tmp_path, **kw)
    resumed.load_state_dict(state)
    assert [b["key"] for b in resumed] == full[3:]
    assert resumed.state_dict() == {"epoch": 1, "batches": 0}
    for n in range(len(full) + 1):  # every position, through resume_position
        assert [b["key"] for b in make_latent_loader(tmp_path, **kw, resume_position=n)] == full[n:]
    single = [b["key"] for b in make_latent_loader(tmp_path, **{**kw, "num_workers": 0})]
    assert [b["key"] for b in make_latent_loader(tmp_path, **{**kw, "num_workers": 0}, resume_position=4)] == single[4:]


def test_worker_skips_round_robin():
    assert worker_skips([3, 1], 0) == ([0, 0], 0)
    assert worker_skips([3, 1], 3) == ([2, 1], 1)
    assert worker_skips([1, 3, 2], 5) == ([1, 2, 2], 0)
    with pytest.raises(ValueError, match="past the end"):
        worker_skips([1, 1], 3)


def _rewrite(tmp_path, name, fn):
    """Apply fn to the shard's bytes and make the manifest agree (as if the manifest were fooled)."""
    path = tmp_path / name
    path.write_bytes(fn(path.read_bytes()))
    m = json.loads((tmp_path / "manifest.json").read_text())
    for e in m["shards"]:
        if e["name"] == name:
            e["bytes"], e["sha256"] = path.stat().st_size, sha256_file(path)
    (tmp_path / "manifest.json").write_text(json.dumps(m))


def test_truncated_or_changed_shards_are_named(tmp_path):
    make_folder(tmp_path, [3, 3])
    (tmp_path / "video-000001.tar").write_bytes((tmp_path / "video-000001.tar").read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"video-000001\.tar: size"):
        make_latent_loader(tmp_path, batch_size=2)
    # sizes agree with the manifest, but the data is short: caught while reading, never silently fewer
    make_folder(tmp_path, [3, 3])
    _rewrite(tmp_path, "video-000001.tar", lambda b: b[: 3 * 512 * 2 + 512 * 4])  # cut mid-sample
    with pytest.raises(ShardError, match=r"video-000001\.tar"):
        keys_of(make_latent_loader(tmp_path, batch_size=2, shuffle_buffer=0))
    make_folder(tmp_path, [3, 3])
    with tarfile.open(tmp_path / "video-000000.tar") as tar:  # drop the last sample, keep a valid tar
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:-3]]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data))
    _rewrite(tmp_path, "video-000000.tar", lambda _: buf.getvalue())
    with pytest.raises(ShardError, match=r"video-000000\.tar: holds 2 samples but .*manifest\.json lists 3"):
        keys_of(make_latent_loader(tmp_path, batch_size=2, num_workers=0))


def test_never_unpickles(tmp_path, monkeypatch):
    make_folder(tmp_path, [2])

    def add_pickle(data):
        buf = io.BytesIO(data.rstrip(b"\0"))  # drop the end-of-archive blocks, then append a member
        payload = pickle.dumps({"boom": 1})
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            first = tar.getmembers()[0].name.split(".")[0]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as t, tarfile.open(fileobj=io.BytesIO(data)) as src:
            for m in src.getmembers():
                t.addfile(m, src.extractfile(m))
            info = tarfile.TarInfo(f"{first}.pyd")
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
        del buf
        return out.getvalue()

    _rewrite(tmp_path, "video-000000.tar", add_pickle)

    def forbidden(*a, **k):
        raise AssertionError("pickle was called")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    with pytest.raises(ShardError, match=r"video-000000\.tar.*unexpected member.*pyd"):
        keys_of(make_latent_loader(tmp_path, batch_size=2, shuffle_buffer=0))


def test_manifest_checks_at_start(tmp_path):
    make_folder(tmp_path, [2])
    with pytest.raises(ShardError, match=r"manifest\.json: shards were encoded by autoencoder weights abab"):
        make_latent_loader(tmp_path, batch_size=2, expected_autoencoder_hash="cd" * 32)
    make_latent_loader(tmp_path, batch_size=2, expected_autoencoder_hash="ab" * 32)
    with pytest.raises(ShardError, match="no image shards"):
        LatentShardDataset(tmp_path, kind="image")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ShardError, match=r"sub/manifest\.json: manifest not found"):
        make_latent_loader(tmp_path / "sub", batch_size=2)
    (tmp_path / "video-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"video-000000\.tar: missing"):
        make_latent_loader(tmp_path, batch_size=2)


def test_brace_expanded_shard_names_read_just_those_shards(tmp_path):
    means = make_folder(tmp_path, [3, 2, 4])
    loader = make_latent_loader(str(tmp_path / "video-{000000..000001}.tar"), batch_size=1, shuffle_buffer=0)
    got = keys_of(loader)
    assert len(got) == 5 and set(got) < set(means)  # shards 0 and 1 only: 3 + 2 samples
    assert sorted(keys_of(make_latent_loader(str(tmp_path / "video-{000000..000002}.tar"), batch_size=1,
                                             shuffle_buffer=0))) == sorted(means)  # fmt: skip
    with pytest.raises(ShardError, match=r"does not list \['video-000003\.tar'\]"):
        make_latent_loader(str(tmp_path / "video-{000002..000003}.tar"), batch_size=1)
