"""The measurement behind README "Tested since: one clip per video at the demo's scale" (2026-12-04):
a demo folder's text model sampled on 48 prompts that no training caption has (DDPM-250, CFG 3; the
prompts written once to runs/demo/prompts48.txt, so every model gets the same ones and seeds), scored as
`scripts.quality --text` scores them (data.synthetic.prompt_adherence, video_quality against 32 training
videos), and the detector on those training videos against their own captions.

    python docs/experiments/demo_prompt_adherence.py runs/demo      # after `make demo`
    python docs/experiments/demo_prompt_adherence.py runs/demo_c1   # another model on runs/demo's data and VAE

Writes RUN/p48/ (the samples) and RUN/p48.json. Not an entry point of the project: an experiment kept
so its figures can be reproduced."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.synthetic import prompt_adherence  # noqa: E402
from scripts import sample  # noqa: E402
from scripts.demo import quality_report  # noqa: E402
from scripts.quality import _read_videos, training_captions, write_prompts  # noqa: E402
from scripts.runtime.stages import spread  # noqa: E402

DEMO = Path("runs/demo")


def main(run: Path) -> dict:
    out, prompts = run / "p48", DEMO / "prompts48.txt"
    if not prompts.exists():
        write_prompts(DEMO / "data", prompts, 48)
    if not (out / "done").exists():
        rc = sample.main(["--checkpoint", str(run / "diffusion" / "export"), "--autoencoder", str(DEMO / "vae" / "export"),
                          "--num-samples", "48", "--sampler", "ddpm", "--steps", "250", "--guidance-scale", "3",
                          "--output-dir", str(out), "--format", "mp4", "--prompts", str(prompts)])
        if rc:
            raise SystemExit(rc)
        (out / "done").write_text("")
    report = quality_report(DEMO / "data", out, text=True)  # what `make demo` reports on its own samples
    caps = training_captions(DEMO / "data")
    chosen = spread(sorted(caps), 32)
    result = {"prompt_adherence": report["prompt_adherence"],
              "detector_on_training": prompt_adherence(_read_videos([DEMO / "data" / r for r in chosen], 8),
                                                       [caps[r] for r in chosen]),
              "video_quality": report["samples"], "data": report["training_data"]}
    (run / "p48.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
