"""`make demo`'s driver end to end at tiny budgets: every stage through its command line, the text
model as the demo trains it, playable videos and the report at the end."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from scripts import demo


def test_demo_runs_end_to_end_and_trains_its_text_model_with_the_pooled_text_standardised(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--output-dir", str(out), "--num-videos", "6", "--vae-steps", "2", "--diffusion-steps", "3",
            "--num-samples", "2", "--sample-steps", "3"]
    assert demo.main(argv) == 0
    config = json.loads((out / "diffusion" / "export" / "config.json").read_text())
    assert config["unet"]["text_pool_norm"] is True  # the demo's choice (README "The demo")
    weights = load_file(str(out / "diffusion" / "export" / "model.safetensors"))
    # the statistics were gathered from the training captions (the EMA copy is what the export holds)
    assert int(weights["text_pool_count"]) > 0
    assert float(weights["text_pool_var"].min()) > 0 and not bool((weights["text_pool_mean"] == 0).all())
    report = json.loads((out / "report.json").read_text())
    assert len(report["prompts"]) == 2 and set(report["seconds"]) == set(demo.STAGES)
    videos = sorted((out / "samples").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 0 for v in videos)
    assert (out / "report.html").exists()
    # a second run finds every stage done and redoes none
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert capsys.readouterr().out.count("already done") == len(demo.STAGES)
