"""The one training loop of both trainers (docs/design.md, "Hand-written on purpose"): resume, the step loop,
logging cadence, periodic jobs, atomic checkpoints, the end-of-run export.

A trainer builds a `Task` (its modules, optimizers and schedulers by name, its `step`, a resumable
batch source, its periodic jobs and its export) and calls `run_training`. The loop never knows
which model it trains; the trainer never sees a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from scripts.runtime import sharding
from scripts.runtime.checkpoint import CheckpointError, CheckpointManager, differing_keys
from scripts.runtime.config import save_config
from scripts.runtime.training import EMA, MetricsLog, NonFiniteGuard


class BatchSource(Protocol):
    """What the loop reads batches from: endless iteration, an epoch counter and a position that
    a checkpoint saves and a resume restores (the next batch after a resume is the one the
    uninterrupted run would have read)."""

    epoch: int

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Periodic:
    """A job run on the main process every `every` optimizer steps (0: never). With `at_end` it
    also runs once after the last step (and not a second time at that step)."""

    every: int
    run: Callable[[int], None]
    at_end: bool = False


@dataclass
class Task:
    """Everything the loop needs from a trainer. Names are the checkpoint's file names."""

    name: str  # progress bar label; "train_<name>" is the TensorBoard project
    model: Any  # the unwrapped model: checkpointed as "model", averaged by `ema`
    ema: EMA
    guard: NonFiniteGuard
    batches: BatchSource
    # one micro-batch: returns None on a gradient-accumulation micro-step, else the step's logs
    # (floats; "samples" = examples this process used, popped for the throughput figure)
    step: Callable[[Any, int], dict | None]
    export: Callable[[], None]  # main process, after the last step: write DIR/export
    modules: dict[str, Any] = field(default_factory=dict)  # more tensor state (e.g. "discriminator")
    optimizers: dict[str, Any] = field(default_factory=dict)  # "optimizer", "optimizer_disc", ...
    schedulers: dict[str, Any] = field(default_factory=dict)  # the first one's LR is logged
    state: dict[str, Any] = field(default_factory=dict)  # trainer.json entries with (load_)state_dict
    configs: dict[str, dict] = field(default_factory=dict)  # must equal the checkpoint's on resume
    periodic: list[Periodic] = field(default_factory=list)
    logs: list[MetricsLog] = field(default_factory=list)  # more per-step logs, truncated on resume
    # train.fsdp: run on every process before main-process jobs (periodic, export), to gather the
    # sharded state they read (the loop sees a sharded model itself: scripts/runtime/sharding.py)
    gather: Callable[[], None] | None = None


def run_training(acc, task: Task, cfg, out: Path) -> None:
    """Train `task` to cfg.train.max_steps under accelerator `acc`, writing into `out`:
    config.yaml, metrics.jsonl, checkpoints/ (every train.checkpoint_every steps and at the end)
    and, through `task.export`, export/. Resumes from the newest complete checkpoint."""
    tc = cfg.train
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    ckpt = CheckpointManager(out / "checkpoints", tc.keep_checkpoints, is_main=acc.is_main_process,
                             rank=acc.process_index, barrier=acc.wait_for_everyone)
    step = _resume(acc, task, ckpt)
    for log in (metrics, *task.logs):  # also drops the lines of a run that died before its first checkpoint
        log.truncate_after(step)
    if acc.is_main_process:  # after the resume checks: a refused run leaves the run's config.yaml alone
        save_config(cfg, out / "config.yaml")
    if tc.tensorboard:
        acc.init_trackers(f"train_{task.name}")

    bar = tqdm(total=tc.max_steps, initial=step, disable=not acc.is_main_process, desc=task.name)
    lr_of = next(iter(task.schedulers.values()))
    t_last, samples_since, batches = time.time(), 0, _forever(task.batches)
    training_peak = 0.0
    while step < tc.max_steps:
        logs = task.step(next(batches), step)
        if logs is None:  # gradient-accumulation micro-step
            continue
        task.ema.update(task.model)
        step += 1
        samples_since += logs.pop("samples") * acc.num_processes
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.time()
            rec = {"step": step, "epoch": task.batches.epoch, "lr": lr_of.get_last_lr()[0], **logs,
                   "nonfinite_total": task.guard.total, "samples_per_s": samples_since / max(now - t_last, 1e-9)}
            metrics.write(rec)
            if tc.tensorboard:
                acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            t_last, samples_since = now, 0
        due = [job for job in task.periodic
               if job.every and step % job.every == 0 and not (job.at_end and step == tc.max_steps)]
        if due and task.gather is not None:
            task.gather()
        for job in due:
            if acc.is_main_process:
                job.run(step)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            training_peak = training_peak or _peak_rss_mb()  # before the first gather of the full state
            _save(acc, task, ckpt, step)
    bar.close()
    if task.gather is not None:
        task.gather()
    if acc.is_main_process:
        for job in task.periodic:
            if job.at_end:
                job.run(step)
        task.export()
        acc.print(f"exported EMA weights to {out / 'export'}")
    acc.wait_for_everyone()
    _memory_report(acc, task, out, training_peak)
    acc.end_training()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_report(acc, task: Task, out: Path, training_peak: float) -> None:
    """Debug hook for the FSDP benchmark, off unless LVD_DEBUG_PEAK_MEMORY is set: each process writes
    DIR/memory-rank{R}.json with its peak resident memory up to the first checkpoint (training
    steps only) and over the whole run (checkpoints gather the full state), and the parameter
    bytes it holds."""
    if os.environ.get("LVD_DEBUG_PEAK_MEMORY", "") in ("", "0"):
        return
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in task.model.parameters())
    (out / f"memory-rank{acc.process_index}.json").write_text(json.dumps(
        {"peak_rss_training_mb": training_peak, "peak_rss_mb": _peak_rss_mb(), "parameter_mb": local / 2**20,
         "sharded": sharding.is_sharded(task.model)}))


def _forever(batches: BatchSource) -> Iterator[Any]:
    while True:  # one `for` per epoch: the source advances its epoch when a loop ends
        yield from batches


def _resume(acc, task: Task, ckpt: CheckpointManager) -> int:
    """Load the newest complete checkpoint into the task; returns its step (0 when none)."""
    latest = ckpt.latest()
    if latest is None:
        return 0
    tensors, objects, meta = ckpt.load(latest)
    check_same_configs(meta, task.configs, latest)
    sharded = sharding.is_sharded(task.model)
    if bool(meta.get("fsdp")) != sharded:
        raise CheckpointError(f"{latest} was written with train.fsdp={str(bool(meta.get('fsdp'))).lower()}; "
                              "resume with the same setting (or use another --output-dir)")
    if sharded:
        sharding.load_model_state(task.model, tensors["model"])
    else:
        task.model.load_state_dict(tensors["model"])
    for name, module in task.modules.items():
        module.load_state_dict(tensors[name])
    task.ema.load_state_dict(tensors["ema"], meta["ema_updates"])
    for name, obj in task.optimizers.items():
        if sharded:
            sharding.load_optimizer_state(task.model, obj, objects[name])
        else:
            obj.load_state_dict(objects[name])
    for name, obj in task.schedulers.items():
        obj.load_state_dict(objects[name])
    if acc.scaler is not None and "scaler" in objects:
        acc.scaler.load_state_dict(objects["scaler"])
    task.guard.load_state_dict(meta["guard"])
    for name, obj in task.state.items():
        if name in meta:  # checkpoints from before the entry existed start it afresh
            obj.load_state_dict(meta[name])
    task.batches.load_state_dict(meta["data"])
    acc.print(f"resumed from {latest} at step {meta['step']}")
    return meta["step"]


def _save(acc, task: Task, ckpt: CheckpointManager, step: int) -> None:
    """Every process calls it (sharded state is gathered with collectives); the main one writes."""
    sharded = sharding.is_sharded(task.model)
    objects = {name: (sharding.optimizer_state(task.model, obj) if sharded else obj.state_dict())
               for name, obj in task.optimizers.items()}
    objects.update({name: obj.state_dict() for name, obj in task.schedulers.items()})
    if acc.scaler is not None:
        objects["scaler"] = acc.scaler.state_dict()
    tensors = {"model": task.model.state_dict(), **{n: m.state_dict() for n, m in task.modules.items()},
               "ema": task.ema.state_dict()}
    if sharded:
        tensors = {name: sharding.full_tensors(state, keep=acc.is_main_process) for name, state in tensors.items()}
    meta = {"data": task.batches.state_dict(), "guard": task.guard.state_dict(), "ema_updates": task.ema.num_updates,
            **task.configs, **{name: obj.state_dict() for name, obj in task.state.items()},
            **({"fsdp": True} if sharded else {})}
    ckpt.save(step, tensors=tensors, objects=objects, meta=meta)


def check_same_configs(meta: dict, configs: dict[str, dict], path: Path) -> None:
    """CheckpointError naming the keys that differ when a checkpoint was written for another model."""
    for key, current in configs.items():
        saved = meta.get(key)
        if saved is not None and saved != current:
            diff = differing_keys(saved, current)
            what = key.removesuffix("_config")
            raise CheckpointError(f"{path} was written for a different {what} ({what}.{f', {what}.'.join(diff)} "
                                  "differ); use another --output-dir or the same config")
