"""Fused Triton kernels for the Recurrent Delta Net (``rdn`` of DESIGN §3).

Forward: one launch per layer runs all T steps; program (b, h) keeps W_{b,h} and R_q, R_k, R_v,
r_b of head h in registers, reads each step's raw inputs and applies the reset rule of DESIGN §2.
The raw inputs come as a projection row [T,B,3Hd+H] (``cpu_recurrences.projection_row``'s
layout), so a layer's slow projection is read in place, as the other kernels read theirs.
It stores the matrix each step read (after its reset) — T·B·H·d² floats, 26 MB per layer at
the paper shapes — so the backward needs neither a recomputation pass nor the CPU path's
rewind: it reloads W_{t-1}, recomputes the step's vectors from it and y_{t-1} (cheap), and runs
backwards in time. Under ``state_grad="none"`` the steps' gradients do not depend on each other,
so the backward runs one program per (b, h, t). The gradient of the shared R_q, R_k, R_v, r_b is
two batched products outside the kernel, ``Σ_{t,b} sᵀ g_pre`` (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from agents.cores import triton_kernels
from agents.cores.cpu_recurrences import projection_row
from agents.cores.triton_ops import (
    STAGES,
    delta_step,
    delta_step_backward,
    kept,
    softmax,
    softmax_backward,
    tanh,
    vecmat,
)

# Warps per program by head dim: enough threads that the [d,d] tiles of the backward
# (R_q, R_k, R_v, W, its gradient, temporaries) fit in registers.
NUM_WARPS = {16: 1, 32: 4, 64: 8}


@triton.jit
def _step_inputs(p, h, H, Rq, Rk, Rv, rb, y, D: tl.constexpr):
    """The feedback s = tanh(y_{t-1}) and head h's activated q, k, v, β at one step.

    p points at the step's projection row [q_x | k_x | v_x | b_x], each field head-major.
    """
    i = tl.arange(0, D)
    s = tanh(y)
    q = softmax(tl.load(p + h * D + i) + vecmat(s, Rq))
    k = softmax(tl.load(p + (H + h) * D + i) + vecmat(s, Rk))
    v = tl.load(p + (2 * H + h) * D + i) + vecmat(s, Rv)
    beta = tl.sigmoid(tl.load(p + 3 * H * D + h) + tl.sum(s * rb, 0))
    return s, q, k, v, beta


@triton.jit
def _load_slow(Rq, Rk, Rv, rb, h, D: tl.constexpr):
    i = tl.arange(0, D)
    mat = h * D * D + i[:, None] * D + i[None, :]
    return tl.load(Rq + mat), tl.load(Rk + mat), tl.load(Rv + mat), tl.load(rb + h * D + i)


@triton.jit
def _rdn_forward(P, Rq, Rk, Rv, rb, done, W0, y0, Ws, Ys, W_last, y_last, T, B, H, D: tl.constexpr):
    """P [T,B,3HD+H] (raw fields q_x, k_x, v_x, b_x, head-major); done [T,B]; W0 [B,H,D,D];
    y0 [B,H,D]. Writes Ws [T,B,H,D,D] (the matrix each step read), Ys [T+1,B,H,D] (y0, then
    every step's y) and the final state W_last [B,H,D,D], y_last [B,H,D]."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b, h = pid // H, pid % H
    F = 3 * H * D + H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    Rq_, Rk_, Rv_, rb_ = _load_slow(Rq, Rk, Rv, rb, h, D)
    W = tl.load(W0 + pid * D * D + mat)
    y = tl.load(y0 + pid * D + i)
    tl.store(Ys + pid * D + i, y)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        a = kept(done, t, B, b)
        W, y = W * a, y * a
        tl.store(Ws + row * D * D + mat, W)
        p = P + (t * B + b) * F
        _, q, k, v, beta = _step_inputs(p, h, H, Rq_, Rk_, Rv_, rb_, y, D)
        y, W = delta_step(W, q, k, v, beta)
        tl.store(Ys + (row + B * H) * D + i, y)
    tl.store(W_last + pid * D * D + mat, W)
    tl.store(y_last + pid * D + i, y)


@triton.jit
def _rdn_backward(
    P, Rq, Rk, Rv, rb, done, Ws, Ys, gY, gW_last, gy_last, gP, S, gW0, gy0,
    T, B, H, STEPS, D: tl.constexpr, FULL: tl.constexpr, FINAL: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, c) runs steps [c·STEPS, (c+1)·STEPS) backwards. Writes gP (gradients
    w.r.t. the raw inputs, P's layout), S = tanh(y_{t-1}) per step and, from the program holding
    step 0, the initial state's gradients gW0, gy0. FULL: gradients flow between steps. FINAL: the
    final state has gradients (else zero)."""
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // H, pid % H
    F = 3 * H * D + H
    lo = tl.program_id(1) * STEPS
    hi = tl.minimum(lo + STEPS, T)
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    Rq_, Rk_, Rv_, rb_ = _load_slow(Rq, Rk, Rv, rb, h, D)
    if FINAL:  # the unroll's last step also gets the final state's gradient
        last = (hi == T).to(tl.float32)
        gW = tl.load(gW_last + pid * D * D + mat) * last
        gy = tl.load(gy_last + pid * D + i) * last
    else:
        gW, gy = tl.zeros([D, D], tl.float32), tl.zeros([D], tl.float32)
    for n in tl.range(0, hi - lo, num_stages=STAGES):
        t = hi - 1 - n
        row = t * B * H + pid
        a = kept(done, t, B, b)
        p, gp = P + (t * B + b) * F, gP + (t * B + b) * F
        W = tl.load(Ws + row * D * D + mat)
        y = tl.load(Ys + row * D + i) * a
        s, q, k, v, beta = _step_inputs(p, h, H, Rq_, Rk_, Rv_, rb_, y, D)
        gy += tl.load(gY + row * D + i)
        gW, gq, gk, gv, gbeta = delta_step_backward(W, gW, gy, q, k, v, beta)
        gq, gk, gb = softmax_backward(gq, q), softmax_backward(gk, k), gbeta * beta * (1 - beta)
        tl.store(gp + h * D + i, gq)
        tl.store(gp + (H + h) * D + i, gk)
        tl.store(gp + (2 * H + h) * D + i, gv)
        tl.store(gp + 3 * H * D + h, gb)
        tl.store(S + row * D + i, s)
        gs = tl.sum(Rq_ * gq[None, :] + Rk_ * gk[None, :] + Rv_ * gv[None, :], 1) + gb * rb_
        # Through the reset; under "none" only step 0 passes its gradient on (to the initial state).
        if not FULL:
            a = a * (t == 0).to(tl.float32)
        gy = gs * (1 - s * s) * a
        gW = gW * a
    if lo == 0:
        tl.store(gW0 + pid * D * D + mat, gW)
        tl.store(gy0 + pid * D + i, gy)


KERNELS = (_rdn_forward, _rdn_backward)  # what the tests compile for sm_90


class _RDNTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, activate, num_heads, done, P, Rq, Rk, Rv, rb, W0, y0):
        # ``activate`` is part of the projected entry's call; rdn's inputs are always raw, since
        # its feedback enters before the activations.
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        P, done = P.contiguous(), done.contiguous()
        slow = tuple(p.contiguous() for p in (Rq, Rk, Rv, rb))
        Ws = P.new_empty(T, B, H, d, d)
        Ys = P.new_empty(T + 1, B, H, d)
        W_last, y_last = torch.empty_like(W0), torch.empty_like(y0)
        _rdn_forward[(B * H,)](
            P, *slow, done, W0.contiguous(), y0.contiguous(), Ws, Ys, W_last, y_last, T, B, H,
            D=d, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.state_grad = state_grad
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(P, *slow, done, Ws, Ys)
        return Ys[1:], W_last, y_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gy_last):
        P, Rq, Rk, Rv, rb, done, Ws, Ys = ctx.saved_tensors
        T, B, H, d = Ys.shape[0] - 1, *Ys.shape[1:]
        gY = Ys[1:].new_zeros(Ys[1:].shape) if gY is None else gY.contiguous()
        final, has_final = triton_kernels.final_state_grads(
            (gW_last, gy_last), ((B, H, d, d), (B, H, d)), gY
        )
        gP, S = torch.empty_like(P), P.new_empty(T, B, H, d)
        gW0, gy0 = P.new_empty(B, H, d, d), P.new_empty(B, H, d)
        full = ctx.state_grad == "full"
        steps = T if full else 1
        _rdn_backward[(B * H, triton.cdiv(T, steps))](
            P, Rq, Rk, Rv, rb, done, Ws, Ys, gY, *final, gP, S, gW0, gy0, T, B, H, steps,
            D=d, FULL=full, FINAL=has_final, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        # pre-activations = raw inputs + s [R_q | R_k | R_v | r_b]
        g_pre = gP[..., : 3 * H * d].view(T, B, 3, H, d)
        gR = torch.einsum("tbhi,tbfhj->fhij", S, g_pre)
        grb = torch.einsum("tbhi,tbh->hi", S, gP[..., 3 * H * d :])
        return None, None, None, None, gP, gR[0], gR[1], gR[2], grb, gW0, gy0


# The projected entry point: a layer's raw slow projection [T,B,3Hd+H] read in place, with its
# feedback weights passed as ``weights=(Rq, Rk, Rv, rb)``.
rdn_projected = triton_kernels.projected_entry(_RDNTriton)


def rdn(
    qx: Tensor,
    kx: Tensor,
    vx: Tensor,
    bx: Tensor,
    Rq: Tensor,
    Rk: Tensor,
    Rv: Tensor,
    rb: Tensor,
    done: Tensor,
    state: tuple[Tensor, Tensor],
    state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``recurrent_fast_weights.rdn`` (same arguments, already checked) in f32 Triton kernels.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
    first imported (the tests' way to check the kernels without a GPU).
    """
    P = projection_row(qx, kx, vx, bx)
    return rdn_projected(P, qx.shape[2], done, state, state_grad, weights=(Rq, Rk, Rv, rb))
