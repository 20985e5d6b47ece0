"""Latent shards on disk: deterministic tar writing, per-shard sidecars, manifest.json and verification."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write, sha256_file, write_json_atomic
from .remote import as_location, is_remote
from .stats import RunningStats

FORMAT = "lvd-latent-shards"
FORMAT_VERSION = 1
KINDS = ("video", "image")
MANIFEST = "manifest.json"
STATS = "stats.json"
FAILURES = "failures.jsonl"
SAMPLE_EXTS = ("json", "logvar.npy", "mean.npy")  # members of one sample, in the order written
# with encode.text_encoder: each caption's token embeddings float16 [N, L, D] and mask uint8 [N, L]
TEXT_EXTS = ("text.npy", "text_mask.npy")


class ShardError(RuntimeError):
    """A shard folder is missing, incomplete or inconsistent; the message names the file."""


def shard_name(kind: str, index: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"shard kind must be one of {KINDS}, got {kind!r}")
    return f"{kind}-{index:06d}.tar"


def sidecar_name(kind: str, index: int) -> str:
    """`video-000003.meta.json`: the shard's sample records, failures and partial stats."""
    return shard_name(kind, index)[: -len(".tar")] + ".meta.json"


def sample_key(relpath: str, start: int) -> str:
    """WebDataset-safe key, unique and stable per (source file, clip start): no dots, no slashes."""
    return hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:16] + f"_{start:06d}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def sample_members(key: str, mean: np.ndarray, logvar: np.ndarray, meta: dict, text=None) -> tuple[str, dict]:
    """The tar members of one sample: float16 `mean.npy`/`logvar.npy` [C,T,h,w] and `json`, and with
    `text` = (embeddings [N, L, D], mask [N, L]) of its N captions, `text.npy` (float16) and
    `text_mask.npy` (uint8)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys there)")
    members = {
        "json": json.dumps(meta, sort_keys=True).encode("ascii"),  # \u escapes: safe for any file name
        "logvar.npy": npy_bytes(np.asarray(logvar, np.float16)),
        "mean.npy": npy_bytes(np.asarray(mean, np.float16)),
    }
    if text is not None:
        members["text.npy"] = npy_bytes(np.asarray(text[0], np.float16))
        members["text_mask.npy"] = npy_bytes(np.asarray(text[1], np.uint8))
    return key, members


def write_tar(path: str | Path, samples: list[tuple[str, dict]]) -> dict:
    """Write `samples` [(key, {ext: bytes})] as a tar whose bytes depend only on its content.

    Every header is fixed (mtime 0, uid/gid 0, empty user/group names, mode 0644, USTAR), members
    are written in the given sample order with extensions sorted, and the file appears only when
    complete: `name.tar.tmp` is written, fsynced and renamed. Returns {"bytes", "sha256"}.
    """
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext in sorted(members):
                    data = members[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class ShardWriter:
    """Writes numbered shards (separate sequences per kind) plus one sidecar each into `folder`.

    A shard is final once its sidecar exists and records the tar's size and sha256; `completed`
    is how a rerun knows it can skip (and reuse the sidecar's stats) instead of re-encoding.
    Units that produced no samples get a sidecar but no tar.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_shard(self, kind: str, index: int, samples: list[tuple[str, dict]], record: dict) -> dict:
        """Write shard `index` of `kind` (samples sorted by key) and its sidecar; return the sidecar."""
        name = shard_name(kind, index)
        samples = sorted(samples, key=lambda s: s[0])
        keys = [k for k, _ in samples]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: duplicate sample keys")
        side = dict(record, kind=kind, index=index, name=name if samples else None, samples=len(samples))
        side["keys"] = keys
        if samples:
            side.update(write_tar(self.folder / name, samples))
        write_json_atomic(self.folder / sidecar_name(kind, index), side)
        return side

    def completed(self, kind: str, index: int, fingerprint: str, check_hash: bool = True) -> dict | None:
        """The sidecar of a finished shard, or None when it must be (re)written.

        A sidecar from a run with different settings is an error, not a silent overwrite."""
        side_path = self.folder / sidecar_name(kind, index)
        if not side_path.exists():
            return None
        try:
            side = json.loads(side_path.read_text())
        except ValueError:
            return None  # torn sidecar: re-encode the unit
        if side.get("fingerprint") != fingerprint:
            raise ShardError(
                f"{side_path}: written with different encoding settings, inputs or autoencoder; "
                "use a fresh --output-dir (or delete the old shards)"
            )
        if side["samples"] == 0:
            return side
        tar = self.folder / side["name"]
        if not tar.exists() or tar.stat().st_size != side["bytes"]:
            return None
        if check_hash and sha256_file(tar) != side["sha256"]:
            return None
        return side


# ----------------------------------------------------------------------------- manifest


def build_manifest(sidecars: list[dict], *, clip_len: int, autoencoder: dict, encoding: dict, labels: list) -> dict:
    """manifest.json from every unit's sidecar: shards, totals, latent shape, autoencoder, settings."""
    shards, shapes = [], set()
    totals = dict(inputs=0, videos=0, images=0, samples=0, video_samples=0, image_samples=0, frames=0, failures=0)
    for side in sorted(sidecars, key=lambda s: (s["kind"], s["index"])):
        for k in ("inputs", "videos", "images", "frames", "failures"):
            totals[k] += side[k] if isinstance(side[k], int) else len(side[k])
        totals["samples"] += side["samples"]
        totals[f"{side['kind']}_samples"] += side["samples"]
        if side["samples"]:
            shapes.add(tuple(side["latent_shape"][:1] + side["latent_shape"][2:]))
            shards.append({k: side[k] for k in ("name", "kind", "samples", "bytes", "sha256", "frames")})
    if len(shapes) > 1:
        raise ShardError(f"shards disagree on the latent shape (C, h, w): {sorted(shapes)}")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "shards": sorted(shards, key=lambda s: s["name"]),
        "totals": totals,
        "latent_shape": list(shapes.pop()) if shapes else None,  # [C, h, w]
        "clip_len": clip_len,
        "labels": list(labels),
        "autoencoder": autoencoder,  # {"config": {...}, "weights_sha256": "..."}
        "encoding": encoding,
    }


def finalize(folder: str | Path, sidecars: list[dict], caption_problems: list[dict] = (), text: dict | None = None,
             **manifest_fields) -> dict:
    """Merge sidecars into manifest.json, stats.json and failures.jsonl (each written atomically).
    `caption_problems` (files encoded without a caption, captions naming no file) join failures.jsonl;
    `text` ({"captioned_files", "caption_problems", "text_encoder"}) is recorded in the manifest."""
    folder = Path(folder)
    manifest = build_manifest(sidecars, **manifest_fields)
    if text is not None:
        manifest["text"] = text
    stats = None
    for side in sidecars:
        if side["stats"]["count"]:
            part = RunningStats.from_dict(side["stats"])
            stats = part if stats is None else stats.merge(part)
    failures = sorted([*(f for s in sidecars for f in s["failures"]), *caption_problems],
                      key=lambda f: (f["relpath"], f["stage"]))
    with atomic_write(folder / FAILURES) as tmp:
        tmp.write_text("".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
    if stats is not None:
        stats.save(folder / STATS)
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def load_manifest(folder: str | Path) -> dict:
    """Read `folder/manifest.json`; a missing or corrupt file is a ShardError naming it."""
    path = as_location(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest not found (is this an encode_latents output folder?)") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: manifest is corrupt or unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "shards" not in manifest:
        raise ShardError(f"{path}: not a latent-shard manifest (format must be {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {manifest.get('version')} is not supported ({FORMAT_VERSION})")
    return manifest


# ----------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    folder: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.folder}: {self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.2f} MB"
        if self.ok:
            return head + ": OK"
        return "\n".join([head + f": {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems])


def check_shard_files(folder: str | Path, manifest: dict, full_hash: bool) -> list[str]:
    """Problems with the listed shards: missing, wrong size, (full_hash) wrong sha256. At a URL:
    missing and size (where the server gives it), never the sha256 (that would download them all)."""
    folder, problems = as_location(folder), []
    if is_remote(folder):
        return _check_remote_shards(folder, manifest)
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.exists():
            problems.append(f"{path}: missing (listed in {MANIFEST})")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        elif full_hash and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (corrupted or modified)")
    return problems


_CHECKED_REMOTE: set = set()  # (folder URL, shard names) found complete once in this process


def _check_remote_shards(folder, manifest: dict) -> list[str]:
    key = (str(folder), tuple(e["name"] for e in manifest["shards"]))
    if key in _CHECKED_REMOTE:  # the loaders rebuild their dataset every epoch: one check is enough
        return []
    problems, unsized = [], 0
    for entry in manifest["shards"]:
        try:
            size = (folder / entry["name"]).size()
        except FileNotFoundError:
            problems.append(f"{folder / entry['name']}: missing (HTTP 404; listed in {MANIFEST})")
            continue
        except OSError as e:
            problems.append(f"{folder / entry['name']}: {e}")
            continue
        if size is None:
            unsized += 1
        elif size != entry["bytes"]:
            problems.append(f"{folder / entry['name']}: size {size} bytes, manifest says {entry['bytes']} (truncated?)")
    skipped = "sha256 not checked (a remote check would download every shard)"
    if unsized:
        skipped += f"; {unsized} shards' sizes not given by the server"
    if not problems:
        _CHECKED_REMOTE.add(key)
        print(f"[shards] {folder}: {len(manifest['shards'])} listed shards found; {skipped}", flush=True)
    return problems


def verify_shards(folder: str | Path, full_hash: bool = True) -> VerifyReport:
    """Re-check every shard against the manifest, and look for unlisted shards and leftover .tmp files."""
    folder = Path(folder)
    report = VerifyReport(str(folder))
    try:
        manifest = load_manifest(folder)
    except ShardError as e:
        report.problems.append(str(e))
        return report
    listed = {e["name"] for e in manifest["shards"]}
    report.shards = len(listed)
    report.samples = sum(e["samples"] for e in manifest["shards"])
    report.bytes = sum(e["bytes"] for e in manifest["shards"])
    report.problems += check_shard_files(folder, manifest, full_hash)
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar") and path.name not in listed:
            report.problems.append(f"{path}: shard not listed in {MANIFEST}")
        elif path.name.endswith(".tmp"):
            report.problems.append(f"{path}: leftover temporary file (an interrupted run; rerun encode_latents)")
    if manifest.get("totals", {}).get("samples") != report.samples:
        report.problems.append(f"{folder / MANIFEST}: totals.samples disagrees with the sum over shards")
    if report.samples and not (folder / STATS).exists():
        report.problems.append(f"{folder / STATS}: missing")
    return report
