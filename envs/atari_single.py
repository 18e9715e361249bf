"""One Atari env for evaluation and video, preprocessed exactly like the training vector env.

Built on ale-py's gymnasium ``AtariEnv`` (the env behind ``ALE/<Game>-v5``) with frameskip 1
and ``render_mode="rgb_array"``, so ``render()`` gives the raw RGB frame for video, plus
:class:`AtariPreprocess`, a numpy re-implementation of ale-py's C++ ``PreprocessedEnv``.
gymnasium's ``AtariPreprocessing`` + ``FrameStackObservation`` would not match the vector env: it
needs OpenCV, never presses FIRE on reset, draws its no-ops from another generator and over
another range, and pads the stack with the reset frame by default. This one reproduces, for the
same seed and actions, the vector env's observations, rewards and episode ends bit for bit
(tests/test_envs_atari.py checks it): the FIRE-then-no-ops reset driven by the same
``std::mt19937`` stream, sticky actions from the same ALE seed, the same max-pool, OpenCV's
``INTER_AREA`` arithmetic and the zero-padded stack.

A full game's return and length are in ``info["episode_return"]`` / ``info["episode_length"]`` on
the step that ends it. With ``episodic_life=True`` a lost life returns ``terminated=True`` and the
following ``reset()`` continues the game (like the vector env's ``done`` without ``episode_end``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from ale_py.env import AtariEnv

from envs.atari import canonical_game, check_atari_options

RAW_SHAPE = (210, 160)
OBS_SIZE = 84
STACK = 4


@functools.lru_cache(maxsize=8)
def area_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``INTER_AREA`` taps for ``src -> dst`` pixels: (index, float32 weight) [dst, K].

    Taps are in OpenCV's order; rows with fewer than K taps are padded with weight 0, which leaves
    float sums unchanged.
    """
    scale = src / dst
    rows: list[list[tuple[int, float]]] = []
    for d in range(dst):
        start = d * scale
        stop = start + scale
        cell = min(scale, src - start)
        last = min(math.floor(stop), src - 1)
        first = min(math.ceil(start), last)
        taps = []
        if first - start > 1e-3:
            taps.append((first - 1, (first - start) / cell))
        taps.extend((s, 1.0 / cell) for s in range(first, last))
        if stop - last > 1e-3:
            taps.append((last, min(stop - last, 1.0, cell) / cell))
        rows.append(taps)
    width = max(len(taps) for taps in rows)
    index = np.zeros((dst, width), dtype=np.intp)
    weight = np.zeros((dst, width), dtype=np.float32)
    for d, taps in enumerate(rows):
        for k, (s, w) in enumerate(taps):
            index[d, k] = s
            weight[d, k] = w
    return index, weight


def area_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 [H,W] frame as ``cv2.resize(..., INTER_AREA)`` does for shrinking."""
    x_index, x_weight = area_table(frame.shape[1], width)
    y_index, y_weight = area_table(frame.shape[0], height)
    taps = frame[:, x_index].astype(np.float32) * x_weight  # [H, width, Kx]
    rows = taps[:, :, 0].copy()
    for k in range(1, taps.shape[2]):
        rows += taps[:, :, k]
    taps = rows[y_index] * y_weight[:, :, None]  # [height, Ky, width]
    out = taps[:, 0].copy()
    for k in range(1, taps.shape[1]):
        out += taps[:, k]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class AtariPreprocess(gym.Wrapper):
    """Frameskip + max-pool, 84x84 gray, zero-padded stack of 4, FIRE and no-ops on reset."""

    def __init__(
        self,
        env: gym.Env,
        seed: int,
        *,
        episodic_life: bool = False,
        noop_max: int = 30,
        max_episode_frames: int = 108000,
        frameskip: int = 4,
    ) -> None:
        super().__init__(env)
        self.ale = env.unwrapped.ale
        self._rom = env.unwrapped._game
        self._action_set = env.unwrapped._action_set
        self._fire = ale_py.Action.FIRE in list(self._action_set)
        self._seed = seed
        self._noops = np.random.RandomState(seed)  # init_genrand(seed): the same as std::mt19937
        self.episodic_life = episodic_life
        self.noop_max = noop_max
        self.max_episode_frames = max_episode_frames
        self.frameskip = frameskip
        self.observation_space = gym.spaces.Box(0, 255, (STACK, OBS_SIZE, OBS_SIZE), np.uint8)
        self._raw = np.zeros((2, *RAW_SHAPE), dtype=np.uint8)
        self._stack = np.zeros((STACK, OBS_SIZE, OBS_SIZE), dtype=np.uint8)
        self._frames = 0
        self._lives = 0
        self._game_over = True
        self._return = 0.0
        self._length = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new game (seeded with the constructor's seed the first time), or, after a
        lost life under ``episodic_life``, go on with the same game."""
        if seed is None and self._seed is not None:
            seed, self._seed = self._seed, None
        if seed is None and not self._game_over:
            return self._stack.copy(), {"lives": self._lives}
        if seed is not None:
            self.ale.setInt("random_seed", seed)
            self.ale.loadROM(ale_py.roms.get_rom_path(self._rom))
            self._noops.seed(seed)
        self.ale.reset_game()
        if self._fire:
            self.ale.act(ale_py.Action.FIRE)
        for _ in range(self._noop_draw() - int(self._fire)):
            self.ale.act(ale_py.Action.NOOP)
            if self.ale.game_over(with_truncation=False):
                self.ale.reset_game()
        self._stack[:] = 0
        self.ale.getScreenGrayscale(self._raw[0])
        self._raw[1] = 0
        self._push_frame()
        self._frames = 0
        self._lives = self.ale.lives()
        self._game_over = False
        self._return = 0.0
        self._length = 0
        return self._stack.copy(), {"lives": self._lives}

    def _noop_draw(self) -> int:
        """libstdc++'s ``uniform_int_distribution(0, noop_max - 1)`` on the mt19937 stream."""
        span = max(self.noop_max, 1)
        product = int(self._noops.randint(0, 2**32, dtype=np.uint64)) * span
        if product % 2**32 < span:
            threshold = (2**32 - span) % span
            while product % 2**32 < threshold:
                product = int(self._noops.randint(0, 2**32, dtype=np.uint64)) * span
        return product >> 32

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        ale_action = self._action_set[int(action)]
        reward = 0
        game_over = False
        for skip in range(self.frameskip, 0, -1):
            reward += self.ale.act(ale_action)
            game_over = self.ale.game_over(with_truncation=False)
            self._frames += 1
            if game_over or self._frames >= self.max_episode_frames:
                self.ale.getScreenGrayscale(self._raw[0])
                break
            if skip <= 2:
                self.ale.getScreenGrayscale(self._raw[skip - 1])
        self._push_frame()
        truncated = self._frames >= self.max_episode_frames and not game_over
        lives = self.ale.lives()
        life_lost = self.episodic_life and lives < self._lives
        self._lives = lives
        self._game_over = game_over or truncated
        self._return += reward
        self._length += 1
        info: dict[str, Any] = {"lives": lives}
        if self._game_over:
            info["episode_return"] = self._return
            info["episode_length"] = self._length
        return self._stack.copy(), float(reward), game_over or life_lost, truncated, info

    def _push_frame(self) -> None:
        np.maximum(self._raw[0], self._raw[1], out=self._raw[0])
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = area_resize(self._raw[0], OBS_SIZE, OBS_SIZE)


def make_atari_env(
    game: str,
    seed: int,
    *,
    repeat_action_probability: float = 0.0,
    full_action_space: bool = False,
    episodic_life: bool = False,
    noop_max: int = 30,
    max_episode_frames: int = 108000,
    frameskip: int = 4,
) -> gym.Env:
    """A single preprocessed Atari env (obs [4,84,84] uint8) whose ``render()`` is the RGB frame."""
    check_atari_options(repeat_action_probability, noop_max, max_episode_frames, frameskip)
    rom = canonical_game(game)
    kwargs = {
        "frameskip": 1,
        "repeat_action_probability": repeat_action_probability,
        "full_action_space": full_action_space,
        "max_num_frames_per_episode": None,  # the wrapper truncates, counting like ale-py's C++
        "render_mode": "rgb_array",
    }
    env = AtariEnv(game=rom, **kwargs)  # what ALE/<Game>-v5 builds, without its wrappers
    return AtariPreprocess(
        env,
        seed,
        episodic_life=episodic_life,
        noop_max=noop_max,
        max_episode_frames=max_episode_frames,
        frameskip=frameskip,
    )
