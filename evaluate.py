"""Evaluate a checkpoint, record gameplay videos, or plot learning curves.

    python evaluate.py RUN_DIR_OR_CHECKPOINT [--episodes N] [--step S|latest|best] [--video [N]]
        [--overlay] [--sample] [--per-life] [--noneg] [--num-envs N] [--max-frames F]
        [--seed S] [--threads N] [section.key=value ...]
    python evaluate.py plot RUN_DIR [RUN_DIR ...] [--out FILE] [--smooth W]

Exit codes: 0 done, 1 nothing to report (noneg discarded every episode), 2 bad input (one line on
stderr, nothing written). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit code 2)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, or a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_seed = _int_at_least(0)


def parse_eval_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="evaluate.py",
        description="Evaluate a run's checkpoint: play seeded episodes, write eval/<steps>.json "
        "and .csv and eval/* TensorBoard scalars, optionally record mp4 videos. "
        "`evaluate.py plot RUN_DIR ...` draws learning curves instead.",
    )
    parser.add_argument("target", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--episodes", type=_positive, default=10, help="episodes (default 10)")
    parser.add_argument(
        "--step", default="latest", help="latest (default), best (highest eval mean) or a step"
    )
    parser.add_argument(
        "--video",
        nargs="?",
        const="1",
        default="0",
        metavar="N",
        help="record N episodes (default 1) as mp4 files in <run>/videos",
    )
    parser.add_argument(
        "--overlay",
        action="store_true",
        help="video side panel: score, action probabilities, value, fast-weight heat maps",
    )
    parser.add_argument("--sample", action="store_true", help="sample actions (default: argmax)")
    parser.add_argument("--per-life", action="store_true", help="a lost life ends the episode")
    parser.add_argument(
        "--noneg",
        action="store_true",
        help="discard episodes whose running return goes negative; play until N are kept",
    )
    parser.add_argument("--num-envs", type=_positive, default=16, help="parallel envs (default 16)")
    parser.add_argument(
        "--max-frames",
        type=_positive,
        default=108_000,
        help="emulator frames per Atari game (default 108000)",
    )
    parser.add_argument(
        "--seed", type=_seed, help="env i is seeded seed+i (default run seed+10000)"
    )
    parser.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    argv = list(argv)
    for i in range(len(argv) - 1):  # `--video RUN` or `--video key=value`: one video
        following = argv[i + 1]
        if argv[i] == "--video" and not following.isdigit() and not following.startswith("-"):
            argv.insert(i + 1, "1")
    args = parser.parse_intermixed_args(argv)
    if args.target is None:
        parser.error("give a run folder or a checkpoint file (RUN_DIR_OR_CHECKPOINT)")
    if not args.video.isdigit():
        parser.error(f"--video takes a number of videos, got {args.video!r}")
    args.video = int(args.video)
    return args


def evaluate_main(argv: list[str]) -> int:
    args = parse_eval_args(argv)
    import torch

    from runners.evaluation import (
        EvalError,
        NoEpisodesError,
        Protocol,
        format_table,
        load_for_eval,
        log_tensorboard,
        play,
        record_video,
        summarize,
        write_report,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        protocol = Protocol(
            episodes=args.episodes,
            greedy=not args.sample,
            per_life=args.per_life,
            noneg=args.noneg,
            num_envs=args.num_envs,
            max_frames=args.max_frames,
            seed=args.seed,
        )
        loaded = load_for_eval(Path(args.target), args.step, protocol, args.overrides)
        episodes = play(loaded, protocol)
        report = summarize(episodes, loaded, protocol)
        videos = [
            record_video(loaded, protocol, k, overlay=args.overlay, gif=k == 0)
            for k in range(args.video)
        ]
    except EvalError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    except NoEpisodesError as exc:
        print(f"evaluate.py: {exc}", file=sys.stderr)
        return 1
    if len(episodes.returns) < protocol.episodes:
        print(
            f"evaluate.py: warning: noneg kept only {len(episodes.returns)} of "
            f"{protocol.episodes} episodes ({episodes.discarded} discarded, the limit)",
            file=sys.stderr,
        )
    json_path, csv_path = write_report(loaded.run_dir, report)
    log_tensorboard(loaded.run_dir, report, videos[0].gif if videos else None)
    print(format_table(report))
    print(f"wrote {json_path} and {csv_path.name}")
    for video in videos:
        print(f"video {video.path} ({video.frames} frames, return {video.episode_return:g})")
    return 0


def plot_main(argv: list[str]) -> int:
    parser = _Parser(
        prog="evaluate.py plot",
        description="Learning curves (smoothed episodic return vs agent steps) of runs to PNG; "
        "seeds of one experiment (<name>-seed<k>, or equal configs but the seed) share a line "
        "with their spread shaded.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="learning_curves.png", help="PNG file to write")
    parser.add_argument(
        "--smooth", type=float, help="EMA weight in [0, 1) (default: about 1/40 of the episodes)"
    )
    args = parser.parse_args(argv)
    from runners.plots import PlotError, plot_learning_curves

    if args.smooth is not None and not 0.0 <= args.smooth < 1.0:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    try:
        out = plot_learning_curves([Path(r) for r in args.runs], Path(args.out), args.smooth)
    except PlotError as exc:
        print(f"evaluate.py plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: evaluation often shares the CPUs with
    # training, and spinning threads then made it ~8x slower (measured on 2 busy cores). Only
    # effective before torch is first imported, hence the imports inside the functions.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
