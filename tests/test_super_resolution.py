"""The cascade's spatial super-resolution stage: training pairs matched by key across two encodings
of the same data, refused when the folders do not pair; noise-conditioning augmentation reaching
the model; a trained tiny SR model beating bicubic upsampling; the chain in one command."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DIFF_TINY, ENCODE_DEMO, run_script

from autoencoder.model import FrameVAE
from data.latents import make_latent_loader
from data.pairs import LowResLatents, check_pairing
from data.shards import ShardError
from data.stats import load_stats, un_whiten, whiten
from diffusion.conditioning import noise_augment
from diffusion.schedules import make_alphas_cumprod
from scripts import encode_latents, train_diffusion
from scripts.runtime.export import load_diffusion_export
from scripts.runtime.generation import decode_to_uint8, load_latent_file, upsample_latents

# posterior means: the session pipeline's VAE is trained 2 steps, so its posterior noise is
# several times its means' spread and posterior samples would be mostly noise to learn
SR_TRAIN = ["train.batch_size=8", "train.lr=5e-4", "data.image_ratio=0", "diffusion.loss_weighting=none",
            "cond.frame_cond_prob=0", "data.use_posterior_mean=true", "train.checkpoint_every=1000", "train.log_every=50"]


@pytest.fixture(scope="module")
def low(pipeline, tmp_path_factory):
    """The pipeline's videos encoded again at 16x16 (4x4 latents) by the same autoencoder."""
    out = tmp_path_factory.mktemp("low") / "shards"
    assert encode_latents.main(["--autoencoder", str(pipeline.vae), "--data", str(pipeline.data), "--output-dir", str(out),
                                "--config", str(ENCODE_DEMO), "encode.num_workers=0", "encode.videos_per_shard=4",
                                "encode.size=16"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def sr_model(pipeline, low, tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "d"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out),
                                 "--max-steps", "300", f"sr.low_res_shards={low}", *SR_TRAIN]) == 0  # fmt: skip
    return out / "export"


def _copy_with_manifest(src, dst, **changes):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for path, value in changes.items():
        node = m
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_folders_that_do_not_pair_are_refused_naming_the_reason(pipeline, low, tmp_path):
    assert check_pairing(pipeline.shards, low) == 2
    cases = {
        "other sources": _copy_with_manifest(low, tmp_path / "src", encoding__data=str(tmp_path / "elsewhere")),
        "other autoencoders": _copy_with_manifest(low, tmp_path / "ae", autoencoder__weights_sha256="0" * 64),
        "clip length differs": _copy_with_manifest(low, tmp_path / "len", clip_len=4, encoding__clip_len=4),
    }
    for reason, folder in cases.items():
        with pytest.raises(ShardError, match=reason):
            check_pairing(pipeline.shards, folder)
    with pytest.raises(ShardError, match="not an integer multiple"):  # a folder with itself: same grid
        check_pairing(pipeline.shards, pipeline.shards)
    # through the trainer: exit code 2 and the reason on stderr, nothing trained
    r = run_script("train_diffusion", "--config", DIFF_TINY, "--shards", pipeline.shards, "--output-dir",
                   tmp_path / "run", "--max-steps", "1", f"sr.low_res_shards={cases['other autoencoders']}")
    assert r.returncode == 2 and "do not pair for super-resolution" in r.stderr and "other autoencoders" in r.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_a_missing_low_resolution_sample_is_named(pipeline, low):
    table = LowResLatents(str(low))
    keys = list(table.by_kind["video"])[:2]
    with pytest.raises(ShardError, match="no low-resolution video sample for key"):
        table.batch([keys[0], "nosuch/video.mp4:0"])


def test_each_clip_is_given_its_own_low_resolution_latents_and_the_augmentation_level(pipeline, low, tmp_path,
                                                                                       monkeypatch):
    from diffusion.unet3d import UNet3D

    calls = []
    forward = UNet3D.forward

    def spy(self, x, t, **kw):
        if self.training and kw.get("low_res") is not None:
            calls.append({k: kw[k].detach().clone() for k in ("low_res", "aug_level")})
        return forward(self, x, t, **kw)

    monkeypatch.setattr(UNet3D, "forward", spy)
    monkeypatch.setenv("LVD_DEBUG_SAMPLE_KEYS", "1")
    ref = {}  # key -> whitened low-resolution posterior mean, read by the plain reader
    for batch in make_latent_loader(low, kind="video", batch_size=4, use_mean=True, shuffle_buffer=0):
        ref.update({k: z for k, z in zip(batch["key"], batch["latent"])})
    # no augmentation (aug_max at one step of the schedule: level 0 only): exactly the pairs' latents
    out = tmp_path / "a"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out),
                                 "--max-steps", "2", f"sr.low_res_shards={low}", "sr.aug_max=0.001",
                                 "data.image_ratio=0"]) == 0  # fmt: skip
    keys = [json.loads(line)["keys"] for line in (out / "sample-keys-rank0.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and len(keys) == 2
    for call, step_keys in zip(calls, keys):
        assert call["low_res"].shape == (2, 4, 8, 4, 4) and (call["aug_level"] == 0).all()
        assert torch.equal(call["low_res"], torch.stack([ref[k] for k in step_keys]))
    # with augmentation: random levels up to aug_max of the schedule, and noisier inputs
    calls.clear()
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir",
                                 str(tmp_path / "b"), "--max-steps", "4", f"sr.low_res_shards={low}", "sr.aug_max=0.5",
                                 "data.image_ratio=0.5"]) == 0  # fmt: skip
    levels = torch.cat([c["aug_level"] for c in calls])
    assert len(calls) == 8  # image and video pass of each step
    assert levels.min() >= 0 and levels.max() < 500 and len(set(levels.tolist())) > 4
    assert {tuple(c["low_res"].shape[2:3]) for c in calls} == {(1,), (8,)}  # images get their frame's pair


def test_noise_augmentation_is_exact_at_level_zero_and_its_level_changes_the_output(sr_model):
    ab = make_alphas_cumprod("cosine", 1000)
    z = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise_augment(z, torch.zeros(2, dtype=torch.long), ab), z)
    noisy = noise_augment(z, torch.tensor([900, 900]), ab, torch.Generator().manual_seed(1))
    assert torch.corrcoef(torch.stack([z.flatten(), noisy.flatten()]))[0, 1] < 0.5
    model, _ = load_diffusion_export(sr_model)
    x, low = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 4, 4)
    with torch.no_grad():
        a = model(x, torch.tensor([300]), class_labels=torch.tensor([0]), low_res=low, aug_level=torch.tensor([0]))
        b = model(x, torch.tensor([300]), class_labels=torch.tensor([0]), low_res=low, aug_level=torch.tensor([400]))
    assert (a - b).abs().mean() > 1e-3


def test_a_trained_tiny_sr_model_beats_bicubic_on_its_training_pairs(pipeline, low, sr_model):
    """PSNR against stage 1's decoding of the high-resolution latents (what the SR stage is trained
    to produce: the tiny VAE cannot reconstruct the videos themselves), for the SR stage's output
    and for bicubic upsampling of the decoded low-resolution latents."""
    model, meta = load_diffusion_export(sr_model)
    hi = next(iter(make_latent_loader(pipeline.shards, kind="video", batch_size=16, use_mean=True, shuffle_buffer=0)))
    lo = next(iter(make_latent_loader(low, kind="video", batch_size=16, use_mean=True, shuffle_buffer=0)))
    assert hi["key"] == lo["key"]
    vae = FrameVAE.from_pretrained(pipeline.vae).eval()
    target = decode_to_uint8(vae, un_whiten(hi["latent"], load_stats(pipeline.shards)))
    small = decode_to_uint8(vae, un_whiten(lo["latent"], load_stats(low)))
    bicubic = np.stack([np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_CUBIC) for f in v]) for v in small])
    z = upsample_latents(model, meta, whiten(un_whiten(lo["latent"], load_stats(low)), meta["super_resolution"]["low_res_stats"]),
                         labels=hi["label"].tolist(), sampler="ddim", steps=20, aug=0.0, batch_size=16)
    assert z.shape == hi["latent"].shape
    ours = decode_to_uint8(vae, un_whiten(z, meta["latent"]["stats"]))

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())

    assert psnr(ours, target) > psnr(bicubic, target) + 1.0
    # and in latent space, against bicubic upsampling of the latents themselves
    lat = un_whiten(lo["latent"], load_stats(low))
    b, c, t, h, w = lat.shape
    up = F.interpolate(lat.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2, mode="bicubic")
    up = whiten(up.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2), load_stats(pipeline.shards))
    assert F.mse_loss(z, hi["latent"]) < F.mse_loss(up, hi["latent"])


def test_the_chain_and_standalone_upsampling_from_the_command_line(pipeline, low, sr_model, tmp_path):
    base = tmp_path / "base"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(low), "--output-dir", str(base),
                                 "--max-steps", "2", "cond.frame_cond_interp_prob=0.5"]) == 0  # fmt: skip
    r = run_script("sample", "--checkpoint", base / "export", "--interpolate", "2", "--upsample", sr_model,
                   "--num-samples", "2", "--steps", "2", "--frames", "5", "--autoencoder", pipeline.vae,
                   "--output-dir", tmp_path / "chain")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "chain").glob("*.safetensors"))
    assert len(files) == 2 and len(list((tmp_path / "chain").glob("*.mp4"))) == 2
    z, info = load_latent_file(files[0])
    assert tuple(z.shape) == (4, 10, 8, 8)  # 5 frames x 2, at the SR stage's 8x8 latents (32x32 frames)
    assert [s["stage"] for s in info["cascade"]] == ["base", "interpolate", "upsample"]
    assert info["cascade"][-1]["export"] == str(sr_model.resolve()) and info["fps"] == 16.0
    # standalone: the chain's base samples (4x4 latents) are not what it takes, the low-res files are
    r = run_script("sample", "--upsample", sr_model, "--latents", files[0], "--output-dir", tmp_path / "x")
    assert r.returncode == 2 and "does not fit this model" in r.stderr
    r = run_script("sample", "--checkpoint", base / "export", "--num-samples", "1", "--steps", "2",
                   "--output-dir", tmp_path / "lowres")
    assert r.returncode == 0, r.stderr
    r = run_script("sample", "--upsample", sr_model, "--latents", tmp_path / "lowres", "--steps", "2",
                   "--autoencoder", pipeline.vae, "--output-dir", tmp_path / "up")
    assert r.returncode == 0, r.stderr
    (up,) = (tmp_path / "up").glob("*.safetensors")
    z, info = load_latent_file(up)
    assert tuple(z.shape) == (4, 8, 8, 8) and info["upsampled_from"].endswith(".safetensors")
    # a base model is not an SR stage, and an SR stage is not a base model
    r = run_script("sample", "--upsample", base / "export", "--latents", tmp_path / "lowres", "--output-dir", tmp_path / "y")
    assert r.returncode == 2 and "not a super-resolution stage" in r.stderr
    r = run_script("sample", "--checkpoint", sr_model, "--output-dir", tmp_path / "z")
    assert r.returncode == 2 and "pass it as --upsample" in r.stderr


def test_the_cascade_driver_runs_every_stage_and_scores_sr_against_bicubic(tmp_path):
    from scripts import cascade

    out = tmp_path / "c"
    assert cascade.main(["--quick", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    sr = report["super_resolution"]
    assert set(sr["sr"]) == {"aug=0.1 window=16"} and sr["clips"] == 3 and sr["frames_per_clip"] == 16
    for row in (sr["bicubic"], sr["stage1_floor"], sr["sr"]["aug=0.1 window=16"]):
        assert set(row) >= {"psnr", "ssim", "fg_psnr", "delta_e", "flicker_ratio"} and np.isfinite(row["psnr"])
    (mp4, *_) = sorted((out / "samples").glob("*.mp4"))
    from data.video_io import video_info

    info = video_info(mp4)
    assert info["num_frames"] == 16 and info["width"] == 32 * 4 and info["fps"] == pytest.approx(16.0)
