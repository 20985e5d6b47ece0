"""The measurement behind README "Tested since: partial captions" (2026-12-07): can the shape (and colour,
direction) of an unseen prompt be read from the pooled text embedding the U-Net adds to its time
embedding? A least-squares linear read-out is fitted on the pooled embeddings (the masked mean over
tokens, as `UNet3D._text` pools them) of the captions a run's training videos have, and scored on every
other caption of the 168 combinations.

    python docs/experiments/pooled_text_probe.py runs/q_tb6k      # a `scripts.quality --text` run folder

Prints one line per attribute. Not an entry point of the project: an experiment kept so its figures can be
reproduced."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from data.synthetic import caption_text, combination_order  # noqa: E402
from diffusion.text import load_text_encoder  # noqa: E402
from scripts.quality import BUILTIN_TEXT_LENGTH, training_captions  # noqa: E402


def main(run: Path) -> None:
    seen = set(training_captions(run / "data").values())
    attrs = combination_order()
    captions = [caption_text(*a) for a in attrs]
    emb, mask = load_text_encoder(str(run / "text_encoder"), max_length=BUILTIN_TEXT_LENGTH).encode(captions)
    m = mask.float()[..., None]
    pooled = ((emb.float() * m).sum(1) / m.sum(1)).numpy()
    x = np.c_[pooled, np.ones(len(pooled))]
    labels, train = np.array(attrs), np.array([c in seen for c in captions])
    for k, name in enumerate(("colour", "shape", "direction")):
        onehot = np.eye(labels[:, k].max() + 1)[labels[:, k]]
        w, *_ = np.linalg.lstsq(x[train], onehot[train], rcond=None)
        right = (x @ w).argmax(1) == labels[:, k]
        print(f"{name}: seen captions {right[train].mean():.0%} ({train.sum()}), unseen {right[~train].mean():.0%} ({(~train).sum()})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
