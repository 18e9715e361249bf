"""Train a preset for a wall-clock budget and record its learning curve (issue 4).

Writes `<out>/<name>.csv` (one row per finished game: step, frames, minutes, return, mean of
the last 100) and `<out>/<name>.png` (return vs frames and vs wall-clock minutes), evaluates the
final checkpoint with evaluate.py, and prints one JSON summary line, including when the mean of
the last 100 games first reached `--target`. SIGTERM stops the training early (train.py gets it
and writes its final checkpoint); the curve and the evaluation then cover what was trained.

    python benchmarks/learn.py --name pong-rdn --minutes 25 --target 18 [section.key=value ...]
    python benchmarks/learn.py --name memory-rdn --config configs/memory.yaml \
        --minutes 3 --target 0.8
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners.plots import RETURN_TAG, smooth  # noqa: E402

FRAMES_PER_STEP = 4


def read_games(run_dir: Path) -> np.ndarray:
    """[n, 3] array of (step, seconds since the first log, return) per finished game."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if RETURN_TAG not in tags:
        return np.empty((0, 3))
    start = min(e.wall_time for tag in tags for e in events.Scalars(tag))
    games = sorted(events.Scalars(RETURN_TAG), key=lambda e: e.step)
    return np.array([(e.step, e.wall_time - start, e.value) for e in games], dtype=np.float64)


def running_mean(values: np.ndarray, window: int = 100) -> np.ndarray:
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def first_reached(mean100: np.ndarray, level: float, window: int = 100) -> int | None:
    """Index of the first game at which the mean of the last `window` games is at least
    `level`, counting only once `window` games have finished; None if it never was."""
    hit = np.nonzero((mean100 >= level) & (np.arange(len(mean100)) >= window - 1))[0]
    return int(hit[0]) if len(hit) else None


def write_csv(path: Path, games: np.ndarray, mean100: np.ndarray, frames_per_step: int) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "frames", "minutes", "return", "mean_last_100"])
        for (step, seconds, ret), mean in zip(games, mean100, strict=True):
            writer.writerow(
                [int(step), int(step) * frames_per_step, f"{seconds / 60:.3f}", ret, f"{mean:.3f}"]
            )


def run_child(command: list[str], **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, check=True)`` that passes a SIGTERM sent to this script on to
    the child, so stopping the benchmark stops its training run too (no orphan); SIGINT from a
    terminal reaches the child through the process group anyway."""
    with subprocess.Popen(command, **popen_kwargs) as child:
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            out, err = child.communicate()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command, out, err)
    return subprocess.CompletedProcess(command, 0, out, err)


def write_png(path: Path, games: np.ndarray, title: str, frames_per_step: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=110)
    FigureCanvasAgg(fig)
    smoothed = smooth(games[:, 2])
    for index, (x, label) in enumerate(
        [(games[:, 0] * frames_per_step / 1e6, "frames (millions)"), (games[:, 1] / 60, "minutes")]
    ):
        ax = fig.add_subplot(1, 2, index + 1)
        ax.plot(x, games[:, 2], color="C0", alpha=0.2, linewidth=0.8)
        ax.plot(x, smoothed, color="C0", linewidth=1.6)
        ax.set_xlabel(label)
        ax.set_ylabel("episodic return")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--target", type=float, help="report when the last-100 mean reaches it")
    parser.add_argument("--episodes", type=int, default=10, help="final evaluation episodes")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--run-dir", help="default: runs/learn-<name>")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or ROOT / "runs" / f"learn-{args.name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        args.config,
        f"run.dir={run_dir}",
        "run.restart=true",
        f"runtime.time_limit_s={args.minutes * 60}",
        *args.overrides,
    ]
    run_child(train, stdout=sys.stderr)
    is_atari = (
        "env.kind=gym" not in args.overrides and "kind: gym" not in Path(args.config).read_text()
    )
    frames_per_step = FRAMES_PER_STEP if is_atari else 1
    games = read_games(run_dir)
    if not len(games):
        sys.exit(f"learn.py: no game finished in {run_dir}; no curve to write")
    mean100 = running_mean(games[:, 2])
    write_csv(out / f"{args.name}.csv", games, mean100, frames_per_step)
    config = Path(args.config).resolve()
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    title = " ".join([f"{args.name}: {shown}", *args.overrides])
    write_png(out / f"{args.name}.png", games, title, frames_per_step)
    evaluation = run_child(
        [sys.executable, str(ROOT / "evaluate.py"), str(run_dir), "--episodes", str(args.episodes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    report = json.loads(sorted((run_dir / "eval").glob("*.json"))[-1].read_text())
    summary = {
        "name": args.name,
        "config": args.config,
        "overrides": args.overrides,
        "minutes": args.minutes,
        "steps": int(games[-1, 0]),
        "games": len(games),
        "final_mean_last_100": float(mean100[-1]),
        "eval_mean": report["mean"],
        "eval_episodes": len(report["episodes"]),
    }
    if args.target is not None:
        hit = first_reached(mean100, args.target)
        summary["target"] = args.target
        summary["target_reached_minutes"] = None if hit is None else float(games[hit, 1] / 60)
        summary["target_reached_frames"] = (
            None if hit is None else int(games[hit, 0]) * frames_per_step
        )
    print(evaluation.stdout, file=sys.stderr)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
