"""runtime.inference=central: one batching server acts for every actor (DESIGN §2 unchanged)."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch

from runners.config import ConfigError, build_config
from runners.inference_server import inference_device
from runners.learner import Learner
from runners.local import BackendError, LocalBackend
from runners.trainer import learner_threads
from tests.test_runtime import T, build, check_indices, counting_config, run_local_until
from tests.test_train import FAST_MEMORY, peak_success_rate, train


def central_config(core: str):
    settings = {"runtime.inference": "central", "runtime.actor_timeout_s": 60.0}
    return counting_config(core, backend="local", **settings)


def assert_replays(cfg, agent, batch) -> None:
    """The learner's logits for behaviour steps 1..T, replayed on the CPU from the slot's initial
    state, equal the server's. A server on CUDA rounds through cuDNN's TF32 (PyTorch's default
    there), so it matches to ~1e-3 relative instead of to float32 rounding."""
    with torch.no_grad():
        logits, _, _ = agent(batch.obs, batch.reward, batch.done, batch.action, batch.initial_state)
    tol = 1e-5 if inference_device(cfg).type == "cpu" else 5e-3
    torch.testing.assert_close(logits[:-1], batch.logits[1:], atol=tol, rtol=tol)


def fresh_start(batch) -> torch.Tensor:
    """`[B]`: trajectories that start from an all-zero core state (a new actor's first slot)."""
    zero = [s.flatten(1).abs().sum(1) == 0 for s in batch.initial_state]
    return torch.stack(zero).all(0)


def assert_no_children_left(pids: list[int]) -> None:
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive


@pytest.mark.timeout(120)
@pytest.mark.parametrize("core", ["delta", "lstm"])
def test_central_batches_follow_the_contract_and_replay_exactly(core):
    cfg = central_config(core)
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    learner = Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu"))
    resets, versions = 0, []
    try:
        for _ in range(8):  # rollouts carry over, and episodes reset inside and across them
            batch = backend.next_batch(timeout_s=60.0)
            assert batch is not None
            assert batch.obs.shape == (T + 1, 4, 1, 4, 4)
            resets += check_indices(batch)
            assert_replays(cfg, agent, batch)
            stats = learner.update(batch)  # learning rate 0: the weights stay, versions rise
            assert abs(float(stats["vtrace/mean_rho"]) - 1.0) < 1e-4
            backend.publish(agent.state_dict(), learner.updates)
            versions += batch.version.tolist()
    finally:
        pids = backend.pids()
        backend.close()
    assert resets >= 4
    assert max(versions) > 0  # the server picked up published weights
    assert_no_children_left(pids)


@pytest.mark.timeout(120)
def test_killed_actor_restarts_with_fresh_states_and_training_goes_on():
    cfg = central_config("delta")
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)

    def pull(until) -> tuple[int, int]:
        """Check batches until `until(batches, fresh starts)` or 60 s; count both.

        A deadline, not a batch count: on a fast host the surviving actor alone can deliver
        many batches while the restarted one is still importing torch.
        """
        got = fresh = 0
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            batch = backend.next_batch(timeout_s=1.0)
            if batch is not None:
                got += 1
                check_indices(batch)
                assert_replays(cfg, agent, batch)
                fresh += int(fresh_start(batch).sum())
            if until(got, fresh):
                break
        return got, fresh

    envs = spec.num_envs
    try:
        # every actor's first rollout starts from zero states, later ones never do
        got, fresh = pull(lambda got, fresh: got >= 3 and fresh >= 2 * envs)
        assert fresh == 2 * envs
        victim = backend.actors[0].process
        victim.kill()
        victim.join(5)
        got, fresh = pull(lambda got, fresh: got >= 4 and fresh and backend.restarts())
        assert backend.restarts() == 1 and got >= 4
        assert fresh == envs  # the server reset the new actor's envs, and only those
        assert backend.actors[0].process.is_alive()
    finally:
        pids = backend.pids()
        backend.close()
    assert_no_children_left(pids)


@pytest.mark.timeout(120)
def test_server_death_stops_the_run_with_one_clear_message():
    cfg = central_config("lstm")
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    try:
        assert run_local_until(backend, batches=1, restarts=0, limit_s=60) >= 1
        backend.server.kill()
        with pytest.raises(BackendError, match=r"inference server died \(exit code -9\)"):
            run_local_until(backend, batches=10**6, restarts=10**6, limit_s=60)
        assert backend.restarts() == 0
    finally:
        pids = backend.pids()
        backend.close()
    assert_no_children_left(pids)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_task_is_learned_through_central_inference(tmp_path):
    """Learned at some point: a few local runs in a hundred unlearn it again (see test_train)."""
    run = tmp_path / "run"
    out = train(
        *FAST_MEMORY, f"run.dir={run}", "runtime.inference=central", "runtime.total_steps=80000"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "inference server ready" in out.stderr
    assert peak_success_rate(run) >= 0.9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.inference=gpu", "runtime.inference='gpu' is not valid; choices: actor, central"),
        ("runtime.inference_timeout_ms=-1", "runtime.inference_timeout_ms=-1.0 must be >= 0.0"),
    ],
)
def test_bad_inference_setting_is_one_line_naming_the_choices(override, message):
    with pytest.raises(ConfigError) as info:
        build_config(None, [override])
    assert str(info.value) == message


def test_central_inference_needs_the_local_backend():
    with pytest.raises(ConfigError, match="runtime.inference=central needs runtime.backend=local"):
        build_config(None, ["runtime.inference=central", "runtime.backend=sync"])


def test_learner_threads_leave_a_core_to_a_cpu_server(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert learner_threads(counting_config("delta", backend="local")) == 6  # 2 actors
    server_on_cpu = inference_device(central_config("delta")).type == "cpu"
    assert learner_threads(central_config("delta")) == (5 if server_on_cpu else 6)
