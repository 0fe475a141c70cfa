"""The triton backend's chunkwise kernels for the (gated) delta rule (the ChunkDelta form:
DeltaNet, Gated DeltaNet; and DeltaProduct's HouseholderProducts, interleaved into it),
forward and backward.

    S_t = e^{g_t} (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = q_tᵀ S_t

g is a scalar log decay per step (zeros for the ungated rule). MATH.md §4, the WY/UT form:
per chunk of BT steps with b_i the chunk-local inclusive cumulative sum of g (≤ 0), D_ij =
e^{b_i - b_j} for j ≤ i, and S the state before the chunk,

    A  = strict_lower(diag(β) (K Kᵀ ⊙ D)),      T = (I + A)⁻¹   (unit lower triangular; the
                                                  kernels' T argument is the sequence length)
    W  = T diag(β) (K ⊙ e^b),   U = T diag(β) V
    Vn = U - W S                                  (the values the chunk really writes)
    S' = e^{b_C} S + (K ⊙ e^{b_C - b})ᵀ Vn
    O  = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn

The kernels:

  delta_fwd_solve     per chunk: b, A and T = (I + A)⁻¹ by forward substitution over the
                      chunk's rows (row i of T is e_i - Σ_{j<i} A_ij T_j: only earlier rows),
                      stored per chunk [BH, NT, BT, BT] for the backward
  delta_fwd_wu        per chunk: W and U
  delta_fwd_states    the state before every chunk [BH, NT, K, V], the new values Vn and the
                      last state, by a sequential pass over the chunks; program (V block, row)
  delta_fwd_output    O per chunk and V block
  delta_bwd_readout   per chunk and V block, the readout's state-free parts of the reverse pass:
                      QK⋆ᵀ dO and Y_n = (Q ⊙ e^b)ᵀ dO
  delta_bwd_dstates   the reverse pass over chunks, Λ_n the gradient of the state after chunk n:
                      dVn = QK⋆ᵀ dO + (K ⊙ e^{b_C - b}) Λ_n,
                      Λ_{n-1} = e^{b_C} Λ_n + Y_n - Wᵀ dVn;  program (V block, row)
  delta_bwd_readout_dq, delta_bwd_readout_dk, delta_bwd_state_grads, delta_bwd_solve_values,
  delta_bwd_pairs, delta_bwd_pairs_dk
                      per chunk, the adjoint of the rest (as scans._delta_backward), split so
                      that each holds few [BT, BT] / [BT, K] tiles (no spills on sm_80 / sm_90):
                      through the readout (dq; dk's and db's parts), the state update (dR_W =
                      Tᵀ dW with dW = -dVn Sᵀ), the solve (dR_U = Tᵀ dVn, dv, dR Xᵀ) and A
                      (dA = -strict(dR Xᵀ): dβ, dg; dk += (dKK + dKKᵀ) K); each adds its part
                      of dk, dβ and db to the earlier ones'; delta_bwd_pairs sums db into dg.

Saved for the backward (not recomputed): b, T, W, U, Vn and the state before every chunk
([BH, NT, K, V]); dk is written by delta_bwd_readout_dk and added to by the later kernels.
Tiles a tl.dot takes transposed are loaded transposed (_tile_t): on sm_80 a transpose in
registers costs registers that spill.
The log decays' gradient: with db the gradient of the cumulative b (a pair b_i - b_j gives
+ to i and - to j), dg_t = Σ_{s ≥ t} db_s; db_C (e^{b_C}, e^{b_C - b_j}) is added at the
chunk's last step, so the sum carries it to every step of the chunk.

Exponents stay ≤ 0: pairs j ≤ i only (masked to -inf before the exponential, also for rows
past T, which read b = 0), b_C - b_j with j ≤ C and b_i ≤ 0. Reverse and cu_seqlens are the
runtime's (it flips / splits around the stage). A tl.dot of float32 tiles runs in TF32 on a
GPU, as fla's chunk kernels."""
from __future__ import annotations

import torch
import triton

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.scans import LOG_DECAY_FLOOR
from .launch import Kernels, launcher

SOURCE = r'''
@triton.jit
def _tile(ptr, bh, rows, cols, T, W):
    """The [rows, cols] tile of a contiguous [BH, T, W] tensor at row bh; zeros outside."""
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    return tl.load(ptr + bh * T * W + rows[:, None] * W + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_t(ptr, bh, rows, cols, T, W):
    """The same tile transposed, [cols, rows], loaded as such: a tl.dot operand that needs
    no transpose in registers (on sm_80 one costs registers and spills at BT = K = 64)."""
    mask = (rows[None, :] < T) & (cols[:, None] < W)
    return tl.load(ptr + bh * T * W + rows[None, :] * W + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, bh, rows, cols, T, W, x):
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    tl.store(ptr + bh * T * W + rows[:, None] * W + cols[None, :], x, mask=mask)


@triton.jit
def _steps(ptr, bh, rows, T):
    """A [BH, T] per-step scalar at the chunk's rows; zeros past T."""
    return tl.load(ptr + bh * T + rows, mask=rows < T, other=0.0)


@triton.jit
def _square(ptr, index, BT: tl.constexpr):
    """The [BT, BT] matrix `index` (row * NT + chunk) of a contiguous [.., BT, BT] tensor."""
    at = tl.arange(0, BT)
    return tl.load(ptr + index * BT * BT + at[:, None] * BT + at[None, :])


@triton.jit
def _square_t(ptr, index, BT: tl.constexpr):
    """The same matrix transposed, loaded as such."""
    at = tl.arange(0, BT)
    return tl.load(ptr + index * BT * BT + at[None, :] * BT + at[:, None])


@triton.jit
def _state_tile(ptr, index, keys, vals, K, V):
    """The [K, V] state `index` (row * NT + chunk, or the row) of a contiguous [.., K, V] tensor."""
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
def _last(x, rows, T, n, BT: tl.constexpr):
    """x at the chunk's last step (the last chunk may be short), as a scalar."""
    end = tl.minimum(n * BT + BT, T) - 1
    return tl.sum(tl.where(rows == end, x, 0.0), 0)


@triton.jit
def _pair_decay(b, rows, T, STRICT: tl.constexpr):
    """D_ij = e^{b_i - b_j} for the pairs j <= i - s of the chunk's steps (rows i, columns j)
    with step i before T, zero elsewhere: masked before the exponential, so every exponent
    is <= 0 (rows past T read b = 0)."""
    seen = (rows[None, :] <= rows[:, None] - STRICT) & (rows[:, None] < T)
    return tl.exp(tl.where(seen, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _pair_decay_t(b, rows, T, STRICT: tl.constexpr):
    """_pair_decay transposed (rows j, columns i), built as such."""
    seen = (rows[:, None] <= rows[None, :] - STRICT) & (rows[None, :] < T)
    return tl.exp(tl.where(seen, b[None, :] - b[:, None], float("-inf")))


@triton.jit
def delta_fwd_solve(k, beta, g, gcum, solve, T, K, NT, BT: tl.constexpr, BK: tl.constexpr):
    """Per chunk: b (gcum) and T = (I + A)⁻¹ (solve [BH, NT, BT, BT]), A = strict_lower(diag(β)
    (K Kᵀ ⊙ D)), by forward substitution over the chunk's rows. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    at = tl.arange(0, BT)
    rows = n * BT + at
    keys = tl.arange(0, BK)
    b = tl.cumsum(_steps(g, bh, rows, T), 0)
    tl.store(gcum + bh * T + rows, b, mask=rows < T)
    beta_c = _steps(beta, bh, rows, T)
    A = tl.dot(_tile(k, bh, rows, keys, T, K), _tile_t(k, bh, rows, keys, T, K)) * _pair_decay(b, rows, T, 1) \
        * beta_c[:, None]
    A_t = tl.trans(A)
    # row i of T is e_i - Σ_{j<i} A_ij T_j, and rows j >= i of T are still those of I,
    # which A_ij = 0 leaves out
    inverse = tl.where(at[:, None] == at[None, :], 1.0, 0.0).to(A_t.dtype)
    for i in range(1, BT):
        a_i = tl.sum(tl.where(at[None, :] == i, A_t, 0.0), 1)          # A_ij along j (axis 0)
        row = tl.where(at == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inverse, 0)
        inverse = tl.where(at[:, None] == i, row[None, :], inverse)
    tl.store(solve + (bh * NT + n) * BT * BT + at[:, None] * BT + at[None, :], inverse)


@triton.jit
def delta_fwd_wu(k, v, beta, gcum, solve, w, u, T, K, V, NT,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Per chunk: W = T diag(β) (K ⊙ e^b) and U = T diag(β) V. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    beta_c = _steps(beta, bh, rows, T)
    inverse = _square(solve, bh * NT + n, BT)
    k_c = _tile(k, bh, rows, keys, T, K) * (beta_c * tl.exp(_steps(gcum, bh, rows, T)))[:, None]
    _store_tile(w, bh, rows, keys, T, K, tl.dot(inverse, k_c))
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        _store_tile(u, bh, rows, vals, T, V, tl.dot(inverse, _tile(v, bh, rows, vals, T, V) * beta_c[:, None]))


@triton.jit
def delta_fwd_states(k, u, w, gcum, S0, states, vnew, ST, T, K, V, NT,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The state before every chunk (states [BH, NT, K, V]), the new values Vn = U - W S and
    the last state ST, from S0. Program (V block, row): the columns of a V block evolve
    independently."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, bh, keys, vals, K, V)
    for n in range(NT):
        _store_state(states, bh * NT + n, keys, vals, K, V, S)
        rows = n * BT + tl.arange(0, BT)
        b = _steps(gcum, bh, rows, T)
        b_end = _last(b, rows, T, n, BT)
        new = _tile(u, bh, rows, vals, T, V) - tl.dot(_tile(w, bh, rows, keys, T, K), S)
        _store_tile(vnew, bh, rows, vals, T, V, new)
        # k_j e^{b_C - b_j}: exponents <= 0 (rows past T have k = 0)
        k_to_end_t = _tile_t(k, bh, rows, keys, T, K) * tl.exp(b_end - b)[None, :]
        S = S * tl.exp(b_end) + tl.dot(k_to_end_t, new)
    _store_state(ST, bh, keys, vals, K, V, S)


@triton.jit
def delta_fwd_output(q, k, vnew, gcum, states, o, T, K, V, NT,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """O = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn for one chunk and V block. Program (chunk,
    row, V block)."""
    n, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    b = _steps(gcum, bh, rows, T)
    q_c = _tile(q, bh, rows, keys, T, K)
    scores = tl.dot(q_c, _tile_t(k, bh, rows, keys, T, K)) * _pair_decay(b, rows, T, 0)
    out = tl.dot(q_c * tl.exp(b)[:, None], _state_tile(states, bh * NT + n, keys, vals, K, V))
    out += tl.dot(scores, _tile(vnew, bh, rows, vals, T, V))
    _store_tile(o, bh, rows, vals, T, V, out)


@triton.jit
def delta_bwd_readout(q, k, gcum, do, dvnew, ystates, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The readout's parts of the reverse pass, which need no state: QK⋆ᵀ dO (into dvnew, to
    which the pass adds its state term) and Y_n = (Q ⊙ e^b)ᵀ dO (ystates [BH, NT, K, V]).
    Program (chunk, row, V block)."""
    n, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    b = _steps(gcum, bh, rows, T)
    q_t = _tile_t(q, bh, rows, keys, T, K)
    do_c = _tile(do, bh, rows, vals, T, V)
    _store_state(ystates, bh * NT + n, keys, vals, K, V, tl.dot(q_t * tl.exp(b)[None, :], do_c))
    scores_t = tl.dot(_tile(k, bh, rows, keys, T, K), q_t) * _pair_decay_t(b, rows, T, 0)
    _store_tile(dvnew, bh, rows, vals, T, V, tl.dot(scores_t, do_c))


@triton.jit
def delta_bwd_dstates(k, w, gcum, ystates, dvnew, dstates, dST, dS0, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr):
    """Λ_n, the gradient of the state after chunk n (dstates [BH, NT, K, V]), the new values'
    gradient dVn = QK⋆ᵀ dO + (K ⊙ e^{b_C - b}) Λ_n (dvnew: its first term is there) and dS0,
    by the reverse pass Λ_{n-1} = e^{b_C} Λ_n + Y_n - Wᵀ dVn. Program (V block, row)."""
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
        b = _steps(gcum, bh, rows, T)
        b_end = _last(b, rows, T, n, BT)
        k_to_end = _tile(k, bh, rows, keys, T, K) * tl.exp(b_end - b)[:, None]
        d_new = _tile(dvnew, bh, rows, vals, T, V) + tl.dot(k_to_end, lam)
        _store_tile(dvnew, bh, rows, vals, T, V, d_new)
        lam = lam * tl.exp(b_end) + _state_tile(ystates, bh * NT + n, keys, vals, K, V) \
            - tl.dot(_tile_t(w, bh, rows, keys, T, K), d_new)
    _store_state(dS0, bh, keys, vals, K, V, lam)


@triton.jit
def delta_bwd_readout_dq(q, k, vnew, gcum, states, do, dq, db, T, K, V, NT,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Through O = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn: dq, and e^b's part of db (the
    gradient of the cumulative decays b, before the sum over steps). Program (chunk, row);
    the V blocks are summed in a loop."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, bh, rows, T)
    # two passes over the V blocks, so that the two sums are not held at once
    d_scores = tl.zeros([BT, BT], dtype=b.dtype)       # dO Vnᵀ: of lower_incl(Q Kᵀ ⊙ D)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_scores += tl.dot(_tile(do, bh, rows, vals, T, V), _tile_t(vnew, bh, rows, vals, T, V))
    d_scores = d_scores * _pair_decay(b, rows, T, 0)   # of Q Kᵀ
    _store_tile(dq, bh, rows, keys, T, K, tl.dot(d_scores, _tile(k, bh, rows, keys, T, K)))
    d_q_state = tl.zeros([BT, BK], dtype=b.dtype)      # dO Sᵀ: the gradient of Q ⊙ e^b
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_q_state += tl.dot(_tile(do, bh, rows, vals, T, V), _state_tile_t(states, bh * NT + n, keys, vals, K, V))
    e_b = tl.exp(b)
    d_q_state = d_q_state * e_b[:, None]
    tl.store(db + bh * T + rows, tl.sum(d_q_state * _tile(q, bh, rows, keys, T, K), 1), mask=rows < T)   # e^{b_i}
    _store_tile(dq, bh, rows, keys, T, K, _tile(dq, bh, rows, keys, T, K) + d_q_state)


@triton.jit
def delta_bwd_readout_dk(q, k, vnew, gcum, do, dk, db, T, K, V, NT,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The readout's part of dk, (dO Vnᵀ ⊙ D)ᵀ Q, accumulated transposed (Vn dOᵀ) so that
    no tile is transposed in registers, and the pairs' part of db: each pair's exponent
    b_i - b_j gives + to i and - to j. Program (chunk, row); the V blocks summed in a loop."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, bh, rows, T)
    d_scores_t = tl.zeros([BT, BT], dtype=b.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_scores_t += tl.dot(_tile(vnew, bh, rows, vals, T, V), _tile_t(do, bh, rows, vals, T, V))
    d_scores_t = d_scores_t * _pair_decay_t(b, rows, T, 0)
    q_c = _tile(q, bh, rows, keys, T, K)
    _store_tile(dk, bh, rows, keys, T, K, tl.dot(d_scores_t, q_c))
    pairs_t = d_scores_t * tl.dot(_tile(k, bh, rows, keys, T, K), tl.trans(q_c))      # [j, i]
    d_b = _steps(db, bh, rows, T) + tl.sum(pairs_t, 0) - tl.sum(pairs_t, 1)
    tl.store(db + bh * T + rows, d_b, mask=rows < T)


@triton.jit
def delta_bwd_state_grads(k, beta, gcum, solve, vnew, states, dstates, dvnew, dk, dbeta, db, d_rw,
                          T, K, V, NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Through S' = e^{b_C} S + (K ⊙ e^{b_C - b})ᵀ Vn and Vn = U - W S: dk's and db's parts,
    and dR_W = Tᵀ dW with dW = -dVn Sᵀ (d_rw: the cotangent of diag(β) K ⊙ e^b), its part of
    dk and dβ. db_C (the whole chunk's exponent) goes to the chunk's last step: the sum over
    steps carries it to every step. Program (chunk, row); the V blocks are summed in a loop."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, bh, rows, T)
    b_end = _last(b, rows, T, n, BT)
    d_k_end = tl.zeros([BT, BK], dtype=b.dtype)        # Vn Λᵀ: of K ⊙ e^{b_C - b}
    d_w = tl.zeros([BT, BK], dtype=b.dtype)            # -dVn Sᵀ: of W
    lam_state = tl.zeros([BK], dtype=b.dtype)          # Σ_V Λ ⊙ S: of e^{b_C}
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        S_t = _state_tile_t(states, bh * NT + n, keys, vals, K, V)
        lam_t = _state_tile_t(dstates, bh * NT + n, keys, vals, K, V)
        d_k_end += tl.dot(_tile(vnew, bh, rows, vals, T, V), lam_t)
        d_w -= tl.dot(_tile(dvnew, bh, rows, vals, T, V), S_t)
        lam_state += tl.sum(lam_t * S_t, 0)
    d_r = tl.dot(_square_t(solve, bh * NT + n, BT), d_w)
    _store_tile(d_rw, bh, rows, keys, T, K, d_r)
    beta_c = _steps(beta, bh, rows, T)
    k_c = _tile(k, bh, rows, keys, T, K)
    e_b, e_to_end = tl.exp(b), tl.exp(b_end - b)
    d_k = _tile(dk, bh, rows, keys, T, K) + d_k_end * e_to_end[:, None] + d_r * (beta_c * e_b)[:, None]
    _store_tile(dk, bh, rows, keys, T, K, d_k)
    d_rk = tl.sum(d_r * k_c, 1) * e_b
    tl.store(dbeta + bh * T + rows, d_rk, mask=rows < T)
    d_to_end = tl.sum(d_k_end * k_c, 1) * e_to_end
    d_b_end = tl.sum(d_to_end, 0) + tl.sum(lam_state, 0) * tl.exp(b_end)
    end = tl.minimum(n * BT + BT, T) - 1
    d_b = tl.load(db + bh * T + rows, mask=rows < T, other=0.0) + beta_c * d_rk - d_to_end \
        + tl.where(rows == end, d_b_end, 0.0)
    tl.store(db + bh * T + rows, d_b, mask=rows < T)


@triton.jit
def delta_bwd_solve_values(v, beta, solve, u, w, dvnew, dv, dbeta, d_rw, d_pairs, T, K, V, NT,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Through [U | W] = T diag(β) [V | K ⊙ e^b]: dR_U = Tᵀ dVn, dv = β dR_U, its part of dβ,
    and dR Xᵀ = dR_U Uᵀ + dR_W Wᵀ (d_pairs [BH, NT, BT, BT], for delta_bwd_pairs). Program
    (chunk, row); the V blocks are summed in a loop."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    beta_c = _steps(beta, bh, rows, T)
    inverse_t = _square_t(solve, bh * NT + n, BT)
    d_rx = tl.dot(_tile(d_rw, bh, rows, keys, T, K), _tile_t(w, bh, rows, keys, T, K))
    d_beta = _steps(dbeta, bh, rows, T)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_ru = tl.dot(inverse_t, _tile(dvnew, bh, rows, vals, T, V))
        _store_tile(dv, bh, rows, vals, T, V, d_ru * beta_c[:, None])
        d_beta += tl.sum(d_ru * _tile(v, bh, rows, vals, T, V), 1)
        d_rx += tl.dot(d_ru, _tile_t(u, bh, rows, vals, T, V))
    tl.store(dbeta + bh * T + rows, d_beta, mask=rows < T)
    at = tl.arange(0, BT)
    tl.store(d_pairs + (bh * NT + n) * BT * BT + at[:, None] * BT + at[None, :], d_rx)


@triton.jit
def delta_bwd_pairs(k, beta, gcum, d_pairs, dbeta, db, dg, T, K, NT, BT: tl.constexpr, BK: tl.constexpr):
    """Through A = diag(β) strict(K Kᵀ ⊙ D) with dA = -dR Xᵀ strictly below the diagonal (dR Xᵀ
    read from d_pairs): the rest of dβ, the pairs' part of db, and dg_t = Σ_{s >= t} db_s.
    Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, bh, rows, T)
    beta_c = _steps(beta, bh, rows, T)
    k_c = _tile(k, bh, rows, keys, T, K)
    d_rx = _square(d_pairs, bh * NT + n, BT)
    kk = tl.dot(k_c, _tile_t(k, bh, rows, keys, T, K)) * _pair_decay(b, rows, T, 1)   # strict_lower(K Kᵀ ⊙ D)
    tl.store(dbeta + bh * T + rows, _steps(dbeta, bh, rows, T) - tl.sum(d_rx * kk, 1), mask=rows < T)
    pairs = -d_rx * beta_c[:, None] * kk               # dA ⊙ A / β: each pair's b_i - b_j, + to i, - to j
    d_b = _steps(db, bh, rows, T) + tl.sum(pairs, 1) - tl.sum(pairs, 0)
    d_g = tl.sum(d_b, 0) - tl.cumsum(d_b, 0) + d_b     # Σ_{s >= t} db_s
    tl.store(dg + bh * T + rows, d_g, mask=rows < T)


@triton.jit
def delta_bwd_pairs_dk(k, beta, gcum, d_pairs, dk, T, K, NT, BT: tl.constexpr, BK: tl.constexpr):
    """dk += (dKK + dKKᵀ) K, dKK = dA ⊙ D = -diag(β) (dR Xᵀ) ⊙ D the cotangent of K Kᵀ (both
    sides of the product are keys); the transpose is loaded as such. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, bh, rows, T)
    beta_c = _steps(beta, bh, rows, T)
    both = _square(d_pairs, bh * NT + n, BT) * beta_c[:, None] * _pair_decay(b, rows, T, 1) \
        + _square_t(d_pairs, bh * NT + n, BT) * beta_c[None, :] * _pair_decay_t(b, rows, T, 1)
    d_k = _tile(dk, bh, rows, keys, T, K) - tl.dot(both, _tile(k, bh, rows, keys, T, K))
    _store_tile(dk, bh, rows, keys, T, K, d_k)
'''

MAX_BV = 32         # V blocks: the state passes run one program per V block; the others loop over them

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-delta")

# (num_warps, num_stages) per kernel on a GPU (tests/triton/test_chunk_delta.py compiles
# them at K = V = 64 and 128: no spills).
LAUNCH = {name: (8, 1) for name in (
    "delta_fwd_solve", "delta_fwd_wu", "delta_fwd_states", "delta_fwd_output", "delta_bwd_readout",
    "delta_bwd_dstates", "delta_bwd_readout_dq", "delta_bwd_readout_dk", "delta_bwd_state_grads",
    "delta_bwd_solve_values", "delta_bwd_pairs", "delta_bwd_pairs_dk")}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's options on a GPU."""
    return launcher(ns, device, lambda name: dict(zip(("num_warps", "num_stages"), LAUNCH[name])))


def chunk_size(device, K: int) -> int:
    """BT: 64 on a GPU (fla's chunk size for the delta rule) up to K = 64, 32 above (the
    backward's [BT, K] tiles spill at BT = 64, K = 128 on sm_80 / sm_90); 32 in the
    interpreter, where the tests' short sequences still cross chunks."""
    return (64 if K <= 64 else 32) if device.type == "cuda" else 32


def _blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): all keys in one tile; V blocks of 32 columns, 16 from K = 128 on (the state
    passes hold [BT, K] tiles of k and w with the state's [K, BV] columns)."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV if BK <= 64 else MAX_BV // 2)


def _geometry(k, v, BT):
    BH, T, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    return BH, T, K, V, triton.cdiv(T, BT), BK, BV


def _forward(launch, q, k, v, beta, g, S0, BT):
    """(o, S_T, saved) on contiguous [BH, T, .] tensors, g already floored; saved: what the
    backward reads (b, T, U, W, Vn and the state before every chunk)."""
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    blocks = dict(BT=BT, BK=BK, BV=BV)
    gcum, solve = torch.empty_like(g), k.new_empty(BH, NT, BT, BT)
    launch("delta_fwd_solve", (NT, BH))(k, beta, g, gcum, solve, T, K, NT, BT=BT, BK=BK)
    w, u = torch.empty_like(k), torch.empty_like(v)
    launch("delta_fwd_wu", (NT, BH))(k, v, beta, gcum, solve, w, u, T, K, V, NT, **blocks)
    states, new, ST = k.new_empty(BH, NT, K, V), torch.empty_like(v), k.new_empty(BH, K, V)
    launch("delta_fwd_states", (triton.cdiv(V, BV), BH))(k, u, w, gcum, S0, states, new, ST, T, K, V, NT, **blocks)
    o = torch.empty_like(v)
    launch("delta_fwd_output", (NT, BH, triton.cdiv(V, BV)))(q, k, new, gcum, states, o, T, K, V, NT, **blocks)
    return o, ST, (gcum, solve, u, w, new, states)


def _backward(launch, q, k, v, beta, saved, do, dST, BT):
    """(dq, dk, dv, dβ, dg, dS0) of _forward; do None: the output unread (zeros), dST None:
    the final state unread. The kernels run in order: the readout's state-free parts, the
    reverse pass, then per chunk the readout's, the state update's, the solve's and A's
    adjoints (each adds its parts of dk, dβ and db to the earlier ones')."""
    gcum, solve, u, w, new, states = saved
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    blocks = dict(BT=BT, BK=BK, BV=BV)
    v_blocks = triton.cdiv(V, BV)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    d_new, ystates = torch.empty_like(v), torch.empty_like(states)
    launch("delta_bwd_readout", (NT, BH, v_blocks))(q, k, gcum, do, d_new, ystates, T, K, V, NT, **blocks)
    dstates, dS0 = torch.empty_like(states), k.new_empty(BH, K, V)
    launch("delta_bwd_dstates", (v_blocks, BH))(k, w, gcum, ystates, d_new, dstates,
                                                dS0 if dST is None else dST.contiguous(), dS0, T, K, V, NT,
                                                HAS_DST=dST is not None, **blocks)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta, db, dg, d_rw = torch.empty_like(beta), torch.empty_like(gcum), torch.empty_like(gcum), torch.empty_like(k)
    launch("delta_bwd_readout_dq", (NT, BH))(q, k, new, gcum, states, do, dq, db, T, K, V, NT, **blocks)
    launch("delta_bwd_readout_dk", (NT, BH))(q, k, new, gcum, do, dk, db, T, K, V, NT, **blocks)
    launch("delta_bwd_state_grads", (NT, BH))(k, beta, gcum, solve, new, states, dstates, d_new, dk, dbeta, db, d_rw,
                                              T, K, V, NT, **blocks)
    d_pairs = torch.empty_like(solve)
    launch("delta_bwd_solve_values", (NT, BH))(v, beta, solve, u, w, d_new, dv, dbeta, d_rw, d_pairs, T, K, V, NT,
                                               **blocks)
    launch("delta_bwd_pairs", (NT, BH))(k, beta, gcum, d_pairs, dbeta, db, dg, T, K, NT, BT=BT, BK=BK)
    launch("delta_bwd_pairs_dk", (NT, BH))(k, beta, gcum, d_pairs, dk, T, K, NT, BT=BT, BK=BK)
    return dq, dk, dv, dbeta, dg, dS0


class ChunkDeltaFunction(torch.autograd.Function):
    """chunk_delta on the Triton kernels: saves the inputs, b, T, U, W, Vn and the state
    before every chunk; the backward runs the adjoint kernels. Under create_graph=True the
    backward differentiates the torch chunk form instead (second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, gated, q, k, v, beta, g, S0):
        BT = chunk_size(k.device, k.shape[-1])
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        o, ST, saved = _forward(launch, q, k, v, beta, g.clamp(min=LOG_DECAY_FLOOR), S0, BT)
        ctx.set_materialize_grads(False)
        ctx.gated, ctx.BT = gated, BT
        ctx.save_for_backward(q, k, v, beta, g, S0, *saved)
        return o, ST

    @staticmethod
    def backward(ctx, do, dST):
        q, k, v, beta, g, S0, *saved = ctx.saved_tensors
        inputs, needs = (q, k, v, beta, g, S0), ctx.needs_input_grad[1:]
        if wants_graph(inputs, (do, dST)):
            from ..torch.scans import chunk_delta

            def twin(q, k, v, beta, g, S0):
                return chunk_delta(q, k, v, beta, g if ctx.gated else None, S0)
            return (None,) + tuple(recompute_vjp(twin, inputs, needs, (do, dST)))
        if do is None and dST is None:
            return (None,) * (1 + len(inputs))
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        dq, dk, dv, dbeta, dg, dS0 = _backward(launch, q, k, v, beta, saved, do, dST, ctx.BT)
        dg = torch.where(g >= LOG_DECAY_FLOOR, dg, 0)            # as torch.clamp's gradient
        got = (None if do is None else dq, dk, dv, dbeta, dg if ctx.gated else None, dS0)
        return (None,) + tuple(d if need else None for d, need in zip(got, needs))


def chunk_delta(q, k, v, beta, g, S0):
    """As backends/torch/scans.chunk_delta, on the Triton kernels: q, k [BH, T, K], v
    [BH, T, V], beta [BH, T], g [BH, T] log decays or None (ungated), S0 [BH, K, V].
    Returns (o [BH, T, V], S_T)."""
    BH, T, K = k.shape
    if T == 0:
        return v.new_zeros(BH, 0, v.shape[-1]), S0
    gated = g is not None
    g = g.contiguous() if gated else beta.new_zeros(BH, T)
    return ChunkDeltaFunction.apply(gated, q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), g,
                                    S0.contiguous())


def delta_stage(q, k, v, beta, g, S0, X0, ns: int, ran: list | None = None):
    """The triton backend's ChunkDelta stage, from the driver's whole-sequence values as
    backends/torch/scans.delta_stage takes them: heads folded into the rows.

    A non-finite input runs torch's chunk form for this call instead, and `ran` (the
    driver's record) says so: the kernels' tile products (K Kᵀ, Q Kᵀ, W S) multiply the
    masked pairs (i, j > i) of a chunk too, and 0 * NaN = NaN would carry a later step's NaN
    into the earlier outputs and gradients of its chunk. One check per call."""
    if not rt.all_finite(q, k, v, beta, g):
        from ..torch import scans
        if ran is not None:
            ran[-1] = "torch.chunk_delta"
        return scans.delta_stage(q, k, v, beta, g, S0, X0, ns)
    return _on_kernels(q, k, v, beta, g, S0, X0, ns)


def _on_kernels(q, k, v, beta, g, S0, X0, ns: int):
    """delta_stage's kernel path (inputs known finite), in scans.delta_stage's signature."""
    o, ST = chunk_delta(rt.to_bt(q, 1, X0, ns), rt.to_bt(k, 1, X0, ns), rt.to_bt(v, 1, X0, ns),
                        rt.to_bt(beta, 0, X0, ns), None if g is None else rt.to_bt(g, 0, X0, ns),
                        rt.to_b(S0, ns - 1))
    return rt.from_bt(o, X0, ns), rt.from_b(ST, S0)


def delta_product_stage(q, ks: list, vs: list, betas: list, S0, X0, ns: int, ran: list | None = None):
    """DeltaProduct (HouseholderProducts) on the same kernels: scans.delta_product_stage's
    interleaving of the n steps of every token into one delta rule over T * n steps (read
    out after each token's last step), that delta rule run here; a non-finite input runs
    torch's form, as delta_stage does."""
    from ..torch import scans
    if not rt.all_finite(q, *ks, *vs, *betas):
        if ran is not None:
            ran[-1] = "torch.delta_product"
        return scans.delta_product_stage(q, ks, vs, betas, S0, X0, ns)
    return scans.delta_product_stage(q, ks, vs, betas, S0, X0, ns, delta=_on_kernels)


# Every kernel as the GPU launches it (chunk_size's BT, LAUNCH's warps), for ahead-of-time compiles:
# (name, the constexprs beyond the block sizes).
AOT_VARIANTS = [
    ("delta_fwd_solve", {}),
    ("delta_fwd_wu", {}),
    ("delta_fwd_states", {}),
    ("delta_fwd_output", {}),
    ("delta_bwd_readout", {}),
    ("delta_bwd_dstates", {"HAS_DST": True}),
    ("delta_bwd_dstates", {"HAS_DST": False}),
    ("delta_bwd_readout_dq", {}),
    ("delta_bwd_readout_dk", {}),
    ("delta_bwd_state_grads", {}),
    ("delta_bwd_solve_values", {}),
    ("delta_bwd_pairs", {}),
    ("delta_bwd_pairs_dk", {}),
]
_INTS = {"T", "K", "V", "NT"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-delta-aot", interpret=False)
    BK, BV = _blocks(K, V)
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        blocks = {"BT": chunk_size(torch.device("cuda"), K), "BK": BK, "BV": BV}
        const = {k: v for k, v in blocks.items() if k in fn.arg_names} | flags
        sig = {a: ("i32" if a in _INTS else "*fp32") for a in fn.arg_names if a not in const}
        warps, stages = LAUNCH[name]
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=warps, num_stages=stages,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
