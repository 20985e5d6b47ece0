"""train.fsdp: stage 2 with parameters, gradients, optimizer state and EMA sharded over 2 CPU
processes (torch FSDP2 on gloo, launched by `accelerate launch`); full-state checkpoints that
resume bit-exactly, an export loadable without FSDP, and the same losses as DDP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from helpers import AE_TINY, DIFF_TINY, ROOT, read_metrics, run_script, script_env
from safetensors.torch import load_file

from diffusion.unet3d import UNet3D
from scripts.runtime.export import load_diffusion_export


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(pipeline, out, steps, *extra, env=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_port()),
           "-m", "scripts.train_diffusion", "--config", str(DIFF_TINY), "--shards", str(pipeline.shards),
           "--output-dir", str(out), "--max-steps", str(steps), "train.checkpoint_every=2", "train.log_every=1",
           *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _hashes(out, rank):
    return [r["sha256"] for r in read_metrics(out / f"param-hash-rank{rank}.jsonl")]


@pytest.mark.slow
def test_fsdp_trains_sharded_resumes_exactly_and_exports_a_plain_model(pipeline, tmp_path):
    env = script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf"), LVD_DEBUG_PARAM_HASH="1",
                     LVD_DEBUG_PEAK_MEMORY="1")
    whole, resumed, ddp = tmp_path / "whole", tmp_path / "resumed", tmp_path / "ddp"
    for out, steps in ((whole, 4), (resumed, 2), (resumed, 4)):
        done = _launch(pipeline, out, steps, "train.fsdp=true", env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "resumed from" in done.stdout + done.stderr
    done = _launch(pipeline, ddp, 4, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    # each process held half of the parameters (the DDP processes all of them)
    mem = {name: [json.loads((d / f"memory-rank{r}.json").read_text()) for r in (0, 1)] for name, d in
           (("fsdp", whole), ("ddp", ddp))}
    full = mem["ddp"][0]["parameter_mb"]
    assert all(m["sharded"] and m["parameter_mb"] == pytest.approx(full / 2, rel=0.02) for m in mem["fsdp"])
    # the same full weights on both processes after every step, and the resumed run equal to the bit
    assert _hashes(whole, 0) == _hashes(whole, 1) and len(set(_hashes(whole, 0))) == 4
    assert _hashes(resumed, 0) == _hashes(whole, 0)
    # the losses of DDP (the same run but for the reduction order)
    losses = {d.name: [r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (whole, resumed, ddp)}
    assert losses["whole"] == losses["resumed"]
    assert losses["whole"] == pytest.approx(losses["ddp"], rel=1e-4)

    # the checkpoint holds full tensors: a plain UNet3D loads them; the export samples without FSDP
    ckpt = whole / "checkpoints" / "step-0000004"
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["fsdp"] is True
    model, export_meta = load_diffusion_export(whole / "export")
    plain = UNet3D(export_meta["unet_config"])
    for name in ("model", "ema"):
        state = load_file(str(ckpt / f"{name}.safetensors"))
        assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    r = run_script("sample", "--checkpoint", whole / "export", "--num-samples", "1", "--steps", "2",
                   "--output-dir", tmp_path / "samples")
    assert r.returncode == 0, r.stderr

    # the checkpoint cannot be resumed without train.fsdp (nor a DDP one with it): named, nothing lost
    done = _launch(pipeline, whole, 6, env=env)
    assert done.returncode != 0 and "train.fsdp=true" in done.stdout + done.stderr
    done = _launch(pipeline, ddp, 6, "train.fsdp=true", env=env)
    assert done.returncode != 0 and "train.fsdp=false" in done.stdout + done.stderr
    assert sorted(p.name for p in (whole / "checkpoints").iterdir())[-1] == "step-0000004"


def test_fsdp_needs_processes_and_is_stage_2_only(pipeline, tmp_path):
    r = run_script("train_diffusion", "--config", DIFF_TINY, "--shards", pipeline.shards, "--output-dir",
                   tmp_path / "d", "--max-steps", "1", "train.fsdp=true")
    assert r.returncode == 2 and "accelerate launch" in r.stderr
    r = run_script("train_autoencoder", "--config", AE_TINY, "--data", pipeline.data, "--output-dir",
                   tmp_path / "a", "--max-steps", "1", "train.fsdp=true")
    assert r.returncode == 2 and "stage 2 (train_diffusion) only" in r.stderr
