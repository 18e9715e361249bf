"""The learner step (DESIGN §5): V-trace actor-critic losses, optimizer, lr decay, clipping.

Batches follow DESIGN §2: the agent is unrolled over all T+1 steps from the rollout's initial
state; outputs 0..T-1 are scored against the batch's indices 1..T and value[T] bootstraps.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from runners import vtrace
from runners.config import LearnerConfig
from runners.rollout import Batch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def _ppo_clipped(ratio: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """Fraction of steps the PPO clip cuts off: past 1 ± clip in their advantage's direction."""
    if clip <= 0:
        return torch.zeros(())
    past = ((advantages > 0) & (ratio > 1 + clip)) | ((advantages < 0) & (ratio < 1 - clip))
    return past.float().mean()


class Learner:
    """Owns the optimizer and the step counter; `update` trains on one batch."""

    def __init__(
        self, agent: torch.nn.Module, cfg: LearnerConfig, total_steps: int, device: torch.device
    ) -> None:
        self.agent = agent
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = device
        params = list(agent.parameters())
        if cfg.optimizer == "rmsprop":
            self.optimizer = torch.optim.RMSprop(
                params,
                lr=cfg.learning_rate,
                alpha=cfg.rmsprop_alpha,
                eps=cfg.rmsprop_eps,
                momentum=cfg.momentum,
            )
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.rmsprop_eps)
        self.steps = 0  # agent steps consumed (T x B per update)
        self.updates = 0  # successful optimizer steps = policy version
        self.nonfinite_in_a_row = 0
        self.skipped_updates = 0

    def linear_decay(self) -> float:
        """1 at the start, falling linearly to 0 at lr_decay_steps (or total_steps), then 0."""
        horizon = self.cfg.lr_decay_steps or self.total_steps
        return max(0.0, 1.0 - self.steps / horizon)

    def learning_rate(self) -> float:
        """The rate for the next update: the schedule's, scaled by the warm-up's linear ramp."""
        cfg = self.cfg
        rate = cfg.learning_rate
        if cfg.lr_schedule == "linear":
            rate *= self.linear_decay()
        if self.steps < cfg.warmup_steps:
            rate *= (self.steps + 1) / cfg.warmup_steps
        return rate

    def entropy_cost(self) -> float:
        """The entropy bonus's weight for the next update, decayed with the lr when asked."""
        decay = self.linear_decay() if self.cfg.entropy_decay else 1.0
        return self.cfg.entropy_cost * decay

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward pass and the three losses (summed over T x B, as in the paper)."""
        cfg = self.cfg
        logits, values, _ = self.agent(
            batch.obs, batch.reward, batch.done, batch.action, batch.initial_state
        )
        target_logits, learner_values, bootstrap = logits[:-1], values[:-1], values[-1]
        actions = batch.action[1:]
        rewards = batch.reward[1:]
        if cfg.reward_clip > 0:
            rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip)
        discounts = (~batch.done[1:]).float() * cfg.gamma
        vt = vtrace.from_logits(
            behaviour_logits=batch.logits[1:],
            target_logits=target_logits.detach(),
            actions=actions,
            discounts=discounts,
            rewards=rewards,
            values=learner_values.detach(),
            bootstrap_value=bootstrap.detach(),
            clip_rho_threshold=cfg.clip_rho,
            clip_pg_rho_threshold=cfg.clip_pg_rho,
            lambda_=cfg.lambda_,
        )
        log_probs = F.log_softmax(target_logits, dim=-1)
        action_log_probs = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        # With the PPO clip the ratio pi/mu weights the advantage inside the surrogate, so the
        # advantage it takes is V-trace's before its own (clipped) rho weight.
        advantages = vt.advantages if cfg.ppo_clip > 0 else vt.pg_advantages
        if cfg.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        if cfg.ppo_clip > 0:
            ratio = (action_log_probs - vt.behaviour_action_log_probs).exp()
            bounded = ratio.clamp(1.0 - cfg.ppo_clip, 1.0 + cfg.ppo_clip)
            pg = -torch.minimum(ratio * advantages, bounded * advantages).sum()
        else:
            pg = -(action_log_probs * advantages).sum()
        baseline = cfg.baseline_cost * 0.5 * (vt.vs - learner_values).pow(2).sum()
        negative_entropy = (log_probs.exp() * log_probs).sum(-1)
        entropy_cost = self.entropy_cost()
        entropy = entropy_cost * negative_entropy.sum()
        rhos = vt.log_rhos.exp()
        behaviour_log_probs = F.log_softmax(batch.logits[1:], dim=-1)
        kl = (behaviour_log_probs.exp() * (behaviour_log_probs - log_probs)).sum(-1)
        kl_penalty = cfg.kl_cost * kl.sum()
        return {
            "losses/pg": pg,
            "losses/baseline": baseline,
            "losses/entropy": entropy,
            "losses/kl": kl_penalty,
            "losses/total": pg + baseline + entropy + kl_penalty,
            "charts/entropy_cost": torch.tensor(entropy_cost),
            # In nats per step, whatever the costs and batch shape: a collapsing policy shows
            # here first (entropy towards 0, or drifting far from the actors' policy).
            "policy/entropy": -negative_entropy.mean(),
            "policy/kl_from_behaviour": kl.mean(),
            # One step far off (a blow-up in one trajectory) or the whole batch moved?
            "policy/kl_from_behaviour_worst_step": kl.max(),
            "vtrace/mean_rho": rhos.mean(),
            "vtrace/clipped_rho_fraction": (rhos > cfg.clip_rho).float().mean(),
            # Steps whose surrogate is flat (no policy gradient) under the PPO clip; 0 when off.
            "policy/ppo_clipped_fraction": _ppo_clipped(rhos, advantages, cfg.ppo_clip),
            "vtrace/mean_vs": vt.vs.mean(),
            "vtrace/mean_advantage": vt.pg_advantages.mean(),
        }

    def part_grad_norms(self) -> dict[str, torch.Tensor]:
        """The unclipped gradient norm of each part of the agent (torso, core, heads).

        The global norm says that an update was large, these say where: a recurrent core whose
        gradient explodes through time shows here first.
        """
        norms = {}
        for name, part in self.agent.named_children():
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            if grads:
                norms[f"grad_norm/{name}"] = torch.nn.utils.get_total_norm(grads)
        return norms

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step; a non-finite loss or gradient skips it (DESIGN §7)."""
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        metrics["losses/total"].backward()
        metrics.update(self.part_grad_norms())
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.agent.parameters(), clip)
        # The one host sync per update: skipping needs a Python decision.
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(metrics["losses/total"]))
        lag = self.updates - batch.version.to(torch.float32)
        self.steps += (batch.reward.shape[0] - 1) * batch.reward.shape[1]
        if finite:
            self.optimizer.step()
            self.updates += 1
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_updates += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "non-finite loss or gradient: update skipped (%d in a row)", self.nonfinite_in_a_row
            )
            if self.nonfinite_in_a_row >= self.cfg.max_nan_updates:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} non-finite updates in a row; stopping"
                )
        metrics.update(
            {
                "losses/grad_norm": grad_norm.detach(),
                "charts/learning_rate": torch.tensor(lr),
                "perf/policy_lag": lag.mean(),
                "perf/policy_lag_oldest": lag.max(),
            }
        )
        return {k: v.detach() for k, v in metrics.items()}

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
        self.skipped_updates = int(state["skipped_updates"])
