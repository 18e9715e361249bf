"""Chunk-parallel fast-weight writes (DESIGN §3), shared by every fast path that has them.

An unroll's writes ``W ← W + kᵀ u`` with ``u = v`` (linear attention) or the delta rule's
pseudo-values do not depend on what is read, so they can be computed a chunk of steps at a time:
one unit-lower-triangular solve per chunk (the UT transform) instead of one update per step.
Tensors are chunk-major ``[n,B,H,C,e]``; the reset rule of DESIGN §2 (state × ``1 − done[t]``
before step t) is exact inside a chunk through segment masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Chunks:
    """An unroll of ``T`` steps cut into ``n`` chunks of ``C`` steps (the last one padded).

    With segment ids ``seg = cumsum(done)`` inside a chunk (float masks, broadcast over heads):
    same ``[n,B,1,C,C]``: step t sees the write of step s (s ≤ t, same segment);
    sees_w0 ``[n,B,1,C,1]``: no reset in the chunk up to t, so t sees the chunk's start state;
    in_last ``[n,B,1,C,1]``: t is in the chunk's last segment, so its write outlives the chunk.
    """

    T: int
    n: int
    C: int
    same: Tensor
    sees_w0: Tensor
    in_last: Tensor

    @staticmethod
    def of(done: Tensor, chunk_size: int, dtype: torch.dtype) -> Chunks:
        """Near-equal chunks of at most ``chunk_size`` steps for ``done`` [T,B] (little padding)."""
        T, B = done.shape
        n = -(-T // chunk_size)
        C = -(-T // n)
        if n * C > T:
            done = F.pad(done, (0, 0, 0, n * C - T))
        seg = done.view(n, C, B).transpose(1, 2).cumsum(-1)  # [n,B,C]
        causal = torch.ones(C, C, dtype=torch.bool, device=done.device).tril()
        same = (seg[..., :, None] == seg[..., None, :]) & causal
        return Chunks(
            T,
            n,
            C,
            same.to(dtype)[:, :, None],
            (seg == 0).to(dtype)[:, :, None, :, None],
            (seg == seg[..., -1:]).to(dtype)[:, :, None, :, None],
        )

    def split(self, x: Tensor) -> Tensor:
        """``[T,B,H,e]`` -> ``[n,B,H,C,e]``; padded steps are zero (k = v = β = 0 write nothing)."""
        if self.n * self.C > self.T:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.n * self.C - self.T))
        return x.view(self.n, self.C, *x.shape[1:]).permute(0, 2, 3, 1, 4).contiguous()

    def stack(self, *xs: Tensor) -> Tensor:
        """Several ``[T,B,H,e]`` -> ``[n,P,B,H,C,e]`` (P = len(xs)), one copy each."""
        T, B, H, e = xs[0].shape
        out = xs[0].new_empty(self.n, len(xs), B, H, self.C, e)
        for p, x in enumerate(xs):
            if self.n * self.C > T:
                x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.n * self.C - T))
            out[:, p].copy_(x.view(self.n, self.C, B, H, e).permute(0, 2, 3, 1, 4))
        return out

    def scores(self, Q: Tensor, K: Tensor) -> Tensor:
        """``q_t·k_s`` over the steps s that t sees, ``[n,B,H,C,C]``."""
        return (Q @ K.mT) * self.same

    def merge(self, y: Tensor) -> Tensor:
        """``[n,B,H,C,e]`` -> ``[T,B,H,e]``, padding dropped."""
        n, B, H, C, e = y.shape
        return y.permute(0, 3, 1, 2, 4).reshape(n * C, B, H, e)[: self.T]


def writes(
    ch: Chunks, K: Tensor, V: Tensor, Bt: Tensor | None, W: Tensor
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The writes of every chunk: (start state of each chunk, its pseudo-values, final state).

    K, V: ``[n,B,H,C,d]`` chunked keys and values; Bt: chunked β ``[n,B,H,C,1]`` for the delta
    rule, None for linear attention; W: ``[B,H,d_k,d_v]`` the state before the unroll. Step t of
    chunk c writes ``k_tᵀ u_t``, with ``u = v`` or the delta rule's pseudo-values
    ``u_t = β_t (v_t − [seg_t=0] k_t W_c − Σ_{s<t, same segment} (k_t·k_s) u_s)``, where W_c is
    the state the previous chunk left (before the reset of the chunk's first step).
    """
    if Bt is not None:
        Bk = Bt * K
        # A = I + strict lower part of (β K Kᵀ ⊙ same); solved as Uᵀ Aᵀ = rhsᵀ, which hands LAPACK
        # column-major operands without copies. unitriangular=True ignores the diagonal.
        A = (Bk @ K.mT) * ch.same
    starts, Us = [], []
    for c in range(ch.n):
        g = ch.sees_w0[c]
        if Bt is None:
            U = V[c]
        else:
            rhs = Bt[c] * V[c] - g * (Bk[c] @ W)
            U = torch.linalg.solve_triangular(
                A[c].mT, rhs.mT, upper=True, left=False, unitriangular=True
            ).mT
        starts.append(W)
        Us.append(U)
        W = g[..., -1:, :] * W + (ch.in_last[c] * K[c]).mT @ U
    return starts, Us, W


def read(ch: Chunks, Q: Tensor, scores: Tensor, starts: list[Tensor], Us: list[Tensor]) -> Tensor:
    """``q_t W_t`` for every step (write before read), chunked ``[n,B,H,C,d_v]``; ``scores`` is
    ``ch.scores(Q, K)``."""
    return torch.stack(
        [ch.sees_w0[c] * (Q[c] @ starts[c]) + scores[c] @ Us[c] for c in range(ch.n)]
    )
