"""``rdn``, ``delta_rnn``, ``delta_lstm`` (and the ``lt``/``delta`` layers) on the fused C kernels.

Same arguments and results as ``recurrent_fast_weights`` (already checked there), float32 CPU
tensors. Each forward and backward is one kernel call: a program per batch element runs the
whole unroll for all its heads with their fast weights in cache (see csrc/fwp_cpu.c). The
forward saves only the per-step vectors the backward needs; the backward rewinds the fast
weights from the final ones (in a workspace allocated here), restoring those a reset erased from
a copy the forward kept.

The lt, delta, delta_rnn and delta_lstm kernels read their inputs from a projection row [T,B,F]
in place: ``*_projected`` hands them a layer's raw slow projection, which they activate
themselves (``PROJECTED``, used by agents/cores/fwp.py), and the functions with activated inputs
lay those out as such a row.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from agents.cores import cpu_kernels


def _call(name: str, *args: int | Tensor | None) -> None:
    """Call kernel ``name``; tensors go as pointers (they must be contiguous float32/int32),
    and the thread count torch uses is appended."""
    fn = getattr(cpu_kernels.library(), name)
    fn.restype = None
    converted = []
    for a in (*args, torch.get_num_threads()):
        if isinstance(a, Tensor):
            assert a.is_contiguous(), name
            converted.append(ctypes.c_void_p(a.data_ptr()))
        else:
            converted.append(None if a is None else ctypes.c_int(a))
    fn(*converted)


def _resets(done: Tensor) -> tuple[Tensor, Tensor, int]:
    """keep = 1 − done as float32, and a slot per reset at t > 0 for the erased fast weights
    (−1 elsewhere): the backward's rewind must restore them."""
    later = done.clone()
    later[0] = False
    flat = later.flatten()
    slot = torch.where(flat, flat.cumsum(0) - 1, -1).to(torch.int32).view(done.shape)
    return (~done).float(), slot, int(flat.sum())


def _rewind_workspace(W_last: Tensor, count: int) -> Tensor:
    """Scratch [B, count, H, ...] in which a backward rewinds (transposed) the ``count`` fast
    weight tensors of W_last's shape [B, H, ...] that the recurrence has (W, or W and R)."""
    return W_last.new_empty(W_last.shape[0], count, *W_last.shape[1:])


def _training(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _c(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


class _RDNCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, train, done, qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, y0):
        T, B, H, d = qx.shape
        X = torch.cat([qx, kx, vx, bx], -1)  # [T,B,H,3d+1]
        P = torch.cat([Rq, Rk, Rv, rb.unsqueeze(-1)], -1).contiguous()  # [H,d,3d+1]
        keep, slot, n_slots = _resets(done)
        W0, y0 = _c(W0, y0)
        Y, W_last = X.new_empty(T, B, H, d), X.new_empty(B, H, d, d)
        saved = X.new_empty(T, B, H, 4 * d + 1) if train else None
        S = torch.empty_like(Y) if train else None  # tanh(y_{t-1})
        erased = X.new_empty(n_slots, H, d, d)
        _call(
            "rdn_forward", T, B, H, d, X, P, keep, W0, y0, Y, W_last, saved, S, slot, erased
        )  # fmt: skip
        if train:
            ctx.state_grad = state_grad
            ctx.save_for_backward(P, keep, W_last, saved, S, slot, erased)
        return Y, W_last, Y[T - 1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gy_last):
        P, keep, W_last, saved, S, slot, erased = ctx.saved_tensors
        T, B, H, d = S.shape
        gX = S.new_empty(T, B, H, 3 * d + 1)
        gW0, gy0 = torch.empty_like(W_last), torch.empty_like(gy_last)
        full = int(ctx.state_grad == "full")
        _call(
            "rdn_backward", T, B, H, d, full, P.transpose(1, 2).contiguous(), keep, W_last, saved,
            S, slot, erased,
            *_c(gY, gW_last, gy_last), gX, gW0, gy0, _rewind_workspace(W_last, 1),
        )  # fmt: skip
        gP = torch.einsum("tbhi,tbhj->hij", S, gX)  # pre = x + s [R_q | R_k | R_v | r_b]
        return (
            None, None, None, gX[..., :d], gX[..., d : 2 * d], gX[..., 2 * d : 3 * d],
            gX[..., 3 * d :], gP[..., :d], gP[..., d : 2 * d], gP[..., 2 * d : 3 * d],
            gP[..., 3 * d], gW0, gy0,
        )  # fmt: skip


class _FastWeightCpu(torch.autograd.Function):
    """``lt`` (delta False) and ``delta`` over a raw projection row, one kernel call each way."""

    @staticmethod
    def forward(ctx, state_grad, train, delta, num_heads, done, P, W0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        keep, slot, n_slots = _resets(done)
        P, W0 = _c(P, W0)
        Y, W_last = P.new_empty(T, B, H, d), torch.empty_like(W0)
        saved = P.new_empty(T, B, H, 4 * d + 3) if train else None
        erased = P.new_empty(n_slots, H, d, d)
        _call(
            "fast_weight_forward", T, B, H, d, int(delta), P, keep, W0, Y, W_last, saved, slot,
            erased,
        )  # fmt: skip
        if train:
            ctx.state_grad, ctx.delta = state_grad, delta
            ctx.save_for_backward(keep, W_last, saved, slot, erased)
        if state_grad == "none":  # as in fwp's detached paths: the final state is detached
            ctx.mark_non_differentiable(W_last)
        return Y, W_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last):
        keep, W_last, saved, slot, erased = ctx.saved_tensors
        T, B, H, _ = saved.shape
        d = W_last.shape[-1]
        gP = saved.new_empty(T, B, 3 * H * d + (H if ctx.delta else 0))
        gW0 = torch.empty_like(W_last)
        _call(
            "fast_weight_backward", T, B, H, d, int(ctx.state_grad == "full"), int(ctx.delta),
            keep, W_last, saved, slot, erased, *_c(gY, gW_last), gP, gW0,
            _rewind_workspace(W_last, 1),
        )  # fmt: skip
        return None, None, None, None, None, gP, gW0


class _DeltaRNNCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, train, activate, num_heads, done, P, W0, R0, y0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        keep, slot, n_slots = _resets(done)
        P, W0, R0, y0 = _c(P, W0, R0, y0)
        Y = P.new_empty(T, B, H, d)
        W_last, R_last = torch.empty_like(W0), torch.empty_like(R0)
        saved = P.new_empty(T, B, H, 8 * d + 2) if train else None
        erased = P.new_empty(n_slots, 2, H, d, d)
        _call(
            "delta_rnn_forward", T, B, H, d, int(activate), P, keep, W0, R0, y0, Y, W_last,
            R_last, saved, slot, erased,
        )  # fmt: skip
        if train:
            ctx.state_grad, ctx.activate = state_grad, activate
            ctx.save_for_backward(keep, W_last, R_last, saved, slot, erased)
        return Y, W_last, R_last, Y[T - 1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gy_last):
        keep, W_last, R_last, saved, slot, erased = ctx.saved_tensors
        T, B, H, _ = saved.shape
        d = W_last.shape[-1]
        gP = saved.new_empty(T, B, 5 * H * d + 2 * H)
        g_state = [torch.empty_like(x) for x in (gW_last, gR_last, gy_last)]
        _call(
            "delta_rnn_backward", T, B, H, d, int(ctx.state_grad == "full"), int(ctx.activate),
            keep, W_last, R_last, saved, slot, erased, *_c(gY, gW_last, gR_last, gy_last), gP,
            *g_state, _rewind_workspace(W_last, 2),
        )  # fmt: skip
        return None, None, None, None, None, gP, *g_state


class _DeltaLSTMCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, train, activate, num_heads, done, P, W0, R0, h0, c0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        keep, slot, n_slots = _resets(done)
        P, W0, R0, h0, c0 = _c(P, W0, R0, h0, c0)
        Y = P.new_empty(T, B, H, d)
        W_last, R_last, c_last = torch.empty_like(W0), torch.empty_like(R0), torch.empty_like(c0)
        saved = P.new_empty(T, B, H, 26 * d + 12) if train else None
        erased = P.new_empty(n_slots, 2, H, 3, d, d)
        _call(
            "delta_lstm_forward", T, B, H, d, int(activate), P, keep, W0, R0, h0, c0, Y, W_last,
            R_last, c_last, saved, slot, erased,
        )  # fmt: skip
        if train:
            ctx.state_grad, ctx.activate = state_grad, activate
            ctx.save_for_backward(keep, c0, W_last, R_last, saved, slot, erased)
        return Y, W_last, R_last, Y[T - 1].clone(), c_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gh_last, gc_last):
        keep, c0, W_last, R_last, saved, slot, erased = ctx.saved_tensors
        T, B, H, _ = saved.shape
        d = W_last.shape[-1]
        gP = saved.new_empty(T, B, 15 * H * d + 6 * H)
        g_state = [torch.empty_like(x) for x in (gW_last, gR_last, gh_last, gc_last)]
        _call(
            "delta_lstm_backward", T, B, H, d, int(ctx.state_grad == "full"), int(ctx.activate),
            keep, c0, W_last, R_last, saved, slot, erased,
            *_c(gY, gW_last, gR_last, gh_last, gc_last), gP, *g_state, _rewind_workspace(W_last, 2),
        )  # fmt: skip
        return None, None, None, None, None, gP, *g_state


def projection_row(*fields: Tensor) -> Tensor:
    """Activated per-head inputs [T,B,H,...] laid out as a projection row [T,B,F] (see
    csrc/fwp_cpu.c): each field flattened head-major, one after the other."""
    T, B = fields[0].shape[:2]
    return torch.cat([x.reshape(T, B, -1) for x in fields], -1)


def rdn(
    qx: Tensor, kx: Tensor, vx: Tensor, bx: Tensor, Rq: Tensor, Rk: Tensor, Rv: Tensor,
    rb: Tensor, done: Tensor, state: tuple[Tensor, ...], state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """``recurrent_fast_weights.rdn`` (same arguments, already checked) on the C kernels."""
    args = (qx, kx, vx, bx, Rq, Rk, Rv, rb, *state)
    y, W, y_last = _RDNCpu.apply(state_grad, _training(*args), done, *args)
    return y, (W, y_last)


def delta_rnn(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, rk: Tensor, rv: Tensor, rbeta: Tensor,
    done: Tensor, state: tuple[Tensor, ...], state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """``recurrent_fast_weights.delta_rnn`` (same arguments, already checked) on the C kernels."""
    P = projection_row(q, k, v, beta, rk, rv, rbeta)
    return delta_rnn_projected(P, q.shape[2], done, state, state_grad, activate=False)


def delta_rnn_projected(
    P: Tensor,
    num_heads: int,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str = "full",
    activate: bool = True,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The Delta RNN over a layer's raw slow projection P [T,B,5Hd+2H] (fields q, k, v, β,
    r_k, r_v, r_β, head-major), read in place; with ``activate`` the kernel applies the
    activations itself (softmax to q, k, r_k, sigmoid to β, r_β), sparing the torch ops, the
    split copies and the gradient's concatenation around them. State and result as
    ``recurrent_fast_weights.delta_rnn``."""
    train = _training(P, *state)
    y, *final = _DeltaRNNCpu.apply(state_grad, train, activate, num_heads, done, P, *state)
    return y, tuple(final)


def delta_lstm(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, rk: Tensor, rv: Tensor, rbeta: Tensor,
    done: Tensor, state: tuple[Tensor, ...], state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """``recurrent_fast_weights.delta_lstm`` (same arguments, already checked) on the C kernels."""
    P = projection_row(q, k, v, beta, rk, rv, rbeta)
    return delta_lstm_projected(P, q.shape[2], done, state, state_grad, activate=False)


def delta_lstm_projected(
    P: Tensor,
    num_heads: int,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str = "full",
    activate: bool = True,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The Delta LSTM over a layer's raw slow projection P [T,B,15Hd+6H] (the fields of
    ``delta_rnn_projected``, each with the gate axis i, u, o inside its head), read in place and
    activated by the kernel as there. State and result as ``recurrent_fast_weights.delta_lstm``."""
    train = _training(P, *state)
    y, W, R, h, c = _DeltaLSTMCpu.apply(state_grad, train, activate, num_heads, done, P, *state)
    return y, (W, R, h, c)


def fast_weight_projected(
    P: Tensor,
    num_heads: int,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str = "full",
    delta: bool = True,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The Delta Net (``delta``) or the Linear Transformer over a layer's raw slow projection P
    [T,B,3Hd(+H)] (fields q, k, v(, β), head-major), read in place and activated by the kernel
    (φ to q and k, sigmoid to β). State and result as ``fast_weights.delta_rule`` /
    ``linear_attention``; under ``state_grad="none"`` as fwp's detached paths (each step reads
    the state it was handed, detached; the final state carries no gradient)."""
    train = _training(P, *state)
    y, W = _FastWeightCpu.apply(state_grad, train, delta, num_heads, done, P, state[0])
    return y, (W,)


# The layers whose slow projection the kernels read in place (agents/cores/fwp.py).
PROJECTED = {
    "lt": functools.partial(fast_weight_projected, delta=False),
    "delta": fast_weight_projected,
    "delta_rnn": delta_rnn_projected,
    "delta_lstm": delta_lstm_projected,
}
