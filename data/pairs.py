"""Super-resolution training pairs: the same data encoded twice (for example `encode.size=32` and
`encode.size=64`) by the same autoencoder, paired by sample key (keys are `relpath:start`, the same
at every size).

`check_pairing` refuses two shard folders that do not pair, naming each reason (other sources,
clip settings, autoencoder, latent channels, a grid that is not an integer multiple).
`LowResLatents` holds the low-resolution posterior means of every sample in memory (float16;
for 16-frame clips of 4 x 16 x 16 latents, 32 KB a clip) and hands them out by key, whitened with
the low-resolution folder's own statistics. Reading the whole low-resolution folder once at
start-up is what makes any shard layout and any shuffle pair exactly; it is sized for low
resolutions, not for a second copy of a large dataset.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .latents import _open, _read_shards, decode_sample
from .remote import as_location, is_remote
from .shards import MANIFEST, ShardError, load_manifest
from .stats import load_stats, whiten

# encoding settings that decide which clips exist and what they hold; `size` may differ
SAME_ENCODING = ("clip_len", "stride", "target_fps", "clips_per_video", "images")


def _source(manifest: dict) -> str:
    data = str((manifest.get("encoding") or {}).get("data", ""))
    return data if is_remote(data) or not data else os.path.realpath(data)


def check_pairing(high: str, low: str) -> int:
    """The spatial factor (high grid / low grid) of two shard folders that pair; a ShardError
    naming every reason they do not."""
    hm, lm = load_manifest(high), load_manifest(low)
    where = f"{as_location(high) / MANIFEST} and {as_location(low) / MANIFEST}"
    reasons = []
    if _source(hm) != _source(lm):
        reasons.append(f"other sources (data {_source(hm)!r} against {_source(lm)!r})")
    for k in SAME_ENCODING:
        a, b = (hm.get("encoding") or {}).get(k), (lm.get("encoding") or {}).get(k)
        if a != b:
            reasons.append(f"encoding.{k} differs ({a!r} against {b!r})")
    if hm.get("clip_len") != lm.get("clip_len"):
        reasons.append(f"clip length differs ({hm.get('clip_len')} against {lm.get('clip_len')} frames)")
    ha, la = ((m.get("autoencoder") or {}).get("weights_sha256") for m in (hm, lm))
    if ha != la:
        reasons.append(f"other autoencoders (weights {str(ha)[:12]} against {str(la)[:12]}): encode both with one")
    (hc, hh, hw), (lc, lh, lw) = hm["latent_shape"], lm["latent_shape"]
    factor = hh // lh if lh else 0
    if hc != lc:
        reasons.append(f"latent channels differ ({hc} against {lc})")
    if not lh or hh % lh or hw % lw or hh // lh != hw // lw or factor < 2:
        reasons.append(f"the high-resolution latent grid {hh}x{hw} is not an integer multiple (>= 2) of {lh}x{lw}")
    if hm.get("labels") != lm.get("labels"):
        reasons.append("class names differ")
    if reasons:
        raise ShardError(f"{where} do not pair for super-resolution: " + "; ".join(reasons))
    return factor


class LowResLatents:
    """Every low-resolution sample of a shards folder, by key: `batch(keys, kind)` -> whitened float32
    [B, C, T, h, w] (the posterior means, whitened with the folder's stats.json)."""

    def __init__(self, folder: str):
        self.folder, self.stats = folder, load_stats(folder)
        self.manifest = load_manifest(folder)
        shape = tuple(self.manifest["latent_shape"])
        self.shape = shape
        self.by_kind: dict[str, dict[str, np.ndarray]] = {}
        kinds = sorted({e["kind"] for e in self.manifest["shards"]})
        for kind in kinds:
            loc, _, entries = _open(folder, kind)
            frames = self.manifest["clip_len"] if kind == "video" else 1
            table = self.by_kind.setdefault(kind, {})
            for raw in _read_shards(((e, None) for e in entries), loc):
                d = decode_sample(raw, shape, frames)
                table[d["key"]] = d["mean"]

    @property
    def channels(self) -> int:
        return self.shape[0]

    def batch(self, keys: list[str], kind: str = "video") -> torch.Tensor:
        table = self.by_kind.get(kind, {})
        missing = [k for k in keys if k not in table]
        if missing:
            raise ShardError(f"{self.folder}: no low-resolution {kind} sample for key(s) {missing[:3]} "
                             f"({len(missing)} of {len(keys)} in this batch): the folders do not pair (re-encode both "
                             "from the same data)")
        x = np.stack([table[k] for k in keys]).astype(np.float32)
        return torch.from_numpy(whiten(x, self.stats))

    def stats_dict(self) -> dict:
        return self.stats.to_dict()
