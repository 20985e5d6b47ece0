"""scripts.benchmark --quick: one valid JSON line per figure, finite positive numbers, and without
diffusers the reference figures are null with a reason (never a crash)."""

import json
import math
import sys

from scripts import benchmark

EXPECTED = {
    "vae_encode": ("ms", "frames_per_s", "gflops", "gflop_per_s", "peak_mem_mb"),
    "vae_decode": ("ms", "frames_per_s", "gflops", "gflop_per_s", "peak_mem_mb"),
    "reader": ("reader_samples_per_s", "train_step_ms", "train_samples_per_s", "reader_headroom"),
    "unet_train_step": ("ms", "ms_per_frame", "gflops", "gflop_per_s", "peak_mem_mb", "params_m"),
    "sampling": ("ms", "s_per_video", "ms_per_nfe", "nfe"),
}


def test_quick_run_prints_finite_figures_and_null_references_without_diffusers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importlib.util.find_spec -> None: "not installed"
    out_file = tmp_path / "bench.jsonl"
    rc = benchmark.main(["--quick", "--repeats", "1", "--threads", "1", "--output", str(out_file)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]

    assert rc == 0
    assert printed == [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {line["bench"] for line in printed} == set(EXPECTED)
    for line in printed:
        assert "error" not in line, line
        for key in EXPECTED[line["bench"]]:
            assert isinstance(line[key], (int, float)) and math.isfinite(line[key]) and line[key] > 0, (key, line)
        assert line["device"] == "cpu" and line["dtype"] == "fp32" and line["mem_method"]
        assert len(line["loadavg"]) == 3
        if line["bench"] in ("vae_encode", "vae_decode", "unet_train_step"):
            assert line["reference"] is None and "diffusers is not installed" in line["reference_reason"]
    unet = [line for line in printed if line["bench"] == "unet_train_step"]
    assert sorted(line["gc"] for line in unet) == [False, True]  # with and without gradient checkpointing
    checkpointed = next(line for line in unet if line["gc"])
    plain = next(line for line in unet if not line["gc"])
    assert checkpointed["gflops"] > plain["gflops"]  # recomputed forward is counted
    reader = next(line for line in printed if line["bench"] == "reader")
    assert reader["reader_headroom"] > 1
