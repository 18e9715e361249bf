"""Triton device functions shared by the fused recurrence kernels (one [d,d] tile per program).

Vectors are length-d rows; a fast-weight matrix M is a [d,d] register tile, key-major as in
DESIGN §3. Each program owns one (batch, head) pair, so every product is vector × matrix: below
``tl.dot``'s minimum of 16 rows, hence broadcast-multiply-reduce on the tile. Everything is f32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Software-pipelining depth of the time loops: a step's loads (inputs, stored matrices) are issued
# while the previous step computes, since each step's work is a short dependent chain.
STAGES = tl.constexpr(2)


@triton.jit
def tanh(x):
    """tanh through the sigmoid (libdevice's tanh has no interpreter implementation)."""
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def softmax(x):
    e = tl.exp(x - tl.max(x, 0))
    return e / tl.sum(e, 0)


@triton.jit
def softmax_backward(g, p):
    """Gradient w.r.t. the logits of ``p = softmax(logits)`` given the gradient g w.r.t. p."""
    return p * (g - tl.sum(g * p, 0))


@triton.jit
def vecmat(x, M):
    """Row vector times matrix: ``x M``."""
    return tl.sum(x[:, None] * M, 0)


@triton.jit
def matvec(M, x):
    """Matrix times column vector, returned as a row: ``x Mᵀ``."""
    return tl.sum(M * x[None, :], 1)


@triton.jit
def delta_step(M, q, k, v, beta):
    """DS(M; q,k,v,β) of DESIGN §3: write ``kᵀ β (v − k M)``, then read ``q M``; returns (y, M)."""
    u = beta * (v - vecmat(k, M))
    M = M + k[:, None] * u[None, :]
    return vecmat(q, M), M


@triton.jit
def delta_step_backward(M, gM, gy, q, k, v, beta):
    """Backward of ``delta_step`` from the matrix M it read.

    gM is the gradient w.r.t. the written matrix, gy w.r.t. the read y. Returns the gradient
    w.r.t. M and those w.r.t. q, k, v and β.
    """
    diff = v - vecmat(k, M)
    u = beta * diff
    gM = gM + q[:, None] * gy[None, :]
    gq = matvec(M, gy) + k * tl.sum(u * gy, 0)
    gu = vecmat(k, gM)
    gv = beta * gu
    gk = tl.sum(gM * u[None, :] - M * gv[None, :], 1)
    gM = gM - k[:, None] * gv[None, :]
    return gM, gq, gk, gv, tl.sum(gu * diff, 0)


@triton.jit
def _load_dual_step(x, D: tl.constexpr):
    """The inputs of one step's two delta steps, on W and on R: q, k, v, β, k̃, ṽ, β̃ from x, a row
    laid out [q | k | v | β | k̃ | ṽ | β̃] (5D + 2 floats)."""
    i = tl.arange(0, D)
    q, k, v, beta = tl.load(x + i), tl.load(x + D + i), tl.load(x + 2 * D + i), tl.load(x + 3 * D)
    rk, rv, rbeta = tl.load(x + 3 * D + 1 + i), tl.load(x + 4 * D + 1 + i), tl.load(x + 5 * D + 1)
    return q, k, v, beta, rk, rv, rbeta


@triton.jit
def _store_dual_step(x, q, k, v, beta, rk, rv, rbeta, D: tl.constexpr):
    """Write a row in ``_load_dual_step``'s layout."""
    i = tl.arange(0, D)
    tl.store(x + i, q)
    tl.store(x + D + i, k)
    tl.store(x + 2 * D + i, v)
    tl.store(x + 3 * D, beta)
    tl.store(x + 3 * D + 1 + i, rk)
    tl.store(x + 4 * D + 1 + i, rv)
    tl.store(x + 5 * D + 1, rbeta)


@triton.jit
def dual_step(W, R, s, x, D: tl.constexpr):
    """The Delta RNN's step (and each Delta LSTM gate's): ``DS(W; q,k,v,β) + DS(R; s,k̃,ṽ,β̃)``
    with the inputs at x (``_load_dual_step``'s layout); returns the summed read, W and R."""
    q, k, v, beta, rk, rv, rbeta = _load_dual_step(x, D)
    z, W = delta_step(W, q, k, v, beta)
    r, R = delta_step(R, s, rk, rv, rbeta)
    return z + r, W, R


@triton.jit
def dual_step_backward(W, R, gW, gR, g, s, x, gx, D: tl.constexpr):
    """Backward of ``dual_step`` from the W and R it read, given g (gradient of the read) and
    gW, gR (of the written matrices). Writes the inputs' gradients to gx in x's layout; returns
    the gradients w.r.t. W, R and s."""
    q, k, v, beta, rk, rv, rbeta = _load_dual_step(x, D)
    gW, gq, gk, gv, gbeta = delta_step_backward(W, gW, g, q, k, v, beta)
    gR, gs, grk, grv, grbeta = delta_step_backward(R, gR, g, s, rk, rv, rbeta)
    _store_dual_step(gx, gq, gk, gv, gbeta, grk, grv, grbeta, D)
    return gW, gR, gs
