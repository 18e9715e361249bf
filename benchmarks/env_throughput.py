"""Environment throughput: one JSON object per measurement on stdout.

Measures, per game: raw ``ALEInterface.act`` frames/s on one core (the emulator's own limit);
bare ale-py ``AtariVectorEnv`` and our ``envs.atari.AtariVectorEnv`` wrapper with the same
settings, alternating every few steps so that machine noise hits both alike (medians over
rounds, and the wrapper's overhead in percent); and the single eval env (``envs.atari_single``).
Random actions, sticky actions off; one agent step is ``frameskip`` (4) frames.

    flock /tmp/deltabeast-bench.lock .venv/bin/python benchmarks/env_throughput.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from ale_py.vector_env import AtariVectorEnv as BareAtariVectorEnv
from gymnasium.vector import AutoresetMode

from envs.atari import AtariVectorEnv
from envs.atari_single import make_atari_env

FRAMESKIP = 4
BLOCK = 10  # vector steps per turn when bare and wrapper alternate


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def timed(run: Callable[[], int]) -> float:
    """Units per second of ``run`` (which returns how many units it did)."""
    start = time.perf_counter()
    units = run()
    return units / (time.perf_counter() - start)


def raw_ale(game: str, frames: int) -> float:
    ale = ALEInterface()
    ale.setLoggerMode(LoggerMode.Error)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.setInt("random_seed", 0)
    ale.loadROM(roms.get_rom_path(game))
    action_set = ale.getMinimalActionSet()
    actions = [action_set[i] for i in np.random.default_rng(0).integers(0, len(action_set), frames)]

    def run() -> int:
        for action in actions:
            ale.act(action)
            if ale.game_over():
                ale.reset_game()
        return frames

    return timed(run)


def compare_vector(game: str, num_envs: int, threads: int, steps: int, repeats: int) -> None:
    """Bare ale-py env vs our wrapper, alternating every ``BLOCK`` steps so noise hits both."""
    bare = BareAtariVectorEnv(
        game,
        num_envs,
        num_threads=threads,
        autoreset_mode=AutoresetMode.SAME_STEP,
        reward_clipping=False,
        repeat_action_probability=0.0,
    )
    ours = AtariVectorEnv(game, num_envs, 0, num_threads=threads)
    bare.reset(seed=0)
    ours.reset()
    actions = np.random.default_rng(0).integers(0, ours.num_actions, (steps, num_envs))
    rates: dict[str, list[float]] = {"bare": [], "wrapper": []}
    for _ in range(repeats):
        seconds = {"bare": 0.0, "wrapper": 0.0}
        for start in range(0, steps, BLOCK):
            block = actions[start : start + BLOCK]
            for name, env in (("bare", bare), ("wrapper", ours)):
                begin = time.perf_counter()
                for action in block:
                    env.step(action)
                seconds[name] += time.perf_counter() - begin
        for name in rates:
            rates[name].append(steps * num_envs * FRAMESKIP / seconds[name])
    bare.close()
    ours.close()
    for name, runs in rates.items():
        emit(
            measure=f"vector_{name}",
            game=game,
            num_envs=num_envs,
            num_threads=threads,
            frames_per_s=round(statistics.median(runs)),
            runs=[round(r) for r in runs],
        )
    ratios = [w / b for w, b in zip(rates["wrapper"], rates["bare"], strict=True)]
    emit(
        measure="wrapper_overhead",
        game=game,
        num_envs=num_envs,
        num_threads=threads,
        percent=round(100 * (1 - statistics.median(ratios)), 2),
        runs=[round(100 * (1 - r), 2) for r in ratios],
    )


def single_env(game: str, steps: int) -> float:
    env = make_atari_env(game, 0)
    env.reset()
    actions = np.random.default_rng(0).integers(0, env.action_space.n, steps)

    def run() -> int:
        for action in actions:
            _, _, terminated, truncated, _ = env.step(int(action))
            if terminated or truncated:
                env.reset()
        return steps * FRAMESKIP

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", nargs="+", default=["pong", "breakout"])
    parser.add_argument("--num-envs", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds per vector measurement")
    parser.add_argument("--vector-frames", type=int, default=40_000, help="frames per round")
    parser.add_argument("--raw-frames", type=int, default=100_000)
    parser.add_argument("--single-steps", type=int, default=5_000)
    args = parser.parse_args()
    for game in args.games:
        raw = [raw_ale(game, args.raw_frames) for _ in range(3)]
        emit(measure="ale_raw_one_core", game=game, frames_per_s=round(statistics.median(raw)))
        for num_envs in args.num_envs:
            steps = max(1, args.vector_frames // (num_envs * FRAMESKIP))
            compare_vector(game, num_envs, args.threads, steps, args.repeats)
        single = [single_env(game, args.single_steps) for _ in range(3)]
        emit(measure="single_eval_env", game=game, frames_per_s=round(statistics.median(single)))


if __name__ == "__main__":
    main()
