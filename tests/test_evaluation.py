"""FVD / FID / weight-free evaluation: the Fréchet distance against closed forms, the detectors'
loading rules (hash, interface, no unpickling) with small random TorchScript stand-ins of the real
networks' interfaces, and scripts.evaluate end to end."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DIFF_TINY, read_metrics, run_script

from data.synthetic import make_synthetic_video, shuffled_frames
from data.video_io import write_video
from evaluation.detectors import DetectorError, file_sha256, i3d_input, load_detector
from evaluation.frechet import frechet_distance, frechet_from_fits
from evaluation.suite import frame_change, weight_free
from scripts import evaluate

# ------------------------------------------------------------------ the Fréchet distance


def test_frechet_distance_of_two_known_gaussians_matches_the_closed_form():
    # non-commuting 2x2 covariances: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = A B (2x2,
    # eigenvalues >= 0), a formula that shares nothing with the eigh route the code takes
    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    m = a @ b
    tr_sqrt = torch.sqrt(m.trace() + 2 * torch.sqrt(torch.linalg.det(m)))
    expected = float((mu_a - mu_b).pow(2).sum() + a.trace() + b.trace() - 2 * tr_sqrt)
    assert frechet_from_fits(mu_a, a, mu_b, b) == pytest.approx(expected, abs=1e-9)
    # diagonal: sum of (sqrt a_i - sqrt b_i)^2 plus the mean term
    da, db = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    assert frechet_from_fits(z, torch.diag(da), z + 1, torch.diag(db)) == pytest.approx(3 + 1 + 0 + 4, abs=1e-9)


def test_frechet_distance_of_samples_zero_for_identical_sets_and_growing_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6
    assert frechet_distance(x, x + torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)) == pytest.approx(9.0, abs=1e-6)
    assert frechet_distance(x, 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64)) == pytest.approx(3.0, abs=0.4)
    shifts = [frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0
    # fewer samples than dimensions (singular covariances): finite and >= 0, no complex parts
    few = torch.randn(5, 64, generator=g, dtype=torch.float64)
    assert 0 <= frechet_distance(few, few + 0.1) < float("inf")


# ------------------------------------------------------------------ detectors


class TinyI3D(torch.nn.Module):
    """Random stand-in with the interface of i3d_torchscript.pt: [N, 3, T, 224, 224] -> [N, 400]."""

    def __init__(self, out: int = 400):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, (2, 16, 16), stride=(2, 16, 16))
        self.fc = torch.nn.Linear(8 * 8, out)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        return self.fc(F.adaptive_avg_pool3d(self.conv(x).relu(), (1, 2, 4)).flatten(1))


class TinyInception(torch.nn.Module):
    """Random stand-in with the interface of inception-2015-12-05.pt: [N, 3, 299, 299] in [0, 255] -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 13, stride=13)
        self.fc = torch.nn.Linear(16 * 4, 2048)

    def forward(self, x, return_features: bool = False):
        return self.fc(F.adaptive_avg_pool2d(self.conv(x / 128 - 1).relu(), 2).flatten(1))


class NoKwargs(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :400]


def save_script(module: torch.nn.Module, path) -> str:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(0)
    return {"i3d": save_script(TinyI3D(), root / "i3d.pt"), "inception": save_script(TinyInception(), root / "inc.pt"),
            "root": root}


def test_detectors_load_and_record_their_hash(detectors):
    det = load_detector(detectors["i3d"], "i3d")
    assert det.sha256 == file_sha256(detectors["i3d"]) and not det.pinned
    assert load_detector(detectors["i3d"], "i3d", det.sha256.upper()).pinned
    x = i3d_input(np.full((2, 4, 32, 48, 3), 255, np.uint8))
    assert x.shape == (2, 3, 4, 224, 224) and float(x.min()) == 1.0  # white -> +1, shorter side to 224, centre crop


def test_wrong_missing_or_foreign_detector_files_are_refused_naming_them(detectors, tmp_path):
    with pytest.raises(DetectorError, match=r"i3d weights .*nope\.pt: no such file \(get i3d_torchscript\.pt"):
        load_detector(tmp_path / "nope.pt", "i3d")
    with pytest.raises(DetectorError, match=r"i3d\.pt: sha256 .* is not the expected 0000"):
        load_detector(detectors["i3d"], "i3d", "0" * 64)
    torch.save(TinyI3D().state_dict(), tmp_path / "ckpt.pt")  # a pickle: refused before it is opened
    with pytest.raises(DetectorError, match="a torch.save checkpoint, not a TorchScript file"):
        load_detector(tmp_path / "ckpt.pt", "i3d")
    with pytest.raises(DetectorError, match="its forward\\(\\) takes no rescale, resize, return_features"):
        load_detector(save_script(NoKwargs(), tmp_path / "nokw.pt"), "i3d")
    with pytest.raises(DetectorError, match=r"returns \[1, 10\] for one input; i3d_torchscript.pt returns \[1, 400\]"):
        load_detector(save_script(TinyI3D(out=10), tmp_path / "narrow.pt"), "i3d")
    with pytest.raises(DetectorError, match=r"inception weights .*i3d.pt: fails on an input of shape \[1, 3, 299, 299\]"):
        load_detector(detectors["i3d"], "inception")  # the other network


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_torchscript_file_carrying_a_malicious_pickle_is_not_executed(detectors, tmp_path):
    """TorchScript's deserializer refuses globals outside TorchScript: the shell command never runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(detectors["i3d"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Shell(marker), protocol=2)
            dst.writestr(info.filename, data)
    with pytest.raises(DetectorError, match="evil.pt: TorchScript could not load it"):
        load_detector(evil, "i3d")
    assert not marker.exists()
    assert b"system" in io.BytesIO(zipfile.ZipFile(evil).read("i3d/data.pkl")).read()  # the payload was there


# ------------------------------------------------------------------ weight-free metrics


def _synthetic(n, seed, frames=8, size=32):
    return [make_synthetic_video(i, num_frames=frames, size=size, seed=seed)[0] for i in range(n)]


def test_weight_free_metrics_tell_the_data_from_shuffled_frames_and_noise():
    ref, same = _synthetic(12, seed=1), _synthetic(12, seed=2)
    rows = {r["metric"]: r for r in weight_free(same, ref)}
    assert rows["flicker_ratio"]["value"] == pytest.approx(frame_change(same) / frame_change(ref))
    assert 0.6 < rows["flicker_ratio"]["value"] < 1.6
    assert rows["tracker/found_whole"]["value"] > 0.9 and rows["tracker/found_whole"]["data_value"] > 0.9
    shuffled = {r["metric"]: r for r in weight_free(shuffled_frames(same), ref)}
    assert shuffled["flicker_ratio"]["value"] > 1.5 * rows["flicker_ratio"]["value"]
    assert shuffled["tracker/smoothness"]["value"] > 2 * rows["tracker/smoothness"]["value"]
    noise = [np.random.default_rng(i).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for i in range(4)]
    assert not any(r["metric"].startswith("tracker/") for r in weight_free(same, noise))  # not one-object data


def test_prompt_adherence_rows_only_for_synthetic_style_prompts():
    from data.synthetic import synthetic_caption

    vids = _synthetic(6, seed=3)
    right = [synthetic_caption(i, size=32, seed=3) for i in range(6)]
    rows = {r["metric"]: r["value"] for r in weight_free(vids, vids, prompts=right)}
    assert rows["prompt/colour"] == 1.0 and rows["prompt/shape"] >= 5 / 6
    assert not any(k.startswith("prompt/") for k in (r["metric"] for r in weight_free(vids, vids, prompts=["a cat"] * 6)))


# ------------------------------------------------------------------ scripts.evaluate


def _write(folder, videos):
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(videos):
        write_video(folder / f"v{i:03d}.mp4", v, fps=8)
    return folder


def test_evaluate_end_to_end_with_stand_in_detectors(detectors, tmp_path, capsys):
    samples = _write(tmp_path / "samples", _synthetic(8, seed=5))
    same = _write(tmp_path / "same", _synthetic(8, seed=5))
    other = _write(tmp_path / "other", shuffled_frames(_synthetic(8, seed=6), seed=1))
    common = ["--i3d", detectors["i3d"], "--inception", detectors["inception"], "--fid-frames", "1000"]
    assert evaluate.main(["--samples", str(samples), "--reference", str(same), *common]) == 0
    lines = [json.loads(x) for x in (samples / "evaluation.jsonl").read_text().splitlines()]
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines
    rows = {r["metric"]: r for r in lines}
    assert all(r["clips"] == 8 and r["seed"] == 0 and r["reference_clips"] == 8 for r in lines)
    assert abs(rows["fvd"]["value"]) < 1e-3 and abs(rows["fid"]["value"]) < 1e-3  # the same videos
    assert rows["fid"]["frames_per_set"] == 64 and rows["fvd"]["detector_sha256"] == file_sha256(detectors["i3d"])
    assert evaluate.main(["--samples", str(samples), "--reference", str(other), *common,
                          "--output", str(tmp_path / "o.jsonl")]) == 0  # fmt: skip
    far = {r["metric"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert far["fvd"]["value"] > 0.1 and far["fid"]["value"] > 0.01
    capsys.readouterr()
    assert evaluate.main(["--samples", str(samples), "--reference", str(same), "--i3d", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: i3d weights") and "x.pt: no such file" in err


def test_evaluate_samples_a_checkpoint_then_scores_it_against_shards(pipeline, tmp_path, capsys):
    from scripts import train_diffusion

    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir",
                                 str(tmp_path / "d"), "--max-steps", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(tmp_path / "d" / "export"), "--samples", str(out), "--num-samples", "3",
                          "--sample-arg=--steps=2", "--reference", str(pipeline.shards)]) == 0  # fmt: skip
    rows = {r["metric"]: r for r in map(json.loads, (out / "evaluation.jsonl").read_text().splitlines())}
    assert [json.loads(x)["metric"] for x in capsys.readouterr().out.splitlines()] == list(rows)  # only metric lines
    assert len(list(out.glob("*.mp4"))) == 3 and rows["latent_fd"]["value"] > 0 and rows["latent_fd"]["clips"] == 3
    assert rows["fvd"]["value"] is None and "--i3d" in rows["fvd"]["skipped"]


def test_periodic_evaluation_during_training_logs_weight_free_metrics(pipeline, tmp_path):
    from scripts import train_diffusion

    out = tmp_path / "d"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out),
                                 "--max-steps", "2", "eval.every=1", "eval.num_samples=3", "eval.steps=2",
                                 f"sample.autoencoder={pipeline.vae}"]) == 0  # fmt: skip
    rows = read_metrics(out / "metrics.jsonl", split="eval")
    assert [r["step"] for r in rows] == [1, 2] and all(r["clips"] == 3 for r in rows)
    assert all(r["latent_fd"] > 0 and r["flicker_ratio"] > 0 for r in rows)
    assert rows[0]["latent_fd"] != rows[1]["latent_fd"]  # the model changed between them
    r = run_script("train_diffusion", "--config", DIFF_TINY, "--shards", pipeline.shards, "--output-dir",
                   tmp_path / "bad", "--max-steps", "1", "eval.every=1", "eval.num_samples=1")
    assert r.returncode == 2 and "error: eval.num_samples is 1" in r.stderr and not (tmp_path / "bad" / "checkpoints").exists()
