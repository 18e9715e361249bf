"""Any gymnasium env with Discrete actions and Box observations behind the ``VectorEnv`` contract.

The envs run in one process through gymnasium's ``SyncVectorEnv`` with same-step autoreset.
Observations keep uint8 when the Box is uint8 (images); any other Box is passed as float32, and
``obs_dtype`` says which, so the runtime can size its buffers. ``done`` and ``episode_end`` are
the same here (gymnasium envs have no notion of lives).
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from envs.base import EpisodeTracker, StepResult, unknown_choice

GYM_OPTIONS = ("kwargs",)


def import_env_module(module: str) -> None:
    """Import the module that registers a gymnasium id, as a one-line ValueError on failure."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"cannot import env module {module!r}: {error}") from error


class GymVectorEnv:
    """``num_envs`` copies of gymnasium env ``env_id``; env ``i`` is seeded ``seed + i``."""

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        seed: int,
        *,
        module: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        if module is not None:
            import_env_module(module)
        if env_id not in gym.registry:
            raise unknown_choice("gymnasium env id", env_id, sorted(gym.registry))
        kwargs = dict(kwargs or {})
        try:
            probe = gym.make(env_id, **kwargs)
        except TypeError as error:
            raise ValueError(
                f"bad kwargs {kwargs!r} for gymnasium env {env_id!r}: {error}"
            ) from None
        action_space, obs_space = probe.action_space, probe.observation_space
        probe.close()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(
                f"gymnasium env {env_id!r} has action space {action_space}; "
                "only Discrete is supported"
            )
        if not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(
                f"gymnasium env {env_id!r} has observation space {obs_space}; only Box is supported"
            )
        self.env_id = env_id
        self.num_envs = num_envs
        self.seed = seed
        self.num_actions = int(action_space.n)
        self.obs_shape = tuple(obs_space.shape)
        self.obs_dtype = np.dtype(np.uint8 if obs_space.dtype == np.uint8 else np.float32)
        self._action_start = int(action_space.start)
        self._env = SyncVectorEnv(
            [lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        self._episodes = EpisodeTracker(num_envs)
        self._seeded = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env; the first reset uses the constructor's seed."""
        if seed is None and not self._seeded:
            seed = self.seed
        obs, _ = self._env.reset(seed=seed)
        self._seeded = True
        self._episodes.reset()
        return obs.astype(self.obs_dtype, copy=False)

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with ``actions`` [E] (indices 0..num_actions-1)."""
        if self._action_start:
            actions = actions + self._action_start
        obs, reward, terminated, truncated, _ = self._env.step(actions)
        reward = reward.astype(np.float32)
        done = terminated | truncated
        episode_return, episode_length = self._episodes.update(reward, done)
        obs = obs.astype(self.obs_dtype, copy=False)
        return StepResult(obs, reward, done, done.copy(), episode_return, episode_length)

    def close(self) -> None:
        self._env.close()
