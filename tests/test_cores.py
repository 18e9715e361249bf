"""Cores behind make_core: sizes, interface, reset/carry-over semantics, impls, state_grad."""

import pytest
import torch

from agents.cores import CORE_NAMES, make_core
from agents.cores import fast_weights as fw

FWP = ("lt", "delta", "delta_rnn", "rdn", "delta_lstm")
SMALL = {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "ff_size": 24}
T, B, IN = 7, 3, 5


def small_core(name: str, **options) -> torch.nn.Module:
    if name in FWP:
        options = {**SMALL, **options}
    elif name == "lstm":
        options = {"hidden_size": 6, **options}
    torch.manual_seed(0)
    return make_core(name, IN, **options).double()


def warm_state(core: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """A non-zero state: the core's state after a few random steps."""
    x = torch.randn(4, B, IN, dtype=torch.float64)
    state = tuple(s.double() for s in core.initial_state(B))
    with torch.no_grad():
        return core(x, torch.zeros(4, B, dtype=torch.bool), state)[1]


def resets() -> torch.Tensor:
    done = torch.zeros(T, B, dtype=torch.bool)
    done[2, 0] = done[4, 1] = done[4, 2] = done[5, 0] = True
    return done


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("lt", 428_544),
        ("delta", 429_568),
        ("delta_rnn", 496_128),
        ("rdn", 454_400),
        ("delta_lstm", 827_904),
        ("lstm", 527_360),
        ("ff", 0),
    ],
)
def test_parameter_count_at_paper_sizes(name, count):
    core = make_core(name, 257)
    assert sum(p.numel() for p in core.parameters()) == count


@pytest.mark.parametrize("name", CORE_NAMES)
def test_shapes_and_initial_state(name):
    core = small_core(name)
    expected_out = {"ff": IN, "lstm": 6}.get(name, SMALL["hidden_size"])
    assert core.output_size == expected_out
    state = core.initial_state(B)
    assert isinstance(state, tuple)
    assert all(s.shape[0] == B and not s.any() for s in state)
    state = tuple(s.double() for s in state)
    y, new = core(torch.randn(T, B, IN, dtype=torch.float64), resets(), state)
    assert y.shape == (T, B, expected_out)
    assert [s.shape for s in new] == [s.shape for s in state]
    if name != "ff":
        assert len(state) > 0 and all(s.abs().sum() > 0 for s in new)


@pytest.mark.parametrize("name", CORE_NAMES)
def test_reset_equals_fresh_start(name):
    core = small_core(name)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    done = resets()
    state = warm_state(core)
    with torch.no_grad():
        y, _ = core(x, done, state)
        fresh = tuple(torch.zeros_like(s) for s in state)
        y0, _ = core(x[2:], done[2:], fresh)  # row 0 restarts at step 2
        y1, _ = core(x[4:], done[4:], fresh)  # rows 1, 2 restart at step 4
        y_state, _ = core(x[:2], done[:2], state)
    torch.testing.assert_close(y[2:, 0], y0[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(y[4:, 1:], y1[:, 1:], rtol=0, atol=1e-10)
    torch.testing.assert_close(y[:2], y_state, rtol=0, atol=1e-10)
    if name != "ff":  # the warm state matters before the reset
        assert (y[:2, 0] - core(x[:2], done[:2], fresh)[0][:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", CORE_NAMES)
@pytest.mark.parametrize("k", [1, 4])
def test_carry_over(name, k):
    core = small_core(name)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    done = resets()
    state = warm_state(core)
    with torch.no_grad():
        y, end = core(x, done, state)
        ya, mid = core(x[:k], done[:k], state)
        yb, end2 = core(x[k:], done[k:], mid)
    torch.testing.assert_close(y, torch.cat([ya, yb]), rtol=0, atol=1e-10)
    for a, b in zip(end, end2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _outputs_and_grads(core, x, done, state):
    y, end = core(x, done, state)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + sum(
        (s * s).sum() for s in end
    )
    grads = torch.autograd.grad(loss, [x, *state, *core.parameters()])
    return y, end, grads


@pytest.mark.parametrize("name", FWP)
@pytest.mark.parametrize("state_grad", ["full", "none"])
def test_fast_matches_reference(name, state_grad):
    """The whole core in f32: outputs, final state and all gradients agree across impls."""
    fast = small_core(name, state_grad=state_grad, impl="fast").float()
    ref = small_core(name, state_grad=state_grad, impl="reference").float()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(T, B, IN, requires_grad=True)
    state = tuple(s.float().requires_grad_() for s in warm_state(small_core(name)))
    done = resets()
    y_f, end_f, g_f = _outputs_and_grads(fast, x, done, state)
    y_r, end_r, g_r = _outputs_and_grads(ref, x, done, state)
    torch.testing.assert_close(y_f, y_r, rtol=1e-5, atol=1e-5)
    for a, b in zip([*end_f, *g_f], [*end_r, *g_r], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FWP)
def test_state_grad_none_equals_detached_steps(name):
    """state_grad="none" over an unroll == "full" stepped once per call, detached in between."""
    none = small_core(name, state_grad="none")
    full = small_core(name, state_grad="full")
    full.load_state_dict(none.state_dict())
    x = torch.randn(T, B, IN, dtype=torch.float64)
    done = resets()
    state = warm_state(none)
    y, _ = none(x, done, state)
    grads = torch.autograd.grad(y.sin().sum(), list(none.parameters()))
    ys, s = [], state
    for t in range(T):
        y_t, s = full(x[t : t + 1], done[t : t + 1], s)
        ys.append(y_t)
        s = tuple(e.detach() for e in s)
    y_steps = torch.cat(ys)
    grads_steps = torch.autograd.grad(y_steps.sin().sum(), list(full.parameters()))
    torch.testing.assert_close(y, y_steps, rtol=0, atol=1e-10)
    for a, b in zip(grads, grads_steps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", FWP)
def test_state_grad_flow(name):
    """The last output reaches earlier inputs only through the state, and only with "full"."""
    for state_grad, reaches in [("full", True), ("none", False)]:
        core = small_core(name, state_grad=state_grad)
        x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
        y, _ = core(x, torch.zeros(T, B, dtype=torch.bool), warm_state(core))
        (g,) = torch.autograd.grad(y[-1].sum(), x)
        assert (g[:-1].abs().max() > 1e-8) == reaches, state_grad
        assert g[-1].abs().max() > 1e-8


def test_lstm_gradient_crosses_steps_but_not_resets():
    core = small_core("lstm")
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    y, _ = core(x, resets(), warm_state(core))
    (g,) = torch.autograd.grad(y[-1, 0].sum(), x)  # row 0 was reset at step 5
    assert g[5:, 0].abs().max() > 1e-8
    assert g[:5, 0].abs().max() == 0 and g[:, 1:].abs().max() == 0


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("gru", 8), {}, "valid cores: ff, lstm, lt"),
        (("lt", 0), {}, "input_size must be a positive int"),
        (("lt", 8.0), {}, "input_size must be a positive int"),
        (("delta", 8), {"num_heads": -1}, "num_heads must be a positive int"),
        (("delta", 8), {"head_dim": True}, "head_dim must be a positive int"),
        (("rdn", 8), {"state_grad": "partial"}, "valid: full, none"),
        (("rdn", 8), {"impl": "cuda"}, "valid: fast, reference"),
        (("delta_rnn", 8), {"dropout": 1.0}, "dropout must be a number in [0, 1)"),
        (("lstm", 8), {"num_heads": 4}, "valid: hidden_size"),
        (("ff", 8), {"hidden_size": 4}, "valid: none"),
        (("lt", 8), {"heads": 4}, "valid: hidden_size, num_layers, num_heads"),
        (("delta", 8), {"bf16": 1}, "bf16 must be true or false"),
    ],
)
def test_bad_arguments(args, options, message):
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        make_core(*args, **options)
    assert message in str(info.value)


# Activations of the slow-projection outputs, in the recurrence's argument order (DESIGN §3).
ACTIVATIONS = {
    "lt": ("phi", "phi", "raw"),
    "delta": ("phi", "phi", "raw", "sigmoid"),
    "delta_rnn": ("softmax", "softmax", "raw", "sigmoid", "softmax", "raw", "sigmoid"),
    "rdn": ("raw", "raw", "raw", "raw"),
    "delta_lstm": ("phi", "phi", "raw", "sigmoid", "softmax", "raw", "sigmoid"),
}


@pytest.mark.parametrize("name", FWP)
def test_block_follows_the_design(name):
    """One layer written out: x = x + out(FWP(LN(x))); x = x + FF(LN(x)), activations as §3."""
    core = small_core(name, num_layers=1)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    done, state = resets(), warm_state(core)
    H, d = SMALL["num_heads"], SMALL["head_dim"]
    gates = (3,) if name == "delta_lstm" else ()
    act = {"phi": fw.phi, "softmax": lambda t: t.softmax(-1), "sigmoid": torch.sigmoid}
    layer = core.fwps[0]
    h = core.input_proj(x)
    parts, start = [], 0
    slow = core.norms1[0](h) @ layer.slow.weight.T
    for i, a in enumerate(ACTIVATIONS[name]):
        last = 1 if i in (3, 6) else d  # beta, rbeta: one scalar per head (and gate)
        width = H * (gates[0] if gates else 1) * last
        part = slow[..., start : start + width].reshape(T, B, H, *gates, last)
        parts.append(act.get(a, lambda t: t)(part))
        start += width
    assert start == slow.shape[-1]
    if name == "lt":
        y, _ = fw.linear_attention(*parts, done, state[0], impl="reference")
    elif name == "delta":
        y, _ = fw.delta_rule(*parts, done, state[0], impl="reference")
    else:
        extra = [layer.Rq, layer.Rk, layer.Rv, layer.rb] if name == "rdn" else []
        y, _ = getattr(fw, name)(*parts, *extra, done, state, impl="reference")
    h = h + y.reshape(T, B, H * d) @ layer.out.weight.T
    h = h + core.ffs[0](core.norms2[0](h))
    with torch.no_grad():
        torch.testing.assert_close(core(x, done, state)[0], h.detach(), rtol=0, atol=1e-10)


def test_rdn_recurrent_weights_init():
    torch.manual_seed(0)
    layer = make_core("rdn", 257).fwps[0]
    for p in (layer.Rq, layer.Rk, layer.Rv):
        assert p.shape == (4, 32, 32)
        assert abs(p.std().item() * 32**0.5 - 1) < 0.05 and abs(p.mean().item()) < 0.01
    assert layer.rb.shape == (4, 32) and abs(layer.rb.std().item() * 32**0.5 - 1) < 0.2


@pytest.mark.parametrize("name", FWP)
def test_bf16_projections_keep_the_recurrence_in_f32(name):
    """bf16=True: the linear layers run in bf16, the output and the state stay f32 and close."""
    torch.manual_seed(0)
    f32 = make_core(name, IN, **SMALL)
    bf16 = make_core(name, IN, **SMALL, bf16=True)
    bf16.load_state_dict(f32.state_dict())
    x = torch.randn(T, B, IN)
    done = torch.zeros(T, B, dtype=torch.bool)
    done[3, 1] = True
    state = tuple(0.3 * torch.randn_like(s) for s in f32.initial_state(B))
    runs = []
    for core in (f32, bf16):
        leaf = x.clone().requires_grad_()
        y, final = core(leaf, done, state)
        loss = y.square().sum() + sum(f.square().sum() for f in final)
        runs.append((y, final, torch.autograd.grad(loss, [leaf, *core.parameters()])))
    (y32, final32, grads32), (y16, final16, grads16) = runs
    assert y16.dtype == torch.float32 and all(f.dtype == torch.float32 for f in final16)
    assert not torch.equal(y16, y32)  # bf16 really ran

    def relative(a, b):  # bf16 keeps 8 significant bits: ~0.4% per rounding
        return float((a - b).norm() / b.norm())

    assert relative(y16.detach(), y32.detach()) < 1e-2
    assert (
        max(relative(a.detach(), b.detach()) for a, b in zip(final16, final32, strict=True)) < 1e-2
    )
    assert max(relative(a, b) for a, b in zip(grads16, grads32, strict=True)) < 5e-2
