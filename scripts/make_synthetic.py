"""Write the built-in synthetic dataset (bouncing shapes, one class folder per shape) as H.264 mp4."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import BadInputError
from data.synthetic import (
    DEFAULT_RADIUS,
    SMALL_RADIUS,
    SYNTHETIC_CLASSES,
    held_out_combinations,
    write_synthetic,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.make_synthetic",
        description="Write the synthetic dataset as real video files: OUT/<class>/video_00000.mp4 "
        f"(classes: {', '.join(SYNTHETIC_CLASSES)}). Rerunning keeps files that are already complete.",
    )
    p.add_argument("--output-dir", type=Path, required=True, help="folder to write the class folders into")
    p.add_argument("--num-videos", type=int, required=True, help="how many videos in total")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels (default 64)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second stored in the files (default 8)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--radius", default=None, metavar="MIN,MAX",
                   help="object circumradius range as fractions of the frame size "
                   f"(default {DEFAULT_RADIUS[0]},{DEFAULT_RADIUS[1]}; small objects: "
                   f"{SMALL_RADIUS[0]},{SMALL_RADIUS[1]})")
    p.add_argument("--partial-captions", action="store_true",
                   help="after each video's caption, write shorter ones to its sidecar, each naming the shape with "
                   "one other attribute ('a red square', 'a square moves to the upper left'); training draws one "
                   "caption per sample each epoch (README \"Text-to-video\")")
    p.add_argument("--hold-out", type=int, default=0, metavar="K",
                   help="leave the first K of the 168 colour x shape x direction combinations out of the set "
                   "(data.synthetic.held_out_combinations; 0-167, default 0): prompts that no training caption "
                   "has, however many videos; a video that would show one is skipped for the next index")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_videos < 1 or args.frames < 1 or args.size < 8 or not args.fps > 0:
        parser.error("need --num-videos >= 1, --frames >= 1, --size >= 8 and --fps > 0")
    try:
        held_out_combinations(args.hold_out)  # the one check of the range
    except ValueError as e:
        parser.error(f"--hold-out: {e}")
    radius = DEFAULT_RADIUS
    if args.radius is not None:
        try:
            radius = tuple(float(x) for x in args.radius.split(","))
        except ValueError:
            radius = ()
        if len(radius) != 2 or not 0 < radius[0] <= radius[1] < 0.5:
            parser.error(f"--radius must be MIN,MAX with 0 < MIN <= MAX < 0.5, got {args.radius!r}")
    try:
        paths = write_synthetic(
            args.output_dir,
            args.num_videos,
            num_frames=args.frames,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            radius=radius,
            partial_captions=args.partial_captions,
            hold_out=args.hold_out,
        )
    except (BadInputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} synthetic videos to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
