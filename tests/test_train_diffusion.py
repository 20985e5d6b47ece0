"""scripts.train_diffusion from the command line (in-process main): checkpoint, metrics, resolved
config and export (latent stats, autoencoder hash) of a short run; resume without repeated steps;
a config that does not match the checkpoint is refused; joint image+video batches and video only."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import DIFF_TINY, read_metrics, steps_of
from safetensors.torch import load_file

from autoencoder.model import weights_hash
from diffusion.process import GaussianDiffusion
from scripts import train_diffusion
from scripts.runtime.checkpoint import MARKER, verify_checkpoint
from scripts.runtime.export import load_diffusion_export


def train(shards, out, *extra, steps=2):
    argv = ["--config", str(DIFF_TINY), "--shards", str(shards), "--output-dir", str(out), "--max-steps", str(steps)]
    return train_diffusion.main(argv + list(extra))


@pytest.fixture(scope="module")
def run2(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "run"
    assert train(pipeline.shards, out) == 0
    return out


def test_short_run_writes_checkpoint_metrics_config_export(pipeline, run2):
    ckpt = run2 / "checkpoints" / "step-0000002"
    assert (ckpt / MARKER).exists() and verify_checkpoint(ckpt) is None
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert trainer["step"] == 2 and trainer["data"]["video"] == {"epoch": 0, "batches": 2}
    rows = read_metrics(run2 / "metrics.jsonl")
    assert steps_of(rows) == [1, 2]
    assert all({"step", "loss", "lr", "loss_video", "loss_image", "grad_norm"} <= set(r) for r in rows)
    cfg = yaml.safe_load((run2 / "config.yaml").read_text())
    assert cfg["model"]["in_channels"] == 4 and cfg["model"]["num_classes"] == 3  # decided by the shards
    assert cfg["train"]["max_steps"] == 2 and cfg["data"]["shards"] == str(pipeline.shards)

    model, meta = load_diffusion_export(run2 / "export")
    stats = json.loads((pipeline.shards / "stats.json").read_text())
    assert meta["latent"]["stats"] == stats and meta["latent"]["shape"] == [4, 8, 8] and meta["latent"]["clip_len"] == 8
    assert meta["latent"]["fps"] > 0
    assert meta["autoencoder"]["weights_sha256"] == weights_hash(pipeline.vae)
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert (meta["unet_config"].num_classes, meta["unet_config"].base_channels) == (3, 16)
    ema = load_file(str(ckpt / "ema.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), ema[k]), k


def test_resume_continues_without_repeating_steps(pipeline, run2, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run2, out)
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert train(pipeline.shards, out, steps=4) == 0
    assert "resumed from" in capsys.readouterr().out
    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2, 3, 4]
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == before
    trainer = json.loads((out / "checkpoints" / "step-0000004" / "trainer.json").read_text())
    assert trainer["data"]["video"] == {"epoch": 0, "batches": 4}  # the data position carried on
    load_diffusion_export(out / "export")


@pytest.mark.parametrize("override, key", [("model.base_channels=8", "base_channels"),
                                           ("diffusion.prediction=eps", "prediction")])  # fmt: skip
def test_config_checkpoint_mismatch_is_refused(pipeline, run2, tmp_path, capsys, override, key):
    out = tmp_path / "run"
    shutil.copytree(run2, out)
    assert train(pipeline.shards, out, override, steps=4) == 2
    err = capsys.readouterr().err
    assert "step-0000002" in err and key in err and "Traceback" not in err
    assert steps_of(read_metrics(out / "metrics.jsonl")) == [1, 2]
    assert not (out / "checkpoints" / "step-0000004").exists()


@pytest.fixture
def seen_shapes(monkeypatch):
    """Shapes of every x0 that goes through the training loss."""
    shapes, original = [], GaussianDiffusion.training_losses

    def spy(self, model, x0, **kwargs):
        shapes.append(tuple(x0.shape))
        return original(self, model, x0, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    return shapes


def test_images_from_video_only_shards_are_single_frames(pipeline, tmp_path, seen_shapes):
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "data.image_ratio=1.5", steps=1) == 0
    # B = 2 clips [2,4,8,8,8]; round(1.5 * 2) = 3 images: random single frames [3,4,1,8,8]
    assert seen_shapes == [(3, 4, 1, 8, 8), (2, 4, 8, 8, 8)]
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["loss_image"] > 0 and row["loss_video"] > 0


def test_video_only(pipeline, tmp_path, seen_shapes):
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "data.image_ratio=0", steps=2) == 0
    assert seen_shapes == [(2, 4, 8, 8, 8)] * 2
    rows = read_metrics(out / "metrics.jsonl")
    assert steps_of(rows) == [1, 2] and all("loss_image" not in r for r in rows)
    assert "images" not in json.loads((out / "checkpoints" / "step-0000002" / "trainer.json").read_text())["data"]
    load_diffusion_export(out / "export")
