"""The cascade end to end on the built-in synthetic data (`make cascade`): a base model at half the
size, temporal interpolation and a spatial super-resolution stage, chained by one command, and the
super-resolution stage measured against bicubic upsampling on held-out videos.

    python -m scripts.cascade --output-dir runs/cascade          # ~10 min on 2 CPU cores
    python -m scripts.cascade --quick --output-dir /tmp/c        # tiny budgets (what the test runs)

Stages (`.done-<stage>` markers; a rerun continues, --fresh starts over):
data (96 training videos of 32x32, 16 frames; 24 held-out ones, seed 1) -> vae (the demo VAE) ->
encode_high (32x32 frames: 8x8 latents) and encode_low (the same videos at 16x16: 4x4 latents,
paired with the first by key) -> base (the demo U-Net on the low-resolution shards, trained for
temporal interpolation too) -> sr (the super-resolution stage: the high-resolution shards with
sr.low_res_shards = the low ones) -> sample (the chain: `scripts.sample --checkpoint BASE
--interpolate 2 --upsample SR`: 8 frames at 16x16 -> 16 frames at 32x32, at twice the fps) ->
evaluation (report.json).

Evaluation (each row: a noise-augmentation level and a window length): each held-out video (16 frames, 32x32) is downscaled to 16x16 and encoded as the
training pairs were, then (a) upsampled by the SR stage and decoded, (b) decoded at 16x16 and
upsampled bicubically (the baseline), (c) the original encoded and decoded at 32x32 (stage 1's
floor). Each against the original: PSNR, SSIM, foreground PSNR and ΔE (data.colour), and the
temporal flicker ratio (mean |frame difference| of the output over the original's; 1 = no flicker
added), plus the SR stage's seconds per output frame.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from data.files import write_json_atomic
from scripts.runtime.stages import run_stage

STAGES = ("data", "vae", "encode_high", "encode_low", "base", "sr", "sample")
HIGH, LOW = 32, 16  # frame sizes of the two encodings


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.cascade", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--output-dir", type=Path, default=Path("runs/cascade"))
    p.add_argument("--num-videos", type=int, default=96)
    p.add_argument("--heldout-videos", type=int, default=24)
    p.add_argument("--base-steps", type=int, default=1600)
    p.add_argument("--sr-steps", type=int, default=2400)
    p.add_argument("--vae-steps", type=int, default=None, help="override the demo VAE's train.max_steps")
    p.add_argument("--sr-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override of the SR stage (repeatable)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--aug-levels", default="0,0.1,0.25",
                   help="noise-augmentation levels (fractions of the schedule) the evaluation samples at")
    p.add_argument("--windows", default="16,8",
                   help="SR windows (frames) evaluated: the first at every level, the others at level 0")
    p.add_argument("--quick", action="store_true", help="tiny budgets and data (for tests)")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.num_videos, args.heldout_videos, args.num_samples, args.sample_steps = 8, 3, 2, 3
        args.base_steps, args.sr_steps, args.vae_steps, args.aug_levels, args.windows = 2, 2, 2, "0.1", "16"
    return args


def main(argv=None) -> int:
    from scripts import encode_latents, make_synthetic, sample, train_autoencoder, train_diffusion

    args = parse_args(argv)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    data, heldout, vae = out / "data", out / "heldout", out / "vae"
    high, low, base, sr, samples = out / "shards_32", out / "shards_16", out / "base", out / "sr", out / "samples"
    quick_vae = ["val.every=0", "loss.lpips_pretrained=false"] if args.quick else []
    vae_steps = [] if args.vae_steps is None else [f"train.max_steps={args.vae_steps}"]
    quick_diff = ["train.batch_size=2", "model.base_channels=16", "model.head_dim=16", "model.norm_groups=8",
                  "data.shuffle_buffer=4"] if args.quick else []  # fmt: skip
    encode = ["--autoencoder", str(vae / "export"), "--data", str(data), "--config", "configs/encode/demo.yaml"]

    def make_data():
        for folder, n, seed in ((data, args.num_videos, 0), (heldout, args.heldout_videos, 1)):
            rc = make_synthetic.main(["--output-dir", str(folder), "--num-videos", str(n), "--frames", "16",
                                      "--size", str(HIGH), "--fps", "8", "--seed", str(seed)])
            if rc:
                return rc
        return 0

    plan = {
        "data": make_data,
        "vae": lambda: train_autoencoder.main(["--config", "configs/autoencoder/demo.yaml", "--data", str(data),
                                               "--output-dir", str(vae), *vae_steps, *quick_vae]),
        "encode_high": lambda: encode_latents.main([*encode, "--output-dir", str(high), f"encode.size={HIGH}"]),
        "encode_low": lambda: encode_latents.main([*encode, "--output-dir", str(low), f"encode.size={LOW}"]),
        # the base model works at 16x16 (4x4 latents) and learns to fill every other frame
        "base": lambda: train_diffusion.main(["--config", "configs/diffusion/demo.yaml", "--shards", str(low),
                                              "--output-dir", str(base), f"train.max_steps={args.base_steps}",
                                              "cond.frame_cond_interp_prob=0.5", "cond.frame_cond_interp_strides=[2]",
                                              "cond.frame_cond_prob=0.5", *quick_diff]),
        "sr": lambda: train_diffusion.main(["--config", "configs/diffusion/demo.yaml", "--shards", str(high),
                                            "--output-dir", str(sr), f"train.max_steps={args.sr_steps}",
                                            f"sr.low_res_shards={low}", *quick_diff, *args.sr_set]),
        "sample": lambda: sample.main(["--checkpoint", str(base / "export"), "--interpolate", "2",
                                       "--upsample", str(sr / "export"), "--autoencoder", str(vae / "export"),
                                       "--num-samples", str(args.num_samples), "--sampler", args.sampler,
                                       "--steps", str(args.sample_steps), "--output-dir", str(samples),
                                       "--format", "mp4,png", "--upscale", "4"]),
    }
    times = {name: run_stage(out, name, plan[name], args.fresh, tag="cascade") for name in STAGES}
    levels = [float(x) for x in args.aug_levels.split(",") if x.strip()]
    windows = [int(x) for x in args.windows.split(",") if x.strip()]
    rows = [(level, windows[0]) for level in levels] + [(0.0, w) for w in windows[1:]]
    report = {"seconds": times, "super_resolution": evaluate_sr(out, rows, args.sampler, args.sample_steps),
              "samples": [str(p) for p in sorted(samples.glob("*.mp4"))]}
    write_json_atomic(out / "report.json", report)  # a rerun never leaves half a report
    print(json.dumps(report, indent=2))
    print(f"[cascade] report: {out / 'report.json'}; videos: {samples}")
    return 0


def _scores(truth: list[np.ndarray], videos: list[np.ndarray]) -> dict:
    """Mean PSNR / SSIM over frames, foreground PSNR / ΔE (data.colour) and the flicker ratio."""
    from autoencoder.metrics import psnr, ssim, temporal_flicker
    from data.colour import colour_fidelity
    from data.transforms import to_tensor

    rows = []
    for a, b in zip(truth, videos):
        ta, tb = to_tensor(a).transpose(0, 1), to_tensor(b).transpose(0, 1)  # [T, 3, H, W]
        colour = colour_fidelity(a, b)
        rows.append({"psnr": psnr(ta, tb).mean().item(), "ssim": ssim(ta, tb).mean().item(),
                     "fg_psnr": colour["fg_psnr"], "delta_e": colour["delta_e"],
                     "flicker_ratio": temporal_flicker(to_tensor(a)[None], to_tensor(b)[None])["motion_ratio"]})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def evaluate_sr(out: Path, rows: list[tuple[float, int]], sampler: str, steps: int) -> dict:
    """The SR stage against bicubic upsampling and stage 1's floor on the held-out videos, for each
    (augmentation level, window) in `rows`."""
    import cv2
    import torch

    from autoencoder.model import FrameVAE
    from autoencoder.video import encode_video
    from data.stats import un_whiten, whiten
    from data.transforms import resize_and_crop, to_tensor
    from data.video_io import read_video
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import decode_to_uint8, upsample_latents

    vae = FrameVAE.from_pretrained(out / "vae" / "export").eval()
    model, meta = load_diffusion_export(out / "sr" / "export")
    srm = meta["super_resolution"]
    names = list(meta.get("class_names") or [])
    paths = sorted((out / "heldout").rglob("*.mp4"))
    truth = [read_video(p)[0] for p in paths]
    labels = [names.index(p.parent.name) for p in paths] if meta["unet_config"].num_classes else None
    with torch.no_grad():
        lows = torch.cat([encode_video(vae, to_tensor(resize_and_crop(v, LOW))[None], chunk_size=16)[0] for v in truth])
        highs = torch.cat([encode_video(vae, to_tensor(v)[None], chunk_size=16)[0] for v in truth])
    low_frames = decode_to_uint8(vae, lows)
    bicubic = [np.stack([cv2.resize(f, (HIGH, HIGH), interpolation=cv2.INTER_CUBIC) for f in v]) for v in low_frames]
    result = {"clips": len(truth), "frames_per_clip": int(truth[0].shape[0]), "sampler": sampler, "steps": steps,
              "bicubic": _scores(truth, bicubic), "stage1_floor": _scores(truth, list(decode_to_uint8(vae, highs))),
              "sr": {}}
    for level, window in rows:
        start = time.perf_counter()
        z = upsample_latents(model, meta, whiten(lows, srm["low_res_stats"]), labels=labels, sampler=sampler,
                             steps=steps, seed=0, batch_size=len(truth), aug=level, window=window)
        seconds = time.perf_counter() - start
        frames = decode_to_uint8(vae, un_whiten(z, meta["latent"]["stats"]))
        result["sr"][f"aug={level} window={window}"] = {**_scores(truth, list(frames)),
                                                        "s_per_output_frame": seconds / z.shape[0] / z.shape[2]}
    best = max(result["sr"].values(), key=lambda r: r["psnr"])
    result["best_gain_over_bicubic_db"] = best["psnr"] - result["bicubic"]["psnr"]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
