"""Shared helpers for the script-level tests: the session pipeline (data, VAE export, shards),
running entry points in a subprocess, and reading metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AE_TINY = ROOT / "configs" / "autoencoder" / "tiny.yaml"
DIFF_TINY = ROOT / "configs" / "diffusion" / "tiny.yaml"
ENCODE_DEMO = ROOT / "configs" / "encode" / "demo.yaml"
# timing fields differ between runs; everything else in a metrics line must repeat exactly
TIMING_KEYS = ("samples_per_s",)


@dataclass(frozen=True)
class Pipeline:
    data: Path  # class folders of mp4s
    vae: Path  # FrameVAE export
    shards: Path  # encode_latents output (video shards only)


def build_pipeline(root: Path) -> Pipeline:
    from scripts import encode_latents, make_synthetic, train_autoencoder

    data, vae_run, shards = root / "data", root / "vae", root / "shards"
    assert make_synthetic.main(["--output-dir", str(data), "--num-videos", "8", "--frames", "16", "--size", "32"]) == 0
    assert train_autoencoder.main(["--config", str(AE_TINY), "--data", str(data), "--output-dir", str(vae_run),
                                   "--max-steps", "2", "data.frames_per_video=2"]) == 0  # fmt: skip
    assert encode_latents.main(["--autoencoder", str(vae_run / "export"), "--data", str(data),
                                "--output-dir", str(shards), "--config", str(ENCODE_DEMO),
                                "encode.num_workers=0", "encode.videos_per_shard=4"]) == 0  # fmt: skip
    return Pipeline(data=data, vae=vae_run / "export", shards=shards)


def script_env(**extra: str) -> dict:
    """The test process's environment minus fault/debug switches, plus `extra`. One intra-op thread:
    on a shared 2-core machine, 2 OpenMP threads per process spin against any other load (10x slower)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LVD_FAULT_", "LVD_DEBUG_"))}
    netguard = str(ROOT / "tests" / "netguard")  # its sitecustomize blocks the network in the child too
    env.update({"PYTHONPATH": os.pathsep.join([netguard, str(ROOT)]), "LVD_BLOCK_NETWORK": "1", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **extra})  # fmt: skip
    return env


def run_script(module: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m scripts.<module> args...` in a subprocess; output captured as text."""
    return subprocess.run([sys.executable, "-m", f"scripts.{module}", *map(str, args)], cwd=ROOT,
                          env=env or script_env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip


def start_script(module: str, *args, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen([sys.executable, "-m", f"scripts.{module}", *map(str, args)], cwd=ROOT,
                            env=env or script_env(), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def read_metrics(path: Path, split: str | None = None) -> list[dict]:
    """metrics.jsonl lines (training lines only unless `split` is given), timing fields removed."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if rec.get("split") == split:
            rows.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return rows


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> int | None:
    """Poll metrics.jsonl until it logs a step >= `step`; the last logged step, None if the process ended."""
    end = time.time() + timeout
    while time.time() < end:
        steps = [r["step"] for r in read_metrics(metrics)]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise TimeoutError(f"{metrics}: no step >= {step} within {timeout} s")


def steps_of(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]
