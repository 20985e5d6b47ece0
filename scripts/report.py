"""One self-contained HTML page for a run: training curves (loss, learning rate, gradient norm),
validation / evaluation / sample metrics over steps, the latest samples as playable videos and
frame strips, the resolved config and the export's provenance.

    python -m scripts.report runs/demo                # -> runs/demo/report.html
    python -m scripts.report runs/diffusion --output /tmp/r.html

RUN_DIR is a training run (metrics.jsonl, config.yaml, export/, samples/) or a folder of them
(the demo's output: vae/, diffusion/, samples/). Nothing is fetched: plots are inline SVG, videos
embedded WebM (VP9), strips embedded PNG.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from data.files import atomic_write
from scripts.runtime.report_html import CSS, png_data_uri, svg_plot, upscale_to, webm_data_uri

TRAIN_KEYS = ("loss", "lr", "grad_norm")
SKIP_KEYS = {"step", "epoch", "split", "clips", "seed", "videos", "videos_tracked", "nonfinite_total", "skipped"}
SPLITS = {"val": "validation", "eval": "evaluation (eval.every)", "sample": "periodic samples, scored"}


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(rows, key, title):
    xs, ys = _series(rows, key)
    pos = [y for y in ys if y > 0]
    log = len(pos) == len(ys) and len(pos) > 1 and max(pos) / min(pos) > 30
    return svg_plot(xs, ys, title, log_y=log)


def metrics_section(path: Path) -> str:
    rows = read_rows(path)
    train = [r for r in rows if "split" not in r]
    keys = [k for k in TRAIN_KEYS if any(k in r for r in train)]
    keys += sorted({k for r in train for k in r if k.startswith("loss_") and k not in keys})
    out = [f'<h3>training ({len(train)} logged steps)</h3><div class="plots">'
           + "".join(_plot(train, k, k) for k in keys) + "</div>"] if train else []
    for split, name in SPLITS.items():
        part = [r for r in rows if r.get("split") == split]
        if not part:
            continue
        keys = sorted({k for r in part for k, v in r.items() if k not in SKIP_KEYS and isinstance(v, (int, float))
                       and not isinstance(v, bool)})  # fmt: skip
        out.append(f'<h3>{name}</h3><div class="plots">' + "".join(_plot(part, k, k) for k in keys) + "</div>")
    return "".join(out)


def provenance(export: Path) -> str:
    try:
        meta = json.loads((export / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    rows = [("export", str(export)), ("model", meta.get("model_type")), ("weights sha256", meta.get("weights_sha256"))]
    ae = meta.get("autoencoder") or {}
    if ae:
        rows += [("autoencoder", ae.get("path")), ("autoencoder sha256", ae.get("weights_sha256"))]
    if meta.get("shards"):
        rows.append(("shards", meta["shards"]))
    te = meta.get("text_encoder") or {}
    if te:
        rows += [("text encoder", te.get("name")), ("text encoder sha256", te.get("weights_sha256"))]
    lat = meta.get("latent") or {}
    if lat:
        rows.append(("latents", f"shape {lat.get('shape')}, clip_len {lat.get('clip_len')}, fps {lat.get('fps')}"))
    if meta.get("class_names"):
        rows.append(("classes", ", ".join(map(str, meta["class_names"]))))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v)
    return f"<h3>provenance</h3><table>{body}</table>"


def _latest_videos(folder: Path, limit: int) -> list[Path]:
    videos = sorted(p for p in folder.glob("*.mp4") if p.is_file())
    steps = {m.group(1) for p in videos if (m := re.match(r"step(\d+)-", p.name))}
    if steps:  # periodic samples: the newest step's
        videos = [p for p in videos if p.name.startswith(f"step{max(steps)}-")]
    return videos[:limit]


def _prompt_of(video: Path) -> str | None:
    lat = video.with_suffix(".safetensors")
    if not lat.is_file():
        return None
    from scripts.runtime.generation import load_latent_file

    try:
        return load_latent_file(lat)[1].get("prompt")
    except ValueError:
        return None


def samples_section(folder: Path, limit: int) -> str:
    from data.video_io import make_grid, read_video

    figures = []
    for video in _latest_videos(folder, limit):
        try:
            frames, fps = read_video(video)[:2]
        except Exception as e:  # noqa: BLE001 - one unreadable file is named, the page still gets written
            figures.append(f"<figure><figcaption>{html.escape(video.name)}: unreadable ({html.escape(str(e))})</figcaption></figure>")
            continue
        big = upscale_to(frames)
        strip = make_grid(np.asarray(frames), nrow=len(frames), pad=1)
        prompt = _prompt_of(video)
        caption = html.escape(video.name) + (f"<br><i>{html.escape(prompt)}</i>" if prompt else "")
        figures.append(f'<figure><video src="{webm_data_uri(big, fps or 8)}" width="{big.shape[2]}" '
                       f'height="{big.shape[1]}" controls loop muted autoplay playsinline></video>'
                       f'<figcaption>{caption}</figcaption><img class="strip" alt="frames of {html.escape(video.name)}" '
                       f'src="{png_data_uri(upscale_to(strip[None], 48)[0])}"></figure>')
    if not figures:
        return ""
    return f'<h3>samples: {html.escape(str(folder))}</h3><div class="videos">{"".join(figures)}</div>'


def evaluation_table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    body = "".join(f"<tr><td>{html.escape(str(r.get('metric')))}</td><td>{html.escape(str(r.get('value')))}</td>"
                   f"<td>{html.escape(str(r.get('data_value', r.get('skipped', ''))))}</td></tr>" for r in rows)
    return (f"<h3>scripts.evaluate: {html.escape(str(path))}</h3><table><tr><th>metric</th><th>value</th>"
            f"<th>data / note</th></tr>{body}</table>")


def stage_dirs(run: Path) -> list[Path]:
    """RUN itself when it is a training run, else its sub-folders that are."""
    if (run / "metrics.jsonl").is_file():
        return [run]
    return sorted(p for p in run.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())


def build(run: Path, max_videos: int) -> str:
    stages = stage_dirs(run)
    sample_dirs = [d for d in [run / "samples", *(s / "samples" for s in stages)] if d.is_dir()]
    if not stages and not sample_dirs:
        raise SystemExit(f"error: {run}: no metrics.jsonl and no samples/ here or one level down; nothing to report")
    parts = [f"<h1>Run report: {html.escape(str(run))}</h1><p>written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
             f"stages: {html.escape(', '.join(s.name for s in stages) or 'none')}</p>"]
    for d in dict.fromkeys(sample_dirs):
        parts.append(samples_section(d, max_videos))
        if (d / "evaluation.jsonl").is_file():
            parts.append(evaluation_table(d / "evaluation.jsonl"))
    for s in stages:
        parts.append(f"<h2>{html.escape(s.name)}</h2>" + metrics_section(s / "metrics.jsonl") + provenance(s / "export"))
        if (s / "config.yaml").is_file():
            parts.append(f"<details><summary>resolved config ({html.escape(str(s / 'config.yaml'))})</summary>"
                         f"<pre>{html.escape((s / 'config.yaml').read_text())}</pre></details>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.name)} report</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training run folder, or a folder of them (e.g. runs/demo)")
    p.add_argument("--output", type=Path, default=None, help="default RUN_DIR/report.html")
    p.add_argument("--max-videos", type=int, default=8, help="samples shown per folder (default 8)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir}: no such folder", file=sys.stderr)
        return 2
    page = build(args.run_dir, args.max_videos)
    out = args.output or args.run_dir / "report.html"
    with atomic_write(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"[report] {out} ({len(page) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
