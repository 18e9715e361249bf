"""Atari vector env and single eval env: shapes, same-step autoreset, raw rewards, life loss,
equivalence of the two, and game-name handling."""

import numpy as np
import pytest

from envs import make_vector_env
from envs.atari import AtariVectorEnv, canonical_game
from envs.atari_single import area_table, make_atari_env


def random_actions(seed: int, num_actions: int, steps: int, num_envs: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_actions, (steps, num_envs))


def zero_padded(stack: np.ndarray) -> bool:
    """The stack right after a reset: three blank frames, then a real one."""
    return not stack[:3].any() and stack[3].any()


def test_shapes_and_dtypes() -> None:
    env = make_vector_env("atari", "ALE/Breakout-v5", 3, 0, num_threads=1)
    obs = env.reset()
    assert (env.num_envs, env.num_actions, env.obs_shape) == (3, 4, (4, 84, 84))
    assert env.obs_dtype == np.uint8
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == np.uint8
    assert all(zero_padded(o) for o in obs)
    result = env.step(np.zeros(3, dtype=np.int64))
    assert result.obs.shape == (3, 4, 84, 84) and result.obs.dtype == np.uint8
    for name, dtype in [("reward", np.float32), ("done", np.bool_), ("episode_end", np.bool_)]:
        array = getattr(result, name)
        assert array.shape == (3,) and array.dtype == dtype, name
    assert result.episode_return.dtype == np.float32
    assert result.episode_length.dtype == np.int32
    env.close()


def test_num_actions_come_from_the_game() -> None:
    assert AtariVectorEnv("pong", 1, 0, num_threads=1).num_actions == 6
    assert AtariVectorEnv("pong", 1, 0, num_threads=1, full_action_space=True).num_actions == 18


def test_same_step_autoreset_returns_first_obs_of_next_episode() -> None:
    # 40 frames = 10 agent steps per episode; no no-ops, so every reset looks the same.
    env = AtariVectorEnv("breakout", 2, 0, num_threads=1, noop_max=0, max_episode_frames=40)
    first = env.reset()
    actions = random_actions(0, env.num_actions, 25, 2)
    ends = []
    for t, action in enumerate(actions, start=1):
        result = env.step(action)
        if result.done.any():
            assert result.done.all() and result.episode_end.all()
            assert (result.episode_length == 10).all()
            np.testing.assert_array_equal(result.obs, first)
            ends.append(t)
        else:
            assert not any(zero_padded(o) for o in result.obs)
    assert ends == [10, 20]


def test_rewards_are_raw_not_clipped() -> None:
    env = AtariVectorEnv("space_invaders", 1, 0, num_threads=1)
    env.reset()
    rewards = [env.step(a).reward[0] for a in random_actions(0, env.num_actions, 130)]
    assert max(rewards) > 1 and set(rewards) <= {0, 5, 10, 15, 20, 25, 30}


def play_breakout_game(episodic_life: bool) -> list:
    env = AtariVectorEnv("breakout", 1, 1, num_threads=1, episodic_life=episodic_life)
    env.reset()
    steps = []
    for action in random_actions(1, env.num_actions, 300):
        steps.append(env.step(action))
        if steps[-1].episode_end[0]:
            return steps
    raise AssertionError("the scripted Breakout game did not end in 300 steps")


def test_life_loss_ends_learning_episodes_but_not_the_game() -> None:
    with_lives = play_breakout_game(episodic_life=True)
    without = play_breakout_game(episodic_life=False)
    # The flag changes no emulation: the same frames, rewards and game end.
    assert len(with_lives) == len(without)
    for a, b in zip(with_lives, without, strict=True):
        np.testing.assert_array_equal(a.obs, b.obs)
        assert a.reward[0] == b.reward[0] and a.episode_end[0] == b.episode_end[0]
    assert sum(s.done[0] for s in without) == 1

    dones = [t for t, s in enumerate(with_lives) if s.done[0]]
    assert len(dones) == 5 and dones[-1] == len(with_lives) - 1  # 5 lives, the last at game over
    assert sum(s.episode_end[0] for s in with_lives) == 1
    for t in dones[:-1]:  # the game goes on after a lost life: no reset, no zero padding
        assert not zero_padded(with_lives[t].obs[0]) and with_lives[t].obs[0].any(axis=(1, 2)).all()
    assert zero_padded(with_lives[-1].obs[0])

    life_returns = np.split(np.array([s.reward[0] for s in with_lives]), np.array(dones[:-1]) + 1)
    life_returns = [float(r.sum()) for r in life_returns]
    assert sum(r > 0 for r in life_returns) >= 2  # points scored in more than one life
    end = with_lives[-1]
    assert end.episode_return[0] == sum(life_returns) == without[-1].episode_return[0]
    assert end.episode_length[0] == len(with_lives) == without[-1].episode_length[0]


@pytest.mark.parametrize(
    ("game", "options"),
    [
        ("breakout", {"noop_max": 0, "max_episode_frames": 600}),
        ("pong", {"repeat_action_probability": 0.25, "max_episode_frames": 400}),
        ("breakout", {"episodic_life": True}),
    ],
)
def test_single_env_matches_vector_env(game: str, options: dict) -> None:
    """Same seed, same actions: identical observations, rewards and dones (row 1 is seed+1)."""
    vector = AtariVectorEnv(game, 2, 4, num_threads=1, **options)
    single = make_atari_env(game, 5, **options)
    vector_obs = vector.reset()
    obs, _ = single.reset()
    np.testing.assert_array_equal(obs, vector_obs[1])
    ends = dones = 0
    for action in random_actions(2, vector.num_actions, 500, 2):
        result = vector.step(action)
        obs, reward, terminated, truncated, info = single.step(int(action[1]))
        assert reward == result.reward[1]
        assert (terminated or truncated) == result.done[1]
        assert ("episode_return" in info) == result.episode_end[1]
        if "episode_return" in info:
            assert info["episode_return"] == result.episode_return[1]
            assert info["episode_length"] == result.episode_length[1]
            ends += 1
        if terminated or truncated:
            obs, _ = single.reset()
            dones += 1
        np.testing.assert_array_equal(obs, result.obs[1])
    assert ends >= 1 and dones >= 2
    frame = single.render()
    assert frame.shape == (210, 160, 3) and frame.dtype == np.uint8


def test_area_resize_taps_are_normalised() -> None:
    index, weight = area_table(210, 84)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0, rtol=1e-6)
    assert index.min() == 0 and index.max() == 209


@pytest.mark.parametrize(
    "name", ["pong", "Pong", "PongNoFrameskip-v4", "ALE/Pong-v5", "PongDeterministic-v4"]
)
def test_game_name_forms(name: str) -> None:
    assert canonical_game(name) == "pong"


@pytest.mark.parametrize(
    "name", ["ms_pacman", "MsPacman", "ALE/MsPacman-v5", "MsPacmanNoFrameskip-v4"]
)
def test_snake_case_games(name: str) -> None:
    assert canonical_game(name) == "ms_pacman"


def test_unknown_game_lists_close_names() -> None:
    with pytest.raises(ValueError, match="closest valid: breakout") as error:
        canonical_game("Breakot")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="space_invaders"):
        make_atari_env("SpaceInvader", 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sticky": 0.25}, "unknown option 'sticky'.*repeat_action_probability"),
        ({"repeat_action_probability": 1.5}, "repeat_action_probability must be in"),
        ({"noop_max": -1}, "noop_max must be"),
        ({"frameskip": 0}, "frameskip must be"),
        ({"module": "x"}, "only valid for env kind 'gym'"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_vector_env("atari", "pong", 1, 0, **options)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown env kind 'mujoco'; valid: atari, gym"):
        make_vector_env("mujoco", "pong", 1, 0)
