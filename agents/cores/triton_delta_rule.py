"""Fused Triton kernels for ``delta_rule`` and ``linear_attention`` (DESIGN §3), one step at a time.

At the paper's unroll (T=50) the chunk-parallel torch path is a few dozen small kernels per call,
launch-bound on a GPU. Here program (b, h) runs all T steps with W in registers, as ``triton_rdn``
does: the forward stores the W each step read (after its reset; T·B·H·d² floats) and the backward
reloads them. ``DELTA`` picks the write: the delta rule's ``kᵀ β (v − k W)`` or the Linear
Transformer's ``kᵀ v`` (β unused). Gradients always flow between steps: the cores' detached
variant (``state_grad="none"``) has its own parallel form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from agents.cores.triton_ops import STAGES, delta_step, delta_step_backward, matvec, vecmat

NUM_WARPS = {16: 1, 32: 4, 64: 8}  # warps per program by head dim (see triton_rdn)


@triton.jit
def _load_step(x, D: tl.constexpr):
    """q, k, v, β of one step from a row laid out [q | k | v | β] (3D + 1 floats)."""
    i = tl.arange(0, D)
    return tl.load(x + i), tl.load(x + D + i), tl.load(x + 2 * D + i), tl.load(x + 3 * D)


@triton.jit
def _fast_weight_forward(X, keep, W0, Ms, Y, W_last, T, B, H, D: tl.constexpr, DELTA: tl.constexpr):
    """X [T,B,H,3D+1] = [q | k | v | β]; keep [T,B]; W0 [B,H,D,D]. Writes Ms [T,B,H,D,D] (W as
    each step read it), Y [T,B,H,D] and the final W_last."""
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    W = tl.load(W0 + pid * D * D + mat)
    for t in tl.range(0, T, num_stages=STAGES):
        row = t * B * H + pid
        W = W * tl.load(keep + t * B + b)
        tl.store(Ms + row * D * D + mat, W)
        q, k, v, beta = _load_step(X + row * (3 * D + 1), D)
        if DELTA:
            y, W = delta_step(W, q, k, v, beta)
        else:
            W = W + k[:, None] * v[None, :]
            y = vecmat(q, W)
        tl.store(Y + row * D + i, y)
    tl.store(W_last + pid * D * D + mat, W)


@triton.jit
def _fast_weight_backward(
    X, keep, Ms, gY, gW_last, gX, gW0, T, B, H, D: tl.constexpr, DELTA: tl.constexpr
):
    """Runs the steps backwards from the stored W; writes gX (X's layout; β's slot is 0 for the
    linear write) and the initial state's gradient gW0."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    i = tl.arange(0, D)
    mat = i[:, None] * D + i[None, :]
    gW = tl.load(gW_last + pid * D * D + mat)
    for n in tl.range(0, T, num_stages=STAGES):
        t = T - 1 - n
        row = t * B * H + pid
        W = tl.load(Ms + row * D * D + mat)
        gy = tl.load(gY + row * D + i)
        x, gx = X + row * (3 * D + 1), gX + row * (3 * D + 1)
        q, k, v, beta = _load_step(x, D)
        if DELTA:
            gW, gq, gk, gv, gbeta = delta_step_backward(W, gW, gy, q, k, v, beta)
        else:  # y = q (W + kᵀ v): gW is also the gradient of the written matrix
            gW = gW + q[:, None] * gy[None, :]
            gq = matvec(W, gy) + k * tl.sum(v * gy, 0)
            gk = matvec(gW, v)
            gv = vecmat(k, gW)
            gbeta = 0.0
        tl.store(gx + i, gq)
        tl.store(gx + D + i, gk)
        tl.store(gx + 2 * D + i, gv)
        tl.store(gx + 3 * D, gbeta)
        gW = gW * tl.load(keep + t * B + b)
    tl.store(gW0 + pid * D * D + mat, gW)


KERNELS = (_fast_weight_forward, _fast_weight_backward)  # what the tests compile for sm_90


class _FastWeightTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, done, q, k, v, beta, W0):
        T, B, H, d = q.shape
        delta = beta is not None
        X = torch.cat([q, k, v, beta if delta else q.new_zeros(T, B, H, 1)], -1)
        keep = 1 - done.to(X.dtype)
        Ms = X.new_empty(T, B, H, d, d)
        Y = X.new_empty(T, B, H, d)
        W_last = X.new_empty(B, H, d, d)
        _fast_weight_forward[(B * H,)](
            X, keep, W0.contiguous(), Ms, Y, W_last, T, B, H,
            D=d, DELTA=delta, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        ctx.delta = delta
        ctx.save_for_backward(X, keep, Ms)
        return Y, W_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW_last):
        X, keep, Ms = ctx.saved_tensors
        T, B, H, d = Ms.shape[:4]
        gX = torch.empty_like(X)
        gW0 = X.new_empty(B, H, d, d)
        _fast_weight_backward[(B * H,)](
            X, keep, Ms, gY.contiguous(), gW_last.contiguous(), gX, gW0, T, B, H,
            D=d, DELTA=ctx.delta, num_warps=NUM_WARPS[d],
        )  # fmt: skip
        gq, gk, gv, gbeta = gX.split([d, d, d, 1], -1)
        return None, gq, gk, gv, gbeta if ctx.delta else None, gW0


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, done: Tensor, W: Tensor
) -> tuple[Tensor, Tensor]:
    """``fast_weights.delta_rule`` (same arguments, already checked, d_k = d_v) in f32 Triton
    kernels; on CPU tensors under ``TRITON_INTERPRET=1`` as ``triton_rdn.rdn``."""
    return _FastWeightTriton.apply(done, *(x.float() for x in (q, k, v, beta, W)))


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, done: Tensor, W: Tensor
) -> tuple[Tensor, Tensor]:
    """``fast_weights.linear_attention`` in the same kernels, with the write ``kᵀ v``."""
    return _FastWeightTriton.apply(done, q.float(), k.float(), v.float(), None, W.float())
