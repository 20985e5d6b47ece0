"""scripts.report: one self-contained HTML page per run, checked in a real headless Chromium
(it loads without errors, every video plays, every plot is drawn)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from helpers import DIFF_TINY

from scripts import report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# injected into a copy of the page (never into the report itself): record errors from the first
# moment, then after load play every video until its clock moves, measure every plot's line, and
# put the findings in the title, which --dump-dom prints
HEAD_HOOK = """<script>window.__errors=[];
window.addEventListener('error',e=>window.__errors.push('error: '+(e.message||(e.target&&e.target.tagName)||'?')),true);
const _ce=console.error;console.error=(...a)=>{window.__errors.push('console.error: '+a.join(' '));_ce(...a)};</script>"""
CHECKER = """<script>
async function check(){
  const res=await Promise.all([...document.querySelectorAll('video')].map(v=>new Promise(r=>{
    const done=(ok,why)=>r({ok:ok,why:why,t:v.currentTime});
    if(v.error) return done(false,'error '+v.error.code);
    v.addEventListener('timeupdate',()=>{if(v.currentTime>0)done(true,'played')});
    v.addEventListener('error',()=>done(false,'error event'));
    v.muted=true; v.play().catch(e=>done(false,'play rejected: '+e));
    setTimeout(()=>done(v.currentTime>0,'timeout'),8000);
  })));
  const plots=[...document.querySelectorAll('svg.plot')].map(s=>{const l=s.querySelector('polyline');
    const b=l?l.getBBox():{width:0,height:0};
    return {points:l?l.points.numberOfItems:0,want:+s.dataset.points,w:b.width,h:b.height}});
  document.title='CHECK:'+JSON.stringify({videos:res,plots:plots,errors:window.__errors});
}
window.addEventListener('load',check);
</script>"""


def check_in_browser(page, tmp_path) -> dict:
    """Open a copy of `page` with the checker in headless Chromium -> its findings (+ console lines)."""
    src = page.read_text(encoding="utf-8").replace("<head>", "<head>" + HEAD_HOOK, 1).replace("</body>", CHECKER + "</body>")
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(src, encoding="utf-8")
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
                        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--dump-dom",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    m = re.search(r"<title>CHECK:(.*?)</title>", r.stdout, re.S)
    assert m, f"the checker did not run: {r.stderr[-2000:]}"
    found = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"'))
    found["console"] = [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    return found


@pytest.fixture(scope="module")
def run_dir(pipeline, tmp_path_factory):
    from scripts import train_diffusion

    out = tmp_path_factory.mktemp("report") / "diffusion"
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(pipeline.shards), "--output-dir", str(out),
                                 "--max-steps", "4", "train.log_every=1", "sample.every=2", "sample.num=2",
                                 "sample.steps=2", f"sample.autoencoder={pipeline.vae}", "eval.every=2",
                                 "eval.num_samples=2", "eval.steps=2"]) == 0  # fmt: skip
    return out


def test_report_holds_curves_latest_samples_config_and_provenance(run_dir, pipeline):
    assert report.main([str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    plots = re.findall(r'<svg class="plot".*?aria-label="([^"]+)"', page)
    assert {"loss", "lr", "grad_norm", "latent_fd", "flicker_ratio"} <= set(plots)
    videos = re.findall(r'<video src="data:video/webm;base64,', page)
    assert len(videos) == 2 and page.count("step0000004-") >= 2 and "step0000002-" not in page  # the latest step's
    assert "resolved config" in page and "train:" in page
    export = json.loads((run_dir / "export" / "config.json").read_text())
    assert export["autoencoder"]["weights_sha256"] in page and str(pipeline.shards) in page
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched, no code


def test_report_refuses_a_folder_with_nothing_to_show(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit, match="nothing to report"):
        report.main([str(tmp_path)])


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs "
                                              "it): the report was not checked in a browser")
def test_report_plays_and_draws_in_headless_chromium(run_dir, tmp_path):
    assert report.main([str(run_dir), "--output", str(tmp_path / "r.html")]) == 0
    found = check_in_browser(tmp_path / "r.html", tmp_path)
    assert found["errors"] == [] and not [c for c in found["console"] if "Uncaught" in c or "rror" in c], found
    assert len(found["videos"]) == 2 and all(v["ok"] and v["t"] > 0 for v in found["videos"]), found["videos"]
    assert len(found["plots"]) >= 5
    assert all(p["points"] == p["want"] >= 1 and p["w"] > 0 for p in found["plots"] if p["want"] > 1), found["plots"]
    # the same check fails on a page with a broken video and an empty plot: it can tell
    page = (tmp_path / "r.html").read_text()
    broken = re.sub(r'<video src="data:video/webm;base64,[^"]{40}', '<video src="data:video/webm;base64,AAAA', page, count=1)
    broken = re.sub(r'<polyline points="[^"]*"', '<polyline points=""', broken, count=1)
    (tmp_path / "broken.html").write_text(broken)
    bad = check_in_browser(tmp_path / "broken.html", tmp_path)
    assert not all(v["ok"] for v in bad["videos"]) and any(p["points"] != p["want"] for p in bad["plots"])
