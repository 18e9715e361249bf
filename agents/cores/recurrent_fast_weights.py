"""Recurrent fast-weight recurrences of DESIGN §3: Delta RNN, Recurrent Delta Net, Delta LSTM.

All functions are time-major and apply the reset rule of DESIGN §2: before step t every state
tensor is multiplied by ``1 - done[t]``. ``impl="reference"`` is a plain per-step loop (the
oracle); ``impl="fast"`` is the default learning path: fused Triton kernels on CUDA
(``triton_kernels``), fused C kernels on the CPU (``cpu_kernels``), and the torch paths below
where neither is available. ``state_grad="none"`` detaches the state between steps: step t's
gradient reaches the state it read but stops there (the initial state still gets step 0's
gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.cores import chunked_recurrences, cpu_kernels, cpu_recurrences, triton_kernels

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


# ----------------------------------------------------------------------------- fast paths
#
# Without the C kernels (no compiler, or float64), delta_rnn and delta_lstm, which write every
# fast weight from inputs only, run chunk-parallel (agents.cores.chunked_recurrences). The
# Recurrent Delta Net's keys depend on the previous output, so its fast path keeps the loop but
# takes autograd out of it: a
# torch.autograd.Function whose forward updates one working copy of the fast weights in place (it
# stays in cache) and whose backward is a hand-written reverse-time loop. The backward rewinds the
# fast weights exactly as they were written, M_{t-1} = M_t − kᵀu with the stored u, restoring a
# saved copy where a reset zeroed them. With state_grad="none" the gradients are local to each
# step and computed for all steps at once; only the rewind remains a loop.


class _Resets:
    """The reset mask of an unroll and the fast weights it erased, for the backward's rewind.

    Only the rows of resetting batch elements are saved and zeroed, not whole matrices.
    """

    def __init__(self, done: Tensor, dtype: torch.dtype, batch_dim: int) -> None:
        self.keep = 1 - done.to(dtype)  # [T,B]
        self.at = done.any(1).tolist()
        self.rows = {t: done[t].nonzero()[:, 0] for t, hit in enumerate(self.at) if hit}
        self.dim, self.saved = batch_dim, {}

    def erase_(self, t: int, M: Tensor) -> None:
        """Forward, before step t: save, then zero the fast weights of the resetting rows."""
        self.saved[t] = M.index_select(self.dim, self.rows[t])
        M.index_fill_(self.dim, self.rows[t], 0)

    def rewind_(self, t: int, MT: Tensor, gM: Tensor | None = None) -> None:
        """Backward, after step t: put the erased weights back into MT, the fast weights
        transposed as the backward holds them; their gradient gM does not pass the reset."""
        MT.index_copy_(self.dim, self.rows[t], self.saved[t].mT)
        if gM is not None:
            gM.index_fill_(self.dim, self.rows[t], 0)


def _softmax_bwd(g: Tensor, s: Tensor) -> Tensor:
    return torch._softmax_backward_data(g, s, -1, s.dtype)


def _ds_step_(
    M: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """DS on flat matrices M [N,d,d], updated in place; returns y = q M_new, v − k M and u.

    With M_new = M + kᵀu the read is q M + (q·k) u, so k and q share one pass over M.
    """
    both = torch.bmm(torch.stack([k, q], 1), M)
    diff = v - both[:, 0]
    u = beta * diff
    y = torch.addcmul(both[:, 1], (q * k).sum(-1, keepdim=True), u)
    M.baddbmm_(k.unsqueeze(2), u.unsqueeze(1))
    return y, diff, u


def _ds_backward_(
    gM: Tensor, MT: Tensor, gy: Tensor, q: Tensor, k: Tensor, beta: Tensor, u: Tensor, diff: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``_ds_step_`` on flat [N,...] tensors; returns gq, gk, gv, gβ.

    On entry MT is the written matrix, transposed (bmm reads it faster than a transposed view),
    and gM the gradient w.r.t. the written matrix from later steps; both are rewound in place to
    the matrix read before the write and the gradient w.r.t. it. The rank-1 terms of this step
    (qᵀ gy and kᵀ gv) are applied as vector identities and one final update.
    """
    gu = torch.addcmul(torch.bmm(k.unsqueeze(1), gM).squeeze(1), (k * q).sum(-1, keepdim=True), gy)
    gv = beta * gu
    gk = torch.addcmul(
        torch.bmm(u.unsqueeze(1), gM.mT).squeeze(1), (u * gy).sum(-1, keepdim=True), q
    )
    MT.baddbmm_(u.unsqueeze(2), k.unsqueeze(1), alpha=-1)
    rows = torch.stack([gy, -gv], 1)
    both = torch.bmm(rows, MT)  # gy M_oldᵀ and −gv M_oldᵀ
    gq = torch.addcmul(both[:, 0], (gy * u).sum(-1, keepdim=True), k)
    gk += both[:, 1]
    gM.baddbmm_(torch.stack([q, k], 2), rows)
    return gq, gk, gv, (gu * diff).sum(-1, keepdim=True)


def _ds_local_backward(
    gy: Tensor,
    q: Tensor,
    k: Tensor,
    beta: Tensor,
    u: Tensor,
    diff: Tensor,
    MT: Tensor,
    MT_rows: Tensor,
    resets: _Resets,
    gM_last: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_ds_backward_`` for all T steps at once when no gradient flows between steps.

    The gradient w.r.t. each written matrix is then the rank-1 ``qᵀ gy`` (plus ``gM_last`` at the
    last step), so everything but the products with the matrices read is vector arithmetic.
    gy, q, k, u, diff: [T,N,d]; beta: [T,N,1]; MT: the final matrices transposed [N,d,d], rewound
    in place; MT_rows: the same storage with the batch axis that ``resets`` indexes. Returns the
    gradients w.r.t. q, k, v, β and w.r.t. the matrices step 0 read.
    """
    T, N, d = q.shape
    gu = (k * q).sum(-1, keepdim=True) * gy
    gu[-1] += torch.bmm(k[-1].unsqueeze(1), gM_last).squeeze(1)
    gv = beta * gu
    rows = torch.stack([gy, gv], 2)
    both = torch.empty_like(rows)
    for t in reversed(range(T)):
        MT.baddbmm_(u[t].unsqueeze(2), k[t].unsqueeze(1), alpha=-1)
        torch.bmm(rows[t], MT, out=both[t])
        if resets.at[t] and t > 0:
            resets.rewind_(t, MT_rows)
    gy_u = (gy * u).sum(-1, keepdim=True)
    gq = torch.addcmul(both[:, :, 0], gy_u, k)
    gk = gy_u * q - both[:, :, 1]
    gk[-1] += torch.bmm(u[-1].unsqueeze(1), gM_last.mT).squeeze(1)
    gM0 = torch.bmm(q[0].unsqueeze(2), gy[0].unsqueeze(1))
    if T == 1:
        gM0 += gM_last
    gM0.baddbmm_(k[0].unsqueeze(2), gv[0].unsqueeze(1), alpha=-1)
    return gq, gk, gv, (gu * diff).sum(-1, keepdim=True), gM0


class _RDNFast(torch.autograd.Function):
    """Recurrent Delta Net, laid out head-major [H,B] so the feedback is one baddbmm per step."""

    @staticmethod
    def forward(ctx, state_grad, done, qx, kx, vx, bx, Rq, Rk, Rv, rb, W0, y0):
        T, B, H, d = qx.shape
        N = H * B
        resets = _Resets(done, qx.dtype, batch_dim=1)
        keep = resets.keep
        X = torch.cat([qx, kx, vx, bx], -1).transpose(1, 2).contiguous()  # [T,H,B,3d+1]
        P = torch.cat([Rq, Rk, Rv, rb.unsqueeze(-1)], -1)  # [H,d,3d+1]
        M = W0.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # never aliases W0
        Mf = M.view(N, d, d)
        Ys = qx.new_empty(T + 1, H, B, d)
        Ys[0] = y0.transpose(0, 1)
        S = qx.new_empty(T, H, B, d)
        QK, Bt, U, Dif = [], [], [], []
        for t in range(T):
            yp = Ys[t]
            if resets.at[t]:
                resets.erase_(t, M)
                yp = yp * keep[t].view(1, B, 1)
            pre = torch.baddbmm(X[t], torch.tanh(yp, out=S[t]), P)
            qk = torch.softmax(pre[..., : 2 * d].unflatten(-1, (2, d)), -1)
            beta = torch.sigmoid(pre[..., 3 * d :])
            v = pre[..., 2 * d : 3 * d].reshape(N, d)
            q, k = qk[:, :, 0].reshape(N, d), qk[:, :, 1].reshape(N, d)
            y, diff, u = _ds_step_(Mf, q, k, v, beta.view(N, 1))
            Ys[t + 1] = y.view(H, B, d)
            QK.append(qk)
            Bt.append(beta)
            U.append(u)
            Dif.append(diff)
        ctx.state_grad, ctx.resets = state_grad, resets
        stacked = (torch.stack(x) for x in (QK, Bt, U, Dif))
        ctx.save_for_backward(keep, P, S, *stacked, M)
        y = Ys[1:].transpose(1, 2).contiguous()
        return (
            y,
            M.transpose(0, 1).clone(memory_format=torch.contiguous_format),
            Ys[T].transpose(0, 1).clone(memory_format=torch.contiguous_format),
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW, gy_last):
        keep, P, S, QK, Bt, U, Dif, M = ctx.saved_tensors
        T, H, B, d = S.shape
        N, E = H * B, 3 * d + 1
        Mw = M.mT.clone(memory_format=torch.contiguous_format)
        Mwf = Mw.view(N, d, d)
        gM = gW.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        gMf = gM.view(N, d, d)
        q, k = QK[:, :, :, 0].reshape(T, N, d), QK[:, :, :, 1].reshape(T, N, d)
        if ctx.state_grad == "none":
            gy = gY.transpose(1, 2).clone(memory_format=torch.contiguous_format)
            gy[-1] += gy_last.transpose(0, 1)
            gq, gk, gv, gb, gM0 = _ds_local_backward(
                gy.view(T, N, d), q, k, Bt.view(T, N, 1), U, Dif, Mwf, Mw, ctx.resets, gMf
            )
            gqk = _softmax_bwd(torch.stack([gq, gk], 2).view(T, H, B, 2, d), QK)
            gbp = torch.ops.aten.sigmoid_backward(gb.view(T, H, B, 1), Bt)
            gpre = torch.cat([gqk.view(T, H, B, 2 * d), gv.view(T, H, B, d), gbp], -1)
            gy0 = torch.ops.aten.tanh_backward(torch.bmm(gpre[0], P.mT), S[0])
            gy0 = gy0 * keep[0].view(1, B, 1)
            gM = gM0.view(H, B, d, d) * keep[0].view(1, B, 1, 1)
        else:
            gYt, gy0, gpres = gY.transpose(1, 2), gy_last.transpose(0, 1), []
            for t in reversed(range(T)):
                g = (gYt[t] + gy0).reshape(N, d)
                gq, gk, gv, gb = _ds_backward_(
                    gMf, Mwf, g, q[t], k[t], Bt[t].view(N, 1), U[t], Dif[t]
                )
                gqk = _softmax_bwd(torch.stack([gq, gk], 1).view(H, B, 2, d), QK[t])
                gbp = torch.ops.aten.sigmoid_backward(gb.view(H, B, 1), Bt[t])
                gpre = torch.cat([gqk.view(H, B, 2 * d), gv.view(H, B, d), gbp], -1)
                gy0 = torch.ops.aten.tanh_backward(torch.bmm(gpre, P.mT), S[t])
                if ctx.resets.at[t]:
                    ctx.resets.rewind_(t, Mw, gM)
                    gy0 = gy0 * keep[t].view(1, B, 1)
                gpres.append(gpre)
            gpre = torch.stack(gpres[::-1])
        # pre = X + s P, summed over time and batch per head: gP = Σ sᵀ gpre.
        gP = torch.bmm(
            S.transpose(0, 1).reshape(H, T * B, d).mT, gpre.transpose(0, 1).reshape(H, T * B, E)
        )
        gX = gpre.transpose(1, 2)
        return (
            None, None, gX[..., :d], gX[..., d : 2 * d], gX[..., 2 * d : 3 * d], gX[..., 3 * d :],
            gP[..., :d], gP[..., d : 2 * d], gP[..., 2 * d : 3 * d], gP[..., 3 * d],
            gM.transpose(0, 1), gy0.transpose(0, 1),
        )  # fmt: skip


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
    if impl == "reference":
        return _delta_rnn_reference(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)
    if triton_kernels.usable(q):
        from agents.cores.triton_delta_rnn import delta_rnn as delta_rnn_triton

        return delta_rnn_triton(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)
    if cpu_kernels.usable(q):
        return cpu_recurrences.delta_rnn(q, k, v, beta, rk, rv, rbeta, done, state, state_grad)
    return chunked_recurrences.delta_rnn(q, k, v, beta, rk, rv, rbeta, done, state, state_grad)


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
    if impl == "reference":
        return _rdn_reference(qx, kx, vx, bx, Rq, Rk, Rv, rb, done, tuple(state), state_grad)
    if triton_kernels.usable(qx):
        from agents.cores.triton_rdn import rdn as rdn_triton

        return rdn_triton(qx, kx, vx, bx, Rq, Rk, Rv, rb, done, tuple(state), state_grad)
    if cpu_kernels.usable(qx):
        return cpu_recurrences.rdn(qx, kx, vx, bx, Rq, Rk, Rv, rb, done, state, state_grad)
    y, W, y_last = _RDNFast.apply(state_grad, done, qx, kx, vx, bx, Rq, Rk, Rv, rb, *state)
    return y, (W, y_last)


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
    if impl == "reference":
        return _delta_lstm_reference(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)
    if triton_kernels.usable(q):
        from agents.cores.triton_delta_lstm import delta_lstm as delta_lstm_triton

        return delta_lstm_triton(q, k, v, beta, rk, rv, rbeta, done, tuple(state), state_grad)
    if cpu_kernels.usable(q):
        return cpu_recurrences.delta_lstm(q, k, v, beta, rk, rv, rbeta, done, state, state_grad)
    return chunked_recurrences.delta_lstm(q, k, v, beta, rk, rv, rbeta, done, state, state_grad)
