"""The cue-recall memory task: layout of an episode, rewards, chance and perfect scores, options."""

import gymnasium as gym
import numpy as np
import pytest

from envs import make_vector_env
from envs.memory import CUE_VALUE, ENV_ID, QUERY_VALUE, MemoryEnv

SMALL = (1, 12, 12)


def test_registered_and_atari_shaped_by_default() -> None:
    env = gym.make(ENV_ID)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert env.action_space == gym.spaces.Discrete(2)
    assert (obs == obs[0]).all()  # every channel holds the current frame
    assert set(np.unique(obs)) == {0, CUE_VALUE}


@pytest.mark.parametrize("delay", [0, 1, 5])
def test_episode_layout(delay: int) -> None:
    env = MemoryEnv(num_cues=3, delay=delay, obs_shape=SMALL)
    obs, info = env.reset(seed=1)
    cue = info["cue"]
    assert obs[0].any() and (obs <= CUE_VALUE).all() and not (obs == QUERY_VALUE).any()
    for _ in range(delay):
        obs, reward, terminated, truncated, _ = env.step((cue + 1) % 3)  # ignored: wrong on purpose
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert not obs.any()  # blank without noise
    obs, reward, terminated, _, _ = env.step(0)
    assert (obs == QUERY_VALUE).all() and (reward, terminated) == (0.0, False)
    _, reward, terminated, _, _ = env.step(cue)
    assert (reward, terminated) == (1.0, True)  # delay + 2 steps in all


def test_wrong_answer_costs_one() -> None:
    env = MemoryEnv(num_cues=2, delay=0, obs_shape=SMALL)
    _, info = env.reset(seed=3)
    env.step(0)
    _, reward, terminated, _, _ = env.step(1 - info["cue"])
    assert (reward, terminated) == (-1.0, True)


def test_cues_are_distinct_and_shared_by_all_envs() -> None:
    patterns = {}
    for seed in range(40):
        env = MemoryEnv(num_cues=4, delay=0, obs_shape=SMALL)
        obs, info = env.reset(seed=seed)
        patterns.setdefault(info["cue"], obs.tobytes())
        assert patterns[info["cue"]] == obs.tobytes()
    assert len(set(patterns.values())) == 4


def run_vector(policy: str, episodes: int, num_cues: int = 2, delay: int = 3) -> np.ndarray:
    """Returns of ``episodes`` episodes under a memoryless random or a perfect-memory policy."""
    env = make_vector_env(
        "gym", ENV_ID, 16, 0, kwargs={"num_cues": num_cues, "delay": delay, "obs_shape": SMALL}
    )
    obs = env.reset()
    patterns = MemoryEnv(num_cues=num_cues, obs_shape=SMALL)._patterns
    rng = np.random.default_rng(0)
    remembered = np.zeros(16, dtype=np.int64)
    returns, lengths = [], []
    while len(returns) < episodes:
        is_cue = (obs[:, 0, None] == patterns).all(axis=(2, 3))  # [E, num_cues]
        remembered = np.where(is_cue.any(axis=1), is_cue.argmax(axis=1), remembered)
        actions = remembered if policy == "perfect" else rng.integers(0, num_cues, 16)
        result = env.step(actions)
        obs = result.obs
        returns.extend(result.episode_return[result.episode_end])
        lengths.extend(result.episode_length[result.episode_end])
    assert set(lengths) == {delay + 2}
    return np.array(returns)


def test_perfect_memory_scores_one() -> None:
    returns = run_vector("perfect", 200, num_cues=3)
    assert (returns == 1.0).all()


def test_memoryless_policy_scores_chance() -> None:
    returns = run_vector("random", 2000)
    assert set(returns) == {-1.0, 1.0}
    assert abs(returns.mean()) < 0.1  # chance is 0 for two cues; std of the mean is ~0.022


def test_noise_fills_the_delay_frames() -> None:
    env = MemoryEnv(delay=200, noise=0.3, obs_shape=(2, 12, 12))
    env.reset(seed=0)
    frames = np.stack([env.step(0)[0] for _ in range(200)])
    assert set(np.unique(frames)) == {0, CUE_VALUE}
    assert abs((frames == CUE_VALUE).mean() - 0.3) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_cues": 1}, "num_cues must be"),
        ({"delay": -1}, "delay must be"),
        ({"noise": 1.5}, "noise must be in"),
        ({"obs_shape": (84, 84)}, "obs_shape must be 3 positive integers"),
        ({"num_cues": 5, "obs_shape": (1, 1, 2)}, "too small for 5 distinct cue patterns"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryEnv(**kwargs)
