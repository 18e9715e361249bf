"""``nn.Linear`` whose large float32 CPU products may run through oneDNN instead of MKL.

torch's CPU ``nn.Linear`` calls MKL's sgemm. On AMD CPUs that runs float32 products about 2.2×
slower than oneDNN, the library torch already uses there for convolutions and ``nn.LSTM``; on
Intel CPUs MKL is as fast or faster (docs/benchmarks.md, ``benchmarks/gemm_backends.py``). So
the route is picked by measurement, not by vendor: the first product of at least ``MIN_ROWS``
rows in a process (per thread count) times one linear layer's forward and backward both ways
and keeps oneDNN only if it is clearly faster. ``DELTABEAST_CPU_GEMM=mkl`` or ``onednn`` fixes
the choice instead. Small products (an actor's step) keep MKL: oneDNN adds ~15 µs a call.
Parameters and state dicts are exactly ``nn.Linear``'s; under autocast, on other devices or
dtypes the layer is ``nn.Linear``.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.cores.override import Override

SWITCH = "DELTABEAST_CPU_GEMM"
ROUTES = ("auto", "mkl", "onednn")
MIN_ROWS = 256
# auto keeps oneDNN only when MKL's median fwd+bwd is this much slower: the two are within
# ±10% on Intel guests and 1.75-2.45x apart on AMD ones, so noise cannot flip the choice.
MARGIN = 1.2
CALIBRATION_SHAPE = (1600, 128, 512)  # rows, in, out: the FWP block's feed-forward at T=50, B=32
_override = Override()
# Inside ``with forced(on):`` every float32 CPU product outside autocast takes oneDNN (on) or
# MKL (off), whatever its size: the tests and benchmarks use it to run a chosen route.
forced = _override.forced
log = logging.getLogger(__name__)


def _dnn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN's inner product; x ``[..., in]``, weight
    ``[out, in]``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose forward and both backward products run through oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = _dnn(grad, weight.t(), None) if need_x else None
        gw = gb = None
        if need_w:
            # oneDNN's own weight-gradient primitive reads both operands untransposed
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            gw, gb = torch.ops.aten.mkldnn_linear_backward_weights(
                g2.to_mkldnn(), x2.to_mkldnn(), weight, ctx.has_bias
            )
        if need_b and gb is None:
            gb = g2.sum(0)
        return gx, gw, gb if need_b else None


def _fwd_bwd_ms(layer: nn.Linear, x: Tensor, route: bool, repeats: int) -> list[float]:
    times = []
    with forced(route):
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x).sum().backward()
            times.append((time.perf_counter() - start) * 1e3)
    return times


@functools.cache
def _onednn_faster(threads: int) -> bool:
    """Time one layer's fwd+bwd at CALIBRATION_SHAPE through MKL and oneDNN, in turn."""
    rows, fan_in, fan_out = CALIBRATION_SHAPE
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        layer = nn.Linear(fan_in, fan_out)
        x = torch.randn(rows, fan_in, generator=generator, requires_grad=True)
        mkl, dnn = [], []
        for _ in range(6):  # first round is a warm-up
            mkl.append(statistics.median(_fwd_bwd_ms(layer, x, False, 2)))
            dnn.append(statistics.median(_fwd_bwd_ms(layer, x, True, 2)))
    mkl_ms, dnn_ms = statistics.median(mkl[1:]), statistics.median(dnn[1:])
    faster = mkl_ms > MARGIN * dnn_ms
    log.info(
        "float32 CPU linear layers at %d thread(s): %s (fwd+bwd %s: MKL %.2f ms, oneDNN %.2f ms)",
        threads,
        "oneDNN" if faster else "MKL",
        "x".join(map(str, CALIBRATION_SHAPE)),
        mkl_ms,
        dnn_ms,
    )
    return faster


def route() -> str:
    """The route asked for by ``DELTABEAST_CPU_GEMM`` (default auto); a bad value raises."""
    return _parse_route(os.environ.get(SWITCH, "auto"))


@functools.cache
def _parse_route(value: str) -> str:
    choice = value.strip().lower() or "auto"
    if choice not in ROUTES:
        raise ValueError(f"{SWITCH}={choice!r}; valid: {', '.join(ROUTES)}")
    return choice


# torch built with oneDNN and with the two ops the route calls (neither is public API)
_ONEDNN_BUILT = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights")
)


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether the product ``x @ weight.T`` runs through oneDNN (see the module docstring).
    Called on every forward, so the cheapest tests come first (an actor's step runs it ~8×)."""
    if not (x.is_cpu and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2):
        return False
    if not _ONEDNN_BUILT or x.numel() == 0 or torch.is_autocast_enabled("cpu"):
        return False
    if _override.value is not None:
        return _override.value
    choice = route()
    if choice != "auto":
        return choice == "onednn"
    return x.numel() // x.shape[-1] >= MIN_ROWS and _onednn_faster(torch.get_num_threads())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that takes the faster CPU GEMM route."""

    def forward(self, x: Tensor) -> Tensor:
        if not uses_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        params = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return _dnn(x, self.weight, self.bias)
