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


def _scores(X, LX, Y, G, c0: int):
    """Decayed scores of one chunk, A[.., i, p, j, r] = Σ_K X[.., i, p] Y[.., j, r] exp(LX[.., i, p] - G[.., j])
    for j <= i (p = 0, inclusive) or j < i (p = 1, strict); 0 above. X, LX [B, C, 2, K];
    Y [B, C, R, K]; G [B, C, K] (cumulative, non-increasing; LX_i <= G_j for j < i).
    Blocks of c0 rows on the diagonal: exact contraction; then halving levels s = c0, 2c0, ..
    (C = c0 2^m): rows i in the second half of a 2s-block against rows j in its first half,
    through ρ = G at the first half's last row, with both exponents <= 0, one matmul each."""
    B, C, P, K = X.shape
    R = Y.shape[2]
    A = X.new_zeros(B, C, P, C, R)
    nb = C // c0
    # exact diagonal blocks
    Xb, LXb = X.view(B, nb, c0, P, K), LX.view(B, nb, c0, P, K)
    Yb, Gb = Y.view(B, nb, c0, R, K), G.view(B, nb, c0, K)
    ii = torch.arange(c0, device=X.device)
    keep = torch.stack([ii[None, :] <= ii[:, None], ii[None, :] < ii[:, None]], -1)   # [i, j, P]
    expo = (LXb[:, :, :, None] - Gb[:, :, None, :, None]).masked_fill(~keep[..., None], float("-inf"))
    XE = Xb[:, :, :, None] * torch.exp(expo)                                          # [B, nb, i, j, P, K]
    blk = torch.einsum("bnijpk,bnjrk->bnipjr", XE, Yb)                               # [B, nb, i, P, j, R]
    A.view(B, nb, c0, P, nb, c0, R).diagonal(dim1=1, dim2=4).copy_(blk.permute(0, 2, 3, 4, 5, 1))
    s = c0
    while s < C:
        nb = C // (2 * s)
        Gs = G.view(B, nb, 2, s, K)
        rho = Gs[:, :, 0, -1]                                                            # [B, nb, K]
        xq = X.view(B, nb, 2, s, P, K)[:, :, 1] * torch.exp(LX.view(B, nb, 2, s, P, K)[:, :, 1] - rho[:, :, None, None])
        yk = Y.view(B, nb, 2, s, R, K)[:, :, 0] * torch.exp(rho[:, :, None] - Gs[:, :, 0])[:, :, :, None]
        off = torch.bmm(xq.reshape(B * nb, s * P, K), yk.reshape(B * nb, s * R, K).transpose(1, 2))
        dst = A.view(B, nb, 2, s, P, nb, 2, s, R).diagonal(dim1=1, dim2=5)[:, 1, :, :, 0]  # [B, s, P, s, R, nb]
        dst.copy_(off.view(B, nb, s, P, s, R).permute(0, 2, 3, 4, 5, 1))
        s *= 2
    return A


def _unit_lower_inverse(A, c0: int):
    """(I - A)^{-1} for strictly lower A [B, C, C], C = c0 2^m: on the diagonal c0-blocks
    Σ_{m<c0} A^m (Horner, exact for nilpotent A), then by halving
    [[T0, 0], [T1 A21 T0, T1]] from the inverses T0, T1 of the diagonal halves."""
    B, C, _ = A.shape
    nb = C // c0
    Ad = A.unflatten(1, (nb, c0)).unflatten(3, (nb, c0)).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    eye = torch.eye(c0, dtype=A.dtype, device=A.device)
    Tb = eye.expand(B, nb, c0, c0)
    for _ in range(c0 - 1):
        Tb = eye + Ad @ Tb                                                      # [B, nb, c0, c0]
    s = c0
    while s < C:
        nb = C // (2 * s)
        A21 = A.unflatten(1, (nb, 2, s)).unflatten(4, (nb, 2, s)).diagonal(dim1=1, dim2=4)[:, 1, :, 0]
        A21 = A21.permute(0, 3, 1, 2)                                               # [B, nb, s, s]
        Tv = Tb.reshape(B, nb, 2, s, s)
        T0, T1 = Tv[:, :, 0], Tv[:, :, 1]
        T21 = A21 if s == 1 else T1 @ A21 @ T0
        Tb = torch.cat([torch.cat([T0, torch.zeros_like(T0)], -1), torch.cat([T21, T1], -1)], -2)
        s *= 2
    return Tb[:, 0]


def _split_chunk(chunk: int, T: int) -> tuple[int, int]:
    """(C, c0): the chunk length used (a power-of-two multiple of c0, no longer than T needs)
    and the exact-block size."""
    C = max(1, int(chunk))
    while C % 2 == 0 and C // 2 >= T:         # a short sequence: the smallest such chunk that fits
        C //= 2
    c0 = C
    while c0 % 2 == 0 and c0 > BASE:
        c0 //= 2
    return C, c0


def chunk_dplr(q, k, v, a, b, g, S0, chunk: int = 32):
    """Chunkwise DPLR delta rule (see the module docstring for the equations).
    q, k, a, b, g [N, T, K]; v [N, T, V]; S0 [N, K, V] -> (o [N, T, V], S_T [N, K, V])."""
    Nr, T, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return v.new_zeros(Nr, 0, V), S0
    C, c0 = _split_chunk(chunk, T)
    n = (T + C - 1) // C
    Tp = n * C
    Bc = n * Nr
    g = g.clamp(min=LOG_DECAY_FLOOR)
    # chunk-major layout [n, Nr, C, .], flattened to Bc = n * Nr rows of chunks
    q, k, v, a, b, g = (_pad_t(x, Tp).view(Nr, n, C, -1).transpose(0, 1).reshape(Bc, C, -1)
                        for x in (q, k, v, a, b, g))
    G = g.cumsum(1)                                   # Γ   [Bc, C, K], <= 0
    Gm = G - g                                        # Γ⁻  (exclusive)
    GC = G[:, -1:]                                    # Γ_C [Bc, 1, K]

    # scores: queries (q with Γ, b with Γ⁻) x keys (k, a)
    A = _scores(torch.stack([q, b], 2), torch.stack([G, Gm], 2), torch.stack([k, a], 2), G, c0)
    A_ba, A_bk = A[:, :, 1, :, 1], A[:, :, 1, :, 0]
    Tm = _unit_lower_inverse(A_ba, c0)                    # (I - A_ba)^{-1}
    WU = Tm @ torch.cat([b * torch.exp(Gm), A_bk @ v], -1)
    W, Ut = WU[..., :K], WU[..., K:]                  # U = W S_0 + Ũ
    dec = torch.exp(GC - G)                           # e^{Γ_C - Γ} <= 1
    AhT = (a * dec).transpose(1, 2).contiguous()      # Âᵀ [Bc, K, C]
    Hk = (k * dec).transpose(1, 2) @ v                # K̂ᵀ V [Bc, K, V]
    eC = torch.exp(GC).transpose(1, 2)                # [Bc, K, 1]

    W, Ut, AhT, Hk, eC = (x.view(n, Nr, *x.shape[1:]) for x in (W, Ut, AhT, Hk, eC))
    S, prev, Us = S0, [], []
    for c in range(n):
        U = torch.baddbmm(Ut[c], W[c], S)             # u's of the chunk
        prev.append(S)
        Us.append(U)
        S = torch.baddbmm(torch.addcmul(Hk[c], eC[c], S), AhT[c], U)
    Sp = torch.stack(prev).view(Bc, K, V)             # states before each chunk
    U = torch.stack(Us).view(Bc, C, V)
    Z = torch.stack([v, U], 2).view(Bc, C * 2, V)     # rows (j, r): v_j, u_j
    o = torch.baddbmm(A[:, :, 0].reshape(Bc, C, C * 2) @ Z, q * torch.exp(G), Sp)
    return o.view(n, Nr, C, V).transpose(0, 1).reshape(Nr, Tp, V)[:, :T], S
