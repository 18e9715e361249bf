"""benchmarks/sample_factory_pong.py: Sample Factory's log read back into a curve; its stop."""

from __future__ import annotations

import sys

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
    run_for([sys.executable, "-c", child], 3.0, log)  # time enough to reach the try
    assert log.read_text().strip() == "stopped"
