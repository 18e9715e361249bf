"""The fused C kernels of agents/cores/csrc: their build, their fallback, and their results at
the paper's head size against the per-step reference (the small-size parity, resets and hand
examples run in test_fast_weights_recurrent.py, where "fast" takes these kernels)."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest
import torch

from agents.cores import cpu_kernels, make_core
from tests.test_fast_weights_recurrent import NAMES, flat_outputs, make_case, resets, run

COMPILER = shutil.which(os.environ.get("CC", "cc"))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt under a private cache; the shared one is restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernels.library.cache_clear()


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
def test_kernels_build_once_and_are_reused(fresh_library):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.library() is not None
    built = list((fresh_library / "deltabeast").glob("fwp_cpu-*.so"))
    assert len(built) == 1
    inode = built[0].stat().st_ino  # a rebuild would land a new file by rename
    assert cpu_kernels._build() == built[0] and built[0].stat().st_ino == inode
    assert cpu_kernels.usable(torch.zeros(1))
    assert not cpu_kernels.usable(torch.zeros(1, dtype=torch.float64))
    assert not cpu_kernels.usable(torch.zeros(1, cpu_kernels.MAX_HEAD_DIM + 1))


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
def test_a_new_build_removes_builds_unused_for_a_month(fresh_library):
    cache = fresh_library / "deltabeast"
    cache.mkdir()
    stale, recent = cache / "fwp_cpu-stale.so", cache / "fwp_cpu-recent.so"
    for path, age_days in ((stale, 31), (recent, 29)):
        path.write_bytes(b"old build")
        then = time.time() - age_days * 24 * 3600
        os.utime(path, (then, then))
    current = cpu_kernels._build()
    assert current.exists() and recent.exists() and not stale.exists()
    os.utime(current, (0, 0))  # loading a build marks it as used
    assert cpu_kernels._build() == current and current.stat().st_mtime > time.time() - 60


def test_without_a_compiler_the_torch_path_serves_after_one_warning(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable.*torch fast paths"):
        assert cpu_kernels.library() is None
    assert not cpu_kernels.usable(torch.zeros(1))
    inputs, state = make_case("rdn", T=5, B=2, H=1, d=4)
    y, _ = run("rdn", inputs, resets(5, 2), state)
    y_ref, _ = run("rdn", inputs, resets(5, 2), state, impl="reference")
    torch.testing.assert_close(y, y_ref)


def test_switched_off_by_environment(fresh_library, monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.library() is None
    assert not list(fresh_library.glob("**/*.so"))


needs_kernels = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="fused CPU kernels not built here"
)


@needs_kernels
@pytest.mark.parametrize("state_grad", ["full", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_paper_head_size_matches_reference(name, state_grad):
    # d = 32 as in the paper (the vectorised inner loops), T = 50 with resets, 2 threads.
    T, B = 50, 3
    inputs, state = make_case(name, T, B, H=2, d=32, seed=11)
    done = resets(T, B)
    results = {}
    for impl in ("reference", "fast"):
        y, final = run(name, inputs, done, state, impl=impl, state_grad=state_grad)
        outs = flat_outputs(y, final)
        g = torch.Generator().manual_seed(12)
        cotangents = [torch.randn(o.shape, generator=g) for o in outs]
        results[impl] = [*outs, *torch.autograd.grad(outs, [*inputs, *state], cotangents)]
    for a, b in zip(results["reference"], results["fast"], strict=True):
        assert (a - b).abs().max() <= 2e-5 * max(a.abs().max(), 1.0)


@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_inference_and_thread_count_give_the_same_numbers(name):
    # Under no_grad the forward saves nothing for a backward; programs never share data, so
    # the result is bit-identical whatever the thread count.
    inputs, state = make_case(name, T=6, B=4, H=2, d=32, seed=13)
    done = resets(6, 4)
    y, final = run(name, inputs, done, state)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            y1, final1 = run(name, inputs, done, state)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(flat_outputs(y, final), flat_outputs(y1, final1), strict=True):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("state_grad", ["full", "none"])
@pytest.mark.parametrize(
    ("name", "head_dim"),
    [("lt", 16), ("lt", 32), ("delta", 16), ("delta", 32), ("delta_rnn", 16), ("delta_lstm", 16)],
)
def test_layer_reading_its_projection_matches_the_torch_path(name, head_dim, state_grad):
    # These layers hand their raw slow projection to the kernel, which applies the activations
    # itself and returns the projection's gradient; with the kernels off the same core takes
    # torch's activations and recurrence (lt and delta: the chunk-parallel and detached
    # forms). Resets inside, a non-zero initial state.
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_layers=2, num_heads=2, head_dim=head_dim, ff_size=64)
    core = make_core(name, 20, state_grad=state_grad, **sizes)
    T, B = 12, 3
    x = torch.randn(T, B, 20, requires_grad=True)
    state = tuple((0.3 * torch.randn_like(s)).requires_grad_() for s in core.initial_state(B))
    done = resets(T, B)
    results = {}
    for on in (True, False):
        with cpu_kernels.forced(on):
            y, final = core(x, done, state)
        outs = [y, *final]
        # lt and delta under "none" detach the final state on both routes
        differentiable = [o for o in outs if o.requires_grad]
        g = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=g) for o in differentiable]
        leaves = [x, *state, *core.parameters()]
        grads = torch.autograd.grad(differentiable, leaves, cotangents, allow_unused=True)
        pairs = zip(grads, leaves, strict=True)
        grads = [torch.zeros_like(v) if d is None else d for d, v in pairs]
        results[on] = [*outs, *grads, torch.tensor([float(o.requires_grad) for o in outs])]
    for a, b in zip(results[True], results[False], strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(a.abs().max(), 1.0)
