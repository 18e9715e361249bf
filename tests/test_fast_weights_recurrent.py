"""Tests for the recurrent fast-weight recurrences: delta_rnn, rdn, delta_lstm (DESIGN §3)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from agents.cores import chunked_recurrences, cpu_kernels
from agents.cores.recurrent_fast_weights import delta_lstm, delta_rnn, rdn

NAMES = ("delta_rnn", "rdn", "delta_lstm")
FUNCS = {"delta_rnn": delta_rnn, "rdn": rdn, "delta_lstm": delta_lstm}
# "fast" takes the fused C kernels where they are built; "fast-torch" the torch fast path.
FAST_PATHS = ("fast", "fast-torch")
IMPLS = ("reference", *FAST_PATHS)


def make_case(name, T, B, H, d, dtype=torch.float32, seed=0, zero_state=False):
    """Random leaf inputs (already activated where the API expects it) and a non-zero state."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    gates = (3,) if name == "delta_lstm" else ()
    seq, col = (T, B, H, *gates, d), (T, B, H, *gates, 1)
    mat, vec = (B, H, *gates, d, d), (B, H, d)
    if name == "rdn":
        scale = d**-0.5
        inputs = [rnd(*seq), rnd(*seq), rnd(*seq), rnd(*col)]
        inputs += [rnd(H, d, d) * scale for _ in range(3)] + [rnd(H, d) * scale]
        state = [rnd(*mat) * 0.3, rnd(*vec)]
    else:
        if name == "delta_rnn":
            qk = torch.softmax(rnd(*seq), -1), torch.softmax(rnd(*seq), -1)
        else:  # φ of DESIGN §3
            qk = tuple(
                (y := torch.nn.functional.elu(rnd(*seq)) + 1) / (y.sum(-1, keepdim=True) + 1e-5)
                for _ in range(2)
            )
        inputs = [*qk, rnd(*seq), torch.sigmoid(rnd(*col))]
        inputs += [torch.softmax(rnd(*seq), -1), rnd(*seq), torch.sigmoid(rnd(*col))]
        state = [rnd(*mat) * 0.3, rnd(*mat) * 0.3, rnd(*vec)]
        if name == "delta_lstm":
            state.append(rnd(*vec))
    if zero_state:
        state = [torch.zeros_like(s) for s in state]
    inputs = [x.detach().requires_grad_() for x in inputs]
    state = [s.detach().requires_grad_() for s in state]
    return inputs, state


def resets(T, B):
    """Resets at t=0, at two consecutive steps, and a whole-batch reset in the middle."""
    done = torch.zeros(T, B, dtype=torch.bool)
    done[0, 0] = True
    done[2:4, B - 1] = True
    done[T // 2] = True
    return done


def slice_time(name, inputs, start, stop):
    """Cut the time-major inputs to [start, stop); rdn's slow weights are not sequences."""
    n_seq = 4 if name == "rdn" else 7
    return [x[start:stop] for x in inputs[:n_seq]] + list(inputs[n_seq:])


def call(fn, *args, impl="fast", **kw):
    """fn(*args) on one path of IMPLS ("fast-torch": impl="fast" with the C kernels off)."""
    with cpu_kernels.forced(False) if impl == "fast-torch" else contextlib.nullcontext():
        return fn(*args, impl=impl.removesuffix("-torch"), **kw)


def run(name, inputs, done, state, **kw):
    return call(FUNCS[name], *inputs, done, tuple(state), **kw)


def flat_outputs(y, state):
    return [y, *state]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, impl):
    # Only "full" is a true gradient; "none" is a surrogate that finite differences cannot check.
    inputs, state = make_case(name, T=3, B=2, H=1, d=2, dtype=torch.float64)
    done = torch.tensor([[True, False], [False, True], [False, True]])

    def f(*xs):
        n = len(inputs)
        return flat_outputs(*run(name, xs[:n], done, xs[n:], impl=impl))

    # The fast path is also held to the reference below: a random-projection check suffices.
    assert torch.autograd.gradcheck(f, (*inputs, *state), fast_mode=impl == "fast")


@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("state_grad", ["full", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_fast_matches_reference(name, state_grad, T):
    B = 3
    inputs, state = make_case(name, T, B, H=2, d=4, seed=6)
    done = resets(T, B) if T > 1 else torch.tensor([[True, False, False]])
    results = {}
    for impl in IMPLS:
        y, final = run(name, inputs, done, state, impl=impl, state_grad=state_grad)
        outs = flat_outputs(y, final)
        g = torch.Generator().manual_seed(7)
        cotangents = [torch.randn(o.shape, generator=g) for o in outs]
        grads = torch.autograd.grad(outs, [*inputs, *state], cotangents)
        results[impl] = (outs, grads)
    for fast in FAST_PATHS:
        for part in (0, 1):  # outputs, gradients
            for a, b in zip(results["reference"][part], results[fast][part], strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 25])
@pytest.mark.parametrize("state_grad", ["full", "none"])
@pytest.mark.parametrize("name", ["delta_rnn", "delta_lstm"])
def test_chunked_matches_reference_across_chunk_boundaries(name, state_grad, chunk):
    # T = 10 in chunks of 1, 3 (padded), 4 (padded) or one chunk; resets at t = 0, at the start
    # of a chunk of 4 (t = 4) and of 3 (t = 6, whole batch), inside chunks, on consecutive steps.
    # With chunks of 3 the final state is not in the loss (as in training).
    T, B = 10, 3
    inputs, state = make_case(name, T, B, H=2, d=4, seed=9)
    done = torch.zeros(T, B, dtype=torch.bool)
    done[0, 0] = done[4, 1] = done[5, 2] = done[7, 0] = done[8, 0] = True
    done[6] = True
    fast = getattr(chunked_recurrences, name)
    results = []
    for f in (FUNCS[name], fast):
        kw = {"impl": "reference"} if f is FUNCS[name] else {"chunk_size": chunk}
        y, final = f(*inputs, done, tuple(state), state_grad=state_grad, **kw)
        outs = flat_outputs(y, final)
        g = torch.Generator().manual_seed(10)
        cotangents = [
            torch.randn(o.shape, generator=g) * (j == 0 or chunk != 3) for j, o in enumerate(outs)
        ]
        results.append([*outs, *torch.autograd.grad(outs, [*inputs, *state], cotangents)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fast_rewind_stays_accurate_over_a_paper_length_unroll(name):
    # The fast backward rewinds M_{t-1} = M_t - k^T u; rounding must not build up over T = 50.
    T, B = 50, 2
    inputs, state = make_case(name, T, B, H=1, d=16, seed=8)
    done = resets(T, B)
    grads = {}
    for impl in IMPLS:
        y, final = run(name, inputs, done, state, impl=impl)
        grads[impl] = torch.autograd.grad([y.sum(), final[0].sum()], [*inputs, *state])
    for fast in FAST_PATHS:
        for a, b in zip(grads["reference"], grads[fast], strict=True):
            assert (a - b).abs().max() <= 1e-5 * max(a.abs().max(), 1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_reset_equals_fresh_start(name, impl):
    T, B, k = 7, 3, 3
    inputs, state = make_case(name, T, B, H=2, d=4, seed=1)
    done = torch.zeros(T, B, dtype=torch.bool)
    done[k] = True
    y, final = run(name, inputs, done, state, impl=impl)
    zero = [torch.zeros_like(s) for s in state]
    no_reset = torch.zeros(T - k, B, dtype=torch.bool)
    y_fresh, final_fresh = run(name, slice_time(name, inputs, k, T), no_reset, zero, impl=impl)
    torch.testing.assert_close(y[k:], y_fresh)
    for a, b in zip(final, final_fresh, strict=True):
        torch.testing.assert_close(a, b)
    # Without the reset the earlier steps matter, so the check above is not vacuous.
    y_carry, _ = run(name, inputs, torch.zeros(T, B, dtype=torch.bool), state, impl=impl)
    assert (y_carry[k:] - y_fresh).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_carry_over(name, impl):
    T, B, k = 8, 3, 5
    inputs, state = make_case(name, T, B, H=2, d=4, seed=2)
    done = resets(T, B)
    y, final = run(name, inputs, done, state, impl=impl)
    y0, mid = run(name, slice_time(name, inputs, 0, k), done[:k], state, impl=impl)
    y1, final_split = run(name, slice_time(name, inputs, k, T), done[k:], mid, impl=impl)
    torch.testing.assert_close(y, torch.cat([y0, y1]))
    for a, b in zip(final, final_split, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_state_grad_cuts_gradient_through_state(name, impl):
    T, B, t = 6, 2, 4
    inputs, state = make_case(name, T, B, H=2, d=4, seed=3)
    done = torch.zeros(T, B, dtype=torch.bool)
    n_seq = 4 if name == "rdn" else 7
    for state_grad, cut in (("none", True), ("full", False)):
        y, _ = run(name, inputs, done, state, impl=impl, state_grad=state_grad)
        grads = torch.autograd.grad(y[t].sum(), inputs[:n_seq])
        for g in grads:
            earlier = g[:t].abs().max()
            assert (earlier == 0) if cut else (earlier > 1e-6)
            assert g[t].abs().max() > 1e-6
            assert g[t + 1 :].abs().max() == 0


@pytest.mark.parametrize("impl", FAST_PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_state_not_modified_in_place(name, impl):
    inputs, state = make_case(name, T=4, B=2, H=1, d=3, seed=4)
    before = [s.detach().clone() for s in state]
    run(name, inputs, resets(4, 2), state, impl=impl)
    for s, b in zip(state, before, strict=True):
        assert torch.equal(s, b)


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_and_shapes(name):
    inputs, state = make_case(name, T=3, B=2, H=1, d=3)
    done = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="impl.*reference, fast"):
        run(name, inputs, done, state, impl="cuda")
    with pytest.raises(ValueError, match="state_grad.*full, none"):
        run(name, inputs, done, state, state_grad="some")
    with pytest.raises(ValueError, match="done"):
        run(name, inputs, done[:2], state)
    with pytest.raises(ValueError, match="expected"):
        run(name, inputs, done, [s[:1] for s in state])


# ----------------------------------------------------------------------------- hand examples


def t1(*rows):
    """A [T=len(rows), B=1, H=1, d] tensor from per-step rows."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_rnn_two_steps_by_hand(impl):
    # Step 1: W = k^T 0.5 [2,4] = [[1,2],[0,0]], z = q W = [1,2] (write before read).
    # s = softmax(0) = [.5,.5]; R = [0,1]^T 0.5 [2,0] = [[0,0],[1,0]], s R = [.5,0] -> y1 = [1.5,2].
    # Step 2: v_old = k W = [1,2]; W = [[1,2],[0,0]] + [1,0]^T 0.5 ([0,0]-[1,2]) = [[.5,1],[0,0]],
    # z = [.5,1]. s = softmax([1.5,2]) = [1-p, p]; R gains row 0 [0,2] -> [[0,2],[1,0]] before the
    # read: s R = [p, 2(1-p)] -> y2 = [.5+p, 1+2(1-p)].
    q, k = t1([1, 0], [1, 0]), t1([1, 0], [1, 0])
    v, beta = t1([2, 4], [0, 0]), t1([0.5], [0.5])
    rk, rv, rbeta = t1([0, 1], [1, 0]), t1([2, 0], [0, 2]), t1([0.5], [1.0])
    state = (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))
    done = torch.zeros(2, 1, dtype=torch.bool)
    y, (W, R, y_last) = call(delta_rnn, q, k, v, beta, rk, rv, rbeta, done, state, impl=impl)
    p = sig(0.5)
    torch.testing.assert_close(y.flatten(), torch.tensor([1.5, 2, 0.5 + p, 1 + 2 * (1 - p)]))
    torch.testing.assert_close(W.flatten(), torch.tensor([0.5, 1, 0, 0]))
    torch.testing.assert_close(R.flatten(), torch.tensor([0.0, 2, 1, 0]))
    torch.testing.assert_close(y_last, y[-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_rdn_two_steps_by_hand(impl):
    # Rq = [[1,0],[0,0]], Rk = 0, Rv = I, rb = [1,0].
    # Step 1: s = tanh(0) = 0, so no feedback. k = softmax([ln 3, 0]) = [.75,.25], v = [2,0],
    # beta = σ(0) = .5 -> W = k^T [1,0] = [[.75,0],[.25,0]]; q = [.5,.5] -> y1 = [.5,0].
    # Step 2: s = tanh([.5,0]) = [a,0]; q = softmax([a,0]) = [p,1-p] with p = σ(a); k = [.5,.5];
    # v = [0,1] + s Rv = [a,1]; beta = σ(0 + a) = p. v_old = k W = [.5,0],
    # u = p [a-.5, 1]; y2 = q W1 + (q.k) u = [.25+.5p, 0] + .5 u.
    qx, kx = t1([0, 0], [0, 0]), t1([math.log(3), 0], [0, 0])
    vx, bx = t1([2, 0], [0, 1]), t1([0], [0])
    Rq = torch.tensor([[[1.0, 0], [0, 0]]])
    Rk, Rv, rb = torch.zeros(1, 2, 2), torch.eye(2).unsqueeze(0), torch.tensor([[1.0, 0]])
    state = (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))
    done = torch.zeros(2, 1, dtype=torch.bool)
    y, (W, y_last) = call(rdn, qx, kx, vx, bx, Rq, Rk, Rv, rb, done, state, impl=impl)
    a = math.tanh(0.5)
    p = sig(a)
    u = (p * (a - 0.5), p)
    y2 = (0.25 + 0.5 * p + 0.5 * u[0], 0.5 * u[1])
    torch.testing.assert_close(y.flatten(), torch.tensor([0.5, 0, *y2]))
    W2 = (0.75 + 0.5 * u[0], 0.5 * u[1], 0.25 + 0.5 * u[0], 0.5 * u[1])
    torch.testing.assert_close(W.flatten(), torch.tensor(W2))
    torch.testing.assert_close(y_last, y[-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_lstm_two_steps_by_hand(impl):
    # Gates (i, u, o); c0 = [1,-1], everything else starts at 0.
    # Step 1: s = softmax(0) = [.5,.5]. i: v = 0 writes nothing -> i = σ(0) = .5.
    # u: W_u = [[1,2],[0,0]], z_u = [1,2]; R_u = [[0,0],[1,0]], s R_u = [.5,0] -> u = [1.5,2].
    # o: nothing written -> o = .5. c1 = .5 u + .5 c0 = [1.25,.5]; h1 = .5 c1 = [.625,.25].
    # Step 2: s = softmax(h1) = [p,1-p], p = σ(.375).
    # i: W_i = [0,1]^T .5 [2,0] -> z_i = [0,1] W_i = [1,0]; R_i stays 0 -> i = [σ(1), .5].
    # u: W_u = [[.5,1],[0,0]], z_u = [.5,1]; R_u = [[0,2],[1,0]], s R_u = [1-p, 2p].
    # o: R_o = [0,1]^T [1,0] = [[0,0],[1,0]], s R_o = [1-p, 0] -> o = [σ(1-p), .5].
    # c2 = i u + (1-i) c1; h2 = o c2.
    def g(*steps):  # steps of per-gate rows -> [T,1,1,3,d]
        return torch.tensor(steps, dtype=torch.float32).view(len(steps), 1, 1, 3, -1)

    q = g([[0, 0], [1, 0], [0, 0]], [[0, 1], [1, 0], [0, 0]])
    k = g([[1, 0], [1, 0], [1, 0]], [[0, 1], [1, 0], [1, 0]])
    v = g([[0, 0], [2, 4], [0, 0]], [[2, 0], [0, 0], [0, 0]])
    beta = g([[1], [0.5], [1]], [[0.5], [0.5], [1]])
    rk = g([[1, 0], [0, 1], [1, 0]], [[1, 0], [1, 0], [0, 1]])
    rv = g([[0, 0], [2, 0], [0, 0]], [[0, 0], [0, 2], [1, 0]])
    rbeta = g([[1], [0.5], [1]], [[1], [1], [1]])
    c0 = torch.tensor([1.0, -1]).view(1, 1, 2)
    state = (torch.zeros(1, 1, 3, 2, 2), torch.zeros(1, 1, 3, 2, 2), torch.zeros(1, 1, 2), c0)
    done = torch.zeros(2, 1, dtype=torch.bool)
    y, (W, R, h, c) = call(delta_lstm, q, k, v, beta, rk, rv, rbeta, done, state, impl=impl)
    p = sig(0.375)
    i, u, o = (sig(1), 0.5), (1.5 - p, 1 + 2 * p), (sig(1 - p), 0.5)
    c2 = [i[j] * u[j] + (1 - i[j]) * (1.25, 0.5)[j] for j in range(2)]
    h2 = [o[j] * c2[j] for j in range(2)]
    torch.testing.assert_close(y.flatten(), torch.tensor([0.625, 0.25, *h2]))
    torch.testing.assert_close(c.flatten(), torch.tensor(c2))
    torch.testing.assert_close(h, y[-1])
    W_expected = [[0.0, 0, 1, 0], [0.5, 1, 0, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(W.view(3, 4), torch.tensor(W_expected))
    R_expected = [[0.0, 0, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0]]
    torch.testing.assert_close(R.view(3, 4), torch.tensor(R_expected))
