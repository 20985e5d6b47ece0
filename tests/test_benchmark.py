"""scripts.benchmark --quick: one valid JSON line per figure, finite positive numbers, and without
diffusers the reference figures are null with a reason (never a crash)."""

import json
import math
import sys

import pytest
from safetensors.torch import load_file

from scripts import benchmark
from scripts.runtime.reference import model_section, unet_block_types

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
    assert sorted(line["gc"] for line in unet) == [False, False, True]  # with and without gradient checkpointing
    checkpointed = next(line for line in unet if line["gc"])
    plain = next(line for line in unet if not line["gc"] and not line.get("text"))
    text = next(line for line in unet if line.get("text"))
    assert checkpointed["gflops"] > plain["gflops"]  # recomputed forward is counted
    assert text["gflops"] > plain["gflops"] and text["params_m"] > plain["params_m"]  # cross-attention costs
    reader = next(line for line in printed if line["bench"] == "reader")
    assert reader["reader_headroom"] > 1 and reader["reader_http_samples_per_s"] > 0  # the HTTP reader read them all


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
    assert [(ln["sampler"], ln["steps"]) for ln in lines] == [("ddpm", 250), ("dpmpp_2m", 5), ("ddpm", 5), ("ddim", 5)]
    # DDIM's eta reaches the sampler: at eta = 1 it draws what DDPM draws from the same seed (at 0 it would not)
    assert lines[3]["eta"] == 1.0 and "eta" not in lines[2]
    assert math.isclose(lines[3]["fd_to_training"], lines[2]["fd_to_training"], rel_tol=1e-4)
    # and the figure does tell samplers apart (so the equality above is not two constant values)
    assert not math.isclose(lines[1]["fd_to_training"], lines[2]["fd_to_training"], rel_tol=1e-4)
    for ln in lines:
        assert math.isfinite(ln["fd_to_training"]) and ln["fd_to_training"] > 0 and ln["s_per_video"] > 0
        assert ln["tracked_videos"] >= 0
    assert "fd_to_ddpm250" not in lines[0] and lines[1]["fd_to_ddpm250"] > 0
    # temporal interpolation on the same model: every method scored on the same filled frames
    assert benchmark.main(["--quick", "--only", "interpolation", "--demo-dir", str(demo), "--threads", "1"]) == 0
    (interp,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert interp["filled_frames_per_clip"] == 4 and interp["clips"] == 4  # 8-frame clips, every other frame
    for name in ("model", "crossfade", "repeat", "vae_round_trip"):
        assert 0 < interp[name]["psnr"] < 100 and interp[name]["centre_err_median"] >= 0
    assert interp["vae_round_trip"]["psnr"] != interp["model"]["psnr"]
    # without a finished demo: a clear error, no traceback
    assert benchmark.main(["--quick", "--only", "sampler_quality", "--demo-dir", str(tmp_path / "none")]) == 2
    assert "make demo" in capsys.readouterr().err


def test_quality_bench_runs_end_to_end_through_the_command_lines(tmp_path, capsys):
    """scripts.quality --quick (via benchmark --only quality): every stage through its CLI, then the
    stage-1 colour figures, video_quality rows for data / shuffled / reconstructions / samples and
    the goals; a rerun skips the finished stages and scores again."""
    out = tmp_path / "quality"
    assert benchmark.main(["--quick", "--only", "quality", "--quality-dir", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    parts = [x["part"] for x in lines]
    assert parts[:5] == ["stage1", "data", "shuffled", "stage1_recon", "samples"] and parts[-1] == "seconds"
    report = json.loads((out / "report.json").read_text())
    assert set(report["goals"]) == {"found_whole", "colour_match", "colour_constant", "smoothness", "speed", "jumps"}
    rows = report["video_quality"]
    assert rows["samples"]["videos"] == 3 and rows["data"]["videos"] == 6
    # the held-out data against the training data: whole objects in the data's colours, and its
    # shuffled frames move far less smoothly than the real order
    assert rows["data"]["found_whole"] == 1.0 and rows["data"]["colour_match"] == 1.0
    assert rows["shuffled"]["smoothness"] > 2 * rows["data"]["smoothness"]
    assert math.isfinite(report["stage1"]["delta_e"]) and report["frames_scored"] == 8
    # class-conditional: sampled without guidance by default, scored for the asked class's shape
    assert report["settings"]["guidance_scale"] == 1.0
    # not autoguided by default (README "Autoguidance"): nothing recorded in the latent files
    from scripts.runtime.generation import load_latent_file

    assert report["settings"]["autoguidance_scale"] == 1.0
    assert not any("autoguide" in load_latent_file(p)[1]["cascade"][0] for p in (out / "samples").glob("*.safetensors"))
    classes = report["class_adherence"]
    # (at the quick run's 32 px the objects are 3-4 px across: the detector reads 11 of 12 right)
    assert classes["training_videos"]["videos"] == 12 and classes["training_videos"]["shape"] >= 0.75
    assert classes["samples"]["videos"] == 3 and 0 <= classes["samples"]["shape"] <= 1
    # stage 1 on the held-out videos, read by the same detector against their own captions
    held = report["stage1_adherence"]
    assert set(held) == {"heldout_videos", "stage1_recon"} and held["heldout_videos"]["videos"] == 6
    assert held["heldout_videos"]["colour"] == 1.0
    assert all(0 <= held["stage1_recon"][k] <= 1 for k in ("colour", "shape", "direction", "all"))
    for stage in ("data", "vae", "encode", "diffusion", "sample"):
        assert (out / f".done-{stage}").exists()
    first = report["seconds"]
    assert benchmark.main(["--quick", "--only", "quality", "--quality-dir", str(out)]) == 0
    assert "already done" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert again["video_quality"] == report["video_quality"]  # the same files score the same
    assert all(again["seconds"][k] == first[k] for k in ("vae", "diffusion"))  # times of the first run kept

    # --text: a text-only model on the captions, sampled on prompts no training video has, scored for
    # prompt adherence beside the detector on the training videos and the class-conditional baseline
    from scripts import quality

    text = tmp_path / "text"
    assert quality.main(["--quick", "--text", "--output-dir", str(text), "--baseline-run", str(out)]) == 0
    prompts = (text / "prompts.txt").read_text().splitlines()
    seen = set(quality.training_captions(text / "data").values())
    assert len(prompts) == 3 and not seen & set(prompts) and len(seen) == 12
    lat = sorted((text / "samples").glob("*.safetensors"))
    assert [load_latent_file(p)[1]["prompt"] for p in lat] == prompts
    assert not any("autoguide" in load_latent_file(p)[1]["cascade"][0] for p in lat)  # text: off by default
    text_report = json.loads((text / "report.json").read_text())
    assert text_report["settings"]["guidance_scale"] == 3.0 and "class_adherence" not in text_report
    rows = text_report["prompt_adherence"]
    assert set(rows) == {"samples", "training_videos", "class_conditional_baseline"}
    assert rows["training_videos"]["videos"] == 12 and rows["training_videos"]["colour"] == 1.0
    assert rows["class_conditional_baseline"]["videos"] == 3
    # the text model standardises its pooled text, with statistics of the captions it trained on
    assert json.loads((text / "diffusion" / "export" / "config.json").read_text())["unet"]["text_pool_norm"] is True
    weights = load_file(text / "diffusion" / "export" / "model.safetensors")
    assert int(weights["text_pool_count"]) > 0 and float(weights["text_pool_var"].min()) > 0
    # one clip per video, the first (the one its caption describes): as many clips as videos
    manifest = json.loads((text / "shards" / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["encoding"]["clips_per_video"] == "1" and totals["video_samples"] == totals["videos"] == 12


def _tar_members(folder, suffix):
    """The bytes of every member of folder's shards whose name ends with suffix."""
    import tarfile

    for shard in sorted(folder.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            yield from (tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix))


def test_quality_hold_out_makes_the_held_out_combinations_the_prompts(tmp_path, monkeypatch):
    from data.synthetic import COLOUR_NAMES, DIRECTIONS, SYNTHETIC_CLASSES
    from scripts import make_synthetic, quality

    for argv in (["--hold-out", "24"], ["--text", "--hold-out", "168"]):  # a text option; 0-167
        with pytest.raises(SystemExit):
            quality.main(["--quick", *argv, "--output-dir", str(tmp_path / "x")])
    data = tmp_path / "data"
    assert make_synthetic.main(["--output-dir", str(data), "--num-videos", "40", "--frames", "2", "--size", "16",
                                "--hold-out", "24"]) == 0  # fmt: skip
    quality.write_prompts(data, tmp_path / "prompts.txt", 48)
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    held = [f"a {COLOUR_NAMES[k % 7]} {SYNTHETIC_CLASSES[k % 3]} moves {DIRECTIONS[k % 8]}" for k in range(24)]
    assert len(prompts) == 48 and prompts[:24] == held  # the held-out ones first, then what 40 videos miss
    assert not set(held) & set(quality.training_captions(data).values())

    calls = []  # the driver hands --hold-out to the training videos' make_synthetic, not the held-out ones'

    def record(argv):
        calls.append(argv)
        return 0

    class Stop(Exception):
        pass

    def stop(argv):
        raise Stop

    from scripts import train_autoencoder

    monkeypatch.setattr(make_synthetic, "main", record)
    monkeypatch.setattr(train_autoencoder, "main", stop)  # the stage after the data: nothing more to run
    out = tmp_path / "run"
    with pytest.raises(Stop):
        quality.main(["--quick", "--text", "--hold-out", "24", "--until", "vae", "--output-dir", str(out)])
    train, held_videos = calls[:2]
    assert train[train.index("--output-dir") + 1] == str(out / "data") and train[train.index("--hold-out") + 1] == "24"
    assert held_videos[held_videos.index("--output-dir") + 1] == str(out / "heldout") and "--hold-out" not in held_videos


def test_quality_partial_captions_reach_the_shards_and_leave_the_prompts_whole(tmp_path):
    import io

    import numpy as np

    from data.synthetic import parse_caption
    from scripts import quality

    with pytest.raises(SystemExit):  # shorter captions are a text-model option
        quality.main(["--quick", "--partial-captions", "--output-dir", str(tmp_path / "x")])
    out = tmp_path / "text"
    assert quality.main(["--quick", "--text", "--partial-captions", "--until", "encode", "--output-dir", str(out)]) == 0
    assert json.loads((out / "report-until-encode.json").read_text())["settings"]["partial_captions"] is True
    # every training clip carries its video's three captions (and their embeddings); the held-out
    # videos, read by the detector, keep the one whole caption
    samples = [json.loads(m) for m in _tar_members(out / "shards", ".json")]
    assert len(samples) == 12
    assert {np.load(io.BytesIO(b)).shape[0] for b in _tar_members(out / "shards", ".text.npy")} == {3}
    for meta in samples:
        full, *short = meta["captions"]
        assert parse_caption(full) is not None and len(short) == 2 and all(parse_caption(c) is None for c in short)
    assert all(len(p.read_text().splitlines()) == 1 for p in (out / "heldout").rglob("*.txt"))
    assert set(quality.training_captions(out / "data").values()) == {m["captions"][0] for m in samples}


def test_make_synthetic_radius(tmp_path):
    from data.synthetic import track_object
    from data.video_io import read_video
    from scripts import make_synthetic

    areas = {}
    for name, radius in (("small", "0.08,0.08"), ("large", "0.16,0.16")):
        assert make_synthetic.main(["--output-dir", str(tmp_path / name), "--num-videos", "3", "--frames", "2",
                                    "--size", "64", "--radius", radius]) == 0  # fmt: skip
        areas[name] = [track_object(read_video(p)[0])["area"].mean() for p in sorted((tmp_path / name).rglob("*.mp4"))]
    for small, large in zip(areas["small"], areas["large"]):
        assert 2.5 < large / small < 5  # area grows with the radius squared (4x), anti-aliased edges aside


def test_the_reference_unet_attends_at_our_levels():
    """The diffusers U-Net of the benchmark has attention blocks at exactly our attention levels, for
    every config the benchmark times (so the time ratio compares like with like)."""
    for name in ("tiny", "demo", "base"):
        c = model_section("diffusion", name)
        levels = len(c["channel_mult"])
        down, up = unet_block_types(levels, c["attention_levels"])
        assert {i for i, b in enumerate(down) if b.startswith("CrossAttn")} == set(c["attention_levels"])
        assert {levels - 1 - i for i, b in enumerate(up) if b.startswith("CrossAttn")} == set(c["attention_levels"])
    assert unet_block_types(4, (2, 3)) == (("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
                                           ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"))


def test_quality_until_vae_scores_stage_one_only(tmp_path, capsys):
    """--until vae: data and stage 1 only (no encoding, no U-Net), scored on what stage 1 decides:
    the colour figures and the data / shuffled / reconstruction rows; no samples, no goals."""
    from scripts import quality

    out = tmp_path / "q"
    assert quality.main(["--quick", "--until", "vae", "--output-dir", str(out)]) == 0
    parts = [json.loads(x)["part"] for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert parts == ["stage1", "data", "shuffled", "stage1_recon", "stage1_adherence", "stage1_adherence", "seconds"]
    assert not (out / "report.json").exists()  # a whole run's report is never replaced by a stage-1 one
    report = json.loads((out / "report-until-vae.json").read_text())
    assert "goals" not in report and set(report["video_quality"]) == {"data", "shuffled", "stage1_recon"}
    assert report["frames_scored"] == 8 and math.isfinite(report["stage1"]["delta_e"])
    # the palette's colours in stage 1's latent: the closest pair and the median distance (std units)
    stage1 = report["stage1"]
    assert 0 < stage1["palette_separation"] <= stage1["palette_separation_median"]
    assert len(stage1["palette_closest"].split("/")) == 2
    assert (out / ".done-vae").exists() and not (out / ".done-encode").exists() and not (out / "shards").exists()


def test_quality_guide_is_the_newest_complete_checkpoint_before_the_last_step(tmp_path):
    """Autoguidance's guide: the newest complete checkpoint before train.max_steps (not the last
    step's own, whose EMA the export is; not one without its COMPLETE marker); none: a clear stop
    naming the way out."""
    from scripts import quality

    diff = tmp_path / "diffusion"
    (diff / "checkpoints").mkdir(parents=True)
    (diff / "config.yaml").write_text("train:\n  max_steps: 4000\n")
    for step, complete in ((2000, True), (3000, True), (3500, False), (4000, True)):
        d = diff / "checkpoints" / f"step-{step:07d}"
        d.mkdir()
        if complete:
            (d / "COMPLETE").write_text("")
    assert quality.guide_checkpoint(diff) == diff / "checkpoints" / "step-0003000"
    args = quality.parse_args(["--output-dir", str(tmp_path), "--autoguidance-scale", "2"])
    assert quality.parse_args([]).autoguidance_scale == 1.0  # off by default
    assert quality.autoguide_args(args, diff) == ["--autoguide", str(diff / "checkpoints" / "step-0003000"),
                                                  "--autoguidance-scale", "2.0"]
    args.autoguidance_scale = 1.0
    assert quality.autoguide_args(args, diff) == []
    for step in (2000, 3000):
        (diff / "checkpoints" / f"step-{step:07d}" / "COMPLETE").unlink()
    with pytest.raises(SystemExit, match="before step 4000.*--autoguidance-scale 1"):
        quality.guide_checkpoint(diff)


def test_stage1_adherence_reads_the_held_out_captions_of_the_same_videos(tmp_path):
    """stage1_adherence scores the held-out videos and their reconstructions against each video's own
    caption: the videos themselves read right, a 'reconstruction' played backwards keeps colour and
    shape but loses the direction, and a held-out folder with a caption missing gives no rows."""
    from data.synthetic import write_synthetic
    from data.video_io import read_video
    from scripts.quality import stage1_adherence

    held = tmp_path / "heldout"
    paths = sorted(write_synthetic(held, 6, num_frames=4, size=64, seed=1))
    videos = [read_video(p)[0] for p in paths]
    rows = stage1_adherence(held, paths, videos, [v[::-1] for v in videos])
    assert set(rows) == {"heldout_videos", "stage1_recon"} and rows["heldout_videos"]["videos"] == 6
    assert rows["heldout_videos"]["colour"] == rows["heldout_videos"]["shape"] == 1.0
    assert rows["heldout_videos"]["direction"] >= 5 / 6
    backwards = rows["stage1_recon"]
    assert backwards["colour"] == backwards["shape"] == 1.0 and backwards["direction"] <= 1 / 6
    paths[2].with_suffix(".txt").unlink()
    assert stage1_adherence(held, paths, videos, videos) == {}
