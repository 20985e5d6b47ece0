"""Reliability of both training scripts: SIGKILL at random points and during checkpoint writes,
then restart, gives bit-identical per-step metrics and weights; damaged checkpoints are never
loaded; non-finite steps are skipped, counted, and stop the run cleanly; bad inputs and configs
are exit code 2 naming the culprit; two processes stay in sync, see each sample once and resume."""

import json
import math
import random
import shutil
import signal

import pytest
import torch
from helpers import (
    AE_TINY,
    DIFF_TINY,
    read_metrics,
    run_script,
    script_env,
    start_script,
    steps_of,
    wait_for_step,
)
from safetensors.torch import load_file

from scripts import train_autoencoder, train_diffusion
from scripts.runtime.checkpoint import MARKER, CheckpointManager, verify_checkpoint

N = 8  # steps of the kill/resume runs: stage 1 crosses 2 epochs (3 batches each), stage 2 one (8 clip batches)


def ae_args(pipeline, out, steps):
    return ["--config", AE_TINY, "--data", pipeline.data, "--output-dir", out, "--max-steps", steps,
            "data.frames_per_video=2", "val.every=4", "val.num_images=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.num_workers=0"]  # fmt: skip


def diff_args(pipeline, out, steps, workers=0):
    return ["--config", DIFF_TINY, "--shards", pipeline.shards, "--output-dir", out, "--max-steps", steps,
            "train.checkpoint_every=2", "train.log_every=1", f"train.num_workers={workers}"]  # fmt: skip


SCRIPTS = {  # name: (module, args(pipeline, out, steps), in-process main)
    "autoencoder": ("train_autoencoder", ae_args, train_autoencoder.main),
    "diffusion": ("train_diffusion", diff_args, train_diffusion.main),
    "diffusion-2-workers": ("train_diffusion", lambda p, o, s: diff_args(p, o, s, workers=2), train_diffusion.main),
}


def in_process(name, pipeline, out, steps, *extra):
    _, args, main = SCRIPTS[name]
    return main([str(a) for a in args(pipeline, out, steps)] + list(extra))


# ----------------------------------------------------------------------------- 1. kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("name", ["autoencoder", "diffusion-2-workers"])
def test_killed_and_restarted_run_is_bit_identical(pipeline, tmp_path, name):
    module, args, _ = SCRIPTS[name]
    ref = tmp_path / "ref"
    done = run_script(module, *args(pipeline, ref, N))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    cmd, metrics = args(pipeline, run, N), run / "metrics.jsonl"

    # a) killed while writing its first checkpoint, before the COMPLETE marker
    died = run_script(module, *cmd, env=script_env(LVD_FAULT_KILL_CHECKPOINT="marker"))
    assert died.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "step-0000002.tmp").is_dir() and not (run / "checkpoints" / "step-0000002").exists()
    # b) killed at a random moment after its first checkpoint (maybe mid-step, maybe mid-write)
    kill_at = random.randint(3, N - 2)
    proc = start_script(module, *cmd, log=tmp_path / "b.log")
    assert wait_for_step(proc, metrics, kill_at) is not None, (tmp_path / "b.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    # c) killed in the middle of writing the tensors of its next checkpoint
    died = run_script(module, *cmd, env=script_env(LVD_FAULT_KILL_CHECKPOINT="tensors"))
    assert died.returncode == -signal.SIGKILL and "resumed from" in died.stdout, died.stderr[-3000:]
    # d) restarted with the same command: finishes
    done = run_script(module, *cmd)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-3000:]

    want, got = read_metrics(ref / "metrics.jsonl"), read_metrics(metrics)
    assert steps_of(got) == list(range(1, N + 1)), f"killed at step >= {kill_at}"
    for a, b in zip(want, got):  # exact float equality: loss, grad_norm, every loss term, lr
        assert a == b, f"step {a['step']} differs after kills (killed at step >= {kill_at}): {a} != {b}"
    assert read_metrics(ref / "metrics.jsonl", split="val") == read_metrics(metrics, split="val")
    assert (ref / "export" / "model.safetensors").read_bytes() == (run / "export" / "model.safetensors").read_bytes()
    assert not list((run / "checkpoints").glob("*.tmp"))


# ----------------------------------------------------------------------------- 2. damaged checkpoints


def _truncate(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _unmark(ckpt):
    (ckpt / MARKER).unlink()


@pytest.mark.parametrize("name, damage", [("diffusion", _truncate), ("diffusion", _unmark), ("autoencoder", _truncate)])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(pipeline, tmp_path, name, damage):
    out = tmp_path / "run"
    assert in_process(name, pipeline, out, 4) == 0
    first = read_metrics(out / "metrics.jsonl")
    damage(out / "checkpoints" / "step-0000004")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-0000004"):
        assert in_process(name, pipeline, out, 6) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert steps_of(rows) == [1, 2, 3, 4, 5, 6]  # steps 3-4 were redone from step 2, not repeated
    assert rows[:4] == first  # ... and came out exactly as before
    for step in (4, 6):
        assert verify_checkpoint(out / "checkpoints" / f"step-{step:07d}") is None


# ----------------------------------------------------------------------------- 3. non-finite steps


@pytest.mark.parametrize("fault", ["LVD_FAULT_NAN_STEPS", "LVD_FAULT_INF_GRAD_STEPS"])
@pytest.mark.parametrize("name", ["diffusion", "autoencoder"])
def test_poisoned_steps_are_skipped_counted_and_leave_the_weights_alone(pipeline, tmp_path, monkeypatch, name, fault):
    """A NaN loss, or an inf gradient behind a finite loss, at steps 3 and 4."""
    monkeypatch.setenv(fault, "3,4")
    out = tmp_path / "run"
    assert in_process(name, pipeline, out, 5, "train.checkpoint_every=1", "train.keep_checkpoints=10") == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 0]
    if "GRAD" in fault:
        assert all(math.isfinite(r["loss"]) for r in rows)  # only the gradient was poisoned
    assert [math.isfinite(r["grad_norm"]) for r in rows] == [True, True, False, False, True]
    assert [r["nonfinite_total"] for r in rows] == [0, 0, 1, 2, 2]
    weights = {s: load_file(str(out / "checkpoints" / f"step-{s:07d}" / "model.safetensors")) for s in (2, 3, 4, 5)}
    for k in weights[2]:
        assert torch.equal(weights[2][k], weights[3][k]) and torch.equal(weights[2][k], weights[4][k]), k
    assert any(not torch.equal(weights[4][k], weights[5][k]) for k in weights[4]), "training went on at step 5"
    assert all(torch.isfinite(v).all() for v in weights[5].values())


@pytest.mark.parametrize("name", ["diffusion", "autoencoder"])
def test_too_many_nonfinite_steps_in_a_row_stop_with_exit_2(pipeline, tmp_path, monkeypatch, capsys, name):
    monkeypatch.setenv("LVD_FAULT_NAN_STEPS", "3,4,5,6")
    out = tmp_path / "run"
    assert in_process(name, pipeline, out, 8, "train.max_nonfinite=3") == 2
    err = capsys.readouterr().err
    assert "3 non-finite losses/gradients in a row" in err and "step 5" in err and "Traceback" not in err
    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2, 3, 4]
    ckpts = CheckpointManager(out / "checkpoints")
    latest = ckpts.latest()
    assert latest.name == "step-0000004" and not list((out / "checkpoints").glob("*.tmp"))
    tensors, _, meta = ckpts.load(latest)
    assert meta["guard"] == {"in_row": 2, "total": 2}
    good = load_file(str(out / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert all(torch.equal(good[k], tensors["model"][k]) for k in good)  # the skipped steps changed nothing
    monkeypatch.delenv("LVD_FAULT_NAN_STEPS")
    assert in_process(name, pipeline, out, 6) == 0  # the cause fixed: resumes and finishes
    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- 4. bad input


def _copy_shards(pipeline, tmp_path):
    return shutil.copytree(pipeline.shards, tmp_path / "shards")


def _truncated_tar(pipeline, tmp_path):
    shards = _copy_shards(pipeline, tmp_path)
    tar = shards / "video-000001.tar"
    tar.write_bytes(tar.read_bytes()[:10000])
    return shards, "video-000001.tar"


def _tampered_count(pipeline, tmp_path):
    shards = _copy_shards(pipeline, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["samples"] -= 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, "video-000000.tar"


def _missing(pipeline, tmp_path):
    return tmp_path / "nowhere", "nowhere"


def _empty(pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "empty"


def _missing_shard(pipeline, tmp_path):
    shards = _copy_shards(pipeline, tmp_path)
    (shards / "video-000001.tar").unlink()
    return shards, "video-000001.tar"


def _bad_manifest_json(pipeline, tmp_path):
    shards = _copy_shards(pipeline, tmp_path)
    (shards / "manifest.json").write_text("{not json")
    return shards, "manifest.json"


@pytest.mark.parametrize("make", [_missing, _empty, _truncated_tar, _tampered_count, _missing_shard, _bad_manifest_json])
def test_bad_shards_are_exit_2_naming_the_file(pipeline, tmp_path, capsys, make):
    shards, culprit = make(pipeline, tmp_path)
    argv = ["--config", str(DIFF_TINY), "--shards", str(shards), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "8", "train.checkpoint_every=100"]  # fmt: skip
    assert train_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "export").exists()


def test_shards_of_another_autoencoder_are_refused(pipeline, tmp_path, capsys):
    from autoencoder.model import FrameVAE

    torch.manual_seed(7)
    other = FrameVAE(FrameVAE.from_pretrained(pipeline.vae).config).save_pretrained(tmp_path / "other")
    argv = [str(a) for a in diff_args(pipeline, tmp_path / "run", 2)] + [f"sample.autoencoder={other}"]
    assert train_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "autoencoder" in err and "re-encode" in err


@pytest.mark.parametrize("data", ["nowhere", "empty"])
def test_bad_stage1_data_is_exit_2_naming_the_folder(tmp_path, capsys, data):
    (tmp_path / "empty").mkdir()
    argv = ["--config", str(AE_TINY), "--data", str(tmp_path / data), "--output-dir", str(tmp_path / "run")]
    assert train_autoencoder.main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / data) in err and "Traceback" not in err


@pytest.mark.parametrize("override, key", [("train.bogus=1", "train.bogus"), ("data.image_ratio=lots", "data.image_ratio"),
                                           ("model.channel_mult=[1,x]", "model.channel_mult"),
                                           ("train.mixed_precision=fp8", "train.mixed_precision")])  # fmt: skip
def test_bad_stage2_config_is_exit_2_naming_the_key(pipeline, tmp_path, capsys, override, key):
    argv = [str(a) for a in diff_args(pipeline, tmp_path / "run", 2)] + [override]
    assert train_diffusion.main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 5. two processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_2_procs(pipeline, out, steps, env):
    """`accelerate launch` with 2 CPU processes (gloo), 2 DataLoader workers each. (`--cpu` would
    start one process only: accelerate's simple launcher; torchrun's is used with --multi_gpu.)"""
    import subprocess
    import sys

    from helpers import ROOT

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           "-m", "scripts.train_diffusion", *map(str, diff_args(pipeline, out, steps, workers=2)),
           "train.checkpoint_every=1", "train.keep_checkpoints=10"]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_stay_in_sync_see_each_sample_once_and_resume(pipeline, tmp_path):
    import tarfile

    env = script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf"),  # no user accelerate config
                     LVD_DEBUG_PARAM_HASH="1", LVD_DEBUG_SAMPLE_KEYS="1")  # fmt: skip
    out = tmp_path / "run"
    # 16 clips / (2 ranks x batch 2) = 4 steps per epoch: run half of it, then resume for the rest
    for steps in (2, 4):
        done = _launch_2_procs(pipeline, out, steps, env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "resumed from" in done.stdout + done.stderr

    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2, 3, 4]  # logged once, by the main process
    hashes = [{r["step"]: r["sha256"] for r in read_metrics(out / f"param-hash-rank{r}.jsonl")} for r in (0, 1)]
    assert sorted(hashes[0]) == [1, 2, 3, 4] and hashes[0] == hashes[1]  # identical weights after every step
    assert len(set(hashes[0].values())) == 4  # ... that did change every step
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:07d}" for s in (1, 2, 3, 4)]  # no .tmp left
    for p in ckpts.iterdir():
        assert verify_checkpoint(p) is None
        assert {"rng-rank0.json", "rng-rank1.json"} <= {f.name for f in p.iterdir()}

    every = set()
    for tar in sorted(pipeline.shards.glob("video-*.tar")):
        with tarfile.open(tar) as t:
            every |= {name.split(".")[0] for name in t.getnames()}
    seen = []
    for rank in (0, 1):
        rows = read_metrics(out / f"sample-keys-rank{rank}.jsonl")
        assert steps_of(rows) == [1, 2, 3, 4] and {r["epoch"] for r in rows} == {0}
        seen += [k for r in rows for k in r["keys"]]
    assert len(every) == 16 and sorted(seen) == sorted(every)  # each sample exactly once in the epoch: 0 lost


@pytest.mark.slow
def test_two_process_encoding_writes_disjoint_shards_and_one_merged_manifest(pipeline, tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank encodes its own inputs into its own
    shards, the main process merges manifest and stats; the result holds the same samples as a
    single-process run (latents equal up to float16 rounding), and verifies."""
    import io
    import subprocess
    import sys
    import tarfile

    import numpy as np
    from helpers import ENCODE_DEMO, ROOT

    from data.shards import load_manifest, verify_shards
    from scripts import encode_latents

    common = ["--autoencoder", str(pipeline.vae), "--data", str(pipeline.data), "--config", str(ENCODE_DEMO),
              "encode.num_workers=0", "encode.videos_per_shard=2"]  # fmt: skip
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert encode_latents.main([*common, "--output-dir", str(single)]) == 0
    env = script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           "-m", "scripts.encode_latents", *common, "--output-dir", str(multi)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    a, b = load_manifest(single), load_manifest(multi)
    assert a["totals"] == b["totals"] and a["totals"]["video_samples"] == 16
    assert sorted(s["name"] for s in a["shards"]) == sorted(s["name"] for s in b["shards"])
    assert verify_shards(multi).ok and not list(multi.glob("*.tmp"))
    for key in ("mean", "std"):
        np.testing.assert_allclose(json.loads((single / "stats.json").read_text())[key],
                                   json.loads((multi / "stats.json").read_text())[key], rtol=1e-3, atol=1e-4)  # fmt: skip

    def members(folder):
        out = {}
        for tar in sorted(folder.glob("video-*.tar")):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    data = t.extractfile(m).read()
                    out[m.name] = np.load(io.BytesIO(data)).astype(np.float32) if m.name.endswith(".npy") else data
        return out

    x, y = members(single), members(multi)
    assert x.keys() == y.keys() and len(x) == 3 * 16
    for k in x:
        if k.endswith(".npy"):
            np.testing.assert_allclose(x[k], y[k], atol=2e-3, rtol=2e-3)
        else:
            assert x[k] == y[k], k
