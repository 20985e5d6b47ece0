"""The pieces of the run report (scripts.report): line plots as inline SVG, videos as embedded
WebM, frame strips as embedded PNG. Everything is inlined: the page is one file that opens
anywhere, with no script and nothing fetched."""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from pathlib import Path

import numpy as np

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 200, 52, 12, 24, 28


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.2e}"


def svg_plot(xs, ys, title: str, *, log_y: bool = False) -> str:
    """A line plot of ys over xs (finite points only) with its axes' ranges labelled; log_y
    when the values span decades (losses, learning rates)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return ""
    tx = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(tx(p[1]) for p in pts), max(tx(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + max(abs(y0) * 1e-6, 1e-9))  # a flat series
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    xy = [(f"{PAD_L + (x - x0) / (x1 - x0) * pw:.1f}", f"{PAD_T + (1 - (tx(y) - y0) / (y1 - y0)) * ph:.1f}") for x, y in pts]
    line = " ".join(f"{cx},{cy}" for cx, cy in xy)
    lo, hi = (10**y0, 10**y1) if log_y else (y0, y1)
    marks = "".join(f'<circle cx="{cx}" cy="{cy}" r="2"/>' for cx, cy in xy) if len(pts) < 40 else ""
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'data-points="{len(pts)}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{W / 2}" y="15" text-anchor="middle" class="t">{html.escape(title)}{" (log)" if log_y else ""}</text>'
            f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{W - PAD_R}" y2="{PAD_T + ph}" class="ax"/>'
            f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" class="ax"/>'
            f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{_fmt(hi)}</text>'
            f'<text x="{PAD_L - 4}" y="{PAD_T + ph}" text-anchor="end">{_fmt(lo)}</text>'
            f'<text x="{PAD_L}" y="{H - 8}">{_fmt(x0)}</text>'
            f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">step {_fmt(x1)}</text>'
            f'<polyline points="{line}" class="ln"/><g class="pt">{marks}</g></svg>')


def webm_data_uri(frames: np.ndarray, fps: float) -> str:
    """uint8 [T, H, W, 3] -> a data: URI of a VP9 WebM (a codec every Chromium and Firefox plays;
    H.264 is missing from some builds)."""
    import av

    frames = np.asarray(frames)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.webm"
        with av.open(str(path), "w", format="webm") as out:
            stream = out.add_stream("libvpx-vp9", rate=max(1, round(fps)))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": "20", "b:v": "0", "deadline": "good", "cpu-used": "4"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return "data:video/webm;base64," + base64.b64encode(path.read_bytes()).decode()


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def upscale_to(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Whole-number nearest-neighbour upscale so small clips are visible (pixels stay pixels)."""
    k = max(1, math.ceil(min_side / min(frames.shape[1:3])))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
h3{font-size:1em;margin:1em 0 .3em}
.plots{display:flex;flex-wrap:wrap;gap:8px}
svg.plot{background:#fafafa;border:1px solid #e3e3e3;font-size:10px}
svg.plot .t{font-size:12px;font-weight:600}svg.plot .ax{stroke:#888}
svg.plot .ln{fill:none;stroke:#1f6fd1;stroke-width:1.5}svg.plot .pt circle{fill:#1f6fd1}
.videos{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:.8em;max-width:220px}
video{image-rendering:pixelated;background:#000}img.strip{image-rendering:pixelated;max-width:100%}
pre{background:#f4f4f4;padding:8px;overflow:auto;font-size:.8em;max-height:420px}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
"""
