"""The fused Triton kernels of every recurrence against their per-step references.

On a CUDA machine the compiled kernels run in this process. Without one, the same comparisons run
in a subprocess under ``TRITON_INTERPRET=1`` (which must be set before triton is imported) on CPU
tensors, and every kernel is also compiled for sm_90 to catch what the interpreter cannot.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from agents.cores import cpu_kernels, make_core, triton_kernels
from agents.cores import fast_weights as fw
from tests.test_fast_weights_recurrent import make_case, resets

pytest.importorskip("triton", reason="triton is not installed (optional; used on CUDA only)")

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
TOLERANCE = 1e-5
# Each recurrence's kernels live in agents/cores/triton_<name>.py, entry point <name>; the two
# linear rules share triton_delta_rule.
ARG_NAMES = {
    "rdn": ("qx", "kx", "vx", "bx", "Rq", "Rk", "Rv", "rb", "W0", "y0"),
    "delta_rnn": ("q", "k", "v", "beta", "rk", "rv", "rbeta", "W0", "R0", "y0"),
    "delta_lstm": ("q", "k", "v", "beta", "rk", "rv", "rbeta", "W0", "R0", "h0", "c0"),
    "delta_rule": ("q", "k", "v", "beta", "W0"),
    "linear_attention": ("q", "k", "v", "W0"),
}
LINEAR = ("delta_rule", "linear_attention")  # state W alone, no state_grad argument
SEQUENTIAL = ("rdn", "delta_rnn", "delta_lstm")
FUNCTIONS = {  # the autograd Function of each recurrence's kernels (and CPU fast path)
    "rdn": "_RDN",
    "delta_rnn": "_DeltaRNN",
    "delta_lstm": "_DeltaLSTM",
    "delta_rule": "_FastWeight",
    "linear_attention": "_FastWeight",
}
CORES = {"delta_rule": "delta", "linear_attention": "lt"}  # the core of each recurrence
# (recurrence, state_grad, head dim): tiny shapes, the interpreter runs every program in Python.
CASES = [
    (name, state_grad, d)
    for name in ARG_NAMES
    for state_grad, d in (("full", 16), ("none", 16), ("full", 32))
    if state_grad == "full" or name not in LINEAR
]
MODULES = ("rdn", "delta_rnn", "delta_lstm", "delta_rule")  # agents.cores.triton_<module>


def kernel_module(name: str):
    return importlib.import_module(
        f"agents.cores.triton_{'delta_rule' if name in LINEAR else name}"
    )


def make_inputs(name: str, T: int, B: int, H: int, d: int, seed: int):
    """``make_case``'s inputs; the linear rules take q, k, v (and β) and W of the Delta RNN's."""
    if name not in LINEAR:
        return make_case(name, T, B, H, d, seed=seed)
    inputs, state = make_case("delta_rnn", T, B, H, d, seed=seed)
    return inputs[: len(ARG_NAMES[name]) - 1], state[:1]


def call(fn, name: str, inputs, done, state, state_grad: str):
    """Run a recurrence (reference or kernels) with the uniform (y, final-state tuple) result."""
    if name in LINEAR:
        y, W = fn(*inputs, done, state[0])
        return y, (W,)
    return fn(*inputs, done, state, state_grad=state_grad)


def case_id(case: tuple[str, str, int]) -> str:
    return "-".join(map(str, case))


def errors(name: str, state_grad: str, d: int, device: str) -> dict[str, float]:
    """Largest |Triton − reference| of the outputs and of each input's gradient.

    T=7 with resets at t=0, at two consecutive steps and over the whole batch in the middle, a
    non-zero initial state, and a random cotangent on the outputs and the final state; then the
    gradients again with a cotangent on the outputs alone (the learner's case: the kernels then
    get no gradient for the final state, not zeros).
    """
    T, B, H = 7, 3, 2
    inputs, state = make_inputs(name, T, B, H, d, seed=1)
    leaves = [x.detach().to(device).requires_grad_() for x in (*inputs, *state)]
    inputs, state = leaves[: len(inputs)], tuple(leaves[len(inputs) :])
    done = resets(T, B).to(device)
    kernel = getattr(kernel_module(name), name)
    runs = []
    for fn in (lambda *a, **k: getattr(fw, name)(*a, impl="reference", **k), kernel):
        y, final = call(fn, name, inputs, done, state, state_grad)
        outputs = [y, *final]
        gen = torch.Generator().manual_seed(2)
        cotangents = [torch.randn(o.shape, generator=gen).to(device) for o in outputs]
        loss = sum((o * c).sum() for o, c in zip(outputs, cotangents, strict=True))
        grads = torch.autograd.grad(loss, leaves, retain_graph=True)
        y_alone = torch.autograd.grad((y * cotangents[0]).sum(), leaves, allow_unused=True)
        runs.append(([o.detach() for o in outputs], grads, y_alone))
    (out_ref, grad_ref, alone_ref), (out_tri, grad_tri, alone_tri) = runs
    result = {
        "outputs": max(float((a - b).abs().max()) for a, b in zip(out_ref, out_tri, strict=True))
    }
    for arg, a, b in zip(ARG_NAMES[name], grad_ref, grad_tri, strict=True):
        result[f"grad {arg}"] = float((a - b).abs().max())
    for arg, a, b in zip(ARG_NAMES[name], alone_ref, alone_tri, strict=True):
        a, b = (torch.zeros(()) if g is None else g for g in (a, b))
        result[f"grad {arg}, outputs alone"] = float((a - b).abs().max())
    return result


def core_errors(name: str, device: str, state_grad: str = "full") -> dict:
    """|kernels − torch fast path| / max(1, |torch fast path|) of a whole one-layer core (the
    dispatch from ``impl="fast"``: the raw projection read in place and activated by the
    kernels): output, final state, gradients w.r.t. the input,
    the initial state and every parameter; and per run, whether it used the kernels and whether
    the projection stayed whole (no split into fields)."""
    T, B = 5, 2
    torch.manual_seed(0)
    sizes = dict(hidden_size=16, num_layers=1, num_heads=2, head_dim=16, ff_size=16)
    core = make_core(CORES.get(name, name), 8, state_grad=state_grad, **sizes)
    core = core.to(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, 8, generator=gen).to(device)
    state = [(0.3 * torch.randn(s.shape, generator=gen)).to(device) for s in core.initial_state(B)]
    done = resets(T, B).to(device)
    runs, paths = [], []
    for kernels in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, *state)]
        # On CUDA the kernels come from the dispatch itself; the interpreter must be forced.
        with triton_kernels.forced(kernels) if not kernels or device == "cpu" else nullcontext():
            y, final = core(leaves[0], done, tuple(leaves[1:]))
        nodes = graph_node_names(y)
        in_place = "SplitWithSizesBackward0" not in nodes  # the projection was not split
        paths.append((f"{FUNCTIONS[name]}TritonBackward" in nodes, in_place))
        loss = y.square().sum() + sum(f.square().sum() for f in final)
        grads = torch.autograd.grad(loss, [*leaves, *core.parameters()])
        runs.append([t.detach() for t in (y, *final, *grads)])
    torch_fast, kernels = runs
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1))
        for a, b in zip(kernels, torch_fast, strict=True)
    )
    return {"worst": worst, "paths": paths}


def graph_node_names(y: torch.Tensor) -> set[str]:
    """Class names of every autograd node y depends on."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def _patch_interpreter() -> None:
    """triton 3.5's interpreter turns 1-element arrays into ints in a way numpy ≥ 2.4 rejects
    (triton-lang/triton#9171, fixed after 3.5); ``range`` over a kernel argument needs it."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor):
        patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patched


def all_errors(device: str) -> dict[str, dict]:
    found = {case_id(c): errors(*c, device=device) for c in CASES}
    found |= {f"core-{name}": core_errors(name, device) for name in ARG_NAMES}
    return found | {f"core-{name}-none": core_errors(name, device, "none") for name in SEQUENTIAL}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    if CUDA:
        return all_errors("cuda")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_triton_kernels"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(results, case):
    errs = results[case_id(case)]
    bad = {k: v for k, v in errs.items() if not v <= TOLERANCE}
    assert not bad, f"{case_id(case)}: max |triton - reference| above {TOLERANCE}: {bad}"


@pytest.mark.parametrize("name", [*ARG_NAMES, *(f"{name}-none" for name in SEQUENTIAL)])
def test_core_matches_torch_fast_path(results, name):
    worst, paths = results[f"core-{name}"]["worst"], results[f"core-{name}"]["paths"]
    (torch_kernels, _), (kernels, in_place) = paths
    assert (torch_kernels, kernels) == (False, True), f"{name} core: kernels used in {paths}"
    assert in_place, f"{name} core: the projection was split before the kernels"
    assert worst <= TOLERANCE, f"{name} core: kernels vs torch fast path, relative error {worst}"


def arg_type(name: str, consts: dict) -> str:
    """A kernel argument's type for ``triton.compile``: T, B, H, STEPS are i32, done a bool
    pointer, the rest (but constexprs) f32 pointers."""
    if name in consts:
        return "constexpr"
    if name == "done":
        return "*i1"
    return "i32" if name in ("T", "B", "H", "STEPS") else "*fp32"


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.skipif(CUDA, reason="the CUDA run above compiles and runs the kernels")
def test_kernels_compile_for_sm90(name):
    """Every kernel compiles for an H100/H200 (sm_90) at head dims 32 and 64, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = kernel_module(name)
    for kernel in module.KERNELS:
        flags = [p.name for p in kernel.params if p.is_constexpr and p.name != "D"]
        for d in (32, 64):
            for value in (True, False) if flags else (None,):
                consts = {"D": d, **{flag: value for flag in flags}}
                signature = {p: arg_type(p, consts) for p in kernel.arg_names}
                triton.compile(
                    ASTSource(kernel, signature=signature, constexprs=consts),
                    target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": module.NUM_WARPS[d]},
                )


def test_projected_entry_points():
    """Every layer hands the kernels its raw projection, but the linear rules' detached variant
    (a torch parallel form)."""
    for kind in ("lt", "delta", "delta_rnn", "delta_lstm", "rdn"):
        assert callable(triton_kernels.projected(kind, "full"))
    for kind in ("delta_rnn", "delta_lstm", "rdn"):
        assert callable(triton_kernels.projected(kind, "none"))
    assert triton_kernels.projected("lt", "none") is None
    assert triton_kernels.projected("delta", "none") is None


@pytest.mark.parametrize("name", list(ARG_NAMES))
def test_impl_fast_dispatch(name):
    """CPU tensors keep the CPU fast path (the C kernels where built, else torch); CUDA
    tensors (when present) take the Triton kernels."""
    inputs, state = make_inputs(name, 3, 2, 2, 16, seed=0)
    fn = getattr(fw, name)
    y, _ = call(fn, name, inputs, resets(3, 2), tuple(state), "full")
    assert f"{FUNCTIONS[name]}TritonBackward" not in graph_node_names(y)
    if name in SEQUENTIAL:
        cpu = "Cpu" if cpu_kernels.library() is not None else "Fast"
        assert type(y.grad_fn).__name__ == f"{FUNCTIONS[name]}{cpu}Backward"
        with cpu_kernels.forced(False):
            y, _ = call(fn, name, inputs, resets(3, 2), tuple(state), "full")
        assert type(y.grad_fn).__name__ == f"{FUNCTIONS[name]}FastBackward"
    if CUDA:
        cuda = [x.detach().cuda().requires_grad_() for x in (*inputs, *state)]
        y, _ = call(fn, name, cuda[: len(inputs)], resets(3, 2).cuda(), cuda[len(inputs) :], "full")
        assert type(y.grad_fn).__name__ == f"{FUNCTIONS[name]}TritonBackward"


if __name__ == "__main__":  # the interpreter run of ``results``, in a fresh process
    _patch_interpreter()
    print(json.dumps(all_errors("cpu")))
