"""Multi-stage drivers (scripts.demo, scripts.quality): resumable stages with `.done-<stage>`
markers, and an even spread of data files for scoring."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_stage(out: Path, name: str, fn, fresh: bool, tag: str = "demo") -> float:
    """Run `fn` (a main() returning an exit code) unless OUT/.done-NAME exists (or `fresh`); returns
    the seconds it took, read back from the marker when the stage had run before."""
    marker = out / f".done-{name}"
    if marker.exists() and not fresh:
        print(f"[{tag}] {name}: already done ({marker}), skipping")
        try:  # the time it took when it ran, so a rerun's report keeps it
            return float(json.loads(marker.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):
            return 0.0
    print(f"[{tag}] {name}: starting", flush=True)
    t0 = time.time()
    rc = fn()
    if rc not in (0, None):
        raise SystemExit(f"[{tag}] stage {name} failed with exit code {rc}")
    seconds = time.time() - t0
    marker.write_text(json.dumps({"seconds": seconds}))
    print(f"[{tag}] {name}: done in {seconds:.0f}s", flush=True)
    return seconds


def spread(paths: list, n: int) -> list:
    """At most n of the paths, evenly spaced: every class folder is represented (sorted paths
    run class by class, and classes differ in object area)."""
    return paths if len(paths) <= n else [paths[round(i * len(paths) / n)] for i in range(n)]
