"""Fast-weight recurrences as functions (DESIGN §3): per-step references and fast paths.

All functions are time-major: q, k, v are `[T,B,H,d]`, beta `[T,B,H,1]`, done `[T,B]` bool and the
fast weight W is `[B,H,d_k,d_v]`, key-major (`y_t = q_t W_t`). Before step t the state is multiplied
by `1 - done[t]` (DESIGN §2). The state passed in is never modified in place.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.cores import chunks, triton_kernels
from agents.cores.chunks import Chunks
from agents.cores.recurrent_fast_weights import delta_lstm, delta_rnn, rdn

__all__ = ["IMPLS", "delta_lstm", "delta_rnn", "delta_rule", "linear_attention", "phi", "rdn"]

IMPLS = ("reference", "fast")
# Most steps per chunk of the fast path. At the paper's unroll (T=50/51, B=32, H=4, d=32) on a
# 2-core CPU one chunk per unroll was fastest; longer unrolls are split into near-equal chunks to
# bound the O(C²) chunk tensors.
CHUNK_SIZE = 64


def phi(x: Tensor) -> Tensor:
    """The paper's key/query map: `(elu(x)+1) / (Σ_d (elu(x)+1) + 1e-5)` over the last dim."""
    p = F.elu(x) + 1.0
    return p / (p.sum(-1, keepdim=True) + 1e-5)


def _check(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, done: Tensor, W: Tensor, impl: str
) -> None:
    """Validate `impl` and the shapes shared by `linear_attention` and `delta_rule`."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be [T,B,H,d_k] and v [T,B,H,d_v]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    T, B, H, dk = q.shape
    dv = v.shape[-1]
    if T == 0:
        raise ValueError("the unroll must have at least one step (T >= 1); got T=0")
    if beta is not None and beta.shape != (T, B, H, 1):
        raise ValueError(f"beta must be {(T, B, H, 1)}; got {tuple(beta.shape)}")
    if done.shape != (T, B) or done.dtype != torch.bool:
        raise ValueError(f"done must be a bool tensor of shape {(T, B)}; got {tuple(done.shape)}")
    if W.shape != (B, H, dk, dv):
        raise ValueError(f"W must be {(B, H, dk, dv)}; got {tuple(W.shape)}")


def _reference(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, done: Tensor, W: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-step loop, the oracle. `beta=None` is the linear-attention write `W += kᵀ v`."""
    keep = (~done).to(W.dtype)[:, :, None, None, None]  # [T,B,1,1,1]
    ys = []
    for t in range(q.shape[0]):
        W = W * keep[t]
        if beta is None:
            write = v[t]
        else:
            v_old = torch.einsum("bhi,bhij->bhj", k[t], W)
            write = beta[t] * (v[t] - v_old)
        W = W + torch.einsum("bhi,bhj->bhij", k[t], write)
        ys.append(torch.einsum("bhi,bhij->bhj", q[t], W))
    return torch.stack(ys), W


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    done: Tensor,
    W: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form of `_reference`: exact, resets inside a chunk included.

    Within a chunk starting from state W0 and with segment ids `seg = cumsum(done)`, step t sees
    W0 only if no reset happened in the chunk up to t (`seg_t == 0`) and sees the writes of the
    earlier steps s ≤ t of its own segment (`agents.cores.chunks`).
    """
    ch = Chunks.of(done, chunk_size, q.dtype)
    Q, K, V = ch.split(q), ch.split(k), ch.split(v)
    scores = ch.scores(Q, K)
    starts, Us, W = chunks.writes(ch, K, V, None if beta is None else ch.split(beta), W)
    return ch.merge(chunks.read(ch, Q, scores, starts, Us)), W


def _dispatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    done: Tensor,
    W: Tensor,
    impl: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Validate the arguments and run the chosen implementation."""
    _check(q, k, v, beta, done, W, impl)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if impl == "reference":
        return _reference(q, k, v, beta, done, W)
    if q.shape[-1] == v.shape[-1] and triton_kernels.usable(q):
        from agents.cores import triton_delta_rule

        if beta is None:
            return triton_delta_rule.linear_attention(q, k, v, done, W)
        return triton_delta_rule.delta_rule(q, k, v, beta, done, W)
    return _chunked(q, k, v, beta, done, W, chunk_size)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    done: Tensor,
    W: Tensor,
    impl: str = "fast",
    *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Linear Transformer: `W ← W + kᵀ v; y = q W` per step. Returns (y `[T,B,H,d_v]`, final W).

    `impl="reference"` is the per-step loop; `"fast"` the chunk-parallel form (chunks of at most
    `chunk_size` steps; the same numbers up to float rounding), or on CUDA the fused Triton
    kernels of ``triton_delta_rule`` (``triton_kernels.usable``).
    """
    return _dispatch(q, k, v, None, done, W, impl, chunk_size)


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    done: Tensor,
    W: Tensor,
    impl: str = "fast",
    *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Delta Net: `v̄ = k W; W ← W + kᵀ β (v − v̄); y = q W` (write before read) per step.

    Returns (y `[T,B,H,d_v]`, final W); `impl` and `chunk_size` as in `linear_attention`.
    """
    return _dispatch(q, k, v, beta, done, W, impl, chunk_size)
