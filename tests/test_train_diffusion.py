"""scripts.train_diffusion from the command line (in-process main): checkpoint, metrics, resolved
config and export (latent stats, autoencoder hash) of a short run; resume without repeated steps;
a config that does not match the checkpoint is refused; joint image+video batches and video only."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from helpers import DIFF_TINY, read_metrics, steps_of
from safetensors.torch import load_file

from autoencoder.model import weights_hash
from data import latents as latents_module
from data.synthetic import make_synthetic_video
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
def seen_calls(monkeypatch):
    """(x0 shape, keyword arguments, seed of the step's generator) of every training-loss call."""
    calls, original = [], GaussianDiffusion.training_losses

    def spy(self, model, x0, **kwargs):
        calls.append((tuple(x0.shape), kwargs, kwargs["generator"].initial_seed()))
        return original(self, model, x0, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    return calls


def shapes(calls):
    return [shape for shape, _, _ in calls]


def test_images_from_video_only_shards_are_single_frames(pipeline, tmp_path, seen_calls):
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "data.image_ratio=1.5", steps=1) == 0
    # B = 2 clips [2,4,8,8,8]; round(1.5 * 2) = 3 images: random single frames [3,4,1,8,8]
    assert shapes(seen_calls) == [(3, 4, 1, 8, 8), (2, 4, 8, 8, 8)]
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["loss_image"] > 0 and row["loss_video"] > 0


def test_video_only(pipeline, tmp_path, seen_calls):
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "data.image_ratio=0", steps=2) == 0
    assert shapes(seen_calls) == [(2, 4, 8, 8, 8)] * 2
    rows = read_metrics(out / "metrics.jsonl")
    assert steps_of(rows) == [1, 2] and all("loss_image" not in r for r in rows)
    assert "images" not in json.loads((out / "checkpoints" / "step-0000002" / "trainer.json").read_text())["data"]
    load_diffusion_export(out / "export")


def test_frames_are_given_and_unscored_only_when_the_model_is_frame_conditioned(pipeline, tmp_path, seen_calls):
    assert train(pipeline.shards, tmp_path / "a", "cond.frame_cond_prob=1.0", "data.image_ratio=0", steps=1) == 0
    (_, kw, _), = seen_calls
    mask, given = kw["frame_mask"], kw["model_kwargs"]["cond_mask"].flatten(1)
    assert torch.equal(mask, 1 - given) and 0 < given.sum(1).min() and given.sum(1).max() < 8  # 1..T-1 given
    seen_calls.clear()
    assert train(pipeline.shards, tmp_path / "b", "cond.frame_cond_prob=1.0", "data.image_ratio=0",
                 "model.frame_conditioning=false", steps=1) == 0  # fmt: skip
    (_, kw, _), = seen_calls
    assert kw["frame_mask"] is None and "cond_frames" not in kw["model_kwargs"]  # nothing given: every frame scored


def test_each_micro_batch_draws_its_own_noise(pipeline, tmp_path, seen_calls):
    assert train(pipeline.shards, tmp_path / "run", "train.grad_accum=2", steps=2) == 0
    seeds = [seed for _, _, seed in seen_calls]  # image pass, video pass per micro-batch
    assert len(seeds) == 8 and seeds[0] == seeds[1] and seeds[2] == seeds[3] and len(set(seeds[::2])) == 4
    assert steps_of(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [1, 2]


def test_image_shards_feed_the_image_batches(pipeline, tmp_path, monkeypatch, seen_calls):
    """A folder with videos and images: the images come from the image shards (already T = 1)."""
    import numpy as np

    from data.video_io import write_png
    from scripts import encode_latents

    data = tmp_path / "data"
    for i, video in enumerate(sorted(pipeline.data.rglob("*.mp4"))[:4]):
        (data / video.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, data / video.parent.name / video.name)
        write_png(data / video.parent.name / f"still{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
    shards = tmp_path / "shards"
    assert encode_latents.main(["--autoencoder", str(pipeline.vae), "--data", str(data), "--output-dir", str(shards),
                                "encode.size=32", "encode.clip_len=8", "encode.num_workers=0"]) == 0  # fmt: skip
    kinds, real = [], latents_module.make_latent_loader

    def spy(folder, *, kind, **kw):
        kinds.append(kind)
        return real(folder, kind=kind, **kw)

    monkeypatch.setattr(latents_module, "make_latent_loader", spy)
    assert train(shards, tmp_path / "run", "data.image_ratio=1.0", steps=1) == 0
    assert kinds == ["video", "image"] and shapes(seen_calls) == [(2, 4, 1, 8, 8), (2, 4, 8, 8, 8)]


def test_periodic_samples_are_decoded_and_record_the_autoencoder(pipeline, tmp_path):
    from scripts.runtime.generation import load_latent_file

    out = tmp_path / "run"
    assert train(pipeline.shards, out, "sample.every=1", "sample.num=1", "sample.steps=2",
                 f"sample.autoencoder={pipeline.vae}", steps=1) == 0  # fmt: skip
    latent, meta = load_latent_file(out / "samples" / "step0000001-000.safetensors")
    assert latent.shape == (4, 8, 8, 8) and meta["autoencoder_sha256"] == weights_hash(pipeline.vae)
    _, export = load_diffusion_export(out / "export")
    assert meta["fps"] == export["latent"]["fps"] and meta["label_name"] == "circle"
    assert (out / "samples" / "step0000001-000.mp4").exists() and (out / "samples" / "step0000001-000-strip.png").exists()


def test_periodic_samples_report_quality_against_the_decoded_data(pipeline, tmp_path):
    """The sample line in metrics.jsonl scores the decoded samples against decoded data clips; the
    scoring itself is tested in test_colour.py, here that it is wired to the right frames."""
    import json

    from scripts.runtime.generation import sample_quality

    out = tmp_path / "run"
    assert train(pipeline.shards, out, "sample.every=1", "sample.num=2", "sample.steps=2",
                 f"sample.autoencoder={pipeline.vae}", steps=1) == 0  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sample_lines = [x for x in lines if x.get("split") == "sample"]
    assert len(sample_lines) == 1 and sample_lines[0]["step"] == 1 and sample_lines[0]["videos"] == 2
    for key in ("found_whole", "colour_match", "colour_drift_de", "smoothness", "speed_px", "jump_rate"):
        assert key in sample_lines[0]
    # sample_quality's reference is the shards' first clips decoded by the same VAE
    from autoencoder.model import FrameVAE
    from data.latents import make_latent_loader
    from data.stats import un_whiten
    from data.synthetic import video_quality
    from scripts.runtime.generation import decode_to_uint8

    loader = make_latent_loader(pipeline.shards, kind="video", batch_size=4, shuffle_buffer=0, use_mean=True)
    stats = json.loads((pipeline.shards / "stats.json").read_text())
    ref = decode_to_uint8(FrameVAE.from_pretrained(pipeline.vae), un_whiten(next(iter(loader))["latent"], stats))
    fake = np.stack([make_synthetic_video(i, num_frames=8, size=32)[0] for i in range(3)])
    got = sample_quality(fake, pipeline.shards, str(pipeline.vae), num_reference=4)
    want = video_quality(list(fake), list(ref))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], nan_ok=True), k


def test_self_conditioned_model_trains_exports_and_samples(pipeline, tmp_path, seen_calls, monkeypatch):
    from scripts.runtime import generation
    from scripts.runtime.generation import load_latent_file

    flags, real = [], generation.sample

    def spy(*args, **kwargs):
        flags.append(kwargs.get("self_condition"))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "sample", spy)
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "model.self_condition=true", "data.image_ratio=0", "sample.every=2",
                 "sample.num=1", "sample.steps=2", steps=2) == 0  # fmt: skip
    assert [kw["self_condition"] for _, kw, _ in seen_calls] == [True, True]
    model, meta = load_diffusion_export(out / "export")
    assert meta["unet_config"].self_condition and model.input_conv.in_channels == 4 + 4 + 1 + 4
    latent, _ = load_latent_file(out / "samples" / "step0000002-000.safetensors")
    assert latent.shape == (4, 8, 8, 8) and torch.isfinite(latent).all()
    assert flags == [True]  # the periodic sample fed the model its own estimates


def test_temporal_loss_term_is_logged_and_exported(pipeline, run2, tmp_path):
    """diffusion.temporal_loss_weight on: loss_video includes the term (above the plain error,
    logged as mse_video); the export carries the key. Off (run2): no mse_video, key absent."""
    out = tmp_path / "run"
    assert train(pipeline.shards, out, "data.image_ratio=0", "diffusion.loss_weighting=none",
                 "diffusion.temporal_loss_weight=0.5", steps=1) == 0  # fmt: skip
    (row,) = read_metrics(out / "metrics.jsonl")
    assert 0 < row["mse_video"] < row["loss_video"]
    _, meta = load_diffusion_export(out / "export")
    assert meta["diffusion_config"].temporal_loss_weight == 0.5
    assert all("mse_video" not in r for r in read_metrics(run2 / "metrics.jsonl"))
    assert "temporal_loss_weight" not in json.loads((run2 / "export" / "config.json").read_text())["diffusion"]
