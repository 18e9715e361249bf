"""Atari vector env: ale-py's C++ thread-pool ``AtariVectorEnv`` behind the ``VectorEnv`` contract.

Preprocessing (all in C++): frameskip with max-pool of the last two frames, 84x84 grayscale, a
stack of 4 frames that is zero-padded after a reset, up to ``noop_max`` no-ops and FIRE on reset,
sticky actions with ``repeat_action_probability``. Rewards come out raw (clipping is the
learner's job) and resets happen on the same step (``AutoresetMode.SAME_STEP``).

Life loss: ale-py's own ``episodic_life`` resets the whole game on every life loss (measured with
ale-py 0.12.1), so it is never passed on. With ``episodic_life=True`` this wrapper instead marks a
lost life as ``done`` while the game goes on, and keeps the full-game return and length, which it
reports through ``episode_end`` only when the game really ends. After a lost life no FIRE is
pressed for the agent: in games like Breakout it must launch the next ball itself.

ale-py details worth knowing: ``noop_max=N`` means FIRE (where the game has it) followed by
``U{0..N-1} - 1`` no-ops (``U{0..N-1}`` when there is no FIRE); ``max_episode_frames`` counts the
emulator frames stepped since the reset (the reset's no-ops not included).
"""

from __future__ import annotations

import functools
import re

import numpy as np
from ale_py import roms
from ale_py.vector_env import AtariVectorEnv as _AleVectorEnv
from gymnasium.vector import AutoresetMode

from envs.base import EpisodeTracker, StepResult, unknown_choice

ATARI_OPTIONS = (
    "num_threads",
    "repeat_action_probability",
    "full_action_space",
    "episodic_life",
    "noop_max",
    "max_episode_frames",
    "frameskip",
)

_GYM_ID = re.compile(r"^(?:ALE/)?(?P<name>.+?)(?:NoFrameskip|Deterministic)?(?:-ram)?(?:-v\d+)?$")


@functools.lru_cache(maxsize=1)
def _games_by_key() -> dict[str, str]:
    return {_key(game): game for game in roms.get_all_rom_ids()}


def _key(name: str) -> str:
    return re.sub(r"[_\-\s]", "", name).lower()


def canonical_game(name: str) -> str:
    """The ROM id of ``pong``, ``Pong``, ``PongNoFrameskip-v4``, ``ALE/Pong-v5``, ``MsPacman``."""
    match = _GYM_ID.match(name.strip()) if isinstance(name, str) else None
    game = _games_by_key().get(_key(match.group("name"))) if match else None
    if game is None:
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", match.group("name")).lower() if match else ""
        raise unknown_choice("Atari game", name, sorted(roms.get_all_rom_ids()), query=snake)
    return game


def check_atari_options(
    repeat_action_probability: float, noop_max: int, max_episode_frames: int, frameskip: int
) -> None:
    """Validate the numeric options shared by the vector and the single Atari env."""
    if not 0.0 <= repeat_action_probability <= 1.0:
        raise ValueError(
            f"repeat_action_probability must be in [0, 1], got {repeat_action_probability!r}"
        )
    if not isinstance(noop_max, int) or noop_max < 0:
        raise ValueError(f"noop_max must be an integer >= 0, got {noop_max!r}")
    if not isinstance(max_episode_frames, int) or max_episode_frames < 1:
        raise ValueError(f"max_episode_frames must be an integer >= 1, got {max_episode_frames!r}")
    if not isinstance(frameskip, int) or frameskip < 1:
        raise ValueError(f"frameskip must be an integer >= 1, got {frameskip!r}")


class AtariVectorEnv:
    """``num_envs`` Atari games stepped by ale-py's C++ threads; env ``i`` is seeded ``seed+i``."""

    def __init__(
        self,
        game: str,
        num_envs: int,
        seed: int,
        *,
        num_threads: int = 0,
        repeat_action_probability: float = 0.0,
        full_action_space: bool = False,
        episodic_life: bool = False,
        noop_max: int = 30,
        max_episode_frames: int = 108000,
        frameskip: int = 4,
    ) -> None:
        check_atari_options(repeat_action_probability, noop_max, max_episode_frames, frameskip)
        if not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0 (0: auto), got {num_threads!r}")
        self.game = canonical_game(game)
        self.num_envs = num_envs
        self.seed = seed
        self.episodic_life = episodic_life
        self._env = _AleVectorEnv(
            self.game,
            num_envs,
            num_threads=num_threads,
            max_num_frames_per_episode=max_episode_frames,
            repeat_action_probability=repeat_action_probability,
            full_action_space=full_action_space,
            autoreset_mode=AutoresetMode.SAME_STEP,
            frameskip=frameskip,
            noop_max=noop_max,
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=True,
        )
        self.num_actions = int(self._env.single_action_space.n)
        self.obs_shape = tuple(self._env.single_observation_space.shape)
        self.obs_dtype = np.dtype(np.uint8)
        self._episodes = EpisodeTracker(num_envs)
        self._lives = np.zeros(num_envs, dtype=np.int32)
        self._seeded = False

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start a new game in every env; the first reset uses the constructor's seed."""
        if seed is None and not self._seeded:
            seed = self.seed
        obs, info = self._env.reset(seed=seed)
        self._seeded = True
        self._lives[:] = info["lives"]
        self._episodes.reset()
        return obs

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with ``actions`` [E] (int64 indices into the game's action set)."""
        obs, reward, terminated, truncated, info = self._env.step(actions)
        reward = reward.astype(np.float32)
        episode_end = terminated | truncated
        lives = info["lives"]
        done = episode_end | (lives < self._lives) if self.episodic_life else episode_end
        self._lives[:] = lives
        episode_return, episode_length = self._episodes.update(reward, episode_end)
        return StepResult(obs, reward, done, episode_end, episode_return, episode_length)

    def close(self) -> None:
        self._env.close()
