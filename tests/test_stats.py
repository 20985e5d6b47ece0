"""Streaming latent statistics: parallel Welford merge equals a direct numpy computation."""

import numpy as np
import pytest
import torch

from data.stats import STD_FLOOR, RunningStats, load_stats


def test_update_and_merge_match_numpy():
    rng = np.random.default_rng(0)
    # large offset vs spread: the naive sum-of-squares formula loses every digit here
    parts = [rng.normal(1e4, 1e-2, size=(n, 3, 2, 5)) for n in (1, 7, 16)]
    a = RunningStats(3)
    a.update(parts[0][0])  # one [C, ...] sample
    a.update(torch.from_numpy(parts[1]), batched=True)  # torch [N, C, ...]
    b = RunningStats(3).update(parts[2], batched=True)
    a.merge(b)
    data = np.concatenate(parts, axis=0)
    direct = np.moveaxis(data, 1, 0).reshape(3, -1)
    assert a.count == direct.shape[1]
    np.testing.assert_allclose(a.mean, direct.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(a.std, direct.std(axis=1), rtol=1e-6)


def test_merge_is_order_independent_and_roundtrips_dict():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(4, n)) for n in (3, 50, 8)]
    fwd, rev = RunningStats(4), RunningStats(4)
    for c in chunks:
        fwd.merge(RunningStats.from_dict(RunningStats(4).update(c).to_dict()))
    for c in reversed(chunks):
        rev.update(c)
    np.testing.assert_allclose(fwd.mean, rev.mean, rtol=1e-12)
    np.testing.assert_allclose(fwd.m2, rev.m2, rtol=1e-12)
    assert RunningStats(4).merge(fwd).count == fwd.count  # merging into empty copies


def test_save_load_and_floor(tmp_path):
    s = RunningStats(2).update(np.stack([np.full(10, 5.0), np.arange(10.0)]))
    s.save(tmp_path / "stats.json")
    st = load_stats(tmp_path)  # a folder finds its stats.json
    assert st.channels == 2 and st.count == 10
    np.testing.assert_allclose(st.mean, [5.0, 4.5])
    assert st.std[0] == STD_FLOOR  # constant channel: no divide-by-zero when whitening
    np.testing.assert_allclose(st.std[1], np.arange(10.0).std())
    back = RunningStats.load(tmp_path / "stats.json")
    np.testing.assert_allclose(back.std, s.std)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="3 channels"):
        RunningStats(3).update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="no latents"):
        RunningStats(2).save(tmp_path / "s.json")
    with pytest.raises(FileNotFoundError, match="stats.json"):
        load_stats(tmp_path)
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(ValueError, match="stats.json"):
        load_stats(tmp_path)
