"""Speed and memory of every core at the paper's shapes; one JSON object per measurement.

Sections (``--sections``, default all):
  train   fwd+bwd ms over an unroll (T=50, B=32, input 257) per core, impl, state_grad, bf16
          linear layers, threads, next to a bare ``nn.LSTM(257, 256)``; every FWP core's fast
          path also with the fused C kernels switched off (``cpu_kernels: false``)
  recurrence  fwd+bwd ms of each recurrence function alone (T=50, B=32, 4 heads of 32) per
          impl and threads, against the issue's "fast >= 5x the per-step reference"
  floor   fwd+bwd ms of each FWP core with its recurrence replaced by a pass-through (the
          slow projection, output projection, feed-forward, layer norms and residuals only):
          the dense work no recurrence kernel can remove, next to ``nn.LSTM`` and the real core,
          each with its linear layers on MKL and on oneDNN (agents/linear.py), all run in
          turn; ``fwd_bwd_ms`` is the route the layers pick on their own (``auto_route``)
  act     single-step latency (T=1, no_grad) at B=8 and B=32 per core and threads (likewise)
  memory  bytes saved for backward and peak RSS growth of one fwd+bwd, each config in a
          fresh process
  torso   IMPALA torso f32 vs bf16 autocast: inference and fwd+bwd ms, max abs feature diff

Run with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776``
(as the Makefile does) so the allocator keeps buffers mapped, like training does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import linear  # noqa: E402
from agents.agent import build_agent  # noqa: E402
from agents.cores import cpu_kernels, make_core  # noqa: E402
from agents.cores import fast_weights as fw  # noqa: E402
from agents.cores.fwp import FastWeightLayer  # noqa: E402
from agents.torso import make_torso  # noqa: E402

T, B, INPUT = 50, 32, 257
FWP = ("lt", "delta", "delta_rnn", "rdn", "delta_lstm")
SEQUENTIAL = ("delta_rnn", "rdn", "delta_lstm")  # recurrence functions with fused C kernels
SECTIONS = ("train", "recurrence", "floor", "act", "memory", "torso")
HEADS, HEAD_DIM = 4, 32


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    return alternating_medians([fn], repeats, warmup)[0]


def alternating_medians(
    fns: list[Callable[[], object]], repeats: int, warmup: int = 2
) -> list[float]:
    """Median ms of each function, run in turn (A B C A B C ...) so that a drift in the
    machine's speed moves all of them alike and their ratios stay fair."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return [round(statistics.median(samples), 3) for samples in times]


def episode_starts(t: int, b: int) -> torch.Tensor:
    """``done`` with a few episode starts inside the unroll, as a real rollout has."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(t, b, generator=g) < 0.01


def train_step(core: nn.Module, x: torch.Tensor, done: torch.Tensor) -> Callable[[], None]:
    state = core.initial_state(x.shape[1])

    def step() -> None:
        core.zero_grad(set_to_none=True)
        y, _ = core(x, done, state)
        y.sum().backward()

    return step


class BareLSTM(nn.Module):
    """``nn.LSTM`` over the whole unroll without resets: the floor the LSTM core is held to."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT, 256)

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return ()

    def forward(self, x: torch.Tensor, done: torch.Tensor, state: tuple) -> tuple:
        return self.lstm(x)[0], state


def train_configs() -> list[tuple[str, dict, Callable[[], nn.Module]]]:
    configs: list[tuple[str, dict, Callable[[], nn.Module]]] = [
        ("nn.LSTM", {}, BareLSTM),
        ("lstm", {}, lambda: make_core("lstm", INPUT)),
    ]
    variants = (
        {"impl": "fast", "state_grad": "full"},
        {"impl": "fast", "state_grad": "full", "bf16": True},  # linear layers in bf16
        {"impl": "fast", "state_grad": "none"},
        {"impl": "reference", "state_grad": "full"},
    )
    for name in FWP:
        for opts in variants:
            configs.append((name, opts, lambda n=name, o=opts: make_core(n, INPUT, **o)))
            if opts["impl"] == "fast" and not opts.get("bf16"):
                configs.append((name, {**opts, "cpu_kernels": False}, configs[-1][2]))
    return configs


def kernels_switch(opts: dict) -> contextlib.AbstractContextManager:
    """The C kernels off when the options say ``cpu_kernels: False``."""
    off = opts.get("cpu_kernels") is False
    return cpu_kernels.forced(False) if off else contextlib.nullcontext()


def run_train(threads: list[int], repeats: int) -> None:
    x = torch.randn(T, B, INPUT)
    done = episode_starts(T, B)
    for n in threads:
        torch.set_num_threads(n)
        for name, opts, build in train_configs():
            torch.manual_seed(0)
            with kernels_switch(opts):
                ms = median_ms(train_step(build(), x, done), repeats)
            emit(section="train", core=name, **opts, threads=n, T=T, B=B, fwd_bwd_ms=ms)


def recurrence_inputs(name: str) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Leaf inputs of recurrence ``name`` at the paper's sizes, activated as the cores do, and
    its zero initial state."""
    g = torch.Generator().manual_seed(0)
    gates = (3,) if name == "delta_lstm" else ()
    seq, col = (T, B, HEADS, *gates, HEAD_DIM), (T, B, HEADS, *gates, 1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def unit(*shape: int) -> torch.Tensor:
        return torch.softmax(rnd(*shape), -1)

    mat, vec = (B, HEADS, *gates, HEAD_DIM, HEAD_DIM), (B, HEADS, HEAD_DIM)
    if name == "rdn":
        slow = [rnd(HEADS, HEAD_DIM, HEAD_DIM) * HEAD_DIM**-0.5 for _ in range(3)]
        inputs = [rnd(*seq), rnd(*seq), rnd(*seq), rnd(*col), *slow, rnd(HEADS, HEAD_DIM) * 0.2]
        state = (torch.zeros(mat), torch.zeros(vec))
    elif name in ("linear_attention", "delta_rule"):
        inputs = [unit(*seq), unit(*seq), rnd(*seq)]
        inputs += [torch.sigmoid(rnd(*col))] if name == "delta_rule" else []
        state = (torch.zeros(mat),)
    else:
        inputs = [unit(*seq), unit(*seq), rnd(*seq), torch.sigmoid(rnd(*col))]
        inputs += [unit(*seq), rnd(*seq), torch.sigmoid(rnd(*col))]
        state = (torch.zeros(mat), torch.zeros(mat), *[torch.zeros(vec)] * (2 if gates else 1))
    return [x.requires_grad_() for x in inputs], state


def run_recurrence(threads: list[int], repeats: int) -> None:
    done = episode_starts(T, B)
    for n in threads:
        torch.set_num_threads(n)
        for name in ("linear_attention", "delta_rule", *SEQUENTIAL):
            inputs, state = recurrence_inputs(name)
            fn = getattr(fw, name)
            variants = [{"impl": "fast"}, {"impl": "reference"}]
            variants += [{"impl": "fast", "cpu_kernels": False}] if name in SEQUENTIAL else []
            if name in ("linear_attention", "delta_rule"):
                state = state[0]  # these take the bare matrix, not a tuple
            for opts in variants:

                def step(fn=fn, inputs=inputs, state=state, impl=opts["impl"]) -> None:
                    y, _ = fn(*inputs, done, state, impl=impl)
                    torch.autograd.grad(y.sum(), inputs)

                with kernels_switch(opts):
                    ms = median_ms(step, repeats)
                emit(section="recurrence", recurrence=name, **opts, threads=n, fwd_bwd_ms=ms)


def _pass_through(
    layer: FastWeightLayer, x: torch.Tensor, done: torch.Tensor, state: tuple
) -> tuple[torch.Tensor, tuple]:
    """The layer's dense work without its recurrence: the whole slow projection is computed
    and back-propagated (its gradient is zero outside the slice read), then projected out."""
    y = layer.slow(x)[..., : layer.num_heads * layer.head_dim]
    return layer.out(y), state


@contextlib.contextmanager
def recurrence_removed() -> Iterator[None]:
    """Every FWP layer runs ``_pass_through`` inside the block; the real forward after it."""
    forward = FastWeightLayer.forward
    FastWeightLayer.forward = _pass_through
    try:
        yield
    finally:
        FastWeightLayer.forward = forward


def _routed(step: Callable[[], None], onednn: bool, dense: bool) -> Callable[[], None]:
    """``step`` with its linear layers on one GEMM route, with or without the recurrence."""

    def run() -> None:
        with linear.forced(onednn), recurrence_removed() if dense else contextlib.nullcontext():
            step()

    return run


def run_floor(threads: list[int], repeats: int) -> None:
    x = torch.randn(T, B, INPUT)
    done = episode_starts(T, B)
    for n in threads:
        torch.set_num_threads(n)
        auto = "onednn" if linear._onednn_faster(n) else "mkl"
        for name in FWP:
            torch.manual_seed(0)
            lstm = train_step(BareLSTM(), x, done)
            core = train_step(make_core(name, INPUT), x, done)
            routed = [_routed(core, on, dense) for dense in (False, True) for on in (False, True)]
            lstm_ms, mkl_ms, dnn_ms, mkl_floor, dnn_floor = alternating_medians(
                [lstm, *routed], repeats
            )
            core_ms, floor_ms = (dnn_ms, dnn_floor) if auto == "onednn" else (mkl_ms, mkl_floor)
            emit(
                section="floor",
                core=name,
                threads=n,
                auto_route=auto,
                lstm_ms=lstm_ms,
                fwd_bwd_ms=core_ms,
                without_recurrence_ms=floor_ms,
                ratio_to_lstm=round(core_ms / lstm_ms, 2),
                floor_ratio_to_lstm=round(floor_ms / lstm_ms, 2),
                mkl_ms=mkl_ms,
                onednn_ms=dnn_ms,
                mkl_floor_ms=mkl_floor,
                onednn_floor_ms=dnn_floor,
                onednn_speedup=round(mkl_ms / dnn_ms, 2),
            )


def run_act(threads: list[int], repeats: int) -> None:
    configs = [("ff", {}), ("lstm", {})]
    configs += [(name, {"impl": impl}) for name in FWP for impl in ("fast", "reference")]
    configs += [(name, {"impl": "fast", "cpu_kernels": False}) for name in FWP]
    for n in threads:
        torch.set_num_threads(n)
        for name, opts in configs:
            core = make_core(name, INPUT, **{k: v for k, v in opts.items() if k != "cpu_kernels"})
            for b in (8, 32):
                x = torch.randn(1, b, INPUT)
                done = torch.zeros(1, b, dtype=torch.bool)
                state = core.initial_state(b)

                @torch.no_grad()
                def act(core=core, x=x, done=done, state=state) -> None:
                    core(x, done, state)

                with kernels_switch(opts):
                    ms = median_ms(act, repeats * 10, warmup=5)
                emit(section="act", core=name, **opts, threads=n, B=b, act_ms=ms)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, opts: dict) -> None:
    """In a fresh process: bytes autograd saves for backward in one fwd+bwd of this config, and
    that step's peak RSS growth (high-water mark reset through /proc/self/clear_refs)."""
    torch.set_num_threads(1)
    build = {(n, json.dumps(o)): f for n, o, f in train_configs()}[name, json.dumps(opts)]
    step = train_step(build(), torch.randn(T, B, INPUT), episode_starts(T, B))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    emit(
        section="memory",
        core=name,
        **opts,
        T=T,
        B=B,
        saved_for_backward_mib=round(sum(saved.values()) / 2**20, 1),
        peak_rss_growth_mib=round((_rss_kib("VmHWM") - base) / 1024, 1),
    )


def run_memory() -> None:
    for name, opts, _ in train_configs():
        cmd = [sys.executable, __file__, "--memory-child", json.dumps([name, opts])]
        subprocess.run(cmd, check=True)


def run_torso(repeats: int) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    f32 = make_torso("impala", (4, 84, 84))
    bf16 = make_torso("impala", (4, 84, 84), bf16=True)
    bf16.load_state_dict(f32.state_dict())
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (T * B, 4, 84, 84), dtype=torch.uint8, generator=g)
    agents = [build_agent("impala", "lstm", (4, 84, 84), 6, bf16=flag) for flag in (False, True)]
    agents[1].load_state_dict(agents[0].state_dict())
    with torch.no_grad():
        features = f32(obs[:256])
        diff = (features - bf16(obs[:256])).abs()
        seq = (
            obs[:256].view(8, 32, 4, 84, 84),
            torch.zeros(8, 32),
            torch.zeros(8, 32, dtype=torch.bool),
        )
        logits = [
            a(*seq, torch.zeros(8, 32, dtype=torch.long), a.initial_state(32))[0] for a in agents
        ]
    emit(
        section="torso",
        what="accuracy",
        max_abs_feature=round(features.abs().max().item(), 4),
        max_abs_feature_diff=round(diff.max().item(), 5),
        mean_abs_feature_diff=round(diff.mean().item(), 6),
        max_abs_logit=round(logits[0].abs().max().item(), 4),
        max_abs_logit_diff=round((logits[0] - logits[1]).abs().max().item(), 5),
    )
    for label, torso in (("f32", f32), ("bf16", bf16)):

        @torch.no_grad()
        def infer(torso=torso) -> None:
            torso(obs[:32])

        def train(torso=torso) -> None:
            torso.zero_grad(set_to_none=True)
            torso(obs).sum().backward()

        emit(section="torso", what="inference", dtype=label, B=32, ms=median_ms(infer, repeats * 3))
        emit(
            section="torso",
            what="fwd_bwd",
            dtype=label,
            N=T * B,
            ms=median_ms(train, max(repeats // 2, 1), warmup=1),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--threads", default="1,2", help="thread counts for train and act")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    threads = [int(n) for n in args.threads.split(",")]
    if "train" in sections:
        run_train(threads, args.repeats)
    if "recurrence" in sections:
        run_recurrence(threads, args.repeats)
    if "floor" in sections:
        run_floor(threads, args.repeats)
    if "act" in sections:
        run_act(threads, args.repeats)
    if "memory" in sections:
        run_memory()
    if "torso" in sections:
        run_torso(args.repeats)


if __name__ == "__main__":
    main()
