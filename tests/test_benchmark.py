"""scripts.benchmark --quick: one valid JSON line per figure, finite positive numbers, and without
diffusers the reference figures are null with a reason (never a crash)."""

import json
import math
import sys

from scripts import benchmark

EXPECTED = {
    "vae_encode": ("ms", "frames_per_s", "gflops", "gflop_per_s", "peak_mem_mb"),
    "vae_decode": ("ms", "frames_per_s", "gflops", "gflop_per_s", "peak_mem_mb"),
    "vae_encode_video": ("ms", "frames_per_s", "gflops"),
    "encode": ("s", "clips", "clips_per_s", "frames_per_s"),
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


def test_frechet_distance_known_values():
    import torch

    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(benchmark.frechet_distance(x, x)) < 1e-6
    # same covariance, mean shifted by (1, 2, 2): distance = |shift|^2 = 9
    assert abs(benchmark.frechet_distance(x, x + torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)) - 9.0) < 1e-6
    # N(0, I) vs N(0, 4I) in 3-D: 3 * (1 + 4 - 2 * 2) = 3, up to sampling error
    assert abs(benchmark.frechet_distance(x, 2 * torch.randn(4000, 3, dtype=torch.float64)) - 3.0) < 0.4


def test_sampler_quality_on_a_trained_model(pipeline, tmp_path, capsys):
    from helpers import DIFF_TINY

    from scripts import train_diffusion

    demo = tmp_path / "demo"
    (demo / "vae").mkdir(parents=True)
    (demo / "vae" / "export").symlink_to(pipeline.vae)
    (demo / "shards").symlink_to(pipeline.shards)
    argv = ["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(demo / "diffusion"),
            "--max-steps", "2"]  # fmt: skip
    assert train_diffusion.main(argv) == 0
    capsys.readouterr()
    assert benchmark.main(["--quick", "--only", "sampler_quality", "--demo-dir", str(demo), "--threads", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(ln["sampler"], ln["steps"]) for ln in lines] == [("ddpm", 250), ("dpmpp_2m", 5)]
    for ln in lines:
        assert math.isfinite(ln["fd_to_training"]) and ln["fd_to_training"] > 0 and ln["s_per_video"] > 0
        assert ln["tracked_videos"] >= 0
    assert "fd_to_ddpm250" not in lines[0] and lines[1]["fd_to_ddpm250"] > 0
    # without a finished demo: a clear error, no traceback
    assert benchmark.main(["--quick", "--only", "sampler_quality", "--demo-dir", str(tmp_path / "none")]) == 2
    assert "make demo" in capsys.readouterr().err
