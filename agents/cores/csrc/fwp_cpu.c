/* Fused CPU kernels for the fast-weight recurrences of DESIGN §3 (lt, delta, rdn, delta_rnn,
 * delta_lstm).
 *
 * One program per batch element runs all T steps for all H heads of that element, with their
 * fast weights in the state tensors (a few d×d matrices per head, 4 KB each at d = 32, which
 * stay in L1/L2 cache), where the torch path streams every matrix of the batch through memory
 * each step with a dozen small ops. Each step reads and writes one [H, ...] block per array,
 * contiguous across the heads, and the next step's blocks are prefetched while this one
 * computes: the arrays are [T, B, ...], so a program's rows lie a whole step (B rows) apart and
 * would otherwise each wait on memory. The Delta LSTM's kernels instead run a program per
 * (batch element, head): a head's six matrices (24 KB) fit L1, a batch element's 96 KB do not
 * (the backward's 48 KB, with the gradients, overflow a 32 KB L1 by little cost: about 4% a
 * step, docs/benchmarks.md).
 * Programs are independent, so OpenMP spreads them over the threads the caller asks for
 * (torch's own libgomp is already loaded, so both share one thread pool). The per-step
 * helpers that do the d×d work are compiled twice (SPECIALISED): once for the paper's head size
 * d = 32 as a constant, with the d-loops unrolled and the d-vectors in registers (1.5-2x
 * faster), and once for any d.
 *
 * Conventions (matching agents/cores/recurrent_fast_weights.py): row vectors, fast weights
 * key-major [d, d] with read y = q M; all arrays float32 and contiguous; time-major per-head
 * arrays [T, B, H, ...] so step t of head h of batch element b is row (t * B + b) * H + h
 * (lt, delta, delta_rnn and delta_lstm read their inputs from projection rows [T, B, F]
 * instead: field_offsets). keep[t, b] = 1 - done is applied to every state tensor before step
 * t. The forward updates the final-state outputs in place from the initial state. The backward
 * rewinds the fast weights (held transposed in the caller's workspace, see ds_backward),
 * M_{t-1} = M_t - kᵀu, accumulates the state gradients in place in their outputs, and restores
 * the matrices a reset erased from `erased` (slot[t, b] >= 0 for every reset at t > 0). `full` =
 * 0 (state_grad="none"): a step's gradient stops at the state it read, except at step 0, whose
 * gradient reaches the initial state.
 */
#include <math.h>
#include <string.h>
#ifdef __SSE__
#include <immintrin.h>
#endif

/* The helpers are inlined into their callers, so that a constant D reaches every loop. */
#define INLINE static inline __attribute__((always_inline))
/* A helper's body with the head size D as a parameter: the dispatcher after it (same name
 * without _d) calls it with D = 32, a constant the compiler specialises for, or as given. */
#define SPECIALISED INLINE
#define DISPATCHER static __attribute__((noinline))
/* A dispatcher's body: f (a helper's _d body) with D = 32 as a constant, or with D as given. */
#define AT_HEAD_DIM(f, ...) (D == 32 ? f(32, __VA_ARGS__) : f(D, __VA_ARGS__))

/* Asks for the n floats from p to be brought into cache, for reading or (write) writing. */
INLINE void prefetch(const float *p, long n, int write) {
    for (long i = 0; i < n; i += 16) {
        if (write)
            __builtin_prefetch(p + i, 1, 3);
        else
            __builtin_prefetch(p + i, 0, 3);
    }
}

INLINE float dot(int D, const float *restrict a, const float *restrict b) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < D; j++) s += a[j] * b[j];
    return s;
}

/* e^x within a few ulps, inline so that loops over it vectorise (libm's expf and tanhf are
 * scalar calls without -ffast-math): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
 * polynomial to r^6 (truncation below 1.2e-7 relative), 2^n put into the exponent bits. */
INLINE float fast_exp(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x); /* keeps 2^n normal; NaN passes */
    float n = rintf(x * 1.44269504f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187e-06f, r);
    float p = 1.f / 720;
    p = fmaf(p, r, 1.f / 120);
    p = fmaf(p, r, 1.f / 24);
    p = fmaf(p, r, 1.f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    union { int i; float f; } scale = {.i = ((int)n + 127) << 23};
    return p * scale.f;
}

INLINE float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }

/* tanh from e^{-2|x|}; below |x| = 1/16, where 1 - e^{-2|x|} would cancel, its odd Taylor
 * polynomial (error below 1e-8 relative). */
INLINE float fast_tanh(float x) {
    float a = fabsf(x), e = fast_exp(-2.f * a), x2 = x * x;
    float big = copysignf((1.f - e) / (1.f + e), x);
    float small = x * fmaf(x2, fmaf(x2, 2.f / 15, -1.f / 3), 1.f);
    return a < 0.0625f ? small : big;
}

INLINE void softmax(int D, const float *restrict x, float *restrict out) {
    float m = x[0], z = 0.f;
#pragma omp simd reduction(max : m)
    for (int j = 1; j < D; j++) m = x[j] > m ? x[j] : m;
#pragma omp simd reduction(+ : z)
    for (int j = 0; j < D; j++) z += (out[j] = fast_exp(x[j] - m));
    for (int j = 0; j < D; j++) out[j] /= z;
}

/* g <- the gradient w.r.t. the softmax's input, given s = softmax(x) and g w.r.t. s. */
INLINE void softmax_backward(int D, const float *restrict s, float *restrict g) {
    float gs = dot(D, g, s);
    for (int j = 0; j < D; j++) g[j] = s[j] * (g[j] - gs);
}

/* One write-then-read step in place: write kᵀu, then read y = q M. delta = 1: DS(M; q, k, v, β)
 * of DESIGN §3, u = β (v − k M); delta = 0: the Linear Transformer's u = v (β unused). The read
 * uses q M_new = q M + (q·k) u, so q and k share one pass over M. Returns diff = v − k M and u
 * for the backward. */
SPECIALISED void write_read_d(int D, int delta, float *restrict M, const float *restrict q,
                              const float *restrict k, const float *restrict v, float beta,
                              float *restrict y, float *restrict diff, float *restrict u) {
    float kM[D], qM[D];
    memset(kM, 0, sizeof kM);
    memset(qM, 0, sizeof qM);
    for (int i = 0; i < D; i++) {
        const float *row = M + i * D, ki = k[i], qi = q[i];
        for (int j = 0; j < D; j++) {
            kM[j] += ki * row[j];
            qM[j] += qi * row[j];
        }
    }
    float qk = dot(D, q, k);
    for (int j = 0; j < D; j++) {
        diff[j] = v[j] - kM[j];
        u[j] = delta ? beta * diff[j] : v[j];
        y[j] = qM[j] + qk * u[j];
    }
    for (int i = 0; i < D; i++) {
        float *row = M + i * D, ki = k[i];
        for (int j = 0; j < D; j++) row[j] += ki * u[j];
    }
}

DISPATCHER void write_read(int D, int delta, float *restrict M, const float *restrict q,
                           const float *restrict k, const float *restrict v, float beta,
                           float *restrict y, float *restrict diff, float *restrict u) {
    AT_HEAD_DIM(write_read_d, delta, M, q, k, v, beta, y, diff, u);
}

INLINE void ds_forward(int D, float *restrict M, const float *restrict q, const float *restrict k,
                       const float *restrict v, float beta, float *restrict y,
                       float *restrict diff, float *restrict u) {
    write_read(D, 1, M, q, k, v, beta, y, diff, u);
}

/* gu += k G and Gu = G uᵀ in one pass over the rows of G [D, D]. Gu's entries are dots along
 * rows, which gcc ends with a serial chain of scalar adds per row; with AVX2 (and D a multiple
 * of 8) eight rows' dots are summed across lanes together, in six horizontal adds. */
SPECIALISED void accumulate_kG_Gu_d(int D, const float *restrict G, const float *restrict k,
                                    const float *restrict u, float *restrict gu,
                                    float *restrict Gu) {
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        __m256 gus[D / 8];
        for (int j = 0; j < D / 8; j++) gus[j] = _mm256_loadu_ps(gu + 8 * j);
        for (int i0 = 0; i0 < D; i0 += 8) {
            __m256 dots[8];
            for (int r = 0; r < 8; r++) {
                const float *row = G + (i0 + r) * D;
                const __m256 kr = _mm256_set1_ps(k[i0 + r]);
                __m256 acc = _mm256_setzero_ps();
                for (int j = 0; j < D / 8; j++) {
                    const __m256 x = _mm256_loadu_ps(row + 8 * j);
                    gus[j] = _mm256_fmadd_ps(kr, x, gus[j]);
                    acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(u + 8 * j), acc);
                }
                dots[r] = acc;
            }
            /* Pairwise horizontal adds leave rows 0-3's sums in each 128-bit lane of s0123
             * (low lane: columns 0-3 of each row, high lane: 4-7), rows 4-7's in s4567. */
            const __m256 s01 = _mm256_hadd_ps(dots[0], dots[1]);
            const __m256 s23 = _mm256_hadd_ps(dots[2], dots[3]);
            const __m256 s45 = _mm256_hadd_ps(dots[4], dots[5]);
            const __m256 s67 = _mm256_hadd_ps(dots[6], dots[7]);
            const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
            const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20);
            const __m256 high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
            _mm256_storeu_ps(Gu + i0, _mm256_add_ps(low, high));
        }
        for (int j = 0; j < D / 8; j++) _mm256_storeu_ps(gu + 8 * j, gus[j]);
        return;
    }
#endif
    for (int i = 0; i < D; i++) {
        const float *row = G + i * D, ki = k[i];
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < D; j++) {
            gu[j] += ki * row[j];
            s += row[j] * u[j];
        }
        Gu[i] = s;
    }
}

/* Backward of write_read (same delta). On entry Mt is the transpose of the written matrix (the
 * backward keeps its fast weights transposed, so that the products M gᵀ below run as vector
 * updates along Mt's contiguous rows instead of one horizontal sum per row) and gM the gradient
 * w.r.t. the written matrix from later steps; both are rewound in place (to the matrix read and
 * the gradient w.r.t. it). gM may be NULL: no gradient from later steps and none wanted for the
 * matrix read, which skips a pass over it. That holds under state_grad="none" for every step but
 * the last (which gets the final state's gradient) and step 0 (which passes its gradient to the
 * initial state); the callers' `through` says when gM is needed. g is the gradient w.r.t. y.
 * Writes gq, gk, gv (gq is accumulated into when accumulate_q is set) and returns the gradient
 * w.r.t. β. */
SPECIALISED float write_read_backward_d(int D, int delta, float *restrict Mt, float *restrict gM,
                                        const float *restrict g, const float *restrict q,
                                        const float *restrict k, float beta,
                                        const float *restrict u, const float *restrict diff,
                                        float *restrict gq, float *restrict gk, float *restrict gv,
                                        int accumulate_q) {
    float gu[D], a[D], b[D], gvm[D]; /* gvm: gv's path through v − k M (none when u = v) */
    float qk = dot(D, q, k), gu_dot = dot(D, g, u);
    for (int j = 0; j < D; j++) gu[j] = qk * g[j];
    /* G = gM + qᵀg: gu = k G, gk (write) = G uᵀ */
    if (gM)
        accumulate_kG_Gu_d(D, gM, k, u, gu, gk);
    else
        memset(gk, 0, D * sizeof *gk);
    for (int i = 0; i < D; i++) gk[i] += q[i] * gu_dot;
    for (int j = 0; j < D; j++) {
        gv[j] = delta ? beta * gu[j] : gu[j];
        gvm[j] = delta ? gv[j] : 0.f;
        a[j] = b[j] = 0.f;
    }
    for (int j = 0; j < D; j++) {  /* rewind M −= kᵀu, then a = g M_oldᵀ, b = gv M_oldᵀ */
        float *col = Mt + j * D, uj = u[j], gj = g[j], gvj = gvm[j];
#pragma omp simd
        for (int i = 0; i < D; i++) {
            col[i] -= k[i] * uj;
            a[i] += col[i] * gj;
            b[i] += col[i] * gvj;
        }
    }
    for (int i = 0; i < D; i++) {  /* gq = g M_newᵀ = a + (g·u) k; gk −= gv M_oldᵀ */
        gq[i] = (accumulate_q ? gq[i] : 0.f) + a[i] + k[i] * gu_dot;
        gk[i] -= b[i];
    }
    if (gM)  /* gM_old = G − kᵀ gv */
        for (int i = 0; i < D; i++) {
            float *grow = gM + i * D, qi = q[i], ki = k[i];
#pragma omp simd
            for (int j = 0; j < D; j++) grow[j] += qi * g[j] - ki * gvm[j];
        }
    return dot(D, gu, diff);
}

DISPATCHER float write_read_backward(int D, int delta, float *restrict Mt, float *restrict gM,
                                     const float *restrict g, const float *restrict q,
                                     const float *restrict k, float beta, const float *restrict u,
                                     const float *restrict diff, float *restrict gq,
                                     float *restrict gk, float *restrict gv, int accumulate_q) {
    return AT_HEAD_DIM(write_read_backward_d, delta, Mt, gM, g, q, k, beta, u, diff, gq, gk, gv,
                       accumulate_q);
}

INLINE float ds_backward(int D, float *restrict Mt, float *restrict gM, const float *restrict g,
                         const float *restrict q, const float *restrict k, float beta,
                         const float *restrict u, const float *restrict diff, float *restrict gq,
                         float *restrict gk, float *restrict gv, int accumulate_q) {
    return write_read_backward(D, 1, Mt, gM, g, q, k, beta, u, diff, gq, gk, gv, accumulate_q);
}

/* dst = the transposes of `count` consecutive D×D matrices of src (see ds_backward). */
INLINE void load_transposed(int D, long count, float *restrict dst, const float *restrict src) {
    for (long m = 0; m < count; m++, dst += D * D, src += D * D)
        for (int i = 0; i < D; i++)
            for (int j = 0; j < D; j++) dst[j * D + i] = src[i * D + j];
}

INLINE void scale(long count, float *x, float a) {
    if (a == 1.f) return;
    for (long j = 0; j < count; j++) x[j] *= a;
}

/* The activations the kernels apply to a projection's head-dim fields. */
enum { ACT_NONE, ACT_SOFTMAX, ACT_PHI };

/* out = act(x). Returns φ's normaliser Σ(elu(x)+1) + 1e-5 (0 for the others), which with out
 * is all activate_backward needs: elu(x)+1 = out · normaliser, and x > 0 where that exceeds 1. */
SPECIALISED float activate_d(int D, int act, const float *restrict x, float *restrict out) {
    if (act == ACT_SOFTMAX) {
        softmax(D, x, out);
        return 0.f;
    }
    if (act == ACT_NONE) {
        memcpy(out, x, D * sizeof *out);
        return 0.f;
    }
    float z = 1e-5f;
#pragma omp simd reduction(+ : z)
    for (int j = 0; j < D; j++) z += (out[j] = x[j] > 0.f ? x[j] + 1.f : fast_exp(x[j]));
    for (int j = 0; j < D; j++) out[j] /= z;
    return z;
}

DISPATCHER float activate(int D, int act, const float *restrict x, float *restrict out) {
    return AT_HEAD_DIM(activate_d, act, x, out);
}

/* g <- the gradient w.r.t. activate's input, given its output and g w.r.t. the output. */
SPECIALISED void activate_backward_d(int D, int act, const float *restrict out, float norm,
                                     float *restrict g) {
    if (act == ACT_SOFTMAX) softmax_backward(D, out, g);
    if (act != ACT_PHI) return;
    float gs = dot(D, g, out);
    for (int j = 0; j < D; j++) {
        float p = out[j] * norm;  /* elu(x)+1, whose derivative is 1 for x > 0 and p below */
        g[j] = (g[j] - gs) / norm * (p > 1.f ? 1.f : p);
    }
}

DISPATCHER void activate_backward(int D, int act, const float *restrict out, float norm,
                                  float *restrict g) {
    AT_HEAD_DIM(activate_backward_d, act, out, norm, g);
}

/* Offsets of the fields of head h, gate gi (of G; delta_rnn: G = 1) in projection row `row`
 * [q | k | v | β | r_k | r_v | r_β]: each field is head-major, then gate-major ([H, G, D], or
 * [H, G] for β and r_β), F = 5HGD + 2HG floats a row. */
typedef struct { long q, k, v, beta, rk, rv, rbeta; } proj_fields;

INLINE proj_fields field_offsets(int H, int G, int D, long row, int h, int gi) {
    const long HGD = (long)H * G * D, HG = (long)H * G, base = row * (5 * HGD + 2 * HG);
    const long vec = (long)(h * G + gi) * D, one = h * G + gi;
    return (proj_fields){base + vec,          base + HGD + vec,      base + 2 * HGD + vec,
                         base + 3 * HGD + one, base + 3 * HGD + HG + vec,
                         base + 4 * HGD + HG + vec, base + 5 * HGD + HG + one};
}

/* The next step's block of a [T, B, width] array for batch element b, prefetched (see the top
 * of the file); `next` is t + 1 in a forward, t - 1 in a backward. */
INLINE void prefetch_step(const float *array, int T, int B, int b, int next, long width,
                          int write) {
    if (array && next >= 0 && next < T)
        prefetch(array + ((long)next * B + b) * width, width, write);
}

/* dst[0:n] = src[0:n] with non-temporal stores where dst allows (16-byte aligned): the saved
 * rows are read back only by the backward, long after, so the stores skip reading the lines
 * they overwrite into cache first. */
INLINE void stream_out(float *restrict dst, const float *restrict src, long n) {
#ifdef __SSE__
    if (((unsigned long)dst & 15) == 0) {
        long i = 0;
        for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
        for (; i < n; i++) dst[i] = src[i];
        return;
    }
#endif
    memcpy(dst, src, n * sizeof *dst);
}

/* The fields of head h in projection row `row` (field_offsets), prefetched for reading or
 * (write) writing. */
INLINE void prefetch_fields(const float *P, int H, int G, int D, long row, int h, int write) {
    const proj_fields f = field_offsets(H, G, D, row, h, 0);
    prefetch(P + f.q, (long)G * D, write);
    prefetch(P + f.k, (long)G * D, write);
    prefetch(P + f.v, (long)G * D, write);
    prefetch(P + f.rk, (long)G * D, write);
    prefetch(P + f.rv, (long)G * D, write);
    prefetch(P + f.beta, G, write);
    prefetch(P + f.rbeta, G, write);
}

/* ------------------------------------------------------------------ Recurrent Delta Net
 * X [T,B,H,E] raw [q_x | k_x | v_x | b_x], E = 3D + 1; P [H,D,E] = [R_q | R_k | R_v | r_b];
 * s = tanh(y_{t-1}), pre = x + s P, q = softmax, k = softmax, v, β = σ; y = DS(W; q, k, v, β).
 * saved [T,B,H,4D+1] = [q | k | u | diff | β] and Sx [T,B,H,D] = s (both NULL: inference,
 * nothing saved); erased [slots,H,D,D] holds W. */

/* The feedback of y_{t-1} into the raw inputs x of one head: s = tanh(y), pre = x + s P_h
 * (P_h [D, E]). */
SPECIALISED void feedback_d(int D, const float *restrict y, const float *restrict Ph,
                            const float *restrict x, float *restrict s, float *restrict pre) {
    const int E = 3 * D + 1;
#pragma omp simd
    for (int i = 0; i < D; i++) s[i] = fast_tanh(y[i]);
    memcpy(pre, x, E * sizeof *pre);
    for (int i = 0; i < D; i++) {
        const float *prow = Ph + i * E, si = s[i];
        for (int j = 0; j < E; j++) pre[j] += si * prow[j];
    }
}

DISPATCHER void feedback(int D, const float *restrict y, const float *restrict Ph,
                         const float *restrict x, float *restrict s, float *restrict pre) {
    AT_HEAD_DIM(feedback_d, y, Ph, x, s, pre);
}

/* Its backward to y: gy = (gx P_hᵀ) ⊙ (1 − s²) · pass, summed along the rows of Pt_h = P_hᵀ
 * [E, D] as vector updates rather than D horizontal sums. */
SPECIALISED void feedback_backward_d(int D, const float *restrict Pth, const float *restrict gx,
                                     const float *restrict s, float pass, float *restrict gy) {
    const int E = 3 * D + 1;
    float acc[D];
    memset(acc, 0, sizeof acc);
    for (int j = 0; j < E; j++) {
        const float *prow = Pth + j * D, gj = gx[j];
        for (int i = 0; i < D; i++) acc[i] += gj * prow[i];
    }
    for (int i = 0; i < D; i++) gy[i] = acc[i] * (1.f - s[i] * s[i]) * pass;
}

DISPATCHER void feedback_backward(int D, const float *restrict Pth, const float *restrict gx,
                                  const float *restrict s, float pass, float *restrict gy) {
    AT_HEAD_DIM(feedback_backward_d, Pth, gx, s, pass, gy);
}

void rdn_forward(int T, int B, int H, int D, const float *X, const float *P, const float *keep,
                 const float *W0, const float *y0, float *Y, float *W_last, float *saved,
                 float *Sx, const int *slot, float *erased, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int E = 3 * D + 1, S = 4 * D + 1;
        const long HDD = (long)H * D * D;
        float *Wb = W_last + b * HDD, ys[H * D];
        memcpy(Wb, W0 + b * HDD, HDD * sizeof *Wb);
        memcpy(ys, y0 + (long)b * H * D, sizeof ys);
        for (int t = 0; t < T; t++) {
            prefetch_step(X, T, B, b, t + 1, (long)H * E, 0);
            prefetch_step(saved, T, B, b, t + 1, (long)H * S, 1);
            prefetch_step(Sx, T, B, b, t + 1, (long)H * D, 1);
            prefetch_step(Y, T, B, b, t + 1, (long)H * D, 1);
            if (keep[t * B + b] == 0.f) {
                if (slot[t * B + b] >= 0)
                    memcpy(erased + slot[t * B + b] * HDD, Wb, HDD * sizeof *Wb);
                memset(Wb, 0, HDD * sizeof *Wb);
                memset(ys, 0, sizeof ys);
            }
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h;
                float *W = Wb + h * D * D, *y = ys + h * D;
                float s[D], pre[E], q[D], k[D], u[D], diff[D];
                feedback(D, y, P + (long)h * D * E, X + row * E, s, pre);
                softmax(D, pre, q);
                softmax(D, pre + D, k);
                float beta = sigmoid(pre[3 * D]);
                ds_forward(D, W, q, k, pre + 2 * D, beta, y, diff, u);
                memcpy(Y + row * D, y, D * sizeof *y);
                if (saved) {
                    float *sv = saved + row * S;
                    memcpy(sv, q, sizeof q);
                    memcpy(sv + D, k, sizeof k);
                    memcpy(sv + 2 * D, u, sizeof u);
                    memcpy(sv + 3 * D, diff, sizeof diff);
                    sv[4 * D] = beta;
                    memcpy(Sx + row * D, s, sizeof s);
                }
            }
        }
    }
}

/* Writes gX [T,B,H,E] (w.r.t. the raw inputs; the caller forms the slow weights' gradient
 * Σ sᵀ gX) and the initial state's gradients gW0, gy0. Pt [H,E,D]: P transposed. work
 * [B,1,H,D,D]: scratch for the rewound (transposed) W. */
void rdn_backward(int T, int B, int H, int D, int full, const float *Pt, const float *keep,
                  const float *W_last, const float *saved, const float *Sx, const int *slot,
                  const float *erased, const float *gY, const float *gW_last,
                  const float *gy_last, float *gX, float *gW0, float *gy0, float *work,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int E = 3 * D + 1, S = 4 * D + 1;
        const long HDD = (long)H * D * D;
        float *Wt = work + b * HDD, *gWb = gW0 + b * HDD, *gys = gy0 + (long)b * H * D;
        load_transposed(D, H, Wt, W_last + b * HDD);
        memcpy(gWb, gW_last + b * HDD, HDD * sizeof *gWb);
        memcpy(gys, gy_last + (long)b * H * D, (long)H * D * sizeof *gys);
        for (int t = T - 1; t >= 0; t--) {
            prefetch_step(saved, T, B, b, t - 1, (long)H * S, 0);
            prefetch_step(Sx, T, B, b, t - 1, (long)H * D, 0);
            prefetch_step(gY, T, B, b, t - 1, (long)H * D, 0);
            prefetch_step(gX, T, B, b, t - 1, (long)H * E, 1);
            const float a = keep[t * B + b], pass = (full || t == 0) ? a : 0.f;
            const int through = full || t == 0 || t == T - 1;
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h;
                const float *sv = saved + row * S, *s = Sx + row * D;
                const float *q = sv, *k = sv + D, *u = sv + 2 * D, *diff = sv + 3 * D;
                const float beta = sv[4 * D];
                float *gx = gX + row * E, *gy = gys + h * D, g[D], gv[D];
                for (int j = 0; j < D; j++) g[j] = gy[j] + gY[row * D + j];
                float *gW = through ? gWb + h * D * D : NULL;
                float gbeta = ds_backward(D, Wt + h * D * D, gW, g, q, k, beta, u, diff, gx, gx + D,
                                          gv, 0);
                softmax_backward(D, q, gx);
                softmax_backward(D, k, gx + D);
                memcpy(gx + 2 * D, gv, sizeof gv);
                gx[3 * D] = gbeta * beta * (1.f - beta);
                feedback_backward(D, Pt + (long)h * E * D, gx, s, pass, gy);
            }
            if (a == 0.f && t > 0) load_transposed(D, H, Wt, erased + slot[t * B + b] * HDD);
            scale(HDD, gWb, pass);
        }
    }
}

/* ------------------------------------------------------------------ Linear Transformer, Delta Net
 * P [T,B,F] is the layer's slow projection, read in place: each row holds the fields
 * [q | k | v | β], head-major (q, k, v: HD each; β: H, only when delta = 1), F = 3HD + delta H.
 * The kernel applies φ to q and k and σ to β.
 * delta = 1: y = DS(W; q, k, v, β); delta = 0: W ← W + kᵀv, y = q W. State W [B,H,D,D].
 * saved [T,B,H,4D+3] = [u | diff | q | k | β | φ's normalisers of q, k] (activated; NULL:
 * inference, nothing saved); erased [slots,H,D,D] holds W. */
#define RULE_SAVED(D) (4 * (D) + 3)

void fast_weight_forward(int T, int B, int H, int D, int delta, const float *P,
                         const float *keep, const float *W0, float *Y, float *W_last,
                         float *saved, const int *slot, float *erased, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int S = RULE_SAVED(D);
        const long HD = (long)H * D, HDD = HD * D, F = 3 * HD + (delta ? H : 0);
        float *Wb = W_last + b * HDD;
        memcpy(Wb, W0 + b * HDD, HDD * sizeof *Wb);
        for (int t = 0; t < T; t++) {
            prefetch_step(P, T, B, b, t + 1, F, 0);
            prefetch_step(saved, T, B, b, t + 1, (long)H * S, 1);
            prefetch_step(Y, T, B, b, t + 1, HD, 1);
            if (keep[t * B + b] == 0.f) {
                if (slot[t * B + b] >= 0)
                    memcpy(erased + slot[t * B + b] * HDD, Wb, HDD * sizeof *Wb);
                memset(Wb, 0, HDD * sizeof *Wb);
            }
            const float *p = P + ((long)t * B + b) * F;
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h;
                const float *ph = p + (long)h * D;
                float buf[RULE_SAVED(D)], *sv = saved ? saved + row * S : buf;
                float *q = sv + 2 * D, *k = sv + 3 * D;
                sv[4 * D + 1] = activate(D, ACT_PHI, ph, q);
                sv[4 * D + 2] = activate(D, ACT_PHI, ph + HD, k);
                sv[4 * D] = delta ? sigmoid(p[3 * HD + h]) : 1.f;
                write_read(D, delta, Wb + h * D * D, q, k, ph + 2 * HD, sv[4 * D], Y + row * D,
                           sv + D, sv);
            }
        }
    }
}

/* Writes gP in P's layout (w.r.t. the raw fields) and gW0. work [B,1,H,D,D]: scratch for the
 * rewound (transposed) W. */
void fast_weight_backward(int T, int B, int H, int D, int full, int delta,
                          const float *keep, const float *W_last, const float *saved,
                          const int *slot, const float *erased, const float *gY,
                          const float *gW_last, float *gP, float *gW0, float *work,
                          int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int S = RULE_SAVED(D);
        const long HD = (long)H * D, HDD = HD * D, F = 3 * HD + (delta ? H : 0);
        float *Wt = work + b * HDD, *gWb = gW0 + b * HDD;
        load_transposed(D, H, Wt, W_last + b * HDD);
        memcpy(gWb, gW_last + b * HDD, HDD * sizeof *gWb);
        for (int t = T - 1; t >= 0; t--) {
            prefetch_step(saved, T, B, b, t - 1, (long)H * S, 0);
            prefetch_step(gY, T, B, b, t - 1, HD, 0);
            prefetch_step(gP, T, B, b, t - 1, F, 1);
            const long base = ((long)t * B + b) * F;
            const float a = keep[t * B + b], pass = (full || t == 0) ? a : 0.f;
            const int through = full || t == 0 || t == T - 1;
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h;
                const float *sv = saved + row * S, *q = sv + 2 * D, *k = sv + 3 * D;
                const float beta = sv[4 * D];
                float *gq = gP + base + (long)h * D, *gk = gq + HD;
                float gbeta = write_read_backward(D, delta, Wt + h * D * D,
                                                  through ? gWb + h * D * D : NULL, gY + row * D, q,
                                                  k, beta, sv, sv + D, gq, gk, gk + HD, 0);
                activate_backward(D, ACT_PHI, q, sv[4 * D + 1], gq);
                activate_backward(D, ACT_PHI, k, sv[4 * D + 2], gk);
                if (delta) gP[base + 3 * HD + h] = gbeta * beta * (1.f - beta);
            }
            if (a == 0.f && t > 0) load_transposed(D, H, Wt, erased + slot[t * B + b] * HDD);
            scale(HDD, gWb, pass);
        }
    }
}

/* ------------------------------------------------------------------ Delta RNN
 * P [T,B,F] is the layer's slow projection, read in place: each row holds the fields
 * [q | k | v | β | r_k | r_v | r_β] of field_offsets with G = 1, F = 5HD + 2H. raw = 1: the
 * fields are raw and the kernel applies the block's activations (softmax to q, k, r_k; sigmoid
 * to β, r_β), which saves the torch ops and copies around them; raw = 0: they are already
 * activated. State W, R [B,H,D,D], y [B,H,D].
 * y = DS(W; q, k, v, β) + DS(R; softmax(y_{t-1}), r_k, r_v, r_β).
 * saved [T,B,H,8D+2] = [u | diff | softmax(y_{t-1}) | u_R | diff_R | q | k | r_k | β | r_β]
 * (activated); erased [slots,2,H,D,D] holds (W, R). The backward writes gP in P's layout,
 * w.r.t. the raw fields when raw = 1. */
#define RNN_SAVED(D) (8 * (D) + 2)

void delta_rnn_forward(int T, int B, int H, int D, int raw, const float *P,
                       const float *keep, const float *W0, const float *R0, const float *y0,
                       float *Y, float *W_last, float *R_last, float *saved, const int *slot,
                       float *erased, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int S = RNN_SAVED(D), act = raw ? ACT_SOFTMAX : ACT_NONE;
        const long HDD = (long)H * D * D, F = 5L * H * D + 2 * H;
        float *Wb = W_last + b * HDD, *Rb = R_last + b * HDD, ys[H * D];
        memcpy(Wb, W0 + b * HDD, HDD * sizeof *Wb);
        memcpy(Rb, R0 + b * HDD, HDD * sizeof *Rb);
        memcpy(ys, y0 + (long)b * H * D, sizeof ys);
        for (int t = 0; t < T; t++) {
            prefetch_step(P, T, B, b, t + 1, F, 0);
            prefetch_step(saved, T, B, b, t + 1, (long)H * S, 1);
            prefetch_step(Y, T, B, b, t + 1, (long)H * D, 1);
            if (keep[t * B + b] == 0.f) {
                if (slot[t * B + b] >= 0) {
                    float *e = erased + slot[t * B + b] * 2 * HDD;
                    memcpy(e, Wb, HDD * sizeof *e);
                    memcpy(e + HDD, Rb, HDD * sizeof *e);
                }
                memset(Wb, 0, HDD * sizeof *Wb);
                memset(Rb, 0, HDD * sizeof *Rb);
                memset(ys, 0, sizeof ys);
            }
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h;
                const proj_fields f = field_offsets(H, 1, D, (long)t * B + b, h, 0);
                float buf[RNN_SAVED(D)], *sv = saved ? saved + row * S : buf, z[D], *y = ys + h * D;
                float *q = sv + 5 * D, *k = sv + 6 * D, *rk = sv + 7 * D;
                activate(D, act, P + f.q, q);
                activate(D, act, P + f.k, k);
                activate(D, act, P + f.rk, rk);
                sv[8 * D] = raw ? sigmoid(P[f.beta]) : P[f.beta];
                sv[8 * D + 1] = raw ? sigmoid(P[f.rbeta]) : P[f.rbeta];
                ds_forward(D, Wb + h * D * D, q, k, P + f.v, sv[8 * D], z, sv + D, sv);
                softmax(D, y, sv + 2 * D);
                ds_forward(D, Rb + h * D * D, sv + 2 * D, rk, P + f.rv, sv[8 * D + 1], y,
                           sv + 4 * D, sv + 3 * D);
                for (int j = 0; j < D; j++) y[j] += z[j];
                memcpy(Y + row * D, y, D * sizeof *y);
            }
        }
    }
}

/* Writes gP and the initial state's gradients. work [B,2,H,D,D]: scratch for the rewound
 * (transposed) W and R. */
void delta_rnn_backward(int T, int B, int H, int D, int full, int raw, const float *keep,
                        const float *W_last, const float *R_last, const float *saved,
                        const int *slot, const float *erased, const float *gY,
                        const float *gW_last, const float *gR_last, const float *gy_last,
                        float *gP, float *gW0, float *gR0, float *gy0, float *work,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const int S = RNN_SAVED(D);
        const long HDD = (long)H * D * D, F = 5L * H * D + 2 * H;
        float *Wt = work + 2 * b * HDD, *Rt = Wt + HDD, *gWb = gW0 + b * HDD, *gRb = gR0 + b * HDD;
        float *gys = gy0 + (long)b * H * D;
        load_transposed(D, H, Wt, W_last + b * HDD);
        load_transposed(D, H, Rt, R_last + b * HDD);
        memcpy(gWb, gW_last + b * HDD, HDD * sizeof *gWb);
        memcpy(gRb, gR_last + b * HDD, HDD * sizeof *gRb);
        memcpy(gys, gy_last + (long)b * H * D, (long)H * D * sizeof *gys);
        for (int t = T - 1; t >= 0; t--) {
            prefetch_step(saved, T, B, b, t - 1, (long)H * S, 0);
            prefetch_step(gY, T, B, b, t - 1, (long)H * D, 0);
            prefetch_step(gP, T, B, b, t - 1, F, 1);
            const float a = keep[t * B + b], pass = (full || t == 0) ? a : 0.f;
            const int through = full || t == 0 || t == T - 1;
            for (int h = 0; h < H; h++) {
                const long row = ((long)t * B + b) * H + h, m = (long)h * D * D;
                const proj_fields f = field_offsets(H, 1, D, (long)t * B + b, h, 0);
                const float *sv = saved + row * S, *q = sv + 5 * D, *k = sv + 6 * D;
                const float *rk = sv + 7 * D;
                const float beta = sv[8 * D], rbeta = sv[8 * D + 1];
                float *gy = gys + h * D, g[D];
                for (int j = 0; j < D; j++) g[j] = gy[j] + gY[row * D + j];
                float gbeta = ds_backward(D, Wt + m, through ? gWb + m : NULL, g, q, k, beta, sv,
                                          sv + D, gP + f.q, gP + f.k, gP + f.v, 0);
                float grbeta = ds_backward(D, Rt + m, through ? gRb + m : NULL, g, sv + 2 * D, rk,
                                           rbeta, sv + 3 * D, sv + 4 * D, gy, gP + f.rk,
                                           gP + f.rv, 0);
                if (raw) {
                    softmax_backward(D, q, gP + f.q);
                    softmax_backward(D, k, gP + f.k);
                    softmax_backward(D, rk, gP + f.rk);
                    gbeta *= beta * (1.f - beta);
                    grbeta *= rbeta * (1.f - rbeta);
                }
                gP[f.beta] = gbeta;
                gP[f.rbeta] = grbeta;
                softmax_backward(D, sv + 2 * D, gy);
                scale(D, gy, pass);
            }
            if (a == 0.f && t > 0) {
                const float *e = erased + slot[t * B + b] * 2 * HDD;
                load_transposed(D, H, Wt, e);
                load_transposed(D, H, Rt, e + HDD);
            }
            scale(HDD, gWb, pass);
            scale(HDD, gRb, pass);
        }
    }
}

/* ------------------------------------------------------------------ Delta LSTM
 * P [T,B,F] as for the Delta RNN with a gate axis (i, u, o) inside each head: F = 15HD + 6H
 * (field_offsets with G = 3); raw = 1: the kernel applies φ to q, k, softmax to r_k and
 * sigmoid to β, r_β. State W, R [B,H,3,D,D], h, c [B,H,D].
 * pre_g = DS(W_g; q_g, k_g, v_g, β_g) + DS(R_g; softmax(h_{t-1}), r_k,g, r_v,g, r_β,g);
 * c = σ(pre_i) pre_u + (1 − σ(pre_i)) c_{t-1}; h = σ(pre_o) c.
 * saved [T,B,H,26D+12] = [u_W (3D) | diff_W (3D) | u_R (3D) | diff_R (3D) | softmax(h_{t-1}) |
 * i | u | o | c | q (3D) | k (3D) | r_k (3D) | β (3) | r_β (3) | φ's normalisers of q (3) and
 * k (3)] (activated); erased [slots,2,H,3,D,D] holds (W, R). */
#define LSTM_SAVED(D) (26 * (D) + 12)

void delta_lstm_forward(int T, int B, int H, int D, int raw, const float *P,
                        const float *keep, const float *W0, const float *R0, const float *h0,
                        const float *c0, float *Y, float *W_last, float *R_last, float *c_last,
                        float *saved, const int *slot, float *erased, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, S = LSTM_SAVED(D), G = 3 * D * D;
        const long HG = (long)H * G;
        float *W = W_last + bh * G, *R = R_last + bh * G, *c = c_last + (long)bh * D, hh[D];
        memcpy(W, W0 + bh * G, G * sizeof *W);
        memcpy(R, R0 + bh * G, G * sizeof *R);
        memcpy(hh, h0 + (long)bh * D, sizeof hh);
        memcpy(c, c0 + (long)bh * D, D * sizeof *c);
        for (int t = 0; t < T; t++) {
            const long row = ((long)t * B + b) * H + h;
            if (t + 1 < T) {
                prefetch_fields(P, H, 3, D, (long)(t + 1) * B + b, h, 0);
                prefetch(Y + (row + (long)B * H) * D, D, 1);
            }
            if (keep[t * B + b] == 0.f) {
                if (slot[t * B + b] >= 0) {
                    float *e = erased + slot[t * B + b] * 2 * HG + (long)h * G;
                    memcpy(e, W, G * sizeof *e);
                    memcpy(e + HG, R, G * sizeof *e);
                }
                memset(W, 0, G * sizeof *W);
                memset(R, 0, G * sizeof *R);
                memset(hh, 0, sizeof hh);
                memset(c, 0, D * sizeof *c);
            }
            float sv[LSTM_SAVED(D)] __attribute__((aligned(64))), *sh = sv + 12 * D;
            float z[D], r[D], pre[3 * D];
            softmax(D, hh, sh);
            for (int gi = 0; gi < 3; gi++) {
                const proj_fields f = field_offsets(H, 3, D, (long)t * B + b, h, gi);
                float *q = sv + 17 * D + gi * D, *k = sv + 20 * D + gi * D,
                      *rk = sv + 23 * D + gi * D, *beta = sv + 26 * D + gi,
                      *rbeta = sv + 26 * D + 3 + gi, *norm = sv + 26 * D + 6 + gi;
                norm[0] = activate(D, raw ? ACT_PHI : ACT_NONE, P + f.q, q);
                norm[3] = activate(D, raw ? ACT_PHI : ACT_NONE, P + f.k, k);
                activate(D, raw ? ACT_SOFTMAX : ACT_NONE, P + f.rk, rk);
                *beta = raw ? sigmoid(P[f.beta]) : P[f.beta];
                *rbeta = raw ? sigmoid(P[f.rbeta]) : P[f.rbeta];
                ds_forward(D, W + gi * D * D, q, k, P + f.v, *beta, z, sv + 3 * D + gi * D,
                           sv + gi * D);
                ds_forward(D, R + gi * D * D, sh, rk, P + f.rv, *rbeta, r, sv + 9 * D + gi * D,
                           sv + 6 * D + gi * D);
                for (int j = 0; j < D; j++) pre[gi * D + j] = z[j] + r[j];
            }
            float *ig = sv + 13 * D, *ug = sv + 14 * D, *og = sv + 15 * D;
            for (int j = 0; j < D; j++) {
                ig[j] = sigmoid(pre[j]);
                ug[j] = pre[D + j];
                og[j] = sigmoid(pre[2 * D + j]);
                c[j] = ig[j] * ug[j] + (1.f - ig[j]) * c[j];
                hh[j] = og[j] * c[j];
            }
            memcpy(sv + 16 * D, c, D * sizeof *c);
            memcpy(Y + row * D, hh, D * sizeof *hh);
            if (saved) stream_out(saved + row * S, sv, S);
        }
    }
}

/* Writes gP and the initial state's gradients. work [B,2,H,3,D,D]: scratch for the rewound
 * (transposed) W and R. */
void delta_lstm_backward(int T, int B, int H, int D, int full, int raw, const float *keep,
                         const float *c0, const float *W_last, const float *R_last,
                         const float *saved, const int *slot, const float *erased,
                         const float *gY, const float *gW_last, const float *gR_last,
                         const float *gh_last, const float *gc_last, float *gP, float *gW0,
                         float *gR0, float *gh0, float *gc0, float *work, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, S = LSTM_SAVED(D), G = 3 * D * D;
        const long HG = (long)H * G, BH = (long)B * H;
        float *Wt = work + (2L * b * H + h) * G, *Rt = Wt + HG, *gW = gW0 + bh * G;
        float *gR = gR0 + bh * G, *gh = gh0 + (long)bh * D, *gc = gc0 + (long)bh * D;
        load_transposed(D, 3, Wt, W_last + bh * G);
        load_transposed(D, 3, Rt, R_last + bh * G);
        memcpy(gW, gW_last + bh * G, G * sizeof *gW);
        memcpy(gR, gR_last + bh * G, G * sizeof *gR);
        memcpy(gh, gh_last + (long)bh * D, D * sizeof *gh);
        memcpy(gc, gc_last + (long)bh * D, D * sizeof *gc);
        for (int t = T - 1; t >= 0; t--) {
            const long row = ((long)t * B + b) * H + h;
            if (t > 0) {
                prefetch(saved + (row - BH) * S, S, 0);
                prefetch(gY + (row - BH) * D, D, 0);
                prefetch_fields(gP, H, 3, D, (long)(t - 1) * B + b, h, 1);
            }
            const float a = keep[t * B + b], pass = (full || t == 0) ? a : 0.f;
            const int through = full || t == 0 || t == T - 1;
            const float *sv = saved + row * S, *sh = sv + 12 * D, *ig = sv + 13 * D,
                        *ug = sv + 14 * D, *og = sv + 15 * D, *c = sv + 16 * D;
            const float *c_prev = t > 0 ? saved + (row - BH) * S + 16 * D : c0 + row * D;
            float gpre[3 * D];
            for (int j = 0; j < D; j++) {
                float ght = gh[j] + gY[row * D + j], gct = gc[j] + ght * og[j];
                gpre[j] = gct * (ug[j] - c_prev[j] * a) * ig[j] * (1.f - ig[j]);
                gpre[D + j] = gct * ig[j];
                gpre[2 * D + j] = ght * c[j] * og[j] * (1.f - og[j]);
                gc[j] = gct * (1.f - ig[j]) * pass;
            }
            for (int gi = 0; gi < 3; gi++) {
                const proj_fields f = field_offsets(H, 3, D, (long)t * B + b, h, gi);
                const float *q = sv + 17 * D + gi * D, *k = sv + 20 * D + gi * D,
                            *rk = sv + 23 * D + gi * D, beta = sv[26 * D + gi],
                            rbeta = sv[26 * D + 3 + gi], *norm = sv + 26 * D + 6 + gi;
                const long m = gi * D * D;
                float *g = gpre + gi * D;
                float gbeta = ds_backward(D, Wt + m, through ? gW + m : NULL, g, q, k, beta,
                                          sv + gi * D, sv + 3 * D + gi * D, gP + f.q, gP + f.k,
                                          gP + f.v, 0);
                float grbeta = ds_backward(D, Rt + m, through ? gR + m : NULL, g, sh, rk, rbeta,
                                           sv + 6 * D + gi * D, sv + 9 * D + gi * D, gh,
                                           gP + f.rk, gP + f.rv, gi > 0);
                if (raw) {
                    activate_backward(D, ACT_PHI, q, norm[0], gP + f.q);
                    activate_backward(D, ACT_PHI, k, norm[3], gP + f.k);
                    softmax_backward(D, rk, gP + f.rk);
                    gbeta *= beta * (1.f - beta);
                    grbeta *= rbeta * (1.f - rbeta);
                }
                gP[f.beta] = gbeta;
                gP[f.rbeta] = grbeta;
            }
            softmax_backward(D, sh, gh);
            scale(D, gh, pass);
            if (a == 0.f && t > 0) {
                const float *e = erased + slot[t * B + b] * 2 * HG + (long)h * G;
                load_transposed(D, 3, Wt, e);
                load_transposed(D, 3, Rt, e + HG);
            }
            scale(G, gW, pass);
            scale(G, gR, pass);
        }
    }
}
