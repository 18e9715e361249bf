"""A cue-recall memory task with Atari-shaped image observations (gymnasium id below).

Step 0 shows a cue, one of ``num_cues`` fixed binary patterns. Then ``delay`` blank frames follow
(each pixel a distractor with probability ``noise``), then the query frame, a uniform gray that no
other frame can be. The action taken at the query must name the cue: reward +1 if right, -1 if
wrong, and the episode ends; actions before the query are ignored (reward 0). An episode is
``delay + 2`` steps. A policy without memory scores ``1 - 2 (1 - 1/num_cues)`` on average (0 for
two cues); a perfect memory scores 1.

Every channel of an observation holds the current frame (no frame stack), so the cue is visible
for exactly one step and any memory must come from the agent. Importing this module registers the
id, so ``env.kind=gym env.id=deltabeast/Memory-v0 env.module=envs.memory`` trains on it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "deltabeast/Memory-v0"
CUE_VALUE = 255
QUERY_VALUE = 128
_PATTERN_SEED = 20210611  # patterns are fixed for a shape, identical in every env and process


def cue_patterns(num_cues: int, frame_shape: tuple[int, int]) -> np.ndarray:
    """``num_cues`` distinct binary frames [num_cues, H, W] uint8 (0 or ``CUE_VALUE``)."""
    rng = np.random.default_rng(_PATTERN_SEED)
    patterns = (rng.random((num_cues, *frame_shape)) < 0.5).astype(np.uint8) * CUE_VALUE
    if len(np.unique(patterns.reshape(num_cues, -1), axis=0)) < num_cues:
        raise ValueError(
            f"obs_shape {frame_shape} is too small for {num_cues} distinct cue patterns; "
            "use a larger obs_shape or fewer cues"
        )
    return patterns


class MemoryEnv(gym.Env):
    """Remember the cue across ``delay`` frames and name it at the query."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_cues: int = 2,
        delay: int = 10,
        noise: float = 0.0,
        obs_shape: tuple[int, int, int] = (4, 84, 84),
        render_mode: str | None = None,
    ) -> None:
        if not isinstance(num_cues, int) or num_cues < 2:
            raise ValueError(f"num_cues must be an integer >= 2, got {num_cues!r}")
        if not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay must be an integer >= 0, got {delay!r}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise!r}")
        obs_shape = tuple(obs_shape)
        if len(obs_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in obs_shape):
            raise ValueError(f"obs_shape must be 3 positive integers (C, H, W), got {obs_shape!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.num_cues = num_cues
        self.delay = delay
        self.noise = noise
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, obs_shape, np.uint8)
        self.action_space = gym.spaces.Discrete(num_cues)
        self._patterns = cue_patterns(num_cues, obs_shape[1:])
        self._frame = np.zeros(obs_shape[1:], dtype=np.uint8)
        self._cue = 0
        self._t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(self.num_cues))
        self._t = 0
        self._frame = self._patterns[self._cue]
        return self._obs(), {"cue": self._cue}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._t == self.delay + 1:  # the action answers the query
            self._t += 1
            reward = 1.0 if int(action) == self._cue else -1.0
            return self._obs(), reward, True, False, {"cue": self._cue}
        self._t += 1
        if self._t <= self.delay:
            distractors = self.np_random.random(self._frame.shape) < self.noise
            self._frame = distractors.astype(np.uint8) * CUE_VALUE
        else:
            self._frame = np.full_like(self._frame, QUERY_VALUE)
        return self._obs(), 0.0, False, False, {"cue": self._cue}

    def _obs(self) -> np.ndarray:
        return np.broadcast_to(self._frame, self.observation_space.shape).copy()

    def render(self) -> np.ndarray | None:
        """The current frame as RGB [H, W, 3] (for videos of the task)."""
        if self.render_mode != "rgb_array":
            return None
        return np.repeat(self._frame[:, :, None], 3, axis=2)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.memory:MemoryEnv")
