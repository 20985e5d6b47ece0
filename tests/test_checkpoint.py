"""Checkpoint manager: atomic writes, verification, fallback, rotation, RNG restore; EMA; guard."""

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from scripts.runtime.checkpoint import CheckpointManager, verify_checkpoint
from scripts.runtime.training import EMA, MetricsLog, NonFiniteGuard, TrainingStopped, read_metrics


def _save(mgr, step, value=1.0):
    model = {"w": torch.full((4, 4), value), "b": torch.arange(3.0)}
    opt = {"state": {0: {"exp_avg": torch.ones(2) * value}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return mgr.save(step, tensors={"model": model}, objects={"optimizer": opt}, meta={"data": {"epoch": 0, "pos": step}})


def test_roundtrip_and_rng_restore(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    _save(mgr, 10, 2.0)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(7)  # move the generators on
    path = mgr.latest()
    assert path.name == "step-0000010"
    tensors, objects, meta = mgr.load(path)
    assert torch.equal(tensors["model"]["w"], torch.full((4, 4), 2.0))
    assert torch.equal(objects["optimizer"]["state"][0]["exp_avg"], torch.full((2,), 2.0))
    assert meta == {"step": 10, "data": {"epoch": 0, "pos": 10}}
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_rotation_keeps_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3, 4):
        _save(mgr, s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000004"]


def test_truncated_or_incomplete_falls_back_with_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    _save(mgr, 1, 1.0)
    p2 = _save(mgr, 2, 2.0)
    f = p2 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated tensor file
    with pytest.warns(UserWarning, match="step-0000002.*truncated"):
        assert mgr.latest().name == "step-0000001"
    p3 = _save(mgr, 3, 3.0)
    (p3 / "COMPLETE").unlink()  # interrupted before the marker
    with pytest.warns(UserWarning, match="no completion marker"):
        assert mgr.latest().name == "step-0000001"
    assert "sha256" in verify_checkpoint_altered(mgr, tmp_path)


def verify_checkpoint_altered(mgr, root):
    p = _save(mgr, 5, 5.0)
    f = p / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    return verify_checkpoint(p)


@pytest.mark.parametrize("stage", ["tensors", "marker"])
def test_kill_during_write_leaves_previous_intact(tmp_path, stage):
    code = textwrap.dedent(f"""
        import torch
        from scripts.runtime.checkpoint import CheckpointManager
        m = CheckpointManager({str(tmp_path)!r}, keep=1)
        m.save(1, tensors={{"model": {{"w": torch.ones(3)}}}}, objects={{}}, meta={{}})
        import os; os.environ["LVD_FAULT_KILL_CHECKPOINT"] = {stage!r}
        m.save(2, tensors={{"model": {{"w": torch.zeros(3)}}}}, objects={{}}, meta={{}})
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(_repo_root()))
    assert r.returncode == -9  # SIGKILL
    mgr = CheckpointManager(tmp_path, keep=1)
    latest = mgr.latest()
    assert latest.name == "step-0000001"
    assert torch.equal(mgr.load(latest)[0]["model"]["w"], torch.ones(3))


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_ema_tracks_and_warms_up():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.9, 2/11) = 0.1818
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update(model)
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_guard_skips_then_stops():
    g = NonFiniteGuard(max_in_row=3)
    assert g.check(1.0, 0)
    assert not g.check(float("nan"), 1)
    assert not g.check(float("inf"), 2)
    assert g.check(0.5, 3) and g.in_row == 0 and g.total == 2
    g.check(float("nan"), 4)
    g.check(float("nan"), 5)
    with pytest.raises(TrainingStopped, match="3 non-finite"):
        g.check(float("nan"), 6)


def test_metrics_truncate_after(tmp_path):
    m = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        m.write({"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut by a crash
    m.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_ema_state_loads_onto_the_models_device():
    """Checkpoints load on the CPU; after a resume on a GPU the averages must stay on the model's
    device (the meta device stands in for CUDA here)."""
    model = torch.nn.Linear(3, 2).to("meta")
    ema = EMA(model, decay=0.9)
    ema.load_state_dict({k: torch.ones(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()}, 7)
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in ema.shadow.values())
    assert ema.num_updates == 7


def test_each_micro_batch_of_an_accumulation_window_draws_its_own_numbers():
    from scripts.runtime.training import seed_step

    draws = [torch.randn(4, generator=seed_step(0, 5, 0, "cpu", micro=m)) for m in (0, 1, 2)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    again = torch.randn(4, generator=seed_step(0, 5, 0, "cpu", micro=1))
    assert torch.equal(draws[1], again)  # still a pure function of (seed, step, rank, micro)
    assert torch.equal(draws[0], torch.randn(4, generator=seed_step(0, 5, 0, "cpu")))


class _AmpAccelerator:
    """What grad_norms / finish_step use of accelerate's Accelerator under fp16, with a real GradScaler."""

    def __init__(self, optimizer):
        self.scaler, self.optimizer = torch.amp.GradScaler("cpu", init_scale=1024.0), optimizer

    def unscale_gradients(self):
        self.scaler.unscale_(self.optimizer)


class _ScaledOptimizer:
    """accelerate's AcceleratedOptimizer.step under fp16: scaler.step, then scaler.update."""

    def __init__(self, opt, acc):
        self.opt, self.acc = opt, acc

    def step(self):
        self.acc.scaler.step(self.opt)
        self.acc.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


def test_fp16_skipped_step_updates_the_scaler_and_the_next_step_works():
    from scripts.runtime.training import finish_step, grad_norms

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = _AmpAccelerator(opt)
    wrapped, sched = _ScaledOptimizer(opt, acc), torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for poison in (True, False):
        loss = model(torch.ones(2, 3)).sum() * (float("inf") if poison else 1.0)
        acc.scaler.scale(loss).backward()
        (norm,) = grad_norms(acc, [model.parameters()], 1.0)  # unscales once; a second unscale_ would raise
        finish_step(acc, np.isfinite(norm), wrapped, sched)
        if poison:
            assert not np.isfinite(norm) and acc.scaler.get_scale() == 512.0  # lowered, as on an overflow
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert np.isfinite(norm) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_job_without_workers_gets_its_threads_back(monkeypatch):
    """encode_latents with 2 workers leaves the main process 1 thread; stage 2 run next in the same
    process (as the demo does) with 0 workers must get the default count back."""
    from scripts.runtime import training

    monkeypatch.setattr(training, "DEFAULT_CPU_THREADS", 2)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 2)
    training.limit_cpu_threads(2, "cpu")
    assert torch.get_num_threads() == 1
    training.limit_cpu_threads(0, "cpu")
    assert torch.get_num_threads() == 2
    training.limit_cpu_threads(1, "cpu")
    assert torch.get_num_threads() == 1
