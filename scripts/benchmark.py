"""Throughput benchmark of the hot paths (VAE, latent shard reader, U-Net train step, sampling) against
diffusers models of matched width; prints one JSON object per line per figure.

Each measurement runs in a fresh subprocess (`--worker SPEC`) so that its peak memory is its own. FLOPs
come from torch.utils.flop_counter during the warm-up call; GFLOP/s = FLOPs / median timed call.

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
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("vae", "encode", "reader", "unet", "sampling", "sampler_quality", "quality")
DEFAULT_BENCHES = BENCHES[:5]  # sampler_quality needs a trained demo (make demo) and ~10 CPU minutes;
# quality (scripts.quality) trains the whole pipeline end to end: ~40 CPU minutes
SAMPLER_QUALITY_RUNS = [("training", 0), ("ddpm", 250), ("dpmpp_2m", 5), ("dpmpp_2m", 10), ("dpmpp_2m", 15),
                        ("dpmpp_2m", 25), ("dpmpp_2m", 50), ("ddim", 50)]
MEM_METHOD = {
    "cpu": "RSS sampled every 0.5 ms over warm-up + timed calls, minus RSS once model and inputs exist (after malloc_trim)",
    "cuda": "torch.cuda.max_memory_allocated over warm-up + timed calls minus memory allocated once model and inputs exist",
}
# default repeats per bench (timed calls after one warm-up call); --repeats overrides all of them
REPEATS = {"vae": 3, "encode": 2, "reader": 3, "unet": 1, "sampling": 1, "sampler_quality": 1}

# ----------------------------------------------------------------------------- worker side (one measurement)


def _model_section(kind: str, name: str) -> dict:
    import yaml

    section = yaml.safe_load((ROOT / "configs" / kind / f"{name}.yaml").read_text())["model"]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}


def _setup(spec: dict):
    """(device, autocast context factory, sync) for the spec's --device / --dtype."""
    import torch

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["dtype"])

    def autocast():
        return torch.autocast(device.type, dtype=low) if low is not None else nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return device, autocast, sync


class PeakMemory:
    """Working-memory peak of this process since `start()`, in MiB (see MEM_METHOD).

    On CPU a thread samples the resident set size (/proc/self/statm) every 0.5 ms; freed heap is
    handed back to the OS first (malloc_trim) so that growth is visible rather than served from pages
    an earlier phase left resident. Short-lived spikes between two samples can be missed."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self._peak, self._stop, self._thread = 0, None, None

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.0005):
            self._peak = max(self._peak, self._rss_mb())

    def start(self) -> None:
        import gc
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: growth may be partly hidden
            pass
        self.base = self._peak = self._rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return max(torch.cuda.max_memory_allocated() / 2**20 - self.base, 0.0)
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss_mb())
        return max(self._peak - self.base, 0.0)


def _warm_runtime(device) -> None:
    """Load the flop counter and the kernels' libraries first, so their one-off memory is not counted."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 8, 8, 8, device=device, requires_grad=True)
    with FlopCounterMode(display=False):
        y = F.conv2d(F.group_norm(x, 4), torch.randn(8, 8, 3, 3, device=device), padding=1).flatten(2)
        F.scaled_dot_product_attention(y[:, None], y[:, None], y[:, None]).sum().backward()


def _measure(spec: dict, call, device, sync, count_flops: bool = True, warmup: bool = True) -> dict:
    """Warm-up call (FLOPs counted there), then `repeats` timed calls: median ms, GFLOP, peak memory.
    warmup=False (no FLOPs) when the caller has warmed the kernels up itself."""
    from torch.utils.flop_counter import FlopCounterMode

    _warm_runtime(device)
    mem = PeakMemory(device)
    mem.start()
    counter = FlopCounterMode(display=False) if count_flops else nullcontext()
    if warmup:
        with counter:
            call()
    times = []
    for _ in range(spec["repeats"]):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    out = {"ms": ms, "times_ms": [round(1e3 * t, 2) for t in times], "peak_mem_mb": mem.peak_mb()}
    if count_flops:
        out["gflops"] = counter.get_total_flops() / 1e9
        out["gflop_per_s"] = out["gflops"] / (ms / 1e3)
    return out


def _build_vae(impl: str, config: str):
    if impl == "ours":
        from autoencoder.config import VAEConfig
        from autoencoder.model import FrameVAE

        vae = FrameVAE(VAEConfig(**_model_section("autoencoder", config)))
        return vae, (lambda x: vae.encode(x).mode()), vae.decode, vae.downsample_factor
    from diffusers import AutoencoderKL

    c = _model_section("autoencoder", config)
    levels = len(c["channel_mult"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=c["num_res_blocks"],
        block_out_channels=tuple(c["base_channels"] * m for m in c["channel_mult"]), latent_channels=4,
        norm_num_groups=c["norm_groups"], mid_block_add_attention=c.get("mid_attention", True),
    )  # fmt: skip
    return vae, (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample), 2 ** (levels - 1)


def run_vae(spec: dict) -> dict:
    """Frames/s of encode or decode of N frames at hw x hw, under no_grad; op "encode_video": one
    video [1, 3, T, hw, hw] through autoencoder.video.encode_video in chunks of `chunk` frames."""
    import torch

    device, autocast, sync = _setup(spec)
    vae, encode, decode, f = _build_vae(spec["impl"], spec["config"])
    vae.to(device).eval()
    n, hw = spec["N"], spec["hw"]
    if spec["op"] == "encode_video":
        from autoencoder.video import encode_video

        video = torch.randn(1, 3, spec["T"], hw, hw, device=device).clamp(-1, 1)

        def call_video():
            with torch.no_grad(), autocast():
                return encode_video(vae, video, chunk_size=spec["chunk"])

        out = _measure(spec, call_video, device, sync)
        return {**out, "frames_per_s": spec["T"] / (out["ms"] / 1e3)}
    x = torch.randn(n, 3, hw, hw, device=device).clamp(-1, 1)
    z = torch.randn(n, 4, hw // f, hw // f, device=device)

    def call():
        with torch.no_grad(), autocast():
            return encode(x) if spec["op"] == "encode" else decode(z)

    out = _measure(spec, call, device, sync)
    return {**out, "frames_per_s": n / (out["ms"] / 1e3)}


def _build_unet(impl: str, config: str, gc: bool):
    """(module, call(x, t) -> output) for our UNet3D or diffusers' UNet3DConditionModel at matched width."""
    import torch

    c = _model_section("diffusion", config)
    if impl == "ours":
        from diffusion.config import UNetConfig
        from diffusion.unet3d import UNet3D

        net = UNet3D(UNetConfig(**{**c, "in_channels": 4, "gradient_checkpointing": gc}))
        return net, lambda x, t: net(x, t)
    from diffusers import UNet3DConditionModel

    levels, ctx_dim = len(c["channel_mult"]), 64
    net = UNet3DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=c["num_res_blocks"],
        block_out_channels=tuple(c["base_channels"] * m for m in c["channel_mult"]),
        down_block_types=("CrossAttnDownBlock3D",) * (levels - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (levels - 1),
        norm_num_groups=c["norm_groups"], cross_attention_dim=ctx_dim,
        attention_head_dim=8,  # diffusers' naming quirk: this is the number of heads (8 x 32 at 256 ch)
    )  # fmt: skip
    if gc:
        net.enable_gradient_checkpointing()
    context = {}

    def call(x, t):
        if "e" not in context:
            context["e"] = torch.randn(x.shape[0], 1, ctx_dim, device=x.device)
        return net(x, t, encoder_hidden_states=context["e"]).sample

    return net, call


def _train_step(spec: dict, device, autocast):
    """A closure doing forward + MSE + backward + AdamW step, like one stage-2 training step."""
    import torch

    net, call = _build_unet(spec["impl"], spec["config"], spec.get("gc", False))
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
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
    device, autocast, sync = _setup(spec)
    net, step = _train_step(spec, device, autocast)
    out = _measure(spec, step, device, sync)
    params = sum(p.numel() for p in net.parameters())
    return {**out, "ms_per_frame": out["ms"] / (spec["B"] * spec["T"]), "params_m": params / 1e6}


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


def run_reader(spec: dict) -> dict:
    """Reader samples/s (one epoch, num_workers=0) vs samples/s one training step consumes."""
    from data.latents import make_latent_loader

    device, autocast, sync = _setup(spec)
    with tempfile.TemporaryDirectory() as tmp:
        _write_shards(Path(tmp), spec["samples"], (4, spec["T"], spec["hw"], spec["hw"]))
        loader = make_latent_loader(tmp, kind="video", batch_size=spec["B"], shuffle_buffer=spec["B"] * 8)
        reader = _measure(spec, lambda: sum(len(b["key"]) for b in loader), device, sync, count_flops=False)
    reader_sps = spec["samples"] / (reader["ms"] / 1e3)
    _, step = _train_step({**spec, "impl": "ours"}, device, autocast)
    train = _measure(spec, step, device, sync, count_flops=False)
    consumed = spec["B"] / (train["ms"] / 1e3)
    return {"reader_samples_per_s": reader_sps, "train_step_ms": train["ms"], "train_samples_per_s": consumed,
            "reader_headroom": reader_sps / consumed, "peak_mem_mb": max(reader["peak_mem_mb"], train["peak_mem_mb"])}  # fmt: skip


def run_encode(spec: dict) -> dict:
    """scripts.encode_latents on `videos` synthetic mp4 files (frames x size^2) with an untrained VAE of
    the config and `workers` decoding processes: clips/s and frames/s of the whole run (discovery,
    decoding, encoding, shard writing). Peak memory is the main process's only."""
    import yaml

    from autoencoder.config import VAEConfig
    from autoencoder.model import FrameVAE
    from data.shards import load_manifest
    from scripts import encode_latents, make_synthetic

    device, _, _ = _setup(spec)
    with tempfile.TemporaryDirectory() as tmp:
        data, vae_dir, out = Path(tmp) / "data", Path(tmp) / "vae", Path(tmp) / "shards"
        with contextlib.redirect_stdout(sys.stderr):
            make_synthetic.main(["--output-dir", str(data), "--num-videos", str(spec["videos"]), "--frames",
                                 str(spec["frames"]), "--size", str(spec["size"])])  # fmt: skip
        FrameVAE(VAEConfig(**_model_section("autoencoder", spec["config"]))).save_pretrained(vae_dir)
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

    device, autocast, sync = _setup(spec)
    net, call = _build_unet("ours", spec["config"], False)
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
    out = _measure(spec, lambda: sample(model, shape, **kwargs), device, sync, count_flops=False, warmup=False)
    nfe = len(calls) // spec["repeats"]
    return {**out, "s_per_video": out["ms"] / 1e3, "nfe": nfe, "ms_per_nfe": out["ms"] / max(nfe, 1)}


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, D] (float64)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def _clip_features(latents):
    """Whitened latents [N, C, T, h, w] -> [N, C*T*4] features: each frame's latent average-pooled
    to 2x2, so the features keep the object's coarse position in every frame (its motion)."""
    import torch.nn.functional as F

    n, c, t, h, w = latents.shape
    pooled = F.adaptive_avg_pool2d(latents.float().permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w), 2)
    return pooled.reshape(n, -1)


JUMP_PX = 4.0  # a frame-to-frame move of the object's centre this large (32x32 frames) counts as a jump


def run_sampler_quality(spec: dict) -> dict:
    """One sampler/step count on a trained demo model: latent Fréchet distance of `N` samples to `N`
    training clips and to the DDPM-250 samples (cached by the parent); and, tracking the decoded
    object's centre, its path smoothness (data.synthetic.path_smoothness), mean speed in pixels per
    frame and the share of frame-to-frame moves over JUMP_PX (the "training" row is the target)."""
    import torch

    from autoencoder.model import FrameVAE
    from data.latents import make_latent_loader
    from data.stats import un_whiten
    from data.synthetic import motion_summary
    from scripts.runtime.export import load_diffusion_export
    from scripts.runtime.generation import decode_to_uint8, generate

    device, _, sync = _setup(spec)
    demo = Path(spec["demo_dir"])
    model, meta = load_diffusion_export(demo / "diffusion" / "export", map_location=device)
    lat, n = meta["latent"], spec["N"]
    labels = [i % len(meta["class_names"]) for i in range(n)] if meta["unet_config"].num_classes else None
    train = []
    for batch in make_latent_loader(demo / "shards", kind="video", batch_size=n, use_mean=True, shuffle_buffer=0):
        train.append(batch["latent"])
    train = torch.cat(train)[torch.randperm(sum(len(b) for b in train), generator=torch.Generator().manual_seed(0))]
    if len(train) < 2 * n:
        raise SystemExit(f"{demo / 'shards'} has {len(train)} clips; the comparison needs 2 x N = {2 * n}")
    start = time.perf_counter()
    if spec["sampler"] == "training":  # the noise floor: N other training clips in place of samples
        out = train[n : 2 * n]
    else:
        out = generate(model, meta["unet_config"], meta["diffusion_config"], num=n, frames=lat["clip_len"],
                       latent_shape=lat["shape"], labels=labels, guidance_scale=spec["guidance_scale"],
                       sampler=spec["sampler"], steps=spec["steps"], seed=spec["seed"], batch_size=n, device=device)
    sync()
    seconds = time.perf_counter() - start
    feats = _clip_features(out)
    result = {"fd_to_training": frechet_distance(feats, _clip_features(train[:n])), "s_per_video": seconds / n}
    cache = Path(spec["cache"])
    if spec["sampler"] == "ddpm" and spec["steps"] == 250:
        torch.save(out, cache)
    elif cache.exists():
        result["fd_to_ddpm250"] = frechet_distance(feats, _clip_features(torch.load(cache, weights_only=True)))
    vae = FrameVAE.from_pretrained(demo / "vae" / "export").to(device).eval()
    frames = decode_to_uint8(vae, un_whiten(out, lat["stats"]), device=device)
    motion = motion_summary(frames, jump_px=JUMP_PX)  # videos with the object found in every frame
    result["tracked_videos"] = motion.pop("videos")
    return {**result, **motion}


WORKERS = {"vae": run_vae, "unet": run_unet, "reader": run_reader, "encode": run_encode, "sampling": run_sampling,
           "sampler_quality": run_sampler_quality}

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
        return specs + [dict(bench="unet", config=c, B=b, T=t, hw=hw, gc=False) for t in ts]
    if bench == "sampler_quality":
        n, steps = (8, [("ddpm", 250), ("dpmpp_2m", 5)]) if quick else (48, SAMPLER_QUALITY_RUNS)
        return [dict(bench="sampler_quality", sampler=s, steps=k, N=n, guidance_scale=3.0, seed=1) for s, k in steps]
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
    line = {k: v for k, v in spec.items() if k not in ("repeats", "impl", "device", "dtype", "threads", "cache", "full_reference")}
    line["bench"] = {"vae": f"vae_{spec.get('op')}", "unet": "unet_train_step"}.get(spec["bench"], spec["bench"])
    line.update(ours)
    if spec["bench"] in ("vae", "unet"):
        line["reference"] = ref
        if ref is None:
            line["reference_reason"] = reason
        else:
            line.update(_ratios(spec["bench"], ours, ref))
    line.update(device=args.device, dtype=args.dtype, repeats=spec["repeats"], threads=_threads(args), mem_method=MEM_METHOD[args.device.split(":")[0]],
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
    runs = sorted((ln for ln in lines if ln["bench"] == "unet_train_step" and not ln["gc"] and "ms" in ln), key=lambda ln: ln["T"])
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
                spec = {**item, "impl": "ours", "device": args.device, "dtype": args.dtype, "repeats": repeats,
                        "threads": args.threads, "full_reference": args.full_reference}
                if bench == "sampler_quality":
                    spec.update(demo_dir=str(args.demo_dir), cache=str(Path(scratch) / "ddpm250.pt"))
                    missing = [p for p in ("diffusion/export", "vae/export", "shards") if not (args.demo_dir / p).exists()]
                    if missing:
                        print(f"error: {args.demo_dir} lacks {', '.join(missing)}: run `make demo` first "
                              "or pass --demo-dir", file=sys.stderr)  # fmt: skip
                        return 2
                ours = spawn(spec)
                ref, why = _reference_for(spec, reason)
                lines.append(report(spec, ours, ref, why, args))
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
