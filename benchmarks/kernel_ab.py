"""A/B timing of the fused C kernels: a git revision's build against the working tree's.

Builds ``agents/cores/csrc/fwp_cpu.c`` as of ``--base`` (default HEAD) and as it is now, then
times fwd+bwd of each sequential recurrence alone and of its whole core (T=50, B=32, paper
sizes) with one build and then the other, alternating the order every repeat, so both see the
same machine state. Prints one JSON object per measurement with both medians and the speed-up.

    python benchmarks/kernel_ab.py --base HEAD~1 --threads 1,2 --repeats 30
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.cores import cpu_kernels, make_core  # noqa: E402
from agents.cores import fast_weights as fw  # noqa: E402
from benchmarks.core_speed import (  # noqa: E402
    INPUT,
    SEQUENTIAL,
    B,
    T,
    episode_starts,
    recurrence_inputs,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def build(source: str, out_dir: Path, tag: str) -> ctypes.CDLL:
    """Compile C source text with the flags the project uses and load it."""
    src, lib = out_dir / f"{tag}.c", out_dir / f"{tag}.so"
    src.write_text(source)
    cc = [*("cc", *cpu_kernels.FLAGS), str(src), "-o", str(lib), "-lm"]
    subprocess.run(cc, check=True, timeout=120)
    return ctypes.CDLL(str(lib))


def ab_medians(step: Callable[[], None], libs: dict[str, ctypes.CDLL], repeats: int) -> dict:
    """Median ms of ``step`` under each build, interleaved (one warm-up call before each)."""
    times: dict[str, list[float]] = {tag: [] for tag in libs}
    for r in range(repeats):
        for tag in list(libs) if r % 2 == 0 else list(libs)[::-1]:
            with mock.patch.object(cpu_kernels, "library", lambda lib=libs[tag]: lib):
                step()
                start = time.perf_counter()
                step()
                times[tag].append((time.perf_counter() - start) * 1e3)
    return {f"{tag}_ms": round(statistics.median(v), 3) for tag, v in times.items()}


def recurrence_step(name: str) -> Callable[[], None]:
    inputs, state = recurrence_inputs(name)
    done, fn = episode_starts(T, B), getattr(fw, name)

    def step() -> None:
        y, _ = fn(*inputs, done, state, impl="fast")
        torch.autograd.grad(y.sum(), inputs)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base build")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rel = cpu_kernels.SOURCE.relative_to(ROOT)
    base_source = subprocess.run(
        ["git", "show", f"{args.base}:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            "base": build(base_source, Path(tmp), "base"),
            "head": build(cpu_kernels.SOURCE.read_text(), Path(tmp), "head"),
        }
        x, done = torch.randn(T, B, INPUT), episode_starts(T, B)
        for threads in (int(n) for n in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name in SEQUENTIAL:
                torch.manual_seed(0)
                for what, step in (
                    ("recurrence", recurrence_step(name)),
                    ("core", train_step(make_core(name, INPUT), x, done)),
                ):
                    ms = ab_medians(step, libs, args.repeats)
                    speedup = round(ms["base_ms"] / ms["head_ms"], 3)
                    record = {"what": what, "core": name, "threads": threads, "base": args.base}
                    print(json.dumps({**record, **ms, "speedup": speedup}), flush=True)


if __name__ == "__main__":
    main()
