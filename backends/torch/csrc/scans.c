/* Linear-recurrence scans for the recdsl `torch` backend on CPU.
 *
 * A per-step torch loop is bound by op dispatch; these loops run the recurrence over
 * time inside one call, vectorised over channels (the innermost, contiguous axis) and
 * parallel over batch and channel blocks with OpenMP. Layout: [B, T, C] row-major,
 * everything contiguous, T >= 1. Forward and backward (the adjoint is the reverse scan
 * with the coefficients shifted by one step; see MATH.md §1-2).
 *
 *   diag     h_t = a_t * h_{t-1} + x_t         (diagexp: exp(a_t) * h_{t-1} + x_t)
 *   maxplus  h_t = max(h_{t-1} + a_t, x_t)
 *   lse      h_t = logaddexp(h_{t-1} + a_t, x_t)
 *   block    h_t[c] = A_t[c] h_{t-1}[c] + x_t[c]     (A_t[c]: K x K, h[c]: K)
 *
 * Below them: the inference kernels of the matrix states (state in cache, no autograd) and
 * the pieces of the chunkwise forms' training path that torch runs slowly (scans.py calls
 * them from its autograd Functions, forward and derived backward): the exact intra-chunk
 * term of a per-key decay, small unit-triangular solves, the delta rule's pass over chunks.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 64 /* channels per task */

/* The work split of the element scans: one task per (batch row, block of CB channels);
 * inside, b is the row, c0 the block's first channel and n its width. */
#define FOR_CHANNEL_BLOCKS                                                                    \
    int64_t nblk = (C + CB - 1) / CB;                                                        \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t job = 0; job < B * nblk; job++)                                              \
        for (int64_t b = job / nblk, c0 = (job % nblk) * CB, n = C - c0 < CB ? C - c0 : CB,  \
             once = 1; once; once = 0)

#include "vmath.h"
static inline double vexp(double x) { return exp(x); }

#define DEFINE_SCANS(T_, SFX)                                                                 \
void maxplus_fwd_##SFX(const T_* a, const T_* x, const T_* h0, T_* h, int64_t B, int64_t T, int64_t C) { \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ acc[CB];                                                                           \
        for (int64_t c = 0; c < n; c++) acc[c] = h0[b * C + c0 + c];                          \
        for (int64_t t = 0; t < T; t++) {                                                     \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) {                                                 \
                T_ s = acc[c] + a[o + c]; acc[c] = s >= x[o + c] ? s : x[o + c]; h[o + c] = acc[c]; } \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void maxplus_bwd_##SFX(const T_* a, const T_* x, const T_* h, const T_* h0, const T_* gh, const T_* gT, \
                       T_* dx, T_* da, T_* dh0, int64_t B, int64_t T, int64_t C) {            \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ lam[CB];                                                                           \
        for (int64_t c = 0; c < n; c++) lam[c] = gT[b * C + c0 + c];                          \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) {                                                 \
                if (t < T - 1) {                                                              \
                    int64_t on = o + C;                                                       \
                    int from_state = h[o + c] + a[on + c] >= x[on + c];                       \
                    lam[c] = from_state ? lam[c] : 0;                                         \
                }                                                                             \
                lam[c] += gh[o + c];                                                          \
                T_ prev = t > 0 ? h[o - C + c] : h0[b * C + c0 + c];                          \
                int mine = prev + a[o + c] >= x[o + c];                                       \
                da[o + c] = mine ? lam[c] : 0; dx[o + c] = mine ? 0 : lam[c];                 \
            }                                                                                 \
        }                                                                                     \
        for (int64_t c = 0; c < n; c++) {                                                     \
            int64_t o = (b * T) * C + c0 + c;                                                 \
            dh0[b * C + c0 + c] = (h0[b * C + c0 + c] + a[o] >= x[o]) ? lam[c] : 0;           \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void lse_fwd_##SFX(const T_* a, const T_* x, const T_* h0, T_* h, int64_t B, int64_t T, int64_t C) { \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ acc[CB];                                                                           \
        for (int64_t c = 0; c < n; c++) acc[c] = h0[b * C + c0 + c];                          \
        for (int64_t t = 0; t < T; t++) {                                                     \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) {                                                 \
                T_ s = acc[c] + a[o + c], y = x[o + c];                                       \
                T_ hi = s > y ? s : y, lo = s > y ? y : s;                                    \
                acc[c] = isinf(hi) && hi < 0 ? hi : hi + log1p(exp(lo - hi));                 \
                h[o + c] = acc[c]; }                                                          \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void lse_bwd_##SFX(const T_* a, const T_* x, const T_* h, const T_* h0, const T_* gh, const T_* gT, \
                   T_* dx, T_* da, T_* dh0, int64_t B, int64_t T, int64_t C) {                \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ lam[CB];                                                                           \
        for (int64_t c = 0; c < n; c++) lam[c] = gT[b * C + c0 + c];                          \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) {                                                 \
                if (t < T - 1) { int64_t on = o + C; lam[c] *= exp(h[o + c] + a[on + c] - h[on + c]); } \
                lam[c] += gh[o + c];                                                          \
                T_ prev = t > 0 ? h[o - C + c] : h0[b * C + c0 + c];                          \
                T_ w = exp(prev + a[o + c] - h[o + c]);                                       \
                da[o + c] = lam[c] * w; dx[o + c] = lam[c] * exp(x[o + c] - h[o + c]);        \
            }                                                                                 \
        }                                                                                     \
        for (int64_t c = 0; c < n; c++) {                                                     \
            int64_t o = (b * T) * C + c0 + c;                                                 \
            dh0[b * C + c0 + c] = lam[c] * exp(h0[b * C + c0 + c] + a[o] - h[o]);             \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* Block scan: A [B, T, C, K, K], x, h [B, T, C, K], h0 [B, C, K]. */                         \
void block_fwd_##SFX(const T_* A, const T_* x, const T_* h0, T_* h, int64_t B, int64_t T, int64_t C, int64_t K) { \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t job = 0; job < B * C; job++) {                                               \
        int64_t b = job / C, c = job % C;                                                     \
        T_ acc[16], nxt[16];                                                                  \
        for (int64_t i = 0; i < K; i++) acc[i] = h0[(b * C + c) * K + i];                     \
        for (int64_t t = 0; t < T; t++) {                                                     \
            const T_* At = A + (((b * T + t) * C + c) * K) * K;                               \
            int64_t o = ((b * T + t) * C + c) * K;                                            \
            for (int64_t i = 0; i < K; i++) {                                                 \
                T_ s = x[o + i];                                                              \
                for (int64_t j = 0; j < K; j++) s += At[i * K + j] * acc[j];                  \
                nxt[i] = s;                                                                   \
            }                                                                                 \
            for (int64_t i = 0; i < K; i++) { acc[i] = nxt[i]; h[o + i] = nxt[i]; }           \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void block_bwd_##SFX(const T_* A, const T_* h, const T_* h0, const T_* gh, const T_* gT,    \
                     T_* dx, T_* dA, T_* dh0, int64_t B, int64_t T, int64_t C, int64_t K) {   \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t job = 0; job < B * C; job++) {                                               \
        int64_t b = job / C, c = job % C;                                                     \
        T_ lam[16], nxt[16];                                                                  \
        for (int64_t i = 0; i < K; i++) lam[i] = gT[(b * C + c) * K + i];                     \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            int64_t o = ((b * T + t) * C + c) * K;                                            \
            if (t < T - 1) {                                                                  \
                const T_* An = A + (((b * T + t + 1) * C + c) * K) * K;                       \
                for (int64_t j = 0; j < K; j++) { T_ s = 0;                                   \
                    for (int64_t i = 0; i < K; i++) s += An[i * K + j] * lam[i];              \
                    nxt[j] = s; }                                                             \
                for (int64_t i = 0; i < K; i++) lam[i] = nxt[i];                              \
            }                                                                                 \
            for (int64_t i = 0; i < K; i++) { lam[i] += gh[o + i]; dx[o + i] = lam[i]; }      \
            const T_* prev = t > 0 ? h + o - C * K : h0 + (b * C + c) * K;                    \
            T_* dAt = dA + (((b * T + t) * C + c) * K) * K;                                   \
            for (int64_t i = 0; i < K; i++) for (int64_t j = 0; j < K; j++) dAt[i * K + j] = lam[i] * prev[j]; \
        }                                                                                     \
        const T_* A0 = A + (((b * T) * C + c) * K) * K;                                       \
        for (int64_t j = 0; j < K; j++) { T_ s = 0;                                           \
            for (int64_t i = 0; i < K; i++) s += A0[i * K + j] * lam[i];                      \
            dh0[(b * C + c) * K + j] = s; }                                                   \
    }                                                                                         \
}

/* diag: h_t = d(a_t) * h_{t-1} + x_t with d the identity (diag: a is the decay) or exp
 * (diagexp: a is the log decay, exponentiated here, one pass over memory less). The
 * backward is the adjoint scan: lambda_t = gh_t + d(a_{t+1}) lambda_{t+1}, dx = lambda,
 * da = lambda * h_{t-1} * d'(a) (d' = 1 or exp), dh0 = d(a_0) lambda_0. */
#define IDENTITY(v) (v)
#define UNIT(v) 1
#define DEFINE_DIAG(T_, SFX, NAME, DECAY, DDECAY)                                            \
void NAME##_fwd_##SFX(const T_* a, const T_* x, const T_* h0, T_* h, int64_t B, int64_t T, int64_t C) { \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ acc[CB], d[CB];                                                                    \
        for (int64_t c = 0; c < n; c++) acc[c] = h0[b * C + c0 + c];                          \
        for (int64_t t = 0; t < T; t++) {                                                     \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) d[c] = DECAY(a[o + c]); /* vectorises */          \
            for (int64_t c = 0; c < n; c++) { acc[c] = d[c] * acc[c] + x[o + c]; h[o + c] = acc[c]; } \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
void NAME##_bwd_##SFX(const T_* a, const T_* h, const T_* h0, const T_* gh, const T_* gT,    \
                      T_* dx, T_* da, T_* dh0, int64_t B, int64_t T, int64_t C) {             \
    FOR_CHANNEL_BLOCKS {                                                                      \
        T_ lam[CB];                                                                           \
        for (int64_t c = 0; c < n; c++) lam[c] = gT[b * C + c0 + c];                          \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            int64_t o = (b * T + t) * C + c0;                                                 \
            for (int64_t c = 0; c < n; c++) {                                                 \
                if (t < T - 1) lam[c] = lam[c] * DECAY(a[o + C + c]);                         \
                lam[c] += gh[o + c];                                                          \
                dx[o + c] = lam[c];                                                           \
                T_ prev = t > 0 ? h[o - C + c] : h0[b * C + c0 + c];                          \
                da[o + c] = lam[c] * prev * DDECAY(a[o + c]);                                 \
            }                                                                                 \
        }                                                                                     \
        for (int64_t c = 0; c < n; c++) dh0[b * C + c0 + c] = lam[c] * DECAY(a[(b * T) * C + c0 + c]); \
    }                                                                                         \
}

DEFINE_SCANS(float, f32)
DEFINE_SCANS(double, f64)
DEFINE_DIAG(float, f32, diag, IDENTITY, UNIT)
DEFINE_DIAG(double, f64, diag, IDENTITY, UNIT)
DEFINE_DIAG(float, f32, diagexp, vexpf, vexpf)
DEFINE_DIAG(double, f64, diagexp, vexp, vexp)

/* Strided views of sequence tensors [B, T, H, F] (any layout: the kernels below read their
 * inputs in place, with the strides torch reports, 0 for broadcast axes). */
typedef struct { const void* p; int64_t sb, sh, st, sf; } view_t;
#define AT(T_, vw, b, h, t, f) (((const T_*)(vw).p)[(b) * (vw).sb + (h) * (vw).sh + (t) * (vw).st + (f) * (vw).sf])

/* Matrix state with a decay over keys and an outer-product input, read out without ever
 * writing the state to memory (the state of one sequence stays in cache):
 *     S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = S_t^T q_t  (incl) or S_{t-1}^T q_t
 * Inference only; training uses the chunkwise form (scans.chunk_diag) and its derived backward.
 * out: [B, T, H, V] contiguous; S0, ST: [B, H, K, V] contiguous. */
#define DEFINE_MATDIAG(T_, SFX, EXPF)                                                         \
void matdiag_fwd_##SFX(const view_t* g, const view_t* k, const view_t* v, const view_t* q,   \
                       int32_t incl, const T_* S0, T_* out, T_* ST,                           \
                       int64_t B, int64_t H, int64_t T, int64_t K, int64_t V) {               \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t bh = 0; bh < B * H; bh++) {                                                  \
        int64_t b = bh / H, hh = bh % H;                                                      \
        T_* restrict S = ST + bh * K * V;                                                     \
        memcpy(S, S0 + bh * K * V, sizeof(T_) * K * V);                                       \
        T_ vt[V], acc[V];                                                                     \
        for (int64_t t = 0; t < T; t++) {                                                     \
            for (int64_t j = 0; j < V; j++) { vt[j] = AT(T_, *v, b, hh, t, j); acc[j] = 0; }  \
            for (int64_t kk = 0; kk < K; kk++) {                                              \
                T_* restrict row = S + kk * V;                                                \
                T_ d = EXPF(AT(T_, *g, b, hh, t, kk)), kv = AT(T_, *k, b, hh, t, kk);         \
                T_ qk = AT(T_, *q, b, hh, t, kk);                                             \
                if (incl) {                                                                   \
                    _Pragma("omp simd")                                                       \
                    for (int64_t j = 0; j < V; j++) { T_ x = d * row[j] + kv * vt[j]; row[j] = x; acc[j] += qk * x; } \
                } else {                                                                      \
                    _Pragma("omp simd")                                                       \
                    for (int64_t j = 0; j < V; j++) { T_ x = row[j]; acc[j] += qk * x; row[j] = d * x + kv * vt[j]; } \
                }                                                                             \
            }                                                                                 \
            memcpy(out + ((b * T + t) * H + hh) * V, acc, sizeof(T_) * V);                    \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* Gated delta rule, S_t = exp(g_t) (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T,   \
 * o_t = S_t^T q_t: two passes over the state per step (u = S^T k, then update + read out). */ \
void delta_fwd_##SFX(const view_t* g, const view_t* beta, const view_t* k, const view_t* v,  \
                     const view_t* q, int32_t gated, const T_* S0, T_* out, T_* ST,          \
                     int64_t B, int64_t H, int64_t T, int64_t K, int64_t V) {                 \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t bh = 0; bh < B * H; bh++) {                                                  \
        int64_t b = bh / H, hh = bh % H;                                                      \
        T_* restrict S = ST + bh * K * V;                                                     \
        memcpy(S, S0 + bh * K * V, sizeof(T_) * K * V);                                       \
        T_ u[V], acc[V];                                                                      \
        for (int64_t t = 0; t < T; t++) {                                                     \
            T_ d = gated ? EXPF(AT(T_, *g, b, hh, t, 0)) : (T_)1, bt = AT(T_, *beta, b, hh, t, 0); \
            for (int64_t j = 0; j < V; j++) { u[j] = 0; acc[j] = 0; }                         \
            for (int64_t kk = 0; kk < K; kk++) {                                              \
                T_* restrict row = S + kk * V; T_ kv = AT(T_, *k, b, hh, t, kk);              \
                _Pragma("omp simd")                                                           \
                for (int64_t j = 0; j < V; j++) u[j] += kv * row[j];                          \
            }                                                                                 \
            /* S' = d S + k (beta (v - d u))^T */                                             \
            for (int64_t j = 0; j < V; j++) u[j] = bt * (AT(T_, *v, b, hh, t, j) - d * u[j]); \
            for (int64_t kk = 0; kk < K; kk++) {                                              \
                T_* restrict row = S + kk * V;                                                \
                T_ kv = AT(T_, *k, b, hh, t, kk), qk = AT(T_, *q, b, hh, t, kk);              \
                _Pragma("omp simd")                                                           \
                for (int64_t j = 0; j < V; j++) { T_ x = d * row[j] + kv * u[j]; row[j] = x; acc[j] += qk * x; } \
            }                                                                                 \
            memcpy(out + ((b * T + t) * H + hh) * V, acc, sizeof(T_) * V);                    \
        }                                                                                     \
    }                                                                                         \
}
DEFINE_MATDIAG(float, f32, vexpf)
DEFINE_MATDIAG(double, f64, vexp)

/* The intra-chunk term of the chunkwise form with a decay per key (GLA, RWKV-6; MATH.md §3),
 * exactly: one chunk of C steps per task, R chunks in all,
 *     o_i = Σ_{j <= i - s} A_ij v_j,   A_ij = Σ_k q_ik k_jk E_ijk,   E_ijk = Π_{j < t <= i - s} exp(g_tk)
 * with s = 1 for a readout of the state before step i (exclusive), 0 for the state after it.
 * E is carried as a running product of the step decays (row i, j from i - s down): one
 * multiply per pair and key instead of an exp, every factor <= 1 for g <= 0; a product below
 * TINY is flushed to zero (it would only crawl through the slow subnormal range, weighing
 * nothing). Only the pairs j <= i - s are read, forward and backward: a non-finite value at
 * step p reaches rows i >= p only, and the decay's gradient of a pair reaches the steps it
 * spans, (j, i - s], only (running sums over j, never a difference of two cumulative sums).
 * q, k, g: [R, C, K]; v, o, dout: [R, C, V]; contiguous. The backward writes every element
 * of dq, dk, dg [R, C, K] and dv [R, C, V] (the intra-chunk share of each gradient). */
#define DEFINE_VDECAY(T_, SFX, EXPF, TINY)                                                    \
/* E[j] = E_ij for j = last .. 0 of one row (eg: the step decays exp(g) of the chunk) */      \
static void vdecay_row_##SFX(const T_* eg, T_* E, int64_t last, int64_t K) {                 \
    for (int64_t c = 0; c < K; c++) E[last * K + c] = 1;                                      \
    for (int64_t j = last - 1; j >= 0; j--) {                                                 \
        const T_* restrict up = E + (j + 1) * K;                                              \
        const T_* restrict d = eg + (j + 1) * K;                                              \
        T_* restrict e = E + j * K;                                                           \
        _Pragma("omp simd")                                                                   \
        for (int64_t c = 0; c < K; c++) { T_ x = up[c] * d[c]; e[c] = x < TINY ? 0 : x; }    \
    }                                                                                         \
}                                                                                             \
void vdecay_fwd_##SFX(const T_* q, const T_* k, const T_* v, const T_* g, T_* o, int32_t strict, \
                      int64_t R, int64_t C, int64_t K, int64_t V) {                           \
    _Pragma("omp parallel")                                                                   \
    {                                                                                         \
        T_* eg = malloc(sizeof(T_) * 2 * C * K);                                              \
        T_* E = eg + C * K;                                                                   \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t r = 0; r < R; r++) {                                                     \
            const T_ *qr = q + r * C * K, *kr = k + r * C * K, *vr = v + r * C * V, *gr = g + r * C * K; \
            for (int64_t c = 0; c < C * K; c++) eg[c] = EXPF(gr[c]);                          \
            for (int64_t i = 0; i < C; i++) {                                                 \
                T_* restrict oi = o + r * C * V + i * V;                                      \
                for (int64_t c = 0; c < V; c++) oi[c] = 0;                                    \
                int64_t last = i - strict;             /* the pairs j = 0 .. last */          \
                if (last < 0) continue;                                                       \
                vdecay_row_##SFX(eg, E, last, K);                                             \
                const T_* qi = qr + i * K;                                                    \
                for (int64_t j = 0; j <= last; j++) {                                         \
                    const T_ *kj = kr + j * K, *ej = E + j * K, *vj = vr + j * V;             \
                    T_ a = 0;                                                                 \
                    _Pragma("omp simd reduction(+:a)")                                        \
                    for (int64_t c = 0; c < K; c++) a += qi[c] * kj[c] * ej[c];               \
                    _Pragma("omp simd")                                                       \
                    for (int64_t c = 0; c < V; c++) oi[c] += a * vj[c];                       \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        free(eg);                                                                             \
    }                                                                                         \
}                                                                                             \
void vdecay_bwd_##SFX(const T_* q, const T_* k, const T_* v, const T_* g, const T_* dout,   \
                      T_* dq, T_* dk, T_* dv, T_* dg, int32_t strict,                         \
                      int64_t R, int64_t C, int64_t K, int64_t V) {                           \
    _Pragma("omp parallel")                                                                   \
    {                                                                                         \
        T_* eg = malloc(sizeof(T_) * (2 * C + 1) * K);                                        \
        T_* E = eg + C * K;                                                                   \
        T_* pre = E + C * K;                  /* Σ_{j' <= j} of a row's pair gradients */     \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t r = 0; r < R; r++) {                                                     \
            int64_t oK = r * C * K, oV = r * C * V;                                           \
            const T_ *qr = q + oK, *kr = k + oK, *vr = v + oV, *dor = dout + oV, *gr = g + oK; \
            T_ *dqr = dq + oK, *dkr = dk + oK, *dvr = dv + oV, *dgr = dg + oK;                \
            for (int64_t c = 0; c < C * K; c++) eg[c] = EXPF(gr[c]);                          \
            memset(dqr, 0, sizeof(T_) * C * K); memset(dkr, 0, sizeof(T_) * C * K);          \
            memset(dgr, 0, sizeof(T_) * C * K); memset(dvr, 0, sizeof(T_) * C * V);          \
            for (int64_t i = 0; i < C; i++) {                                                 \
                int64_t last = i - strict;                                                    \
                if (last < 0) continue;                                                       \
                vdecay_row_##SFX(eg, E, last, K);                                             \
                const T_ *qi = qr + i * K, *doi = dor + i * V;                                \
                T_* restrict dqi = dqr + i * K;                                               \
                for (int64_t c = 0; c < K; c++) pre[c] = 0;                                   \
                for (int64_t j = 0; j <= last; j++) {                                         \
                    const T_ *kj = kr + j * K, *ej = E + j * K, *vj = vr + j * V;             \
                    T_* restrict dkj = dkr + j * K;                                           \
                    T_* restrict dvj = dvr + j * V;                                           \
                    T_* restrict dgn = dgr + (j + 1) * K;  /* t = j + 1: the pairs j' < t */  \
                    T_ da = 0, a = 0;                                                         \
                    _Pragma("omp simd reduction(+:da)")                                       \
                    for (int64_t c = 0; c < V; c++) da += doi[c] * vj[c];                     \
                    if (j < last) {                                                           \
                        _Pragma("omp simd reduction(+:a)")                                    \
                        for (int64_t c = 0; c < K; c++) {                                     \
                            T_ qe = qi[c] * ej[c], t = da * ej[c], qke = qe * kj[c];          \
                            a += qke; dqi[c] += t * kj[c]; dkj[c] += da * qe;                 \
                            pre[c] += da * qke; dgn[c] += pre[c];                             \
                        }                                                                     \
                    } else {                           /* the pair (i, last) spans no step */ \
                        _Pragma("omp simd reduction(+:a)")                                    \
                        for (int64_t c = 0; c < K; c++) {                                     \
                            T_ qe = qi[c] * ej[c];                                            \
                            a += qe * kj[c]; dqi[c] += da * ej[c] * kj[c]; dkj[c] += da * qe; \
                        }                                                                     \
                    }                                                                         \
                    _Pragma("omp simd")                                                       \
                    for (int64_t c = 0; c < V; c++) dvj[c] += a * doi[c];                     \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        free(eg);                                                                             \
    }                                                                                         \
}
DEFINE_VDECAY(float, f32, vexpf, 1e-30f)
DEFINE_VDECAY(double, f64, vexp, 1e-290)

/* Unit lower-triangular systems of the delta rule's WY/UT form (MATH.md §4), one C x C
 * system per task with W right-hand sides, solved row by row (vectorised across the
 * right-hand sides; torch's batched solve spends more time per small system than this):
 *     transposed = 0:  L X = diag(s) R   X_i = s_i R_i - Σ_{j < i} L_ij X_j   (forward
 *                                        substitution: row i reads the rows before it only)
 *     transposed = 1:  Lᵀ X = diag(s) R  X_i = s_i R_i - Σ_{j > i} L_ji X_j   (back
 *                                        substitution, the adjoint of the forward one)
 * s: a scale per row ([M, C]; NULL: none). Only the strictly lower part of L is read (its
 * diagonal is one). L [M, C, C], R and X [M, C, W], contiguous. */
#define DEFINE_TRISOLVE(T_, SFX)                                                              \
void trisolve_##SFX(const T_* L, const T_* R, const T_* s, T_* X, int32_t transposed, int64_t M, int64_t C, int64_t W) { \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t m = 0; m < M; m++) {                                                         \
        const T_* Lm = L + m * C * C;                                                         \
        const T_* Rm = R + m * C * W;                                                         \
        T_* Xm = X + m * C * W;                                                               \
        for (int64_t step = 0; step < C; step++) {                                            \
            int64_t i = transposed ? C - 1 - step : step;                                     \
            T_* restrict xi = Xm + i * W;                                                     \
            const T_* restrict ri = Rm + i * W;                                               \
            T_ si = s ? s[m * C + i] : (T_)1;                                                 \
            _Pragma("omp simd")                                                               \
            for (int64_t c = 0; c < W; c++) xi[c] = si * ri[c];                               \
            int64_t j0 = transposed ? i + 1 : 0, j1 = transposed ? C : i;                     \
            for (int64_t j = j0; j < j1; j++) {                                               \
                T_ l = transposed ? Lm[j * C + i] : Lm[i * C + j];                            \
                const T_* restrict xj = Xm + j * W;                                           \
                _Pragma("omp simd")                                                           \
                for (int64_t c = 0; c < W; c++) xi[c] -= l * xj[c];                           \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}
DEFINE_TRISOLVE(float, f32)
DEFINE_TRISOLVE(double, f64)

/* The chunk-to-chunk pass of the delta rule's WY/UT form (MATH.md §4), forward and adjoint.
 * Per row b and chunk n (C steps), with [Û | Ŵ] = X[b, n] (row stride ldx), wk = K ⊙ e^{b_C - b}
 * and d = e^{b_C} (1 when ungated), S the state before chunk n and Λ the gradient of the one
 * after it:
 *     forward   Vn = Û - Ŵ S,   O = Qe S,   S <- d S + wkᵀ Vn       (Qe = Q ⊙ e^b: the readout's
 *                                                                   inter-chunk term)
 *     adjoint   Vn = Û - Ŵ S (recomputed from the saved S),   dVn = P + wk Λ,
 *               Λ <- d Λ + Y - Ŵᵀ dVn
 * Every column of the state (a value coordinate) is its own recurrence, so the tasks are
 * (row, block of VB columns); inside, the products keep RB rows of their result in
 * registers and the state block stays in L1. Layouts, contiguous unless a stride is given:
 * X [B, N, C, ldx], wk and Qe [B, N, C, K], d [B, N] (NULL: ungated), S0 / ST / dST / dS0
 * [B, K, V], Sp / Lam [B, N, K, V], Vn / O / P [B, N, C, V], Y [B, N, K, V], dVn [B, N, C, ldo]. */
#define VB 16
#define RB 8   /* rows of a product kept in registers at once */
#define DEFINE_DELTA_CARRY(T_, SFX)                                                           \
/* A VB-wide row as one value (GCC / clang vector extension: the accumulators below stay in  \
 * registers, which the auto-vectoriser does not manage for an array of them). */          \
typedef T_ vec_##SFX __attribute__((vector_size(VB * sizeof(T_))));                          \
/* x_i += sgn Σ_k A_ik S_k for the C rows x_i and K rows S_k (VB wide, aligned), sgn = ±1:  \
 * RB rows at a time, each S_k loaded once for all of them (the sign is applied around the   \
 * sum: x + sgn Σ = sgn (sgn x + Σ), so the inner multiply-add reads A as it is). */        \
static void gemm_rows_##SFX(T_* x, int64_t C, const T_* A, int64_t lda, const T_* S, T_ sgn, int64_t K) { \
    const vec_##SFX* Sv = (const vec_##SFX*)S;                                                \
    vec_##SFX* xv = (vec_##SFX*)x;                                                            \
    for (int64_t i0 = 0; i0 < C; i0 += RB) {                                                  \
        int64_t nr = C - i0 < RB ? C - i0 : RB;                                               \
        vec_##SFX acc[RB];                                                                    \
        const T_* a[RB];                                                                      \
        _Pragma("GCC unroll 8")                                                               \
        for (int r = 0; r < RB; r++) { a[r] = A + (i0 + (r < nr ? r : 0)) * lda; acc[r] = sgn * xv[i0 + (r < nr ? r : 0)]; } \
        for (int64_t kk = 0; kk < K; kk++) {                                                  \
            vec_##SFX s = Sv[kk];                                                             \
            _Pragma("GCC unroll 8")                                                           \
            for (int r = 0; r < RB; r++) acc[r] += a[r][kk] * s;                              \
        }                                                                                     \
        for (int r = 0; r < nr; r++) xv[i0 + r] = sgn * acc[r];                               \
    }                                                                                         \
}                                                                                             \
/* S_k += sgn Σ_i A_ik x_i for the K rows S_k and C rows x_i, sgn = ±1: RB state rows at a \
 * time, each x_i loaded once for all of them. */                                          \
static void gemm_rank_##SFX(T_* S, int64_t K, const T_* A, int64_t lda, const T_* x, T_ sgn, int64_t C) { \
    vec_##SFX* Sv = (vec_##SFX*)S;                                                            \
    const vec_##SFX* xv = (const vec_##SFX*)x;                                                \
    for (int64_t k0 = 0; k0 < K; k0 += RB) {                                                  \
        int64_t nk = K - k0 < RB ? K - k0 : RB;                                               \
        vec_##SFX acc[RB];                                                                    \
        int64_t col[RB];                                                                      \
        _Pragma("GCC unroll 8")                                                               \
        for (int r = 0; r < RB; r++) { col[r] = k0 + (r < nk ? r : 0); acc[r] = sgn * Sv[col[r]]; } \
        for (int64_t i = 0; i < C; i++) {                                                     \
            vec_##SFX xi = xv[i];                                                             \
            const T_* Ai = A + i * lda;                                                       \
            _Pragma("GCC unroll 8")                                                           \
            for (int r = 0; r < RB; r++) acc[r] += Ai[col[r]] * xi;                           \
        }                                                                                     \
        for (int r = 0; r < nk; r++) Sv[k0 + r] = sgn * acc[r];                               \
    }                                                                                         \
}                                                                                             \
/* rows x VB block <-> the w columns at src / dst (row stride ld; unaligned): whole rows as  \
 * one vector move when w = VB (a per-row memcpy call would cost as much as the arithmetic), \
 * else element by element with zero padding. */                                          \
typedef T_ uvec_##SFX __attribute__((vector_size(VB * sizeof(T_)), aligned(sizeof(T_))));   \
static void load_block_##SFX(T_* dst, const T_* src, int64_t ld, int64_t rows, int64_t w) {   \
    if (src && w == VB) {                                                                     \
        for (int64_t r = 0; r < rows; r++) ((vec_##SFX*)dst)[r] = *(const uvec_##SFX*)(src + r * ld); \
        return;                                                                               \
    }                                                                                         \
    for (int64_t r = 0; r < rows; r++)                                                        \
        for (int64_t c = 0; c < VB; c++) dst[r * VB + c] = src && c < w ? src[r * ld + c] : 0; \
}                                                                                             \
static void store_block_##SFX(T_* dst, const T_* src, int64_t ld, int64_t rows, int64_t w) {  \
    if (w == VB) {                                                                            \
        for (int64_t r = 0; r < rows; r++) *(uvec_##SFX*)(dst + r * ld) = ((const vec_##SFX*)src)[r]; \
        return;                                                                               \
    }                                                                                         \
    for (int64_t r = 0; r < rows; r++)                                                        \
        for (int64_t c = 0; c < w; c++) dst[r * ld + c] = src[r * VB + c];                    \
}                                                                                             \
void delta_carry_fwd_##SFX(const T_* X, int64_t ldx, const T_* wk, const T_* d, const T_* S0, const T_* Qe, \
                           T_* Sp, T_* Vn, T_* O, T_* ST, int64_t B, int64_t N, int64_t C, int64_t K, int64_t V) { \
    int64_t nvb = (V + VB - 1) / VB;                                                          \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t job = 0; job < B * nvb; job++) {                                             \
        int64_t b = job / nvb, c0 = (job % nvb) * VB, w = V - c0 < VB ? V - c0 : VB;          \
        vec_##SFX buf[K + 2 * C];                          /* aligned rows, on the stack */  \
        T_ *S = (T_*)buf, *x = S + K * VB, *o = x + C * VB;                                   \
        load_block_##SFX(S, S0 + b * K * V + c0, V, K, w);                                    \
        for (int64_t n = 0; n < N; n++) {                                                     \
            int64_t bn = b * N + n;                                                           \
            const T_* Xn = X + bn * C * ldx;                                                  \
            store_block_##SFX(Sp + bn * K * V + c0, S, V, K, w);                              \
            load_block_##SFX(o, NULL, 0, C, w);                                               \
            gemm_rows_##SFX(o, C, Qe + bn * C * K, K, S, 1, K);            /* O = Qe S */     \
            store_block_##SFX(O + bn * C * V + c0, o, V, C, w);                               \
            load_block_##SFX(x, Xn + c0, ldx, C, w);                        /* Û */           \
            gemm_rows_##SFX(x, C, Xn + V, ldx, S, -1, K);                   /* Vn = Û - Ŵ S */ \
            store_block_##SFX(Vn + bn * C * V + c0, x, V, C, w);                              \
            if (d) { T_ dn = d[bn]; for (int64_t c = 0; c < K * VB; c++) S[c] *= dn; }        \
            gemm_rank_##SFX(S, K, wk + bn * C * K, K, x, 1, C);             /* S += wkᵀ Vn */ \
        }                                                                                     \
        store_block_##SFX(ST + b * K * V + c0, S, V, K, w);                                   \
    }                                                                                         \
}                                                                                             \
void delta_carry_bwd_##SFX(const T_* X, int64_t ldx, const T_* wk, const T_* d, const T_* Sp, \
                           const T_* P, const T_* Y, const T_* dST, T_* Lam, T_* Vn, T_* dVn, int64_t ldo, \
                           T_* dS0, int64_t B, int64_t N, int64_t C, int64_t K, int64_t V) {  \
    int64_t nvb = (V + VB - 1) / VB;                                                          \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int64_t job = 0; job < B * nvb; job++) {                                             \
        int64_t b = job / nvb, c0 = (job % nvb) * VB, w = V - c0 < VB ? V - c0 : VB;          \
        vec_##SFX buf[3 * K + C];                                                             \
        T_ *L = (T_*)buf, *y = L + K * VB, *S = y + K * VB, *x = S + K * VB;                  \
        load_block_##SFX(L, dST ? dST + b * K * V + c0 : NULL, V, K, w);                      \
        for (int64_t n = N - 1; n >= 0; n--) {                                                \
            int64_t bn = b * N + n;                                                           \
            const T_* Xn = X + bn * C * ldx;                                                  \
            store_block_##SFX(Lam + bn * K * V + c0, L, V, K, w);                             \
            load_block_##SFX(S, Sp + bn * K * V + c0, V, K, w);                               \
            load_block_##SFX(x, Xn + c0, ldx, C, w);                                          \
            gemm_rows_##SFX(x, C, Xn + V, ldx, S, -1, K);                   /* Vn = Û - Ŵ S */ \
            store_block_##SFX(Vn + bn * C * V + c0, x, V, C, w);                              \
            load_block_##SFX(x, P + bn * C * V + c0, V, C, w);                                \
            gemm_rows_##SFX(x, C, wk + bn * C * K, K, L, 1, K);             /* dVn = P + wk Λ */ \
            store_block_##SFX(dVn + bn * C * ldo + c0, x, ldo, C, w);                         \
            T_ dn = d ? d[bn] : (T_)1;                                                        \
            load_block_##SFX(y, Y + bn * K * V + c0, V, K, w);                                \
            for (int64_t c = 0; c < K * VB; c++) L[c] = dn * L[c] + y[c];                     \
            gemm_rank_##SFX(L, K, Xn + V, ldx, x, -1, C);                   /* Λ -= Ŵᵀ dVn */  \
        }                                                                                     \
        store_block_##SFX(dS0 + b * K * V + c0, L, V, K, w);                                  \
    }                                                                                         \
}
DEFINE_DELTA_CARRY(float, f32)
DEFINE_DELTA_CARRY(double, f64)

/* dst = srcᵀ: src [rows, cols] with row stride lds (columns at stride 1), dst [cols, rows]
 * dense. The weight gradients contract over B·T, which oneDNN wants as the inner (stride-1)
 * axis of both operands; torch's strided copy does this at half the rate of 32 x 32 tiles
 * through a buffer in L1 (rows read and written whole). */
#define TRANSPOSE_TILE 32
#define DEFINE_TRANSPOSE(T_, SFX)                                                             \
void transpose_##SFX(const T_* src, int64_t lds, T_* dst, int64_t rows, int64_t cols) {       \
    int64_t nbr = (rows + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;                               \
    int64_t nbc = (cols + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;                               \
    _Pragma("omp parallel for collapse(2) schedule(static)")                                  \
    for (int64_t bc = 0; bc < nbc; bc++)                                                      \
    for (int64_t br = 0; br < nbr; br++) {                                                    \
        int64_t r0 = br * TRANSPOSE_TILE, c0 = bc * TRANSPOSE_TILE;                           \
        int64_t nr = rows - r0 < TRANSPOSE_TILE ? rows - r0 : TRANSPOSE_TILE;                 \
        int64_t nc = cols - c0 < TRANSPOSE_TILE ? cols - c0 : TRANSPOSE_TILE;                 \
        T_ tile[TRANSPOSE_TILE][TRANSPOSE_TILE];                                              \
        for (int64_t r = 0; r < nr; r++)                                                      \
            for (int64_t c = 0; c < nc; c++) tile[c][r] = src[(r0 + r) * lds + c0 + c];       \
        for (int64_t c = 0; c < nc; c++)                                                      \
            for (int64_t r = 0; r < nr; r++) dst[(c0 + c) * rows + r0 + r] = tile[c][r];      \
    }                                                                                         \
}
DEFINE_TRANSPOSE(float, f32)
DEFINE_TRANSPOSE(double, f64)
