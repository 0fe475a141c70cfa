"""The triton backend's chunkwise kernels for the diagonal-plus-low-rank delta rule (the
ChunkDPLR form: KDA, RWKV-7), forward and backward: the WY/UT form of
backends/torch/dplr.py (its docstring has the derivation), per row (batch * head):

    S_t = (diag(e^{g_t}) + a_t b_tᵀ) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t

Per chunk of BT steps, S_0 the state before it, Γ_i = Σ_{t<=i} g_t (per key, chunk-local,
<= 0), Γ⁻_i = Γ_i - g_i:

    A_qk[i,j] = Σ_K q_i k_j e^{Γ_i - Γ_j}   (j <= i)     A_qa the same with a_j
    A_bk[i,j] = Σ_K b_i k_j e^{Γ⁻_i - Γ_j}  (j <  i)     A_ba the same with a_j
    M = (I - A_ba)⁻¹  (forward substitution)   W = M (b ⊙ e^{Γ⁻})   Ũ = M A_bk V
    U = W S_0 + Ũ                                (u_i = S_{i-1}ᵀ b_i, what the rank-one term reads)
    O = (q ⊙ e^Γ) S_0 + A_qa U + A_qk V
    S_C = e^{Γ_C} ⊙ S_0 + Âᵀ U + K̂ᵀ V,          Â, K̂ = (a, k) ⊙ e^{Γ_C - Γ}

Forward kernels:
  chunk_dplr_cumsum       Γ per chunk (stored; every other kernel loads it), K̂ and Â
  chunk_dplr_fwd_scores   the four scores, one program per (sub-block of BC rows, row): the
                          earlier sub-blocks by tl.dot with the decay split at r = Γ at the
                          row before the sub-block (e^{Γx_i - Γ_j} = e^{Γx_i - r} e^{r - Γ_j},
                          both <= 1), the diagonal sub-block by the exact per-key contraction
                          column by column (chunk_kernels.py's scheme)
  chunk_dplr_fwd_solve    M by forward substitution (row i of M from the rows before it),
                          stored [BH, NT, BT, BT]; program (chunk, row)
  chunk_dplr_fwd_wu       W and Ũ = (M A_bk) V; program (chunk, row)
  chunk_dplr_fwd_states   the pass over chunks, program (V block, row): U_n = W_n S + Ũ_n, the
                          state before every chunk [BH, NT, K, V], S updated, the final state
  chunk_dplr_fwd_output   O per chunk and V block

Backward (Λ_n the gradient of the state after chunk n, dO the outputs' cotangent):
    dU = A_qaᵀ dO + Â Λ_n,      Λ_{n-1} = e^{Γ_C} ⊙ Λ_n + (q ⊙ e^Γ)ᵀ dO + Wᵀ dU
    dR = Mᵀ dU                  (U = R + A_ba U with R = (b ⊙ e^{Γ⁻}) S_0 + A_bk V)
    dV = A_qkᵀ dO + K̂ Λ_n + A_bkᵀ dR
    dA_qk = dO Vᵀ, dA_qa = dO Uᵀ (j <= i);  dA_bk = dR Vᵀ, dA_ba = dR Uᵀ (j < i)
    dq_i = (dO S_0ᵀ)_i ⊙ e^{Γ_i} + Σ_j (dA_qk[i,j] k_j + dA_qa[i,j] a_j) ⊙ e^{Γ_i - Γ_j}
    db_i = (dR S_0ᵀ)_i ⊙ e^{Γ⁻_i} + Σ_j (dA_bk[i,j] k_j + dA_ba[i,j] a_j) ⊙ e^{Γ⁻_i - Γ_j}
    dk_j = (V Λ_nᵀ)_j ⊙ e^{Γ_C - Γ_j}
           + Σ_i (dA_qk[i,j] q_i ⊙ e^{Γ_i - Γ_j} + dA_bk[i,j] b_i ⊙ e^{Γ⁻_i - Γ_j})
    da_j = (U Λ_nᵀ)_j ⊙ e^{Γ_C - Γ_j} + Σ_i (dA_qa[i,j] q_i ⊙ ... + dA_ba[i,j] b_i ⊙ ...)
    dg_t = Σ_{i>=t} (q⊙dq - k⊙dk - a⊙da)_i + Σ_{i>t} (b⊙db)_i + Σ_V Λ_n ⊙ S_C
  (every factor e^{x} of a cumulative x passes x's gradient x-wise: a score's exponent gives
  + to the query row's Γ (or Γ⁻) and - to the key row's Γ, which sums to the products of the
  inputs with their own gradients; the state after the chunk carries e^{Γ_C} on every key row,
  hence the last term for every step.)
  chunk_dplr_bwd_readout  per chunk and V block, the state-free parts of the reverse pass:
                          A_qaᵀ dO and Y_n = (q ⊙ e^Γ)ᵀ dO
  chunk_dplr_bwd_dstates  the reverse pass over chunks (dU and Λ_n of every chunk, dS0),
                          program (V block, row)
  chunk_dplr_bwd_dv       per chunk and V block: dR and dV
  chunk_dplr_bwd_dscores  per chunk, the four score cotangents (masked, stored), in two
                          launches of two each (four [BT, BT] sums at once spill on sm_80)
  chunk_dplr_bwd_rows     dq, db per sub-block of rows (the forward scores' sub-block scheme)
  chunk_dplr_bwd_cols     dk, da per sub-block of key rows (the same, by columns)
  chunk_dplr_bwd_dg       dg by the reverse cumulative sum in the chunk, plus the chunk-end term
Saved by the forward: Γ, K̂, Â, the scores, M, W, U and the state before every chunk. The
scores are stored, not recomputed: the forward writes them to memory anyway (the solve and the
output kernels read them), so keeping them costs memory only (4 BT floats a step and row, four
times q's at BT = K = 64), while recomputing would rerun the sub-block pass with its exact
per-key exponentials on the diagonal sub-blocks. K̂ and Â are written by chunk_dplr_cumsum so
that the passes over chunks hold no decay tiles (with them they spill on sm_90 at K = 64).

Exponents stay <= 0: pairs j <= i only, masked to -inf before the exponential; rows past T
read Γ = 0, so their exponents against a reference r are masked to 0 too (q = b = 0 there),
and no sub-block past T is paired with an earlier one. Non-finite inputs never reach the
kernels (dplr_stage runs torch's chunk form for them: the tile products multiply the
masked pairs too, and 0 * NaN = NaN). Log decays are floored at LOG_DECAY_FLOOR (gradient as
clamp's). bf16 / fp16 inputs are widened to fp32 on the host (the kernels accumulate in the
input dtype: fp32 or fp64). A tl.dot of fp32 tiles runs in TF32 on a GPU, as fla's kernels.
Reverse and cu_seqlens are the runtime's (it flips / splits around the stage)."""
from __future__ import annotations

import torch
import triton

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.dplr import LOG_DECAY_FLOOR
from .launch import Kernels, launcher

SOURCE = r'''
@triton.jit
def _tile(ptr, bh, rows, cols, T, W):
    """The [rows, cols] tile of a contiguous [BH, T, W] tensor at row bh; zeros outside."""
    mask = (rows[:, None] < T) & (rows[:, None] >= 0) & (cols[None, :] < W)
    return tl.load(ptr + bh * T * W + rows[:, None] * W + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_t(ptr, bh, rows, cols, T, W):
    """The same tile transposed, [cols, rows], loaded as such (a tl.dot operand with no
    transpose in registers)."""
    mask = (rows[None, :] < T) & (rows[None, :] >= 0) & (cols[:, None] < W)
    return tl.load(ptr + bh * T * W + rows[None, :] * W + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, bh, rows, cols, T, W, x):
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    tl.store(ptr + bh * T * W + rows[:, None] * W + cols[None, :], x, mask=mask)


@triton.jit
def _row(ptr, bh, t, cols, T, W):
    """Step t of row bh of a contiguous [BH, T, W] tensor; zeros outside [0, T)."""
    steps = t + 0 * cols        # a vector: the interpreter rejects a scalar & vector mask
    mask = (cols < W) & (steps < T) & (steps >= 0)
    return tl.load(ptr + bh * T * W + t * W + cols, mask=mask, other=0.0)


@triton.jit
def _block(ptr, index, r0, c0, BT: tl.constexpr, BC: tl.constexpr):
    """The [BC, BC] block at (r0, c0) of the [BT, BT] matrix `index` of a [.., BT, BT] tensor."""
    at = tl.arange(0, BC)
    return tl.load(ptr + index * BT * BT + (r0 + at)[:, None] * BT + (c0 + at)[None, :])


@triton.jit
def _block_t(ptr, index, r0, c0, BT: tl.constexpr, BC: tl.constexpr):
    """The same block transposed, loaded as such."""
    at = tl.arange(0, BC)
    return tl.load(ptr + index * BT * BT + (r0 + at)[None, :] * BT + (c0 + at)[:, None])


@triton.jit
def _store_block(ptr, index, r0, c0, x, BT: tl.constexpr, BC: tl.constexpr):
    at = tl.arange(0, BC)
    tl.store(ptr + index * BT * BT + (r0 + at)[:, None] * BT + (c0 + at)[None, :], x)


@triton.jit
def _diagonal_blocks(ptr, base, at0, BT: tl.constexpr, BC: tl.constexpr):
    """The [BC, BC] blocks at (at0, at0) of the four matrices base .. base + 3 (qk, qa, bk, ba)."""
    return (_block(ptr, base + 0, at0, at0, BT, BC), _block(ptr, base + 1, at0, at0, BT, BC),
            _block(ptr, base + 2, at0, at0, BT, BC), _block(ptr, base + 3, at0, at0, BT, BC))


@triton.jit
def _square(ptr, index, BT: tl.constexpr):
    return _block(ptr, index, 0, 0, BT, BT)


@triton.jit
def _square_t(ptr, index, BT: tl.constexpr):
    return _block_t(ptr, index, 0, 0, BT, BT)


@triton.jit
def _state_tile(ptr, index, keys, vals, K, V):
    """The [K, V] state `index` of a contiguous [.., K, V] tensor, as a [BK, BV] tile."""
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    return tl.load(ptr + index * K * V + keys[:, None] * V + vals[None, :], mask=mask, other=0.0)


@triton.jit
def _state_tile_t(ptr, index, keys, vals, K, V):
    """The state tile transposed, [vals, keys], loaded as such."""
    mask = (keys[None, :] < K) & (vals[:, None] < V)
    return tl.load(ptr + index * K * V + keys[None, :] * V + vals[:, None], mask=mask, other=0.0)


@triton.jit
def _store_state(ptr, index, keys, vals, K, V, x):
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    tl.store(ptr + index * K * V + keys[:, None] * V + vals[None, :], x, mask=mask)


@triton.jit
def _chunk_end(n, T, BT: tl.constexpr):
    """The last step of chunk n (the last chunk may be short)."""
    return tl.minimum(n * BT + BT, T) - 1


@triton.jit
def _sub_blocks_in(n, T, BT: tl.constexpr, BC: tl.constexpr):
    """How many sub-blocks of chunk n hold steps: no loop pairs a sub-block past T (whose
    reference r would read Γ = 0 and not bound the exponents) with another."""
    return tl.minimum(BT // BC, tl.cdiv(T - n * BT, BC))


@triton.jit
def _decays_at(g, gcum, bh, rows, keys, T, K):
    """(Γ, Γ⁻ = Γ - g) of the rows, zeros past T."""
    cum = _tile(gcum, bh, rows, keys, T, K)
    return cum, cum - _tile(g, bh, rows, keys, T, K)


@triton.jit
def _to_reference(x, exponent, r, live):
    """x ⊙ e^{exponent - r} on the live rows (exponent - r <= 0 there); rows past T (x = 0,
    exponent 0) get the factor 1, not e^{-r}, which could overflow (inf * 0 = NaN)."""
    return x * tl.exp(tl.where(live[:, None], exponent - r[None, :], 0.0))


@triton.jit
def chunk_dplr_cumsum(k, a, g, gcum, k_end, a_end, T, K, BT: tl.constexpr, BK: tl.constexpr):
    """Γ, the inclusive cumulative sum of g inside each chunk, and the keys decayed to the
    chunk's end, K̂ = k ⊙ e^{Γ_C - Γ}, Â = a ⊙ e^{Γ_C - Γ} (k_end, a_end: what the passes over
    chunks read, so that they hold no decay tiles). Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    cum = tl.cumsum(_tile(g, bh, rows, keys, T, K), 0)
    _store_tile(gcum, bh, rows, keys, T, K, cum)
    cum_end = tl.sum(tl.where((rows == _chunk_end(n, T, BT))[:, None], cum, 0.0), 0)
    to_end = tl.exp(cum_end[None, :] - cum)      # <= 1 (rows past T: Γ = 0 and k = a = 0)
    _store_tile(k_end, bh, rows, keys, T, K, _tile(k, bh, rows, keys, T, K) * to_end)
    _store_tile(a_end, bh, rows, keys, T, K, _tile(a, bh, rows, keys, T, K) * to_end)


@triton.jit
def chunk_dplr_fwd_scores(q, k, a, b, g, gcum, scores, T, K, NT,
                          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The rows of one sub-block of the four scores (scores [BH, NT, 4, BT, BT]: A_qk, A_qa,
    A_bk, A_ba; the blocks above the diagonal are left as the caller's zeros).
    Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    n, ib = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    live = rows < T
    keys = tl.arange(0, BK)
    base = (bh * NT + n) * 4
    q_i, b_i = _tile(q, bh, rows, keys, T, K), _tile(b, bh, rows, keys, T, K)
    cum_i, prev_i = _decays_at(g, gcum, bh, rows, keys, T, K)
    # the chunk's earlier sub-blocks: every pair below the diagonal, the decay split at r
    r = _row(gcum, bh, row0 - 1, keys, T, K) * (ib > 0)
    q_r, b_r = _to_reference(q_i, cum_i, r, live), _to_reference(b_i, prev_i, r, live)
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, T, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        from_r = tl.exp(r[:, None] - _tile_t(gcum, bh, cols, keys, T, K))        # e^{r - Γ_j} <= 1, [BK, BC]
        k_r, a_r = _tile_t(k, bh, cols, keys, T, K) * from_r, _tile_t(a, bh, cols, keys, T, K) * from_r
        _store_block(scores, base + 0, ib * BC, jb * BC, tl.dot(q_r, k_r), BT, BC)
        _store_block(scores, base + 1, ib * BC, jb * BC, tl.dot(q_r, a_r), BT, BC)
        _store_block(scores, base + 2, ib * BC, jb * BC, tl.dot(b_r, k_r), BT, BC)
        _store_block(scores, base + 3, ib * BC, jb * BC, tl.dot(b_r, a_r), BT, BC)
    # the diagonal sub-block, column by column with the exact per-key exponents
    at = tl.arange(0, BC)
    qk = tl.zeros([BC, BC], dtype=cum_i.dtype)
    qa = tl.zeros([BC, BC], dtype=cum_i.dtype)
    bk = tl.zeros([BC, BC], dtype=cum_i.dtype)
    ba = tl.zeros([BC, BC], dtype=cum_i.dtype)
    for jj in range(0, BC):
        col = row0 + jj
        cum_j = _row(gcum, bh, col, keys, T, K)
        k_j, a_j = _row(k, bh, col, keys, T, K), _row(a, bh, col, keys, T, K)
        incl = tl.exp(tl.where(((rows >= col) & live)[:, None], cum_i - cum_j[None, :], float("-inf")))
        strict = tl.exp(tl.where(((rows > col) & live)[:, None], prev_i - cum_j[None, :], float("-inf")))
        pick = at[None, :] == jj
        qk = tl.where(pick, tl.sum(q_i * k_j[None, :] * incl, 1)[:, None], qk)
        qa = tl.where(pick, tl.sum(q_i * a_j[None, :] * incl, 1)[:, None], qa)
        bk = tl.where(pick, tl.sum(b_i * k_j[None, :] * strict, 1)[:, None], bk)
        ba = tl.where(pick, tl.sum(b_i * a_j[None, :] * strict, 1)[:, None], ba)
    _store_block(scores, base + 0, ib * BC, ib * BC, qk, BT, BC)
    _store_block(scores, base + 1, ib * BC, ib * BC, qa, BT, BC)
    _store_block(scores, base + 2, ib * BC, ib * BC, bk, BT, BC)
    _store_block(scores, base + 3, ib * BC, ib * BC, ba, BT, BC)


@triton.jit
def chunk_dplr_fwd_solve(scores, solve, NT, BT: tl.constexpr):
    """M = (I - A_ba)⁻¹ (solve [BH, NT, BT, BT]) by forward substitution over the chunk's
    rows. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    at = tl.arange(0, BT)
    ba_t = _square_t(scores, (bh * NT + n) * 4 + 3, BT)
    # row i of M is e_i + Σ_{j<i} A_ba[i,j] M_j: only earlier rows, and rows j >= i of M are
    # still those of I, which A_ba[i,j] = 0 leaves out
    inverse = tl.where(at[:, None] == at[None, :], 1.0, 0.0).to(ba_t.dtype)
    for i in range(1, BT):
        ba_i = tl.sum(tl.where(at[None, :] == i, ba_t, 0.0), 1)          # A_ba[i, j] along j (axis 0)
        row = tl.where(at == i, 1.0, 0.0) + tl.sum(ba_i[:, None] * inverse, 0)
        inverse = tl.where(at[:, None] == i, row[None, :], inverse)
    tl.store(solve + (bh * NT + n) * BT * BT + at[:, None] * BT + at[None, :], inverse)


@triton.jit
def chunk_dplr_fwd_wu(v, b, g, gcum, scores, solve, w, u_tilde, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """W = M (b ⊙ e^{Γ⁻}) and Ũ = (M A_bk) V. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    inverse = _square(solve, bh * NT + n, BT)
    _, prev = _decays_at(g, gcum, bh, rows, keys, T, K)
    _store_tile(w, bh, rows, keys, T, K, tl.dot(inverse, _tile(b, bh, rows, keys, T, K) * tl.exp(prev)))
    to_values = tl.dot(inverse, _square(scores, (bh * NT + n) * 4 + 2, BT))           # M A_bk
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        _store_tile(u_tilde, bh, rows, vals, T, V, tl.dot(to_values, _tile(v, bh, rows, vals, T, V)))


@triton.jit
def chunk_dplr_fwd_states(k_end, a_end, v, gcum, w, u_tilde, S0, states, u, ST, T, K, V, NT,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The pass over chunks: the state before every chunk (states [BH, NT, K, V]), U_n =
    W_n S + Ũ_n and the final state. Program (V block, row): the columns of a V block evolve
    independently (U's columns read S's columns only)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, bh, keys, vals, K, V)
    for n in range(NT):
        _store_state(states, bh * NT + n, keys, vals, K, V, S)
        rows = n * BT + tl.arange(0, BT)
        u_n = _tile(u_tilde, bh, rows, vals, T, V) + tl.dot(_tile(w, bh, rows, keys, T, K), S)
        _store_tile(u, bh, rows, vals, T, V, u_n)
        cum_end = _row(gcum, bh, _chunk_end(n, T, BT), keys, T, K)
        S = S * tl.exp(cum_end)[:, None] + tl.dot(_tile_t(a_end, bh, rows, keys, T, K), u_n) \
            + tl.dot(_tile_t(k_end, bh, rows, keys, T, K), _tile(v, bh, rows, vals, T, V))
    _store_state(ST, bh, keys, vals, K, V, S)


@triton.jit
def chunk_dplr_fwd_output(q, v, gcum, scores, states, u, o, T, K, V, NT,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """O = (q ⊙ e^Γ) S_0 + A_qa U + A_qk V for one chunk and V block. Program (chunk, row, V block)."""
    n, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    base = (bh * NT + n) * 4
    q_e = _tile(q, bh, rows, keys, T, K) * tl.exp(_tile(gcum, bh, rows, keys, T, K))
    out = tl.dot(q_e, _state_tile(states, bh * NT + n, keys, vals, K, V))
    out += tl.dot(_square(scores, base + 1, BT), _tile(u, bh, rows, vals, T, V))
    out += tl.dot(_square(scores, base + 0, BT), _tile(v, bh, rows, vals, T, V))
    _store_tile(o, bh, rows, vals, T, V, out)

@triton.jit
def chunk_dplr_bwd_readout(q, gcum, scores, do, ystates, du, T, K, V, NT,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The readout's parts of the reverse pass, which need no state: Y_n = (q ⊙ e^Γ)ᵀ dO
    (ystates [BH, NT, K, V]) and A_qaᵀ dO (into du, to which the pass adds its state term).
    Program (chunk, row, V block)."""
    n, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    do_n = _tile(do, bh, rows, vals, T, V)
    q_e = _tile_t(q, bh, rows, keys, T, K) * tl.exp(_tile_t(gcum, bh, rows, keys, T, K))    # [BK, BT]
    _store_state(ystates, bh * NT + n, keys, vals, K, V, tl.dot(q_e, do_n))
    _store_tile(du, bh, rows, vals, T, V, tl.dot(_square_t(scores, (bh * NT + n) * 4 + 1, BT), do_n))


@triton.jit
def chunk_dplr_bwd_dstates(a_end, gcum, w, ystates, dST, dstates, du, dS0, T, K, V, NT,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr):
    """The reverse pass over chunks: Λ_n, the gradient of the state after chunk n (dstates
    [BH, NT, K, V]), dU = A_qaᵀ dO + Â Λ_n (du: its first term is there) and dS0, by
    Λ_{n-1} = e^{Γ_C} ⊙ Λ_n + Y_n + Wᵀ dU. Program (V block, row)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    if HAS_DST:
        lam = _state_tile(dST, bh, keys, vals, K, V)
    else:
        lam = tl.zeros([BK, BV], dtype=dS0.dtype.element_ty)
    for back in range(NT):
        n = NT - 1 - back
        _store_state(dstates, bh * NT + n, keys, vals, K, V, lam)
        rows = n * BT + tl.arange(0, BT)
        cum_end = _row(gcum, bh, _chunk_end(n, T, BT), keys, T, K)
        d_u = _tile(du, bh, rows, vals, T, V) + tl.dot(_tile(a_end, bh, rows, keys, T, K), lam)
        _store_tile(du, bh, rows, vals, T, V, d_u)
        lam = lam * tl.exp(cum_end)[:, None] + _state_tile(ystates, bh * NT + n, keys, vals, K, V) \
            + tl.dot(_tile_t(w, bh, rows, keys, T, K), d_u)
    _store_state(dS0, bh, keys, vals, K, V, lam)


@triton.jit
def chunk_dplr_bwd_dv(k_end, scores, solve, do, du, dstates, dr, dv, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dR = Mᵀ dU and dV = A_qkᵀ dO + K̂ Λ_n + A_bkᵀ dR for one chunk and V block.
    Program (chunk, row, V block)."""
    n, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    base = (bh * NT + n) * 4
    d_r = tl.dot(_square_t(solve, bh * NT + n, BT), _tile(du, bh, rows, vals, T, V))
    _store_tile(dr, bh, rows, vals, T, V, d_r)
    d_v = tl.dot(_square_t(scores, base + 0, BT), _tile(do, bh, rows, vals, T, V)) \
        + tl.dot(_tile(k_end, bh, rows, keys, T, K), _state_tile(dstates, bh * NT + n, keys, vals, K, V)) \
        + tl.dot(_square_t(scores, base + 2, BT), d_r)
    _store_tile(dv, bh, rows, vals, T, V, d_v)


@triton.jit
def chunk_dplr_bwd_dscores(v, u, do, dr, d_scores, T, V, NT, BT: tl.constexpr, BV: tl.constexpr,
                           FROM_R: tl.constexpr):
    """Two of the scores' cotangents (d_scores [BH, NT, 4, BT, BT]): dA_qk = dO Vᵀ and dA_qa =
    dO Uᵀ (j <= i), or with FROM_R dA_bk = dR Vᵀ and dA_ba = dR Uᵀ (j < i); zero elsewhere
    (two launches: four [BT, BT] sums at once spill). Program (chunk, row); the V blocks
    summed in a loop."""
    n, bh = tl.program_id(0), tl.program_id(1)
    at = tl.arange(0, BT)
    rows = n * BT + at
    with_v = tl.zeros([BT, BT], dtype=d_scores.dtype.element_ty)
    with_u = tl.zeros([BT, BT], dtype=d_scores.dtype.element_ty)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        if FROM_R:
            left = _tile(dr, bh, rows, vals, T, V)
        else:
            left = _tile(do, bh, rows, vals, T, V)
        with_v += tl.dot(left, _tile_t(v, bh, rows, vals, T, V))
        with_u += tl.dot(left, _tile_t(u, bh, rows, vals, T, V))
    seen = at[None, :] <= at[:, None] - FROM_R          # j <= i, or j < i
    base = (bh * NT + n) * 4 + 2 * FROM_R
    _store_block(d_scores, base + 0, 0, 0, tl.where(seen, with_v, 0.0), BT, BT)
    _store_block(d_scores, base + 1, 0, 0, tl.where(seen, with_u, 0.0), BT, BT)


@triton.jit
def chunk_dplr_bwd_rows(k, a, g, gcum, states, do, dr, d_scores, dq, db, T, K, V, NT,
                        BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, db for one sub-block of rows i: the state's (dO S_0ᵀ) ⊙ e^{Γ_i}, (dR S_0ᵀ) ⊙ e^{Γ⁻_i},
    and the scores' Σ_j (dA[i,j] (k_j, a_j)) ⊙ e^{Γx_i - Γ_j}: earlier sub-blocks by tl.dot
    through r, the diagonal one column by column. Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    n, ib = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    live = rows < T
    keys = tl.arange(0, BK)
    base = (bh * NT + n) * 4
    cum_i, prev_i = _decays_at(g, gcum, bh, rows, keys, T, K)
    from_q = tl.zeros([BC, BK], dtype=cum_i.dtype)
    from_b = tl.zeros([BC, BK], dtype=cum_i.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        S_t = _state_tile_t(states, bh * NT + n, keys, vals, K, V)
        from_q += tl.dot(_tile(do, bh, rows, vals, T, V), S_t)
        from_b += tl.dot(_tile(dr, bh, rows, vals, T, V), S_t)
    d_q = from_q * tl.exp(cum_i)
    d_b = from_b * tl.exp(prev_i)
    r = _row(gcum, bh, row0 - 1, keys, T, K) * (ib > 0)
    below_q = tl.zeros([BC, BK], dtype=cum_i.dtype)     # still times e^{-(Γx_i - r)}
    below_b = tl.zeros([BC, BK], dtype=cum_i.dtype)
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, T, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        from_r = tl.exp(r[None, :] - _tile(gcum, bh, cols, keys, T, K))
        k_r, a_r = _tile(k, bh, cols, keys, T, K) * from_r, _tile(a, bh, cols, keys, T, K) * from_r
        below_q += tl.dot(_block(d_scores, base + 0, ib * BC, jb * BC, BT, BC), k_r) \
            + tl.dot(_block(d_scores, base + 1, ib * BC, jb * BC, BT, BC), a_r)
        below_b += tl.dot(_block(d_scores, base + 2, ib * BC, jb * BC, BT, BC), k_r) \
            + tl.dot(_block(d_scores, base + 3, ib * BC, jb * BC, BT, BC), a_r)
    d_q += _to_reference(below_q, cum_i, r, live)
    d_b += _to_reference(below_b, prev_i, r, live)
    # the diagonal sub-block, column by column with the exact exponents
    at = tl.arange(0, BC)
    d_qk, d_qa, d_bk, d_ba = _diagonal_blocks(d_scores, base, ib * BC, BT, BC)
    for jj in range(0, BC):
        col = row0 + jj
        cum_j = _row(gcum, bh, col, keys, T, K)
        k_j, a_j = _row(k, bh, col, keys, T, K), _row(a, bh, col, keys, T, K)
        incl = tl.exp(tl.where(((rows >= col) & live)[:, None], cum_i - cum_j[None, :], float("-inf")))
        strict = tl.exp(tl.where(((rows > col) & live)[:, None], prev_i - cum_j[None, :], float("-inf")))
        pick = at[None, :] == jj
        c_qk, c_qa = tl.sum(tl.where(pick, d_qk, 0.0), 1), tl.sum(tl.where(pick, d_qa, 0.0), 1)
        c_bk, c_ba = tl.sum(tl.where(pick, d_bk, 0.0), 1), tl.sum(tl.where(pick, d_ba, 0.0), 1)
        d_q += (c_qk[:, None] * k_j[None, :] + c_qa[:, None] * a_j[None, :]) * incl
        d_b += (c_bk[:, None] * k_j[None, :] + c_ba[:, None] * a_j[None, :]) * strict
    _store_tile(dq, bh, rows, keys, T, K, d_q)
    _store_tile(db, bh, rows, keys, T, K, d_b)


@triton.jit
def chunk_dplr_bwd_cols(q, b, g, gcum, v, u, dstates, d_scores, dk, da, T, K, V, NT,
                        BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dk, da for one sub-block of key rows j: the state's (V Λ_nᵀ, U Λ_nᵀ) ⊙ e^{Γ_C - Γ_j},
    and the scores' Σ_i dA[i,j] (q_i ⊙ e^{Γ_i - Γ_j}, b_i ⊙ e^{Γ⁻_i - Γ_j}): later
    sub-blocks by tl.dot through their r, the diagonal one row by row. Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    n, jb = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + jb * BC
    cols = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    base = (bh * NT + n) * 4
    cum_j = _tile(gcum, bh, cols, keys, T, K)
    cum_end = _row(gcum, bh, _chunk_end(n, T, BT), keys, T, K)
    from_v = tl.zeros([BC, BK], dtype=cum_j.dtype)
    from_u = tl.zeros([BC, BK], dtype=cum_j.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        lam_t = _state_tile_t(dstates, bh * NT + n, keys, vals, K, V)
        from_v += tl.dot(_tile(v, bh, cols, vals, T, V), lam_t)
        from_u += tl.dot(_tile(u, bh, cols, vals, T, V), lam_t)
    to_end = tl.exp(cum_end[None, :] - cum_j)       # cols past T: Γ = 0 and no v, u
    d_k = from_v * to_end
    d_a = from_u * to_end
    for ib in range(jb + 1, _sub_blocks_in(n, T, BT, BC)):
        row_start = n * BT + ib * BC
        rows = row_start + tl.arange(0, BC)
        live = rows < T
        r = _row(gcum, bh, row_start - 1, keys, T, K)
        cum_i, prev_i = _decays_at(g, gcum, bh, rows, keys, T, K)
        q_r = _to_reference(_tile(q, bh, rows, keys, T, K), cum_i, r, live)
        b_r = _to_reference(_tile(b, bh, rows, keys, T, K), prev_i, r, live)
        from_r = tl.exp(r[None, :] - cum_j)
        d_k += (tl.dot(_block_t(d_scores, base + 0, ib * BC, jb * BC, BT, BC), q_r)
                + tl.dot(_block_t(d_scores, base + 2, ib * BC, jb * BC, BT, BC), b_r)) * from_r
        d_a += (tl.dot(_block_t(d_scores, base + 1, ib * BC, jb * BC, BT, BC), q_r)
                + tl.dot(_block_t(d_scores, base + 3, ib * BC, jb * BC, BT, BC), b_r)) * from_r
    # the diagonal sub-block (rows i and key rows j the same steps), row by row
    at = tl.arange(0, BC)
    d_qk, d_qa, d_bk, d_ba = _diagonal_blocks(d_scores, base, jb * BC, BT, BC)
    for ii in range(0, BC):
        row = row0 + ii
        row_live = (cols * 0 + row) < T
        cum_r = _row(gcum, bh, row, keys, T, K)
        prev_r = cum_r - _row(g, bh, row, keys, T, K)
        q_row, b_row = _row(q, bh, row, keys, T, K), _row(b, bh, row, keys, T, K)
        incl = tl.exp(tl.where(((cols <= row) & row_live)[:, None], cum_r[None, :] - cum_j, float("-inf")))
        strict = tl.exp(tl.where(((cols < row) & row_live)[:, None], prev_r[None, :] - cum_j, float("-inf")))
        pick = at[:, None] == ii
        r_qk, r_qa = tl.sum(tl.where(pick, d_qk, 0.0), 0), tl.sum(tl.where(pick, d_qa, 0.0), 0)
        r_bk, r_ba = tl.sum(tl.where(pick, d_bk, 0.0), 0), tl.sum(tl.where(pick, d_ba, 0.0), 0)
        d_k += r_qk[:, None] * q_row[None, :] * incl + r_bk[:, None] * b_row[None, :] * strict
        d_a += r_qa[:, None] * q_row[None, :] * incl + r_ba[:, None] * b_row[None, :] * strict
    _store_tile(dk, bh, cols, keys, T, K, d_k)
    _store_tile(da, bh, cols, keys, T, K, d_a)


@triton.jit
def chunk_dplr_bwd_dg(q, k, a, b, dq, dk, da, db, states, ST, dstates, dg, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dg_t = Σ_{i>=t} (q⊙dq - k⊙dk - a⊙da)_i + Σ_{i>t} (b⊙db)_i + Σ_V Λ_n ⊙ S_C (module
    docstring); S_C the state after the chunk (the next one's, or the final state).
    Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    x = _tile(q, bh, rows, keys, T, K) * _tile(dq, bh, rows, keys, T, K) \
        - _tile(k, bh, rows, keys, T, K) * _tile(dk, bh, rows, keys, T, K) \
        - _tile(a, bh, rows, keys, T, K) * _tile(da, bh, rows, keys, T, K)
    y = _tile(b, bh, rows, keys, T, K) * _tile(db, bh, rows, keys, T, K)
    grad = tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x + tl.sum(y, 0)[None, :] - tl.cumsum(y, 0)
    end = tl.zeros([BK], dtype=grad.dtype)
    last = n + 1 == NT
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        kv = keys[:, None] * V + vals[None, :]
        is_last = kv * 0 + last                      # a tile (see _row)
        mask = (keys[:, None] < K) & (vals[None, :] < V)
        after = (tl.load(states + (bh * NT + n + 1) * K * V + kv, mask=mask & (is_last == 0), other=0.0)
                 + tl.load(ST + bh * K * V + kv, mask=mask & (is_last != 0), other=0.0))
        end += tl.sum(_state_tile(dstates, bh * NT + n, keys, vals, K, V) * after, 1)
    _store_tile(dg, bh, rows, keys, T, K, grad + end[None, :])

'''

SUB_BLOCK = 16      # BC: rows of the exact diagonal contraction; tl.dot's smallest side
MAX_BV = 32         # V blocks: the state passes run one program per V block; the others loop over them

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-dplr")

# (num_warps, num_stages) per kernel on a GPU (tests/triton/test_chunk_dplr.py compiles
# them at K = V = 64 and 128: no spills).
LAUNCH = {name: (8, 1) for name in (
    "chunk_dplr_cumsum", "chunk_dplr_fwd_scores", "chunk_dplr_fwd_solve", "chunk_dplr_fwd_wu",
    "chunk_dplr_fwd_states", "chunk_dplr_fwd_output", "chunk_dplr_bwd_readout", "chunk_dplr_bwd_dstates",
    "chunk_dplr_bwd_dv", "chunk_dplr_bwd_dscores", "chunk_dplr_bwd_rows", "chunk_dplr_bwd_cols",
    "chunk_dplr_bwd_dg")}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's options on a GPU."""
    return launcher(ns, device, lambda name: dict(zip(("num_warps", "num_stages"), LAUNCH[name])))


def chunk_size(device, K: int, T: int | None = None) -> int:
    """BT: 64 on a GPU up to K = 64, 32 above ([BT, K] tiles with the state's columns); 32
    in the interpreter (two sub-blocks of 16: the factored pairs run, and the tests' short
    sequences still cross chunks); never more than T rounded up to a power of two (>= the
    sub-block): a short sequence wastes no padded rows."""
    BT = (64 if K <= 64 else 32) if device.type == "cuda" else 32
    return BT if T is None else min(BT, max(SUB_BLOCK, triton.next_power_of_2(T)))


def _blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): all keys in one tile; V blocks of 32 columns, 16 from K = 128 on."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV if BK <= 64 else MAX_BV // 2)


def _geometry(k, v, BT):
    BH, T, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    return BH, T, K, V, triton.cdiv(T, BT), BK, BV


def _forward(launch, q, k, v, a, b, g, S0, BT):
    """(o, S_T, saved) on contiguous [BH, T, .] tensors of one dtype, g already floored;
    saved: what the backward reads (Γ, K̂, Â, the scores, M, W, U and the state before every chunk)."""
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    blocks = dict(BT=BT, BK=BK, BV=BV)
    gcum, k_end, a_end = torch.empty_like(g), torch.empty_like(k), torch.empty_like(a)
    launch("chunk_dplr_cumsum", (NT, BH))(k, a, g, gcum, k_end, a_end, T, K, BT=BT, BK=BK)
    scores = k.new_zeros(BH, NT, 4, BT, BT)       # the blocks above the diagonal stay zero
    launch("chunk_dplr_fwd_scores", (NT * (BT // SUB_BLOCK), BH))(q, k, a, b, g, gcum, scores, T, K, NT,
                                                                  BT=BT, BC=SUB_BLOCK, BK=BK)
    solve, w, u_tilde = k.new_empty(BH, NT, BT, BT), torch.empty_like(k), torch.empty_like(v)
    launch("chunk_dplr_fwd_solve", (NT, BH))(scores, solve, NT, BT=BT)
    launch("chunk_dplr_fwd_wu", (NT, BH))(v, b, g, gcum, scores, solve, w, u_tilde, T, K, V, NT, **blocks)
    states, u, ST = k.new_empty(BH, NT, K, V), torch.empty_like(v), k.new_empty(BH, K, V)
    launch("chunk_dplr_fwd_states", (triton.cdiv(V, BV), BH))(k_end, a_end, v, gcum, w, u_tilde, S0, states, u, ST,
                                                              T, K, V, NT, **blocks)
    o = torch.empty_like(v)
    launch("chunk_dplr_fwd_output", (NT, BH, triton.cdiv(V, BV)))(q, v, gcum, scores, states, u, o, T, K, V, NT,
                                                                  **blocks)
    return o, ST, (gcum, k_end, a_end, scores, solve, w, u, states)


def _backward(launch, q, k, v, a, b, g, saved, do, dST, BT):
    """(dq, dk, dv, da, db, dg, dS0) of _forward; do None: the output unread (zeros), dST None:
    the final state unread. In order: the reverse pass (Λ, dU, dS0), per chunk dR and dV, the
    scores' cotangents, dq and db by rows, dk and da by key rows, dg."""
    gcum, k_end, a_end, scores, solve, w, u, states, ST = saved
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    blocks = dict(BT=BT, BK=BK, BV=BV)
    v_blocks = triton.cdiv(V, BV)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    ystates, du = torch.empty_like(states), torch.empty_like(v)
    launch("chunk_dplr_bwd_readout", (NT, BH, v_blocks))(q, gcum, scores, do, ystates, du, T, K, V, NT, **blocks)
    dstates, dS0 = torch.empty_like(states), k.new_empty(BH, K, V)
    launch("chunk_dplr_bwd_dstates", (v_blocks, BH))(a_end, gcum, w, ystates, dS0 if dST is None else dST.contiguous(),
                                                     dstates, du, dS0, T, K, V, NT, HAS_DST=dST is not None, **blocks)
    dr, dv = torch.empty_like(v), torch.empty_like(v)
    launch("chunk_dplr_bwd_dv", (NT, BH, v_blocks))(k_end, scores, solve, do, du, dstates, dr, dv, T, K, V, NT,
                                                    **blocks)
    d_scores = torch.empty_like(scores)
    for from_r in (0, 1):
        launch("chunk_dplr_bwd_dscores", (NT, BH))(v, u, do, dr, d_scores, T, V, NT, BT=BT, BV=BV, FROM_R=from_r)
    sub_grid = (NT * (BT // SUB_BLOCK), BH)
    dq, db, dk, da, dg = (torch.empty_like(k) for _ in range(5))
    launch("chunk_dplr_bwd_rows", sub_grid)(k, a, g, gcum, states, do, dr, d_scores, dq, db, T, K, V, NT,
                                            BC=SUB_BLOCK, **blocks)
    launch("chunk_dplr_bwd_cols", sub_grid)(q, b, g, gcum, v, u, dstates, d_scores, dk, da, T, K, V, NT,
                                            BC=SUB_BLOCK, **blocks)
    launch("chunk_dplr_bwd_dg", (NT, BH))(q, k, a, b, dq, dk, da, db, states, ST, dstates, dg, T, K, V, NT, **blocks)
    return dq, dk, dv, da, db, dg, dS0


class ChunkDPLRFunction(torch.autograd.Function):
    """chunk_dplr on the Triton kernels: saves the inputs and the forward's chunk values;
    the backward runs the adjoint kernels. Under create_graph=True the backward
    differentiates the torch chunk form instead (second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, S0):
        BT = chunk_size(k.device, k.shape[-1], k.shape[1])
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        o, ST, saved = _forward(launch, q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR), S0, BT)
        ctx.set_materialize_grads(False)
        ctx.BT = BT
        ctx.save_for_backward(q, k, v, a, b, g, S0, *saved, ST)
        return o, ST

    @staticmethod
    def backward(ctx, do, dST):
        q, k, v, a, b, g, S0, *saved = ctx.saved_tensors
        inputs = (q, k, v, a, b, g, S0)
        if wants_graph(inputs, (do, dST)):
            from ..torch.dplr import chunk_dplr
            return tuple(recompute_vjp(lambda *xs: chunk_dplr(*xs), inputs, ctx.needs_input_grad, (do, dST)))
        if do is None and dST is None:
            return (None,) * len(inputs)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        dq, dk, dv, da, db, dg, dS0 = _backward(launch, q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR), saved, do, dST,
                                                ctx.BT)
        dg = torch.where(g >= LOG_DECAY_FLOOR, dg, 0)            # as torch.clamp's gradient
        return tuple(d if need else None for d, need in zip((dq, dk, dv, da, db, dg, dS0), ctx.needs_input_grad))


def _acc_dtype(*tensors) -> torch.dtype:
    """The kernels' dtype: float64 if any input is, else float32 (bf16 / fp16 widen)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_dplr(q, k, v, a, b, g, S0):
    """As backends/torch/dplr.chunk_dplr (same arguments, same results), on the Triton
    kernels: q, k, a, b, g [BH, T, K] (g a per-key log decay), v [BH, T, V], S0 [BH, K, V]
    -> (o [BH, T, V] in v's dtype, S_T [BH, K, V] in S0's)."""
    BH, T, K = k.shape
    if T == 0:
        return v.new_zeros(BH, 0, v.shape[-1]), S0
    acc = _acc_dtype(q, k, v, a, b, g, S0)
    o, ST = ChunkDPLRFunction.apply(*(x.to(acc).contiguous() for x in (q, k, v, a, b, g, S0)))
    return o.to(v.dtype), ST.to(S0.dtype)


def dplr_stage(q, k, v, a, b, g, S0, X0, ns: int, ran: list | None = None):
    """The triton backend's ChunkDPLR stage, from the driver's whole-sequence values as
    backends/torch/scans.dplr_stage takes them: heads folded into the rows, a scalar decay
    broadcast over the keys.

    A non-finite input runs torch's chunk form for this call instead, and `ran` (the
    driver's record) says so: the kernels' tile products multiply the masked pairs
    (i, j > i) of a chunk too, and 0 * NaN = NaN would carry a later step's NaN into the
    earlier outputs and gradients of its chunk. One check per call."""
    if not rt.all_finite(q, k, v, a, b, g):
        from ..torch import scans
        if ran is not None:
            ran[-1] = "torch.chunk_dplr"
        return scans.dplr_stage(q, k, v, a, b, g, S0, X0, ns)
    vecs = [rt.to_bt(x, 1, X0, ns) for x in (q, k, a, b)]
    K = vecs[0].shape[-1]
    gb = rt.to_bt(g, g.dim() - ns, X0, ns)
    gb = gb[..., None].expand(gb.shape[:2] + (K,)) if gb.dim() == 2 else gb
    o, ST = chunk_dplr(vecs[0], vecs[1], rt.to_bt(v, 1, X0, ns), vecs[2], vecs[3], gb, rt.to_b(S0, ns - 1))
    return rt.from_bt(o, X0, ns), rt.from_b(ST, S0)


# Every kernel as the GPU launches it (chunk_size's BT, LAUNCH's warps), for ahead-of-time
# compiles: (name, the constexprs beyond the block sizes).
_FLAGS = {"chunk_dplr_bwd_dstates": ("HAS_DST", (True, False)), "chunk_dplr_bwd_dscores": ("FROM_R", (0, 1))}
AOT_VARIANTS = [(name, {_FLAGS[name][0]: x} if name in _FLAGS else {})
                for name in LAUNCH for x in (_FLAGS[name][1] if name in _FLAGS else (None,))]
_INTS = {"T", "K", "V", "NT"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-dplr-aot", interpret=False)
    BK, BV = _blocks(K, V)
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        blocks = {"BT": chunk_size(torch.device("cuda"), K), "BC": SUB_BLOCK, "BK": BK, "BV": BV}
        const = {c: x for c, x in blocks.items() if c in fn.arg_names} | flags
        sig = {p: ("i32" if p in _INTS else "*fp32") for p in fn.arg_names if p not in const}
        warps, stages = LAUNCH[name]
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=warps, num_stages=stages,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
