"""Summarise training runs from their TensorBoard logs (issue 4): when the mean of the last 100
games first reached each return level, the throughput, and how healthy the updates were.

    python benchmarks/run_report.py runs/pong-a runs/pong-b [--levels -15 -10 0 10 14 17 18]

Prints one JSON line per run. The health counts cover the updates train.py logged (one every
`logging.every_s`): the fraction whose gradient norm exceeded `learner.grad_clip`, and the
collapses, logged updates after which the policy was nearly deterministic over the whole batch
(mean entropy below `--collapse-entropy` nats) or far from the actors' policy (mean V-trace ρ
below `--collapse-rho`). On Pong such updates often precede a fall of 10-15 points in the
return (docs/results/README.md, "Session 19"). Counted apart, the KL spikes: logged updates
whose policy was more than `--spike-kl` nats (mean KL) from the actors' a few updates earlier,
a jump the collapse rule misses but which preceded a fall from +15 to -13 in session 24.
Runs since session 25 also log each interval's largest KL over all its updates
(`policy/kl_from_behaviour_max`); `kl_spike_intervals` lists the intervals holding a spike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.learn import first_reached, read_games, running_mean  # noqa: E402

LEVELS = (-15.0, -10.0, 0.0, 10.0, 14.0, 17.0, 18.0)


def read_scalars(run_dir: Path) -> dict[str, np.ndarray]:
    """Every scalar tag of the run as a ``[n, 2]`` array of (step, value), in step order."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: np.array(sorted((e.step, e.value) for e in events.Scalars(tag)), dtype=np.float64)
        for tag in events.Tags()["scalars"]
    }


def mean_entropy(scalars: dict[str, np.ndarray], learner: dict) -> np.ndarray | None:
    """Mean policy entropy (nats per step) of each logged update.

    Runs from before `policy/entropy` was logged: recovered from the entropy loss, which is
    ``-entropy_cost`` times the entropy summed over the T x B steps of the batch.
    """
    if "policy/entropy" in scalars:
        return scalars["policy/entropy"]
    cost = float(learner.get("entropy_cost", 0.0))
    if "losses/entropy" not in scalars or cost <= 0:
        return None
    steps = int(learner["unroll_length"]) * int(learner["batch_size"])
    loss = scalars["losses/entropy"]
    return np.column_stack([loss[:, 0], -loss[:, 1] / (cost * steps)])


def health(
    scalars: dict[str, np.ndarray],
    learner: dict,
    collapse_entropy: float,
    collapse_rho: float,
    spike_kl: float,
) -> dict:
    """Gradient clipping, policy-collapse and KL-spike counts over the logged updates."""
    out: dict = {}
    grad = scalars.get("losses/grad_norm")
    if grad is not None and len(grad):
        out["updates_logged"] = len(grad)
        out["median_grad_norm"] = round(float(np.median(grad[:, 1])), 2)
        clip = float(learner.get("grad_clip", 0.0))
        if clip > 0:
            out["clipped_fraction"] = round(float(np.mean(grad[:, 1] > clip)), 3)
    collapsed: set[int] = set()
    entropy = mean_entropy(scalars, learner)
    if entropy is not None:
        out["median_entropy"] = round(float(np.median(entropy[:, 1])), 3)
        collapsed |= {int(s) for s, v in entropy if v < collapse_entropy}
    rho = scalars.get("vtrace/mean_rho")
    if rho is not None:
        collapsed |= {int(s) for s, v in rho if v < collapse_rho}
    if entropy is not None or rho is not None:
        out["collapses"] = len(collapsed)
        out["collapse_steps"] = sorted(collapsed)
    kl = scalars.get("policy/kl_from_behaviour")
    if kl is not None:
        out["kl_spike_steps"] = [int(s) for s, v in kl if v > spike_kl]
    kl_peak = scalars.get("policy/kl_from_behaviour_max")
    if kl_peak is not None:
        out["kl_spike_intervals"] = [int(s) for s, v in kl_peak if v > spike_kl]
    for tag, key in (
        ("perf/policy_lag", "median_policy_lag"),
        ("policy/kl_from_behaviour", "median_kl"),
    ):
        if tag in scalars:
            out[key] = round(float(np.median(scalars[tag][:, 1])), 4)
    return out


def report(
    run_dir: Path, levels=LEVELS, collapse_entropy=0.3, collapse_rho=0.5, spike_kl=0.5
) -> dict:
    """The JSON summary of one run folder (see the module docstring)."""
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    learner = config.get("learner", {})
    games = read_games(run_dir)
    out: dict = {"run": str(run_dir), "games": len(games)}
    if len(games):
        mean100 = running_mean(games[:, 2])
        steps, seconds = games[-1, 0], games[-1, 1]
        out.update(
            steps=int(steps),
            minutes=round(seconds / 60, 1),
            mean_sps=round(steps / seconds) if seconds > 0 else None,
            last_100_end=round(float(mean100[-1]), 2),
            last_100_best=round(float(mean100[99:].max()), 2) if len(games) >= 100 else None,
        )
        reached = {}
        for level in levels:
            index = first_reached(mean100, level)
            reached[f"{level:g}"] = (
                None
                if index is None
                else {"step": int(games[index, 0]), "minutes": round(games[index, 1] / 60, 1)}
            )
        out["reached"] = reached
    out["health"] = health(read_scalars(run_dir), learner, collapse_entropy, collapse_rho, spike_kl)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (holding tb/)")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--collapse-entropy", type=float, default=0.3, help="nats")
    parser.add_argument("--collapse-rho", type=float, default=0.5)
    parser.add_argument("--spike-kl", type=float, default=0.5, help="nats")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "tb").is_dir():
            sys.exit(f"run_report.py: {run} has no tb/ folder (not a train.py run folder)")
        summary = report(run, args.levels, args.collapse_entropy, args.collapse_rho, args.spike_kl)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
