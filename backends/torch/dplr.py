"""Delta rule with diagonal key-side decay and a rank-one update ("diagonal plus low rank",
DPLR: KDA, RWKV-7, flash-linear-attention's generalised delta rule), chunkwise in pure torch
(differentiable by autograd).

Per row (batch * head), state S [K, V]:
    S_t = (diag(exp(g_t)) + a_t b_tᵀ) S_{t-1} + k_t v_tᵀ,        o_t = S_tᵀ q_t  (inclusive)
KDA     S' = (I - β k kᵀ) diag(e^g) S + β k vᵀ:        a = -β k,      b = k ⊙ e^g,  key β k.
RWKV-7  S' = diag(w) S - (α ⊙ κ)(κᵀ S) + k vᵀ:           a = -(α ⊙ κ),  b = κ,        g = log w.

Chunk form (rows i, j, l = 1..C of one chunk; S_0 the state before it; Γ_i = Σ_{s<=i} g_s
(vector in K), Γ⁻_i = Γ_i - g_i = Γ_{i-1}; E^x_{ij} = exp(x_i - Γ_j) elementwise in K):

    u_i := S_{i-1}ᵀ b_i                                            (what the rank-one term reads)
    S_i  = e^{Γ_i} ⊙ S_0 + Σ_{j<=i} e^{Γ_i-Γ_j} ⊙ (a_j u_jᵀ + k_j v_jᵀ)            (unrolled)
  so, with the four decayed score matrices (C x C, exponents <= 0 where they are used)
    A_qk[i,j] = Σ_K q_i k_j E^Γ_ij   (j <= i)      A_qa[i,j] = Σ_K q_i a_j E^Γ_ij   (j <= i)
    A_bk[i,j] = Σ_K b_i k_j E^Γ⁻_ij  (j <  i)      A_ba[i,j] = Σ_K b_i a_j E^Γ⁻_ij  (j <  i)
  the u's solve a unit lower-triangular system (UT / WY form):
    U = (b ⊙ e^{Γ⁻}) S_0 + A_ba U + A_bk V
    (I - A_ba) [W | Ũ] = [b ⊙ e^{Γ⁻} | A_bk V]     ->  U = W S_0 + Ũ        (solve_triangular)
  and the chunk's readout and end state are affine in S_0:
    O   = (q ⊙ e^{Γ}) S_0 + A_qa U + A_qk V              = Q' S_0 + O'
          Q' = q ⊙ e^{Γ} + A_qa W,        O' = A_qa Ũ + A_qk V
    S_C = e^{Γ_C} ⊙ S_0 + Âᵀ U + K̂ᵀ V                   = M S_0 + H
          Â = a ⊙ e^{Γ_C-Γ},  K̂ = k ⊙ e^{Γ_C-Γ},  M = diag(e^{Γ_C}) + Âᵀ W,  H = Âᵀ Ũ + K̂ᵀ V.
  Across chunks: S_n = M_n S_{n-1} + H_n (a short loop of batched matmuls), then
  O_n = Q'_n S_{n-1} + O'_n for all chunks at once.

Scores without exp(-Γ) (MATH.md §3): the strictly lower part of a C x C score matrix is built
by halving. For a block of rows split into halves P (first) and Q (second), ρ = Γ at the last
row of P, and i in Q, j in P: Γ_i <= Γ⁻_i <= ρ <= Γ_j (g <= 0), so
    Σ_K x_i y_j exp(Γx_i - Γ_j) = (x_i ⊙ exp(Γx_i - ρ)) · (y_j ⊙ exp(ρ - Γ_j))
with both exponents <= 0: one matmul per level. The diagonal sub-blocks recurse down to a
base size where the exact C x C x K contraction (exp(Γx_i - Γ_j), j < i) is used. Each row
is rescaled once per level (log2(C/base) levels), so the cost stays O(C K) elementwise per row
plus the matmuls. Inclusive scores add the diagonal x_i · y_i.
Checked in float64 against `naive_dplr` (tests/backends/test_dplr.py), values and gradients.

Padding of the last chunk: inert steps (g = 0, a = b = k = q = v = 0 give S_t = S_{t-1}).
A log decay below LOG_DECAY_FLOOR is clamped (exp(-80) wipes the state anyway; it keeps the
in-chunk cumulative sums free of cancellation), in `naive_dplr` too.

Layouts: q, k, a, b, g [N, T, K]; v [N, T, V]; S0 [N, K, V]; computes in the input dtype.
"""
from __future__ import annotations

import torch

LOG_DECAY_FLOOR = -80.0   # the same floor as scans.LOG_DECAY_FLOOR
BASE = 8                  # block size below which the decayed scores are contracted exactly


def naive_dplr(q, k, v, a, b, g, S0, chunk: int = 32):
    """The per-step recurrence (the oracle): S_t = (diag(e^{g_t}) + a_t b_tᵀ) S_{t-1} + k_t v_tᵀ,
    o_t = S_tᵀ q_t. `chunk` is ignored (same signature as chunk_dplr)."""
    T = q.shape[1]
    e = torch.exp(g.clamp(min=LOG_DECAY_FLOOR))
    S, outs = S0, []
    for t in range(T):
        u = torch.bmm(b[:, t, None, :], S)                                   # [N, 1, V] = b_tᵀ S
        S = e[:, t, :, None] * S + a[:, t, :, None] * u + k[:, t, :, None] * v[:, t, None, :]
        outs.append(torch.bmm(q[:, t, None, :], S))                          # [N, 1, V]
    o = torch.cat(outs, 1) if outs else v.new_zeros(v.shape)
    return o, S


def _pad_t(x: torch.Tensor, Tp: int) -> torch.Tensor:
    T = x.shape[1]
    if T == Tp:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, Tp - T))


def _intra(X, Y, e):
    """One chunk's decayed scores and the inverse of its triangular system, by halving.

    X [B, C, 2, K]: query rows (q, b); Y [B, C, 2, K]: key rows (k, a); e [B, C, K] = exp(g).
    Returns
      A  [B, 2, 2, C, C]: A[:, p, r, i, j] = Σ_K X[i, p] Y[j, r] exp(Γx_i - Γ_j), Γx = Γ for
         p = 0 (j <= i), Γ⁻ for p = 1 (j < i); 0 above the diagonal,
      Tm [B, C, C] = (I - A[:, 1, 1])^{-1},
      F  [B, C, 2, K] = (exp(Γ_i), exp(Γ⁻_i)),  Rv [B, C, K] = exp(Γ_C - Γ_j).
    Level s merges blocks of s rows in pairs (H after F): for i in H, j in F, with Γ_F the
    cumulative decay at F's last row, exp(Γx_i - Γ_j) = exp(Γx_i - Γ_F) exp(Γ_F - Γ_j), both
    products of step factors e inside H resp. F (forward/backward cumulative products within
    s-blocks, kept per level and grown by the block totals: no exp of a sum, no division)."""
    B, C, P, K = X.shape
    R = Y.shape[2]
    A = X.new_zeros(B, P, R, C, C)
    A[:, 0].diagonal(dim1=-2, dim2=-1).copy_(torch.einsum("bik,birk->bri", X[:, :, 0], Y))
    F = torch.stack([e, torch.ones_like(e)], 2)      # within s-blocks: Π_{t<=i} e_t, Π_{t<i} e_t
    Rv = torch.ones_like(e)                          # within s-blocks: Π_{t>j} e_t
    Tb = X.new_ones(B, C, 1, 1)                      # block-diagonal (I - A_ba)^{-1}, s x s blocks
    s = 1
    while s < C:
        nb = C // (2 * s)
        Fv, Rvv = F.view(B, nb, 2, s, P, K), Rv.view(B, nb, 2, s, K)
        xq = X.view(B, nb, 2, s, P, K)[:, :, 1] * Fv[:, :, 1]                  # rows of H
        yk = Y.view(B, nb, 2, s, R, K)[:, :, 0]                                  # rows of F
        if s > 1:
            yk = yk * Rvv[:, :, 0, :, None]
        off = torch.matmul(xq.reshape(B, nb, s * P, K), yk.reshape(B, nb, s * R, K).transpose(-1, -2))
        off = off.view(B, nb, s, P, s, R)
        dst = A.view(B, P, R, nb, 2, s, nb, 2, s).diagonal(dim1=3, dim2=6)[:, :, :, 1, :, 0]
        dst.copy_(off.permute(0, 3, 5, 2, 4, 1))
        # inverse: [[T0, 0], [T1 A21 T0, T1]]
        Tv = Tb.view(B, nb, 2, s, s)
        T0, T1 = Tv[:, :, 0], Tv[:, :, 1]
        A21 = off[:, :, :, 1, :, 1]
        T21 = A21 if s == 1 else T1 @ A21 @ T0
        Tb = torch.cat([torch.cat([T0, torch.zeros_like(T0)], -1), torch.cat([T21, T1], -1)], -2)
        # grow the cumulative products to 2s-blocks
        F = torch.stack([Fv[:, :, 0], Fv[:, :, 1] * Fv[:, :, 0, -1:, :1]], 2).view(B, C, P, K)
        Rv = torch.stack([Rvv[:, :, 0] * Fv[:, :, 1, -1:, 0], Rvv[:, :, 1]], 2).view(B, C, K)
        s *= 2
    return A, Tb.view(B, C, C), F, Rv


def _chunk_len(chunk: int, T: int) -> int:
    C = int(chunk)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    while C > 1 and C // 2 >= T:              # a short sequence: the smallest chunk that fits
        C //= 2
    return C


def chunk_dplr(q, k, v, a, b, g, S0, chunk: int = 32):
    """Chunkwise DPLR delta rule (see the module docstring for the equations).
    q, k, a, b, g [N, T, K]; v [N, T, V]; S0 [N, K, V] -> (o [N, T, V], S_T [N, K, V]).
    chunk: a power of two (shortened for short sequences)."""
    Nr, T, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return v.new_zeros(Nr, 0, V), S0
    C = _chunk_len(chunk, T)
    n = (T + C - 1) // C
    Tp = n * C
    Bc = Nr * n
    e = torch.exp(_pad_t(g.clamp(min=LOG_DECAY_FLOOR), Tp)).view(Bc, C, K)   # step decays
    X = torch.stack([_pad_t(q, Tp), _pad_t(b, Tp)], 2).view(Bc, C, 2, K)
    Y = torch.stack([_pad_t(k, Tp), _pad_t(a, Tp)], 2).view(Bc, C, 2, K)
    v = _pad_t(v, Tp).view(Bc, C, V)
    A, Tm, F, Rv = _intra(X, Y, e)
    A_qk, A_qa, A_bk = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0]
    XF = X * F                                            # q ⊙ e^Γ, b ⊙ e^{Γ⁻}
    YR = Y * Rv[:, :, None]                               # k ⊙ e^{Γ_C - Γ}, a ⊙ e^{Γ_C - Γ}
    WU = Tm @ torch.cat([XF[:, :, 1], A_bk @ v], -1)      # (I - A_ba)^{-1} [b ⊙ e^{Γ⁻} | A_bk V]
    W, Ut = WU[..., :K], WU[..., K:]                      # U = W S_0 + Ũ
    AhT = YR[:, :, 1].transpose(1, 2)                     # Âᵀ [Bc, K, C]
    Hk = YR[:, :, 0].transpose(1, 2) @ v                  # K̂ᵀ V [Bc, K, V]
    eC = F[:, -1, 0, :, None]                             # e^{Γ_C} [Bc, K, 1]

    W, Ut, AhT, Hk, eC = (x.view(Nr, n, *x.shape[1:]) for x in (W, Ut, AhT, Hk, eC))
    S, prev, Us = S0, [], []
    for c in range(n):
        U = torch.baddbmm(Ut[:, c], W[:, c], S)        # u's of the chunk
        prev.append(S)
        Us.append(U)
        S = torch.baddbmm(torch.addcmul(Hk[:, c], eC[:, c], S), AhT[:, c], U)
    Sp = torch.stack(prev, 1).view(Bc, K, V)          # states before each chunk
    U = torch.stack(Us, 1).view(Bc, C, V)
    o = torch.baddbmm(torch.baddbmm(A_qk @ v, A_qa, U), XF[:, :, 0], Sp)
    return o.view(Nr, Tp, V)[:, :T], S
