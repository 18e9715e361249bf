"""Chunk-parallel fast paths of the Delta RNN and the Delta LSTM (DESIGN §3) for CPU.

In both recurrences every fast weight, W and R, is written from the layer's inputs only (keys,
values and β come from the slow projection), so all writes are computed a chunk of steps at a
time with the UT transform of ``agents.cores.chunks``, and so are the reads of W by q. Only the
read of R by ``s_t = softmax(previous output)`` is sequential. Within a chunk that starts from
R_c, with the chunk's keys rk_j, pseudo-values u_j and reset masks (g_t: no reset in the chunk up
to t; same_tj: j ≤ t in t's segment),

    s_t R_t = g_t s_t R_c + Σ_j same_tj (s_t·rk_j) u_j,

i.e. ``a = (s_t [R_c | RKᵀ]) ⊙ [g_t 1 | same_t]`` and ``s_t R_t = a_R + a_K U``: two small bmm per
step and no state update. The backward runs that loop in reverse for the gradient reaching each
step's output through the later reads; every other gradient is then computed for all steps at
once, chunk by chunk, by hand-written formulas (no autograd graph). With ``state_grad="none"`` no
gradient crosses steps and the whole backward is parallel.

Layout: the W and R rules are stacked along the batch axis (rows ``[W of every sample; R of every
sample]``) and chunked ``[n, 2B, H', C, ·]``, H' = heads (× 3 gates for the Delta LSTM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.cores import chunks
from agents.cores.chunks import Chunks

# Most steps per chunk. At the paper's shapes (T=50/51, B=32, H=4, d=32) on a 2-core CPU chunks
# of 17-25 steps were fastest: the per-step reads touch d+C columns, the solves grow with C².
CHUNK_SIZE = 25


def _softmax_bwd(g: Tensor, s: Tensor) -> Tensor:
    return torch._softmax_backward_data(g, s, -1, s.dtype)


def _one_minus_eye(ch: Chunks) -> Tensor:
    return 1 - torch.eye(ch.C, dtype=ch.same.dtype, device=ch.same.device)


class _Writes:
    """The chunk-parallel delta-rule writes of the stacked rules and their backward.

    K, V ``[n,R,H',C,d]``, Bt ``[n,R,H',C,1]`` (R rows: W and R rules of every sample); the
    chunks' start states ``[n,R,H',d,d]``, pseudo-values U (like V) and the final state;
    ``ch`` has the reset masks of the R rows.
    """

    def __init__(
        self, ch: Chunks, K: Tensor, V: Tensor, Bt: Tensor, starts: Tensor, U: Tensor, end: Tensor
    ) -> None:
        self.ch, self.K, self.V, self.Bt = ch, K, V, Bt
        self.starts, self.U, self.end = starts, U, end

    @staticmethod
    def compute(ch: Chunks, K: Tensor, V: Tensor, Bt: Tensor, M: Tensor) -> _Writes:
        """The writes from the state M ``[R,H',d,d]`` before the unroll."""
        starts, Us, end = chunks.writes(ch, K, V, Bt, M)
        return _Writes(ch, K, V, Bt, torch.stack(starts), torch.stack(Us), end)

    def saved(self) -> tuple[Tensor, ...]:
        """What ``__init__`` needs besides the chunks, for ``save_for_backward``."""
        return self.K, self.V, self.Bt, self.starts, self.U, self.end

    def read(self, chq: Chunks, Q: Tensor) -> Tensor:
        """``q_t W_t`` of the first rows (chunked ``[n,B,H',C,d]``, masks ``chq``)."""
        B = Q.shape[1]
        K = self.K[:, :B]
        return chunks.read(chq, Q, chq.scores(Q, K), self.starts[:, :B], self.U[:, :B])

    def backward(
        self, Q: Tensor, GZ: Tensor, gM: Tensor, q_rows: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Full backward given every matrix's read queries Q and read gradients GZ (chunked like
        K) and gM of the final state. Returns the gradients w.r.t. the queries of the first
        ``q_rows`` rows, K, V, Bt and the initial state."""
        ch, K, V, Bt, U = self.ch, self.K, self.V, self.Bt, self.U
        strict = ch.same * _one_minus_eye(ch)
        gQ = torch.empty_like(Q[:, :q_rows])
        gK, gV, gBt = torch.empty_like(K), torch.empty_like(V), torch.empty_like(Bt)
        r = q_rows
        end_grad = bool(gM.any())  # the final state is usually not in the loss
        for c in reversed(range(ch.n)):
            g, same, last = ch.sees_w0[c], ch.same[c], ch.in_last[c]
            k, u, M0, q, gz, bt = K[c], U[c], self.starts[c], Q[c], GZ[c], Bt[c]
            bk = bt * k
            # reads: z = g (q M0) + (q kᵀ ⊙ same) u; the chunk's end state g_last M0 + (l k)ᵀ u
            scores = torch.matmul(q, k.mT).mul_(same)
            gU = torch.matmul(scores.mT, gz)
            gsc = torch.matmul(gz, u.mT).mul_(same)
            torch.matmul(gsc[:r], k[:r], out=gQ[c]).addcmul_(g[:r], torch.matmul(gz[:r], M0[:r].mT))
            gk = torch.matmul(gsc.mT, q)
            gM0 = torch.matmul(q.mT, g * gz)
            if end_grad:
                gU.add_(torch.matmul(last * k, gM))
                gk.addcmul_(last, torch.matmul(u, gM.mT))
                gM0.addcmul_(g[..., -1:, :], gM)
            # u = A⁻¹ (β v − g β k M0) with A = I + strict(β k kᵀ ⊙ same)
            A = torch.matmul(bk, k.mT).mul_(same)
            grhs = torch.linalg.solve_triangular(
                A, gU.mT, upper=False, left=False, unitriangular=True
            ).mT  # A⁻ᵀ gU as (gUᵀ A⁻¹)ᵀ
            gA = torch.matmul(grhs, u.mT).mul_(strict[c])  # −∂/∂A
            ggrhs = g * grhs
            nbk = torch.matmul(gA, k).add_(torch.matmul(ggrhs, M0.mT))  # −∂/∂(βk)
            gk.sub_(torch.matmul(gA.mT, bk)).addcmul_(bt, nbk, value=-1)
            gM0.sub_(torch.matmul(bk.mT, ggrhs))
            torch.mul(bt, grhs, out=gV[c])
            gBt[c] = (grhs * V[c] - nbk * k).sum(-1, keepdim=True)
            gK[c] = gk
            gM, end_grad = gM0, True
        return gQ, gK, gV, gBt, gM

    def backward_local(
        self, Q: Tensor, GZ: Tensor, gM: Tensor, keep0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """state_grad="none": step t's gradient stops at the matrices M_{t-1} it read (after
        its reset). Same arguments as ``backward`` (keep0: ``1 − done[0]`` of the rows); returns
        the gradients w.r.t. all queries, K, V, Bt and the initial state (through step 0)."""
        ch, K, V, Bt, U, M0 = self.ch, self.K, self.V, self.Bt, self.U, self.starts
        strict = ch.same * _one_minus_eye(ch)
        g = ch.sees_w0
        # X M_{t-1}ᵀ for X = GZ, and k_t M_{t-1}, from the chunk form of M_{t-1}
        GM = torch.matmul(torch.matmul(GZ, U.mT).mul_(strict), K).addcmul_(
            g, torch.matmul(GZ, M0.mT)
        )
        KM = torch.matmul(torch.matmul(K, K.mT).mul_(strict), U).addcmul_(g, torch.matmul(K, M0))
        qk = (Q * K).sum(-1, keepdim=True)
        gzu = (GZ * U).sum(-1, keepdim=True)
        gu = qk * GZ  # y = q M_{t-1} + (q·k) u
        guM = qk * GM  # gu M_{t-1}ᵀ
        # the final state M_T = M_{T-1} + kᵀu of the last step carries gM
        c, i = divmod(ch.T - 1, ch.C)
        k_T, u_T = K[c, :, :, i : i + 1], U[c, :, :, i : i + 1]
        kg = torch.matmul(k_T, gM)
        gu[c, :, :, i : i + 1] += kg
        guM[c, :, :, i : i + 1] += torch.matmul(kg, self.end.mT) - (kg * u_T).sum(-1, True) * k_T
        gQ = GM.addcmul_(gzu, K)
        gK = gzu * Q - Bt * guM
        gK[c, :, :, i : i + 1] += torch.matmul(u_T, gM.mT)
        gBt = (gu * (V - KM)).sum(-1, keepdim=True)
        gV = gu.mul_(Bt)
        q0, k0, x0 = Q[0, :, :, :1], K[0, :, :, :1], GZ[0, :, :, :1]
        gM0 = torch.matmul(q0.mT, x0) - torch.matmul(k0.mT, gV[0, :, :, :1])
        if ch.T == 1:
            gM0 += gM
        return gQ, gK, gV, gBt, gM0 * keep0.view(-1, 1, 1, 1)


class _Feedback:
    """The sequential reads ``s_t R_t`` of the R rules, G matrices per (sample, head) read by the
    same s_t (the Delta LSTM's three gates).

    R0 ``[n,B,HG,d,d]`` chunk start states, RK, U ``[n,B,HG,C,d]``; ``ch`` has the masks of the
    B samples. s rows are ``[B·H,1,d]``, matrix rows ``[B·H·G,1,d]``.
    """

    def __init__(self, ch: Chunks, R0: Tensor, RK: Tensor, U: Tensor, G: int) -> None:
        n, B, HG, C, d = RK.shape
        w = d + C
        self.R0, self.RK, self.U = R0, RK, U
        self.C, self.B, self.G, self.d, self.w = C, B, G, d, w
        mask = torch.cat([ch.sees_w0[:, :, 0].expand(n, B, C, d), ch.same[:, :, 0]], -1)
        self.masks = mask.transpose(1, 2).reshape(n * C, B, 1, w)[: ch.T].unbind(0)

    def prepare_forward(self) -> None:
        n = self.R0.shape[0]
        self.Ks = torch.cat([self.R0, self.RK.mT], -1).view(n, -1, self.d, self.w).unbind(0)
        self.Us = self.U.view(n, -1, self.C, self.d).unbind(0)

    def step(self, t: int, s: Tensor, z: Tensor, out: Tensor) -> None:
        """``out = z + s R_t`` for every matrix of every head."""
        c, d = t // self.C, self.d
        if self.G > 1:
            s = s.expand(-1, self.G, d).reshape(-1, 1, d)
        a = torch.bmm(s, self.Ks[c]).view(self.B, -1, self.w).mul_(self.masks[t])
        a = a.view(-1, 1, self.w)
        torch.add(z, a[..., :d], out=out).baddbmm_(a[..., d:], self.Us[c])

    def prepare_backward(self) -> None:
        n = self.R0.shape[0]
        KT = torch.cat([self.R0.mT, self.RK], -2)  # [n,B,HG,w,d]
        self.KTs = KT.view(n, -1, self.G * self.w, self.d).unbind(0)
        self.UTs = self.U.view(n, -1, self.C, self.d).mT.contiguous().unbind(0)

    def step_back(self, t: int, gr: Tensor) -> Tensor:
        """The gradient w.r.t. s (``[B·H,1,d]``) given gr, that of every ``s R_t``."""
        c = t // self.C
        ga = torch.cat([gr, torch.bmm(gr, self.UTs[c])], -1)
        ga.view(self.B, -1, self.w).mul_(self.masks[t])
        return torch.bmm(ga.view(-1, 1, self.G * self.w), self.KTs[c])


def _prepare(
    done: Tensor,
    chunk_size: int,
    q: Tensor,
    pairs: tuple[tuple[Tensor, Tensor], ...],
    M: Tensor,
    G: int,
) -> tuple[Chunks, _Writes, _Feedback, Tensor, Tensor]:
    """Chunk the unroll, compute the writes of [W; R] and the reads of W by q.

    Returns the chunks of the samples, the writes, the feedback reads (ready for the forward),
    the chunked q ``[n,B,H',C,d]`` and the W reads ``[T,B·H',1,d]``.
    """
    T, B, Hg, d = q.shape
    ch = Chunks.of(done, chunk_size, q.dtype)
    K, V, Bt = (ch.stack(a, b).flatten(1, 2) for a, b in pairs)
    wr = _Writes.compute(Chunks.of(done.repeat(1, 2), chunk_size, q.dtype), K, V, Bt, M)
    fb = _feedback(ch, wr, G)
    fb.prepare_forward()
    Q = ch.split(q)
    return ch, wr, fb, Q, ch.merge(wr.read(ch, Q)).reshape(T, B * Hg, 1, d)


def _feedback(ch: Chunks, wr: _Writes, G: int) -> _Feedback:
    B = wr.K.shape[1] // 2
    return _Feedback(ch, wr.starts[:, B:], wr.K[:, B:], wr.U[:, B:], G)


def _save(ctx, state_grad: str, chunk_size: int, done: Tensor, wr: _Writes, *more: Tensor) -> None:
    ctx.state_grad, ctx.chunk_size = state_grad, chunk_size
    ctx.save_for_backward(done, *wr.saved(), *more)


def _restore(ctx, dtype: torch.dtype) -> tuple[Chunks, _Writes, Tensor, list[Tensor]]:
    """What ``_save`` saved: the chunks, the writes, done and the other tensors."""
    done, *saved = ctx.saved_tensors
    ch = Chunks.of(done, ctx.chunk_size, dtype)
    wr = _Writes(Chunks.of(done.repeat(1, 2), ctx.chunk_size, dtype), *saved[:6])
    return ch, wr, done, saved[6:]


class _DeltaRNNFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, chunk_size, done, q, k, v, beta, rk, rv, rbeta, W0, R0, y0):
        T, B, H, d = q.shape
        N = B * H
        pairs = ((k, rk), (v, rv), (beta, rbeta))
        ch, wr, fb, Q, z = _prepare(done, chunk_size, q, pairs, torch.cat([W0, R0]), 1)
        keep = (1 - done.to(q.dtype)).unsqueeze(-1)  # [T,B,1]
        at = done.any(1).tolist()
        Y = q.new_empty(T + 1, N, 1, d)
        Y[0] = y0.reshape(N, 1, d)
        S = []
        for t in range(T):
            yp = Y[t]
            if at[t]:
                yp = (yp.view(B, -1) * keep[t]).view(N, 1, d)
            S.append(torch.softmax(yp, -1))
            fb.step(t, S[t], z[t], Y[t + 1])
        _save(ctx, state_grad, chunk_size, done, wr, Q, torch.stack(S).view(T, B, H, d))
        return Y[1:].view(T, B, H, d), wr.end[:B], wr.end[B:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW, gR):
        ch, wr, done, (Q, S) = _restore(ctx, gY.dtype)
        keep = (1 - done.to(gY.dtype)).unsqueeze(-1)
        T, B, H, d = S.shape
        N = B * H
        QS = torch.cat([Q, ch.split(S)], 1)
        gM = torch.cat([gW, gR])
        if ctx.state_grad == "none":
            GY = ch.split(gY)
            gQ, gK, gV, gBt, gM = wr.backward_local(
                QS, torch.cat([GY, GY], 1), gM, keep[0].repeat(2, 1)
            )
            gq, gs0 = gQ[:, :B], gQ[0, B:, :, 0]
            gy0 = _softmax_bwd(gs0, S[0]) * keep[0].view(B, 1, 1)
        else:
            fb, at = _feedback(ch, wr, 1), done.any(1).tolist()
            fb.prepare_backward()
            GY = gY.new_empty(T, N, 1, d)
            gYf, carry = gY.reshape(T, N, 1, d), torch.zeros_like(GY[0])
            for t in reversed(range(T)):
                gy = torch.add(gYf[t], carry, out=GY[t])
                carry = _softmax_bwd(fb.step_back(t, gy), S[t].view(N, 1, d))
                if at[t]:
                    carry = (carry.view(B, -1) * keep[t]).view(N, 1, d)
            GY = ch.split(GY.view(T, B, H, d))
            gq, gK, gV, gBt, gM = wr.backward(QS, torch.cat([GY, GY], 1), gM, B)
            gy0 = carry.view(B, H, d)
        gk, grk, gv, grv, gb, grb = (
            ch.merge(x[:, s]) for x in (gK, gV, gBt) for s in (slice(None, B), slice(B, None))
        )
        return (None, None, None, ch.merge(gq), gk, gv, gb, grk, grv, grb, gM[:B], gM[B:], gy0)


class _DeltaLSTMFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state_grad, chunk_size, done, q, k, v, beta, rk, rv, rbeta, W0, R0, h0, c0):
        T, B, H, G, d = q.shape
        N, HG = B * H, H * G
        flat = [x.reshape(T, B, HG, -1) for x in (q, k, v, beta, rk, rv, rbeta)]
        pairs = ((flat[1], flat[4]), (flat[2], flat[5]), (flat[3], flat[6]))
        M = torch.cat([W0, R0]).reshape(2 * B, HG, d, d)
        ch, wr, fb, Q, z = _prepare(done, chunk_size, flat[0], pairs, M, G)
        keep = (1 - done.to(q.dtype)).view(T, B, 1, 1)
        at = done.any(1).tolist()
        Hs, Cs = q.new_empty(T + 1, B, H, d), q.new_empty(T + 1, B, H, d)
        Hs[0], Cs[0] = h0, c0
        gates = q.new_empty(T, B, H, G, d)  # i, u, o
        S = []
        for t in range(T):
            hp, cp = Hs[t], Cs[t]
            if at[t]:
                hp, cp = hp * keep[t], cp * keep[t]
            S.append(torch.softmax(hp, -1))
            fb.step(t, S[t].view(N, 1, d), z[t], gates[t].view(N * G, 1, d))
            gate = gates[t]
            gate[:, :, 0::2].sigmoid_()
            i, u, o = gate.unbind(2)
            torch.addcmul(cp, i, u - cp, out=Cs[t + 1])
            torch.mul(o, Cs[t + 1], out=Hs[t + 1])
        _save(ctx, state_grad, chunk_size, done, wr, Q, torch.stack(S), gates, Cs)
        return Hs[1:], wr.end[:B].view(B, H, G, d, d), wr.end[B:].view(B, H, G, d, d), Cs[T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gY, gW, gR, gc_last):
        ch, wr, done, (Q, S, gates, Cs) = _restore(ctx, gY.dtype)
        T, B, H, G, d = gates.shape
        keep = (1 - done.to(gY.dtype)).view(T, B, 1, 1)
        N, HG = B * H, H * G
        sig_bwd = torch.ops.aten.sigmoid_backward
        QS = torch.cat([Q, ch.split(S.unsqueeze(3).expand(T, B, H, G, d).reshape(T, B, HG, d))], 1)
        gM = torch.cat([gW, gR]).reshape(2 * B, HG, d, d)
        i, u, o = gates.unbind(3)
        if ctx.state_grad == "none":
            cp = Cs[:-1] * keep
            gc = gY * o
            gc[-1] += gc_last
            gpre = torch.stack([sig_bwd(gc * (u - cp), i), gc * i, sig_bwd(gY * Cs[1:], o)], 3)
            GP = ch.split(gpre.view(T, B, HG, d))
            gQ, gK, gV, gBt, gM = wr.backward_local(
                QS, torch.cat([GP, GP], 1), gM, keep[0].view(B, 1).repeat(2, 1)
            )
            gq = gQ[:, :B]
            gs0 = gQ[0, B:, :, 0].view(B, H, G, d).sum(2)
            gh0 = _softmax_bwd(gs0, S[0]) * keep[0]
            gc0 = (gc[0] - gpre[0, :, :, 1]) * keep[0]
        else:
            fb, at = _feedback(ch, wr, G), done.any(1).tolist()
            fb.prepare_backward()
            # c = i u + (1 − i) c_prev and h = o c: the per-step factors that need no carry
            fi = i * (1 - i) * (u - Cs[:-1] * keep)
            fo = o * (1 - o) * Cs[1:]
            fc = (1 - i) * keep
            gpre = gY.new_empty(T, B, H, G, d)
            gh0, gc0 = torch.zeros_like(gY[0]), gc_last
            for t in reversed(range(T)):
                gp = gpre[t]
                gh = gY[t] + gh0
                gc = torch.addcmul(gc0, gh, o[t])
                torch.mul(gc, fi[t], out=gp[:, :, 0])
                torch.mul(gc, i[t], out=gp[:, :, 1])
                torch.mul(gh, fo[t], out=gp[:, :, 2])
                gs = fb.step_back(t, gp.view(N * G, 1, d))
                gh0 = _softmax_bwd(gs.view(B, H, d), S[t])
                if at[t]:
                    gh0 = gh0 * keep[t]
                gc0 = gc * fc[t]
            GP = ch.split(gpre.view(T, B, HG, d))
            gq, gK, gV, gBt, gM = wr.backward(QS, torch.cat([GP, GP], 1), gM, B)
        shape = (T, B, H, G, -1)
        gk, grk, gv, grv, gb, grb = (
            ch.merge(x[:, s]).reshape(shape)
            for x in (gK, gV, gBt)
            for s in (slice(None, B), slice(B, None))
        )
        gM = gM.view(2 * B, H, G, d, d)
        return (
            None,
            None,
            None,
            ch.merge(gq).reshape(shape),
            gk,
            gv,
            gb,
            grk,
            grv,
            grb,
            gM[:B],
            gM[B:],
            gh0,
            gc0,
        )


def delta_rnn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``recurrent_fast_weights.delta_rnn`` (arguments checked there), chunk-parallel."""
    args = (q, k, v, beta, rk, rv, rbeta, *state)
    y, W, R = _DeltaRNNFast.apply(state_grad, chunk_size, done, *args)
    return y, (W, R, y[-1])


def delta_lstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    rk: Tensor,
    rv: Tensor,
    rbeta: Tensor,
    done: Tensor,
    state: tuple[Tensor, ...],
    state_grad: str,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``recurrent_fast_weights.delta_lstm`` (arguments checked there), chunk-parallel."""
    args = (q, k, v, beta, rk, rv, rbeta, *state)
    y, W, R, c = _DeltaLSTMFast.apply(state_grad, chunk_size, done, *args)
    return y, (W, R, y[-1], c)
