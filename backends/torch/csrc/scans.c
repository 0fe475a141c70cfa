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
 */
#include <math.h>
#include <stdint.h>
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
 * Inference only; training uses the chunkwise form, whose backward autograd derives.
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
