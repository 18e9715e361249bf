"""ActorCritic = torso + recurrent core + policy/value heads (DESIGN §4).

Actors call ``act`` one step at a time; the learner calls ``forward`` (alias ``unroll``) over
the whole ``[T+1, B]`` rollout. ``act`` is ``forward`` with T=1 under ``torch.no_grad``, so the
learner replays exactly what the actor computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agents.cores import make_core
from agents.cores.fwp import FWPCore
from agents.linear import Linear
from agents.torso import make_torso

State = tuple[torch.Tensor, ...]
INIT_SCHEMES = ("orthogonal", "orthogonal_core", "default")


class ActorCritic(nn.Module):
    """Core input per step: ``[torso(obs), clamp(reward, -1, 1)]`` (+ one-hot previous action)."""

    def __init__(
        self, torso: nn.Module, core: nn.Module, num_actions: int, prev_action: bool = False
    ) -> None:
        super().__init__()
        _check_num_actions(num_actions)
        expected = core_input_size(torso.output_size, num_actions, prev_action)
        if core.input_size != expected:
            raise ValueError(
                f"core input_size is {core.input_size} but torso + reward"
                f"{' + previous action' if prev_action else ''} give {expected}"
            )
        self.torso = torso
        self.core = core
        self.num_actions = num_actions
        self.prev_action = prev_action
        self.policy = Linear(core.output_size, num_actions)
        self.baseline = Linear(core.output_size, 1)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.core.initial_state(batch_size, device)

    def forward(
        self,
        obs: torch.Tensor,
        reward: torch.Tensor,
        done: torch.Tensor,
        prev_action: torch.Tensor,
        state: State,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Unroll over ``[T, B]``: returns logits ``[T,B,A]``, value ``[T,B]``, the new state.

        ``state`` is the core state before ``obs[0]``; ``done[t]`` resets it before step t.
        """
        T, B = obs.shape[:2]
        features = self.torso(obs.reshape(T * B, *obs.shape[2:])).view(T, B, -1)
        parts = [features, reward.clamp(-1.0, 1.0).unsqueeze(-1).to(features.dtype)]
        if self.prev_action:
            parts.append(F.one_hot(prev_action, self.num_actions).to(features.dtype))
        y, state = self.core(torch.cat(parts, dim=-1), done, state)
        return self.policy(y), self.baseline(y).squeeze(-1), state

    unroll = forward

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        reward: torch.Tensor,
        done: torch.Tensor,
        prev_action: torch.Tensor,
        state: State,
        greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
        """One step for ``[B]`` envs: (action ``[B]`` i64, logits ``[B,A]``, value ``[B]``, state).

        Samples from the policy, or takes its argmax when ``greedy``.
        """
        logits, value, state = self.forward(
            obs[None], reward[None], done[None], prev_action[None], state
        )
        logits, value = logits[0], value[0]
        if greedy:
            action = logits.argmax(dim=-1)
        else:
            action = torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(-1)
        return action, logits, value, state


def _check_num_actions(num_actions: int) -> None:
    if isinstance(num_actions, bool) or not isinstance(num_actions, int) or num_actions < 1:
        raise ValueError(f"num_actions must be a positive int, got {num_actions!r}")


def core_input_size(torso_size: int, num_actions: int, prev_action: bool) -> int:
    """Width of the core's input: torso features, the clamped reward, optionally a one-hot."""
    return torso_size + 1 + (num_actions if prev_action else 0)


def build_agent(
    torso: str,
    core: str,
    obs_shape: Sequence[int],
    num_actions: int,
    core_kwargs: dict[str, Any] | None = None,
    prev_action: bool = False,
    bf16: bool = False,
    init: str = "default",
    center_obs: bool = False,
) -> ActorCritic:
    """Build an ActorCritic from names: ``make_torso(torso, ...)`` and ``make_core(core, ...)``."""
    body = make_torso(torso, obs_shape, bf16=bf16, center=center_obs)
    _check_num_actions(num_actions)
    size = core_input_size(body.output_size, num_actions, prev_action)
    agent = ActorCritic(
        body, make_core(core, size, **(core_kwargs or {})), num_actions, prev_action
    )
    initialize_(agent, init)
    return agent


def initialize_(agent: ActorCritic, scheme: str) -> None:
    """Re-initialise the torso and the heads, and with ``orthogonal_core`` an FWP core too;
    otherwise the core keeps its own init (DESIGN §4).

    ``orthogonal``: torso layers orthogonal with gain √2 (ReLU), policy head gain 0.01 (a
    near-uniform first policy), value head gain 1, zero biases. PyTorch's ``default`` init
    shrinks activations layer by layer: in the Nature CNN on Pong frames the features then vary
    across observations by ~3% of their mean, 0.0003 in absolute terms (34x less than here).
    ``orthogonal_core``: the same, and an FWP core starts as its input projection, made
    orthogonal (``FWPCore.zero_residual_branches_``), so the first policy reads the torso as
    directly as a feed-forward agent's does, and the memory grows in from zero.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme.startswith("orthogonal"):
        _orthogonal_(agent.torso, 2**0.5)
        _orthogonal_(agent.policy, 0.01)
        _orthogonal_(agent.baseline, 1.0)
    if scheme == "orthogonal_core" and isinstance(agent.core, FWPCore):
        _orthogonal_(agent.core.input_proj, 1.0)
        agent.core.zero_residual_branches_()


def _orthogonal_(module: nn.Module, gain: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            weight = torch.empty(layer.weight.shape)  # contiguous: channels_last can't be flattened
            nn.init.orthogonal_(weight, gain)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if layer.bias is not None:
                    layer.bias.zero_()
