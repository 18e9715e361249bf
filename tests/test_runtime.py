"""Rollout/learner contract (DESIGN §2): indices, carry-over, replay equals acting."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from runners import vtrace
from runners.config import build_config
from runners.factory import make_agent, probe_env, rollout_spec
from runners.learner import Learner
from runners.local import BackendError, LocalBackend, SyncBackend

LENGTH = 7  # counting-env episode length: resets land inside and across rollouts
T = 5


def counting_config(core: str, backend: str = "sync", lr: float = 0.0, **extra):
    overrides = {
        "env.kind": "gym",
        "env.id": "deltabeast-test/Counting-v0",
        "env.module": "tests.counting_env",
        "env.num_envs": 4,
        "env.kwargs": {"length": LENGTH},
        "agent.torso": "mlp",
        "agent.core": core,
        "agent.prev_action": True,
        "agent.init": "default",  # the Pong preset's learning choices are not under test here
        "core.num_layers": 1,
        "core.hidden_size": 16,
        "core.num_heads": 2,
        "core.head_dim": 4,
        "core.ff_size": 16,
        "learner.unroll_length": T,
        "learner.batch_size": 4,
        "learner.learning_rate": lr,
        "learner.lr_schedule": "constant",
        "learner.warmup_steps": 0,
        "runtime.backend": backend,
        "runtime.num_actors": 2,
        "runtime.total_steps": 10_000,
        **extra,
    }
    return build_config(None, [f"{k}={v}" for k, v in overrides.items()])


def build(cfg):
    torch.manual_seed(0)
    info = probe_env(cfg)
    agent = make_agent(cfg, info)
    spec = rollout_spec(cfg, info, agent)
    return info, agent, spec


def check_indices(batch) -> int:
    """Rewards, dones and actions sit where DESIGN §2 says; returns the resets inside."""
    counter = batch.obs[:, :, 0, 0, 0].long()
    seen_action = batch.obs[:, :, 0, 0, 1].long()
    done = batch.done
    assert torch.equal(done, counter == 0)
    # reward at t arrived with obs t: the counter, or LENGTH on the step that ended the episode
    expected_reward = torch.where(done, torch.full_like(counter, LENGTH), counter).float()
    assert torch.equal(batch.reward[1:], expected_reward[1:])
    # action at t was taken at obs t-1; the env echoes it (+100) in obs t unless obs t is a reset
    live = ~done[1:]
    assert torch.equal((batch.action[1:] + 100)[live], seen_action[1:][live])
    assert live.any()
    return int(done[1:].sum())


@pytest.mark.parametrize("core", ["delta", "rdn", "lstm"])
def test_sync_batches_follow_the_contract_and_replay_exactly(core):
    cfg = counting_config(core)
    info, agent, spec = build(cfg)
    backend = SyncBackend(cfg, info, spec, agent)
    learner = Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu"))
    previous, resets = None, 0
    try:
        for _ in range(4):  # several rollouts: carry-over and resets across boundaries
            batch = backend.next_batch()
            assert batch.obs.shape == (T + 1, 4, 1, 4, 4)
            resets += check_indices(batch)
            if previous is not None:
                # the sync backend alternates two workers of 2 envs; each slot continues its own
                for name in ("obs", "reward", "done", "action", "logits"):
                    assert torch.equal(getattr(batch, name)[0], getattr(previous, name)[T])
            with torch.no_grad():
                logits, _, _ = agent(
                    batch.obs, batch.reward, batch.done, batch.action, batch.initial_state
                )
            torch.testing.assert_close(logits[:-1], batch.logits[1:], atol=1e-5, rtol=1e-5)
            stats = learner.update(batch)
            assert abs(float(stats["vtrace/mean_rho"]) - 1.0) < 1e-4
            assert abs(float(stats["policy/kl_from_behaviour"])) < 1e-5
            backend.publish(agent.state_dict(), learner.updates)
            previous = batch
    finally:
        backend.close()
    assert resets >= 4


def learner_and_batch(core: str, lr: float = 0.0, **extra):
    """The config, agent, learner and one batch from the sync backend."""
    cfg = counting_config(core, lr=lr, **extra)
    info, agent, spec = build(cfg)
    backend = SyncBackend(cfg, info, spec, agent)
    batch = backend.next_batch()
    backend.close()
    return (
        cfg,
        agent,
        Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu")),
        batch,
    )


def adam_learner_and_batch():
    """A delta agent's Adam learner and one batch."""
    return learner_and_batch("delta", lr=1e-3, **{"learner.optimizer": "adam"})


def test_learner_step_moves_weights_and_lowers_loss():
    _, agent, learner, batch = adam_learner_and_batch()
    before = [p.detach().clone() for p in agent.parameters()]
    first = float(learner.update(batch)["losses/total"])
    for _ in range(30):
        last = float(learner.update(batch)["losses/total"])
    assert last < first
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.parameters(), strict=True))
    assert learner.steps == 31 * T * 4 and learner.updates == 31


def test_part_gradient_norms_make_up_the_global_norm():
    """grad_norm/{torso,core,policy,baseline} are unclipped and add up (in squares) to the total."""
    _, agent, learner, batch = learner_and_batch("rdn", lr=1e-3, **{"learner.grad_clip": 1e-3})
    stats = learner.update(batch)
    parts = {k: float(v) for k, v in stats.items() if k.startswith("grad_norm/")}
    assert set(parts) == {f"grad_norm/{name}" for name, _ in agent.named_children()}
    assert set(parts) >= {"grad_norm/torso", "grad_norm/core", "grad_norm/policy"}
    assert all(value > 0 for value in parts.values()), parts
    total = sum(value**2 for value in parts.values()) ** 0.5
    assert total == pytest.approx(float(stats["losses/grad_norm"]), rel=1e-5)
    assert total > 1e-3  # measured before the clip, which scaled the gradients down


def test_policy_lag_is_logged_as_the_batch_mean_and_its_oldest_trajectory():
    _, _, learner, batch = learner_and_batch("delta")
    learner.updates = 5
    batch.version = torch.tensor([5, 4, 1, 5], dtype=batch.version.dtype)
    stats = learner.update(batch)
    assert float(stats["perf/policy_lag"]) == 1.25 and float(stats["perf/policy_lag_oldest"]) == 4


def test_kl_cost_adds_the_summed_kl_and_pulls_the_policy_back_to_the_actors():
    _, _, learner, batch = adam_learner_and_batch()
    learner.cfg.kl_cost = 0.0  # the LearnerConfig default (the fast preset sets 0.1)
    for _ in range(5):
        learner.update(batch)  # the learner's policy drifts from the batch's behaviour policy
    with torch.no_grad():
        before = learner.losses(batch)
    assert float(before["losses/kl"]) == 0.0
    learner.cfg.kl_cost = 2.0
    with torch.no_grad():
        penalised = learner.losses(batch)
    kl_sum = float(before["policy/kl_from_behaviour"]) * T * 4
    assert float(penalised["losses/kl"]) == pytest.approx(2.0 * kl_sum, rel=1e-5)
    assert float(penalised["losses/total"] - before["losses/total"]) == pytest.approx(
        2.0 * kl_sum, rel=1e-4
    )
    learner.cfg.kl_cost = 1e3  # the penalty outweighs the rest: the policy returns
    for _ in range(10):
        learner.update(batch)
    with torch.no_grad():
        after = float(learner.losses(batch)["policy/kl_from_behaviour"])
    assert after < 0.2 * float(before["policy/kl_from_behaviour"])


def _pg_gradient(learner, batch) -> list[torch.Tensor]:
    learner.agent.zero_grad()
    learner.losses(batch)["losses/pg"].backward()
    return [p.grad.clone() for p in learner.agent.parameters() if p.grad is not None]


def test_ppo_clip_equals_vtrace_on_policy_and_drops_steps_moved_past_the_clip():
    _, agent, learner, batch = adam_learner_and_batch()
    plain = _pg_gradient(learner, batch)  # the batch's policy is the learner's: π/μ = 1
    learner.cfg.ppo_clip = 0.1
    clipped = _pg_gradient(learner, batch)
    for a, b in zip(plain, clipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    learner.cfg.ppo_clip = 0.0
    for _ in range(5):
        learner.update(batch)  # the learner's policy drifts from the batch's behaviour policy
    learner.cfg.ppo_clip = clip = 0.2
    stats = learner.losses(batch)
    # Reference, step by step: the surrogate min(r A, clip(r) A) and the steps it cuts off.
    logits, values, _ = agent(
        batch.obs, batch.reward, batch.done, batch.action, batch.initial_state
    )
    c = learner.cfg
    out = vtrace.from_logits(
        batch.logits[1:], logits[:-1].detach(), batch.action[1:],
        (~batch.done[1:]).float() * c.gamma, batch.reward[1:].clamp(-c.reward_clip, c.reward_clip),
        values[:-1].detach(), values[-1].detach(), lambda_=c.lambda_,
    )  # fmt: skip
    log_pi = torch.log_softmax(logits[:-1], -1).gather(-1, batch.action[1:, :, None])[..., 0]
    surrogate, kept, cut = 0.0, 0.0, 0
    for t in range(T):
        for b in range(4):
            ratio = torch.exp(log_pi[t, b] - out.behaviour_action_log_probs[t, b])
            adv = float(out.advantages[t, b])
            bounded = min(max(ratio.item(), 1 - clip), 1 + clip)
            surrogate += min(ratio.item() * adv, bounded * adv)
            if (adv > 0 and ratio > 1 + clip) or (adv < 0 and ratio < 1 - clip):
                cut += 1
            else:
                kept = kept + ratio * adv  # the only steps with a gradient
    assert 0 < cut < T * 4  # the case cuts some steps and keeps others
    assert float(stats["losses/pg"].detach()) == pytest.approx(-surrogate, rel=1e-5)
    assert float(stats["policy/ppo_clipped_fraction"]) == pytest.approx(cut / (T * 4))
    expected = torch.autograd.grad(-kept, [p for p in agent.parameters()], allow_unused=True)
    actual = _pg_gradient(learner, batch)
    expected = [g for g in expected if g is not None]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_policy_metrics_are_the_mean_entropy_and_kl_from_the_behaviour_policy():
    """In nats per step, checked against numpy on a batch the learner has since moved away from."""
    cfg, agent, learner, batch = adam_learner_and_batch()
    for _ in range(5):
        learner.update(batch)
    with torch.no_grad():
        stats = learner.losses(batch)
        logits, _, _ = agent(batch.obs, batch.reward, batch.done, batch.action, batch.initial_state)
    log_p = torch.log_softmax(logits[:-1].double(), -1).numpy()
    log_mu = torch.log_softmax(batch.logits[1:].double(), -1).numpy()
    entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    kl_per_step = (np.exp(log_mu) * (log_mu - log_p)).sum(-1)
    kl = kl_per_step.mean()
    assert kl > 1e-4  # the policy has moved
    np.testing.assert_allclose(float(stats["policy/entropy"]), entropy, rtol=1e-5)
    np.testing.assert_allclose(float(stats["policy/kl_from_behaviour"]), kl, rtol=1e-4)
    worst = kl_per_step.max()
    assert worst > 1.5 * kl  # the steps differ, so the worst one is not the mean
    worst_logged = float(stats["policy/kl_from_behaviour_worst_step"])
    np.testing.assert_allclose(worst_logged, worst, rtol=1e-4)
    steps = T * 4
    np.testing.assert_allclose(
        float(stats["losses/entropy"]), -cfg.learner.entropy_cost * steps * entropy, rtol=1e-5
    )


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_warmup_ramps_the_learning_rate_then_hands_over_to_the_schedule(schedule):
    cfg = counting_config("lstm", lr=1e-3, **{"learner.warmup_steps": 1000})
    cfg.learner.lr_schedule = schedule
    learner = Learner(build(cfg)[1], cfg.learner, 10_000, torch.device("cpu"))
    decay = {"constant": lambda s: 1.0, "linear": lambda s: 1.0 - s / 10_000}[schedule]
    for steps, ramp in ((0, 1 / 1000), (499, 0.5), (999, 1.0), (1000, 1.0), (5000, 1.0)):
        learner.steps = steps
        assert learner.learning_rate() == pytest.approx(1e-3 * ramp * decay(steps))


@pytest.mark.parametrize(("decay_steps", "horizon"), [(0, 10_000), (4_000, 4_000)])
def test_linear_decay_reaches_zero_at_its_horizon_and_stays_there(decay_steps, horizon):
    """learner.lr_decay_steps sets where the linear decay ends; 0 means runtime.total_steps."""
    cfg = counting_config("lstm", lr=1e-3, **{"learner.lr_decay_steps": decay_steps})
    cfg.learner.lr_schedule = "linear"
    learner = Learner(build(cfg)[1], cfg.learner, 10_000, torch.device("cpu"))
    for steps in (0, horizon // 4, horizon // 2, horizon - 1, horizon, horizon + 1, 10_000):
        learner.steps = steps
        expected = 1e-3 * max(0.0, 1.0 - steps / horizon)
        assert learner.learning_rate() == pytest.approx(expected, abs=1e-12)
    learner.steps = horizon // 2
    assert learner.learning_rate() == pytest.approx(5e-4)


@pytest.mark.parametrize("decay", [False, True])
def test_entropy_decay_scales_the_entropy_bonus_down_with_the_lr_horizon(decay):
    """learner.entropy_decay: the bonus's weight falls linearly to 0 at lr_decay_steps."""
    overrides = {"learner.entropy_decay": decay, "learner.lr_decay_steps": 4_000}
    cfg, _, learner, batch = learner_and_batch("lstm", lr=1e-3, **overrides)  # lr constant
    with torch.no_grad():
        start = float(learner.losses(batch)["losses/entropy"])
    assert start < 0.0
    expected = {0: 1.0, 1_000: 0.75, 3_000: 0.25, 4_000: 0.0, 6_000: 0.0}
    for steps, factor in expected.items():
        learner.steps = steps
        factor = factor if decay else 1.0
        assert learner.entropy_cost() == pytest.approx(cfg.learner.entropy_cost * factor)
        with torch.no_grad():
            entropy_loss = float(learner.losses(batch)["losses/entropy"])
        assert entropy_loss == pytest.approx(start * factor, rel=1e-5, abs=1e-12)
    assert learner.learning_rate() == pytest.approx(1e-3)  # the cost decays, the lr does not
    learner.steps = 1_000
    logged = learner.update(batch)["charts/entropy_cost"]
    assert float(logged) == pytest.approx(cfg.learner.entropy_cost * (0.75 if decay else 1.0))


@pytest.mark.parametrize("normalize", [False, True])
def test_normalized_advantages_ignore_their_scale_and_offset(monkeypatch, normalize):
    """With learner.normalize_advantages, advantages x and 3x+2 give the same policy loss."""
    import runners.learner as learner_module

    _, _, learner, batch = learner_and_batch("lstm", **{"learner.normalize_advantages": normalize})
    real = learner_module.vtrace.from_logits
    advantages = torch.randn(T, 4, generator=torch.Generator().manual_seed(1))

    def pg_loss(scale: float, offset: float) -> float:
        def patched(**kwargs):
            out = real(**kwargs)
            return out._replace(pg_advantages=advantages * scale + offset)

        monkeypatch.setattr(learner_module.vtrace, "from_logits", patched)
        return learner.losses(batch)["losses/pg"].detach().item()

    same = pg_loss(1.0, 0.0) == pytest.approx(pg_loss(3.0, 2.0), rel=1e-5)
    assert same == normalize


def test_nonfinite_update_is_skipped():
    cfg = counting_config("lstm", lr=1e-3, **{"learner.max_nan_updates": 2})
    info, agent, spec = build(cfg)
    backend = SyncBackend(cfg, info, spec, agent)
    batch = backend.next_batch()
    backend.close()
    learner = Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu"))
    before = [p.detach().clone() for p in agent.parameters()]
    batch.reward[1:] = float("nan")
    cfg.learner.reward_clip = 0.0
    learner.update(batch)
    assert learner.updates == 0 and learner.skipped_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(before, agent.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="non-finite"):
        learner.update(batch)


@pytest.mark.timeout(120)
def test_local_backend_batches_and_restarts_a_killed_actor():
    cfg = counting_config("delta", backend="local", **{"runtime.actor_timeout_s": 60.0})
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    try:
        batches = []
        while len(batches) < 3:
            batch = backend.next_batch(timeout_s=30.0)
            if batch is not None:
                check_indices(batch)
                batches.append(batch)
        with torch.no_grad():
            logits, _, _ = agent(
                batch.obs, batch.reward, batch.done, batch.action, batch.initial_state
            )
        torch.testing.assert_close(logits[:-1], batch.logits[1:], atol=1e-5, rtol=1e-5)
        victim = backend.actors[0].process
        victim.kill()
        victim.join(5)
        got = 0
        for _ in range(60):
            if backend.next_batch(timeout_s=1.0) is not None:
                got += 1
            if got >= 4 and backend.restarts() >= 1:
                break
        assert backend.restarts() == 1 and got >= 4
        assert backend.actors[0].process.is_alive()
    finally:
        pids = backend.pids()
        backend.close()
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.timeout(120)
def test_one_slot_per_actor_halves_the_policy_lag():
    """`runtime.num_buffers` = one slot per actor: each actor waits for the learner to take its
    rollout, so a batch is at most 2 updates old (the default's two slots each: up to 4)."""
    cfg = counting_config("delta", backend="local", **{"runtime.num_buffers": 2})
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    lags = []
    try:
        assert [len(actor.slots) for actor in backend.actors] == [1, 1]
        for update in range(1, 13):
            batch = None
            while batch is None:
                batch = backend.next_batch(timeout_s=30.0)
            check_indices(batch)
            lags.append(update - 1 - int(batch.version.max()))
            time.sleep(0.05)  # a learner slower than the actors, as on Pong
            backend.publish(agent.state_dict(), update)
    finally:
        backend.close()
    assert max(lags[4:]) <= 2, lags


def run_local_until(backend, batches: int, restarts: int, limit_s: float) -> int:
    """Pull batches until `batches` arrived and `restarts` actor restarts happened."""
    got, deadline = 0, time.monotonic() + limit_s
    while time.monotonic() < deadline and (got < batches or backend.restarts() < restarts):
        if backend.next_batch(timeout_s=1.0) is not None:
            got += 1
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_faulty_env_once_restarts_the_actor_and_training_goes_on(tmp_path, mode):
    kwargs = {"length": LENGTH, "fail_at": 12, "fail_mode": mode}
    kwargs["fail_once_file"] = str(tmp_path / "failed")
    cfg = counting_config(
        "lstm", backend="local", **{"env.kwargs": kwargs, "runtime.actor_timeout_s": 4.0}
    )
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    try:
        got = run_local_until(backend, batches=6, restarts=1, limit_s=90)
        assert backend.restarts() == 1 and got >= 6
    finally:
        backend.close()


@pytest.mark.timeout(120)
def test_env_that_always_raises_stops_the_run_with_its_traceback():
    kwargs = {"length": LENGTH, "fail_at": 3, "fail_mode": "raise"}
    cfg = counting_config("lstm", backend="local", **{"env.kwargs": kwargs})
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    try:
        with pytest.raises(BackendError, match="injected env failure at step 3"):
            run_local_until(backend, batches=1, restarts=10, limit_s=90)
    finally:
        backend.close()


@pytest.mark.timeout(180)
def test_fault_that_recurs_after_every_restart_stops_the_run():
    """NaN rewards from step 12 of each env: every fresh actor delivers, then crashes again."""
    kwargs = {"length": LENGTH, "bad_reward_at": 12}
    cfg = counting_config("lstm", backend="local", **{"env.kwargs": kwargs})
    info, agent, spec = build(cfg)
    backend = LocalBackend(cfg, info, spec, agent)
    try:
        with pytest.raises(BackendError, match="restarts within"):
            run_local_until(backend, batches=10**6, restarts=10**6, limit_s=150)
    finally:
        backend.close()
