"""A scripted env for runtime tests: observations spell out the step counter and last action.

Registered as `deltabeast-test/Counting-v0`. Each step increments a counter and returns it
as the reward; an episode ends after `length` steps. The observation's first two pixels hold
(counter, action just received), so a test can check where everything lands in a batch.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        length: int = 7,
        num_actions: int = 3,
        fail_at: int = 0,
        fail_mode: str = "raise",
        fail_once_file: str | None = None,
        bad_reward_at: int = 0,
        bad_reward: float = float("nan"),
    ) -> None:
        """`fail_at` > 0 injects a fault at that step of the first episode: `fail_mode` "raise"
        raises, "hang" sleeps forever; with `fail_once_file` only the first process to get
        there (the one that creates the file) fails. `bad_reward_at` > 0 makes every reward
        from that step on (counted over all episodes) `bad_reward`, e.g. NaN or inf."""
        self.length = length
        self.fail_at = fail_at
        self.fail_mode = fail_mode
        self.fail_once_file = fail_once_file
        self.bad_reward_at = bad_reward_at
        self.bad_reward = bad_reward
        self.total_steps = 0
        self.observation_space = gym.spaces.Box(0, 255, shape=(1, 4, 4), dtype=np.uint8)
        self.action_space = gym.spaces.Discrete(num_actions)
        self.counter = 0

    def _obs(self, action: int) -> np.ndarray:
        obs = np.zeros((1, 4, 4), dtype=np.uint8)
        obs[0, 0, 0] = self.counter
        obs[0, 0, 1] = action
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.counter = 0
        return self._obs(0), {}

    def _maybe_fail(self) -> None:
        if not self.fail_at or self.total_steps != self.fail_at:
            return
        if self.fail_once_file is not None:
            try:
                open(self.fail_once_file, "x").close()
            except FileExistsError:
                return
        if self.fail_mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected env failure at step {self.total_steps}")

    def step(self, action):
        self.total_steps += 1
        self._maybe_fail()
        self.counter += 1
        terminated = self.counter >= self.length
        reward = float(self.counter)
        if self.bad_reward_at and self.total_steps >= self.bad_reward_at:
            reward = self.bad_reward
        return self._obs(int(action) + 100), reward, terminated, False, {}


gym.register("deltabeast-test/Counting-v0", entry_point=CountingEnv)
