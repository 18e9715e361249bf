"""Run Sample Factory's APPO on Pong on this machine, the baseline of issue 4's bar, and record
its curve the way benchmarks/learn.py records ours, for a side-by-side comparison on one day.

Sample Factory 2.1.1 needs gymnasium < 1 and numpy < 2, so it lives in its own virtual
environment, created on first use with pinned versions (ale-py 0.9 ships the ROMs; a `.pth`
file imports it so that the `PongNoFrameskip-v4` id is registered in every worker process).
The configuration is the bar's as far as the issue states it (APPO, Nature CNN + GRU 256, one
epoch, CPU), on 2 workers × 16 envs; the rest is Sample Factory's Atari example. Writes
`<out>/<name>.csv` (step, frames, minutes, mean of the last 100 games; one row per summary)
and prints one JSON line: mean agent steps/s and when the mean first reached each level.

    python benchmarks/sample_factory_pong.py --minutes 30 [--venv .sf-venv] [-- --seed=1 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_report import LEVELS  # noqa: E402

PACKAGES = (
    "torch==2.13.0",
    "sample-factory==2.1.1",
    "gymnasium==0.29.1",
    "ale-py==0.9.1",
    "numpy==1.26.4",
    "opencv-python==4.11.0.86",
)
ARGS = (
    "--env=atari_pong",
    "--device=cpu",
    "--use_rnn=True",
    "--rnn_type=gru",
    "--rnn_size=256",
    "--recurrence=-1",
    "--num_epochs=1",
    "--async_rl=True",
    "--num_workers=2",
    "--num_envs_per_worker=16",
    "--worker_num_splits=2",
    "--rollout=32",
    "--batch_size=1024",
    "--num_batches_per_epoch=1",
    "--experiment_summaries_interval=10",
)
FRAMES_PER_STEP = 4
STARTUP_S = 30  # from launch to Sample Factory's first summary, where its minutes start
# Sample Factory's running mean covers the games finished so far, up to 100; early Pong games
# last about 800 agent steps each, so by 150k steps (32 envs) the mean spans 100 games.
FULL_WINDOW_STEPS = 150_000
_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_FRAMES = re.compile(r"Total num frames: (\d+)")
_MEAN = re.compile(r"Avg episode reward: \[\(0, '(-?[\d.]+|nan)'\)\]")


def read_summaries(log: str) -> list[tuple[float, int, float]]:
    """(minutes since the first summary, frames, mean return of the recent games) per summary
    of a Sample Factory log; summaries before the first game finished are skipped."""
    rows, start, frames = [], None, 0
    for line in log.splitlines():
        stamp = _TIME.search(line)
        if stamp is None:
            continue
        when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if found := _FRAMES.search(line):
            frames = int(found.group(1))
            start = start or when
        elif (mean := _MEAN.search(line)) and start and mean.group(1) != "nan":
            rows.append(((when - start).total_seconds() / 60, frames, float(mean.group(1))))
    return rows


def summarise(rows: list[tuple[float, int, float]], levels=LEVELS) -> dict:
    """Mean agent steps/s, the last mean, and when the mean (over a full window) first reached
    each level: {"level": {"step", "minutes"}} or None."""
    minutes, frames, last = rows[-1]
    reached = {}
    for level in levels:
        hit = next(
            (r for r in rows if r[1] >= FULL_WINDOW_STEPS * FRAMES_PER_STEP and r[2] >= level),
            None,
        )
        reached[f"{level:g}"] = hit and {
            "step": hit[1] // FRAMES_PER_STEP,
            "minutes": round(hit[0], 1),
        }
    return {
        "steps": frames // FRAMES_PER_STEP,
        "minutes": round(minutes, 1),
        "mean_sps": round(frames / FRAMES_PER_STEP / (minutes * 60)) if minutes else None,
        "last_100_end": last,
        "reached": reached,
    }


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating and filling the venv first unless a previous call finished
    it (the marker is written last, so an interrupted install is redone, not trusted)."""
    python, ready = venv / "bin" / "python", venv / "deltabeast-ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        (Path(site) / "deltabeast_register_ale.pth").write_text("import ale_py\n")
        ready.write_text(" ".join(PACKAGES) + "\n")
    return python


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the stop signal below would be lost.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_for(command: list[str], seconds: float, log: Path, grace: float = 60.0) -> None:
    """Run Sample Factory for `seconds`, then stop it with SIGINT as Ctrl-C would: it saves and
    stops its workers. (Its `--train_for_seconds` did not stop 2.1.1 here.) A SIGTERM to this
    script or a Ctrl-C stops it the same way; if it has not exited `grace` seconds later, its
    whole process group is killed, so no worker outlives the benchmark."""
    with (
        open(log, "w") as sink,
        subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        ) as child,
    ):
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGINT))
        try:
            child.wait(timeout=seconds)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        finally:
            signal.signal(signal.SIGTERM, previous)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # workers the main process left behind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="sample-factory-pong")
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--venv", default=str(ROOT / ".sf-venv"))
    parser.add_argument("--train-dir", default=str(ROOT / "runs" / "sample-factory"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("extra", nargs="*", help="more Sample Factory arguments, after --")
    args = parser.parse_args()
    python = ensure_venv(Path(args.venv))
    log = Path(args.train_dir) / f"{args.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(python),
        "-m",
        "sf_examples.atari.train_atari",
        *ARGS,
        f"--experiment={args.name}",
        f"--train_dir={args.train_dir}",
        "--restart_behavior=overwrite",
        *args.extra,
    ]
    run_for(command, args.minutes * 60 + STARTUP_S, log)
    rows = read_summaries(log.read_text(errors="replace"))
    if not rows:
        sys.exit(f"sample_factory_pong.py: no game finished; see {log}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w") as csv:
        csv.write("step,frames,minutes,mean_last_100\n")
        for minutes, frames, mean in rows:
            csv.write(f"{frames // FRAMES_PER_STEP},{frames},{minutes:.3f},{mean:.3f}\n")
    print(json.dumps({"name": args.name, "log": str(log), **summarise(rows)}), flush=True)


if __name__ == "__main__":
    main()
