"""scripts.train_autoencoder from the command line (in-process main): checkpoint, metrics, resolved
config and export of a short run; resume without repeated steps; clear errors for bad configs and
for resuming with a different model."""

import json

import pytest
import torch
import yaml
from helpers import AE_TINY, read_metrics, steps_of
from safetensors.torch import load_file

from autoencoder.model import FrameVAE
from scripts import train_autoencoder
from scripts.runtime.checkpoint import MARKER, verify_checkpoint

SMALL = ["data.frames_per_video=2", "val.num_images=2"]


def train(data, out, *extra, steps=2):
    argv = ["--config", str(AE_TINY), "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps)]
    return train_autoencoder.main(argv + SMALL + list(extra))


@pytest.fixture(scope="module")
def run2(pipeline, tmp_path_factory):
    """A finished 2-step run (read-only for the tests below that only inspect it)."""
    out = tmp_path_factory.mktemp("ae") / "run"
    assert train(pipeline.data, out) == 0
    return out


def test_short_run_writes_checkpoint_metrics_config_export(run2):
    ckpt = run2 / "checkpoints" / "step-0000002"
    assert (ckpt / MARKER).exists() and verify_checkpoint(ckpt) is None
    assert {"model.safetensors", "discriminator.safetensors", "ema.safetensors", "optimizer.pt",
            "optimizer_disc.pt", "trainer.json", "rng-rank0.json"} <= {p.name for p in ckpt.iterdir()}  # fmt: skip
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 2
    rows = read_metrics(run2 / "metrics.jsonl")
    assert steps_of(rows) == [1, 2]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "skipped"} <= set(r) and r["lr"] > 0
        assert torch.isfinite(torch.tensor(r["loss"]))
    cfg = yaml.safe_load((run2 / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 2 and cfg["data"]["frames_per_video"] == 2
    assert cfg["model"]["base_channels"] == 16 and cfg["data"]["source"].endswith("data")
    vae = FrameVAE.from_pretrained(run2 / "export")
    assert (vae.config.base_channels, vae.config.latent_channels) == (16, 4)
    # the export holds the EMA weights of the last checkpoint
    ema = load_file(str(ckpt / "ema.safetensors"))
    for k, v in vae.state_dict().items():
        assert torch.equal(v.float(), ema[k]), k
    assert read_metrics(run2 / "metrics.jsonl", split="val"), "final validation is logged"


def test_resume_continues_without_repeating_steps(pipeline, run2, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run2, out)
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert train(pipeline.data, out, steps=4) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert steps_of(rows) == [1, 2, 3, 4]
    assert (out / "metrics.jsonl").read_text().splitlines()[: len(before)] == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    FrameVAE.from_pretrained(out / "export")


@pytest.mark.parametrize("extra, key", [(["model.bogus_key=1"], "model.bogus_key"),
                                        (["train.batch_size=four"], "train.batch_size")])  # fmt: skip
def test_bad_override_is_exit_2_naming_the_key(pipeline, tmp_path, capsys, extra, key):
    assert train(pipeline.data, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_key_in_config_file(pipeline, tmp_path, capsys):
    cfg = yaml.safe_load(AE_TINY.read_text())
    cfg["train"]["bach_size"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(path), "--data", str(pipeline.data), "--output-dir", str(tmp_path / "run")]
    assert train_autoencoder.main(argv) == 2
    err = capsys.readouterr().err
    assert "train.bach_size" in err and str(path) in err


def test_resume_with_a_different_model_is_refused(pipeline, run2, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run2, out)
    config_before = (out / "config.yaml").read_text()
    assert train(pipeline.data, out, "model.base_channels=8", steps=4) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "base_channels" in err and "step-0000002" in err
    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2]  # nothing trained, nothing dropped
    assert (out / "config.yaml").read_text() == config_before  # the run's config is left alone


def test_fp16_is_refused_with_the_reason(pipeline, tmp_path, capsys):
    assert train(pipeline.data, tmp_path / "run", "train.mixed_precision=fp16") == 2
    err = capsys.readouterr().err
    assert "fp16" in err and "bf16" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_image_only_folder_trains_and_validates_without_clips(tmp_path, caplog):
    import numpy as np

    from data.video_io import write_png

    rng = np.random.default_rng(0)
    for i in range(12):
        write_png(tmp_path / "data" / f"class{i % 2}" / f"img{i:02d}.png", rng.integers(0, 255, (40, 36, 3), dtype=np.uint8))
    out = tmp_path / "run"
    assert train(tmp_path / "data", out, "data.val_fraction=0.25", "train.batch_size=2", "data.size=32", steps=2) == 0
    (val,) = read_metrics(out / "metrics.jsonl", split="val")
    assert {"psnr", "ssim"} <= set(val) and "flicker" not in val
    assert "no videos in the validation split" in caplog.text
    assert FrameVAE.from_pretrained(out / "export") is not None
