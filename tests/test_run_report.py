"""benchmarks/run_report.py: milestones and health counts read back from a run's TensorBoard log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks.learn import first_reached
from benchmarks.run_report import report
from runners.plots import RETURN_TAG

ROOT = Path(__file__).resolve().parent.parent


def write_run(run: Path, entropy_tag: bool) -> None:
    """150 games whose return climbs from -21 by 0.2 per game, one game every 1000 steps and
    6 s; four logged updates, of which the second collapsed (entropy), the third jumped away
    from the actors' policy (KL) and the fourth drifted (ρ)."""
    run.mkdir(parents=True)
    learner = {"unroll_length": 20, "batch_size": 16, "entropy_cost": 0.005, "grad_clip": 40.0}
    (run / "config.yaml").write_text(json.dumps({"learner": learner}))  # JSON is YAML
    with SummaryWriter(run / "tb") as writer:
        writer.add_scalar("charts/SPS", 0.0, 0, walltime=1000.0)
        for game in range(150):
            step = 1000 * (game + 1)
            writer.add_scalar(
                RETURN_TAG, -21.0 + 0.2 * game, step, walltime=1000.0 + 6 * (game + 1)
            )
        for step, entropy, rho, grad, kl in [
            (100, 1.7, 1.0, 50.0, 0.02),
            (200, 0.1, 1.0, 300.0, 0.5),
            (300, 1.5, 0.9, 20.0, 1.1),
            (400, 1.2, 0.4, 30.0, 0.03),
        ]:
            if entropy_tag:
                writer.add_scalar("policy/entropy", entropy, step)
            else:
                writer.add_scalar("losses/entropy", -0.005 * 320 * entropy, step)
            writer.add_scalar("vtrace/mean_rho", rho, step)
            writer.add_scalar("policy/kl_from_behaviour", kl, step)
            writer.add_scalar("policy/kl_from_behaviour_max", kl + 0.45, step)
            writer.add_scalar("losses/grad_norm", grad, step)
            writer.add_scalar("perf/policy_lag", 4.0, step)


@pytest.mark.parametrize("entropy_tag", [True, False], ids=["policy-entropy", "from-entropy-loss"])
def test_report_finds_milestones_clipping_and_collapses(tmp_path: Path, entropy_tag: bool) -> None:
    write_run(tmp_path / "run", entropy_tag)
    out = report(tmp_path / "run", levels=(-15.0, -10.0, 100.0))
    # last-100 mean at game g >= 99 (0-based): -21 + 0.2 * (g - 49.5); -11.1 at g = 99 already,
    # -10 first at g = 105 (step 106,000, 636 s)
    assert out["games"] == 150 and out["steps"] == 150_000
    assert out["mean_sps"] == round(150_000 / 900)
    assert out["reached"]["-15"] == {"step": 100_000, "minutes": 10.0}
    assert out["reached"]["-10"] == {"step": 106_000, "minutes": 10.6}
    assert out["reached"]["100"] is None
    health = out["health"]
    assert health["updates_logged"] == 4 and health["clipped_fraction"] == 0.5
    assert health["median_grad_norm"] == 40.0
    assert health["collapses"] == 2 and health["collapse_steps"] == [200, 400]
    assert health["median_entropy"] == pytest.approx(1.35, abs=1e-3)
    assert health["median_policy_lag"] == 4.0
    assert health["kl_spike_steps"] == [300]  # above 0.5 nats, not at it
    assert report(tmp_path / "run", spike_kl=0.4)["health"]["kl_spike_steps"] == [200, 300]
    # the interval peaks (kl + 0.45) catch the spike between summaries at step 200 as well
    assert health["kl_spike_intervals"] == [200, 300]


def test_first_reached_waits_for_a_full_window() -> None:
    mean = np.array([5.0, 5.0, 1.0, 6.0])
    assert first_reached(mean, 4.0, window=1) == 0
    assert first_reached(mean, 4.0, window=3) == 3
    assert first_reached(mean, 7.0, window=1) is None


def test_a_folder_without_a_log_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/run_report.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip()
        == f"run_report.py: {tmp_path} has no tb/ folder (not a train.py run folder)"
    )
