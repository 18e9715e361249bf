"""End-to-end training throughput and the machine's bound for the same preset (issue 4).

For each preset it measures, each alone on this machine: learner fwd+bwd+update obs/s on a
synthetic batch, actor inference obs/s at the actor's batch size, and vector-env steps/s.
The bound is 1 / (1/learner + 1/inference + 1/env) agent steps/s: what one core-set could do
if it ran the three in turn with zero overhead. Then it trains for real and reports the
median steps/s after warm-up with the time split. One JSON object per line on stdout.

    python benchmarks/train_throughput.py --presets fast,fast-lstm,paper --seconds 60
    python benchmarks/train_throughput.py --presets fast --inference central
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median_seconds, random_batch  # noqa: E402
from runners.config import CONFIG_DIR, Config, build_config  # noqa: E402
from runners.factory import make_agent, make_env, probe_env, torso_bf16  # noqa: E402
from runners.learner import Learner  # noqa: E402
from runners.trainer import Trainer  # noqa: E402

PRESETS = {
    "fast": (CONFIG_DIR / "default.yaml", []),
    "fast-lstm": (CONFIG_DIR / "default.yaml", ["agent.core=lstm"]),
    "paper": (CONFIG_DIR / "paper.yaml", []),
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def components(cfg: Config, seconds: float) -> dict[str, float]:
    """Learner obs/s, inference obs/s and env steps/s, each alone on all cores."""
    torch.set_num_threads(2)
    info = probe_env(cfg)
    agent = make_agent(cfg, info)
    learner = Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu"))
    batch = random_batch(
        cfg.learner.unroll_length,
        cfg.learner.batch_size,
        info.obs_shape,
        info.num_actions,
        agent.initial_state(cfg.learner.batch_size),
    )
    per_batch = cfg.learner.unroll_length * cfg.learner.batch_size
    learner_s = median_seconds(lambda: learner.update(batch), seconds)

    e = cfg.env.num_envs // cfg.runtime.num_actors
    n = cfg.env.num_envs if cfg.runtime.inference == "central" else e  # the server acts for all
    actor = make_agent(cfg, info).eval()
    state = actor.initial_state(n)
    obs = torch.randint(0, 255, (n, *info.obs_shape), dtype=torch.uint8)
    zeros, done = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    action = torch.zeros(n, dtype=torch.int64)
    inference_s = median_seconds(lambda: actor.act(obs, zeros, done, action, state), seconds)

    env = make_env(cfg, e, cfg.seed)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    env_s = median_seconds(lambda: env.step(rng.integers(0, info.num_actions, e)), seconds)
    env.close()
    learner_rate = per_batch / learner_s
    inference_rate = n / inference_s
    env_rate = e / env_s
    bound = 1.0 / (1.0 / learner_rate + 1.0 / inference_rate + 1.0 / env_rate)
    return {
        "learner_obs_per_s": learner_rate,
        "inference_obs_per_s": inference_rate,
        "env_steps_per_s": env_rate,
        "bound_steps_per_s": bound,
    }


def end_to_end(cfg: Config, seconds: float, warmup: float) -> dict[str, float]:
    """Train for `warmup + seconds`; median SPS and the time split after warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.dir = str(Path(tmp) / "run")
        cfg.runtime.time_limit_s = warmup + seconds
        cfg.runtime.total_steps = 10**12
        cfg.logging.every_s = 2.0
        cfg.checkpoint.every_s = 10**6
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            Trainer(cfg).run()
        events = EventAccumulator(str(Path(cfg.run.dir) / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        series = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    start = series["charts/SPS"][0].wall_time + warmup
    after = {tag: [e.value for e in s if e.wall_time >= start] for tag, s in series.items()}
    split = {
        tag.removeprefix("perf/"): sum(values)
        for tag, values in after.items()
        if tag.startswith("perf/") and tag.endswith("_s")
    }
    return {"steps_per_s": statistics.median(after["charts/SPS"]), "seconds_split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="fast,fast-lstm,paper")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured end-to-end time")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--component-seconds", type=float, default=5.0)
    parser.add_argument("--bf16", action="store_true", help="also measure agent.bf16=true")
    parser.add_argument(
        "--backend",
        choices=("local", "sync", "ray"),
        help="runtime.backend for every preset (default: the preset's)",
    )
    parser.add_argument(
        "--inference",
        choices=("actor", "central"),
        help="runtime.inference for every preset (default: the preset's)",
    )
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every preset")
    args = parser.parse_args()
    for name in args.presets.split(","):
        path, preset_overrides = PRESETS[name]
        # --bf16 measures both precisions; otherwise the preset's (or an override's) stands
        for bf16 in ["false", "true"] if args.bf16 else [None]:
            overrides = [*preset_overrides, *args.overrides]
            if bf16:
                overrides.append(f"agent.bf16={bf16}")
            if args.backend:
                overrides.append(f"runtime.backend={args.backend}")
            if args.inference:
                overrides.append(f"runtime.inference={args.inference}")
            cfg = build_config(path, overrides)
            parts = components(cfg, args.component_seconds)
            run = end_to_end(build_config(path, overrides), args.seconds, args.warmup)
            emit(
                preset=name,
                torso=cfg.agent.torso,
                core=cfg.agent.core,
                bf16=torso_bf16(cfg),
                backend=cfg.runtime.backend,
                inference=cfg.runtime.inference,
                num_actors=cfg.runtime.num_actors,
                num_envs=cfg.env.num_envs,
                unroll_length=cfg.learner.unroll_length,
                batch_size=cfg.learner.batch_size,
                **parts,
                **run,
                fraction_of_bound=run["steps_per_s"] / parts["bound_steps_per_s"],
            )


if __name__ == "__main__":
    main()
