"""Train an agent: `python train.py [--config FILE] [section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from runners.config import ConfigError, build_config, help_text
from runners.trainer import resolve_config, run_training


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an IMPALA agent with a fast-weight core. Starting on an existing run "
        "folder resumes it (run.restart=true starts over).",
        epilog="config keys (value in configs/default.yaml):\n" + help_text(build_config()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
