"""scripts.sample --interpolate K: temporal interpolation of our latent files or a video file
(K x the frames at K x the fps, the given frames kept exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DIFF_TINY, run_script

from data.video_io import video_info, write_video
from scripts.runtime.generation import load_latent_file, save_latent_file


@pytest.fixture(scope="module")
def model(pipeline, tmp_path_factory):
    from scripts import train_diffusion

    out = tmp_path_factory.mktemp("interp") / "d"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out),
                                 "--max-steps", "2", "cond.frame_cond_interp_prob=0.5"]) == 0  # fmt: skip
    return out / "export"


def test_latent_files_are_interpolated_with_their_frames_kept_exactly(model, pipeline, tmp_path):
    src = tmp_path / "in"
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # 5 frames: an odd count
        save_latent_file(src / f"s{i}.safetensors", torch.randn(4, 5, 8, 8, generator=g), {"fps": 6.0})
    r = run_script("sample", "--checkpoint", model, "--latents", src, "--interpolate", "3", "--steps", "2",
                   "--autoencoder", pipeline.vae, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    outs = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(outs) == 2
    for i, path in enumerate(outs):
        z, meta = load_latent_file(path)
        given, _ = load_latent_file(src / f"s{i}.safetensors")
        assert z.shape == (4, 15, 8, 8) and torch.equal(z[:, ::3], given)  # bit for bit, every 3rd frame
        assert meta["fps"] == 18.0 and meta["interpolate"] == 3 and meta["frames"] == 15
        info = video_info(path.with_suffix(".mp4"))
        assert info["num_frames"] == 15 and info["fps"] == pytest.approx(18.0)


def test_a_video_file_is_interpolated_to_k_times_its_frames_and_fps(model, pipeline, tmp_path):
    video = np.zeros((7, 32, 32, 3), np.uint8)
    for t in range(7):
        video[t, 8:16, 2 + 3 * t : 10 + 3 * t] = (220, 40, 40)
    write_video(tmp_path / "in.mp4", video, fps=5)
    r = run_script("sample", "--checkpoint", model, "--init-video", tmp_path / "in.mp4", "--interpolate", "2",
                   "--num-samples", "1", "--steps", "2", "--autoencoder", pipeline.vae, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    (mp4,) = (tmp_path / "out").glob("*.mp4")
    info = video_info(mp4)
    assert info["num_frames"] == 14 and info["fps"] == pytest.approx(10.0)


def test_interpolation_inputs_are_checked(model, pipeline, tmp_path):
    r = run_script("sample", "--checkpoint", model, "--interpolate", "2", "--latents", tmp_path,
                   "--init-video", tmp_path / "x.mp4", "--output-dir", tmp_path / "a")
    assert r.returncode == 2 and "give one input" in r.stderr
    r = run_script("sample", "--checkpoint", model, "--latents", tmp_path, "--output-dir", tmp_path / "c")
    assert r.returncode == 2 and "--latents is the input of --interpolate K or --upsample" in r.stderr
    save_latent_file(tmp_path / "bad.safetensors", torch.zeros(3, 4, 8, 8), {})
    r = run_script("sample", "--checkpoint", model, "--latents", tmp_path / "bad.safetensors", "--interpolate", "2",
                   "--output-dir", tmp_path / "b")
    assert r.returncode == 2 and "does not fit this model" in r.stderr
