"""evaluate.py: reports and their statistics, noneg, step choice, videos, periodic runs, bad input.

The scripted env below makes every episode's rewards independent of the actions, so the
expected episodes of a seed can be replayed without the agent and compared exactly.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
from runners.checkpoint import load_checkpoint, save_checkpoint
from runners.config import build_config
from runners.evaluation import find_checkpoint, spawn_periodic_evaluation, t_quantile_975
from runners.human_scores import REFERENCE_SCORES, human_normalized
from runners.trainer import Trainer
from tests.test_video import read_mp4

ROOT = Path(__file__).resolve().parent.parent
SIGNED_ID = "deltabeast-test/Signed-v0"
FIELDS = {"steps", "game", "core", "episodes", "mean", "std", "median", "min", "max", "ci95"}
FIELDS |= {"hns", "protocol"}


class SignedEnv(gym.Env):
    """Episode of 2-5 steps: reward -1 or +1 on the first step, +2..+5 on the last, else 0.

    The running return is negative after the first step with probability ``negative_prob``,
    yet every final return is positive: noneg must look at the running return.
    """

    def __init__(self, negative_prob: float = 0.5) -> None:
        self.negative_prob = negative_prob
        self.observation_space = gym.spaces.Box(0, 255, (1, 4, 4), np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.first = -1.0 if self.np_random.random() < self.negative_prob else 1.0
        self.final = float(self.np_random.integers(2, 6))
        self.length = int(self.np_random.integers(2, 6))
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = self.first if self.t == 1 else self.final if self.t == self.length else 0.0
        return self._obs(), reward, self.t >= self.length, False, {}

    def _obs(self) -> np.ndarray:
        return np.full((1, 4, 4), self.t * 10, dtype=np.uint8)


if SIGNED_ID not in gym.registry:
    gym.register(SIGNED_ID, entry_point=SignedEnv)


def expected_episodes(seed: int, quotas: list[int], noneg: bool = False, negative_prob=0.5):
    """What env i (seeded seed+i, reset after each episode) yields: returns, lengths, discarded."""
    returns, lengths, discarded = [], [], 0
    for i, quota in enumerate(quotas):
        env = SignedEnv(negative_prob)
        env.reset(seed=seed + i)
        kept = 0
        while kept < quota:
            if noneg and env.first < 0:
                discarded += 1
            else:
                returns.append(env.first + env.final)
                lengths.append(env.length)
                kept += 1
            env.reset()
    return returns, lengths, discarded


SMALL_CORE = [
    "agent.core=delta",
    "core.num_layers=1",
    "core.num_heads=2",
    "core.head_dim=4",
    "core.hidden_size=16",
    "core.ff_size=16",
    "env.num_envs=2",
    "learner.batch_size=2",
    "runtime.num_actors=1",
]
SIGNED = [
    "env.kind=gym",
    f"env.id={SIGNED_ID}",
    "env.module=tests.test_evaluate",
    "env.kwargs.negative_prob=0.5",
    "agent.torso=mlp",
]


def make_run(run_dir: Path, overrides: list[str], steps: tuple[int, ...] = (0,)) -> Path:
    """A run folder with a freshly initialised agent saved by the Trainer at each of `steps`."""
    trainer = Trainer(build_config(None, [*overrides, f"run.dir={run_dir}"]))
    for step in steps:
        trainer.learner.steps = step
        trainer.save()
    return run_dir


@pytest.fixture(scope="module")
def pong_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("pong") / "run", ["env.id=pong", *SMALL_CORE])


@pytest.fixture
def signed_run(tmp_path) -> Path:
    return make_run(tmp_path / "signed", [*SIGNED, *SMALL_CORE])


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_eval(args: list[str]) -> int:
    """evaluate.py in this process, on one torch thread (small batches: more threads only wait)."""
    return evaluate.main([*args, "--threads", "1"])


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    )


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    scalars["images"] = events.Tags()["images"]
    return scalars


def test_report_statistics_match_the_episodes(signed_run, capsys):
    args = [str(signed_run), "--episodes", "7", "--num-envs", "3", "--seed", "5"]
    assert run_eval(args) == 0
    report = json.loads((signed_run / "eval" / "000000000000.json").read_text())
    assert set(report) == FIELDS
    returns, lengths, _ = expected_episodes(5, [3, 2, 2])
    assert report["episodes"] == [
        {"return": r, "length": n} for r, n in zip(returns, lengths, strict=True)
    ]
    assert len(set(returns)) > 2  # the statistics below are not trivially equal
    n = len(returns)
    mean = sum(returns) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (n - 1))
    ordered = sorted(returns)
    assert report["steps"] == 0 and report["game"] == SIGNED_ID and report["core"] == "delta"
    assert report["mean"] == pytest.approx(mean)
    assert report["std"] == pytest.approx(std)
    assert report["median"] == ordered[n // 2]
    assert (report["min"], report["max"]) == (ordered[0], ordered[-1])
    assert report["ci95"] == pytest.approx(2.447 * std / math.sqrt(n), rel=1e-3)  # t(0.975, 6)
    assert report["hns"] is None  # no reference scores outside Atari
    with open(signed_run / "eval" / "000000000000.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["episode", "return", "length"]
    assert [(int(i), float(r), int(n)) for i, r, n in rows[1:]] == [
        (i, r, n) for i, (r, n) in enumerate(zip(returns, lengths, strict=True))
    ]
    out = capsys.readouterr().out
    assert f"mean {mean:.2f} ± {report['ci95']:.2f}" in out
    scalars = tb_scalars(signed_run)
    assert scalars["eval/mean"] == [(0, pytest.approx(mean))]
    assert scalars["eval/max"] == [(0, ordered[-1])]


def test_same_seed_same_episodes_other_seed_others(signed_run):
    reports = []
    for seed in ("3", "3", "4"):
        assert run_eval([str(signed_run), "--episodes", "4", "--seed", seed]) == 0
        reports.append(json.loads((signed_run / "eval" / "000000000000.json").read_text()))
    assert reports[0]["episodes"] == reports[1]["episodes"] != reports[2]["episodes"]


def test_noneg_discards_episodes_whose_running_return_went_negative(signed_run):
    args = [str(signed_run), "--episodes", "6", "--num-envs", "2", "--seed", "11", "--noneg"]
    assert run_eval(args) == 0
    report = json.loads((signed_run / "eval" / "000000000000.json").read_text())
    returns, lengths, discarded = expected_episodes(11, [3, 3], noneg=True)
    assert discarded > 0  # those episodes all ended with a positive return
    assert report["protocol"]["discarded"] == discarded
    assert [e["return"] for e in report["episodes"]] == returns
    assert [e["length"] for e in report["episodes"]] == lengths


def test_noneg_gives_up_at_its_limit_and_writes_nothing(signed_run, capsys):
    before = snapshot(signed_run)
    args = [str(signed_run), "--episodes", "2", "--noneg", "env.kwargs.negative_prob=1.0"]
    assert run_eval(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "all 20 went negative" in err
    assert snapshot(signed_run) == before


def test_step_choice_latest_best_number_and_file(tmp_path, capsys):
    run = make_run(tmp_path / "run", [*SIGNED, *SMALL_CORE], steps=(0, 100, 200))
    ckpts = run / "checkpoints"
    (run / "eval").mkdir()
    for step, mean in ((100, 5.0), (200, 1.0), (300, 99.0)):  # no checkpoint at 300 any more
        (run / "eval" / f"{step:012d}.json").write_text(json.dumps({"steps": step, "mean": mean}))
    assert find_checkpoint(run) == (run, ckpts / "ckpt_000000000200.pt")
    assert find_checkpoint(run, "best") == (run, ckpts / "ckpt_000000000100.pt")
    assert find_checkpoint(run, "0") == (run, ckpts / "ckpt_000000000000.pt")
    assert find_checkpoint(ckpts) == (run, ckpts / "ckpt_000000000200.pt")
    assert find_checkpoint(ckpts / "ckpt_000000000000.pt")[0] == run
    (ckpts / "milestones").mkdir()
    (ckpts / "ckpt_000000000100.pt").rename(ckpts / "milestones" / "ckpt_000000000100.pt")
    assert find_checkpoint(run, "best") == (run, ckpts / "milestones" / "ckpt_000000000100.pt")
    assert find_checkpoint(ckpts / "milestones" / "ckpt_000000000100.pt")[0] == run
    assert run_eval([str(run), "--step", "best", "--episodes", "2"]) == 0
    assert json.loads((run / "eval" / "000000000100.json").read_text())["steps"] == 100
    assert "steps 100" in capsys.readouterr().out


def test_pong_fresh_agent_report_tensorboard_and_overlay_video(pong_run):
    """The real CLI on a real game: 3 games capped at 200 frames (50 agent steps)."""
    command = [sys.executable, "evaluate.py", str(pong_run), "--episodes", "3", "--num-envs"]
    command += ["3", "--max-frames", "200", "--video", "--overlay", "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((pong_run / "eval" / "000000000000.json").read_text())
    assert set(report) == FIELDS
    assert report["game"] == "pong" and report["core"] == "delta"
    returns = [e["return"] for e in report["episodes"]]
    assert [e["length"] for e in report["episodes"]] == [50, 50, 50]
    assert all(r == int(r) and -21 <= r <= 21 for r in returns)
    assert report["mean"] == pytest.approx(np.mean(returns))
    assert report["std"] == pytest.approx(np.std(returns, ddof=1))
    assert report["hns"] == pytest.approx((np.mean(returns) + 20.7) / (14.6 + 20.7))
    assert report["protocol"]["max_frames"] == 200
    size, fps, frames = read_mp4(pong_run / "videos" / "000000000000_ep0.mp4")
    assert size == (320 + 320, 420) and fps == 15.0  # 2x the 160x210 frame, plus the panel
    assert len(frames) == 51  # the first frame and one per agent step
    panel = frames[-1][:, 320:]
    assert panel.mean() < 100 and np.ptp(panel) > 100  # dark panel with bars and heat maps
    scalars = tb_scalars(pong_run)
    assert scalars["eval/mean"] == [(0, pytest.approx(report["mean"]))]
    assert scalars["images"] == ["eval/video"]


def test_plain_videos_one_per_episode(pong_run, capsys):
    args = [str(pong_run), "--episodes", "1", "--max-frames", "80", "--video", "2", "--seed", "1"]
    assert run_eval(args) == 0
    for k in range(2):
        size, _, frames = read_mp4(pong_run / "videos" / f"000000000000_ep{k}.mp4")
        assert size == (320, 420) and len(frames) == 21
        assert np.array_equal(frames[0][::2, ::2].shape, (210, 160, 3))
    assert "21 frames" in capsys.readouterr().out


def test_per_life_ends_episodes_at_a_lost_life(tmp_path):
    run = make_run(tmp_path / "breakout", ["env.id=breakout", *SMALL_CORE])
    lengths = {}
    for mode in ([], ["--per-life"]):
        args = [str(run), "--episodes", "1", "--sample", "--max-frames", "2000", *mode]
        assert run_eval(args) == 0
        report = json.loads((run / "eval" / "000000000000.json").read_text())
        lengths[bool(mode)] = report["episodes"][0]["length"]
    # the same seeded actions up to the first lost life: the full game goes on after it
    assert lengths[True] < lengths[False] <= 500


def test_periodic_evaluation_runs_beside_the_caller(signed_run):
    ckpt = signed_run / "checkpoints" / "ckpt_000000000000.pt"
    proc = spawn_periodic_evaluation(signed_run, ckpt, step=0, episodes=3, video=False)
    assert proc.wait(timeout=120) == 0, signed_run / "eval" / "periodic_000000000000.log"
    report = json.loads((signed_run / "eval" / "000000000000.json").read_text())
    assert len(report["episodes"]) == 3
    log = (signed_run / "eval" / "periodic_000000000000.log").read_text()
    assert "mean" in log


def _corrupt(run: Path) -> list[str]:
    path = run / "checkpoints" / "ckpt_000000000000.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return [str(path)]


def _garbage(run: Path) -> list[str]:
    path = run / "checkpoints" / "ckpt_000000000007.pt"
    path.write_bytes(b"not a checkpoint at all")
    return [str(path)]


def _other_core_weights(run: Path) -> list[str]:
    """A checkpoint whose config says delta but whose weights are an lstm agent's."""
    path = run / "checkpoints" / "ckpt_000000000000.pt"
    payload = load_checkpoint(path)
    other = Trainer(build_config(None, [*SIGNED, *SMALL_CORE, "agent.core=lstm"]))
    payload["agent"] = other.agent.state_dict()
    save_checkpoint(path, payload)
    return [str(run)]


def _empty_checkpoints(run: Path) -> list[str]:
    (run / "checkpoints" / "ckpt_000000000000.pt").unlink()
    return [str(run)]


BAD_INPUT = {
    "missing path": (lambda run: [str(run / "nope")], "no run folder or checkpoint"),
    "not a run": (lambda run: [str(run.parent)], "not a run folder"),
    "no checkpoints": (_empty_checkpoints, "no checkpoints in"),
    "missing step": (lambda run: [str(run), "--step", "123"], "no checkpoint at step 123"),
    "step of a file": (
        lambda run: [str(run / "checkpoints" / "ckpt_000000000000.pt"), "--step", "best"],
        "applies to a run folder",
    ),
    "bad step": (lambda run: [str(run), "--step", "first"], "--step must be"),
    "corrupt": (_corrupt, "checksum mismatch"),
    "not a checkpoint": (_garbage, "not a deltabeast checkpoint"),
    "other core checkpoint": (_other_core_weights, "another agent"),
    "unknown key": (lambda run: [str(run), "env.idd=pong"], "unknown config key"),
    "unknown game": (
        lambda run: [str(run), "env.kind=atari", "env.id=pongg", "agent.torso=nature"],
        "unknown Atari game",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_exit_2_nothing_written(signed_run, capsys, case):
    make_args, message = BAD_INPUT[case]
    args = make_args(signed_run)
    before = snapshot(signed_run)
    assert run_eval([*args, "--episodes", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.err.startswith("evaluate.py: error: ")
    assert snapshot(signed_run) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("env.id=breakout", "trained on pong with 6 actions, but breakout has 4"),
        ("agent.core=lstm", "another agent (trained with core delta) than agent.core=lstm"),
    ],
)
def test_pong_checkpoint_on_another_game_or_core(pong_run, capsys, override, message):
    before = snapshot(pong_run)
    assert run_eval([str(pong_run), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert snapshot(pong_run) == before


@pytest.mark.parametrize(
    "args", [["--episodes", "0"], ["--video", "-3"], ["--seed", "-1"], ["--step"]]
)
def test_bad_arguments_are_one_line_usage_errors(signed_run, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        run_eval([str(signed_run), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_video_count_is_optional_before_a_run_or_an_override():
    args = evaluate.parse_eval_args(["run", "a.b=1", "--video", "a.b=2", "--episodes", "3"])
    assert (args.target, args.video, args.overrides) == ("run", 1, ["a.b=1", "a.b=2"])
    args = evaluate.parse_eval_args(["--video", "run", "seed=2"])
    assert (args.target, args.video, args.overrides) == ("run", 1, ["seed=2"])
    assert evaluate.parse_eval_args(["run", "--video", "3", "seed=2"]).video == 3
    assert evaluate.parse_eval_args(["run", "--video"]).video == 1
    assert evaluate.parse_eval_args(["run"]).video == 0


def test_t_quantile_matches_the_table():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 6: 2.447, 9: 2.262, 10: 2.228, 29: 2.045, 30: 2.042}
    for df, value in table.items():
        assert t_quantile_975(df) == pytest.approx(value, abs=1e-3)
    assert t_quantile_975(10_000) == pytest.approx(1.960, abs=1e-3)


def test_reference_scores_cover_the_57_games():
    from ale_py import roms

    assert len(REFERENCE_SCORES) == 57
    assert set(REFERENCE_SCORES) <= set(roms.get_all_rom_ids())
    assert all(human > random for random, human in REFERENCE_SCORES.values())
    assert human_normalized("pong", -20.7) == 0.0
    assert human_normalized("pong", 14.6) == pytest.approx(1.0)
    assert human_normalized("breakout", 30.5) == pytest.approx(1.0)
    assert human_normalized("tetris", 10.0) is None


def test_single_episode_has_no_spread(signed_run):
    assert run_eval([str(signed_run), "--episodes", "1"]) == 0
    report = json.loads((signed_run / "eval" / "000000000000.json").read_text())
    assert report["std"] is None and report["ci95"] is None
    assert report["mean"] == report["median"] == report["min"] == report["max"]


def test_missing_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--episodes", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a run folder or a checkpoint" in err
