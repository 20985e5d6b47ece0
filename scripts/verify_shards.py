"""Check a latent-shard folder against its manifest: every shard present, same size and sha256,
no unlisted shards or leftover .tmp files. Prints a summary; exit status 1 on any problem."""

from __future__ import annotations

import argparse
import sys

from data.shards import verify_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.verify_shards", description=__doc__)
    p.add_argument("shards", help="folder written by scripts.encode_latents")
    p.add_argument("--quick", action="store_true", help="check sizes only, skip the sha256 of every shard")
    args = p.parse_args(argv)
    report = verify_shards(args.shards, full_hash=not args.quick)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
