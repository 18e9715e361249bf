"""benchmarks/learn.py: its reading of a run's games (the curve it writes to docs/results), and
stopping it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from torch.utils.tensorboard import SummaryWriter

from benchmarks.learn import read_games, running_mean
from runners.plots import RETURN_TAG
from tests.test_reliability import ROOT, TINY


def test_a_run_stopped_before_any_game_ended_has_no_games(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path / "tb") as writer:
        writer.add_scalar("charts/SPS", 100.0, 320)
    assert read_games(tmp_path).shape == (0, 3)
    (tmp_path / "empty" / "tb").mkdir(parents=True)
    assert read_games(tmp_path / "empty").shape == (0, 3)


def test_games_are_read_in_step_order_with_seconds_from_the_first_log(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path / "tb") as writer:
        writer.add_scalar("charts/SPS", 100.0, 0, walltime=1000.0)
        writer.add_scalar(RETURN_TAG, -19.0, 640, walltime=1030.0)
        writer.add_scalar(RETURN_TAG, -21.0, 320, walltime=1012.0)
    games = read_games(tmp_path)
    np.testing.assert_allclose(games, [[320, 12.0, -21.0], [640, 30.0, -19.0]])


def test_running_mean_uses_the_games_so_far_until_the_window_is_full() -> None:
    values = np.arange(1.0, 7.0)
    np.testing.assert_allclose(running_mean(values, window=3), [1, 1.5, 2, 3, 4, 5])


def test_sigterm_stops_the_training_run_it_started(tmp_path: Path) -> None:
    """Killing the benchmark (SIGTERM, as `kill` or `pkill` send) stops its train.py child,
    which writes its final checkpoint, and leaves no process behind."""
    run = tmp_path / "run"
    command = [sys.executable, "benchmarks/learn.py", "--name", "stop", "--minutes", "10"]
    command += ["--out", str(tmp_path), "--run-dir", str(run), *TINY]
    learn = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline, actors = time.monotonic() + 90, False
        while not actors:
            for child in psutil.Process(learn.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
                with contextlib.suppress(psutil.Error):
                    actors |= "spawn_main" in " ".join(child.cmdline())
            assert learn.poll() is None, learn.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "training did not start within 90 s"
            time.sleep(0.1)
        learn.send_signal(signal.SIGTERM)
        learn.wait(30)
        assert "SIGTERM received: stopping" in (run / "train.log").read_text()
        alive = [p.pid for p in seen.values() if p.is_running() and p.status() != "zombie"]
        assert not alive, f"left running: {alive}"
    finally:
        for process in [*seen.values()]:
            if process.is_running():
                process.kill()
        if learn.poll() is None:
            learn.kill()
            learn.wait(10)
