"""The fast path's switches (train.compile, train.fused_adamw, train.channels_last): they train,
checkpoint and resume like the default path; compilation that fails falls back to eager."""

from __future__ import annotations

import json

import pytest
from helpers import DIFF_TINY, read_metrics, run_script, script_env

from scripts import benchmark, train_diffusion
from scripts.runtime.config import ConfigError, TrainConfig
from scripts.runtime.export import load_diffusion_export


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_compile_that_fails_falls_back_to_eager_with_the_same_losses(pipeline, tmp_path):
    common = ["--config", DIFF_TINY, "--shards", pipeline.shards, "--max-steps", "2"]
    assert train_diffusion.main([*map(str, common), "--output-dir", str(tmp_path / "eager"), "train.log_every=1"]) == 0
    # no working C++ compiler: inductor cannot build its kernels; the run warns and goes on eagerly
    r = run_script("train_diffusion", *common, "--output-dir", tmp_path / "compiled", "train.log_every=1", "train.compile=true",
                   env=script_env(CXX="/bin/false"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "C++ compiler" in r.stderr
    assert _losses(tmp_path / "compiled") == _losses(tmp_path / "eager") and len(_losses(tmp_path / "eager")) == 2
    model, _ = load_diffusion_export(tmp_path / "compiled" / "export")  # parameter names unchanged
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_fused_adamw_and_channels_last_train_checkpoint_and_resume_exactly(pipeline, tmp_path):
    common = ["--config", str(DIFF_TINY), "--shards", str(pipeline.shards)]
    sets = ["train.log_every=1", "train.checkpoint_every=2", "train.fused_adamw=on", "train.channels_last=true"]
    assert train_diffusion.main([*common, "--output-dir", str(tmp_path / "straight"), "--max-steps", "3", *sets]) == 0
    for n in (2, 3):
        assert train_diffusion.main([*common, "--output-dir", str(tmp_path / "resumed"), "--max-steps", str(n), *sets]) == 0
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight") and len(_losses(tmp_path / "straight")) == 3
    with pytest.raises(ConfigError, match="train.fused_adamw must be auto, on or off"):
        TrainConfig(fused_adamw="maybe")


def test_fastpath_benchmark_reports_each_variant_against_fp32(capsys):
    assert benchmark.main(["--quick", "--only", "fastpath", "--no-reference", "--threads", "1"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["dtype"], r["channels_last"], r["fused"]) for r in rows] == [("fp32", False, False), ("bf16", False, False),
                                                                           ("bf16", True, True)]  # fmt: skip
    assert all(r["gflops"] > 0 and r["ms"] > 0 for r in rows) and "speedup_vs_fp32_eager" in rows[1]
    assert rows[0]["gflops"] == rows[1]["gflops"]  # the same model: the same FLOPs, whatever the dtype
