"""The whole pipeline on the built-in synthetic dataset, on CPU, in one command (`make demo`):
synthetic mp4 files -> stage-1 VAE -> latent shards -> stage-2 joint image+video diffusion ->
class-conditional samples -> runs/demo/samples/*.mp4 (+ GIF and PNG frame strip).

Each stage leaves a `.done-<stage>` marker; rerunning skips finished stages, and an interrupted
training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.runtime.stages import run_stage, spread

STAGES = ("data", "vae", "encode", "diffusion", "sample")
SIZE = 32  # frame size of the synthetic videos


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--num-videos", type=int, default=96)
    p.add_argument("--vae-config", default="configs/autoencoder/demo.yaml")
    p.add_argument("--diffusion-config", default="configs/diffusion/demo.yaml")
    p.add_argument("--vae-steps", type=int, default=None, help="override train.max_steps of the VAE")
    p.add_argument("--diffusion-steps", type=int, default=None, help="override train.max_steps of the diffusion model")
    # DDPM-250 moved the demo's objects most smoothly, with half the jumps of DPM-Solver++ at any
    # step count (README, "Results"); 6 samples take ~20 s on 2 cores
    p.add_argument("--sampler", default="ddpm", help="ddpm, ddim or dpmpp_2m (default ddpm)")
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--fresh", action="store_true", help="ignore finished stages and start over in --output-dir")
    return p.parse_args(argv)


def quality_report(data_dir: Path, sample_dir: Path) -> dict:
    """What a person sees in the samples, against the training videos (data.synthetic.video_quality):
    objects found whole, in the data's colours and constant along the clip, and the tracked motion
    (smoothness: mean |second difference| / mean speed, lower is smoother; speed in pixels per frame
    at the training size, the sample videos being upscaled; jumps: moves over 1/8 of the frame)."""
    from data.synthetic import video_quality
    from data.video_io import read_video

    samples = [read_video(p)[0] for p in sorted(sample_dir.glob("*.mp4"))]
    length = min(len(v) for v in samples)
    train = [read_video(p)[0][:length] for p in spread(sorted(data_dir.rglob("*.mp4")), 32)]
    return {"training_data": video_quality(train, train, size=SIZE),
            "samples": video_quality([v[:length] for v in samples], train, size=SIZE)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    from scripts import (
        decode_latents,
        encode_latents,
        make_synthetic,
        sample,
        train_autoencoder,
        train_diffusion,
    )

    data, vae, shards, diff, samples = out / "data", out / "vae", out / "shards", out / "diffusion", out / "samples"
    vae_steps = [] if args.vae_steps is None else [f"train.max_steps={args.vae_steps}"]
    diff_steps = [] if args.diffusion_steps is None else [f"train.max_steps={args.diffusion_steps}"]
    plan = {
        "data": lambda: make_synthetic.main(["--output-dir", str(data), "--num-videos", str(args.num_videos),
                                             "--frames", "16", "--size", str(SIZE), "--fps", "8"]),
        "vae": lambda: train_autoencoder.main(["--config", args.vae_config, "--data", str(data),
                                               "--output-dir", str(vae), *vae_steps]),
        "encode": lambda: encode_latents.main(["--autoencoder", str(vae / "export"), "--data", str(data),
                                               "--output-dir", str(shards), "--config", "configs/encode/demo.yaml"]),
        "diffusion": lambda: train_diffusion.main(["--config", args.diffusion_config, "--shards", str(shards),
                                                   "--output-dir", str(diff), *diff_steps]),
        "sample": lambda: sample.main(["--checkpoint", str(diff / "export"), "--autoencoder", str(vae / "export"),
                                       "--num-samples", "6", "--sampler", args.sampler, "--steps", str(args.sample_steps),
                                       "--output-dir", str(samples), "--format", "mp4,gif,png", "--upscale", "4"]),
    }
    times = {name: run_stage(out, name, plan[name], args.fresh) for name in STAGES}
    del decode_latents  # imported so a broken module fails here, not after training
    report = {"seconds": times, "quality": quality_report(data, samples)}
    vae_val = [r for r in _metrics(vae / "metrics.jsonl") if r.get("split") == "val"]
    if vae_val:
        keys = ("psnr", "ssim", "delta_e", "fg_psnr", "fg_colour_error", "flicker")
        report["vae_validation"] = {k: vae_val[-1][k] for k in keys if k in vae_val[-1]}
    diff_log = [r for r in _metrics(diff / "metrics.jsonl") if "loss" in r]
    if diff_log:
        report["diffusion_loss_first_last"] = [diff_log[0]["loss"], diff_log[-1]["loss"]]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("\n[demo] videos:")
    for p in sorted(samples.glob("*.mp4")) + sorted(samples.glob("*.gif")) + sorted(samples.glob("*-strip.png")):
        print("  ", p)
    return 0


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
