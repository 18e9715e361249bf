"""Fused Triton kernels for ``delta_rule`` and ``linear_attention`` (DESIGN §3), one step at a time.

At the paper's unroll (T=50) the chunk-parallel torch path is a few dozen small kernels per call,
launch-bound on a GPU. Here program (b, h) runs all T steps with W in registers, as ``triton_rdn``
does: the forward stores the W each step read (after its reset; T·B·H·d² floats) and the backward
reloads them. ``DELTA`` picks the write: the delta rule's ``kᵀ β (v − k W)`` or the Linear
Transformer's ``kᵀ v`` (β unused). Gradients always flow between steps: the cores' detached
variant (``state_grad="none"``) has its own parallel form. The inputs come as a projection row
[T,B,3Hd(+H)] (fields q, k, v (and β), head-major; ``cpu_recurrences.projection_row``): a layer's
raw slow projection, read in place and activated here (q, k φ, β sigmoid), or already activated
inputs laid out so.
"""

from __future__ import annotations

import functools

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
    matvec,
    phi,
    phi_backward,
    vecmat,
)

NUM_WARPS = {16: 1, 32: 4, 64: 8}  # warps per program by head dim (see triton_rdn)


@triton.jit
def _step_offsets(head, H, D: tl.constexpr):
    """Offsets of one head's q, k, v, β in a projection row [q | k | v | β], each field H slots of
    D floats (β: of 1)."""
    vec = head * D + tl.arange(0, D)
    return vec, H * D + vec, 2 * H * D + vec, 3 * H * D + head


@triton.jit
def _load_step(p, head, H, D: tl.constexpr, DELTA: tl.constexpr, ACTIVATE: tl.constexpr):
    """q, k, v, β of one head from the projection row at p, activated when ACTIVATE (β: 0 for
    the linear write, which has no β field)."""
    oq, ok, ov, ob = _step_offsets(head, H, D)
    q, k, v = tl.load(p + oq), tl.load(p + ok), tl.load(p + ov)
    beta = tl.load(p + ob) if DELTA else 0.0
    if ACTIVATE:
        q, k = phi(q), phi(k)
        if DELTA:
            beta = tl.sigmoid(beta)
    return q, k, v, beta


@triton.jit
def _fast_weight_forward(
    P, done, W0, Ms, Y, W_last, T, B, H,
    D: tl.constexpr, DELTA: tl.constexpr, ACTIVATE: tl.constexpr,
):  # fmt: skip
    """P [T,B,3HD(+H)] = [q | k | v (| β)]; done [T,B]; W0 [B,H,D,D]. ACTIVATE: P is raw,
    activate it here. Writes Ms [T,B,H,D,D] (W as each step read it), Y [T,B,H,D] and the final
    W_last."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b, head = pid // H, pid % H
    F = 3 * H * D + H if DELTA else 3 * H * D
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    W = tl.load(W0 + pid * D * D + mat)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        W = W * kept(done, t, B, b)
        tl.store(Ms + row * D * D + mat, W)
        q, k, v, beta = _load_step(P + (t * B + b) * F, head, H, D, DELTA, ACTIVATE)
        if DELTA:
            y, W = delta_step(W, q, k, v, beta)
        else:
            W = W + k[:, None] * v[None, :]
            y = vecmat(q, W)
        tl.store(Y + row * D + i, y)
    tl.store(W_last + pid * D * D + mat, W)


@triton.jit
def _fast_weight_backward(
    P, done, Ms, gY, gW_last, gP, gW0, T, B, H,
    D: tl.constexpr, DELTA: tl.constexpr, ACTIVATE: tl.constexpr, FINAL: tl.constexpr,
):  # fmt: skip
    """Runs the steps backwards from the stored W; writes gP (P's layout; w.r.t. the raw inputs
    when ACTIVATE) and the initial state's gradient gW0. FINAL: W_last has a gradient (else
    zero)."""
    pid = tl.program_id(0).to(tl.int64)
    b, head = pid // H, pid % H
    F = 3 * H * D + H if DELTA else 3 * H * D
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    oq, ok, ov, ob = _step_offsets(head, H, D)
    gW = tl.load(gW_last + pid * D * D + mat) if FINAL else tl.zeros([D, D], tl.float32)
    for n in tl.range(0, T, num_stages=STAGES):
        t = T - 1 - n
        row = t * B * H + pid
        W = tl.load(Ms + row * D * D + mat)
        gy = tl.load(gY + row * D + i)
        p, gp = P + (t * B + b) * F, gP + (t * B + b) * F
        q, k, v, beta = _load_step(p, head, H, D, DELTA, ACTIVATE)
        if DELTA:
            gW, gq, gk, gv, gbeta = delta_step_backward(W, gW, gy, q, k, v, beta)
            tl.store(gp + ob, gbeta * beta * (1 - beta) if ACTIVATE else gbeta)
        else:  # y = q (W + kᵀ v): gW is also the gradient of the written matrix
            gW = gW + q[:, None] * gy[None, :]
            gq = matvec(W, gy) + k * tl.sum(v * gy, 0)
            gk = matvec(gW, v)
            gv = vecmat(k, gW)
        if ACTIVATE:
            gq, gk = phi_backward(gq, tl.load(p + oq)), phi_backward(gk, tl.load(p + ok))
        tl.store(gp + oq, gq)
        tl.store(gp + ok, gk)
        tl.store(gp + ov, gv)
        gW = gW * kept(done, t, B, b)
    tl.store(gW0 + pid * D * D + mat, gW)


KERNELS = (_fast_weight_forward, _fast_weight_backward)  # what the tests compile for sm_90


class _FastWeightTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, activate, num_heads, done, P, W0):
        T, B, _ = P.shape
        H, d = num_heads, W0.shape[-1]
        P, done = P.contiguous(), done.contiguous()
        Ms = P.new_empty(T, B, H, d, d)
        Y = P.new_empty(T, B, H, d)
        W_last = torch.empty_like(W0)
        _fast_weight_forward[(B * H,)](
            P, done, W0.contiguous(), Ms, Y, W_last, T, B, H,
            D=d, DELTA=delta, ACTIVATE=activate, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.delta, ctx.activate = delta, activate
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(P, done, Ms)
        return Y, W_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last):
        P, done, Ms = ctx.saved_tensors
        T, B, H, d = Ms.shape[:4]
        gY = P.new_zeros(T, B, H, d) if gY is None else gY.contiguous()
        (gW_last,), has_final = triton_kernels.final_state_grads((gW_last,), ((B, H, d, d),), gY)
        gP = torch.empty_like(P)
        gW0 = P.new_empty(B, H, d, d)
        _fast_weight_backward[(B * H,)](
            P, done, Ms, gY, gW_last, gP, gW0, T, B, H,
            D=d, DELTA=ctx.delta, ACTIVATE=ctx.activate, FINAL=has_final,
            num_warps=NUM_WARPS[d],
        )  # fmt: skip
        return None, None, None, None, gP, gW0


def fast_weight_projected(
    P: Tensor,
    num_heads: int,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str = "full",
    activate: bool = True,
    delta: bool = True,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The delta rule (``delta``) or the Linear Transformer's rule over a layer's raw slow
    projection P [T,B,3Hd+H] (fields q, k, v, β, head-major; no β for the linear rule), read in
    place and activated by the kernel (``activate``: φ to q, k, sigmoid to β), or over activated
    inputs laid out so. State (W,) and result as the cores carry them; gradients always flow
    between steps (``state_grad`` must be "full")."""
    if state_grad != "full":
        raise ValueError(f"the linear rules' kernels need state_grad='full', not {state_grad!r}")
    y, W = _FastWeightTriton.apply(delta, activate, num_heads, done, P.float(), state[0].float())
    return y, (W,)


delta_rule_projected = functools.partial(fast_weight_projected, delta=True)
linear_attention_projected = functools.partial(fast_weight_projected, delta=False)


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, done: Tensor, W: Tensor
) -> tuple[Tensor, Tensor]:
    """``fast_weights.delta_rule`` (same arguments, already checked, d_k = d_v) in f32 Triton
    kernels; on CPU tensors under ``TRITON_INTERPRET=1`` as ``triton_rdn.rdn``."""
    P = projection_row(q, k, v, beta)
    y, (W,) = delta_rule_projected(P, q.shape[2], done, (W,), activate=False)
    return y, W


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, done: Tensor, W: Tensor
) -> tuple[Tensor, Tensor]:
    """``fast_weights.linear_attention`` in the same kernels, with the write ``kᵀ v``."""
    P = projection_row(q, k, v)
    y, (W,) = linear_attention_projected(P, q.shape[2], done, (W,), activate=False)
    return y, W
