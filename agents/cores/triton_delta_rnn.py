"""Fused Triton kernels for the Delta RNN (``delta_rnn`` of DESIGN §3).

Same scheme as ``triton_rdn``: program (b, h) runs all T steps with both fast matrices W and R
in registers, stores the pair each step read (after its reset; 2·T·B·H·d² floats), and the
backward reloads them instead of rewinding. The inputs come as a projection row [T,B,5Hd+2H]
(``cpu_recurrences.projection_row``'s layout): a layer's raw slow projection, read in place and
activated here (q, k, k̃ softmax, β, β̃ sigmoid), or already activated inputs laid out so.
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
    dual_step,
    dual_step_backward,
    kept,
    softmax,
    softmax_backward,
)

NUM_WARPS = {16: 1, 32: 4, 64: 8}  # warps per program by head dim (see triton_rdn)


@triton.jit
def _delta_rnn_forward(
    P, done, W0, R0, y0, Ms, Ys, W_last, R_last, y_last, T, B, H,
    D: tl.constexpr, ACTIVATE: tl.constexpr,
):  # fmt: skip
    """P [T,B,5HD+2H] (fields q, k, v, β, k̃, ṽ, β̃, head-major); done [T,B]; W0, R0 [B,H,D,D];
    y0 [B,H,D]. ACTIVATE: P is raw, activate it here. Writes Ms [T,B,H,2,D,D] (W and R as each
    step read them), Ys [T+1,B,H,D] (y0, then every step's y) and the final state W_last,
    R_last, y_last."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b, h = pid // H, pid % H
    F = 5 * H * D + 2 * H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    W = tl.load(W0 + pid * D * D + mat)
    R = tl.load(R0 + pid * D * D + mat)
    y = tl.load(y0 + pid * D + i)
    tl.store(Ys + pid * D + i, y)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        a = kept(done, t, B, b)
        W, R, y = W * a, R * a, y * a
        tl.store(Ms + 2 * row * D * D + mat, W)
        tl.store(Ms + (2 * row + 1) * D * D + mat, R)
        p = P + (t * B + b) * F
        y, W, R = dual_step(W, R, softmax(y), p, h, H, D, ACTIVATE, False)
        tl.store(Ys + (row + B * H) * D + i, y)
    tl.store(W_last + pid * D * D + mat, W)
    tl.store(R_last + pid * D * D + mat, R)
    tl.store(y_last + pid * D + i, y)


@triton.jit
def _delta_rnn_backward(
    P, done, Ms, Ys, gY, gW_last, gR_last, gy_last, gP, gW0, gR0, gy0,
    T, B, H, STEPS, D: tl.constexpr, FULL: tl.constexpr, ACTIVATE: tl.constexpr,
    FINAL: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, c) runs steps [c·STEPS, (c+1)·STEPS) backwards. Writes gP (P's
    layout) and, from the program holding step 0, the initial state's gradients gW0, gR0, gy0.
    FULL: gradients flow between steps. FINAL: the final state has gradients (else zero)."""
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // H, pid % H
    F = 5 * H * D + 2 * H
    lo = tl.program_id(1) * STEPS
    hi = tl.minimum(lo + STEPS, T)
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    if FINAL:  # the unroll's last step also gets the final state's gradient
        last = (hi == T).to(tl.float32)
        gW = tl.load(gW_last + pid * D * D + mat) * last
        gR = tl.load(gR_last + pid * D * D + mat) * last
        gy = tl.load(gy_last + pid * D + i) * last
    else:
        gW, gR = tl.zeros([D, D], tl.float32), tl.zeros([D, D], tl.float32)
        gy = tl.zeros([D], tl.float32)
    for n in tl.range(0, hi - lo, num_stages=STAGES):
        t = hi - 1 - n
        row = t * B * H + pid
        a = kept(done, t, B, b)
        s = softmax(tl.load(Ys + row * D + i) * a)
        gy += tl.load(gY + row * D + i)
        W, R = tl.load(Ms + 2 * row * D * D + mat), tl.load(Ms + (2 * row + 1) * D * D + mat)
        p, gp = P + (t * B + b) * F, gP + (t * B + b) * F
        gW, gR, gs = dual_step_backward(W, R, gW, gR, gy, s, p, gp, h, H, D, ACTIVATE, False)
        # Through the reset; under "none" only step 0 passes its gradient on (to the initial state).
        if not FULL:
            a = a * (t == 0).to(tl.float32)
        gy = softmax_backward(gs, s) * a
        gW, gR = gW * a, gR * a
    if lo == 0:
        tl.store(gW0 + pid * D * D + mat, gW)
        tl.store(gR0 + pid * D * D + mat, gR)
        tl.store(gy0 + pid * D + i, gy)


KERNELS = (_delta_rnn_forward, _delta_rnn_backward)  # what the tests compile for sm_90


class _DeltaRNNTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, activate, num_heads, done, P, W0, R0, y0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        P, done = P.contiguous(), done.contiguous()
        Ms = P.new_empty(T, B, H, 2, d, d)
        Ys = P.new_empty(T + 1, B, H, d)
        W_last, R_last, y_last = torch.empty_like(W0), torch.empty_like(R0), torch.empty_like(y0)
        _delta_rnn_forward[(B * H,)](
            P, done, W0.contiguous(), R0.contiguous(), y0.contiguous(), Ms, Ys, W_last, R_last,
            y_last, T, B, H,
            D=d, ACTIVATE=activate, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.state_grad, ctx.activate = state_grad, activate
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(P, done, Ms, Ys)
        return Ys[1:], W_last, R_last, y_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gy_last):
        P, done, Ms, Ys = ctx.saved_tensors
        T, B, H, d = Ys.shape[0] - 1, *Ys.shape[1:]
        gY = Ys[1:].new_zeros(Ys[1:].shape) if gY is None else gY.contiguous()
        final, has_final = triton_kernels.final_state_grads(
            (gW_last, gR_last, gy_last), ((B, H, d, d), (B, H, d, d), (B, H, d)), gY
        )
        gP = torch.empty_like(P)
        gW0, gR0, gy0 = P.new_empty(B, H, d, d), P.new_empty(B, H, d, d), P.new_empty(B, H, d)
        full = ctx.state_grad == "full"
        steps = T if full else 1
        _delta_rnn_backward[(B * H, triton.cdiv(T, steps))](
            P, done, Ms, Ys, gY, *final, gP, gW0, gR0, gy0, T, B, H, steps,
            D=d, FULL=full, ACTIVATE=ctx.activate, FINAL=has_final, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        return None, None, None, None, gP, gW0, gR0, gy0


# ``cpu_recurrences.delta_rnn_projected`` in f32 Triton kernels: the layer's raw slow projection
# read in place and activated by the kernel, or activated inputs laid out as such a row.
delta_rnn_projected = triton_kernels.projected_entry(_DeltaRNNTriton)


def delta_rnn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: tuple[Tensor, Tensor, Tensor],
    state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``recurrent_fast_weights.delta_rnn`` (same arguments, already checked) in f32 Triton
    kernels; on CPU tensors under ``TRITON_INTERPRET=1`` as ``triton_rdn.rdn``."""
    P = projection_row(q, k, v, beta, rk, rv, rbeta)
    return delta_rnn_projected(P, q.shape[2], done, state, state_grad, activate=False)
