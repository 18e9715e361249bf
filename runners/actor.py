"""The acting side: one vector env + a CPU copy of the agent filling rollout slots (DESIGN §2).

`RolloutWorker` is shared by every backend: the local backend runs one per actor process, the
sync backend runs them in the learner's process, so acting is the same code everywhere.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from runners.rollout import RolloutBuffers


class SharedWeights:
    """The learner's latest weights in shared memory, with their policy version.

    A sequence lock: the single writer makes the counter odd while it copies, readers retry
    when they saw it odd or changed. Nobody ever blocks, so a reader killed mid-read cannot
    stall the learner.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.detach().cpu().clone().share_memory_() for k, v in state_dict.items()}
        self.sequence = torch.zeros((), dtype=torch.int64).share_memory_()
        self.version = torch.zeros((), dtype=torch.int64).share_memory_()

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.sequence.add_(1)
        for name, tensor in self.tensors.items():
            tensor.copy_(state_dict[name].detach())
        self.version.fill_(version)
        self.sequence.add_(1)

    def latest_version(self) -> int:
        return int(self.version)

    def load_into(self, module: torch.nn.Module, attempts: int = 100) -> int | None:
        """Copy a consistent set of weights into `module`; their version, or None if busy."""
        for _ in range(attempts):
            before = int(self.sequence)
            if before % 2:
                time.sleep(0.001)
                continue
            module.load_state_dict(self.tensors)
            version = int(self.version)
            if int(self.sequence) == before:
                return version
        return None


class RolloutWorker:
    """Steps `env` with `agent`, keeping per env the last env output and the core state."""

    def __init__(self, env, agent, buffers: RolloutBuffers, seed: int) -> None:
        self.env = env
        self.agent = agent
        self.buffers = buffers
        e = env.num_envs
        self.obs = torch.from_numpy(np.ascontiguousarray(env.reset(seed=seed)))
        self.reward = torch.zeros(e)
        self.done = torch.ones(e, dtype=torch.bool)  # the first obs starts an episode
        self.action = torch.zeros(e, dtype=torch.int64)
        self.logits = torch.zeros(e, buffers.spec.num_actions)
        self.state = agent.initial_state(e)
        self.env_seconds = 0.0
        self.inference_seconds = 0.0

    def _write(self, slot: int, t: int) -> None:
        b = self.buffers
        b.obs[slot, t].copy_(self.obs)
        b.reward[slot, t].copy_(self.reward)
        b.done[slot, t].copy_(self.done)
        b.action[slot, t].copy_(self.action)
        b.logits[slot, t].copy_(self.logits)

    def start_rollout(self, slot: int, version: int) -> None:
        """Record what the learner replays `slot` from: the core state before index 0, and
        the policy version acting on it."""
        for saved, current in zip(self.buffers.initial_state, self.state, strict=True):
            saved[slot].copy_(current)
        self.buffers.version[slot] = version

    def policy_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Action `[E]` and logits `[E, A]` for the current env outputs; advances the state."""
        action, logits, _, self.state = self.agent.act(
            self.obs, self.reward, self.done, self.action, self.state
        )
        return action, logits

    def fill(self, slot: int, version: int) -> None:
        """Write one rollout of T steps (T+1 entries) into `slot`."""
        b = self.buffers
        self.start_rollout(slot, version)
        b.episode_end[slot, 0] = False  # games that ended at index 0 were counted last rollout
        self._write(slot, 0)
        for t in range(b.spec.unroll_length):
            start = time.perf_counter()
            action, logits = self.policy_step()
            middle = time.perf_counter()
            out = self.env.step(action.numpy())
            self.env_seconds += time.perf_counter() - middle
            self.inference_seconds += middle - start
            self.obs = torch.from_numpy(np.ascontiguousarray(out.obs))
            self.reward = torch.from_numpy(np.asarray(out.reward, dtype=np.float32))
            self.done = torch.from_numpy(np.asarray(out.done, dtype=bool))
            self.action = action
            self.logits = logits
            self._write(slot, t + 1)
            b.episode_end[slot, t + 1] = torch.from_numpy(np.asarray(out.episode_end, dtype=bool))
            b.episode_return[slot, t + 1] = torch.from_numpy(
                np.asarray(out.episode_return, dtype=np.float32)
            )
            b.episode_length[slot, t + 1] = torch.from_numpy(
                np.asarray(out.episode_length, dtype=np.int32)
            )
