"""Fused Triton kernels for the Delta LSTM (``delta_lstm`` of DESIGN §3).

Same scheme as ``triton_rdn``: program (b, h) runs all T steps with the six fast matrices
(W_g, R_g for the gates g = i, u, o) in registers, and stores the six each step read (after its
reset; 6·T·B·H·d² floats, 157 MB per layer at the paper shapes and T=50) plus the gates and
cells, so the backward reloads them instead of rewinding. Each gate is one ``dual_step``:
``DS(W_g; q_g, k_g, v_g, β_g) + DS(R_g; softmax(h_{t-1}), k̃_g, ṽ_g, β̃_g)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from agents.cores.triton_ops import STAGES, dual_step, dual_step_backward, softmax, softmax_backward

NUM_WARPS = {16: 1, 32: 4, 64: 16}  # warps per program by head dim (no spills below d=64)


@triton.jit
def _delta_lstm_forward(
    X, keep, W0, R0, h0, c0, Ms, G, Hs, Cs, W_last, R_last, T, B, H, D: tl.constexpr,
):  # fmt: skip
    """X [T,B,H,3,5D+2]: per gate [q | k | v | β | k̃ | ṽ | β̃]; keep [T,B]; W0, R0 [B,H,3,D,D];
    h0, c0 [B,H,D]. Writes Ms [T,B,H,3,2,D,D] (W_g and R_g as each step read them), G [T,B,H,3,D]
    (the gates i, u, o), Hs and Cs [T+1,B,H,D] (h0 and c0, then every step's h and c) and the
    final W_last, R_last [B,H,3,D,D]."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    DD: tl.constexpr = D * D
    E: tl.constexpr = 5 * D + 2
    w = pid * 3 * DD + mat
    Wi, Wu, Wo = tl.load(W0 + w), tl.load(W0 + w + DD), tl.load(W0 + w + 2 * DD)
    Ri, Ru, Ro = tl.load(R0 + w), tl.load(R0 + w + DD), tl.load(R0 + w + 2 * DD)
    h, c = tl.load(h0 + pid * D + i), tl.load(c0 + pid * D + i)
    tl.store(Hs + pid * D + i, h)
    tl.store(Cs + pid * D + i, c)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        a = tl.load(keep + t * B + b)
        Wi, Wu, Wo, Ri, Ru, Ro = Wi * a, Wu * a, Wo * a, Ri * a, Ru * a, Ro * a
        h, c = h * a, c * a
        m = Ms + row * 6 * DD + mat
        tl.store(m, Wi)
        tl.store(m + DD, Ri)
        tl.store(m + 2 * DD, Wu)
        tl.store(m + 3 * DD, Ru)
        tl.store(m + 4 * DD, Wo)
        tl.store(m + 5 * DD, Ro)
        s = softmax(h)
        x = X + row * 3 * E
        pi, Wi, Ri = dual_step(Wi, Ri, s, x, D)
        u, Wu, Ru = dual_step(Wu, Ru, s, x + E, D)
        po, Wo, Ro = dual_step(Wo, Ro, s, x + 2 * E, D)
        ig, og = tl.sigmoid(pi), tl.sigmoid(po)
        c = ig * u + (1 - ig) * c
        h = og * c
        g = G + row * 3 * D + i
        tl.store(g, ig)
        tl.store(g + D, u)
        tl.store(g + 2 * D, og)
        tl.store(Hs + (row + B * H) * D + i, h)
        tl.store(Cs + (row + B * H) * D + i, c)
    tl.store(W_last + w, Wi)
    tl.store(W_last + w + DD, Wu)
    tl.store(W_last + w + 2 * DD, Wo)
    tl.store(R_last + w, Ri)
    tl.store(R_last + w + DD, Ru)
    tl.store(R_last + w + 2 * DD, Ro)


@triton.jit
def _delta_lstm_backward(
    X, keep, Ms, G, Hs, Cs, gY, gW_last, gR_last, gh_last, gc_last, gX, gW0, gR0, gh0, gc0,
    T, B, H, STEPS, D: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, c) runs steps [c·STEPS, (c+1)·STEPS) backwards. Writes gX (X's layout)
    and, from the program holding step 0, the initial state's gradients gW0, gR0, gh0, gc0.
    FULL: gradients flow between steps."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    lo = tl.program_id(1) * STEPS
    hi = tl.minimum(lo + STEPS, T)
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    DD: tl.constexpr = D * D
    E: tl.constexpr = 5 * D + 2
    w = pid * 3 * DD + mat
    last = (hi == T).to(tl.float32)  # the unroll's last step also gets the final state's gradient
    gWi, gWu = tl.load(gW_last + w) * last, tl.load(gW_last + w + DD) * last
    gWo = tl.load(gW_last + w + 2 * DD) * last
    gRi, gRu = tl.load(gR_last + w) * last, tl.load(gR_last + w + DD) * last
    gRo = tl.load(gR_last + w + 2 * DD) * last
    gh, gc = tl.load(gh_last + pid * D + i) * last, tl.load(gc_last + pid * D + i) * last
    for n in tl.range(0, hi - lo, num_stages=STAGES):
        t = hi - 1 - n
        row = t * B * H + pid
        a = tl.load(keep + t * B + b)
        s = softmax(tl.load(Hs + row * D + i) * a)
        c_prev = tl.load(Cs + row * D + i) * a
        g = G + row * 3 * D + i
        ig, u, og = tl.load(g), tl.load(g + D), tl.load(g + 2 * D)
        gh += tl.load(gY + row * D + i)
        gc += gh * og
        g_pi = gc * (u - c_prev) * ig * (1 - ig)
        g_po = gh * tl.load(Cs + (row + B * H) * D + i) * og * (1 - og)
        m = Ms + row * 6 * DD + mat
        x, gx = X + row * 3 * E, gX + row * 3 * E
        gWi, gRi, gsi = dual_step_backward(tl.load(m), tl.load(m + DD), gWi, gRi, g_pi, s, x, gx, D)
        gWu, gRu, gsu = dual_step_backward(
            tl.load(m + 2 * DD), tl.load(m + 3 * DD), gWu, gRu, gc * ig, s, x + E, gx + E, D
        )
        gWo, gRo, gso = dual_step_backward(
            tl.load(m + 4 * DD), tl.load(m + 5 * DD), gWo, gRo, g_po, s, x + 2 * E, gx + 2 * E, D
        )
        # Through the reset; under "none" only step 0 passes its gradient on (to the initial state).
        if not FULL:
            a = a * (t == 0).to(tl.float32)
        gh = softmax_backward(gsi + gsu + gso, s) * a
        gc = gc * (1 - ig) * a
        gWi, gWu, gWo, gRi, gRu, gRo = gWi * a, gWu * a, gWo * a, gRi * a, gRu * a, gRo * a
    if lo == 0:
        tl.store(gW0 + w, gWi)
        tl.store(gW0 + w + DD, gWu)
        tl.store(gW0 + w + 2 * DD, gWo)
        tl.store(gR0 + w, gRi)
        tl.store(gR0 + w + DD, gRu)
        tl.store(gR0 + w + 2 * DD, gRo)
        tl.store(gh0 + pid * D + i, gh)
        tl.store(gc0 + pid * D + i, gc)


KERNELS = (_delta_lstm_forward, _delta_lstm_backward)  # what the tests compile for sm_90


class _DeltaLSTMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, done, q, k, v, beta, rk, rv, rbeta, W0, R0, h0, c0):
        T, B, H, _, d = q.shape
        X = torch.cat([q, k, v, beta, rk, rv, rbeta], -1)
        keep = 1 - done.to(X.dtype)
        Ms, G = X.new_empty(T, B, H, 3, 2, d, d), X.new_empty(T, B, H, 3, d)
        Hs, Cs = X.new_empty(T + 1, B, H, d), X.new_empty(T + 1, B, H, d)
        W_last, R_last = X.new_empty(B, H, 3, d, d), X.new_empty(B, H, 3, d, d)
        _delta_lstm_forward[(B * H,)](
            X, keep, W0.contiguous(), R0.contiguous(), h0.contiguous(), c0.contiguous(),
            Ms, G, Hs, Cs, W_last, R_last, T, B, H, D=d, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.state_grad = state_grad
        ctx.save_for_backward(X, keep, Ms, G, Hs, Cs)
        return Hs[1:], W_last, R_last, Hs[T].clone(), Cs[T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gh_last, gc_last):
        X, keep, Ms, G, Hs, Cs = ctx.saved_tensors
        T, B, H, d = Hs.shape[0] - 1, *Hs.shape[1:]
        gX = torch.empty_like(X)
        gW0, gR0 = X.new_empty(B, H, 3, d, d), X.new_empty(B, H, 3, d, d)
        gh0, gc0 = X.new_empty(B, H, d), X.new_empty(B, H, d)
        full = ctx.state_grad == "full"
        steps = T if full else 1
        _delta_lstm_backward[(B * H, triton.cdiv(T, steps))](
            X, keep, Ms, G, Hs, Cs, gY.contiguous(), gW_last.contiguous(), gR_last.contiguous(),
            gh_last.contiguous(), gc_last.contiguous(), gX, gW0, gR0, gh0, gc0, T, B, H, steps,
            D=d, FULL=full, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        g = gX.split([d, d, d, 1, d, d, 1], -1)
        return None, None, *g, gW0, gR0, gh0, gc0


def delta_lstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: tuple[Tensor, Tensor, Tensor, Tensor],
    state_grad: str = "full",
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``recurrent_fast_weights.delta_lstm`` (same arguments, already checked) in f32 Triton
    kernels; on CPU tensors under ``TRITON_INTERPRET=1`` as ``triton_rdn.rdn``."""
    f32 = [x.float() for x in (q, k, v, beta, rk, rv, rbeta, *state)]
    y, W, R, h, c = _DeltaLSTMTriton.apply(state_grad, done, *f32)
    return y, (W, R, h, c)
