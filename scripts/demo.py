"""The whole pipeline on the built-in synthetic dataset, on CPU, in one command (`make demo`):
synthetic mp4 files with captions -> stage-1 VAE -> a small text encoder -> latent shards with
caption embeddings -> stage-2 joint image+video text-to-video diffusion -> samples of prompts that
no training caption has -> runs/demo/samples/*.mp4 (+ GIF and PNG frame strip).
`--class-conditional` runs the class-conditional pipeline instead (no text).

Each stage leaves a `.done-<stage>` marker; rerunning skips finished stages, and an interrupted
training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.files import write_json_atomic
from scripts import report as report_page
from scripts.quality import BUILTIN_TEXT_LENGTH, builtin_text_encoder, write_prompts
from scripts.runtime.stages import run_stage, spread

STAGES = ("data", "vae", "text_encoder", "encode", "diffusion", "prompts", "sample")
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
    p.add_argument("--class-conditional", action="store_true",
                   help="condition on the class (shape) folders instead of the captions")
    p.add_argument("--num-samples", type=int, default=6)
    return p.parse_args(argv)


def quality_report(data_dir: Path, sample_dir: Path, text: bool = False) -> dict:
    """What a person sees in the samples, against the training videos (data.synthetic.video_quality):
    objects found whole, in the data's colours and constant along the clip, and the tracked motion
    (smoothness: mean |second difference| / mean speed, lower is smoother; speed in pixels per frame
    at the training size, the sample videos being upscaled; jumps: moves over 1/8 of the frame)."""
    from data.synthetic import video_quality
    from data.video_io import read_video

    samples = [read_video(p)[0] for p in sorted(sample_dir.glob("*.mp4"))]
    length = min(len(v) for v in samples)
    train = [read_video(p)[0][:length] for p in spread(sorted(data_dir.rglob("*.mp4")), 32)]
    report = {"training_data": video_quality(train, train, size=SIZE),
              "samples": video_quality([v[:length] for v in samples], train, size=SIZE)}
    if text:  # few samples: see scripts.quality --text for the measured figure
        from data.synthetic import prompt_adherence
        from scripts.quality import _prompts_of

        report["prompt_adherence"] = prompt_adherence([v[:length] for v in samples],
                                                      _prompts_of(sorted(sample_dir.glob("*.mp4"))))
    return report


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
    te, prompts = out / "text_encoder", out / "prompts.txt"
    text = not args.class_conditional
    check_mode(out, text, args.fresh)
    vae_steps = [] if args.vae_steps is None else [f"train.max_steps={args.vae_steps}"]
    diff_steps = [] if args.diffusion_steps is None else [f"train.max_steps={args.diffusion_steps}"]
    enc_text = [f"encode.text_encoder={te}", f"encode.text_max_length={BUILTIN_TEXT_LENGTH}"] if text else []
    # the pooled text standardised (model.text_pool_norm, since 2026-12-08): on two draws of the demo's data
    # and VAE, 48 unseen prompts each, colour 100% / 92% against 77% / 81%, colour match 98% / 81% against
    # 75% / 69%, drift 2.4 / 4.5 against 5.5 / 8.0 dE; shape and direction unchanged (README "Text-to-video")
    diff_text = [f"text.encoder={te}", f"text.max_length={BUILTIN_TEXT_LENGTH}", "data.class_conditional=false",
                 "model.text_pool_norm=true"] if text else []
    smp_text = ["--prompts", str(prompts)] if text else []
    plan = {
        "data": lambda: make_synthetic.main(["--output-dir", str(data), "--num-videos", str(args.num_videos),
                                             "--frames", "16", "--size", str(SIZE), "--fps", "8"]),
        "vae": lambda: train_autoencoder.main(["--config", args.vae_config, "--data", str(data),
                                               "--output-dir", str(vae), *vae_steps]),
        "encode": lambda: encode_latents.main(["--autoencoder", str(vae / "export"), "--data", str(data),
                                               "--output-dir", str(shards), "--config", "configs/encode/demo.yaml",
                                               *enc_text]),
        "diffusion": lambda: train_diffusion.main(["--config", args.diffusion_config, "--shards", str(shards),
                                                   "--output-dir", str(diff), *diff_steps, *diff_text]),
        "sample": lambda: sample.main(["--checkpoint", str(diff / "export"), "--autoencoder", str(vae / "export"),
                                       "--num-samples", str(args.num_samples), "--sampler", args.sampler,
                                       "--steps", str(args.sample_steps), "--output-dir", str(samples),
                                       "--format", "mp4,gif,png", "--upscale", "4", *smp_text]),
        "text_encoder": lambda: builtin_text_encoder(te),
        "prompts": lambda: write_prompts(data, prompts, args.num_samples),
    }
    stages = [s for s in STAGES if text or s not in ("text_encoder", "prompts")]
    times = {name: run_stage(out, name, plan[name], args.fresh) for name in stages}
    del decode_latents  # imported so a broken module fails here, not after training
    report = {"seconds": times, "quality": quality_report(data, samples, text)}
    if text:
        report["prompts"] = prompts.read_text().splitlines()
    vae_val = [r for r in _metrics(vae / "metrics.jsonl") if r.get("split") == "val"]
    if vae_val:
        keys = ("psnr", "ssim", "delta_e", "fg_psnr", "fg_colour_error", "flicker")
        report["vae_validation"] = {k: vae_val[-1][k] for k in keys if k in vae_val[-1]}
    diff_log = [r for r in _metrics(diff / "metrics.jsonl") if "loss" in r]
    if diff_log:
        report["diffusion_loss_first_last"] = [diff_log[0]["loss"], diff_log[-1]["loss"]]
    write_json_atomic(out / "report.json", report)  # a rerun never leaves half a report
    print(json.dumps(report, indent=2))
    print("\n[demo] videos:")
    for p in sorted(samples.glob("*.mp4")) + sorted(samples.glob("*.gif")) + sorted(samples.glob("*-strip.png")):
        print("  ", p)
    report_page.main([str(out)])  # curves, the samples playing, configs, provenance: open it in a browser
    print(f"[demo] run report: {out / 'report.html'}")
    return 0


def check_mode(out: Path, text: bool, fresh: bool) -> None:
    """A folder finished by the other pipeline (text / class-conditional) would mix the two: stop."""
    manifest = out / "shards" / "manifest.json"
    if fresh or not (out / ".done-encode").exists() or not manifest.exists():
        return
    has_text = bool((json.loads(manifest.read_text()).get("text") or {}).get("text_encoder"))
    if has_text != text:
        what = "text-conditioned" if has_text else "class-conditional"
        raise SystemExit(f"[demo] {out} holds a {what} run: pass --fresh (or another --output-dir)"
                         + ("" if has_text else " to run the text demo, or --class-conditional"))


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
