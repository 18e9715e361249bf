"""A/B timing of the sequential cores: a git revision's code against the working tree's.

Exports ``--base`` (default HEAD) into a temporary folder, then times fwd+bwd of each sequential
recurrence alone and of its whole core (T=50, B=32, paper sizes) in child processes that import
one tree or the other (each builds its own C kernels), alternating the order block by block so
both see the same machine state. Any change to the cores' code can be compared this way, the
kernels' calling convention included; ``act`` times the core's single step (T=1, B=8, under
no_grad), as an actor takes it. Prints one JSON object per measurement with both medians and
the speed-up.

    python benchmarks/kernel_ab.py --base HEAD~1 --threads 1,2 --blocks 4 --repeats 10 \
        [--cores delta_rnn,rdn,delta_lstm] [--what recurrence,core,act]

(``recurrence`` times ``fast_weights.<name>``, ``forward`` its forward alone, saving for the
backward: for lt and delta use ``core`` or ``act``. ``layer`` times fwd+bwd of the C kernel a
layer calls on its raw slow projection, ``cpu_recurrences.PROJECTED[name]``, which every core
but rdn has.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORES = ("lt", "delta", "delta_rnn", "rdn", "delta_lstm")
WHATS = ("recurrence", "forward", "layer", "core", "act")

# Runs in a child whose working directory is the tree under test; prints the times in ms.
CHILD = """
import json, sys, time
import torch
from agents.cores import fast_weights as fw, make_core
from benchmarks.core_speed import B, INPUT, T, episode_starts, recurrence_inputs, train_step
what, name, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
done = episode_starts(T, B)
if what == "core":
    step = train_step(make_core(name, INPUT), torch.randn(T, B, INPUT), done)
elif what == "act":
    core = make_core(name, INPUT)
    x, first = torch.randn(1, 8, INPUT), torch.zeros(1, 8, dtype=torch.bool)
    step = torch.no_grad()(lambda state=core.initial_state(8): core(x, first, state))
elif what == "layer":
    from agents.cores.cpu_recurrences import PROJECTED
    from benchmarks.core_speed import HEAD_DIM as d, HEADS as H
    # A row holds per_d * H * d + per_head * H floats; the state, matrices (W or W, R) then vectors.
    per_d, per_head, matrices, vectors = {
        "lt": (3, 0, 1, 0), "delta": (3, 1, 1, 0), "delta_rnn": (5, 2, 2, 1),
        "delta_lstm": (15, 6, 2, 2),
    }[name]
    gates = (3,) if name == "delta_lstm" else ()
    state = (torch.zeros(B, H, *gates, d, d),) * matrices + (torch.zeros(B, H, d),) * vectors
    P = torch.randn(T, B, per_d * H * d + per_head * H, requires_grad=True)
    def step():
        y, _ = PROJECTED[name](P, H, done, state)
        torch.autograd.grad(y, P, torch.ones_like(y))
else:
    inputs, state = recurrence_inputs(name)
    def step():
        y, _ = getattr(fw, name)(*inputs, done, state, impl="fast")
        if what == "recurrence":
            torch.autograd.grad(y.sum(), inputs)
for _ in range(3):
    step()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append((time.perf_counter() - start) * 1e3)
print(json.dumps(times))
"""


def export(revision: str, into: Path) -> Path:
    """The tree of ``revision`` written under ``into`` (no git worktree is registered)."""
    archive = into / "base.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), revision], cwd=ROOT, check=True
    )
    tree = into / "base"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def child_times(tree: Path, what: str, name: str, threads: int, repeats: int) -> list[float]:
    args = [sys.executable, "-c", CHILD, what, name, str(threads), str(repeats)]
    out = subprocess.run(args, cwd=tree, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base code")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--blocks", type=int, default=4, help="alternations of the two trees")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per block")
    parser.add_argument("--cores", default="delta_rnn,rdn,delta_lstm", help=f"of {CORES}")
    parser.add_argument("--what", default="recurrence,core", help=f"of {', '.join(WHATS)}")
    args = parser.parse_args()
    cores, whats = args.cores.split(","), args.what.split(",")
    if not set(cores) <= set(CORES) or not set(whats) <= set(WHATS):
        parser.error(f"--cores takes {', '.join(CORES)}; --what takes {', '.join(WHATS)}")
    if "layer" in whats and "rdn" in cores:
        parser.error("--what layer: rdn has no layer kernel (it reads its raw inputs, not a row)")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": export(args.base, Path(tmp)), "head": ROOT}
        for threads in (int(n) for n in args.threads.split(",")):
            for name in cores:
                for what in whats:
                    times: dict[str, list[float]] = {tag: [] for tag in trees}
                    for block in range(args.blocks):
                        order = list(trees) if block % 2 == 0 else list(trees)[::-1]
                        for tag in order:
                            times[tag] += child_times(trees[tag], what, name, threads, args.repeats)
                    ms = {f"{tag}_ms": round(statistics.median(v), 3) for tag, v in times.items()}
                    speedup = round(ms["base_ms"] / ms["head_ms"], 3)
                    record = {"what": what, "core": name, "threads": threads, "base": args.base}
                    print(json.dumps({**record, **ms, "speedup": speedup}), flush=True)


if __name__ == "__main__":
    main()
