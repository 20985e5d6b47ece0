"""How the benchmarks measure (scripts.benchmark, scripts/runtime/evaluation.py): device and
autocast set-up, the peak-memory sampler, and one timed measurement (warm-up with FLOP counting,
then `repeats` timed calls)."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext

MEM_METHOD = {
    "cpu": "RSS sampled every 0.5 ms over warm-up + timed calls, minus RSS once model and inputs exist (after malloc_trim)",
    "cuda": "torch.cuda.max_memory_allocated over warm-up + timed calls minus memory allocated once model and inputs exist",
}


def setup(spec: dict):
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


def measure(spec: dict, call, device, sync, count_flops: bool = True, warmup: bool = True) -> dict:
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
