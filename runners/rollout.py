"""Preallocated rollout slots (DESIGN §2) and the learner batches stacked from them.

A slot holds T+1 time steps of E envs; index 0 repeats the last step of the previous rollout.
Slots live in shared memory so actor processes write them in place and nothing is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUMPY_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float32,
    np.dtype(np.int64): torch.int64,
}


@dataclass(frozen=True)
class RolloutSpec:
    """Everything needed to allocate slots: unroll length, envs per slot, shapes."""

    unroll_length: int
    num_envs: int
    obs_shape: tuple[int, ...]
    obs_dtype: torch.dtype
    num_actions: int
    state_shapes: tuple[tuple[int, ...], ...]


@dataclass
class Batch:
    """Time-major learner batch: `[T+1, B, ...]` plus per-trajectory metadata `[B]`."""

    obs: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    action: torch.Tensor
    logits: torch.Tensor
    initial_state: tuple[torch.Tensor, ...]
    version: torch.Tensor
    episode_end: torch.Tensor
    episode_return: torch.Tensor
    episode_length: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """Copy to `device` (pinned + non_blocking when it is a GPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return Batch(
            obs=move(self.obs),
            reward=move(self.reward),
            done=move(self.done),
            action=move(self.action),
            logits=move(self.logits),
            initial_state=tuple(move(s) for s in self.initial_state),
            version=self.version,
            episode_end=self.episode_end,
            episode_return=self.episode_return,
            episode_length=self.episode_length,
        )

    def finished_episodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Full-game returns and lengths of the games that ended inside this batch."""
        mask = self.episode_end[1:]
        return self.episode_return[1:][mask].numpy(), self.episode_length[1:][mask].numpy()


class RolloutBuffers:
    """`num_slots` rollout slots; tensors have a leading slot dimension."""

    def __init__(self, spec: RolloutSpec, num_slots: int, shared: bool = True) -> None:
        self.spec = spec
        self.num_slots = num_slots
        n, t1, e = num_slots, spec.unroll_length + 1, spec.num_envs

        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            tensor = torch.zeros(shape, dtype=dtype)
            return tensor.share_memory_() if shared else tensor

        self.obs = alloc((n, t1, e, *spec.obs_shape), spec.obs_dtype)
        self.reward = alloc((n, t1, e), torch.float32)
        self.done = alloc((n, t1, e), torch.bool)
        self.action = alloc((n, t1, e), torch.int64)
        self.logits = alloc((n, t1, e, spec.num_actions), torch.float32)
        self.episode_end = alloc((n, t1, e), torch.bool)
        self.episode_return = alloc((n, t1, e), torch.float32)
        self.episode_length = alloc((n, t1, e), torch.int32)
        self.initial_state = tuple(
            alloc((n, e, *shape), torch.float32) for shape in spec.state_shapes
        )
        self.version = alloc((n,), torch.int64)

    def batch(self, slots: list[int]) -> Batch:
        """Stack slots along the batch dimension into a fresh `[T+1, len(slots)*E]` batch."""
        index = torch.as_tensor(slots, dtype=torch.int64)

        def time_major(t: torch.Tensor) -> torch.Tensor:
            picked = t.index_select(0, index)  # [k, T+1, E, ...]
            k, t1, e = picked.shape[:3]
            return picked.transpose(0, 1).reshape(t1, k * e, *picked.shape[3:])

        def batch_major(t: torch.Tensor) -> torch.Tensor:
            picked = t.index_select(0, index)  # [k, E, ...]
            return picked.reshape(-1, *picked.shape[2:])

        e = self.spec.num_envs
        return Batch(
            obs=time_major(self.obs),
            reward=time_major(self.reward),
            done=time_major(self.done),
            action=time_major(self.action),
            logits=time_major(self.logits),
            initial_state=tuple(batch_major(s) for s in self.initial_state),
            version=self.version.index_select(0, index).repeat_interleave(e),
            episode_end=time_major(self.episode_end),
            episode_return=time_major(self.episode_return),
            episode_length=time_major(self.episode_length),
        )
