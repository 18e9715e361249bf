"""Fused Triton kernels for the Delta LSTM (``delta_lstm`` of DESIGN §3).

Same scheme as ``triton_rdn``: program (b, h) runs all T steps with the six fast matrices
(W_g, R_g for the gates g = i, u, o) in registers, and stores the six each step read (after its
reset; 6·T·B·H·d² floats, 157 MB per layer at the paper shapes and T=50) plus the gates and
cells, so the backward reloads them instead of rewinding. Each gate is one ``dual_step``:
``DS(W_g; q_g, k_g, v_g, β_g) + DS(R_g; softmax(h_{t-1}), k̃_g, ṽ_g, β̃_g)``. The inputs come as
a projection row [T,B,15Hd+6H] (``triton_delta_rnn``'s fields, each with the gate axis inside its
head): a layer's raw slow projection activated here (q, k φ; k̃ softmax; β, β̃ sigmoid), or
already activated inputs laid out so.
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

NUM_WARPS = {16: 1, 32: 4, 64: 16}  # warps per program by head dim (no spills below d=64)


@triton.jit
def _delta_lstm_forward(
    P, done, W0, R0, h0, c0, Ms, G, Hs, Cs, W_last, R_last, h_last, c_last, T, B, H,
    D: tl.constexpr, ACTIVATE: tl.constexpr,
):  # fmt: skip
    """P [T,B,15HD+6H] (fields q, k, v, β, k̃, ṽ, β̃, each [H,3,D] or [H,3]); done [T,B];
    W0, R0 [B,H,3,D,D]; h0, c0 [B,H,D]. ACTIVATE: P is raw, activate it here. Writes
    Ms [T,B,H,3,2,D,D] (W_g and R_g as each step read them), G [T,B,H,3,D] (the gates i, u, o),
    Hs and Cs [T+1,B,H,D] (h0 and c0, then every step's h and c) and the final W_last, R_last
    [B,H,3,D,D], h_last and c_last [B,H,D]."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b, head = pid // H, pid % H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    DD: tl.constexpr = D * D
    F = 15 * H * D + 6 * H
    w = pid * 3 * DD + mat
    Wi, Wu, Wo = tl.load(W0 + w), tl.load(W0 + w + DD), tl.load(W0 + w + 2 * DD)
    Ri, Ru, Ro = tl.load(R0 + w), tl.load(R0 + w + DD), tl.load(R0 + w + 2 * DD)
    h, c = tl.load(h0 + pid * D + i), tl.load(c0 + pid * D + i)
    tl.store(Hs + pid * D + i, h)
    tl.store(Cs + pid * D + i, c)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        a = kept(done, t, B, b)
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
        p = P + (t * B + b) * F
        slot = 3 * head
        pi, Wi, Ri = dual_step(Wi, Ri, s, p, slot, 3 * H, D, ACTIVATE, True)
        u, Wu, Ru = dual_step(Wu, Ru, s, p, slot + 1, 3 * H, D, ACTIVATE, True)
        po, Wo, Ro = dual_step(Wo, Ro, s, p, slot + 2, 3 * H, D, ACTIVATE, True)
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
    tl.store(h_last + pid * D + i, h)
    tl.store(c_last + pid * D + i, c)


@triton.jit
def _delta_lstm_backward(
    P, done, Ms, G, Hs, Cs, gY, gW_last, gR_last, gh_last, gc_last, gP, gW0, gR0, gh0, gc0,
    T, B, H, STEPS, D: tl.constexpr, FULL: tl.constexpr, ACTIVATE: tl.constexpr,
    FINAL: tl.constexpr,
):  # fmt: skip
    """Program (b·H + h, c) runs steps [c·STEPS, (c+1)·STEPS) backwards. Writes gP (P's layout)
    and, from the program holding step 0, the initial state's gradients gW0, gR0, gh0, gc0.
    FULL: gradients flow between steps. FINAL: the final state has gradients (else zero)."""
    pid = tl.program_id(0).to(tl.int64)
    b, head = pid // H, pid % H
    lo = tl.program_id(1) * STEPS
    hi = tl.minimum(lo + STEPS, T)
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    DD: tl.constexpr = D * D
    F = 15 * H * D + 6 * H
    w = pid * 3 * DD + mat
    if FINAL:  # the unroll's last step also gets the final state's gradient
        last = (hi == T).to(tl.float32)
        gWi, gWu = tl.load(gW_last + w) * last, tl.load(gW_last + w + DD) * last
        gWo = tl.load(gW_last + w + 2 * DD) * last
        gRi, gRu = tl.load(gR_last + w) * last, tl.load(gR_last + w + DD) * last
        gRo = tl.load(gR_last + w + 2 * DD) * last
        gh, gc = tl.load(gh_last + pid * D + i) * last, tl.load(gc_last + pid * D + i) * last
    else:
        zero, zero_vec = tl.zeros([D, D], tl.float32), tl.zeros([D], tl.float32)
        gWi, gWu, gWo, gRi, gRu, gRo = zero, zero, zero, zero, zero, zero
        gh, gc = zero_vec, zero_vec
    for n in tl.range(0, hi - lo, num_stages=STAGES):
        t = hi - 1 - n
        row = t * B * H + pid
        a = kept(done, t, B, b)
        s = softmax(tl.load(Hs + row * D + i) * a)
        c_prev = tl.load(Cs + row * D + i) * a
        g = G + row * 3 * D + i
        ig, u, og = tl.load(g), tl.load(g + D), tl.load(g + 2 * D)
        gh += tl.load(gY + row * D + i)
        gc += gh * og
        g_pi = gc * (u - c_prev) * ig * (1 - ig)
        g_po = gh * tl.load(Cs + (row + B * H) * D + i) * og * (1 - og)
        m = Ms + row * 6 * DD + mat
        p, gp, slot, ns = P + (t * B + b) * F, gP + (t * B + b) * F, 3 * head, 3 * H
        gWi, gRi, gsi = dual_step_backward(
            tl.load(m), tl.load(m + DD), gWi, gRi, g_pi, s, p, gp, slot, ns, D, ACTIVATE, True
        )
        gWu, gRu, gsu = dual_step_backward(
            tl.load(m + 2 * DD), tl.load(m + 3 * DD), gWu, gRu, gc * ig, s, p, gp, slot + 1, ns,
            D, ACTIVATE, True,
        )  # fmt: skip
        gWo, gRo, gso = dual_step_backward(
            tl.load(m + 4 * DD), tl.load(m + 5 * DD), gWo, gRo, g_po, s, p, gp, slot + 2, ns,
            D, ACTIVATE, True,
        )  # fmt: skip
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
    def forward(ctx, state_grad, activate, num_heads, done, P, W0, R0, h0, c0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        P, done = P.contiguous(), done.contiguous()
        Ms, G = P.new_empty(T, B, H, 3, 2, d, d), P.new_empty(T, B, H, 3, d)
        Hs, Cs = P.new_empty(T + 1, B, H, d), P.new_empty(T + 1, B, H, d)
        W_last, R_last = torch.empty_like(W0), torch.empty_like(R0)
        h_last, c_last = torch.empty_like(h0), torch.empty_like(c0)
        _delta_lstm_forward[(B * H,)](
            P, done, W0.contiguous(), R0.contiguous(), h0.contiguous(), c0.contiguous(),
            Ms, G, Hs, Cs, W_last, R_last, h_last, c_last, T, B, H,
            D=d, ACTIVATE=activate, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.state_grad, ctx.activate = state_grad, activate
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(P, done, Ms, G, Hs, Cs)
        return Hs[1:], W_last, R_last, h_last, c_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last, gR_last, gh_last, gc_last):
        P, done, Ms, G, Hs, Cs = ctx.saved_tensors
        T, B, H, d = Hs.shape[0] - 1, *Hs.shape[1:]
        gY = Hs[1:].new_zeros(Hs[1:].shape) if gY is None else gY.contiguous()
        mats, vecs = (B, H, 3, d, d), (B, H, d)
        final, has_final = triton_kernels.final_state_grads(
            (gW_last, gR_last, gh_last, gc_last), (mats, mats, vecs, vecs), gY
        )
        gP = torch.empty_like(P)
        gW0, gR0 = P.new_empty(mats), P.new_empty(mats)
        gh0, gc0 = P.new_empty(vecs), P.new_empty(vecs)
        full = ctx.state_grad == "full"
        steps = T if full else 1
        _delta_lstm_backward[(B * H, triton.cdiv(T, steps))](
            P, done, Ms, G, Hs, Cs, gY, *final, gP, gW0, gR0, gh0, gc0, T, B, H, steps,
            D=d, FULL=full, ACTIVATE=ctx.activate, FINAL=has_final, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        return None, None, None, None, gP, gW0, gR0, gh0, gc0


# ``cpu_recurrences.delta_lstm_projected`` in f32 Triton kernels: the layer's raw slow projection
# read in place and activated by the kernel, or activated inputs laid out as such a row.
delta_lstm_projected = triton_kernels.projected_entry(_DeltaLSTMTriton)


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
    P = projection_row(q, k, v, beta, rk, rv, rbeta)
    return delta_lstm_projected(P, q.shape[2], done, state, state_grad, activate=False)
