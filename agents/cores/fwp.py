"""The Fast Weight Programmer block shared by every FWP core (DESIGN §3).

``x -> input_proj -> num_layers x [x = x + out(FWP(LN(x))); x = x + FF(LN(x))]``. One class
serves ``lt``, ``delta``, ``delta_rnn``, ``rdn`` and ``delta_lstm``; a table names, per
recurrence, what the slow projection produces (and its activation), the state it carries and
how to call the recurrence of ``agents.cores.fast_weights``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agents.cores import cpu_kernels, cpu_recurrences, triton_kernels
from agents.cores import fast_weights as fw
from agents.linear import Linear

State = tuple[torch.Tensor, ...]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "phi": fw.phi,
    "softmax": lambda x: F.softmax(x, dim=-1),
    "sigmoid": torch.sigmoid,
    "raw": lambda x: x,
}


@dataclass(frozen=True)
class _Recurrence:
    """What one recurrence needs from the block.

    fields: (name, activation) of each slow-projection output, in the recurrence's argument
        order; names starting with "beta"/"rbeta" are one scalar per head (and gate), the others
        one head_dim vector.
    gates: size of the gate axis placed before head_dim (delta_lstm: i, u, o), 0 for none.
    state: "mat" ([H, (G,) d, d] fast weights) or "vec" ([H, d]) per carried tensor.
    """

    fields: tuple[tuple[str, str], ...]
    gates: int
    state: tuple[str, ...]


_RECURRENCES = {
    "lt": _Recurrence((("q", "phi"), ("k", "phi"), ("v", "raw")), 0, ("mat",)),
    "delta": _Recurrence(
        (("q", "phi"), ("k", "phi"), ("v", "raw"), ("beta", "sigmoid")), 0, ("mat",)
    ),
    "delta_rnn": _Recurrence(
        (
            ("q", "softmax"),
            ("k", "softmax"),
            ("v", "raw"),
            ("beta", "sigmoid"),
            ("rk", "softmax"),
            ("rv", "raw"),
            ("rbeta", "sigmoid"),
        ),
        0,
        ("mat", "mat", "vec"),
    ),
    "rdn": _Recurrence(
        (("q", "raw"), ("k", "raw"), ("v", "raw"), ("beta", "raw")), 0, ("mat", "vec")
    ),
    "delta_lstm": _Recurrence(
        (
            ("q", "phi"),
            ("k", "phi"),
            ("v", "raw"),
            ("beta", "sigmoid"),
            ("rk", "softmax"),
            ("rv", "raw"),
            ("rbeta", "sigmoid"),
        ),
        3,
        ("mat", "mat", "vec", "vec"),
    ),
}

FWP_NAMES = tuple(_RECURRENCES)


def _is_scalar(field: str) -> bool:
    return field in ("beta", "rbeta")


def _detached_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    done: torch.Tensor,
    W: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_attention`` (beta None) / ``delta_rule`` one step at a time, W detached after
    each step: the oracle of ``_detached_fast``."""
    ys = []
    for t in range(q.shape[0]):
        step = (q[t : t + 1], k[t : t + 1], v[t : t + 1])
        if beta is None:
            y, W = fw.linear_attention(*step, done[t : t + 1], W, impl="reference")
        else:
            y, W = fw.delta_rule(*step, beta[t : t + 1], done[t : t + 1], W, impl="reference")
        ys.append(y)
        W = W.detach()
    return torch.cat(ys), W


def _detached_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    done: torch.Tensor,
    W: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_attention`` / ``delta_rule`` with the state detached between steps, in parallel.

    Step t reads the state ``W_{t-1} = [no reset yet] W_0 + Σ_{s<t, same episode} k_sᵀ u_s``
    (u = v, or the delta rule's pseudo-values from one unit-triangular solve, all detached):
    ``y_t = q_t W_{t-1} + (q_t·k_t) w_t`` with the write ``w_t = v_t`` or
    ``β_t (v_t − k_t W_{t-1})``. Gradients reach q, k, v, β of step t only, and W_0 through
    step 0 only (as in ``recurrent_fast_weights``).
    """
    Q, K, V = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [B,H,T,d]
    T = Q.shape[2]
    seg = done.t().cumsum(-1)  # [B,T] episode index inside the unroll
    before = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    earlier = ((seg[:, :, None] == seg[:, None, :]) & before).to(q.dtype)[:, None]  # [B,1,T,T]
    sees_w0 = (seg == 0).to(q.dtype)[:, None, :, None]  # [B,1,T,1]
    W0 = W.detach()
    with torch.no_grad():
        if beta is None:
            U = V.detach()
        else:
            Bt = beta.permute(1, 2, 0, 3)
            A = (Bt * K) @ K.transpose(-1, -2) * earlier
            rhs = Bt * (V - sees_w0 * (K @ W0))
            U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        in_last = (seg == seg[:, -1:]).to(q.dtype)[:, None, :, None]
        W_end = sees_w0[:, :, -1:] * W0 + (in_last * K).transpose(-1, -2) @ U
    first = (W - W0) * (~done[0]).to(W.dtype)[:, None, None, None]  # zero, carries step 0's grad
    Kd = K.detach()

    def read(X: torch.Tensor) -> torch.Tensor:  # X_t W_{t-1} for every t
        out = sees_w0 * (X @ W0) + (X @ Kd.transpose(-1, -2) * earlier) @ U
        return torch.cat([out[:, :, :1] + X[:, :, :1] @ first, out[:, :, 1:]], dim=2)

    write = V if beta is None else beta.permute(1, 2, 0, 3) * (V - read(K))
    y = read(Q) + (Q * K).sum(-1, keepdim=True) * write
    return y.permute(2, 0, 1, 3), W_end


class FastWeightLayer(nn.Module):
    """Slow projection -> activations -> fast-weight recurrence -> output projection."""

    def __init__(
        self,
        kind: str,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        state_grad: str,
        impl: str,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.spec = _RECURRENCES[kind]
        self.num_heads, self.head_dim = num_heads, head_dim
        self.state_grad, self.impl = state_grad, impl
        g = max(self.spec.gates, 1)
        self.widths = [
            num_heads * g * (1 if _is_scalar(name) else head_dim) for name, _ in self.spec.fields
        ]
        self.slow = Linear(hidden_size, sum(self.widths), bias=False)
        self.out = Linear(num_heads * head_dim, hidden_size, bias=False)
        if kind == "rdn":
            std = head_dim**-0.5
            self.Rq = nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * std)
            self.Rk = nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * std)
            self.Rv = nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * std)
            self.rb = nn.Parameter(torch.randn(num_heads, head_dim) * std)

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes (no batch dim) of the carried state tensors."""
        h, d, g = self.num_heads, self.head_dim, self.spec.gates
        mat = (h, g, d, d) if g else (h, d, d)
        return [mat if s == "mat" else (h, d) for s in self.spec.state]

    def forward(
        self, x: torch.Tensor, done: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        T, B = x.shape[:2]
        head = (self.num_heads, self.spec.gates) if self.spec.gates else (self.num_heads,)
        inputs = []
        # x's precision from here to the output projection, also under bf16 autocast (FWPCore)
        projected = self.slow(x).to(x.dtype)
        kernel = self._in_place_kernel(projected)
        if kernel is not None:
            with torch.autocast(x.device.type, enabled=False):
                y, state = kernel(projected, self.num_heads, done, state, self.state_grad)
            return self.out(y.reshape(T, B, -1)), state
        for (name, act), part in zip(
            self.spec.fields, projected.split(self.widths, dim=-1), strict=True
        ):
            last = 1 if _is_scalar(name) else self.head_dim
            inputs.append(_ACTIVATIONS[act](part.reshape(T, B, *head, last)))
        with torch.autocast(x.device.type, enabled=False):
            y, state = self._recur(inputs, done, state)
        return self.out(y.reshape(T, B, -1)), state

    def _in_place_kernel(self, projected: torch.Tensor) -> Callable | None:
        """The fused kernel that reads this layer's raw projection in place and activates its
        fields itself, where the recurrence's dispatch would pick fused kernels: Triton's on
        CUDA, else the C ones (delta_rnn and delta_lstm)."""
        if self.impl != "fast":
            return None
        if triton_kernels.usable(projected, self.head_dim):
            entry = triton_kernels.projected(self.kind, self.state_grad)
            feedback = self._feedback()
            return functools.partial(entry, weights=feedback) if entry and feedback else entry
        if self.kind in cpu_recurrences.PROJECTED and cpu_kernels.usable(projected, self.head_dim):
            return cpu_recurrences.PROJECTED[self.kind]
        return None

    def _recur(self, inputs: list[torch.Tensor], done: torch.Tensor, state: State):
        if self.kind in ("lt", "delta"):
            if self.state_grad == "none":
                beta = inputs[3] if self.kind == "delta" else None
                detached = _detached_fast if self.impl == "fast" else _detached_reference
                y, W = detached(*inputs[:3], beta, done, state[0])
            elif self.kind == "lt":
                y, W = fw.linear_attention(*inputs, done, state[0], impl=self.impl)
            else:
                y, W = fw.delta_rule(*inputs, done, state[0], impl=self.impl)
            return y, (W,)
        fn = getattr(fw, self.kind)
        inputs = [*inputs, *self._feedback()]
        return fn(*inputs, done, state, impl=self.impl, state_grad=self.state_grad)

    def _feedback(self) -> tuple[torch.Tensor, ...]:
        """rdn's slow feedback weights (R_q, R_k, R_v, r_b); none for the other kinds."""
        return (self.Rq, self.Rk, self.Rv, self.rb) if self.kind == "rdn" else ()


class FWPCore(nn.Module):
    """A stack of pre-LN fast-weight layers with feed-forward blocks; output ``hidden_size``."""

    def __init__(
        self,
        kind: str,
        input_size: int,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        head_dim: int = 32,
        ff_size: int = 512,
        dropout: float = 0.0,
        state_grad: str = "full",
        impl: str = "fast",
        bf16: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.bf16 = bf16
        self.input_size = input_size
        self.output_size = hidden_size
        self.input_proj = Linear(input_size, hidden_size)
        self.norms1 = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.fwps = nn.ModuleList(
            FastWeightLayer(kind, hidden_size, num_heads, head_dim, state_grad, impl)
            for _ in range(num_layers)
        )
        self.norms2 = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.ffs = nn.ModuleList(
            nn.Sequential(
                Linear(hidden_size, ff_size),
                nn.ReLU(),
                nn.Dropout(dropout),
                Linear(ff_size, hidden_size),
            )
            for _ in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self._per_layer = len(self.fwps[0].state_shapes())

    @torch.no_grad()
    def zero_residual_branches_(self) -> None:
        """Make the core its input projection: the last layer of every residual branch (the
        fast-weight layer's output projection, the feed-forward's second linear) starts at
        zero, as Fixup and ReZero do. The branches still get gradients from the first update
        on, through those last layers."""
        for fwp, ff in zip(self.fwps, self.ffs, strict=True):
            fwp.out.weight.zero_()
            ff[-1].weight.zero_()
            ff[-1].bias.zero_()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return tuple(
            torch.zeros(batch_size, *shape, device=device)
            for layer in self.fwps
            for shape in layer.state_shapes()
        )

    def forward(
        self, x: torch.Tensor, done: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self.input_proj(x).to(x.dtype)  # the residual stream keeps the input's precision
            new_state: list[torch.Tensor] = []
            n = self._per_layer
            for i, (norm1, fwp, norm2, ff) in enumerate(
                zip(self.norms1, self.fwps, self.norms2, self.ffs, strict=True)
            ):
                y, layer_state = fwp(norm1(x), done, state[i * n : (i + 1) * n])
                x = x + self.dropout(y)
                x = x + self.dropout(ff(norm2(x)))
                new_state.extend(layer_state)
        return x, tuple(new_state)
