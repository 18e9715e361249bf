"""benchmarks/sample_factory_pong.py: Sample Factory's log read back into a curve; its stop."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from benchmarks.sample_factory_pong import read_summaries, run_for, summarise

LOG = """\
[2026-11-29 15:14:00,100][00857] Fps is (...). Total num frames: 0. Throughput: (...)
[2026-11-29 15:14:00,100][00857] Avg episode reward: [(0, 'nan')]
[2026-11-29 15:14:05,100][00857] Updated weights for policy 0, policy_version 1 (0.15)
[2026-11-29 15:14:30,100][00857] Fps is (...). Total num frames: 61440. Throughput: (...)
[2026-11-29 15:14:30,100][00857] Avg episode reward: [(0, '-9.000')]
[2026-11-29 15:24:00,100][00857] Fps is (...). Total num frames: 1200000. Throughput: (...)
[2026-11-29 15:24:00,100][00857] Avg episode reward: [(0, '-14.500')]
[2026-11-29 15:34:00,100][00857] Fps is (...). Total num frames: 2400000. Throughput: (...)
[2026-11-29 15:34:00,100][00857] Avg episode reward: [(0, '1.250')]
"""


def test_summaries_are_read_with_minutes_from_the_first_one_and_nan_skipped() -> None:
    rows = read_summaries(LOG)
    assert rows == [(0.5, 61440, -9.0), (10.0, 1_200_000, -14.5), (20.0, 2_400_000, 1.25)]


def test_levels_count_only_once_the_mean_spans_a_full_window() -> None:
    summary = summarise(read_summaries(LOG), levels=(-15.0, -10.0, 0.0, 10.0))
    # -9 at 15k steps comes from a handful of games: not a milestone.
    assert summary["reached"] == {
        "-15": {"step": 300_000, "minutes": 10.0},
        "-10": {"step": 600_000, "minutes": 20.0},
        "0": {"step": 600_000, "minutes": 20.0},
        "10": None,
    }
    assert summary["steps"] == 600_000
    assert summary["mean_sps"] == 500
    assert summary["last_100_end"] == 1.25


def test_run_for_stops_the_child_with_sigint_when_time_is_up(tmp_path) -> None:
    log = tmp_path / "child.log"
    child = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('stopped')"
    # As in a background job of a shell: SIGINT ignored, which the child would inherit.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_for([sys.executable, "-c", child], 3.0, log)  # time enough to reach the try
    finally:
        signal.signal(signal.SIGINT, previous)
    assert log.read_text().strip() == "stopped"


def test_run_for_kills_the_group_of_a_child_that_ignores_sigint(tmp_path) -> None:
    log = tmp_path / "child.log"
    child = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "worker = subprocess.Popen(['sleep', '60'])\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(60)"
    )
    run_for([sys.executable, "-c", child], 3.0, log, grace=1.0)
    worker = int(log.read_text())
    deadline = time.monotonic() + 10
    while alive(worker):
        assert time.monotonic() < deadline, "the worker outlived run_for"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
