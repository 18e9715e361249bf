"""A scripted env for runtime tests: observations spell out the step counter and last action.

Registered as `deltabeast-test/Counting-v0`. Each step increments a counter and returns it
as the reward; an episode ends after `length` steps. The observation's first two pixels hold
(counter, action just received), so a test can check where everything lands in a batch.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class CountingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, length: int = 7, num_actions: int = 3) -> None:
        self.length = length
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

    def step(self, action):
        self.counter += 1
        terminated = self.counter >= self.length
        return self._obs(int(action) + 100), float(self.counter), terminated, False, {}


gym.register("deltabeast-test/Counting-v0", entry_point=CountingEnv)
