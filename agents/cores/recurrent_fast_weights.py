"""Recurrent fast-weight recurrences of DESIGN §3: Delta RNN, Recurrent Delta Net, Delta LSTM.

All functions are time-major and apply the reset rule of DESIGN §2: before step t every state
tensor is multiplied by ``1 - done[t]``. ``impl="reference"`` is a plain per-step loop (the
oracle); ``impl="fast"`` is the default learning path. ``state_grad="none"`` detaches the state
between steps: step t's gradient reaches the state it read but stops there (the initial state
still gets step 0's gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLS = ("reference", "fast")
STATE_GRADS = ("full", "none")

DeltaRNNState = tuple[Tensor, Tensor, Tensor]
RDNState = tuple[Tensor, Tensor]
DeltaLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]


# ----------------------------------------------------------------------------- validation


def _check_options(impl: str, state_grad: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if state_grad not in STATE_GRADS:
        raise ValueError(f"unknown state_grad {state_grad!r}; valid: {', '.join(STATE_GRADS)}")


def _check_shapes(fn: str, expected: dict[str, tuple[int, ...]], given: dict[str, Tensor]) -> None:
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(given[name].shape)}, expected {shape}")


def _sequence_dims(fn: str, q: Tensor, gated: bool) -> tuple[int, int, int, int]:
    want = 5 if gated else 4
    if q.dim() != want or (gated and q.shape[3] != 3):
        layout = "[T,B,H,3,d]" if gated else "[T,B,H,d]"
        raise ValueError(f"{fn}: q has shape {tuple(q.shape)}, expected {layout}")
    return q.shape[0], q.shape[1], q.shape[2], q.shape[-1]


# ----------------------------------------------------------------------------- reference


def _keep(done_t: Tensor, like: Tensor) -> Tensor:
    """``1 - done_t`` shaped [B, 1, ...] to broadcast against a state tensor like ``like``."""
    return (1 - done_t.to(like.dtype)).view(-1, *([1] * (like.dim() - 1)))


def _delta_step(M: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """DS(M; q, k, v, β): write ``kᵀ β (v − k M)`` into M, then read ``q M`` (write before read)."""
    v_old = torch.einsum("...i,...ij->...j", k, M)
    M = M + k.unsqueeze(-1) * (beta * (v - v_old)).unsqueeze(-2)
    return torch.einsum("...i,...ij->...j", q, M), M


def _delta_rnn_reference(q, k, v, beta, rk, rv, rbeta, done, state, state_grad):
    W, R, y = state
    ys = []
    for t in range(q.shape[0]):
        if t > 0 and state_grad == "none":
            W, R, y = W.detach(), R.detach(), y.detach()
        W, R, y = W * _keep(done[t], W), R * _keep(done[t], R), y * _keep(done[t], y)
        z, W = _delta_step(W, q[t], k[t], v[t], beta[t])
        r, R = _delta_step(R, torch.softmax(y, -1), rk[t], rv[t], rbeta[t])
        y = r + z
        ys.append(y)
    return torch.stack(ys), (W, R, y)


def _rdn_reference(qx, kx, vx, bx, Rq, Rk, Rv, rb, done, state, state_grad):
    W, y = state
    ys = []
    for t in range(qx.shape[0]):
        if t > 0 and state_grad == "none":
            W, y = W.detach(), y.detach()
        W, y = W * _keep(done[t], W), y * _keep(done[t], y)
        s = torch.tanh(y)
        q = torch.softmax(qx[t] + torch.einsum("bhi,hij->bhj", s, Rq), -1)
        k = torch.softmax(kx[t] + torch.einsum("bhi,hij->bhj", s, Rk), -1)
        v = vx[t] + torch.einsum("bhi,hij->bhj", s, Rv)
        beta = torch.sigmoid(bx[t] + (s * rb).sum(-1, keepdim=True))
        y, W = _delta_step(W, q, k, v, beta)
        ys.append(y)
    return torch.stack(ys), (W, y)


def _delta_lstm_reference(q, k, v, beta, rk, rv, rbeta, done, state, state_grad):
    W, R, h, c = state
    hs = []
    for t in range(q.shape[0]):
        if t > 0 and state_grad == "none":
            W, R, h, c = W.detach(), R.detach(), h.detach(), c.detach()
        keep = _keep(done[t], h)
        W, R, h, c = W * _keep(done[t], W), R * _keep(done[t], R), h * keep, c * keep
        z, W = _delta_step(W, q[t], k[t], v[t], beta[t])
        s = torch.softmax(h, -1).unsqueeze(-2).expand_as(z)
        r, R = _delta_step(R, s, rk[t], rv[t], rbeta[t])
        pre = z + r
        i, u, o = torch.sigmoid(pre[:, :, 0]), pre[:, :, 1], torch.sigmoid(pre[:, :, 2])
        c = i * u + (1 - i) * c
        h = o * c
        hs.append(h)
    return torch.stack(hs), (W, R, h, c)


# ----------------------------------------------------------------------------- public API


def delta_rnn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: DeltaRNNState,
    impl: str = "fast",
    state_grad: str = "full",
) -> tuple[Tensor, DeltaRNNState]:
    """Delta RNN over an unroll: ``y_t = softmax(y_{t-1}) R_t + DS(W; q_t, k_t, v_t, β_t)``.

    q, k, v, rk, rv: [T,B,H,d] (q, k, rk softmax-activated); beta, rbeta: [T,B,H,1] (sigmoid);
    done: [T,B]; state = (W [B,H,d,d], R [B,H,d,d], y_prev [B,H,d]). Returns y [T,B,H,d] and the
    final state.
    """
    _check_options(impl, state_grad)
    T, B, H, d = _sequence_dims("delta_rnn", q, gated=False)
    seq, gate, mat = (T, B, H, d), (T, B, H, 1), (B, H, d, d)
    _check_shapes(
        "delta_rnn",
        dict(k=seq, v=seq, beta=gate, rk=seq, rv=seq, rbeta=gate, done=(T, B), W=mat, R=mat),
        dict(k=k, v=v, beta=beta, rk=rk, rv=rv, rbeta=rbeta, done=done, W=state[0], R=state[1]),
    )
    _check_shapes("delta_rnn", dict(y_prev=(B, H, d)), dict(y_prev=state[2]))
    return _delta_rnn_reference(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)


def rdn(
    qx: Tensor,
    kx: Tensor,
    vx: Tensor,
    bx: Tensor,
    Rq: Tensor,
    Rk: Tensor,
    Rv: Tensor,
    rb: Tensor,
    done: Tensor,
    state: RDNState,
    impl: str = "fast",
    state_grad: str = "full",
) -> tuple[Tensor, RDNState]:
    """Recurrent Delta Net: the raw q/k/v/β inputs get feedback ``tanh(y_{t-1})`` before activation.

    qx, kx, vx: [T,B,H,d]; bx: [T,B,H,1]; Rq, Rk, Rv: [H,d,d] and rb: [H,d] slow weights;
    done: [T,B]; state = (W [B,H,d,d], y_prev [B,H,d]). Returns y [T,B,H,d] and the final state.
    """
    _check_options(impl, state_grad)
    T, B, H, d = _sequence_dims("rdn", qx, gated=False)
    seq, sq = (T, B, H, d), (H, d, d)
    _check_shapes(
        "rdn",
        dict(kx=seq, vx=seq, bx=(T, B, H, 1), Rq=sq, Rk=sq, Rv=sq, rb=(H, d), done=(T, B)),
        dict(kx=kx, vx=vx, bx=bx, Rq=Rq, Rk=Rk, Rv=Rv, rb=rb, done=done),
    )
    _check_shapes("rdn", dict(W=(B, H, d, d), y_prev=(B, H, d)), dict(W=state[0], y_prev=state[1]))
    return _rdn_reference(qx, kx, vx, bx, Rq, Rk, Rv, rb, done, tuple(state), state_grad)


def delta_lstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: DeltaLSTMState,
    impl: str = "fast",
    state_grad: str = "full",
) -> tuple[Tensor, DeltaLSTMState]:
    """Delta LSTM: LSTM-style gates i, u, o from fast-weight reads ``softmax(h_{t-1}) R_g + z_g``.

    q, k, v, rk, rv: [T,B,H,3,d] with gate axis (i, u, o) (q, k φ-activated, rk softmax);
    beta, rbeta: [T,B,H,3,1] (sigmoid); done: [T,B]; state = (W [B,H,3,d,d], R [B,H,3,d,d],
    h [B,H,d], c [B,H,d]). Returns y = h over time [T,B,H,d] and the final state.
    """
    _check_options(impl, state_grad)
    T, B, H, d = _sequence_dims("delta_lstm", q, gated=True)
    seq, gate, mat, vec = (T, B, H, 3, d), (T, B, H, 3, 1), (B, H, 3, d, d), (B, H, d)
    _check_shapes(
        "delta_lstm",
        dict(k=seq, v=seq, beta=gate, rk=seq, rv=seq, rbeta=gate, done=(T, B), W=mat, R=mat),
        dict(k=k, v=v, beta=beta, rk=rk, rv=rv, rbeta=rbeta, done=done, W=state[0], R=state[1]),
    )
    _check_shapes("delta_lstm", dict(h=vec, c=vec), dict(h=state[2], c=state[3]))
    return _delta_lstm_reference(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)
