"""Fused Triton kernels for the Delta RNN (``delta_rnn`` of DESIGN §3).

Same scheme as ``triton_rdn``: program (b, h) runs all T steps with both fast matrices W and R
in registers, stores the pair each step read (after its reset; 2·T·B·H·d² floats), and the
backward reloads them instead of rewinding. Inputs arrive activated (q, k, k̃ softmax, β, β̃
sigmoid), so the only activation inside is ``s = softmax(y_{t-1})``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from agents.cores.triton_ops import STAGES, dual_step, dual_step_backward, softmax, softmax_backward

NUM_WARPS = {16: 1, 32: 4, 64: 8}  # warps per program by head dim (see triton_rdn)


@triton.jit
def _delta_rnn_forward(X, keep, W0, R0, y0, Ms, Ys, W_last, R_last, T, B, H, D: tl.constexpr):
    """X [T,B,H,5D+2] = [q | k | v | β | k̃ | ṽ | β̃]; keep [T,B]; W0, R0 [B,H,D,D]; y0 [B,H,D].
    Writes Ms [T,B,H,2,D,D] (W and R as each step read them), Ys [T+1,B,H,D] (y0, then every
    step's y) and the final W_last, R_last."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    W = tl.load(W0 + pid * D * D + mat)
    R = tl.load(R0 + pid * D * D + mat)
    y = tl.load(y0 + pid * D + i)
    tl.store(Ys + pid * D + i, y)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        a = tl.load(keep + t * B + b)
        W, R, y = W * a, R * a, y * a
        tl.store(Ms + 2 * row * D * D + mat, W)
        tl.store(Ms + (2 * row + 1) * D * D + mat, R)
        y, W, R = dual_step(W, R, softmax(y), X + row * (5 * D + 2), D)
        tl.store(Ys + (row + B * H) * D + i, y)
    tl.store(W_last + pid * D * D + mat, W)
    tl.store(R_last + pid * D * D + mat, R)


@triton.jit
def _delta_rnn_backward(
    X, keep, Ms, Ys, gY, gW_last, gR_last, gy_last, gX, gW0, gR0, gy0,
    T, B, H, STEPS, D: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, c) runs steps [c·STEPS, (c+1)·STEPS) backwards. Writes gX (X's
    layout) and, from the program holding step 0, the initial state's gradients gW0, gR0, gy0.
    FULL: gradients flow between steps."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    lo = tl.program_id(1) * STEPS
    hi = tl.minimum(lo + STEPS, T)
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    last = (hi == T).to(tl.float32)  # the unroll's last step also gets the final state's gradient
    gW = tl.load(gW_last + pid * D * D + mat) * last
    gR = tl.load(gR_last + pid * D * D + mat) * last
    gy = tl.load(gy_last + pid * D + i) * last
    for n in tl.range(0, hi - lo, num_stages=STAGES):
        t = hi - 1 - n
        row = t * B * H + pid
        a = tl.load(keep + t * B + b)
        s = softmax(tl.load(Ys + row * D + i) * a)
        gy += tl.load(gY + row * D + i)
        W, R = tl.load(Ms + 2 * row * D * D + mat), tl.load(Ms + (2 * row + 1) * D * D + mat)
        x, gx = X + row * (5 * D + 2), gX + row * (5 * D + 2)
        gW, gR, gs = dual_step_backward(W, R, gW, gR, gy, s, x, gx, D)
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
    def forward(ctx, state_grad, done, q, k, v, beta, rk, rv, rbeta, W0, R0, y0):
        T, B, H, d = q.shape
        X = torch.cat([q, k, v, beta, rk, rv, rbeta], -1)
        keep = 1 - done.to(X.dtype)
        Ms = X.new_empty(T, B, H, 2, d, d)
        Ys = X.new_empty(T + 1, B, H, d)
        W_last, R_last = X.new_empty(B, H, d, d), X.new_empty(B, H, d, d)
        _delta_rnn_forward[(B * H,)](
            X, keep, W0.contiguous(), R0.contiguous(), y0.contiguous(), Ms, Ys, W_last, R_last,
            T, B, H,
            D=d, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.state_grad = state_grad
        ctx.save_for_backward(X, keep, Ms, Ys)
        return Ys[1:], W_last, R_last, Ys[T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gy_last):
        X, keep, Ms, Ys = ctx.saved_tensors
        T, B, H, d = Ys.shape[0] - 1, *Ys.shape[1:]
        gX = torch.empty_like(X)
        gW0, gR0, gy0 = X.new_empty(B, H, d, d), X.new_empty(B, H, d, d), X.new_empty(B, H, d)
        full = ctx.state_grad == "full"
        steps = T if full else 1
        _delta_rnn_backward[(B * H, triton.cdiv(T, steps))](
            X, keep, Ms, Ys, gY.contiguous(), gW_last.contiguous(), gR_last.contiguous(),
            gy_last.contiguous(), gX, gW0, gR0, gy0, T, B, H, steps,
            D=d, FULL=full, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        g = gX.split([d, d, d, 1, d, d, 1], -1)
        return None, None, *g, gW0, gR0, gy0


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
    f32 = [x.float() for x in (q, k, v, beta, rk, rv, rbeta, *state)]
    y, W, R, y_last = _DeltaRNNTriton.apply(state_grad, done, *f32)
    return y, (W, R, y_last)
