"""train.py end to end: learning on the memory task, resume, shutdown, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runners.checkpoint import CheckpointManager, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# One learner thread: the model is tiny, and two threads stall when other jobs share the cores.
FAST_MEMORY = ["--config", "configs/memory.yaml", "logging.every_s=1", "runtime.learner_threads=1"]
SYNC = "runtime.backend=sync"  # one process: each run a fixed function of its seed


def train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def episode_returns(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("charts/episodic_return")]


def success_rate(run_dir: Path) -> float:
    """The success rate of the last 100 training games."""
    returns = episode_returns(run_dir)[-100:]
    assert len(returns) == 100
    return sum(r > 0 for r in returns) / len(returns)


def peak_success_rate(run_dir: Path) -> float:
    """The best success rate over any 100 consecutive training games: whether it was learned."""
    right = [r > 0 for r in episode_returns(run_dir)]
    assert len(right) >= 100
    return max(sum(right[i : i + 100]) for i in range(len(right) - 99)) / 100


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_memory_task_is_learned_by_fwp_cores_not_by_ff(tmp_path):
    """Delay 8, unroll 16, 2 cues: rdn and delta remember the cue, ff stays at chance.

    The sync backend makes each run a fixed function of the seed: on the local backend the
    actors' timing varies, and a few runs in a hundred unlearn the task after learning it
    (docs/results/README.md, memory task), which would make this check flaky, not stricter.
    """
    rates = {}
    for core in ("rdn", "delta", "ff"):
        run = tmp_path / core
        steps = "runtime.total_steps=80000"
        out = train(*FAST_MEMORY, f"run.dir={run}", f"agent.core={core}", SYNC, steps)
        assert out.returncode == 0, out.stderr[-2000:]
        rates[core] = success_rate(run)
    assert rates["rdn"] >= 0.9 and rates["delta"] >= 0.9, rates
    assert rates["ff"] <= 0.7, rates


def test_summaries_carry_each_intervals_peak_kl_and_grad_norm(tmp_path):
    """Every summary logs the largest KL and gradient norm of all updates since the last one."""
    run = tmp_path / "run"
    args = [*FAST_MEMORY, f"run.dir={run}", SYNC, "runtime.total_steps=8192"]
    out = train(*args, "logging.every_s=0.1")
    assert out.returncode == 0, out.stderr[-2000:]
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("policy/kl_from_behaviour", "losses/grad_norm"):
        sampled = {e.step: e.value for e in events.Scalars(name)}
        peaks = {e.step: e.value for e in events.Scalars(f"{name}_max")}
        assert sampled and peaks.keys() == sampled.keys()
        assert all(peaks[step] >= value for step, value in sampled.items()), (peaks, sampled)


def test_resume_continues_counters_and_optimizer(tmp_path):
    run = tmp_path / "run"
    base = [*FAST_MEMORY, f"run.dir={run}", SYNC, "runtime.total_steps=2048"]
    assert train(*base).returncode == 0
    first = load_checkpoint(CheckpointManager(run / "checkpoints").list()[-1])
    assert first["steps"] == 2048 and first["learner"]["updates"] == 4
    out = train(*base[:-1], "runtime.total_steps=4096")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr
    second = load_checkpoint(CheckpointManager(run / "checkpoints").list()[-1])
    assert second["steps"] == 4096 and second["learner"]["updates"] == 8
    state = second["learner"]["optimizer"]["state"]
    assert int(state[0]["step"]) == 8  # Adam's step count went on from the resumed state


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    run = tmp_path / "run"
    base = [*FAST_MEMORY, f"run.dir={run}", SYNC]
    assert train(*base, "runtime.total_steps=1024").returncode == 0
    assert train(*base, "runtime.total_steps=2048").returncode == 0
    latest = CheckpointManager(run / "checkpoints").list()[-1]
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    out = train(*base, "runtime.total_steps=3072")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping it" in out.stderr and "resumed from" in out.stderr
    assert "ckpt_000000001024.pt at step 1024" in out.stderr


def test_restart_archives_the_previous_run(tmp_path):
    run = tmp_path / "run"
    base = [*FAST_MEMORY, f"run.dir={run}", SYNC, "runtime.total_steps=512"]
    assert train(*base).returncode == 0
    out = train(*base, "run.restart=true")
    assert out.returncode == 0 and "resumed" not in out.stderr
    archived = list(run.glob("previous-*/checkpoints/*.pt"))
    assert len(archived) == 1


@pytest.mark.timeout(120)
def test_sigint_stops_quickly_with_a_checkpoint_and_no_orphans(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *FAST_MEMORY,
            f"run.dir={run}",
            "runtime.total_steps=10000000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (run / "tb").exists():
            time.sleep(0.5)
        time.sleep(5)  # actors are up and rollouts flowing
        children = parent.children(recursive=True)
        assert len(children) >= 2
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=30)[1]
        assert time.monotonic() - start < 15
        assert proc.returncode == 0, stderr[-2000:]
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        assert CheckpointManager(run / "checkpoints").list()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env.id=pongg"], "pong"),
        (["--config", "configs/nope.yaml"], "not found"),
        (["agent.core=lstmm"], "choices"),
    ],
)
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, args, message):
    run = tmp_path / "run"
    out = train(*args, f"run.dir={run}", timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not run.exists()


def test_checkpoint_of_another_game_is_refused(tmp_path):
    run = tmp_path / "run"
    base = [*FAST_MEMORY, f"run.dir={run}", SYNC, "runtime.total_steps=512"]
    assert train(*base).returncode == 0
    before = sorted(os.listdir(run / "checkpoints"))
    out = train(*base, "env.kwargs.num_cues=3", "runtime.total_steps=1024")
    assert out.returncode == 2 and "actions" in out.stderr
    assert sorted(os.listdir(run / "checkpoints")) == before


@pytest.mark.timeout(180)
def test_periodic_evaluation_runs_beside_training(tmp_path):
    run = tmp_path / "run"
    out = train(
        *FAST_MEMORY,
        f"run.dir={run}",
        SYNC,
        "runtime.total_steps=100000000",
        "runtime.time_limit_s=25",
        "eval.every_steps=2048",
        "eval.episodes=4",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    reports = sorted((run / "eval").glob("*.json"))
    assert reports, sorted(p.name for p in (run / "eval").iterdir())
    assert reports[0].name == "000000002048.json"
