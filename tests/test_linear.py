"""agents.linear: the oneDNN route of the CPU linear layers against nn.Linear, and how the route
is chosen (DELTABEAST_CPU_GEMM, the size threshold, the timing rule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import linear
from agents.cores import make_core
from runners.config import ConfigError, check_environment

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def no_route_from_env(monkeypatch):
    monkeypatch.delenv(linear.SWITCH, raising=False)


def pair(fan_in: int, fan_out: int, bias: bool) -> tuple[nn.Linear, linear.Linear]:
    reference = nn.Linear(fan_in, fan_out, bias=bias)
    layer = linear.Linear(fan_in, fan_out, bias=bias)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def grads(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients of every input that asks for one."""
    y = layer(x)
    wanted = [t for t in (x, *layer.parameters()) if t.requires_grad]
    return [y, *torch.autograd.grad(y, wanted, grad_out)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (5, 7, 48)])
def test_onednn_route_matches_nn_linear_in_outputs_and_gradients(bias, shape):
    torch.manual_seed(0)
    reference, layer = pair(48, 80, bias)
    x = torch.randn(*shape, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], 80)
    expected = grads(reference, x, grad_out)
    with linear.forced(True):
        got = grads(layer, x, grad_out)
    assert len(got) == len(expected) == (4 if bias else 3)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **TOL)


def test_onednn_route_takes_strided_tensors_and_partial_gradients():
    torch.manual_seed(1)
    reference, layer = pair(48, 64, True)
    x = torch.randn(48, 20, 9).transpose(0, 2)  # [9, 20, 48], not contiguous
    grad_out = torch.randn(20, 9, 64).transpose(0, 1)
    for frozen in ("weight", "input", "weight and input"):
        x_ = x.detach().requires_grad_("input" not in frozen)
        for module in (reference, layer):
            module.weight.requires_grad_("weight" not in frozen)
        expected = grads(reference, x_, grad_out)
        with linear.forced(True):
            got = grads(layer, x_, grad_out)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **TOL)


def test_onednn_route_serves_no_grad_and_inference_mode():
    torch.manual_seed(2)
    reference, layer = pair(48, 64, True)
    x = torch.randn(300, 48)
    with linear.forced(True):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(x), **TOL)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), reference(x), **TOL)


def test_forced_route_really_calls_onednn_and_mkl_route_does_not():
    _, layer = pair(48, 64, True)
    x = torch.randn(300, 48, requires_grad=True)

    def ops(on: bool) -> set[str]:
        with linear.forced(on), torch.profiler.profile() as prof:
            layer(x).sum().backward()
        return {event.name for event in prof.events()}

    onednn, mkl = ops(True), ops(False)
    assert {"mkldnn::_linear_pointwise", "aten::mkldnn_linear_backward_weights"} <= onednn
    assert "aten::addmm" not in onednn and "aten::mm" not in onednn
    assert "mkldnn::_linear_pointwise" not in mkl and "aten::addmm" in mkl


def test_autocast_other_dtypes_and_vectors_stay_with_nn_linear():
    _, layer = pair(48, 64, True)
    x = torch.randn(300, 48)
    with linear.forced(True):
        assert not linear.uses_onednn(x.double(), layer.weight.double())
        assert not linear.uses_onednn(x[0], layer.weight)
        assert not linear.uses_onednn(x[:0], layer.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear.uses_onednn(x, layer.weight)
            assert layer(x).dtype == torch.bfloat16
        assert linear.uses_onednn(x, layer.weight)


def test_switch_fixes_the_route_and_a_bad_value_names_the_choices(monkeypatch):
    def never(threads: int) -> bool:
        raise AssertionError("a fixed route must not time anything")

    monkeypatch.setattr(linear, "_onednn_faster", never)
    small, weight = torch.randn(2, 8), torch.randn(3, 8)
    monkeypatch.setenv(linear.SWITCH, "onednn")
    assert linear.uses_onednn(small, weight)
    monkeypatch.setenv(linear.SWITCH, "MKL")
    assert not linear.uses_onednn(torch.randn(linear.MIN_ROWS, 8), weight)
    monkeypatch.setenv(linear.SWITCH, "fastest")
    with pytest.raises(ValueError, match="DELTABEAST_CPU_GEMM='fastest'; valid: auto, mkl, onednn"):
        linear.uses_onednn(small, weight)
    with pytest.raises(ConfigError, match="valid: auto, mkl, onednn"):
        check_environment()


def test_auto_times_the_routes_only_for_large_products(monkeypatch):
    calls = []

    def faster(threads: int) -> bool:
        calls.append(threads)
        return True

    monkeypatch.setattr(linear, "_onednn_faster", faster)
    weight = torch.randn(3, 8)
    assert not linear.uses_onednn(torch.randn(4, linear.MIN_ROWS // 4 - 1, 8), weight)
    assert calls == []
    assert linear.uses_onednn(torch.randn(4, linear.MIN_ROWS // 4, 8), weight)
    assert calls == [torch.get_num_threads()]


@pytest.mark.parametrize(("mkl_ms", "onednn_ms", "chosen"), [(3.0, 1.0, True), (1.1, 1.0, False)])
def test_auto_keeps_onednn_only_when_clearly_faster(monkeypatch, mkl_ms, onednn_ms, chosen):
    timed = []

    def fake_times(layer, x, route, repeats):
        timed.append(route)
        assert x.shape == (linear.CALIBRATION_SHAPE[0], linear.CALIBRATION_SHAPE[1])
        return [onednn_ms if route else mkl_ms] * repeats

    monkeypatch.setattr(linear, "_fwd_bwd_ms", fake_times)
    assert linear._onednn_faster.__wrapped__(1) is chosen
    assert set(timed) == {True, False} and timed[:2] == [False, True]  # in turn


def test_real_timing_returns_a_choice_and_leaves_no_override():
    # the first large product may come under inference_mode (an evaluation) or bf16 autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(linear._onednn_faster.__wrapped__(torch.get_num_threads()), bool)
    assert linear._override.value is None


@pytest.mark.parametrize("name", ["lt", "rdn", "delta_lstm"])
def test_fwp_core_is_the_same_through_either_route(name):
    torch.manual_seed(3)
    core = make_core(name, 20, hidden_size=32, num_heads=2, head_dim=8, ff_size=48)
    x = torch.randn(6, 3, 20, requires_grad=True)
    done = torch.zeros(6, 3, dtype=torch.bool)
    done[2, 1] = True
    state = core.initial_state(3)
    results = []
    for on in (False, True):
        with linear.forced(on):
            y, _ = core(x, done, state)
            results.append([y, *torch.autograd.grad(y.square().sum(), [x, *core.parameters()])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_state_dict_is_nn_linears():
    reference, layer = pair(5, 4, True)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == reference.state_dict().keys()
