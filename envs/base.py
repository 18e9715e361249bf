"""The vector-env contract the runtime relies on, and the factory that builds one.

Every vector env steps ``E`` environments at once with same-step autoreset: the step on which an
episode ends already returns the first observation of the next one (DESIGN §2).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

KINDS = ("atari", "gym")


@dataclass
class StepResult:
    """What one vector step returns; every array has the env batch ``E`` as its first dim."""

    obs: np.ndarray  # [E,*obs_shape]; at a done row: the FIRST obs of the next episode
    reward: np.ndarray  # [E] float32 raw (unclipped) reward received on this step
    done: np.ndarray  # [E] bool: obs starts a new learning episode (a new life under life loss)
    episode_end: np.ndarray  # [E] bool: a full game ended on this step
    episode_return: np.ndarray  # [E] float32 full-game return, valid where episode_end
    episode_length: np.ndarray  # [E] int32 full-game length in agent steps, valid where episode_end


class VectorEnv(Protocol):
    """Structural type that every vector env (Atari, gymnasium, memory) implements."""

    num_envs: int
    num_actions: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype

    def reset(self, seed: int | None = None) -> np.ndarray: ...

    def step(self, actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


class EpisodeTracker:
    """Vectorised full-game return/length bookkeeping over ``num_envs`` rows (no Python loops)."""

    def __init__(self, num_envs: int) -> None:
        self._return = np.zeros(num_envs, dtype=np.float64)
        self._length = np.zeros(num_envs, dtype=np.int64)

    def reset(self) -> None:
        self._return[:] = 0.0
        self._length[:] = 0

    def update(self, reward: np.ndarray, ended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add one step; return (episode_return, episode_length), zero where not ``ended``."""
        self._return += reward
        self._length += 1
        episode_return = np.where(ended, self._return, 0.0).astype(np.float32)
        episode_length = np.where(ended, self._length, 0).astype(np.int32)
        self._return[ended] = 0.0
        self._length[ended] = 0
        return episode_return, episode_length


def unknown_choice(
    what: str, value: Any, choices: list[str] | tuple[str, ...], query: str | None = None
) -> ValueError:
    """One-line ValueError naming the bad value and the closest (or all) valid choices.

    ``query`` (default: ``value``) is the string matched against ``choices``.
    """
    names = [str(c) for c in choices]
    if len(names) <= 10:
        return ValueError(f"unknown {what} {value!r}; valid: {', '.join(names)}")
    query = str(value) if query is None else query
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    if close:
        return ValueError(f"unknown {what} {value!r}; closest valid: {', '.join(close)}")
    return ValueError(
        f"unknown {what} {value!r}; valid: {', '.join(names[:8])}, ... ({len(names)} in all)"
    )


def check_options(kind: str, options: dict[str, Any], valid: tuple[str, ...]) -> None:
    """Reject option names that the env kind does not know."""
    for key in options:
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} for env kind {kind!r}; valid: {', '.join(valid)}"
            )


def make_vector_env(
    kind: str,
    env_id: str,
    num_envs: int,
    seed: int,
    *,
    module: str | None = None,
    **options: Any,
) -> VectorEnv:
    """Build a vector env: ``kind`` "atari" (``env_id`` is a game) or "gym" (a gymnasium id)."""
    if kind not in KINDS:
        raise unknown_choice("env kind", kind, KINDS)
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    if kind == "atari":
        from envs.atari import ATARI_OPTIONS, AtariVectorEnv

        if module is not None:
            raise ValueError("option 'module' is only valid for env kind 'gym'")
        check_options(kind, options, ATARI_OPTIONS)
        return AtariVectorEnv(env_id, num_envs, seed, **options)
    from envs.gym_vector import GYM_OPTIONS, GymVectorEnv

    check_options(kind, options, GYM_OPTIONS)
    return GymVectorEnv(env_id, num_envs, seed, module=module, **options)
