"""scripts.sample and scripts.decode_latents from the command line (in-process main) on a tiny
trained diffusion export: latent files with metadata, H.264 mp4 with the asked frame count,
extension past the training clip length, frame prediction keeping the given frames, and clear
refusals of a foreign autoencoder or an autoencoder export passed as the diffusion model."""

import json

import numpy as np
import pytest
import torch
from helpers import DIFF_TINY

from autoencoder.config import VAEConfig
from autoencoder.model import FrameVAE, weights_hash
from autoencoder.video import decode_video, encode_video
from data.stats import un_whiten
from data.transforms import resize_and_crop, to_tensor
from data.video_io import read_image, read_video, video_codec, video_info
from scripts import decode_latents, sample, train_diffusion
from scripts.runtime.generation import load_latent_file

FAST = ["--steps", "2", "--sampler", "ddim"]


@pytest.fixture(scope="module")
def export(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "run"
    argv = ["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out), "--max-steps", "2"]
    assert train_diffusion.main(argv) == 0
    return out / "export"


@pytest.fixture(scope="module")
def samples(pipeline, export, tmp_path_factory):
    """3 samples of 12 frames (the model was trained on 8-frame clips: extension), decoded to mp4."""
    out = tmp_path_factory.mktemp("samples")
    argv = ["--checkpoint", str(export), "--num-samples", "3", "--frames", "12", "--autoencoder", str(pipeline.vae),
            "--format", "mp4", "--output-dir", str(out), *FAST]  # fmt: skip
    assert sample.main(argv) == 0
    return out


def test_sample_writes_latents_with_metadata_and_h264_mp4(pipeline, samples):
    files = sorted(samples.glob("*.safetensors"))
    assert [f.stem for f in files] == ["sample-000-circle", "sample-001-square", "sample-002-triangle"]
    stats = json.loads((pipeline.shards / "stats.json").read_text())
    for i, f in enumerate(files):
        latent, meta = load_latent_file(f)
        assert latent.shape == (4, 12, 8, 8) and torch.isfinite(latent).all()
        assert meta["stats"] == stats and meta["autoencoder_sha256"] == weights_hash(pipeline.vae)
        assert meta["frames"] == 12 and meta["label"] == i and meta["fps"] > 0
        mp4 = f.with_suffix(".mp4")
        assert video_codec(mp4) == "h264"
        info = video_info(mp4)
        assert (info["num_frames"], info["height"], info["width"]) == (12, 32, 32)


def test_sample_is_reproducible_and_extension_keeps_the_first_window(pipeline, export, samples, tmp_path):
    # same seed, 8 frames (one window): the 12-frame samples' first 8 frames are this window
    argv = ["--checkpoint", str(export), "--num-samples", "3", "--frames", "8", "--output-dir", str(tmp_path),
            "--autoencoder", str(pipeline.vae), "--format", "png", *FAST]  # fmt: skip
    assert sample.main(argv) == 0
    short, _ = load_latent_file(tmp_path / "sample-001-square.safetensors")
    long, _ = load_latent_file(samples / "sample-001-square.safetensors")
    assert short.shape[1] == 8
    torch.testing.assert_close(long[:, :8], short)
    assert len(list((tmp_path / "sample-001-square-frames").glob("*.png"))) == 8


def test_init_video_known_frames_are_kept_exactly(pipeline, export, tmp_path):
    video = sorted(pipeline.data.rglob("*.mp4"))[0]
    k = 3
    argv = ["--checkpoint", str(export), "--num-samples", "2", "--frames", "8", "--init-video", str(video),
            "--known-frames", str(k), "--method", "condition", "--autoencoder", str(pipeline.vae),
            "--output-dir", str(tmp_path), *FAST]  # fmt: skip
    assert sample.main(argv) == 0
    # the whitened encoding of the init video's first k frames, computed here independently
    vae = FrameVAE.from_pretrained(pipeline.vae)
    frames, _ = read_video(video, num_frames=k)
    with torch.no_grad():
        mean, _ = encode_video(vae, to_tensor(resize_and_crop(frames, 32))[None], chunk_size=8)
    stats = json.loads((pipeline.shards / "stats.json").read_text())
    m, s = (torch.tensor(stats[n]).view(1, -1, 1, 1, 1) for n in ("mean", "std"))
    given = ((mean - m) / s)[0]
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    for f in files:
        latent, meta = load_latent_file(f)
        assert meta["known_frames"] == k and latent.shape == (4, 8, 8, 8)
        torch.testing.assert_close(latent[:, :k], given, rtol=0, atol=1e-6)
        assert not torch.allclose(latent[:, k], given[:, -1])  # the rest is generated


def test_decode_folder_writes_mp4_with_the_right_frame_count(pipeline, samples, tmp_path):
    argv = ["--autoencoder", str(pipeline.vae), "--latents", str(samples), "--output-dir", str(tmp_path)]
    assert decode_latents.main(argv) == 0
    mp4s = sorted(tmp_path.glob("*.mp4"))
    assert [p.stem for p in mp4s] == [p.stem for p in sorted(samples.glob("*.safetensors"))]
    for p in mp4s:
        assert video_codec(p) == "h264" and video_info(p)["num_frames"] == 12
    # the decoded frames are the VAE's decode of the un-whitened latents with the recorded statistics.
    # Compared losslessly (PNG frames): two H.264 encodings of frames a uint8 level apart here and
    # there (CPU kernels may round the last float bit differently between runs) differ by several
    # levels on this noise-like 32x32 content, so mp4s are not compared with each other.
    f = sorted(samples.glob("*.safetensors"))[0]
    argv = ["--autoencoder", str(pipeline.vae), "--latents", str(f), "--output-dir", str(tmp_path / "png"), "--format", "png"]
    assert decode_latents.main(argv) == 0
    latent, meta = load_latent_file(f)
    vae = FrameVAE.from_pretrained(pipeline.vae)
    with torch.no_grad():
        want = decode_video(vae, un_whiten(latent, meta["stats"])[None]).clamp(-1, 1)[0]
    want = ((want.permute(1, 2, 3, 0).numpy() + 1) * 127.5)
    got = np.stack([read_image(q) for q in sorted((tmp_path / "png" / f"{f.stem}-frames").glob("*.png"))])
    assert got.shape == (12, 32, 32, 3) and np.abs(got - want).max() <= 1.0


def test_decode_refuses_latents_of_another_autoencoder(pipeline, samples, tmp_path, capsys):
    torch.manual_seed(123)
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                    mid_attention=False, norm_groups=8)  # fmt: skip
    other = FrameVAE(cfg).save_pretrained(tmp_path / "other-vae")
    argv = ["--autoencoder", str(other), "--latents", str(samples), "--output-dir", str(tmp_path / "out")]
    assert decode_latents.main(argv) == 2
    err = capsys.readouterr().err
    assert "autoencoder" in err and weights_hash(other)[:12] in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.mp4"))


def test_sample_refuses_an_autoencoder_export_as_checkpoint(pipeline, tmp_path, capsys):
    argv = ["--checkpoint", str(pipeline.vae), "--num-samples", "1", "--output-dir", str(tmp_path), *FAST]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert "autoencoder export" in err and str(pipeline.vae) in err
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("method", ["condition", "reconstruction"])
def test_prediction_with_more_known_frames_than_the_overlap(pipeline, export, tmp_path, method):
    """K = 5 known frames (> the default overlap 4 of an 8-frame window), 12 frames in all: the
    given frames are kept exactly, by either method, and the rest is generated."""
    video = sorted(pipeline.data.rglob("*.mp4"))[1]
    argv = ["--checkpoint", str(export), "--num-samples", "1", "--frames", "12", "--init-video", str(video),
            "--known-frames", "5", "--method", method, "--autoencoder", str(pipeline.vae),
            "--guidance-scale", "2", "--output-dir", str(tmp_path), *FAST]  # fmt: skip
    assert sample.main(argv) == 0
    (f,) = sorted(tmp_path.glob("*.safetensors"))
    latent, meta = load_latent_file(f)
    assert latent.shape == (4, 12, 8, 8) and meta["known_frames"] == 5 and torch.isfinite(latent).all()
    ref = tmp_path / "ref"
    argv = [a if a != "12" else "5" for a in argv]  # the same 5 frames alone: nothing generated
    assert sample.main([*argv[:-len(FAST) - 2], "--output-dir", str(ref), *FAST]) == 0
    given, _ = load_latent_file(next(ref.glob("*.safetensors")))
    torch.testing.assert_close(latent[:, :5], given, rtol=0, atol=0)
    assert not torch.allclose(latent[:, 5], latent[:, 4])


def test_condition_on_a_model_without_frame_conditioning_is_refused(pipeline, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out), "--max-steps", "1",
            "model.frame_conditioning=false"]  # fmt: skip
    assert train_diffusion.main(argv) == 0
    video = sorted(pipeline.data.rglob("*.mp4"))[0]
    base = ["--checkpoint", str(out / "export"), "--num-samples", "1", "--frames", "8", "--init-video", str(video),
            "--known-frames", "3", "--autoencoder", str(pipeline.vae), *FAST]  # fmt: skip
    assert sample.main([*base, "--method", "condition", "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "without frame conditioning" in err and "--method reconstruction" in err
    assert not list((tmp_path / "a").glob("*.safetensors"))
    assert sample.main([*base, "--output-dir", str(tmp_path / "b")]) == 0  # auto: reconstruction guidance
    assert len(list((tmp_path / "b").glob("*.safetensors"))) == 1


def test_a_missing_autoencoder_folder_is_an_error(export, tmp_path, capsys):
    argv = ["--checkpoint", str(export), "--num-samples", "1", "--autoencoder", str(tmp_path / "nope"),
            "--output-dir", str(tmp_path / "out"), *FAST]  # fmt: skip
    assert sample.main(argv) == 2
    assert "nope" in capsys.readouterr().err and not list((tmp_path / "out").glob("*.safetensors"))


def test_decode_checks_every_file_before_writing_any(pipeline, samples, tmp_path, capsys, caplog):
    from scripts.runtime.generation import save_latent_file

    src = tmp_path / "latents"
    src.mkdir()
    for f in sorted(samples.glob("*.safetensors")):
        latent, meta = load_latent_file(f)
        save_latent_file(src / f.name, latent, meta)
    latent, meta = load_latent_file(next(src.glob("*.safetensors")))
    save_latent_file(src / "zz-foreign.safetensors", latent, {**meta, "autoencoder_sha256": "ef" * 32})
    argv = ["--autoencoder", str(pipeline.vae), "--latents", str(src), "--output-dir", str(tmp_path / "out")]
    assert decode_latents.main(argv) == 2
    assert "zz-foreign" in capsys.readouterr().err and not list((tmp_path / "out").glob("*.mp4"))  # not even the good ones
    (src / "zz-foreign.safetensors").unlink()
    save_latent_file(src / "no-hash.safetensors", latent, {k: v for k, v in meta.items() if k != "autoencoder_sha256"})
    assert decode_latents.main(argv) == 0
    assert "no-hash.safetensors records no autoencoder hash" in caplog.text
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 4


def test_guidance_interval_gates_guidance_by_timestep_and_is_recorded(pipeline, export, tmp_path, capsys):
    """DDIM-2 visits t = 999 and 499. An interval holding neither step is exactly no guidance, one
    holding both exactly guidance at every step, one holding only t = 999 neither of them; the
    interval is recorded in each latent file, and a reversed one is refused before anything is written."""

    def run(name, *extra):
        argv = ["--checkpoint", str(export), "--num-samples", "2", "--output-dir", str(tmp_path / name), *FAST, *extra]
        assert sample.main(argv) == 0
        return load_latent_file(tmp_path / name / "sample-001-square.safetensors")

    none, _ = run("g1", "--guidance-scale", "1")
    full, meta_full = run("g3", "--guidance-scale", "500")
    empty, _ = run("empty", "--guidance-scale", "500", "--guidance-interval", "0.3,0.4")
    both, _ = run("both", "--guidance-scale", "500", "--guidance-interval", "0.45,1")
    first, meta = run("first", "--guidance-scale", "500", "--guidance-interval", "0.6,1")
    # the 2-step model barely tells classes apart: a large scale makes guidance's effect plain
    assert (full - none).abs().max() > 1e-2
    assert torch.equal(empty, none) and torch.equal(both, full)
    assert (first - none).abs().max() > 1e-3 and (first - full).abs().max() > 1e-3
    assert meta["cascade"][0]["guidance_interval"] == [0.6, 1.0] and meta["cascade"][0]["guidance_scale"] == 500.0
    assert meta_full["cascade"][0]["guidance_interval"] == [0.0, 1.0]
    capsys.readouterr()
    argv = ["--checkpoint", str(export), "--num-samples", "1", "--output-dir", str(tmp_path / "bad"), *FAST,
            "--guidance-interval", "0.8,0.2"]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert "--guidance-interval" in err and "0.8,0.2" in err and "Traceback" not in err
    assert not list((tmp_path / "bad").glob("*.safetensors"))


@pytest.fixture(scope="module")
def four_step_run(pipeline, tmp_path_factory):
    """A 4-step run of the tiny config: checkpoints at steps 2 and 4, the export = step 4's EMA."""
    out = tmp_path_factory.mktemp("diff4") / "run"
    argv = ["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out), "--max-steps", "4"]
    assert train_diffusion.main(argv) == 0
    return out


def test_autoguidance_by_an_earlier_checkpoint_or_export_changes_samples_and_is_recorded(pipeline, export, four_step_run,
                                                                                          tmp_path, capsys):
    """Guided by the run's own last checkpoint (the export's weights), autoguidance is exactly no
    guidance; by the step-2 checkpoint, or by another export on the same latents, it changes the
    samples, and the guide and scale are recorded; scale 1 is no guidance."""
    ckpts = four_step_run / "checkpoints"

    def run(name, *extra):
        argv = ["--checkpoint", str(four_step_run / "export"), "--num-samples", "2", "--output-dir", str(tmp_path / name),
                *FAST, "--guidance-scale", "1", *extra]
        assert sample.main(argv) == 0, capsys.readouterr().err
        return load_latent_file(tmp_path / name / "sample-001-square.safetensors")

    plain, meta_plain = run("plain")
    same, _ = run("same", "--autoguide", str(ckpts / "step-0000004"), "--autoguidance-scale", "3")
    early, meta = run("early", "--autoguide", str(ckpts / "step-0000002"), "--autoguidance-scale", "3")
    other, _ = run("other", "--autoguide", str(export), "--autoguidance-scale", "3")
    off, _ = run("off", "--autoguide", str(ckpts / "step-0000002"), "--autoguidance-scale", "1")
    assert torch.equal(same, plain) and torch.equal(off, plain)
    assert (early - plain).abs().max() > 1e-3 and (other - plain).abs().max() > 1e-3
    assert "autoguide" not in meta_plain["cascade"][0]
    assert meta["cascade"][0]["autoguide"] == str((ckpts / "step-0000002").resolve())
    assert meta["cascade"][0]["autoguidance_scale"] == 3.0


def test_autoguidance_refuses_guides_of_another_model(pipeline, four_step_run, tmp_path, capsys):
    """A checkpoint written for another architecture, an export with other diffusion settings, an
    incomplete checkpoint, a folder that is neither, and --autoguide without --checkpoint: one clear
    line each, exit 2, nothing written."""
    import shutil

    wide = tmp_path / "wide"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(wide),
                                 "--max-steps", "2", "model.base_channels=24"]) == 0
    shifted = tmp_path / "shifted"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir",
                                 str(shifted), "--max-steps", "2", "diffusion.schedule_shift=2.0"]) == 0
    incomplete = tmp_path / "incomplete"
    shutil.copytree(four_step_run / "checkpoints" / "step-0000002", incomplete)
    (incomplete / "COMPLETE").unlink()
    cases = {
        "wide": (wide / "checkpoints" / "step-0000002", ["another model", "model_config", "base_channels"]),
        "shifted": (shifted / "export", ["not a weaker version", "diffusion settings"]),
        "incomplete": (incomplete, ["incomplete"]),
        "neither": (pipeline.shards, ["neither a diffusion export", "checkpoint folder"]),
    }
    capsys.readouterr()
    for name, (guide, words) in cases.items():
        argv = ["--checkpoint", str(four_step_run / "export"), "--num-samples", "1", "--output-dir",
                str(tmp_path / f"out-{name}"), *FAST, "--autoguide", str(guide)]
        assert sample.main(argv) == 2, name
        err = capsys.readouterr().err
        assert all(w in err for w in words) and str(guide) in err and "Traceback" not in err, (name, err)
        assert not list((tmp_path / f"out-{name}").glob("*.safetensors"))
    argv = ["--upsample", str(four_step_run / "export"), "--latents", str(tmp_path), "--output-dir",
            str(tmp_path / "out-nockpt"), "--autoguide", str(four_step_run / "checkpoints" / "step-0000002")]
    assert sample.main(argv) == 2
    assert "--autoguide guides --checkpoint's stage" in capsys.readouterr().err
