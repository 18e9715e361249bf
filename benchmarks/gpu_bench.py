"""GPU checks for issue 8: core parity on CUDA, core fwd+bwd timings, learner steps/s.

Runs on a bare GPU host (torch only; no gymnasium/ale-py needed). One JSON object per line:
  - parity: every FWP core, fast vs per-step reference on CUDA (outputs, input and parameter
    gradients, with resets inside the unroll), and CUDA fast vs CPU fast;
  - core: fwd+bwd ms at T=50/B=32 (paper) and T=512/B=32 for fast and reference impls, next to
    cuDNN nn.LSTM(257, 256); the fast impl is the fused Triton kernels (when triton is
    installed), timed next to the torch fast path they replace and, for the layers whose
    kernels read the raw projection in place, next to the split route (activations as torch ops);
  - recurrence: the same comparison for one layer's recurrence alone (H=4, d=32), no block;
  - profile: device activities per core fwd+bwd (T=50), their device time against the wall
    time (how launch-bound each core is);
  - graphed: core fwd+bwd (T=50) captured in CUDA graphs, next to cuDNN LSTM's likewise;
  - learner: paper preset learner (IMPALA ResNet + core, T=50, B=32) steps/s, f32, bf16 torso
    and bf16 torso + FWP core linear layers.

    python benchmarks/gpu_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import build_agent, make_core  # noqa: E402
from agents.cores import fast_weights as fw  # noqa: E402
from agents.cores import triton_kernels  # noqa: E402
from agents.cores.fwp import FastWeightLayer  # noqa: E402
from benchmarks._common import median_seconds, random_batch  # noqa: E402
from runners.config import LearnerConfig  # noqa: E402
from runners.learner import Learner  # noqa: E402

FWP = ("lt", "delta", "delta_rnn", "delta_lstm", "rdn")
# core -> (its recurrence, how many time-major inputs, which of them are β (width 1))
RECURRENCES = {
    "lt": (fw.linear_attention, 3, ()),
    "delta": (fw.delta_rule, 4, (3,)),
    "delta_rnn": (fw.delta_rnn, 7, (3, 6)),
    "delta_lstm": (fw.delta_lstm, 7, (3, 6)),
    "rdn": (fw.rdn, 4, (3,)),
}
INPUT = 257


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(t: int, b: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, b, INPUT, generator=gen)
    done = torch.rand(t, b, generator=gen) < 0.1
    done[0, 0] = done[t // 2, 1] = done[t // 2 + 1, 1] = True
    return x.to(device), done.to(device)


def run_core(core, x, done, state):
    x = x.detach().requires_grad_(True)
    y, new_state = core(x, done, state)
    loss = y.pow(2).sum() + sum(s.pow(2).sum() for s in new_state)
    grads = torch.autograd.grad(loss, [x, *core.parameters()])
    return y.detach(), grads


def max_rel_diff(a, b) -> float:
    """Largest |a - b| relative to the largest |b|, over a list of tensor pairs."""
    return max(
        float((u.cpu() - v.cpu()).abs().max() / v.abs().max().clamp_min(1e-12).cpu())
        for u, v in zip(a, b, strict=True)
    )


def parity(name: str) -> None:
    torch.manual_seed(0)
    fast = make_core(name, INPUT).to(DEVICE)
    reference = make_core(name, INPUT, impl="reference").to(DEVICE)
    reference.load_state_dict(fast.state_dict())
    x, done = inputs(50, 8, DEVICE)
    gen = torch.Generator().manual_seed(1)
    state = tuple(
        (0.1 * torch.randn(s.shape, generator=gen)).to(DEVICE)
        for s in fast.initial_state(8, DEVICE)
    )
    y_fast, g_fast = run_core(fast, x, done, state)
    y_ref, g_ref = run_core(reference, x, done, state)
    cpu = make_core(name, INPUT)
    cpu.load_state_dict(fast.state_dict())
    y_cpu, g_cpu = run_core(cpu, x.cpu(), done.cpu(), tuple(s.cpu() for s in state))
    out_diff = max_rel_diff([y_fast], [y_ref])
    grad_diff = max_rel_diff(g_fast, g_ref)
    emit(
        check="parity",
        core=name,
        relative_error="max |a-b| / max |b| per tensor, worst tensor",
        fast_vs_reference_output=out_diff,
        fast_vs_reference_grad=grad_diff,
        cuda_vs_cpu_output=max_rel_diff([y_fast], [y_cpu]),
        cuda_vs_cpu_grad=max_rel_diff(g_fast, g_cpu),
        ok=out_diff < 1e-5 and grad_diff < 1e-3,  # grads: a ReLU unit at its kink may flip
    )


def core_step(name: str, impl: str, t: int, b: int) -> Callable[[], None]:
    """One fwd+bwd of a core (or of cuDNN's LSTM, ``lstm_cudnn``) at input 257, zero state."""
    if name == "lstm_cudnn":
        core = torch.nn.LSTM(INPUT, 256).to(DEVICE)
        x, _ = inputs(t, b, DEVICE)

        def step():
            y, _ = core(x.requires_grad_(True))
            y.sum().backward()

        return step
    core = make_core(name, INPUT, impl=impl).to(DEVICE)
    x, done = inputs(t, b, DEVICE)
    state = core.initial_state(b, DEVICE)

    def step():
        y, _ = core(x.requires_grad_(True), done, state)
        y.sum().backward()

    return step


def core_time(name: str, impl: str, t: int, b: int, seconds: float) -> float:
    return 1000 * median_seconds(core_step(name, impl, t, b), seconds, sync=sync)


def split_projection():
    """The layers hand the recurrence activated, split fields (torch ops) instead of their raw
    projection: the route before the kernels read it in place, for an A/B in one run."""
    return mock.patch.object(FastWeightLayer, "_in_place_kernel", lambda self, projected: None)


class _FlatCore(torch.nn.Module):
    """A core (or nn.LSTM) with flat tensor inputs and outputs, for make_graphed_callables."""

    def __init__(self, core: torch.nn.Module, done: torch.Tensor | None) -> None:
        super().__init__()
        self.core, self.done = core, done

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.done is None:
            y, (h, c) = self.core(x)
            return y, h, c
        y, new_state = self.core(x, self.done, state)
        return (y, *new_state)


def graphed_time(name: str, t: int, b: int, seconds: float) -> float:
    """fwd+bwd ms of a core captured in CUDA graphs (torch.cuda.make_graphed_callables): what
    is left once the host no longer launches the kernels one by one."""
    x, done = inputs(t, b, DEVICE)
    x.requires_grad_(True)
    if name == "lstm_cudnn":
        flat, state = _FlatCore(torch.nn.LSTM(INPUT, 256).to(DEVICE), None), ()
    else:
        core = make_core(name, INPUT).to(DEVICE)
        flat, state = _FlatCore(core, done), core.initial_state(b, DEVICE)
    graphed = torch.cuda.make_graphed_callables(flat, (x, *state))

    def step():
        graphed(x, *state)[0].sum().backward()

    return 1000 * median_seconds(step, seconds, sync=sync)


def launch_profile(name: str, t: int, b: int, calls: int = 5) -> None:
    """Device activities (kernels, copies, fills) per fwd+bwd and their summed device time: set
    against the core check's fwd+bwd time, how launch-bound a core is. The wall time under the
    profiler is reported too, but the profiler inflates it (cuDNN's LSTM most)."""
    step = core_step(name, "fast", t, b)
    for _ in range(2):
        step()
    sync()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync()
    wall = (time.perf_counter() - start) / calls
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    emit(
        check="profile",
        core=name,
        T=t,
        B=b,
        device_activities=len(device) / calls,
        device_busy_ms=sum(e.time_range.elapsed_us() for e in device) / calls / 1000,
        wall_ms_profiled=1000 * wall,
    )


def recurrence_time(name: str, t: int, b: int, seconds: float) -> float:
    """fwd+bwd ms of one recurrence call (H=4, d=32) on activated random inputs, zero state."""
    h, d = 4, 32
    gen = torch.Generator().manual_seed(0)
    gates = (3,) if name == "delta_lstm" else ()
    fn, n_seq, scalar = RECURRENCES[name]

    def leaf(x):
        return x.to(DEVICE).requires_grad_(True)

    seq = [
        leaf(torch.randn(t, b, h, *gates, 1, generator=gen).sigmoid())
        if i in scalar
        else leaf(torch.randn(t, b, h, *gates, d, generator=gen).softmax(-1))
        for i in range(n_seq)
    ]
    slow = [leaf(torch.randn(h, d, d, generator=gen) * d**-0.5) for _ in range(3)]
    slow = [*slow, leaf(torch.randn(h, d, generator=gen) * d**-0.5)] if name == "rdn" else []
    layer = make_core(name, INPUT).fwps[0]
    state = tuple(torch.zeros(b, *shape, device=DEVICE) for shape in layer.state_shapes())
    state = state[0] if name in ("lt", "delta") else state  # their state is W alone
    _, done = inputs(t, b, DEVICE)

    def step():
        y, _ = fn(*seq, *slow, done, state)
        y.sum().backward()

    return 1000 * median_seconds(step, seconds, sync=sync)


def learner_rate(core: str, torso: str, bf16: str, seconds: float) -> float:
    """Agent steps/s of learner updates; bf16: "none", "torso" or "torso+core" (FWP linears)."""
    torch.manual_seed(0)
    core_kwargs = {"bf16": True} if bf16 == "torso+core" else {}
    agent = build_agent(
        torso, core, (4, 84, 84), 6, core_kwargs=core_kwargs, bf16=bf16 != "none"
    ).to(DEVICE)
    cfg = LearnerConfig()
    learner = Learner(agent, cfg, 10**9, torch.device(DEVICE))
    batch = random_batch(50, 32, (4, 84, 84), 6, agent.initial_state(32), device=DEVICE)
    return 50 * 32 / median_seconds(lambda: learner.update(batch), seconds, sync=sync)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--checks", default="parity,core,profile,graphed,learner", help="which checks to run"
    )
    parser.add_argument("--lengths", default="50,512", help="unroll lengths T to time")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    seconds = 0.5 if args.quick else args.seconds
    emit(
        check="device",
        name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        cudnn=torch.backends.cudnn.version(),
        triton=importlib.import_module("triton").__version__
        if triton_kernels.triton_installed()
        else None,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checks = args.checks.split(",")
    for name in FWP if "parity" in checks else ():
        parity(name)
    for t in () if "core" not in checks else (int(v) for v in args.lengths.split(",")):
        lstm_ms = core_time("lstm_cudnn", "fast", t, 32, seconds)
        emit(check="core", core="lstm_cudnn", impl="cudnn", T=t, B=32, fwd_bwd_ms=lstm_ms)
        for name in FWP:
            fast_ms = core_time(name, "fast", t, 32, seconds)
            ref_ms = core_time(name, "reference", t, 32, seconds)
            kernels = DEVICE == "cuda" and triton_kernels.triton_installed()
            extra = {}
            if kernels:
                with triton_kernels.forced(False):
                    extra["torch_fast_ms"] = core_time(name, "fast", t, 32, seconds)
                extra["triton_speedup_vs_torch_fast"] = extra["torch_fast_ms"] / fast_ms
                with split_projection():
                    extra["triton_split_projection_ms"] = core_time(name, "fast", t, 32, seconds)
            emit(
                check="core",
                core=name,
                T=t,
                B=32,
                fast_impl="triton" if kernels else "torch",
                fast_ms=fast_ms,
                reference_ms=ref_ms,
                speedup_vs_reference=ref_ms / fast_ms,
                ratio_to_cudnn_lstm=fast_ms / lstm_ms,
                **extra,
            )
            if kernels:
                triton_ms = recurrence_time(name, t, 32, seconds)
                with triton_kernels.forced(False):
                    torch_ms = recurrence_time(name, t, 32, seconds)
                emit(check="recurrence", core=name, T=t, B=32, triton_ms=triton_ms,
                     torch_fast_ms=torch_ms, triton_speedup=torch_ms / triton_ms)  # fmt: skip
    for name in ("lstm_cudnn", *FWP) if "profile" in checks else ():
        try:
            launch_profile(name, 50, 32)
        except Exception as error:  # a profiler problem must not cost the rest of the run
            emit(check="profile", core=name, error=repr(error))
    learners = (("impala", "rdn"), ("impala", "delta"), ("impala", "lstm"))
    for torso, core in learners if "learner" in checks else ():
        for bf16 in ("none", "torso", "torso+core") if core != "lstm" else ("none", "torso"):
            rate = learner_rate(core, torso, bf16, seconds * 2)
            emit(check="learner", torso=torso, core=core, bf16=bf16, T=50, B=32, steps_per_s=rate)
    # last: a failed capture could leave the CUDA context unusable for what follows
    for name in ("lstm_cudnn", *FWP) if "graphed" in checks else ():
        try:
            ms = graphed_time(name, 50, 32, seconds)
            emit(check="graphed", core=name, T=50, B=32, fwd_bwd_ms=ms)
        except Exception as error:  # capture may not support every core; keep the run going
            emit(check="graphed", core=name, error=repr(error)[:500])


if __name__ == "__main__":
    main()
