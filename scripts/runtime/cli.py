"""Command-line conventions shared by every entry point (docs/design.md): `--config FILE.yaml`,
trailing `section.key=value` overrides, `--output-dir DIR`, resolved config in DIR/config.yaml."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config, save_config


def build_parser(description: str, *, prog: str | None = None, training: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with the common flags; entry points add their own."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing arguments of the form section.key=value override the config file.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for all outputs")
    if training:
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def parse_training_args(argv, description: str, prog: str, flag: str, key: str, help: str) -> argparse.Namespace:
    """A trainer's arguments: the common flags plus one naming its input (`--data`, `--shards`),
    which becomes the first override of `key` so that later overrides win."""
    p = build_parser(description, prog=prog, training=True)
    p.add_argument(flag, default=None, help=help)
    args = p.parse_args(argv)
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None:
        args.overrides.insert(0, f"{key}={value}")
    return args


def resolve_config(cls, args: argparse.Namespace, *, write: bool = True):
    """Load the config named by `args`, apply overrides (and --max-steps), write DIR/config.yaml."""
    overrides = list(args.overrides)
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(cls, args.config, overrides)
    # one writer under a multi-process launch (every rank resolves the same config): two ranks
    # renaming the same config.yaml.tmp raced, and the second rename failed
    if write and int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, Path(args.output_dir) / "config.yaml")
    return cfg


def run_logged_main(body, user_errors: tuple = ()) -> int:
    """`run_main` with INFO logging to stderr (the trainers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_main(body, user_errors)


def run_main(body, user_errors: tuple = ()) -> int:
    """Run an entry point's body; expected user errors (a bad config, a bad input file, a damaged
    shard or checkpoint, ...) become one clear line on stderr and exit code 2, never a traceback."""
    try:
        body()
    except (ConfigError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
