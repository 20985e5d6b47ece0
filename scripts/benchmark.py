"""Throughput benchmark of the hot paths (VAE, latent shard reader, U-Net train step, sampling) against
diffusers models of matched width; prints one JSON object per line per figure.

Each measurement runs in a fresh subprocess (`--worker SPEC`) so that its peak memory is its own. FLOPs
come from torch.utils.flop_counter during the warm-up call; GFLOP/s = FLOPs / median timed call.
This file is the timing program (plan, spawn, report, one worker per bench); how a call is timed is
in scripts/runtime/measure.py, the diffusers reference models in scripts/runtime/reference.py, and
the sample-quality evaluation (--only sampler_quality) in scripts/runtime/evaluation.py.

    python -m scripts.benchmark                        # default run: < 10 min on 2 CPU cores
    python -m scripts.benchmark --quick --repeats 1    # tiny shapes (what the test runs)
    python -m scripts.benchmark --device cuda --dtype bf16 --only unet,sampling --output bench.jsonl
    python -m scripts.benchmark --only quality         # end-to-end quality run (scripts/quality.py), ~40 min
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.runtime.evaluation import interpolation_quality, sampler_quality
from scripts.runtime.measure import MEM_METHOD, PeakMemory, measure, setup
from scripts.runtime.reference import build_unet, build_vae, model_section

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("vae", "encode", "reader", "unet", "sampling", "sampler_quality", "quality", "fastpath", "interpolation",
           "fsdp")
DEFAULT_BENCHES = BENCHES[:5]  # sampler_quality needs a trained demo (make demo) and ~10 CPU minutes;
# quality (scripts.quality) trains the whole pipeline end to end: ~40 CPU minutes
# (sampler, steps[, DDIM eta]): the fast samplers against DDPM-250, and DDPM's own fresh noise at fewer steps
# (DDPM-K draws exactly what DDIM-K with eta = 1 draws) and half of it (DDIM eta = 0.5): README "The demo"
SAMPLER_QUALITY_RUNS = [("training", 0), ("ddpm", 250), ("dpmpp_2m", 5), ("dpmpp_2m", 10), ("dpmpp_2m", 15),
                        ("dpmpp_2m", 25), ("dpmpp_2m", 50), ("ddim", 50), ("ddim", 50, 0.5), ("ddpm", 50), ("ddpm", 100)]
# default repeats per bench (timed calls after one warm-up call); --repeats overrides all of them
REPEATS = {"vae": 3, "encode": 2, "reader": 3, "unet": 1, "sampling": 1, "sampler_quality": 1, "fastpath": 3, "interpolation": 1,
           "fsdp": 1}

# ----------------------------------------------------------------------------- worker side (one measurement)


def run_vae(spec: dict) -> dict:
    """Frames/s of encode or decode of N frames at hw x hw, under no_grad; op "encode_video": one
    video [1, 3, T, hw, hw] through autoencoder.video.encode_video in chunks of `chunk` frames."""
    import torch

    device, autocast, sync = setup(spec)
    vae, encode, decode, f = build_vae(spec["impl"], spec["config"])
    vae.to(device).eval()
    n, hw = spec["N"], spec["hw"]
    if spec["op"] == "encode_video":
        from autoencoder.video import encode_video

        video = torch.randn(1, 3, spec["T"], hw, hw, device=device).clamp(-1, 1)

        def call_video():
            with torch.no_grad(), autocast():
                return encode_video(vae, video, chunk_size=spec["chunk"])

        out = measure(spec, call_video, device, sync)
        return {**out, "frames_per_s": spec["T"] / (out["ms"] / 1e3)}
    x = torch.randn(n, 3, hw, hw, device=device).clamp(-1, 1)
    z = torch.randn(n, 4, hw // f, hw // f, device=device)

    def call():
        with torch.no_grad(), autocast():
            return encode(x) if spec["op"] == "encode" else decode(z)

    out = measure(spec, call, device, sync)
    return {**out, "frames_per_s": n / (out["ms"] / 1e3)}


def _train_step(spec: dict, device, autocast):
    """A closure doing forward + MSE + backward + AdamW step, like one stage-2 training step
    (spec "fused" / "channels_last": the fast path's optimizer and memory format)."""
    import torch

    net, call = build_unet(spec["impl"], spec["config"], spec.get("gc", False), spec.get("text", 0))
    net.to(device).train()
    if spec.get("channels_last"):
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=spec.get("fused") or None)
    gen = torch.Generator().manual_seed(0)
    shape = (spec["B"], 4, spec["T"], spec["hw"], spec["hw"])
    x, target = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    t = torch.randint(0, 1000, (spec["B"],), generator=gen).to(device)

    def step():
        with autocast():
            out = call(x, t)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return net, step


def run_unet(spec: dict) -> dict:
    device, autocast, sync = setup(spec)
    net, step = _train_step(spec, device, autocast)
    out = measure(spec, step, device, sync)
    params = sum(p.numel() for p in net.parameters())
    return {**out, "ms_per_frame": out["ms"] / (spec["B"] * spec["T"]), "params_m": params / 1e6, **_mfu(spec, out)}


# dense peak TFLOP/s by GPU name and dtype (vendor data sheets; bf16 on tensor cores, fp32 without
# TF32): the denominator of model FLOP utilisation. Others: --peak-tflops.
GPU_PEAK_TFLOPS = {"H200": {"bf16": 989.4, "fp32": 66.9}, "H100": {"bf16": 989.4, "fp32": 66.9},
                   "A100": {"bf16": 312.0, "fp32": 19.5}, "L4": {"bf16": 121.0, "fp32": 30.3},
                   "L40S": {"bf16": 362.1, "fp32": 91.6}}  # fmt: skip


def _mfu(spec: dict, out: dict) -> dict:
    """GPU name, its peak and the model FLOP utilisation (achieved GFLOP/s over the peak) on CUDA."""
    import torch

    if not spec["device"].startswith("cuda") or "gflop_per_s" not in out:
        return {}
    name = torch.cuda.get_device_name(torch.device(spec["device"]))
    peak = spec.get("peak_tflops") or next((v[spec["dtype"]] for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return {"gpu": name, "peak_tflops": peak, "mfu": out["gflop_per_s"] / (peak * 1e3) if peak else None}


def run_fastpath(spec: dict) -> dict:
    """The base U-Net train step with one fast-path variant (dtype, torch.compile, channels-last,
    fused AdamW). FLOPs are counted on an eager call; a compiled variant's first call (compilation)
    is timed apart as compile_s."""
    from torch.utils.flop_counter import FlopCounterMode

    device, autocast, sync = setup(spec)
    net, step = _train_step({**spec, "impl": "ours"}, device, autocast)
    with FlopCounterMode(display=False) as counter:
        step()
    gflops, compile_s = counter.get_total_flops() / 1e9, None
    if spec.get("compile"):
        net.compile()
        start = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - start
    out = measure(spec, step, device, sync, count_flops=False)
    out.update(gflops=gflops, gflop_per_s=gflops / (out["ms"] / 1e3), compile_s=compile_s)
    return {**out, **_mfu(spec, out)}


def run_fsdp(spec: dict) -> dict:
    """Peak memory per process of `accelerate launch` with 2 CPU processes (gloo) training stage 2
    for a few steps on random latent shards, with DDP or with train.fsdp (the same run otherwise)."""
    import socket

    scratch = Path(tempfile.mkdtemp(prefix="lvd-fsdp-"))
    try:
        _write_shards(scratch / "shards", 8, (4, spec["T"], spec["hw"], spec["hw"]), per_shard=4)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "LVD_DEBUG_PEAK_MEMORY": "1", "HF_HOME": str(scratch / "hf")}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", str(spec.get("threads") or 1), "--main_process_port", str(port),
               "-m", "scripts.train_diffusion", "--config", f"configs/diffusion/{spec['config']}.yaml",
               "--shards", str(scratch / "shards"), "--output-dir", str(scratch / "run"), "--max-steps", str(spec["steps"]),
               "train.batch_size=1", "data.image_ratio=0", "data.class_conditional=false", "train.num_workers=0",
               "train.mixed_precision=no", "train.checkpoint_every=1000", "sample.every=0", "data.shuffle_buffer=4",
               f"train.fsdp={str(spec['mode'] == 'fsdp').lower()}"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        ranks = [json.loads((scratch / "run" / f"memory-rank{r}.json").read_text()) for r in (0, 1)]
        return {"peak_rss_training_mb_per_process": max(r["peak_rss_training_mb"] for r in ranks),
                "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
                "peak_rss_mb_by_rank": [r["peak_rss_mb"] for r in ranks],
                "parameter_mb_per_process": max(r["parameter_mb"] for r in ranks), "launch_s": seconds}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_shards(folder: Path, n: int, latent_shape: tuple, per_shard: int = 64) -> None:
    """Random float16 latent shards in the encode_latents format (as tests/test_latent_reader.py)."""
    import numpy as np

    from data.shards import ShardWriter, finalize, sample_key, sample_members
    from data.stats import RunningStats

    rng, writer, sides = np.random.default_rng(0), ShardWriter(folder), []
    for index, start in enumerate(range(0, n, per_shard)):
        samples, stats, count = [], RunningStats(latent_shape[0]), min(per_shard, n - start)
        for i in range(start, start + count):
            mean = rng.normal(0.0, 1.0, size=latent_shape).astype(np.float16)
            stats.update(mean)
            meta = {"source": f"c0/v{i}.mp4", "label": 0, "kind": "video"}
            samples.append(sample_members(sample_key(meta["source"], 0), mean, np.full_like(mean, -2.0), meta))
        record = dict(fingerprint="bench", inputs=count, videos=count, images=0, frames=count * latent_shape[1],
                      failures=[], stats=stats.to_dict(), latent_shape=list(latent_shape))  # fmt: skip
        sides.append(writer.write_shard("video", index, samples, record))
    finalize(folder, sides, clip_len=latent_shape[1], autoencoder={"weights_sha256": "00" * 32}, encoding={}, labels=[])


def _serve(folder: str):
    """A standard-library HTTP server for `folder` on 127.0.0.1 (a thread) -> (server, base URL)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def run_reader(spec: dict) -> dict:
    """Reader samples/s (one epoch, num_workers=0) from the folder and from the same folder served
    over HTTP on 127.0.0.1, vs samples/s one training step consumes."""
    from data.latents import make_latent_loader

    device, autocast, sync = setup(spec)
    with tempfile.TemporaryDirectory() as tmp:
        _write_shards(Path(tmp), spec["samples"], (4, spec["T"], spec["hw"], spec["hw"]))
        srv, url = _serve(tmp)
        rates = {}
        for name, source in (("reader", tmp), ("reader_http", url)):
            loader = make_latent_loader(source, kind="video", batch_size=spec["B"], shuffle_buffer=spec["B"] * 8)
            rates[name] = measure(spec, lambda loader=loader: sum(len(b["key"]) for b in loader), device, sync,
                                  count_flops=False)  # fmt: skip
        srv.shutdown()
    reader_sps, http_sps = (spec["samples"] / (rates[k]["ms"] / 1e3) for k in ("reader", "reader_http"))
    _, step = _train_step({**spec, "impl": "ours"}, device, autocast)
    train = measure(spec, step, device, sync, count_flops=False)
    consumed = spec["B"] / (train["ms"] / 1e3)
    return {"reader_samples_per_s": reader_sps, "reader_http_samples_per_s": http_sps, "http_vs_folder": http_sps / reader_sps,
            "train_step_ms": train["ms"], "train_samples_per_s": consumed, "reader_headroom": reader_sps / consumed,
            "reader_http_headroom": http_sps / consumed,
            "peak_mem_mb": max(rates["reader"]["peak_mem_mb"], train["peak_mem_mb"])}  # fmt: skip


def run_encode(spec: dict) -> dict:
    """scripts.encode_latents on `videos` synthetic mp4 files (frames x size^2) with an untrained VAE of
    the config and `workers` decoding processes: clips/s and frames/s of the whole run (discovery,
    decoding, encoding, shard writing). Peak memory is the main process's only."""
    import yaml

    from autoencoder.config import VAEConfig
    from autoencoder.model import FrameVAE
    from data.shards import load_manifest
    from scripts import encode_latents, make_synthetic

    device, _, _ = setup(spec)
    with tempfile.TemporaryDirectory() as tmp:
        data, vae_dir, out = Path(tmp) / "data", Path(tmp) / "vae", Path(tmp) / "shards"
        with contextlib.redirect_stdout(sys.stderr):
            make_synthetic.main(["--output-dir", str(data), "--num-videos", str(spec["videos"]), "--frames",
                                 str(spec["frames"]), "--size", str(spec["size"])])  # fmt: skip
        FrameVAE(VAEConfig(**model_section("autoencoder", spec["config"]))).save_pretrained(vae_dir)
        cfg = yaml.safe_load((ROOT / "configs" / "encode" / "demo.yaml").read_text())["encode"]
        settings = {**cfg, "size": spec["encode_size"], "clip_len": spec["clip_len"], "num_workers": spec["workers"]}
        argv = ["--autoencoder", str(vae_dir), "--data", str(data), *[f"encode.{k}={v}" for k, v in settings.items()]]
        times, mem = [], PeakMemory(device)
        mem.start()
        for i in range(spec["repeats"]):
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                if encode_latents.main([*argv, "--output-dir", str(out / str(i))]) != 0:
                    raise SystemExit("encode_latents failed")
            times.append(time.perf_counter() - start)
        totals = load_manifest(out / "0")["totals"]
    seconds = statistics.median(times)
    clips = totals["video_samples"]
    return {"s": seconds, "times_s": [round(t, 3) for t in times], "clips": clips, "clips_per_s": clips / seconds,
            "frames_per_s": clips * spec["clip_len"] / seconds, "peak_mem_mb": mem.peak_mb()}  # fmt: skip


def run_sampling(spec: dict) -> dict:
    """Seconds per video of diffusion.sampling.sample at the config, batch 1."""
    import torch

    from diffusion.sampling import sample
    from diffusion.schedules import make_alphas_cumprod

    device, autocast, sync = setup(spec)
    net, call = build_unet("ours", spec["config"], False)
    net.to(device).eval()
    calls = []

    def model(x, t, **cond):
        calls.append(1)
        with autocast():
            return call(x, t).float()

    shape = (1, 4, spec["T"], spec["hw"], spec["hw"])
    ab = make_alphas_cumprod("cosine", 1000, zero_terminal_snr=True)
    kwargs = dict(alphas_cumprod=ab, prediction="v", sampler=spec["sampler"], steps=spec["steps"], device=device)
    with torch.no_grad():
        model(torch.randn(shape, device=device), torch.zeros(1, device=device))  # warm-up
    calls.clear()
    # the single call above warmed the kernels up: every full sample is timed
    out = measure(spec, lambda: sample(model, shape, **kwargs), device, sync, count_flops=False, warmup=False)
    nfe = len(calls) // spec["repeats"]
    return {**out, "s_per_video": out["ms"] / 1e3, "nfe": nfe, "ms_per_nfe": out["ms"] / max(nfe, 1)}


WORKERS = {"vae": run_vae, "unet": run_unet, "reader": run_reader, "fastpath": run_fastpath, "encode": run_encode, "sampling": run_sampling,
           "sampler_quality": sampler_quality, "interpolation": interpolation_quality, "fsdp": run_fsdp}

# ----------------------------------------------------------------------------- parent side (plan, spawn, report)


def plan(bench: str, quick: bool) -> list[dict]:
    """Measurements of one bench: each dict is a worker spec minus device/dtype/repeats/impl."""
    if bench == "vae":
        sizes = [("tiny", 32, 2)] if quick else [(c, hw, 8 if c == "tiny" else 2) for c in ("tiny", "base") for hw in (64, 128)]
        frames = [dict(bench="vae", config=c, hw=hw, N=n, op=op) for c, hw, n in sizes for op in ("encode", "decode")]
        # chunked video encoding: peak memory flat in T (chunk 8), against one chunk of all T frames
        lengths = [(4, 2)] if quick else [(8, 8), (32, 8), (128, 8), (128, 128)]
        return frames + [dict(bench="vae", config="tiny", hw=32 if quick else 64, N=1, op="encode_video", T=t, chunk=k)
                         for t, k in lengths]  # fmt: skip
    if bench == "encode":
        # demo-sized inputs (decoding is cheap), and 128x128 sources resized to 64 (decoding matters)
        runs = [("tiny", 4, 8, 32, 32)] if quick else [("demo", 48, 16, 32, 32), ("tiny", 24, 32, 128, 64)]
        return [dict(bench="encode", config=c, videos=n, frames=f, size=sz, encode_size=es, clip_len=8, workers=w)
                for c, n, f, sz, es in runs for w in ((0,) if quick else (0, 2))]  # fmt: skip
    if bench == "reader":
        return [dict(bench="reader", config="tiny", B=2, T=4, hw=8, samples=16) if quick
                else dict(bench="reader", config="demo", B=8, T=8, hw=8, samples=512)]  # fmt: skip
    if bench == "unet":
        c, b, hw, ts = ("tiny", 1, 8, (4,)) if quick else ("base", 2, 32, (16, 8, 32))
        specs = [dict(bench="unet", config=c, B=b, T=ts[0], hw=hw, gc=True)]
        specs += [dict(bench="unet", config=c, B=b, T=t, hw=hw, gc=False) for t in ts]
        # text-to-video: cross-attention to 32 tokens of a T5-base-wide prompt (64 wide when quick)
        return specs + [dict(bench="unet", config=c, B=b, T=ts[0], hw=hw, gc=False, text=64 if quick else 768)]
    if bench == "fastpath":  # --dtype does not apply: each variant names its own
        shape = dict(config="tiny", B=1, T=4, hw=8) if quick else dict(config="base", B=2, T=16, hw=32)
        variants = [("fp32", False, False, False), ("bf16", False, False, False), ("bf16", False, True, True)]
        if not quick:  # compilation takes minutes on CPU
            variants += [("fp32", True, False, False), ("bf16", True, False, False), ("bf16", True, True, True)]
        return [dict(bench="fastpath", **shape, dtype=d, compile=c, channels_last=cl, fused=f) for d, c, cl, f in variants]
    if bench == "fsdp":  # the same 2-process run with DDP (the reference) and with train.fsdp
        shape = dict(config="tiny", T=4, hw=8, steps=2) if quick else dict(config="base", T=8, hw=16, steps=3)
        return [dict(bench="fsdp", mode=m, **shape) for m in ("ddp", "fsdp")]
    if bench == "interpolation":  # a trained demo-style model (--demo-dir), held-out clips of seed 7
        return [dict(bench="interpolation", N=4 if quick else 24, factor=2, seed=7, sampler="ddpm", steps=5 if quick else 250)]
    if bench == "sampler_quality":
        n, steps = (8, [("ddpm", 250), ("dpmpp_2m", 5), ("ddpm", 5), ("ddim", 5, 1.0)]) if quick else (48, SAMPLER_QUALITY_RUNS)
        return [dict(bench="sampler_quality", sampler=r[0], steps=r[1], N=n, guidance_scale=3.0, seed=1,
                     **({"eta": r[2]} if len(r) > 2 else {})) for r in steps]
    runs = [("tiny", 4, 8, "dpmpp_2m", 5)] if quick else [
        ("tiny", 16, 8, "dpmpp_2m", 25), ("tiny", 16, 8, "ddim", 50), ("tiny", 16, 8, "ddpm", 250),
        ("base", 16, 32, "dpmpp_2m", 25)]  # fmt: skip
    return [dict(bench="sampling", config=c, T=t, hw=hw, sampler=s, steps=n) for c, t, hw, s, n in runs]


def spawn(spec: dict) -> dict:
    """Run one spec in a fresh interpreter; its last stdout line is the result ({"error": ...} on failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFUSERS_NO_ADVISORY_WARNINGS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "scripts.benchmark", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _reference_reason(args) -> str | None:
    """Why diffusers references are skipped, or None when they run."""
    if args.no_reference:
        return "skipped (--no-reference)"
    if importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install -e '.[bench]')"
    return None


def _ratios(bench: str, ours: dict, ref: dict) -> dict:
    if "error" in ours or "error" in ref:
        return {}
    out = {"speedup_vs_reference": ref["ms"] / ours["ms"]}  # > 1: ours takes less time per call
    if "gflop_per_s" in ours and "gflop_per_s" in ref:
        out["ratio_gflop_per_s"] = ours["gflop_per_s"] / ref["gflop_per_s"]
    return out


def report(spec: dict, ours: dict, ref: dict | None, reason: str | None, args) -> dict:
    """One output line: the spec, our figures, the reference's (or null + reason), ratios, context."""
    line = {k: v for k, v in spec.items() if k not in ("repeats", "impl", "device", "dtype", "threads", "cache", "full_reference", "peak_tflops")}
    line["bench"] = {"vae": f"vae_{spec.get('op')}", "unet": "unet_train_step"}.get(spec["bench"], spec["bench"])
    line.update(ours)
    if spec["bench"] in ("vae", "unet"):
        line["reference"] = ref
        if ref is None:
            line["reference_reason"] = reason
        else:
            line.update(_ratios(spec["bench"], ours, ref))
    method = ("peak resident memory of each process over the whole launch (getrusage ru_maxrss), the larger of the "
              "two" if spec["bench"] == "fsdp" else MEM_METHOD[args.device.split(":")[0]])
    line.update(device=args.device, dtype=spec["dtype"], repeats=spec["repeats"], threads=_threads(args), mem_method=method,
                loadavg=[round(v, 2) for v in os.getloadavg()])  # fmt: skip
    return line


def _threads(args) -> int:
    if args.threads:
        return args.threads
    import torch  # only for the default thread count of a fresh process

    return torch.get_num_threads()


def _reference_for(spec: dict, reason: str | None) -> tuple[dict | None, str | None]:
    if spec["bench"] not in ("vae", "unet") or reason is not None:
        return None, reason
    if spec.get("op") == "encode_video":
        return None, "ours only (memory in T of autoencoder.video.encode_video)"
    if spec["bench"] == "unet" and spec.get("gc"):
        return None, "reference measured without gradient checkpointing only (time budget)"
    if spec["bench"] == "unet" and spec["T"] > 16 and not spec.get("full_reference"):
        return None, "reference at T > 16 only with --full-reference (4 CPU minutes at T = 32)"
    ref = spawn({**spec, "impl": "diffusers"})
    name = "diffusers.AutoencoderKL" if spec["bench"] == "vae" else "diffusers.UNet3DConditionModel"
    return {"name": name, **ref}, None


def _scaling_line(lines: list[dict]) -> dict | None:
    """Time per frame across T for the non-checkpointed U-Net runs (flat = T-independent cost per frame)."""
    runs = sorted((ln for ln in lines if ln["bench"] == "unet_train_step" and not ln["gc"] and not ln.get("text") and "ms" in ln), key=lambda ln: ln["T"])
    if len(runs) < 2:
        return None
    out = {"bench": "unet_time_per_frame", "config": runs[0]["config"], "T": [r["T"] for r in runs],
           "ms_per_frame": [round(r["ms_per_frame"], 2) for r in runs]}  # fmt: skip
    out["max_over_min"] = max(out["ms_per_frame"]) / min(out["ms_per_frame"])
    refs = [(r["T"], r["reference"]["ms_per_frame"]) for r in runs if r.get("reference") and "ms_per_frame" in r["reference"]]
    if len(refs) >= 2:  # the Ts the reference ran at (T > 16 only with --full-reference)
        out["reference_T"] = [t for t, _ in refs]
        out["reference_ms_per_frame"] = [round(ms, 2) for _, ms in refs]
        out["reference_max_over_min"] = max(out["reference_ms_per_frame"]) / min(out["reference_ms_per_frame"])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--only", default=",".join(DEFAULT_BENCHES),
                   help=f"comma-separated subset of {','.join(BENCHES)} (default: all but sampler_quality and quality)")
    p.add_argument("--demo-dir", type=Path, default=ROOT / "runs" / "demo",
                   help="sampler_quality: a finished `make demo` folder (default runs/demo)")
    p.add_argument("--quality-dir", type=Path, default=ROOT / "runs" / "quality",
                   help="quality: its working folder (a rerun continues there; default runs/quality)")
    p.add_argument("--quick", action="store_true", help="tiny configs and shapes (seconds; used by the test)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls after one warm-up (default {REPEATS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per measurement (default: torch's)")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers reference models")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense peak TFLOP/s at --dtype, for MFU (default: a table of known GPUs)")
    p.add_argument("--full-reference", action="store_true", help="also the reference U-Net at T = 32 (slow on CPU)")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON lines to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["bench"]](spec)), flush=True)
        return 0
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown or (args.repeats is not None and args.repeats < 1):
        print(f"error: unknown bench(es) {unknown} or --repeats < 1", file=sys.stderr)
        return 2
    if "quality" in only:  # its own program: trains, samples and scores (scripts/quality.py)
        from scripts import quality

        rc = quality.main(["--output-dir", str(args.quality_dir)] + (["--quick"] if args.quick else [])
                          + (["--output", str(args.output)] if args.output else []))
        only = [b for b in only if b != "quality"]
        if rc or not only:
            return rc
    reason, lines = _reference_reason(args), []
    sink = open(args.output, "w") if args.output else None  # noqa: SIM115 (closed below)
    scratch = tempfile.mkdtemp(prefix="lvd-bench-")
    try:
        for bench in only:
            items = plan(bench, args.quick)
            for index, item in enumerate(items):
                repeats = args.repeats or (1 if args.quick else REPEATS[bench])
                spec = {"impl": "ours", "device": args.device, "dtype": args.dtype, "repeats": repeats,
                        "threads": args.threads, "full_reference": args.full_reference,
                        "peak_tflops": args.peak_tflops, **item}
                if bench in ("sampler_quality", "interpolation"):
                    spec.update(demo_dir=str(args.demo_dir), cache=str(Path(scratch) / "ddpm250.pt"))
                    missing = [p for p in ("diffusion/export", "vae/export", "shards") if not (args.demo_dir / p).exists()]
                    if missing:
                        print(f"error: {args.demo_dir} lacks {', '.join(missing)}: run `make demo` first "
                              "or pass --demo-dir", file=sys.stderr)  # fmt: skip
                        return 2
                ours = spawn(spec)
                ref, why = _reference_for(spec, reason)
                lines.append(report(spec, ours, ref, why, args))
                if bench == "fsdp" and index and "peak_rss_mb_per_process" in ours and "error" not in lines[-2]:
                    ddp = lines[-2]
                    lines[-1]["peak_rss_vs_ddp"] = ours["peak_rss_mb_per_process"] / ddp["peak_rss_mb_per_process"]
                    lines[-1]["peak_rss_training_vs_ddp"] = (ours["peak_rss_training_mb_per_process"]
                                                             / ddp["peak_rss_training_mb_per_process"])
                    lines[-1]["parameters_vs_ddp"] = ours["parameter_mb_per_process"] / ddp["parameter_mb_per_process"]
                if bench == "fastpath" and index and "ms" in ours and "ms" in lines[-1 - index]:
                    lines[-1]["speedup_vs_fp32_eager"] = lines[-1 - index]["ms"] / ours["ms"]
                extra = _scaling_line(lines) if bench == "unet" and index == len(items) - 1 else None
                for line in [lines[-1]] + ([extra] if extra else []):
                    text = json.dumps(line)
                    print(text, flush=True)
                    if sink:
                        sink.write(text + "\n")
                        sink.flush()
    finally:
        if sink:
            sink.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any("error" in ln for ln in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
