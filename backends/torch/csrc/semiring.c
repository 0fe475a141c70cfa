/* Dense semiring recurrences for the recdsl `torch` backend on CPU (backends/torch/semiring.py).
 *
 *   h_t[i] = (+)_j (h_{t-1}[j] + A_t[j, i]) + b_t[i]
 *
 * in the log semiring ((+) = logsumexp: the HMM forward algorithm, kind 0) or the tropical
 * one ((+) = max: Viterbi, kind 1). The sequential semiring matrix-vector loop, one task per
 * row r (batch x heads), the inner loops over i contiguous. Layout, all contiguous:
 *   A   shared: [H][N][N] (row r reads A[r % H]: a param, per head) or per step: [R][T][N][N]
 *   b   [R][T][N];  h0 [R][N];  h [R][T][N]
 *
 * The backward (the adjoint, MATH.md §2 with a dense transition): with the weights
 *   W_t[j, i] = exp(h_{t-1}[j] + A_t[j, i] - z_t[i]),  z_t = h_t - b_t   (log: posteriors)
 *   W_t[j, i] = [j = argmax_j' (h_{t-1}[j'] + A_t[j', i])]               (max-plus: first max)
 * lambda_t = g_t + W_{t+1} lambda_{t+1}; db_t = lambda_t; dA_t[j, i] =
 * W_t[j, i] lambda_t[i]; dh0 = W_1 lambda_1. z_t is recomputed from h_{t-1} (not h_t - b_t, which
 * would lose the digits b_t cancels). Shared A: dA is written per row, [R][N][N] (summed by the
 * caller), so rows run in parallel without sharing an accumulator.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmath.h"
static inline double vexp_d(double x) { return exp(x); }

#define DEFINE_DENSE_SEMIRING(T_, SFX, EXPF, LOGF)                                            \
/* m[i] = max_j (p[j] + At[j][i]) (idx: the first j attaining it, -1 if all are -inf); for    \
 * kind 0 then z[i] = logsumexp_j (p[j] + At[j][i]), else z = m. */                          \
static void reduce_##SFX(int kind, const T_* p, const T_* At, int64_t N, T_* m, T_* s, T_* z, int64_t* idx) { \
    for (int64_t i = 0; i < N; i++) { m[i] = -INFINITY; idx[i] = -1; }                        \
    for (int64_t j = 0; j < N; j++) {                                                         \
        const T_ pj = p[j]; const T_* row = At + j * N;                                       \
        for (int64_t i = 0; i < N; i++) {                                                     \
            T_ v = pj + row[i];                                                               \
            if (v > m[i]) { m[i] = v; idx[i] = j; }                                           \
        }                                                                                     \
    }                                                                                         \
    if (kind != 0) { for (int64_t i = 0; i < N; i++) z[i] = m[i]; return; }                   \
    for (int64_t i = 0; i < N; i++) { s[i] = 0; if (!isfinite(m[i])) m[i] = m[i] > 0 ? m[i] : 0; } \
    for (int64_t j = 0; j < N; j++) {                                                         \
        const T_ pj = p[j]; const T_* row = At + j * N;                                       \
        for (int64_t i = 0; i < N; i++) s[i] += EXPF(pj + row[i] - m[i]);                     \
    }                                                                                         \
    for (int64_t i = 0; i < N; i++) z[i] = m[i] + LOGF(s[i]);                                 \
}                                                                                             \
void dense_semiring_fwd_##SFX(int64_t kind, const T_* A, int64_t shared, int64_t H, const T_* b, \
                              const T_* h0, T_* h, int64_t R, int64_t T, int64_t N) {         \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                          \
    for (int64_t r = 0; r < R; r++) {                                                         \
        T_* buf = (T_*)malloc(sizeof(T_) * 3 * N);                                            \
        int64_t* idx = (int64_t*)malloc(sizeof(int64_t) * N);                                 \
        T_ *m = buf, *s = buf + N, *z = buf + 2 * N;                                          \
        const T_* prev = h0 + r * N;                                                          \
        for (int64_t t = 0; t < T; t++) {                                                     \
            const T_* At = shared ? A + (r % H) * N * N : A + (r * T + t) * N * N;           \
            const T_* bt = b + (r * T + t) * N;                                               \
            T_* out = h + (r * T + t) * N;                                                    \
            reduce_##SFX((int)kind, prev, At, N, m, s, z, idx);                               \
            for (int64_t i = 0; i < N; i++) out[i] = z[i] + bt[i];                            \
            prev = out;                                                                       \
        }                                                                                     \
        free(buf); free(idx);                                                                 \
    }                                                                                         \
}                                                                                             \
void dense_semiring_bwd_##SFX(int64_t kind, const T_* A, int64_t shared, int64_t H, const T_* h0, \
                              const T_* h, const T_* gh, T_* dA, T_* db, T_* dh0,             \
                              int64_t R, int64_t T, int64_t N) {                              \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                          \
    for (int64_t r = 0; r < R; r++) {                                                         \
        T_* buf = (T_*)malloc(sizeof(T_) * 6 * N);                                            \
        int64_t* idx = (int64_t*)malloc(sizeof(int64_t) * N);                                 \
        T_ *m = buf, *s = buf + N, *z = buf + 2 * N, *lam = buf + 3 * N, *carry = buf + 4 * N, \
           *next = buf + 5 * N;                                                               \
        for (int64_t i = 0; i < N; i++) carry[i] = 0;                                         \
        if (shared) memset(dA + r * N * N, 0, sizeof(T_) * N * N);                            \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            const T_* At = shared ? A + (r % H) * N * N : A + (r * T + t) * N * N;           \
            T_* dAt = shared ? dA + r * N * N : dA + (r * T + t) * N * N;                     \
            const T_* prev = t > 0 ? h + (r * T + t - 1) * N : h0 + r * N;                    \
            const T_* g = gh + (r * T + t) * N;                                               \
            for (int64_t i = 0; i < N; i++) lam[i] = g[i] + carry[i];                          \
            reduce_##SFX((int)kind, prev, At, N, m, s, z, idx);                               \
            for (int64_t j = 0; j < N; j++) {                                                 \
                const T_ pj = prev[j]; const T_* row = At + j * N; T_* drow = dAt + j * N;    \
                T_ acc = 0;                                                                   \
                for (int64_t i = 0; i < N; i++) {                                             \
                    T_ w;                                                                     \
                    if (kind == 0) w = z[i] == -INFINITY ? 0 : EXPF(pj + row[i] - z[i]);     \
                    else w = idx[i] == j ? 1 : 0;                                             \
                    T_ d = w * lam[i];                                                        \
                    if (shared) drow[i] += d; else drow[i] = d;                               \
                    acc += d;                                                                 \
                }                                                                             \
                next[j] = acc;                                                                \
            }                                                                                 \
            T_* dbt = db + (r * T + t) * N;                                                   \
            for (int64_t i = 0; i < N; i++) { dbt[i] = lam[i]; carry[i] = next[i]; }         \
        }                                                                                     \
        for (int64_t j = 0; j < N; j++) dh0[r * N + j] = carry[j];                            \
        free(buf); free(idx);                                                                 \
    }                                                                                         \
}

DEFINE_DENSE_SEMIRING(float, f32, vexpf, logf)
DEFINE_DENSE_SEMIRING(double, f64, vexp_d, log)
