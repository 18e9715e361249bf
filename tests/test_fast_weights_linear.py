"""linear_attention and delta_rule: hand-computed steps, resets, state carry-over, gradients."""

import pytest
import torch

from agents.cores.fast_weights import delta_rule, linear_attention, phi

IMPL_LIST = ["reference", "fast"]
NAMES = {"lt": ["q", "k", "v", "W"], "delta": ["q", "k", "v", "beta", "W"]}
# Resets at t=0, two in a row, at chunk starts and ends and inside chunks for the sizes below.
RESETS = [(0, 0), (7, 0), (12, 0), (5, 1), (6, 1), (4, 2), (9, 2)]


def _run(rule: str, inputs: dict, impl: str, **kw):
    if rule == "lt":
        return linear_attention(
            inputs["q"], inputs["k"], inputs["v"], inputs["done"], inputs["W"], impl=impl, **kw
        )
    return delta_rule(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["beta"],
        inputs["done"],
        inputs["W"],
        impl=impl,
        **kw,
    )


def _inputs(T=12, B=3, H=2, d=4, dtype=torch.float32, seed=0, resets=()):
    """Well-scaled inputs: φ-activated q/k, sigmoid β, unit-variance v, non-zero initial W."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    done = torch.zeros(T, B, dtype=torch.bool)
    for t, b in resets:
        done[t, b] = True
    return {
        "q": phi(r(T, B, H, d)),
        "k": phi(r(T, B, H, d)),
        "v": r(T, B, H, d),
        "beta": torch.sigmoid(r(T, B, H, 1)),
        "done": done,
        "W": 0.5 * r(B, H, d, d),
    }


def _slice(inputs: dict, start: int, stop: int, W) -> dict:
    out = {n: x[start:stop] for n, x in inputs.items() if n != "W"}
    out["W"] = W
    return out


def _close(actual, expected, tol=1e-5):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol * scale)


def test_phi_normalises_elu_plus_one():
    x = torch.tensor([0.0, 1.0, -1.0])
    p = torch.tensor([1.0, 2.0, torch.exp(torch.tensor(-1.0)).item()])
    torch.testing.assert_close(phi(x), p / (p.sum() + 1e-5))


@pytest.mark.parametrize("impl", IMPL_LIST)
def test_linear_attention_hand_computed(impl):
    # d=2, one-hot keys, W starts at 0. Step 0 writes kᵀv = [[2,3],[0,0]] and reads it at once.
    q = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[2.0, 3.0], [4.0, 5.0]])
    shape = (2, 1, 1, 2)
    y, W = linear_attention(
        q.view(shape),
        k.view(shape),
        v.view(shape),
        torch.zeros(2, 1, dtype=torch.bool),
        torch.zeros(1, 1, 2, 2),
        impl=impl,
    )
    torch.testing.assert_close(y.view(2, 2), torch.tensor([[1.0, 1.5], [6.0, 8.0]]))
    torch.testing.assert_close(W.view(2, 2), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


@pytest.mark.parametrize("impl", IMPL_LIST)
def test_delta_rule_hand_computed(impl):
    # d=2, W starts at 0, β=0.5, the same one-hot key twice so the second write corrects the first.
    # Step 0: v̄=0, W=[[1,1.5],[0,0]], y0 = β·v0·(k0·q0) = 0.5·[2,3]·0.5 = [0.5,0.75].
    # Step 1: v̄ = k1 W = [1,1.5]; W += k1ᵀ·0.5·([4,1]-[1,1.5]) -> [[2.5,1.25],[0,0]]; y1 = q1 W.
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[2.0, 3.0], [4.0, 1.0]])
    shape = (2, 1, 1, 2)
    y, W = delta_rule(
        q.view(shape),
        k.view(shape),
        v.view(shape),
        torch.full((2, 1, 1, 1), 0.5),
        torch.zeros(2, 1, dtype=torch.bool),
        torch.zeros(1, 1, 2, 2),
        impl=impl,
    )
    torch.testing.assert_close(y.view(2, 2), torch.tensor([[0.5, 0.75], [2.5, 1.25]]))
    torch.testing.assert_close(W.view(2, 2), torch.tensor([[2.5, 1.25], [0.0, 0.0]]))


@pytest.mark.parametrize("impl", IMPL_LIST)
@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_reset_equals_fresh_unroll(rule, impl):
    T, k = 10, 4
    inputs = _inputs(T=T, resets=[(k, b) for b in range(3)])
    y, W = _run(rule, inputs, impl)
    fresh = _slice(inputs, k, T, torch.zeros_like(inputs["W"]))
    y_fresh, W_fresh = _run(rule, fresh, impl)
    _close(y[k:], y_fresh)
    _close(W, W_fresh)
    # The steps before the reset did see the initial state.
    assert not torch.allclose(y[:k], _run(rule, _slice(inputs, 0, k, fresh["W"]), impl)[0])


@pytest.mark.parametrize("impl", IMPL_LIST)
@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_carry_over_equals_one_call(rule, impl):
    T, k = 11, 5
    inputs = _inputs(T=T, resets=[(0, 0), (3, 1), (5, 2), (8, 0)])
    y, W = _run(rule, inputs, impl)
    y1, W1 = _run(rule, _slice(inputs, 0, k, inputs["W"]), impl)
    y2, W2 = _run(rule, _slice(inputs, k, T, W1), impl)
    _close(torch.cat([y1, y2]), y)
    _close(W2, W)


@pytest.mark.parametrize("impl", IMPL_LIST)
@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_state_not_modified_in_place(rule, impl):
    inputs = _inputs(resets=[(2, 0), (6, 1)])
    W = inputs["W"]
    before, version = W.clone(), W._version
    _, W_new = _run(rule, inputs, impl)
    assert W._version == version
    torch.testing.assert_close(W, before, rtol=0.0, atol=0.0)
    assert W_new.data_ptr() != W.data_ptr()


# Chunks (padding): 13 | 4,4,4,1 (3) | 5,5,3 (2) | 4,4,4 | 1 each | 7,6 (1)
@pytest.mark.parametrize("T, chunk", [(13, 64), (13, 4), (13, 5), (12, 4), (13, 1), (13, 7)])
@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_fast_matches_reference(rule, T, chunk):
    inputs = _inputs(T=T, resets=[(t, b) for t, b in RESETS if t < T])
    names = NAMES[rule]
    g = torch.Generator().manual_seed(1)
    results = []
    for impl in IMPL_LIST:
        leaves = {n: inputs[n].clone().requires_grad_() for n in names}
        y, W = _run(rule, {**inputs, **leaves}, impl, chunk_size=chunk)
        gy = torch.randn(y.shape, generator=g) if not results else results[0][2]
        gW = torch.randn(W.shape, generator=g) if not results else results[0][3]
        grads = torch.autograd.grad([y, W], list(leaves.values()), [gy, gW])
        results.append((y, W, gy, gW, grads))
    (y_ref, W_ref, _, _, g_ref), (y_fast, W_fast, _, _, g_fast) = results
    _close(y_fast, y_ref)
    _close(W_fast, W_ref)
    for name, a, b in zip(names, g_fast, g_ref, strict=True):
        assert b.abs().max() > 0, name
        _close(a, b)


@pytest.mark.parametrize("impl, T, chunk", [("reference", 4, 64), ("fast", 4, 64), ("fast", 5, 2)])
@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_gradcheck_float64(rule, impl, T, chunk):
    resets = [(0, 0), (2, 1), (3, 1)]  # with T=5, chunk=2: three chunks of 2, the last one padded
    inputs = _inputs(T=T, B=2, H=1, d=3, dtype=torch.float64, resets=resets)
    names = NAMES[rule]
    leaves = [inputs[n].clone().requires_grad_() for n in names]

    def f(*xs):
        return _run(rule, {**inputs, **dict(zip(names, xs, strict=True))}, impl, chunk_size=chunk)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("rule", ["lt", "delta"])
def test_unknown_impl_names_the_valid_ones(rule):
    with pytest.raises(ValueError, match="reference, fast"):
        _run(rule, _inputs(T=2), "cuda")


@pytest.mark.parametrize("chunk", [0, -1, 2.0])
def test_bad_chunk_size_is_rejected(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        _run("delta", _inputs(T=2), "fast", chunk_size=chunk)


def test_bad_shapes_are_rejected():
    inputs = _inputs(T=3)
    with pytest.raises(ValueError, match="beta must be"):
        _run("delta", {**inputs, "beta": inputs["beta"][..., 0]}, "fast")
    with pytest.raises(ValueError, match="W must be"):
        _run("lt", {**inputs, "W": inputs["W"][:1]}, "fast")
    with pytest.raises(ValueError, match="done must be"):
        _run("lt", {**inputs, "done": inputs["done"].float()}, "fast")
    with pytest.raises(ValueError, match="at least one step"):
        _run("lt", _slice(inputs, 0, 0, inputs["W"]), "fast")
