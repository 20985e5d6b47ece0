"""Training-time reader of latent shards: a seeded, resumable WebDataset pipeline of whitened latents.

Epoch order is a pure function of (seed, epoch, rank, world_size, num_workers, batch_size): shard
order and every worker's shuffle buffer are seeded from those, and the posterior-sample noise of
each sample from (seed, epoch, key). Each sample is read exactly once per epoch across ranks and
DataLoader workers ("slots", slot = rank + world_size * worker):
  - shards >= slots: shard-level split, slot s reads shuffled_shards[s::slots]. Slots (and so
    ranks) can get different numbers of samples: loop epochs per rank and count steps, not epochs.
  - shards <  slots: sample-level split, every slot reads all shards and keeps the samples whose
    running index i (in the epoch's shard order) has i % slots == s. Exact and balanced to +-1,
    but each slot reads all bytes: meant for small data (tests, demos), not for big runs.
Resume mid-epoch (`resume_position` = batches already consumed this epoch): each worker skips its
share of those batches after its shuffle buffer and before decoding, so skipped samples cost a tar
read but no decode. DataLoader hands out worker batches round-robin (exhausted workers dropped),
which is what `worker_skips` reproduces; the resumed DataLoader's workers are rotated so that its
worker 0 plays the worker whose turn was next.
Start-up checks sizes of all listed shards against manifest.json (cheap); sha256 of every shard is
only checked with verify=True or scripts.verify_shards (reading all data each epoch is too slow).
"""

from __future__ import annotations

import io
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .files import seed_from
from .remote import NETWORK_ERRORS, RETRIES, as_location, backoff, is_remote
from .shards import MANIFEST, TEXT_EXTS, ShardError, check_shard_files, load_manifest
from .stats import LatentStats, load_stats, whiten

ALLOWED_MEMBERS = ("json", "logvar.npy", "mean.npy")  # nothing else is ever decoded (never pickle)
OPTIONAL_MEMBERS = TEXT_EXTS  # caption embeddings (encode.text_encoder): both or neither


# ----------------------------------------------------------------------------- epoch plan (pure)


def epoch_shard_order(shards: list[dict], seed: int, epoch: int, shuffle: bool) -> list[dict]:
    if not shuffle:
        return list(shards)
    perm = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(shards))
    return [shards[i] for i in perm]


def slot_sample_counts(order: list[dict], world_size: int, num_workers: int) -> list[int]:
    """Samples each slot (rank + world_size * worker) reads in an epoch with this shard order."""
    slots = world_size * num_workers
    if len(order) >= slots:
        return [sum(e["samples"] for e in order[s::slots]) for s in range(slots)]
    total = sum(e["samples"] for e in order)
    return [(total - s + slots - 1) // slots for s in range(slots)]


def worker_skips(batches_per_worker: list[int], consumed: int) -> tuple[list[int], int]:
    """(batches each worker had delivered, whose turn is next) after `consumed` batches of an epoch.

    DataLoader takes batches from its workers in turn, dropping workers that are exhausted, and a
    new DataLoader starts with worker 0: so a resumed loader rotates workers by the returned offset."""
    skips, left, nxt = [0] * len(batches_per_worker), consumed, 0
    while left > 0:
        progressed = False
        for w, n in enumerate(batches_per_worker):
            if left > 0 and skips[w] < n:
                skips[w], left, nxt, progressed = skips[w] + 1, left - 1, (w + 1) % len(skips), True
        if not progressed:
            raise ValueError(f"resume position {consumed} is past the end of the epoch ({sum(batches_per_worker)})")
    return skips, nxt


# ----------------------------------------------------------------------------- pipeline stages


def _worker(offset: int = 0) -> tuple[int, int]:
    """(logical worker id, number of workers): DataLoader's worker id rotated by `offset` (resume)."""
    info = get_worker_info()
    return (0, 1) if info is None else ((info.id + offset) % info.num_workers, info.num_workers)


def _slot_shards(plan, rank: int, world_size: int, num_workers: int, offset: int):
    """Source: this slot's shards, plus the sample filter (slot, slots) for sample-level splitting."""
    worker, k = _worker(offset)
    if k != num_workers:
        raise RuntimeError(f"loader planned for {num_workers} workers but runs in {k}: build it with the same num_workers")
    slots, slot = world_size * num_workers, rank + world_size * worker
    order = plan()
    if len(order) >= slots:  # wds.split_by_node then wds.split_by_worker, with explicit rank/worker
        return iter([(entry, None) for entry in order[slot::slots]])
    return iter([(entry, (slot, slots)) for entry in order])


def _shard_samples(path, skip: int):
    """The raw samples of one shard file or URL after the first `skip` (a re-opened URL starts
    over: the samples read before its connection dropped are passed by, not yielded twice)."""
    with (path.open() if is_remote(path) else open(path, "rb")) as stream:  # not by URL string: any folder name works
        for i, sample in enumerate(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))):
            if i >= skip:
                yield sample


def _read_shards(src, folder):
    """Raw samples of each shard; a shard that is unreadable or has the wrong sample count is an
    error. A shard at a URL whose connection drops is re-opened up to RETRIES times (then an error
    naming it); a 404 is an error at once."""
    index = 0  # running sample index over the epoch's shard order (sample-level split)
    for entry, sample_filter in src:
        path = folder / entry["name"]
        count, tries = 0, 0
        while True:
            try:
                for sample in _shard_samples(path, count):
                    count += 1
                    if sample_filter is None or index % sample_filter[1] == sample_filter[0]:
                        yield sample
                    index += 1
                break
            except ShardError:
                raise
            except FileNotFoundError as e:
                raise ShardError(f"{path}: not found ({e}); listed in {folder / MANIFEST}") from None
            except NETWORK_ERRORS as e:
                if not is_remote(path) or tries == RETRIES:
                    what = f"connection failed {tries + 1} times" if is_remote(path) else "unreadable or truncated shard"
                    raise ShardError(f"{path}: {what} after {count} samples ({type(e).__name__}: {e})") from e
                print(f"[shards] {path}: connection dropped after {count} samples ({type(e).__name__}); "
                      f"retry {tries + 1} of {RETRIES}", flush=True)
                backoff(tries)
                tries += 1
            except Exception as e:  # tarfile.ReadError, EOF inside a member, duplicate names ...
                raise ShardError(f"{path}: unreadable or truncated shard after {count} samples ({e})") from e
        if count != entry["samples"]:
            raise ShardError(
                f"{path}: holds {count} samples but {folder / MANIFEST} lists {entry['samples']} "
                "(truncated or replaced shard; run scripts.verify_shards)"
            )


def _shuffle(src, bufsize: int, seed: int, epoch: int, rank: int, offset: int):
    if bufsize <= 1:
        return src
    worker, _ = _worker(offset)
    rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}")
    return wds.shuffle(bufsize, bufsize, rng=rng)(src)


def _skip(src, per_worker: list[int], offset: int):
    n = per_worker[_worker(offset)[0]]
    for i, sample in enumerate(src):
        if i >= n:
            yield sample


def decode_sample(raw: dict, latent_shape: tuple[int, int, int], frames: int) -> dict:
    """Raw tar members -> {"mean", "logvar" float16 numpy, "meta" dict, and "text" float16 [N, L, D] /
    "text_mask" bool [N, L] when the shards carry caption embeddings}; only npy and json are read."""
    url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    extra = sorted(set(members) - set(ALLOWED_MEMBERS) - set(OPTIONAL_MEMBERS))
    missing = sorted(set(ALLOWED_MEMBERS) - set(members))
    optional = set(members) & set(OPTIONAL_MEMBERS)
    if optional and optional != set(OPTIONAL_MEMBERS):
        missing += sorted(set(OPTIONAL_MEMBERS) - optional)
    if extra or missing:
        what = f"unexpected member(s) {extra}" if extra else f"missing member(s) {missing}"
        allowed = [*ALLOWED_MEMBERS, *OPTIONAL_MEMBERS]
        raise ShardError(f"{url}: sample {key}: {what}; only {allowed} are read (never pickle)")
    out = {"meta": json.loads(members["json"].decode("utf-8"))}
    expected = (latent_shape[0], frames, latent_shape[1], latent_shape[2])
    for name in ("mean", "logvar"):
        arr = np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
        if arr.dtype != np.float16 or arr.shape != expected:
            raise ShardError(f"{url}: sample {key}: {name}.npy is {arr.dtype}{list(arr.shape)}, expected float16{list(expected)}")
        out[name] = arr
    if optional:
        text = np.load(io.BytesIO(members["text.npy"]), allow_pickle=False)
        mask = np.load(io.BytesIO(members["text_mask.npy"]), allow_pickle=False)
        n = len(out["meta"].get("captions") or [])
        if text.dtype != np.float16 or text.ndim != 3 or mask.shape != text.shape[:2] or len(text) != n:
            raise ShardError(f"{url}: sample {key}: text.npy {text.dtype}{list(text.shape)} / text_mask.npy "
                             f"{list(mask.shape)} do not match its {n} captions")
        out["text"], out["text_mask"] = text, mask.astype(bool)
    out["key"] = key
    return out


def _to_latent(src, stats: LatentStats, use_mean: bool, seed: int, epoch: int, latent_shape, frames):
    # numpy, not torch: per-sample math on small arrays is slower with torch's intra-op threads
    for raw in src:
        d = decode_sample(raw, latent_shape, frames)
        x = d["mean"].astype(np.float32)
        if not use_mean:  # posterior sample z = mean + exp(logvar / 2) * eps, eps seeded per sample
            eps = np.random.default_rng(seed_from(seed, epoch, d["key"])).standard_normal(x.shape, np.float32)
            x = x + np.exp(0.5 * d["logvar"].astype(np.float32)) * eps
        label = d["meta"].get("label")
        out = {
            "latent": torch.from_numpy(whiten(x, stats)),  # whitened, float32 [C, T, h, w]
            "label": -1 if label is None else int(label),
            "key": d["key"],
            "meta": d["meta"],
            "caption": None,
        }
        captions = d["meta"].get("captions") or []
        if captions:  # one caption per sample per epoch, seeded like the posterior noise
            i = seed_from(seed, epoch, d["key"], "caption") % len(captions)
            out["caption"] = captions[i]
            if "text" in d:
                out["text"], out["text_mask"] = torch.from_numpy(d["text"][i].astype(np.float32)), torch.from_numpy(d["text_mask"][i])
        yield out


def collate(samples: list[dict]) -> dict:
    """latent [B, C, T, h, w] float32, label [B] int64 (-1: unlabelled), key, meta and caption (str
    or None) as lists; with caption embeddings in the shards also text [B, L, D] float32 and
    text_mask [B, L] bool (all False for a sample without a caption: the null text)."""
    batch = {
        "latent": torch.stack([s["latent"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "caption": [s.get("caption") for s in samples],
    }
    shaped = [s for s in samples if "text" in s]
    if shaped:
        like = shaped[0]
        batch["text"] = torch.stack([s["text"] if "text" in s else torch.zeros_like(like["text"]) for s in samples])
        batch["text_mask"] = torch.stack([s["text_mask"] if "text" in s else torch.zeros_like(like["text_mask"])
                                          for s in samples])
    return batch


# ----------------------------------------------------------------------------- dataset and loader


def _open(folder_or_urls, kind: str) -> tuple[Path, dict, list[dict]]:
    """(folder, manifest, listed entries of `kind`) for a shards folder, a list of its shard files, or
    brace-expanded names of them (WebDataset style: "shards/video-{000000..000009}.tar")."""
    single = isinstance(folder_or_urls, (str, Path))
    if single and is_remote(folder_or_urls) and not str(folder_or_urls).endswith(".tar"):
        folder, names = as_location(folder_or_urls), None  # a shards folder at a URL
    elif single and Path(folder_or_urls).is_dir():
        folder, names = Path(folder_or_urls), None
    else:
        given = [folder_or_urls] if single else folder_or_urls
        paths = [as_location(p) for item in given for p in wds.shardlists.expand_urls(str(item))]
        parents = {str(p.parent): p.parent for p in paths}
        if len(parents) != 1:
            raise ShardError(f"shard files must come from one folder (with its {MANIFEST}), got {sorted(parents)}")
        folder, names = next(iter(parents.values())), {p.name for p in paths}
    manifest = load_manifest(folder)
    listed = {e["name"] for e in manifest["shards"]}
    if names is not None and names - listed:
        raise ShardError(f"{folder / MANIFEST} does not list {sorted(names - listed)}")
    entries = [e for e in manifest["shards"] if e["kind"] == kind and (names is None or e["name"] in names)]
    if not entries:
        raise ShardError(f"{folder / MANIFEST}: no {kind} shards")
    return folder, manifest, entries


class LatentShardDataset(wds.DataPipeline):
    """One epoch of one rank's whitened latents, batched: see the module docstring for the order.

    Yields dicts from `collate`. Checks the manifest (sizes, latent shape, autoencoder hash) at
    construction; reading raises ShardError naming a shard that is truncated or altered.
    """

    def __init__(
        self, folder_or_urls, *, kind: str = "video", batch_size: int = 8, shuffle_buffer: int = 1000,
        seed: int = 0, epoch: int = 0, use_mean: bool = False, num_workers: int = 0, rank: int = 0,
        world_size: int = 1, expected_autoencoder_hash: str | None = None, resume_position: int = 0,
        drop_last: bool = False, verify: bool = False,
    ):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        folder, manifest, entries = _open(folder_or_urls, kind)
        problems = check_shard_files(folder, {"shards": entries}, full_hash=verify)
        if problems:
            raise ShardError("; ".join(problems))
        self.folder, self.manifest, self.stats = folder, manifest, load_stats(folder)
        latent_shape = tuple(manifest["latent_shape"])
        if self.stats.channels != latent_shape[0]:
            raise ShardError(f"{folder / 'stats.json'}: {self.stats.channels} channels, but {folder / MANIFEST} says {latent_shape}")
        found = manifest.get("autoencoder", {}).get("weights_sha256")
        if expected_autoencoder_hash is not None and found != expected_autoencoder_hash:
            raise ShardError(
                f"{folder / MANIFEST}: shards were encoded by autoencoder weights {str(found)[:16]}..., "
                f"not the expected {expected_autoencoder_hash[:16]}...: re-encode with this autoencoder"
            )
        workers = max(num_workers, 1)
        plan = partial(epoch_shard_order, entries, seed, epoch, shuffle_buffer > 1)
        counts = slot_sample_counts(plan(), world_size, workers)
        per_worker = [counts[rank + world_size * w] for w in range(workers)]
        div = (lambda n: n // batch_size) if drop_last else (lambda n: -(-n // batch_size))
        self.batches_per_worker = [div(n) for n in per_worker]
        self.num_samples = sum(per_worker)
        skips, offset = worker_skips(self.batches_per_worker, resume_position)
        frames = manifest["clip_len"] if kind == "video" else 1
        super().__init__(
            partial(_slot_shards, plan, rank, world_size, workers, offset),
            partial(_read_shards, folder=folder),
            partial(_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank, offset=offset),
            partial(_skip, per_worker=[k * batch_size for k in skips], offset=offset),
            partial(_to_latent, stats=self.stats, use_mean=use_mean, seed=seed, epoch=epoch,
                    latent_shape=latent_shape, frames=frames),  # fmt: skip
            wds.batched(batch_size, collation_fn=collate, partial=not drop_last),
        )

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        return sum(self.batches_per_worker)


class LatentLoader:
    """Iterates one epoch per `for` loop and remembers its position: {"epoch", "batches"} consumed.

    `state_dict()` goes into a checkpoint; `load_state_dict()` (or `resume_position`) resumes at
    exactly the next batch. A finished loop advances to the next epoch."""

    def __init__(self, folder_or_urls, *, epoch: int = 0, resume_position: int | None = None,
                 num_workers: int = 0, **dataset_kwargs):  # fmt: skip
        self.source, self.num_workers, self.kwargs = folder_or_urls, num_workers, dataset_kwargs
        self.epoch, self.position = epoch, resume_position or 0
        first = self.dataset()  # checks the manifest now, not in the first training step
        self.stats, self.manifest = first.stats, first.manifest

    def dataset(self) -> LatentShardDataset:
        return LatentShardDataset(self.source, epoch=self.epoch, resume_position=self.position,
                                  num_workers=self.num_workers, **self.kwargs)  # fmt: skip

    def __len__(self) -> int:
        return len(self.dataset())

    def __iter__(self):
        ds = self.dataset()
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])


def make_latent_loader(folder_or_urls, **kwargs) -> LatentLoader:
    """The stage-2 reader: see `LatentShardDataset` for the arguments (plus num_workers, epoch,
    resume_position). Example: `for batch in make_latent_loader("shards/", kind="video",
    batch_size=8, seed=0, rank=r, world_size=n): batch["latent"]  # [B, C, T, h, w] whitened`."""
    return LatentLoader(folder_or_urls, **kwargs)


class VideoImageBatches:
    """Stage 2's batch source: endless (video batch, image batch or None) pairs from two latent
    loaders, with the interface of `LatentLoader` (epoch = the video loader's; state_dict =
    {"video": ..., "images": ...}). Images come from image shards when the folder has them, else
    from video shards (the trainer takes one random frame of each clip)."""

    def __init__(self, video: LatentLoader, images: LatentLoader | None):
        self.video, self.images = video, images

    @property
    def epoch(self) -> int:
        return self.video.epoch

    def __iter__(self):
        videos = _endless(self.video)
        images = _endless(self.images) if self.images is not None else None
        while True:
            yield next(videos), (next(images) if images is not None else None)

    def state_dict(self) -> dict:
        state = {"video": self.video.state_dict()}
        if self.images is not None:
            state["images"] = self.images.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.video.load_state_dict(state["video"])
        if self.images is not None and "images" in state:
            self.images.load_state_dict(state["images"])


def _endless(loader: LatentLoader):
    while True:
        yield from loader


def make_training_batches(folder, *, batch_size: int, image_ratio: float, seed: int, **kwargs) -> VideoImageBatches:
    """B video clips and round(image_ratio * B) images per step (images seeded with seed + 1);
    kwargs go to both loaders (rank, world_size, use_mean, shuffle_buffer, num_workers, drop_last,
    expected_autoencoder_hash). A ShardError when a rank would not get one full batch."""
    kinds = {e["kind"] for e in load_manifest(folder)["shards"]}
    video = make_latent_loader(folder, kind="video", batch_size=batch_size, seed=seed, **kwargs)
    images, n_img = None, int(round(image_ratio * batch_size))
    if n_img > 0:
        kind = "image" if "image" in kinds else "video"
        images = make_latent_loader(folder, kind=kind, batch_size=n_img, seed=seed + 1, **kwargs)
    for loader, what in ((video, "video"), (images, "image")):
        if loader is not None and len(loader) == 0:
            raise ShardError(f"{folder}: not one full {what} batch per process; lower train.batch_size")
    return VideoImageBatches(video, images)
