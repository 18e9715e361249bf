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
def kept(done, t, B, b):
    """``1 − done[t, b]`` as f32 (done: [T,B] bool): the reset rule's factor (DESIGN §2)."""
    return 1.0 - tl.load(done + t * B + b).to(tl.float32)


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
def phi(x):
    """The paper's key/query map ``(elu(x)+1) / (Σ (elu(x)+1) + 1e-5)`` (``fast_weights.phi``)."""
    p = tl.where(x > 0, x + 1, tl.exp(x))
    return p / (tl.sum(p, 0) + 1e-5)


@triton.jit
def phi_backward(g, x):
    """Gradient w.r.t. x of ``phi(x)`` given the gradient g w.r.t. its output."""
    p = tl.where(x > 0, x + 1, tl.exp(x))
    norm = tl.sum(p, 0) + 1e-5
    gp = (g - tl.sum(g * p, 0) / norm) / norm
    return gp * tl.where(x > 0, 1.0, p)


@triton.jit
def _key_map(x, PHI: tl.constexpr):
    """The activation of the main queries and keys: φ (Delta LSTM) or softmax (Delta RNN)."""
    return phi(x) if PHI else softmax(x)


@triton.jit
def _key_map_backward(g, x, PHI: tl.constexpr):
    return phi_backward(g, x) if PHI else softmax_backward(g, softmax(x))


@triton.jit
def _dual_offsets(slot, NS, D: tl.constexpr):
    """Offsets of one slot's q, k, v, β, k̃, ṽ, β̃ in a projection row: seven fields one after
    the other, each NS slots (head, or head × gate) of D floats (β, β̃: of 1 float)."""
    i = tl.arange(0, D)
    vec = slot * D + i
    return (
        vec, NS * D + vec, 2 * NS * D + vec, 3 * NS * D + slot,
        3 * NS * D + NS + vec, 4 * NS * D + NS + vec, 5 * NS * D + NS + slot,
    )  # fmt: skip


@triton.jit
def _load_dual_step(p, slot, NS, D: tl.constexpr, ACTIVATE: tl.constexpr, PHI: tl.constexpr):
    """The inputs of one step's two delta steps, on W and on R: q, k, v, β, k̃, ṽ, β̃ of one slot
    of the projection row at p (``_dual_offsets``), activated here when ACTIVATE."""
    oq, ok, ov, ob, ork, orv, orb = _dual_offsets(slot, NS, D)
    q, k, v, beta = tl.load(p + oq), tl.load(p + ok), tl.load(p + ov), tl.load(p + ob)
    rk, rv, rbeta = tl.load(p + ork), tl.load(p + orv), tl.load(p + orb)
    if ACTIVATE:
        q, k, beta = _key_map(q, PHI), _key_map(k, PHI), tl.sigmoid(beta)
        rk, rbeta = softmax(rk), tl.sigmoid(rbeta)
    return q, k, v, beta, rk, rv, rbeta


@triton.jit
def dual_step(W, R, s, p, slot, NS, D: tl.constexpr, ACTIVATE: tl.constexpr, PHI: tl.constexpr):
    """The Delta RNN's step (and each Delta LSTM gate's): ``DS(W; q,k,v,β) + DS(R; s,k̃,ṽ,β̃)``
    with the inputs of ``_load_dual_step``; returns the summed read, W and R."""
    q, k, v, beta, rk, rv, rbeta = _load_dual_step(p, slot, NS, D, ACTIVATE, PHI)
    z, W = delta_step(W, q, k, v, beta)
    r, R = delta_step(R, s, rk, rv, rbeta)
    return z + r, W, R


@triton.jit
def dual_step_backward(
    W, R, gW, gR, g, s, p, gp, slot, NS, D: tl.constexpr, ACTIVATE: tl.constexpr,
    PHI: tl.constexpr,
):  # fmt: skip
    """Backward of ``dual_step`` from the W and R it read, given g (gradient of the read) and
    gW, gR (of the written matrices). Writes the inputs' gradients (w.r.t. the raw inputs when
    ACTIVATE) to the row gp, at the offsets of p; returns the gradients w.r.t. W, R and s."""
    q, k, v, beta, rk, rv, rbeta = _load_dual_step(p, slot, NS, D, ACTIVATE, PHI)
    gW, gq, gk, gv, gbeta = delta_step_backward(W, gW, g, q, k, v, beta)
    gR, gs, grk, grv, grbeta = delta_step_backward(R, gR, g, s, rk, rv, rbeta)
    oq, ok, ov, ob, ork, orv, orb = _dual_offsets(slot, NS, D)
    if ACTIVATE:
        gq = _key_map_backward(gq, tl.load(p + oq), PHI)
        gk = _key_map_backward(gk, tl.load(p + ok), PHI)
        gbeta, grk = gbeta * beta * (1 - beta), softmax_backward(grk, rk)
        grbeta = grbeta * rbeta * (1 - rbeta)
    tl.store(gp + oq, gq)
    tl.store(gp + ok, gk)
    tl.store(gp + ov, gv)
    tl.store(gp + ob, gbeta)
    tl.store(gp + ork, grk)
    tl.store(gp + orv, grv)
    tl.store(gp + orb, grbeta)
    return gW, gR, gs
