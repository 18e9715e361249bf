"""Evaluation of saved checkpoints (evaluate.py): pick a checkpoint, rebuild the run's agent, play
seeded episodes, summarise, write the report, record videos, and run it beside training.

Episodes. ``episodes`` games are spread over ``E = min(num_envs, episodes)`` parallel envs with a
fixed quota per env (env i plays ``episodes // E`` games, one more for the first
``episodes % E``), so the sample is not biased towards short games the way "the first N games to
finish" would be. Env i is seeded ``seed + i``; with the Atari single env built with the same
seed, video k replays env k's first game. A game is the full game (every life) unless
``per_life``, where each life is an episode, as in the official code's protocol. ``noneg`` (the
paper's protocol for BattleZone / UpNDown) discards an episode whose running return ever goes
below zero and plays on until ``episodes`` are kept, at most ``noneg_limit * episodes`` in all.

Reports (DESIGN §8): ``<run>/eval/<steps, 12 digits>.json`` and ``.csv``, ``eval/*`` scalars in
``<run>/tb``. ``std`` is the sample standard deviation (n-1) and ``ci95`` the half-width of the
Student-t 95% confidence interval of the mean, both null for a single episode.

User errors (missing run or checkpoint, corrupt file, another game's or core's checkpoint, bad
override) raise :class:`EvalError` with one line, before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents import ActorCritic
from agents.cores import FWPCore
from envs.video import (
    FrameSampler,
    Mp4Writer,
    PanelInfo,
    encode_gif,
    render_panel,
    side_by_side,
    upscale,
    upscale_factor,
)
from runners.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from runners.config import (
    Config,
    ConfigError,
    apply,
    check_environment,
    from_dict,
    parse_override,
    validate,
)
from runners.factory import make_agent, make_env
from runners.human_scores import human_normalized

ROOT = Path(__file__).resolve().parent.parent
STEP_DIGITS = 12
ATARI_FPS = 60.0  # emulator frames per second; a video plays at ATARI_FPS / frameskip
FRAMESKIP = 4
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
_EVAL_RE = re.compile(r"^(\d+)\.json$")
_PAYLOAD_KEYS = ("steps", "config", "agent", "num_actions")


class EvalError(Exception):
    """Bad user input for an evaluation; the message is one line (the CLI exits with code 2)."""


class NoEpisodesError(Exception):
    """noneg discarded every episode it was allowed to play (the CLI exits with code 1)."""


@dataclass
class Protocol:
    """How the episodes are played."""

    episodes: int = 10
    greedy: bool = True
    per_life: bool = False
    noneg: bool = False
    noneg_limit: int = 10  # noneg plays at most this many times `episodes` in all
    num_envs: int = 16
    max_frames: int = 108_000
    seed: int | None = None  # None: the run's seed + 10000 (not the training envs' seeds)

    def __post_init__(self) -> None:
        for name in ("episodes", "noneg_limit", "num_envs", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise EvalError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class Loaded:
    """A checkpoint ready to evaluate: its run folder, config (with overrides) and agent."""

    run_dir: Path
    checkpoint: Path
    steps: int
    cfg: Config
    agent: ActorCritic
    device: torch.device
    game: str  # the Atari ROM id, or the gymnasium id
    seed: int


@dataclass
class Episodes:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    discarded: int = 0


# ---------------------------------------------------------------- choosing the checkpoint


def _step_of(path: Path) -> int:
    return int(_CKPT_RE.match(path.name).group(1))


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to (its own folder when outside a run)."""
    parent = checkpoint.parent
    if parent.name == "milestones" and parent.parent.name == "checkpoints":
        return parent.parent.parent
    return parent.parent if parent.name == "checkpoints" else parent


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    """Every checkpoint of a run by step; a regular file wins over its milestone copy."""
    manager = CheckpointManager(run_dir / "checkpoints")
    found = {_step_of(p): p for p in manager.list_milestones()}
    found.update({_step_of(p): p for p in manager.list()})
    return dict(sorted(found.items()))


def evaluated_means(run_dir: Path) -> dict[int, float]:
    """Mean return of each report in ``<run>/eval`` by step (unreadable ones skipped)."""
    means: dict[int, float] = {}
    folder = run_dir / "eval"
    if not folder.is_dir():
        return means
    for path in folder.iterdir():
        if not _EVAL_RE.match(path.name):
            continue
        try:
            report = json.loads(path.read_text())
            means[int(report["steps"])] = float(report["mean"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return means


def find_checkpoint(target: Path, step: str = "latest") -> tuple[Path, Path]:
    """(run folder, checkpoint file) for a run folder or checkpoint path and a step choice.

    ``step``: ``latest``; ``best`` (the highest eval mean among existing checkpoints, else the
    latest); or an agent-step count that has a checkpoint.
    """
    target = Path(target)
    if not target.exists():
        raise EvalError(f"no run folder or checkpoint at {target}")
    if target.is_file():
        if step != "latest":
            raise EvalError(f"--step {step} applies to a run folder, not a checkpoint file")
        return run_dir_of(target), target
    run_dir = target.parent if target.name == "checkpoints" else target
    if not (run_dir / "checkpoints").is_dir():
        raise EvalError(f"{run_dir} is not a run folder: it has no checkpoints/ folder")
    available = _checkpoints(run_dir)
    if not available:
        raise EvalError(f"no checkpoints in {run_dir / 'checkpoints'}")
    if step == "latest":
        return run_dir, available[max(available)]
    if step == "best":
        scored = {s: m for s, m in evaluated_means(run_dir).items() if s in available}
        best = max(scored, key=lambda s: (scored[s], s)) if scored else max(available)
        return run_dir, available[best]
    if not step.isdigit():
        raise EvalError(f"--step must be latest, best or a number of steps, got {step!r}")
    if int(step) not in available:
        steps = ", ".join(str(s) for s in available)
        raise EvalError(f"no checkpoint at step {int(step)} in {run_dir}; available: {steps}")
    return run_dir, available[int(step)]


# ---------------------------------------------------------------- config and agent


def _device(cfg: Config) -> torch.device:
    wanted = cfg.runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise EvalError("runtime.device=cuda but no CUDA device is available; use auto or cpu")
    cuda = wanted in ("auto", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def eval_config(saved: dict, protocol: Protocol, overrides: Sequence[str]) -> Config:
    """The saved config with the protocol's settings, then the user's overrides.

    The device is ``auto`` unless overridden: a run trained on a GPU evaluates on a CPU machine.
    """
    cfg = from_dict(saved)
    cfg.runtime.device = "auto"
    cfg.env.max_episode_frames = protocol.max_frames
    if protocol.per_life:
        cfg.env.episodic_life = True
    for text in overrides:
        apply(cfg, *parse_override(text))
    validate(cfg)
    check_environment()
    return cfg


def game_name(cfg: Config) -> str:
    """The ROM id of an Atari game (``pong`` for ``ALE/Pong-v5``), else the gymnasium id."""
    if cfg.env.kind != "atari":
        return cfg.env.id
    from envs.atari import canonical_game

    try:
        return canonical_game(cfg.env.id)
    except ValueError as exc:
        raise EvalError(str(exc).splitlines()[0]) from None


def load_for_eval(
    target: Path, step: str, protocol: Protocol, overrides: Sequence[str] = ()
) -> Loaded:
    """Choose and load the checkpoint, rebuild its config and agent, and check they fit the env."""
    run_dir, path = find_checkpoint(target, step)
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing or not isinstance(payload.get("config"), dict):
        raise EvalError(f"checkpoint {path}: not written by train.py (missing {missing})")
    try:
        cfg = eval_config(payload["config"], protocol, overrides)
        game = game_name(cfg)
        probe = make_env(cfg, 1, 0)
        info_actions, obs_shape = probe.num_actions, tuple(probe.obs_shape)
        probe.close()
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    trained_on = payload.get("game", "?")
    if info_actions != payload["num_actions"]:
        raise EvalError(
            f"checkpoint {path} was trained on {trained_on} with {payload['num_actions']} "
            f"actions, but {cfg.env.id} has {info_actions}"
        )
    if "obs_shape" in payload and tuple(payload["obs_shape"]) != obs_shape:
        raise EvalError(
            f"checkpoint {path} was trained on observations of shape "
            f"{tuple(payload['obs_shape'])}, but {cfg.env.id} gives {obs_shape}"
        )
    if str(trained_on) != cfg.env.id:
        print(
            f"note: {path.name} was trained on {trained_on}, evaluating on {cfg.env.id}",
            file=sys.stderr,
        )
    from runners.factory import EnvInfo

    try:
        device = _device(cfg)
        agent = make_agent(cfg, EnvInfo(obs_shape, torch.uint8, info_actions))
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    try:
        agent.load_state_dict(payload["agent"])
    except RuntimeError:
        raise EvalError(
            f"checkpoint {path} holds another agent (trained with core "
            f"{payload.get('core', '?')}) than agent.core={cfg.agent.core} with these settings"
        ) from None
    agent.to(device).eval()
    seed = protocol.seed if protocol.seed is not None else cfg.seed + 10_000
    return Loaded(run_dir, path, int(payload["steps"]), cfg, agent, device, game, seed)


# ---------------------------------------------------------------- playing


def play(loaded: Loaded, protocol: Protocol) -> Episodes:
    """Play the protocol's episodes in parallel envs (see the module docstring)."""
    n = protocol.episodes
    num_envs = min(protocol.num_envs, n)
    quota = np.array([n // num_envs + (i < n % num_envs) for i in range(num_envs)])
    limit = protocol.noneg_limit * n if protocol.noneg else n
    torch.manual_seed(loaded.seed)
    env = make_env(loaded.cfg, num_envs, loaded.seed)
    try:
        per_env = _play(loaded, protocol, env, quota, limit)
    finally:
        env.close()
    out = Episodes(discarded=per_env.discarded)
    for rows in per_env.returns:  # env-major order: deterministic for a seed
        out.returns.extend(r for r, _ in rows)
        out.lengths.extend(length for _, length in rows)
    return out


@dataclass
class _PerEnv:
    returns: list[list[tuple[float, int]]]
    discarded: int = 0


def _play(loaded: Loaded, protocol: Protocol, env, quota: np.ndarray, limit: int) -> _PerEnv:
    agent, device = loaded.agent, loaded.device
    e = env.num_envs
    obs = env.reset()
    reward = torch.zeros(e, device=device)
    done = torch.ones(e, dtype=torch.bool, device=device)
    action = torch.zeros(e, dtype=torch.int64, device=device)
    state = agent.initial_state(e, device)
    running = np.zeros(e, dtype=np.float64)
    length = np.zeros(e, dtype=np.int64)
    negative = np.zeros(e, dtype=bool)
    kept = _PerEnv([[] for _ in range(e)])
    finished = 0
    while finished < limit and any(len(k) < q for k, q in zip(kept.returns, quota, strict=True)):
        obs_t = torch.as_tensor(np.asarray(obs), device=device)
        action, _, _, state = agent.act(obs_t, reward, done, action, state, greedy=protocol.greedy)
        out = env.step(action.cpu().numpy())
        running += out.reward
        length += 1
        negative |= running < 0
        ended = out.done if protocol.per_life else out.episode_end
        for i in np.flatnonzero(ended):
            if len(kept.returns[i]) < quota[i] and finished < limit:
                finished += 1
                if protocol.noneg and negative[i]:
                    kept.discarded += 1
                else:
                    kept.returns[i].append((float(running[i]), int(length[i])))
            running[i], length[i], negative[i] = 0.0, 0, False
        obs = out.obs
        reward = torch.as_tensor(out.reward, device=device)
        done = torch.as_tensor(out.done, device=device)
    return kept


# ---------------------------------------------------------------- statistics and report


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%).

    Bisection on the exact CDF for integer df (Abramowitz & Stegun 26.7.3-4).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")

    def central(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:
            total, term = 0.0, math.cos(theta)
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            body = math.cos(theta) + total if df > 1 else 0.0
            return 2 / math.pi * (theta + math.sin(theta) * body)
        total, term = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def summarize(episodes: Episodes, loaded: Loaded, protocol: Protocol) -> dict[str, Any]:
    """The evaluation report (DESIGN §8 fields, then ``protocol``: how it was played)."""
    if not episodes.returns:
        raise NoEpisodesError(
            f"no episode kept: all {episodes.discarded} went negative (noneg); "
            "evaluate without --noneg"
        )
    returns = np.asarray(episodes.returns, dtype=np.float64)
    n = len(returns)
    std = float(returns.std(ddof=1)) if n > 1 else None
    mean = float(returns.mean())
    cfg = loaded.cfg
    return {
        "steps": loaded.steps,
        "game": loaded.game,
        "core": cfg.agent.core,
        "episodes": [
            {"return": float(r), "length": int(length)}
            for r, length in zip(episodes.returns, episodes.lengths, strict=True)
        ],
        "mean": mean,
        "std": std,
        "median": float(np.median(returns)),
        "min": float(returns.min()),
        "max": float(returns.max()),
        "ci95": t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None,
        "hns": human_normalized(loaded.game, mean) if cfg.env.kind == "atari" else None,
        "protocol": {
            "checkpoint": str(loaded.checkpoint),
            "actions": "argmax" if protocol.greedy else "sampled",
            "per_life": protocol.per_life,
            "noneg": protocol.noneg,
            "discarded": episodes.discarded,
            "max_frames": cfg.env.max_episode_frames,
            "repeat_action_probability": cfg.env.repeat_action_probability,
            "seed": loaded.seed,
            "num_envs": min(protocol.num_envs, protocol.episodes),
        },
    }


def report_stem(steps: int) -> str:
    return f"{steps:0{STEP_DIGITS}d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_report(run_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``eval/<steps>.json`` and ``.csv`` (episode, return, length), each written atomically."""
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report["steps"])
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["episode", "return", "length"])
    for i, ep in enumerate(report["episodes"]):
        writer.writerow([i, repr(ep["return"]), ep["length"]])
    _atomic_write_text(csv_path, buffer.getvalue())
    _atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    return json_path, csv_path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """The console report: protocol line, one row per episode, the summary."""
    p = report["protocol"]
    lines = [
        f"checkpoint {p['checkpoint']} (steps {report['steps']})",
        f"{report['game']}, core {report['core']}: {len(report['episodes'])} episodes, "
        f"{p['actions']} actions, {'per life' if p['per_life'] else 'full games'}, "
        f"frame cap {p['max_frames']}, sticky {p['repeat_action_probability']}, "
        f"seed {p['seed']}" + (f", noneg ({p['discarded']} discarded)" if p["noneg"] else ""),
        f"{'episode':>8} {'return':>12} {'length':>8}",
    ]
    for i, ep in enumerate(report["episodes"]):
        lines.append(f"{i:>8} {ep['return']:>12.2f} {ep['length']:>8}")
    hns = "" if report["hns"] is None else f", HNS {report['hns']:.3f}"
    lines.append(
        f"mean {report['mean']:.2f} ± {_fmt(report['ci95'])} (95% CI), std {_fmt(report['std'])}"
        f", median {report['median']:.2f}, min {report['min']:.2f}, max {report['max']:.2f}" + hns
    )
    return "\n".join(lines)


def log_tensorboard(
    run_dir: Path, report: dict[str, Any], gif: tuple[bytes, int, int] | None = None
) -> None:
    """``eval/*`` scalars at the checkpoint's step in ``<run>/tb``, plus an animated GIF."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    step = report["steps"]
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        for key in ("mean", "std", "median", "min", "max", "ci95", "hns"):
            if report[key] is not None:
                writer.add_scalar(f"eval/{key}", report[key], step)
        lengths = [ep["length"] for ep in report["episodes"]]
        writer.add_scalar("eval/mean_length", float(np.mean(lengths)), step)
        if gif is not None:
            data, height, width = gif
            image = Summary.Image(
                height=height, width=width, colorspace=3, encoded_image_string=data
            )
            summary = Summary(value=[Summary.Value(tag="eval/video", image=image)])
            writer._get_file_writer().add_summary(summary, step)
    finally:
        writer.close()


# ---------------------------------------------------------------- videos


def fast_weight_maps(agent: ActorCritic, state: tuple) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Each layer's and head's fast-weight matrix W of env 0, and the heads per layer.

    W is the first state tensor of every FWP layer ([B, H, d, d], or [B, H, 3, d, d] for
    delta_lstm, whose three gate matrices are shown side by side). Other cores: no maps.
    """
    core = agent.core
    if not isinstance(core, FWPCore):
        return [], 1
    maps, offset = [], 0
    for index, layer in enumerate(core.fwps):
        weights = state[offset][0].float().cpu()
        offset += len(layer.state_shapes())
        for head, w in enumerate(weights):
            label = f"L{index + 1} h{head + 1}"
            if w.dim() == 3:  # delta_lstm: the input, update and output gates' matrices
                w, label = torch.cat(list(w), dim=1), label + " i|u|o"
            maps.append((label, w.numpy()))
    return maps, core.fwps[0].num_heads


def _single_env(cfg: Config, seed: int):
    """(env, fps, action names) of one env with RGB ``render()``, preprocessed like training."""
    env_cfg = cfg.env
    try:
        if env_cfg.kind == "atari":
            from envs.atari_single import make_atari_env

            env = make_atari_env(
                env_cfg.id,
                seed,
                repeat_action_probability=env_cfg.repeat_action_probability,
                full_action_space=env_cfg.full_action_space,
                episodic_life=env_cfg.episodic_life,
                noop_max=env_cfg.noop_max,
                max_episode_frames=env_cfg.max_episode_frames,
                frameskip=FRAMESKIP,
            )
            return env, ATARI_FPS / FRAMESKIP, list(env.unwrapped.get_action_meanings())
        import gymnasium as gym

        from envs.gym_vector import import_env_module

        if env_cfg.module:
            import_env_module(env_cfg.module)
        env = gym.make(env_cfg.id, render_mode="rgb_array", **env_cfg.kwargs)
    except (ValueError, TypeError) as exc:
        raise EvalError(f"cannot record {env_cfg.id}: {str(exc).splitlines()[0]}") from None
    fps = float(env.metadata.get("render_fps") or 15)
    return env, fps, [str(a) for a in range(env.action_space.n)]


@dataclass
class Video:
    path: Path
    frames: int
    episode_return: float
    length: int
    gif: tuple[bytes, int, int] | None  # (GIF bytes, height, width) for TensorBoard


def record_video(
    loaded: Loaded, protocol: Protocol, index: int, overlay: bool = False, gif: bool = False
) -> Video:
    """Play one episode in the single env seeded ``seed + index`` and write it as an mp4.

    One frame per agent step plus the first frame (length + 1), upscaled to at least
    ``VIDEO_HEIGHT`` rows; ``overlay`` adds the side panel of ``envs.video``.
    """
    seed = loaded.seed + index
    env, fps, names = _single_env(loaded.cfg, seed)
    path = loaded.run_dir / "videos" / f"{report_stem(loaded.steps)}_ep{index}.mp4"
    sampler = FrameSampler() if gif else None
    try:
        with Mp4Writer(path, fps) as writer:
            episode_return, length = _record(
                loaded, protocol, env, seed, names, overlay, writer, sampler
            )
    finally:
        env.close()
    summary = None
    if sampler is not None:
        small = [f[::2, ::2] for f in sampler.frames]
        summary = (encode_gif(small, fps / sampler.stride), *small[0].shape[:2])
    return Video(path, writer.frames, episode_return, length, summary)


def _record(loaded, protocol, env, seed, names, overlay, writer, sampler) -> tuple[float, int]:
    agent, device, kind = loaded.agent, loaded.device, loaded.cfg.env.kind
    torch.manual_seed(seed)
    obs, _ = env.reset() if kind == "atari" else env.reset(seed=seed)
    reward = torch.zeros(1, device=device)
    done = torch.ones(1, dtype=torch.bool, device=device)
    action = torch.zeros(1, dtype=torch.int64, device=device)
    state = agent.initial_state(1, device)
    factor = upscale_factor(env.render().shape[0])
    score, length = 0.0, 0
    panel = PanelInfo(score=0.0, step=0, action_names=names)
    while True:
        frame = upscale(env.render(), factor)
        obs_t = torch.as_tensor(np.asarray(obs)[None], device=device)
        if obs_t.dtype == torch.float64:
            obs_t = obs_t.float()
        action, logits, value, state = agent.act(
            obs_t, reward, done, action, state, greedy=protocol.greedy
        )
        if overlay:
            maps, columns = fast_weight_maps(agent, state)
            panel = PanelInfo(
                score=score,
                step=length,
                probs=torch.softmax(logits[0].float(), -1).cpu().numpy(),
                action=int(action[0]),
                value=float(value[0]),
                action_names=names,
                heatmaps=maps,
                heatmap_columns=columns,
            )
        _emit(frame, panel if overlay else None, writer, sampler)
        obs, r, terminated, truncated, info = env.step(int(action[0]))
        score += r
        length += 1
        game_over = "episode_return" in info if kind == "atari" else terminated or truncated
        if game_over or (protocol.per_life and (terminated or truncated)):
            break
        if terminated or truncated:  # a lost life under episodic_life: the game goes on
            obs, _ = env.reset()
        reward = torch.tensor([r], dtype=torch.float32, device=device)
        done = torch.tensor([bool(terminated or truncated)], device=device)
    last = upscale(env.render(), factor)
    if overlay:
        panel.score, panel.step = score, length
    _emit(last, panel if overlay else None, writer, sampler)
    return score, length


def _emit(frame: np.ndarray, panel: PanelInfo | None, writer: Mp4Writer, sampler) -> None:
    if panel is not None:
        width = max(320, frame.shape[1])
        frame = side_by_side(frame, render_panel(panel, frame.shape[0], width))
    writer.write(frame)
    if sampler is not None:
        sampler.add(frame)


# ---------------------------------------------------------------- evaluation beside training


def spawn_periodic_evaluation(
    run_dir: Path,
    checkpoint: Path,
    step: int,
    episodes: int,
    video: bool,
    overrides: Sequence[str] = (),
    threads: int = 1,
) -> subprocess.Popen:
    """Start ``evaluate.py`` on ``checkpoint`` in its own process and return at once.

    Its report goes to ``<run>/eval`` and ``<run>/tb`` like any evaluation, its console output to
    ``<run>/eval/periodic_<step>.log``. ``threads`` torch threads, so training keeps its cores.
    It runs in the caller's working directory, like the trainer. The caller owns the process:
    poll it, and terminate it on shutdown.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        str(Path(checkpoint).resolve()),
        "--episodes",
        str(episodes),
        "--threads",
        str(threads),
    ]
    if video:
        command += ["--video", "1"]
    command += list(overrides)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(folder / f"periodic_{report_stem(step)}.log", "w") as log:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
