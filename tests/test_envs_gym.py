"""Any gymnasium env behind the vector-env contract: float and uint8 observations, same-step
autoreset, episode accounting, seeding and the error paths."""

import numpy as np
import pytest

from envs import make_vector_env
from envs.gym_vector import GymVectorEnv


def test_cartpole_float_observations() -> None:
    env = make_vector_env("gym", "CartPole-v1", 3, 0)
    obs = env.reset()
    assert (env.num_envs, env.num_actions, env.obs_shape) == (3, 2, (4,))
    assert env.obs_dtype == np.float32 and obs.dtype == np.float32 and obs.shape == (3, 4)
    result = env.step(np.zeros(3, dtype=np.int64))
    assert result.obs.dtype == np.float32 and result.reward.dtype == np.float32
    assert result.done.dtype == np.bool_ and result.episode_length.dtype == np.int32
    env.close()


def test_same_step_autoreset_and_episode_accounting() -> None:
    """Always pushing right ends CartPole in ~10 steps; the done row already holds the reset obs."""
    env = make_vector_env("gym", "CartPole-v1", 2, 7)
    env.reset()
    lengths = np.zeros(2, dtype=np.int64)
    ends = 0
    for _ in range(60):
        result = env.step(np.ones(2, dtype=np.int64))
        lengths += 1
        assert (result.done == result.episode_end).all()
        ended = result.episode_end
        # CartPole gives +1 per step: return == length; a reset state is within +-0.05.
        np.testing.assert_array_equal(result.episode_return[ended], lengths[ended])
        np.testing.assert_array_equal(result.episode_length[ended], lengths[ended])
        assert (np.abs(result.obs[ended]) <= 0.05).all()
        assert (result.episode_return[~ended] == 0).all()
        lengths[ended] = 0
        ends += int(ended.sum())
    assert ends >= 6


def test_seeding_is_reproducible_per_env() -> None:
    first = GymVectorEnv("CartPole-v1", 2, 3).reset()
    again = GymVectorEnv("CartPole-v1", 2, 3).reset()
    shifted = GymVectorEnv("CartPole-v1", 1, 4).reset()
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[1], shifted[0])  # env i is seeded seed + i
    assert not np.array_equal(first[0], first[1])


def test_uint8_images_stay_uint8_and_module_is_imported() -> None:
    env = make_vector_env(
        "gym",
        "deltabeast/Memory-v0",
        2,
        0,
        module="envs.memory",
        kwargs={"obs_shape": (1, 8, 8)},
    )
    assert env.obs_dtype == np.uint8 and env.reset().dtype == np.uint8
    assert env.obs_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("env_id", "options", "message"),
    [
        ("CartPol-v1", {}, "unknown gymnasium env id 'CartPol-v1'; closest valid: CartPole-v1"),
        ("Pendulum-v1", {}, "action space .*only Discrete is supported"),
        ("FrozenLake-v1", {}, "observation space .*only Box is supported"),
        ("CartPole-v1", {"module": "no_such_module"}, "cannot import env module 'no_such_module'"),
        ("CartPole-v1", {"kwargs": {"colour": 1}}, "bad kwargs .*'CartPole-v1'"),
        (
            "CartPole-v1",
            {"noop_max": 3},
            "unknown option 'noop_max' for env kind 'gym'; valid: kwargs",
        ),
    ],
)
def test_errors(env_id: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        make_vector_env("gym", env_id, 1, 0, **options)
    assert "\n" not in str(error.value)
