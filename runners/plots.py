"""Learning curves (``evaluate.py plot``): return vs agent steps from the runs' TensorBoard logs.

One line per run, smoothed with TensorBoard's debiased exponential moving average. Runs that are
seeds of one experiment share a line, the mean over seeds, with the min-max spread shaded: seeds
are runs whose folder names differ only by a ``-seed<k>`` (or ``_seed<k>``) suffix, or whose
saved configs are equal except for ``seed`` and ``run.*``. Drawn with matplotlib's Agg canvas (no
display, no pyplot global state) and saved atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

RETURN_TAG = "charts/episodic_return"
_SEED_SUFFIX = re.compile(r"[-_]seed\d+$")
_GRID = 200  # points of the common step grid of a group of seeds


class PlotError(Exception):
    """A run cannot be plotted; the message is one line (the CLI exits with code 2)."""


def read_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, returns) of every finished training episode of a run, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"no run folder at {run_dir}")
    if not (run_dir / "tb").is_dir():
        raise PlotError(f"{run_dir} has no TensorBoard logs (tb/): is it a run folder?")
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if RETURN_TAG not in events.Tags()["scalars"]:
        raise PlotError(f"{run_dir} has no {RETURN_TAG} yet (no training episode has finished)")
    scalars = sorted(events.Scalars(RETURN_TAG), key=lambda e: e.step)
    steps = np.array([e.step for e in scalars], dtype=np.float64)
    return steps, np.array([e.value for e in scalars], dtype=np.float64)


def smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """Debiased EMA as TensorBoard draws it; ``weight`` None: about 1/40 of the points' span."""
    values = np.asarray(values, dtype=np.float64)
    if weight is None:
        span = max(1, len(values) // 40)
        weight = 1.0 - 2.0 / (span + 1)
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight!r}")
    out = np.empty_like(values)
    last = 0.0
    for i, v in enumerate(values):
        last = last * weight + (1.0 - weight) * v
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


def _config_key(run_dir: Path) -> str | None:
    """The saved config without seed and run.* as a canonical string (None when unreadable)."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(tree, dict):
        return None
    tree = {k: v for k, v in tree.items() if k not in ("seed", "run")}
    return json.dumps(tree, sort_keys=True, default=str)


def group_runs(run_dirs: Sequence[Path]) -> dict[str, list[Path]]:
    """Runs grouped as seeds of one experiment (see the module docstring), labelled by name."""
    runs = [Path(r) for r in run_dirs]
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in (lambda r: _SEED_SUFFIX.sub("", r.name), _config_key):
        first: dict[str, int] = {}
        for i, run in enumerate(runs):
            k = key(run)
            if k is None:
                continue
            if k in first:
                parent[root(i)] = root(first[k])
            else:
                first[k] = i
    groups: dict[int, list[Path]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(root(i), []).append(run)
    labelled: dict[str, list[Path]] = {}
    for members in groups.values():
        label = _SEED_SUFFIX.sub("", members[0].name)
        if len(members) > 1:
            label += f" ({len(members)} seeds)"
        while label in labelled:
            label += "'"
        labelled[label] = members
    return labelled


def plot_learning_curves(
    run_dirs: Sequence[Path], out: Path, smoothing: float | None = None
) -> Path:
    """Draw every run's (or seed group's) smoothed return vs steps into the PNG ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_runs(run_dirs)
    curves = {label: [read_curve(r) for r in members] for label, members in groups.items()}
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for index, (label, runs) in enumerate(curves.items()):
        color = f"C{index % 10}"
        smoothed = [(steps, smooth(returns, smoothing)) for steps, returns in runs]
        if len(runs) == 1:
            steps, returns = runs[0]
            ax.plot(steps, returns, color=color, alpha=0.15, linewidth=0.8)
            ax.plot(*smoothed[0], color=color, label=label, linewidth=1.6)
            continue
        start = max(s[0] for s, _ in smoothed)
        stop = min(s[-1] for s, _ in smoothed)
        if stop <= start:  # the seeds' step ranges do not overlap: draw them one by one
            for i, (steps, values) in enumerate(smoothed):
                ax.plot(steps, values, color=color, label=label if i == 0 else None)
            continue
        grid = np.linspace(start, stop, _GRID)
        stacked = np.stack([np.interp(grid, s, v) for s, v in smoothed])
        ax.fill_between(grid, stacked.min(0), stacked.max(0), color=color, alpha=0.25)
        ax.plot(grid, stacked.mean(0), color=color, label=label, linewidth=1.6)
    ax.set_xlabel("agent steps")
    ax.set_ylabel("episodic return (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
