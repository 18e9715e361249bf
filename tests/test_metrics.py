"""Metrics: TensorBoard scalars, the console progress line, train.log."""

from __future__ import annotations

import io
import logging
import uuid

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runners.checkpoint import CheckpointManager
from runners.metrics import (
    EPISODIC_RETURN,
    SPS,
    IntervalPeaks,
    MetricsLogger,
    ProgressLine,
    close_run_logging,
    format_count,
    format_duration,
    setup_run_logging,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_land_in_tensorboard_event_files(tmp_path):
    with MetricsLogger(tmp_path) as metrics:
        metrics.scalar(EPISODIC_RETURN, -21.0, 1000)
        metrics.scalar(EPISODIC_RETURN, torch.tensor(-19.5), 2000)
        metrics.scalars({SPS: 512.0, "losses/total": 0.25}, 2000)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars[EPISODIC_RETURN] == [(1000, -21.0), (2000, -19.5)]
    assert scalars[SPS] == [(2000, 512.0)]
    assert scalars["losses/total"] == [(2000, 0.25)]


def test_without_tensorboard_nothing_is_written(tmp_path):
    metrics = MetricsLogger(tmp_path, use_tensorboard=False)
    metrics.scalar(SPS, 1.0, 1)
    metrics.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_metric_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="metric name"):
        MetricsLogger(tmp_path, use_tensorboard=False).scalar("", 1.0, 0)


def test_interval_peaks_keep_the_largest_value_since_the_last_drain():
    peaks = IntervalPeaks()
    assert peaks.drain() == {}
    for kl, grad, core, lag in [(0.02, 30.0, 3.0, 4), (1.1, 12.0, 9.0, 2), (0.05, 55.0, 1.0, 3)]:
        peaks.add(
            {
                "policy/kl_from_behaviour": torch.tensor(kl),
                "losses/grad_norm": torch.tensor(grad),
                "grad_norm/core": torch.tensor(core),
                "perf/policy_lag": torch.tensor(lag),
                "losses/total": torch.tensor(9.0),
            }
        )
    assert peaks.drain() == pytest.approx(
        {
            "policy/kl_from_behaviour_max": 1.1,
            "losses/grad_norm_max": 55.0,
            "grad_norm/core_max": 9.0,
            "perf/policy_lag_max": 4.0,
        }
    )
    peaks.add({"policy/kl_from_behaviour": torch.tensor(0.3)})  # a new interval starts afresh
    assert peaks.drain() == pytest.approx({"policy/kl_from_behaviour_max": 0.3})


def test_progress_line_plain_output_sps_eta_and_return():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressLine(10_000, stream=out, tty=False, episodes=2, clock=clock)
    assert bar.interval_s == 30.0
    assert bar.update(0)
    first = out.getvalue()
    assert first.startswith("0/10.00k steps (0.0%) | -- SPS | return n/a |")
    assert first.endswith("elapsed 0:00:00 | ETA --:--:--\n")

    clock.now += 10
    assert not bar.update(1000)  # not due yet: one line per 30 s when not a terminal
    clock.now += 20
    bar.add_returns([5.0, 1.0, 3.0])  # only the last 2 games count
    assert bar.update(3000)
    second = out.getvalue().splitlines()[1]
    assert second == (
        "3.00k/10.00k steps (30.0%) | 100 SPS | return 2.00 (last 2) | "
        "elapsed 0:00:30 | ETA 0:01:10"
    )
    # SPS follows the recent speed (last ~30 s), not the run's average of 150
    clock.now += 30
    bar.update(9000)
    assert "| 200 SPS |" in out.getvalue().splitlines()[2]
    assert out.getvalue().splitlines()[2].endswith("elapsed 0:01:00 | ETA 0:00:05")

    clock.now += 1
    bar.close(12_000)  # past the end: no negative ETA
    assert out.getvalue().splitlines()[3].startswith("12.00k/10.00k steps (120.0%)")
    assert out.getvalue().endswith("ETA 0:00:00\n")


def test_progress_line_resumed_run_counts_from_start_step():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressLine(1_000_000, start_step=400_000, stream=out, tty=False, clock=clock)
    clock.now += 100
    bar.update(450_000)
    assert "| 500 SPS |" in out.getvalue() and "ETA 0:18:20" in out.getvalue()


def test_progress_line_redraws_in_place_on_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressLine(100, stream=out, tty=True, clock=clock)
    assert bar.interval_s == 0.5
    bar.update(10)
    clock.now += 0.6
    bar.update(20)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.count("\x1b[K") == 2 and "\n" not in text
    bar.close()
    assert out.getvalue().endswith("\x1b[K\n")


def test_progress_line_rejects_bad_total():
    with pytest.raises(ValueError, match="total_steps"):
        ProgressLine(0)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (999, "999"), (1000, "1.00k"), (12_345, "12.35k"), (50_000_000, "50.00M")],
)
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (59.9, "0:00:59"), (3600, "1:00:00"), (93_784, "1d 2:03:04"), (-5, "0:00:00")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_train_log_gets_every_module_and_no_duplicates(tmp_path, capsys):
    root_level = logging.getLogger().level
    try:
        log = setup_run_logging(tmp_path)
        log.info("hello %d", 1)
        logging.getLogger("runners.checkpoint").warning("from a module")
        logging.getLogger("runners.x").debug("below the level")
        setup_run_logging(tmp_path)  # a second call replaces, never doubles, the handlers
        log.info("once")
    finally:
        close_run_logging()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("INFO deltabeast: hello 1")
    assert lines[1].endswith("WARNING runners.checkpoint: from a module")
    assert lines[2].endswith("INFO deltabeast: once")
    assert capsys.readouterr().err.count("once") == 1
    logging.getLogger("deltabeast").warning("after close")
    assert "after close" not in (tmp_path / "train.log").read_text()
    assert logging.getLogger().level == root_level


def test_nothing_in_the_run_folder_leaks_environment_variables(tmp_path, monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("DELTABEAST_TEST_TOKEN", secret)
    try:
        setup_run_logging(tmp_path).info("training")
        with MetricsLogger(tmp_path) as metrics:
            metrics.scalar(SPS, 1.0, 1)
        CheckpointManager(tmp_path / "checkpoints").save(1, {"config": {"seed": 1}})
    finally:
        close_run_logging()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
