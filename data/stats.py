"""Streaming per-channel mean/std of latents (parallel Welford in float64) and `stats.json` I/O."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .files import write_json_atomic
from .remote import as_location, is_remote

STD_FLOOR = 1e-6  # a constant channel would otherwise whiten to inf/nan


class RunningStats:
    """Per-channel (count, mean, M2) that can be updated with arrays and merged with each other.

    `update` takes `[C, ...]` (one sample) or `[N, C, ...]` (`batched=True`); every element of
    channel c counts as one observation of channel c. Merging uses Chan et al. (1979):
        n = n_a + n_b,  d = mean_b - mean_a,
        mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n
    which stays accurate where the naive sum of squares loses all precision (large |mean|/std).
    """

    def __init__(self, channels: int):
        self.channels = int(channels)
        self.count = 0
        self.mean = np.zeros(self.channels, np.float64)
        self.m2 = np.zeros(self.channels, np.float64)

    def update(self, x, batched: bool = False) -> RunningStats:
        """Add the values of `x` ([C, ...], or [N, C, ...] with batched=True; numpy or torch)."""
        if hasattr(x, "detach"):  # torch tensor, without importing torch here
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if batched:
            x = np.moveaxis(x, 1, 0)
        if x.ndim < 1 or x.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels} channels on axis {1 if batched else 0}, got shape {x.shape}")
        flat = x.reshape(self.channels, -1)
        n = flat.shape[1]
        if n == 0:
            return self
        other = RunningStats(self.channels)
        other.count = n
        other.mean = flat.mean(axis=1)
        other.m2 = ((flat - other.mean[:, None]) ** 2).sum(axis=1)
        return self.merge(other)

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold `other` into self (in place) and return self."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {other.channels} channels into {self.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n
        return self

    @property
    def var(self) -> np.ndarray:
        """Population variance (M2 / n); zeros before any update."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.maximum(np.sqrt(self.var), STD_FLOOR)

    def to_dict(self) -> dict:
        """Exact state (for per-shard sidecars): merging from_dict() results is lossless."""
        return {"channels": self.channels, "count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> RunningStats:
        s = cls(d["channels"])
        s.count = int(d["count"])
        s.mean = np.asarray(d["mean"], np.float64)
        s.m2 = np.asarray(d["m2"], np.float64)
        if s.mean.shape != (s.channels,) or s.m2.shape != (s.channels,):
            raise ValueError(f"stats state has {len(d['mean'])} means for {s.channels} channels")
        return s

    def save(self, path: str | Path) -> None:
        """Write `stats.json` {"channels", "count", "mean", "std"} atomically."""
        if self.count == 0:
            raise ValueError("no latents were seen: cannot write statistics")
        out = {"channels": self.channels, "count": self.count, "mean": self.mean.tolist(), "std": self.std.tolist()}
        write_json_atomic(path, out)

    @classmethod
    def load(cls, path: str | Path) -> RunningStats:
        """Rebuild from `stats.json` (M2 = std^2 * count; exact unless a channel hit the floor)."""
        st = load_stats(path)
        s = cls(st.channels)
        s.count, s.mean, s.m2 = st.count, st.mean.copy(), st.std**2 * st.count
        return s


class LatentStats:
    """What training needs from `stats.json`: per-channel mean and std (float64 numpy, [C])."""

    def __init__(self, mean, std, count: int = 0):
        self.mean = np.asarray(mean, np.float64)
        self.std = np.maximum(np.asarray(std, np.float64), STD_FLOOR)
        self.count = int(count)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean {self.mean.shape} and std {self.std.shape} must be equal-length vectors")

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def to_dict(self) -> dict:
        """{"channels", "count", "mean", "std"}: what `stats.json` and an export's config.json hold."""
        return {"channels": self.channels, "count": self.count, "mean": self.mean.tolist(), "std": self.std.tolist()}


def as_stats(stats: LatentStats | dict) -> LatentStats:
    """A LatentStats from itself or from a {"mean", "std"} mapping (an export's or a latent file's)."""
    return stats if isinstance(stats, LatentStats) else LatentStats(stats["mean"], stats["std"], stats.get("count", 0))


def _params(stats, x):
    """float32 (mean, 1/std, std) shaped [C, 1, 1, 1]: numpy arrays for numpy x, tensors on x's device."""
    st = as_stats(stats)
    arrays = (st.mean.astype(np.float32), (1.0 / st.std).astype(np.float32), st.std.astype(np.float32))
    if isinstance(x, np.ndarray):
        return [a.reshape(-1, 1, 1, 1) for a in arrays]
    return [torch.as_tensor(a, device=x.device).to(x.dtype).view(-1, 1, 1, 1) for a in arrays]


def whiten(x, stats: LatentStats | dict | None):
    """(x - mean) * (1 / std) per channel; x is [C, T, h, w] or [N, C, T, h, w], numpy or torch.
    The one whitening of the project: the shard reader, init videos and the tests use it; None is
    the identity (latent files written without statistics)."""
    if stats is None:
        return x
    mean, inv_std, _ = _params(stats, x)
    return (x - mean) * inv_std


def un_whiten(x, stats: LatentStats | dict | None):
    """x * std + mean per channel: the inverse of `whiten` (sampler, decoder, export, evaluation)."""
    if stats is None:
        return x
    mean, _, std = _params(stats, x)
    return x * std + mean


def load_stats(path: str | Path) -> LatentStats:
    """Read `stats.json` (or a shards folder holding one); errors name the file."""
    path = as_location(path)
    if is_remote(path) and not str(path).endswith(".json") or not is_remote(path) and path.is_dir():
        path = path / "stats.json"
    try:
        d = json.loads(path.read_text())
        stats = LatentStats(d["mean"], d["std"], d.get("count", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: latent statistics file not found (written by encode_latents)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid stats.json ({type(e).__name__}: {e})") from None
    if d.get("channels", stats.channels) != stats.channels:
        raise ValueError(f"{path}: 'channels' is {d['channels']} but there are {stats.channels} means")
    return stats
