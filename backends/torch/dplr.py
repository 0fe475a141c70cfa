"""Delta rule with diagonal key-side decay and a rank-one update ("diagonal plus low rank",
DPLR: KDA, RWKV-7, flash-linear-attention's generalised delta rule), chunkwise in pure torch
(differentiable by autograd).

Per row (batch * head), state S [K, V]:
    S_t = (diag(e^{g_t}) + a_t b_tᵀ) S_{t-1} + k_t v_tᵀ,          o_t = S_tᵀ q_t  (inclusive)
  KDA     S' = (I - β k kᵀ) diag(e^g) S + β k vᵀ:    a = -β k,      b = k ⊙ e^g,  key β k
  RWKV-7  S' = diag(w) S - (α ⊙ κ)(κᵀ S) + k vᵀ:       a = -(α ⊙ κ),  b = κ,        g = log w

Chunk form. Rows i, j = 1..C of one chunk (row vectors, matrices stack them), S_0 the state
before it, Γ_i = Σ_{t<=i} g_t (vector in K), Γ⁻_i = Γ_{i-1}, products ⊙ elementwise in K.
    u_i := S_{i-1}ᵀ b_i                                      (what the rank-one term reads)
    S_i  = e^{Γ_i} ⊙ S_0 + Σ_{j<=i} e^{Γ_i - Γ_j} ⊙ (a_j u_jᵀ + k_j v_jᵀ)        (unrolled)
  Decayed scores, every factor exp(Γx_i - Γ_j) with j before i, so <= 1:
    A_qk[i,j] = Σ_K q_i k_j e^{Γ_i - Γ_j}  (j <= i)     A_qa[i,j] = Σ_K q_i a_j e^{Γ_i - Γ_j}  (j <= i)
    A_bk[i,j] = Σ_K b_i k_j e^{Γ⁻_i - Γ_j} (j <  i)     A_ba[i,j] = Σ_K b_i a_j e^{Γ⁻_i - Γ_j} (j <  i)
  u from the unrolled S_{i-1}: a unit lower-triangular system (the UT / WY form, MATH.md §4)
    U = (b ⊙ e^{Γ⁻}) S_0 + A_ba U + A_bk V
    [W | Ũ] = (I - A_ba)^{-1} [b ⊙ e^{Γ⁻} | A_bk V]        =>  U = W S_0 + Ũ     (one triangular solve)
  readout and end state
    O   = (q ⊙ e^{Γ}) S_0 + A_qa U + A_qk V
    S_C = e^{Γ_C} ⊙ S_0 + Âᵀ U + K̂ᵀ V,      Â = a ⊙ e^{Γ_C - Γ},  K̂ = k ⊙ e^{Γ_C - Γ}
  Across chunks (the loop, T/C steps, batched over rows): U_n = W_n S + Ũ_n,
  S <- e^{Γ_C} ⊙ S + Âᵀ_n U_n + K̂ᵀ_n V_n; the outputs of a group of chunks at once.
  The chunks go in groups of ~GROUP_ROWS rows (all rows, consecutive chunk positions): the
  intra-chunk work of a group stays in cache, then the loop runs over the group's positions.
  (With a = b = 0 this is MATH.md §3; with g scalar, a = -β k, b = k ⊙ e^g it is §4's gated form.)

Scores without exp(-Γ) (MATH.md §3), by halving: level s merges pairs of s-row blocks
F (first), H (second). For i in H, j in F and Γ_F the cumulative decay at F's
last row, e^{Γx_i - Γ_j} = e^{Γx_i - Γ_F} e^{Γ_F - Γ_j}, both <= 1, and these are products of
the step factors e^{g_t} inside H (t <= i, or t < i for Γ⁻) and inside F (t > j). With the
rows kept scaled that way inside their s-blocks the (H, F) block of all four scores is one
matmul; then H's query rows take F's block product and F's key rows take H's, which scales
every row to its 2s-block (log2 C levels; after the last, the rows are q ⊙ e^Γ, b ⊙ e^{Γ⁻},
(k, a) ⊙ e^{Γ_C - Γ}). The only exp is e^{g_t} <= 1 per step; no exp of a cumulative sum, no
division. [W | Ũ] by forward substitution (torch.linalg.solve_triangular; a Neumann product
(I + N)(I + N^2)... loses ~100x precision in float32 on correlated keys with β near 1).
Without gradients the rows are scaled in place and the loop writes into preallocated
buffers; with gradients the same arithmetic runs out of place (autograd through it all).

Causality inside a chunk, forward and backward: a non-finite input at step p must leave the
outputs before p alone, and the gradients that do not pass through step p. The scores only
ever pair a row with earlier rows (the halving above), every product with a triangular
matrix is `scans.causal_mm` (a dense matmul would multiply its zeros by later rows, and
0 * NaN = NaN), and the system is solved rather than inverted: the solve's backward is back
substitution on the cotangents of W and Ũ, exact zeros on rows no loss reads, where the
gradient of an explicit inverse would pair each row's cotangent with every later row of
A_bk V (NaN when a later v is) and carry it back through the inverse's construction.
Checked in float64 against `naive_dplr` (tests/backends/test_dplr.py): values, final state
and gradients of all inputs.

Padding of the last chunk: inert steps (g = 0, a = b = k = q = v = 0 give S_t = S_{t-1}).
A log decay below LOG_DECAY_FLOOR is clamped (e^{-80} wipes the state anyway), in
`naive_dplr` too.

Layouts: q, k, a, b, g [N, T, K]; v [N, T, V]; S0 [N, K, V]; computes in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .scans import causal_mm

LOG_DECAY_FLOOR = -80.0   # the same floor as scans.LOG_DECAY_FLOOR
CHUNK = 32                # the chunk length dplr_stage uses (scans.py); a power of two


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
    return Fn.pad(x, (0, 0, 0, Tp - T))


def _intra(X, Y, e):
    """One chunk's decayed scores, by halving.

    X [B, C, 2, K]: query rows (q, b); Y [B, C, 2, K]: key rows (k, a); e [B, C, K] = exp(g).
    Returns
      A  [B, 2, 2, C, C]: A[:, r, p, i, j] = Σ_K X[i, p] Y[j, r] exp(Γx_i - Γ_j) with Γx = Γ
         for p = 0 (j <= i) and Γ⁻ for p = 1 (j < i); 0 above the diagonal,
      XF [B, C, 2, K] = (q ⊙ e^Γ, b ⊙ e^{Γ⁻}),  YR [B, C, 2, K] = (k, a) ⊙ e^{Γ_C - Γ},
      eC [B, K] = e^{Γ_C}.
    Halving levels as in the module docstring; X and Y are scaled in place when no gradient
    is needed (callers pass fresh tensors)."""
    B, C, P, K = X.shape
    R = Y.shape[2]
    inplace = not (torch.is_grad_enabled() and (X.requires_grad or Y.requires_grad or e.requires_grad))
    A = X.new_zeros(B, R, P, C, C)
    qy = torch.bmm(Y.view(B * C, R, K), X[:, :, 0].reshape(B * C, K, 1))                   # q_i · y_i
    A[:, :, 0].diagonal(dim1=-2, dim2=-1).copy_(qy.view(B, C, R).transpose(1, 2))
    if inplace:
        X[:, :, 0].mul_(e)
    else:
        X = torch.stack([X[:, :, 0] * e, X[:, :, 1]], 2)
    E = e                                            # block totals Π_{t in blk} e_t, [B, C/s, K]
    s = 1
    while s < C:
        nb = C // (2 * s)
        Xv, Yv, Ev = X.view(B * nb, 2, s * P, K), Y.view(B * nb, 2, s * R, K), E.view(B * nb, 2, 1, K)
        off = torch.bmm(Xv[:, 1], Yv[:, 0].transpose(1, 2))                      # H's X rows . F's Y rows
        # rows of H against columns of F, block by block down the diagonal: [B, R, P, nb, s, s]
        dst = A.as_strided((B, R, P, nb, s, s), (R * P * C * C, P * C * C, C * C, 2 * s * (C + 1), C, 1),
                           A.storage_offset() + s * C)
        dst.copy_(off.view(B, nb, s, P, s, R).permute(0, 5, 3, 1, 2, 4))
        # scale to 2s-blocks: H's X rows by F's total, F's Y rows by H's total
        if inplace:
            Xv[:, 1].mul_(Ev[:, 0])
            Yv[:, 0].mul_(Ev[:, 1])
        else:
            X = torch.stack([Xv[:, 0], Xv[:, 1] * Ev[:, 0]], 1).view(B, C, P, K)
            Y = torch.stack([Yv[:, 0] * Ev[:, 1], Yv[:, 1]], 1).view(B, C, R, K)
        E = Ev[:, 0, 0] * Ev[:, 1, 0]
        s *= 2
    return A, X, Y, E.view(B, K)


def _chunk_len(chunk: int, T: int) -> int:
    C = int(chunk)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    while C > 1 and C // 2 >= T:              # a short sequence: the smallest chunk that fits
        C //= 2
    return C


def _chunk_group(X, Y, e, v, S):
    """m consecutive chunks of Nr rows, chunk-major (X [m*Nr, C, 2, K] holds (q, b), Y the
    same for (k, a), e = exp(g), v [m*Nr, C, V]), from the state S [Nr, K, V] before them.
    Returns (o [m*Nr, C, V], the state after them)."""
    Bc, C, _, K = X.shape
    Nr, _, V = S.shape
    m = Bc // Nr
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (X, Y, e, v, S)))
    A, XF, YR, eC = _intra(X, Y, e)                       # XF = (q, b) ⊙ (e^Γ, e^{Γ⁻}), YR = (k, a) ⊙ e^{Γ_C - Γ}
    # products with the triangular scores are causal (module docstring): A_qk V (j <= i), A_bk V (j < i)
    AkV = causal_mm(A[:, 0], v[:, None], (False, True), zeros_above=True)
    # [W | Ũ] = (I - A_ba)^{-1} [b ⊙ e^{Γ⁻} | A_bk V]: U = W S_0 + Ũ (solved, not inverted: module docstring)
    Lm = torch.eye(C, dtype=X.dtype, device=X.device) - A[:, 1, 1]
    W, Ut = torch.linalg.solve_triangular(Lm, torch.cat([XF[:, :, 1], AkV[:, 1]], -1), upper=False,
                                          unitriangular=True).split([K, V], -1)
    AhT = YR[:, :, 1].transpose(1, 2)                     # Âᵀ [Bc, K, C]
    Hk = YR[:, :, 0].transpose(1, 2) @ v                  # K̂ᵀ V [Bc, K, V]
    eC = eC[:, :, None]                                   # e^{Γ_C} [Bc, K, 1]
    per_chunk = zip(*(x.view(m, Nr, *x.shape[1:]).unbind(0) for x in (W, Ut, AhT, Hk, eC)))
    if inplace:                                           # write straight into the stacked buffers
        Sp, U = S.new_empty(m + 1, Nr, K, V), X.new_empty(m, Nr, C, V)
        Sp[0] = S
        Sl, Ul = Sp.unbind(0), U.unbind(0)
        for c, (Wc, Utc, AhTc, Hkc, eCc) in enumerate(per_chunk):
            torch.baddbmm(Utc, Wc, Sl[c], out=Ul[c])     # u's of the chunk
            torch.baddbmm(torch.addcmul(Hkc, eCc, Sl[c]), AhTc, Ul[c], out=Sl[c + 1])
        S, Sp, U = Sl[m], Sp[:m].view(Bc, K, V), U.view(Bc, C, V)
    else:
        prev, Us = [], []
        for Wc, Utc, AhTc, Hkc, eCc in per_chunk:
            Us.append(torch.baddbmm(Utc, Wc, S))
            prev.append(S)
            S = torch.baddbmm(torch.addcmul(Hkc, eCc, S), AhTc, Us[-1])
        Sp, U = torch.stack(prev).view(Bc, K, V), torch.stack(Us).view(Bc, C, V)   # states before each chunk
    o = torch.baddbmm(AkV[:, 0] + causal_mm(A[:, 1, 0], U, zeros_above=True), XF[:, :, 0], Sp)
    return o, S


GROUP_ROWS = 4096   # rows (chunks x chunk length) processed together: the intra-chunk work stays in cache


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
    q, k, v, a, b, g = (_pad_t(x, Tp) for x in (q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR)))
    G = max(1, GROUP_ROWS // (Nr * C))                     # chunk positions per group
    S, outs = S0, []
    # the groups' slices, split once: slicing per group would cost, in the backward, a zero-filled
    # gradient of the whole sequence for every group (O(T^2) for a fixed group size)
    for gq, gk, gv, ga, gb, gg in zip(*(x.split(G * C, 1) for x in (q, k, v, a, b, g))):
        m = gq.shape[1] // C
        cm = lambda x: x.reshape(Nr, m, C, -1).transpose(0, 1)   # [m, Nr, C, .]
        e = torch.exp(cm(gg)).reshape(m * Nr, C, K)        # step decays
        X = torch.stack([cm(gq), cm(gb)], 3).view(m * Nr, C, 2, K)
        Y = torch.stack([cm(gk), cm(ga)], 3).view(m * Nr, C, 2, K)
        o, S = _chunk_group(X, Y, e, cm(gv).reshape(m * Nr, C, V), S)
        outs.append(o.view(m, Nr, C, V).transpose(0, 1))
    return torch.cat(outs, 1).view(Nr, Tp, V)[:, :T], S
