"""benchmarks/learn.py's reading of a run's games (the curve it writes to docs/results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from benchmarks.learn import read_games, running_mean
from runners.plots import RETURN_TAG


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
