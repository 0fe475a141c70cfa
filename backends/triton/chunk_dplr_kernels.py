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
  chunk_dplr_fwd_states   the pass over chunks, program (V block, sequence): U_n = W_n S + Ũ_n, the
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
                          program (V block, sequence)
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

Exponents stay <= 0: pairs j <= i only, masked to -inf before the exponential; rows past
the sequence's end read Γ = 0, so their exponents against a reference r are masked to 0 too
(q = b = 0 there), and no sub-block past the end is paired with an earlier one. Non-finite
inputs never reach the kernels (dplr_stage runs torch's chunk form for them, per sequence
and direction: the tile products multiply the masked pairs too, and 0 * NaN = NaN). Log
decays are floored at LOG_DECAY_FLOOR in the loads (_log_decay; gradient as clamp's).

Layout, reverse and cu_seqlens as chunk_kernels.py's and delta_kernels.py's (registry caps
"kernel": the runtime neither flips nor splits): q, k, v, a, b, g, o and their gradients
are the driver's [B, T, H, .] tensors, read and written in place -- step t of sequence i of
row bh = b * H + head is row at + dt * t of the tensor seen as B * T * H rows (_span, its
helpers included from chunk_kernels' SOURCE by name); dt = -H under REVERSE, so every
kernel works in the recurrence's order and the equations above hold unchanged. Under
VARLEN the host's chunk table (chunk_kernels.sequences: every chunk of every sequence,
none straddling two) gives one launch per kernel for all sequences, the passes over chunks
one program per (V block, sequence) with its own initial and final state (sequence-major,
heads inner). The per-step buffers (Γ, K̂, Â, W, Ũ, U and their adjoints) share the
inputs' layout; the per-chunk ones (scores, M, states) are [BH, NT, ..] with NT the row's
chunks over all its sequences.

Dtypes: bf16 / fp16 (and fp32) inputs are loaded and widened to fp32 in the kernels
(_widen), float64 stays float64 (a mix with float64 runs in float64); sums, buffers and
gradients are in that accumulation dtype, the output and the gradients are returned in
their inputs' dtypes. A tl.dot of fp32 tiles runs in TF32 on a GPU, as fla's kernels."""
from __future__ import annotations

import torch
import triton

from recdsl.memory import recomputing_chunk_states

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.dplr import LOG_DECAY_FLOOR
from . import chunk_kernels, delta_kernels
from .chunk_kernels import Sequences, longest, sequences
from .jit import jit_functions
from .launch import Kernels, launcher

# chunk_kernels' jit helpers, included as text: the in-place [B, T, H, .] addressing (_span),
# the chunk table (_chunk, _sequence), widening loads and the tile / state loads and stores;
# and delta_kernels' _locate (a chunk's sequence and span).
SHARED_HELPERS = ("_widen", "_span", "_chunk", "_sequence", "_tile", "_row", "_store_tile", "_state_tile",
                  "_store_state", "_chunk_end", "_sub_blocks_in")


SOURCE = (jit_functions(chunk_kernels.SOURCE, SHARED_HELPERS, __name__)
          + jit_functions(delta_kernels.SOURCE, ("_locate",), __name__)) + r'''
@triton.jit
def _tile_t(ptr, at, dt, rows, cols, Tn, W):
    """_tile transposed, [cols, rows], loaded as such (a tl.dot operand with no transpose
    in registers)."""
    mask = (rows[None, :] < Tn) & (rows[None, :] >= 0) & (cols[:, None] < W)
    return _widen(tl.load(ptr + (at + dt * rows[None, :]) * W + cols[:, None], mask=mask, other=0.0))


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
def _state_tile_t(ptr, index, keys, vals, K, V):
    """The state tile transposed, [vals, keys], loaded as such."""
    mask = (keys[None, :] < K) & (vals[:, None] < V)
    return _widen(tl.load(ptr + index * K * V + keys[None, :] * V + vals[:, None], mask=mask, other=0.0))


@triton.jit
def _log_decay(g, at, dt, rows, keys, Tn, K, FLOOR: tl.constexpr):
    """The [rows, keys] tile of g floored at FLOOR (in the load: g is read in place, no
    clamped copy); zeros past Tn."""
    return tl.maximum(_tile(g, at, dt, rows, keys, Tn, K), FLOOR)


@triton.jit
def _decays_at(g, gcum, at, dt, rows, keys, Tn, K, FLOOR: tl.constexpr):
    """(Γ, Γ⁻ = Γ - g) of the rows, zeros past Tn."""
    cum = _tile(gcum, at, dt, rows, keys, Tn, K)
    return cum, cum - _log_decay(g, at, dt, rows, keys, Tn, K, FLOOR)


@triton.jit
def _to_reference(x, exponent, r, live):
    """x ⊙ e^{exponent - r} on the live rows (exponent - r <= 0 there); rows past Tn (x = 0,
    exponent 0) get the factor 1, not e^{-r}, which could overflow (inf * 0 = NaN)."""
    return x * tl.exp(tl.where(live[:, None], exponent - r[None, :], 0.0))


@triton.jit
def chunk_dplr_cumsum(k, a, g, gcum, k_end, a_end, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, FLOOR: tl.constexpr, VARLEN: tl.constexpr,
                      REVERSE: tl.constexpr):
    """Γ, the inclusive cumulative sum of g inside each chunk, and the keys decayed to the
    chunk's end, K̂ = k ⊙ e^{Γ_C - Γ}, Â = a ⊙ e^{Γ_C - Γ} (k_end, a_end: what the passes over
    chunks read, so that they hold no decay tiles). Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    cum = tl.cumsum(_log_decay(g, at, dt, rows, keys, Tn, K, FLOOR), 0)
    _store_tile(gcum, at, dt, rows, keys, Tn, K, cum, False)
    cum_end = tl.sum(tl.where((rows == _chunk_end(n, Tn, BT))[:, None], cum, 0.0), 0)
    to_end = tl.exp(cum_end[None, :] - cum)      # <= 1 (rows past Tn: Γ = 0 and k = a = 0)
    _store_tile(k_end, at, dt, rows, keys, Tn, K, _tile(k, at, dt, rows, keys, Tn, K) * to_end, False)
    _store_tile(a_end, at, dt, rows, keys, Tn, K, _tile(a, at, dt, rows, keys, Tn, K) * to_end, False)


@triton.jit
def chunk_dplr_fwd_scores(q, k, a, b, g, gcum, scores, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, FLOOR: tl.constexpr,
                          VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """The rows of one sub-block of the four scores (scores [BH, NT, 4, BT, BT]: A_qk, A_qa,
    A_bk, A_ba; the blocks above the diagonal are left as the caller's zeros).
    Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    c, ib = sub // (BT // BC), sub % (BT // BC)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    live = rows < Tn
    keys = tl.arange(0, BK)
    base = (bh * NT + c) * 4
    q_i, b_i = _tile(q, at, dt, rows, keys, Tn, K), _tile(b, at, dt, rows, keys, Tn, K)
    cum_i, prev_i = _decays_at(g, gcum, at, dt, rows, keys, Tn, K, FLOOR)
    # the chunk's earlier sub-blocks: every pair below the diagonal, the decay split at r
    r = _row(gcum, at, dt, row0 - 1, keys, Tn, K) * (ib > 0)
    q_r, b_r = _to_reference(q_i, cum_i, r, live), _to_reference(b_i, prev_i, r, live)
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, Tn, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        from_r = tl.exp(r[:, None] - _tile_t(gcum, at, dt, cols, keys, Tn, K))        # e^{r - Γ_j} <= 1, [BK, BC]
        k_r = _tile_t(k, at, dt, cols, keys, Tn, K) * from_r
        a_r = _tile_t(a, at, dt, cols, keys, Tn, K) * from_r
        _store_block(scores, base + 0, ib * BC, jb * BC, tl.dot(q_r, k_r), BT, BC)
        _store_block(scores, base + 1, ib * BC, jb * BC, tl.dot(q_r, a_r), BT, BC)
        _store_block(scores, base + 2, ib * BC, jb * BC, tl.dot(b_r, k_r), BT, BC)
        _store_block(scores, base + 3, ib * BC, jb * BC, tl.dot(b_r, a_r), BT, BC)
    # the diagonal sub-block, column by column with the exact per-key exponents
    idx = tl.arange(0, BC)
    qk = tl.zeros([BC, BC], dtype=cum_i.dtype)
    qa = tl.zeros([BC, BC], dtype=cum_i.dtype)
    bk = tl.zeros([BC, BC], dtype=cum_i.dtype)
    ba = tl.zeros([BC, BC], dtype=cum_i.dtype)
    for jj in range(0, BC):
        col = row0 + jj
        cum_j = _row(gcum, at, dt, col, keys, Tn, K)
        k_j, a_j = _row(k, at, dt, col, keys, Tn, K), _row(a, at, dt, col, keys, Tn, K)
        incl = tl.exp(tl.where(((rows >= col) & live)[:, None], cum_i - cum_j[None, :], float("-inf")))
        strict = tl.exp(tl.where(((rows > col) & live)[:, None], prev_i - cum_j[None, :], float("-inf")))
        pick = idx[None, :] == jj
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
    rows. Program (chunk, row): per-chunk matrices only, no sequence addressing (a short
    chunk's rows past its sequence have A_ba = 0: M is the identity there)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    at = tl.arange(0, BT)
    ba_t = _square_t(scores, (bh * NT + c) * 4 + 3, BT)
    # row i of M is e_i + Σ_{j<i} A_ba[i,j] M_j: only earlier rows, and rows j >= i of M are
    # still those of I, which A_ba[i,j] = 0 leaves out
    inverse = tl.where(at[:, None] == at[None, :], 1.0, 0.0).to(ba_t.dtype)
    for i in range(1, BT):
        ba_i = tl.sum(tl.where(at[None, :] == i, ba_t, 0.0), 1)          # A_ba[i, j] along j (axis 0)
        row = tl.where(at == i, 1.0, 0.0) + tl.sum(ba_i[:, None] * inverse, 0)
        inverse = tl.where(at[:, None] == i, row[None, :], inverse)
    tl.store(solve + (bh * NT + c) * BT * BT + at[:, None] * BT + at[None, :], inverse)


@triton.jit
def chunk_dplr_fwd_wu(v, b, g, gcum, scores, solve, w, u_tilde, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FLOOR: tl.constexpr,
                      VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """W = M (b ⊙ e^{Γ⁻}) and Ũ = (M A_bk) V. Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    inverse = _square(solve, bh * NT + c, BT)
    _, prev = _decays_at(g, gcum, at, dt, rows, keys, Tn, K, FLOOR)
    w_c = tl.dot(inverse, _tile(b, at, dt, rows, keys, Tn, K) * tl.exp(prev))
    _store_tile(w, at, dt, rows, keys, Tn, K, w_c, False)
    to_values = tl.dot(inverse, _square(scores, (bh * NT + c) * 4 + 2, BT))           # M A_bk
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        _store_tile(u_tilde, at, dt, rows, vals, Tn, V, tl.dot(to_values, _tile(v, at, dt, rows, vals, Tn, V)), False)


@triton.jit
def chunk_dplr_fwd_states(k_end, a_end, v, gcum, w, u_tilde, S0, states, u, ST, cu, chunks, offsets,
                          T, K, V, NT, BH, HEADS, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """The pass over a sequence's chunks: the state before every chunk (states [BH, NT, K, V]),
    U_n = W_n S + Ũ_n and the sequence's last state ST, from its S0. Program (V block,
    sequence): the columns of a V block evolve independently (U's columns read S's only)."""
    pid_v, sid = tl.program_id(0), tl.program_id(1)
    i, bh, c0 = _sequence(sid, offsets, BH, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, sid, keys, vals, K, V)
    for n in range(0, tl.cdiv(Tn, BT)):
        _store_state(states, bh * NT + c0 + n, keys, vals, K, V, S, False)
        rows = n * BT + tl.arange(0, BT)
        u_n = _tile(u_tilde, at, dt, rows, vals, Tn, V) + tl.dot(_tile(w, at, dt, rows, keys, Tn, K), S)
        _store_tile(u, at, dt, rows, vals, Tn, V, u_n, False)
        cum_end = _row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K)
        S = S * tl.exp(cum_end)[:, None] + tl.dot(_tile_t(a_end, at, dt, rows, keys, Tn, K), u_n) \
            + tl.dot(_tile_t(k_end, at, dt, rows, keys, Tn, K), _tile(v, at, dt, rows, vals, Tn, V))
    _store_state(ST, sid, keys, vals, K, V, S, False)


@triton.jit
def chunk_dplr_fwd_output(q, v, gcum, scores, states, u, o, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                          REVERSE: tl.constexpr):
    """O = (q ⊙ e^Γ) S_0 + A_qa U + A_qk V for one chunk and V block. Program (chunk, row, V block)."""
    c, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    base = (bh * NT + c) * 4
    q_e = _tile(q, at, dt, rows, keys, Tn, K) * tl.exp(_tile(gcum, at, dt, rows, keys, Tn, K))
    out = tl.dot(q_e, _state_tile(states, bh * NT + c, keys, vals, K, V))
    out += tl.dot(_square(scores, base + 1, BT), _tile(u, at, dt, rows, vals, Tn, V))
    out += tl.dot(_square(scores, base + 0, BT), _tile(v, at, dt, rows, vals, Tn, V))
    _store_tile(o, at, dt, rows, vals, Tn, V, out, False)


@triton.jit
def chunk_dplr_bwd_readout(q, gcum, scores, do, ystates, du, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                           REVERSE: tl.constexpr):
    """The readout's parts of the reverse pass, which need no state: Y_n = (q ⊙ e^Γ)ᵀ dO
    (ystates [BH, NT, K, V]) and A_qaᵀ dO (into du, to which the pass adds its state term).
    Program (chunk, row, V block)."""
    c, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    do_n = _tile(do, at, dt, rows, vals, Tn, V)
    q_e = _tile_t(q, at, dt, rows, keys, Tn, K) * tl.exp(_tile_t(gcum, at, dt, rows, keys, Tn, K))    # [BK, BT]
    _store_state(ystates, bh * NT + c, keys, vals, K, V, tl.dot(q_e, do_n), False)
    _store_tile(du, at, dt, rows, vals, Tn, V, tl.dot(_square_t(scores, (bh * NT + c) * 4 + 1, BT), do_n), False)


@triton.jit
def chunk_dplr_bwd_dstates(a_end, gcum, w, ystates, dST, dstates, du, dS0, cu, chunks, offsets,
                           T, K, V, NT, BH, HEADS, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_DST: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """The reverse pass over a sequence's chunks: Λ_n, the gradient of the state after chunk n
    (dstates [BH, NT, K, V]), dU = A_qaᵀ dO + Â Λ_n (du: its first term is there) and dS0, by
    Λ_{n-1} = e^{Γ_C} ⊙ Λ_n + Y_n + Wᵀ dU. Program (V block, sequence)."""
    pid_v, sid = tl.program_id(0), tl.program_id(1)
    i, bh, c0 = _sequence(sid, offsets, BH, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    if HAS_DST:
        lam = _state_tile(dST, sid, keys, vals, K, V)
    else:
        lam = tl.zeros([BK, BV], dtype=dS0.dtype.element_ty)
    n_chunks = tl.cdiv(Tn, BT)
    for back in range(0, n_chunks):
        n = n_chunks - 1 - back
        _store_state(dstates, bh * NT + c0 + n, keys, vals, K, V, lam, False)
        rows = n * BT + tl.arange(0, BT)
        cum_end = _row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K)
        d_u = _tile(du, at, dt, rows, vals, Tn, V) + tl.dot(_tile(a_end, at, dt, rows, keys, Tn, K), lam)
        _store_tile(du, at, dt, rows, vals, Tn, V, d_u, False)
        lam = lam * tl.exp(cum_end)[:, None] + _state_tile(ystates, bh * NT + c0 + n, keys, vals, K, V) \
            + tl.dot(_tile_t(w, at, dt, rows, keys, Tn, K), d_u)
    _store_state(dS0, sid, keys, vals, K, V, lam, False)


@triton.jit
def chunk_dplr_bwd_dv(k_end, scores, solve, do, du, dstates, dr, dv, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                      REVERSE: tl.constexpr):
    """dR = Mᵀ dU and dV = A_qkᵀ dO + K̂ Λ_n + A_bkᵀ dR for one chunk and V block.
    Program (chunk, row, V block)."""
    c, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    base = (bh * NT + c) * 4
    d_r = tl.dot(_square_t(solve, bh * NT + c, BT), _tile(du, at, dt, rows, vals, Tn, V))
    _store_tile(dr, at, dt, rows, vals, Tn, V, d_r, False)
    d_v = tl.dot(_square_t(scores, base + 0, BT), _tile(do, at, dt, rows, vals, Tn, V)) \
        + tl.dot(_tile(k_end, at, dt, rows, keys, Tn, K), _state_tile(dstates, bh * NT + c, keys, vals, K, V)) \
        + tl.dot(_square_t(scores, base + 2, BT), d_r)
    _store_tile(dv, at, dt, rows, vals, Tn, V, d_v, False)


@triton.jit
def chunk_dplr_bwd_dscores(v, u, do, dr, d_scores, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                           BT: tl.constexpr, BV: tl.constexpr, FROM_R: tl.constexpr, VARLEN: tl.constexpr,
                           REVERSE: tl.constexpr):
    """Two of the scores' cotangents (d_scores [BH, NT, 4, BT, BT]): dA_qk = dO Vᵀ and dA_qa =
    dO Uᵀ (j <= i), or with FROM_R dA_bk = dR Vᵀ and dA_ba = dR Uᵀ (j < i); zero elsewhere
    (two launches: four [BT, BT] sums at once spill). Program (chunk, row); the V blocks
    summed in a loop."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    idx = tl.arange(0, BT)
    rows = n * BT + idx
    with_v = tl.zeros([BT, BT], dtype=d_scores.dtype.element_ty)
    with_u = tl.zeros([BT, BT], dtype=d_scores.dtype.element_ty)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        if FROM_R:
            left = _tile(dr, at, dt, rows, vals, Tn, V)
        else:
            left = _tile(do, at, dt, rows, vals, Tn, V)
        with_v += tl.dot(left, _tile_t(v, at, dt, rows, vals, Tn, V))
        with_u += tl.dot(left, _tile_t(u, at, dt, rows, vals, Tn, V))
    seen = idx[None, :] <= idx[:, None] - FROM_R          # j <= i, or j < i
    base = (bh * NT + c) * 4 + 2 * FROM_R
    _store_block(d_scores, base + 0, 0, 0, tl.where(seen, with_v, 0.0), BT, BT)
    _store_block(d_scores, base + 1, 0, 0, tl.where(seen, with_u, 0.0), BT, BT)


@triton.jit
def chunk_dplr_bwd_rows(k, a, g, gcum, states, do, dr, d_scores, dq, db, cu, chunks, offsets,
                        T, K, V, NT, BH, HEADS, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, FLOOR: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """dq, db for one sub-block of rows i: the state's (dO S_0ᵀ) ⊙ e^{Γ_i}, (dR S_0ᵀ) ⊙ e^{Γ⁻_i},
    and the scores' Σ_j (dA[i,j] (k_j, a_j)) ⊙ e^{Γx_i - Γ_j}: earlier sub-blocks by tl.dot
    through r, the diagonal one column by column. Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    c, ib = sub // (BT // BC), sub % (BT // BC)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    live = rows < Tn
    keys = tl.arange(0, BK)
    base = (bh * NT + c) * 4
    cum_i, prev_i = _decays_at(g, gcum, at, dt, rows, keys, Tn, K, FLOOR)
    from_q = tl.zeros([BC, BK], dtype=cum_i.dtype)
    from_b = tl.zeros([BC, BK], dtype=cum_i.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        S_t = _state_tile_t(states, bh * NT + c, keys, vals, K, V)
        from_q += tl.dot(_tile(do, at, dt, rows, vals, Tn, V), S_t)
        from_b += tl.dot(_tile(dr, at, dt, rows, vals, Tn, V), S_t)
    d_q = from_q * tl.exp(cum_i)
    d_b = from_b * tl.exp(prev_i)
    r = _row(gcum, at, dt, row0 - 1, keys, Tn, K) * (ib > 0)
    below_q = tl.zeros([BC, BK], dtype=cum_i.dtype)     # still times e^{-(Γx_i - r)}
    below_b = tl.zeros([BC, BK], dtype=cum_i.dtype)
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, Tn, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        from_r = tl.exp(r[None, :] - _tile(gcum, at, dt, cols, keys, Tn, K))
        k_r = _tile(k, at, dt, cols, keys, Tn, K) * from_r
        a_r = _tile(a, at, dt, cols, keys, Tn, K) * from_r
        below_q += tl.dot(_block(d_scores, base + 0, ib * BC, jb * BC, BT, BC), k_r) \
            + tl.dot(_block(d_scores, base + 1, ib * BC, jb * BC, BT, BC), a_r)
        below_b += tl.dot(_block(d_scores, base + 2, ib * BC, jb * BC, BT, BC), k_r) \
            + tl.dot(_block(d_scores, base + 3, ib * BC, jb * BC, BT, BC), a_r)
    d_q += _to_reference(below_q, cum_i, r, live)
    d_b += _to_reference(below_b, prev_i, r, live)
    # the diagonal sub-block, column by column with the exact exponents
    idx = tl.arange(0, BC)
    d_qk, d_qa, d_bk, d_ba = _diagonal_blocks(d_scores, base, ib * BC, BT, BC)
    for jj in range(0, BC):
        col = row0 + jj
        cum_j = _row(gcum, at, dt, col, keys, Tn, K)
        k_j, a_j = _row(k, at, dt, col, keys, Tn, K), _row(a, at, dt, col, keys, Tn, K)
        incl = tl.exp(tl.where(((rows >= col) & live)[:, None], cum_i - cum_j[None, :], float("-inf")))
        strict = tl.exp(tl.where(((rows > col) & live)[:, None], prev_i - cum_j[None, :], float("-inf")))
        pick = idx[None, :] == jj
        c_qk, c_qa = tl.sum(tl.where(pick, d_qk, 0.0), 1), tl.sum(tl.where(pick, d_qa, 0.0), 1)
        c_bk, c_ba = tl.sum(tl.where(pick, d_bk, 0.0), 1), tl.sum(tl.where(pick, d_ba, 0.0), 1)
        d_q += (c_qk[:, None] * k_j[None, :] + c_qa[:, None] * a_j[None, :]) * incl
        d_b += (c_bk[:, None] * k_j[None, :] + c_ba[:, None] * a_j[None, :]) * strict
    _store_tile(dq, at, dt, rows, keys, Tn, K, d_q, False)
    _store_tile(db, at, dt, rows, keys, Tn, K, d_b, False)


@triton.jit
def chunk_dplr_bwd_cols(q, b, g, gcum, v, u, dstates, d_scores, dk, da, cu, chunks, offsets,
                        T, K, V, NT, BH, HEADS, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, FLOOR: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """dk, da for one sub-block of key rows j: the state's (V Λ_nᵀ, U Λ_nᵀ) ⊙ e^{Γ_C - Γ_j},
    and the scores' Σ_i dA[i,j] (q_i ⊙ e^{Γ_i - Γ_j}, b_i ⊙ e^{Γ⁻_i - Γ_j}): later
    sub-blocks by tl.dot through their r, the diagonal one row by row. Program (sub-block, row)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    c, jb = sub // (BT // BC), sub % (BT // BC)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + jb * BC
    cols = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    base = (bh * NT + c) * 4
    cum_j = _tile(gcum, at, dt, cols, keys, Tn, K)
    cum_end = _row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K)
    from_v = tl.zeros([BC, BK], dtype=cum_j.dtype)
    from_u = tl.zeros([BC, BK], dtype=cum_j.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        lam_t = _state_tile_t(dstates, bh * NT + c, keys, vals, K, V)
        from_v += tl.dot(_tile(v, at, dt, cols, vals, Tn, V), lam_t)
        from_u += tl.dot(_tile(u, at, dt, cols, vals, Tn, V), lam_t)
    to_end = tl.exp(cum_end[None, :] - cum_j)       # cols past Tn: Γ = 0 and no v, u
    d_k = from_v * to_end
    d_a = from_u * to_end
    for ib in range(jb + 1, _sub_blocks_in(n, Tn, BT, BC)):
        row_start = n * BT + ib * BC
        rows = row_start + tl.arange(0, BC)
        live = rows < Tn
        r = _row(gcum, at, dt, row_start - 1, keys, Tn, K)
        cum_i, prev_i = _decays_at(g, gcum, at, dt, rows, keys, Tn, K, FLOOR)
        q_r = _to_reference(_tile(q, at, dt, rows, keys, Tn, K), cum_i, r, live)
        b_r = _to_reference(_tile(b, at, dt, rows, keys, Tn, K), prev_i, r, live)
        from_r = tl.exp(r[None, :] - cum_j)
        d_k += (tl.dot(_block_t(d_scores, base + 0, ib * BC, jb * BC, BT, BC), q_r)
                + tl.dot(_block_t(d_scores, base + 2, ib * BC, jb * BC, BT, BC), b_r)) * from_r
        d_a += (tl.dot(_block_t(d_scores, base + 1, ib * BC, jb * BC, BT, BC), q_r)
                + tl.dot(_block_t(d_scores, base + 3, ib * BC, jb * BC, BT, BC), b_r)) * from_r
    # the diagonal sub-block (rows i and key rows j the same steps), row by row
    idx = tl.arange(0, BC)
    d_qk, d_qa, d_bk, d_ba = _diagonal_blocks(d_scores, base, jb * BC, BT, BC)
    for ii in range(0, BC):
        row = row0 + ii
        row_live = (cols * 0 + row) < Tn
        cum_r = _row(gcum, at, dt, row, keys, Tn, K)
        prev_r = cum_r - tl.maximum(_row(g, at, dt, row, keys, Tn, K), FLOOR)
        q_row, b_row = _row(q, at, dt, row, keys, Tn, K), _row(b, at, dt, row, keys, Tn, K)
        incl = tl.exp(tl.where(((cols <= row) & row_live)[:, None], cum_r[None, :] - cum_j, float("-inf")))
        strict = tl.exp(tl.where(((cols < row) & row_live)[:, None], prev_r[None, :] - cum_j, float("-inf")))
        pick = idx[:, None] == ii
        r_qk, r_qa = tl.sum(tl.where(pick, d_qk, 0.0), 0), tl.sum(tl.where(pick, d_qa, 0.0), 0)
        r_bk, r_ba = tl.sum(tl.where(pick, d_bk, 0.0), 0), tl.sum(tl.where(pick, d_ba, 0.0), 0)
        d_k += r_qk[:, None] * q_row[None, :] * incl + r_bk[:, None] * b_row[None, :] * strict
        d_a += r_qa[:, None] * q_row[None, :] * incl + r_ba[:, None] * b_row[None, :] * strict
    _store_tile(dk, at, dt, cols, keys, Tn, K, d_k, False)
    _store_tile(da, at, dt, cols, keys, Tn, K, d_a, False)


@triton.jit
def chunk_dplr_bwd_dg(q, k, a, b, dq, dk, da, db, states, ST, dstates, dg, cu, chunks, offsets,
                      T, K, V, NT, BH, HEADS, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """dg_t = Σ_{i>=t} (q⊙dq - k⊙dk - a⊙da)_i + Σ_{i>t} (b⊙db)_i + Σ_V Λ_n ⊙ S_C (module
    docstring); S_C the state after the chunk (the next one's, or the sequence's final state
    ST[sequence * BH + row]). Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    x = _tile(q, at, dt, rows, keys, Tn, K) * _tile(dq, at, dt, rows, keys, Tn, K) \
        - _tile(k, at, dt, rows, keys, Tn, K) * _tile(dk, at, dt, rows, keys, Tn, K) \
        - _tile(a, at, dt, rows, keys, Tn, K) * _tile(da, at, dt, rows, keys, Tn, K)
    y = _tile(b, at, dt, rows, keys, Tn, K) * _tile(db, at, dt, rows, keys, Tn, K)
    grad = tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x + tl.sum(y, 0)[None, :] - tl.cumsum(y, 0)
    end = tl.zeros([BK], dtype=grad.dtype)
    last = n * BT + BT >= Tn                         # the sequence's last chunk: S_C is its final state
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        kv = keys[:, None] * V + vals[None, :]
        is_last = kv * 0 + last                      # a tile (see _row)
        mask = (keys[:, None] < K) & (vals[None, :] < V)
        after = (tl.load(states + (bh * NT + c + 1) * K * V + kv, mask=mask & (is_last == 0), other=0.0)
                 + tl.load(ST + (i * BH + bh) * K * V + kv, mask=mask & (is_last != 0), other=0.0))
        end += tl.sum(_state_tile(dstates, bh * NT + c, keys, vals, K, V) * after, 1)
    _store_tile(dg, at, dt, rows, keys, Tn, K, grad + end[None, :], False)

'''

SUB_BLOCK = 16      # BC: rows of the exact diagonal contraction; tl.dot's smallest side
MAX_BV = 32         # V blocks: the state passes run one program per V block; the others loop over them

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-dplr")

KERNEL_NAMES = ("chunk_dplr_cumsum", "chunk_dplr_fwd_scores", "chunk_dplr_fwd_solve", "chunk_dplr_fwd_wu",
                "chunk_dplr_fwd_states", "chunk_dplr_fwd_output", "chunk_dplr_bwd_readout", "chunk_dplr_bwd_dstates",
                "chunk_dplr_bwd_dv", "chunk_dplr_bwd_dscores", "chunk_dplr_bwd_rows", "chunk_dplr_bwd_cols",
                "chunk_dplr_bwd_dg")

# (num_warps, num_stages) per kernel on a GPU (tests/triton/test_chunk_dplr.py compiles
# them at K = V = 64 and 128: no spills).
LAUNCH = {name: (8, 1) for name in KERNEL_NAMES}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's options on a GPU."""
    return launcher(ns, device, lambda name: dict(zip(("num_warps", "num_stages"), LAUNCH[name])))


def chunk_size(device, K: int, T: int | None = None) -> int:
    """BT: 64 on a GPU up to K = 64, 32 above ([BT, K] tiles with the state's columns); 32
    in the interpreter (two sub-blocks of 16: the factored pairs run, and the tests' short
    sequences still cross chunks); never more than T (the longest sequence) rounded up to a
    power of two (>= the sub-block): a short sequence wastes no padded rows."""
    BT = (64 if K <= 64 else 32) if device.type == "cuda" else 32
    return BT if T is None else min(BT, max(SUB_BLOCK, triton.next_power_of_2(T)))


def _blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): all keys in one tile; V blocks of 32 columns, 16 from K = 128 on."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV if BK <= 64 else MAX_BV // 2)


def _acc_dtype(*tensors) -> torch.dtype:
    """The kernels' dtype: float64 if any input is, else float32 (bf16 / fp16 widen in the loads)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _forward(launch, q, k, v, a, b, g, S0, BT: int, seqs: Sequences):
    """(o, S_T per sequence, saved, Ũ) on contiguous [B, T, H, .] tensors (g floored in the
    loads): o in v's dtype, the rest in the accumulation dtype; saved: what the backward reads
    (Γ, K̂, Â, the scores, M, W, U and the state before every chunk); Ũ: what the state pass
    reads besides, for a backward that recomputes it."""
    B, T, H, K = k.shape
    BH, V, NT = B * H, v.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)
    acc = _acc_dtype(q, k, v, a, b, g, S0)
    where = (*seqs.args(), T, K, V, NT, BH, H)
    blocks = dict(BT=BT, BK=BK, BV=BV, **seqs.flags())

    def buffer(*shape):
        return torch.empty(shape, dtype=acc, device=k.device)
    gcum, k_end, a_end = buffer(*g.shape), buffer(*k.shape), buffer(*a.shape)
    launch("chunk_dplr_cumsum", (NT, BH))(k, a, g, gcum, k_end, a_end, *where, BT=BT, BK=BK, FLOOR=LOG_DECAY_FLOOR,
                                          **seqs.flags())
    scores = torch.zeros(BH, NT, 4, BT, BT, dtype=acc, device=k.device)    # the blocks above the diagonal stay zero
    launch("chunk_dplr_fwd_scores", (NT * (BT // SUB_BLOCK), BH))(q, k, a, b, g, gcum, scores, *where, BT=BT,
                                                                  BC=SUB_BLOCK, BK=BK, FLOOR=LOG_DECAY_FLOOR,
                                                                  **seqs.flags())
    solve, w, u_tilde = buffer(BH, NT, BT, BT), buffer(*k.shape), buffer(*v.shape)
    launch("chunk_dplr_fwd_solve", (NT, BH))(scores, solve, NT, BT=BT)
    launch("chunk_dplr_fwd_wu", (NT, BH))(v, b, g, gcum, scores, solve, w, u_tilde, *where,
                                          FLOOR=LOG_DECAY_FLOOR, **blocks)
    states, u, ST = _states(launch, k_end, a_end, v, gcum, w, u_tilde, S0, BT, seqs)
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    launch("chunk_dplr_fwd_output", (NT, BH, triton.cdiv(V, BV)))(q, v, gcum, scores, states, u, o, *where, **blocks)
    return o, ST, (gcum, k_end, a_end, scores, solve, w, u, states), u_tilde


def _states(launch, k_end, a_end, v, gcum, w, u_tilde, S0, BT: int, seqs: Sequences):
    """(the state before every chunk [BH, NT, K, V], U, S_T per sequence): the forward's
    state pass, and the backward's when it recomputes them (recdsl.recompute_chunk_states)."""
    B, T, H, K = k_end.shape
    V, NT = v.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)

    def buffer(*shape):
        return torch.empty(shape, dtype=gcum.dtype, device=v.device)
    states, u, ST = buffer(B * H, NT, K, V), buffer(*v.shape), buffer(seqs.count, K, V)
    launch("chunk_dplr_fwd_states", (triton.cdiv(V, BV), seqs.count))(k_end, a_end, v, gcum, w, u_tilde, S0, states,
                                                                      u, ST, *seqs.args(), T, K, V, NT, B * H, H,
                                                                      BT=BT, BK=BK, BV=BV, **seqs.flags())
    return states, u, ST


def _backward(launch, q, k, v, a, b, g, saved, do, dST, BT: int, seqs: Sequences):
    """(dq, dk, dv, da, db, dg, dS0) of _forward in the accumulation dtype; do None: the output
    unread (zeros), dST None: the final state unread. In order: the reverse pass (Λ, dU, dS0),
    per chunk dR and dV, the scores' cotangents, dq and db by rows, dk and da by key rows, dg."""
    gcum, k_end, a_end, scores, solve, w, u, states, ST = saved
    B, T, H, K = k.shape
    BH, V, NT = B * H, v.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)
    where = (*seqs.args(), T, K, V, NT, BH, H)
    blocks = dict(BT=BT, BK=BK, BV=BV, **seqs.flags())
    v_blocks = triton.cdiv(V, BV)

    def like(x):
        return torch.empty(x.shape, dtype=states.dtype, device=x.device)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    ystates, du = like(states), like(v)
    launch("chunk_dplr_bwd_readout", (NT, BH, v_blocks))(q, gcum, scores, do, ystates, du, *where, **blocks)
    dstates, dS0 = like(states), like(ST)
    launch("chunk_dplr_bwd_dstates", (v_blocks, seqs.count))(a_end, gcum, w, ystates,
                                                             dS0 if dST is None else dST.contiguous(), dstates, du,
                                                             dS0, *where, HAS_DST=dST is not None, **blocks)
    dr, dv = like(v), like(v)
    launch("chunk_dplr_bwd_dv", (NT, BH, v_blocks))(k_end, scores, solve, do, du, dstates, dr, dv, *where, **blocks)
    d_scores = torch.empty_like(scores)
    for from_r in (0, 1):
        launch("chunk_dplr_bwd_dscores", (NT, BH))(v, u, do, dr, d_scores, *where, BT=BT, BV=BV, FROM_R=from_r,
                                                   **seqs.flags())
    sub_grid = (NT * (BT // SUB_BLOCK), BH)
    dq, db, dk, da, dg = like(q), like(b), like(k), like(a), like(g)
    launch("chunk_dplr_bwd_rows", sub_grid)(k, a, g, gcum, states, do, dr, d_scores, dq, db, *where,
                                            BC=SUB_BLOCK, FLOOR=LOG_DECAY_FLOOR, **blocks)
    launch("chunk_dplr_bwd_cols", sub_grid)(q, b, g, gcum, v, u, dstates, d_scores, dk, da, *where,
                                            BC=SUB_BLOCK, FLOOR=LOG_DECAY_FLOOR, **blocks)
    launch("chunk_dplr_bwd_dg", (NT, BH))(q, k, a, b, dq, dk, da, db, states, ST, dstates, dg, *where, **blocks)
    return dq, dk, dv, da, db, dg, dS0


class ChunkDPLRFunction(torch.autograd.Function):
    """chunk_dplr on the Triton kernels: saves the inputs and the forward's chunk values
    (under recdsl.recompute_chunk_states Ũ instead of U and the states: the backward runs
    the state pass again);
    the backward runs the adjoint kernels. Under create_graph=True the backward
    differentiates the torch chunk form instead (by_torch: second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, reverse, cu_seqlens, q, k, v, a, b, g, S0):
        B, T, H, K = k.shape
        BT = chunk_size(k.device, K, longest(T, cu_seqlens))
        seqs = sequences(B * H, T, BT, reverse, cu_seqlens, k.device)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        o, ST, saved, u_tilde = _forward(launch, q, k, v, a, b, g, S0, BT, seqs)
        if recomputing_chunk_states():   # Ũ instead of U and the states: the backward's state pass
            saved = (*saved[:6], u_tilde, None)
        ctx.set_materialize_grads(False)
        ctx.reverse, ctx.cu, ctx.BT, ctx.seqs = reverse, cu_seqlens, BT, seqs
        ctx.save_for_backward(q, k, v, a, b, g, S0, *saved, ST)
        return o, ST.to(S0.dtype)

    @staticmethod
    def backward(ctx, do, dST):
        q, k, v, a, b, g, S0, *saved = ctx.saved_tensors
        inputs, needs = (q, k, v, a, b, g, S0), ctx.needs_input_grad[2:]
        none = (None, None)
        if wants_graph(inputs, (do, dST)):
            def twin(*xs):
                return by_torch(*xs, ctx.reverse, ctx.cu)
            return none + tuple(recompute_vjp(twin, inputs, needs, (do, dST)))
        if do is None and dST is None:
            return none + (None,) * len(inputs)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        if saved[7] is None:     # recdsl.recompute_chunk_states: the state pass again from Ũ
            gcum, k_end, a_end, scores, solve, w, u_tilde, _, ST = saved
            states, u, _ = _states(launch, k_end, a_end, v, gcum, w, u_tilde, S0, ctx.BT, ctx.seqs)
            saved = (gcum, k_end, a_end, scores, solve, w, u, states, ST)
        grads = _backward(launch, q, k, v, a, b, g, saved, do, dST, ctx.BT, ctx.seqs)
        dq, dk, dv, da, db, dg, dS0 = grads
        dg = torch.where(g >= LOG_DECAY_FLOOR, dg, 0)            # as torch.clamp's gradient
        return none + tuple(d.to(x.dtype) if need else None
                            for d, x, need in zip((dq, dk, dv, da, db, dg, dS0), inputs, needs))


def _kernel_dtypes(*tensors) -> list:
    """The inputs as the kernels load them: bf16 / fp16 / fp32 as they are when they
    accumulate in fp32 (the loads widen), all in float64 when one is float64."""
    acc = _acc_dtype(*tensors)
    return [x.contiguous() if acc == torch.float32 else x.to(acc).contiguous() for x in tensors]


def chunk_dplr_heads(q, k, v, a, b, g, S0, reverse: bool = False, cu_seqlens=None):
    """The DPLR delta rule on the layout the driver holds, read in place: q, k, a, b, g
    [B, T, H, K] (g a per-key log decay), v [B, T, H, V], S0 [B * H, K, V] (b-major, heads
    inner; with cu_seqlens (N + 1 offsets, sequences packed along T of B = 1) [N * H, K, V],
    sequence-major). `reverse`: right to left. Returns (o [B, T, H, V] in v's dtype, S_T
    [B * H or N * H, K, V] in S0's)."""
    B, T, H, K = k.shape
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=k.device)
    count = B * H if cu_seqlens is None else (len(cu_seqlens) - 1) * B * H
    if S0.shape[0] != count:
        raise ValueError(f"chunk_dplr: {count} initial states expected (one per row and sequence), got {S0.shape[0]}")
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1]), S0
    return ChunkDPLRFunction.apply(bool(reverse), cu_seqlens, *_kernel_dtypes(q, k, v, a, b, g, S0))


def chunk_dplr(q, k, v, a, b, g, S0, reverse: bool = False, cu_seqlens=None):
    """As backends/torch/dplr.chunk_dplr (same arguments, same results), on the Triton
    kernels: q, k, a, b, g [BH, T, K] (g a per-key log decay), v [BH, T, V], S0 [BH, K, V]
    ([N * BH, K, V] with cu_seqlens) -> (o [BH, T, V] in v's dtype, S_T in S0's). (The rows
    as one head each of the kernels' [B, T, H, .] layout: chunk_dplr_heads.)"""
    o, ST = chunk_dplr_heads(*(x[:, :, None] for x in (q, k, v, a, b, g)), S0, reverse, cu_seqlens)
    return o[:, :, 0], ST


def by_torch(q, k, v, a, b, g, S0, reverse: bool = False, cu_seqlens=None):
    """chunk_dplr_heads' result by the torch chunk form (dplr.chunk_dplr, on [B * H, T, .]
    rows), one call per sequence, flipped for reverse: the double backward's twin and the
    non-finite inputs' path (the torch form is causal under NaN)."""
    from ..torch import dplr
    B, T, H = k.shape[:3]
    q, k, v, a, b, g = (chunk_kernels._rows(x) for x in (q, k, v, a, b, g))

    def one(steps: slice, s0):
        def part(x):
            return x[:, steps].flip(1) if reverse else x[:, steps]
        o, S = dplr.chunk_dplr(*(part(x) for x in (q, k, v, a, b, g)), s0, chunk=dplr.CHUNK)
        return (o.flip(1) if reverse else o), S
    if cu_seqlens is None:
        o, S = one(slice(None), S0)
    else:
        BH, bounds = k.shape[0], [int(x) for x in cu_seqlens]
        parts = [one(slice(start, stop), S0[i * BH:(i + 1) * BH])
                 for i, (start, stop) in enumerate(zip(bounds, bounds[1:]))]
        o, S = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])
    return chunk_kernels._unrows(o, B, H), S


def dplr_stage(q, k, v, a, b, g, S0, first_input, ns: int, ran: list | None = None, rev: bool = False, cu=None):
    """The triton backend's ChunkDPLR stage, from the driver's whole-sequence values as
    backends/torch/scans.dplr_stage takes them ([B, T, (H), .]: read as they are, heads
    indexed by the kernels; a scalar decay broadcast over the keys); `rev` and `cu`
    (cu_seqlens, int32: sequences packed along T of a batch of one, S0 one per sequence) as
    the runtime hands them to kernels that index time themselves.

    A non-finite input runs torch's chunk form for this call instead (by_torch, per
    sequence and direction), and `ran` (the driver's record) says so: the kernels' tile
    products multiply the masked pairs (i, j > i) of a chunk too, and 0 * NaN = NaN would
    carry a later step's NaN into the earlier outputs and gradients of its chunk. One check
    per call."""
    finite = rt.all_finite(q, k, v, a, b, g)
    qh, kh, vh, ah, bh = (chunk_kernels._heads_layout(x, 1, first_input, ns) for x in (q, k, v, a, b))
    gh = chunk_kernels._heads_layout(g, g.dim() - ns, first_input, ns)
    # a scalar decay [B, T, H] broadcast over the keys (the kernels read a per-key one)
    gh = gh[..., None].expand(gh.shape + (kh.shape[-1],)) if gh.dim() == 3 else gh
    run = chunk_dplr_heads
    if not finite:
        if ran is not None:
            ran[-1] = "torch.chunk_dplr"
        run = by_torch
    o, ST = run(qh, kh, vh, ah, bh, gh, rt.to_b(S0, ns - 1), rev, cu)
    return (o if ns == 3 else o[:, :, 0]), rt.from_b(ST, S0)


# Every kernel as the GPU launches it (chunk_size's BT, LAUNCH's warps), for ahead-of-time
# compiles: (name, the constexprs beyond the block sizes, FLOOR, VARLEN and REVERSE).
_FLAGS = {"chunk_dplr_bwd_dstates": ("HAS_DST", (True, False)), "chunk_dplr_bwd_dscores": ("FROM_R", (0, 1))}
AOT_VARIANTS = [(name, {_FLAGS[name][0]: x} if name in _FLAGS else {})
                for name in LAUNCH for x in (_FLAGS[name][1] if name in _FLAGS else (None,))]
_INTS = {"T", "K", "V", "NT", "BH", "HEADS"}
_TABLES = {"cu", "chunks", "offsets"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64, varlen: bool = False, reverse: bool = False) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-dplr-aot", interpret=False)
    BK, BV = _blocks(K, V)
    sizes = {"BT": chunk_size(torch.device("cuda"), K), "BC": SUB_BLOCK, "BK": BK, "BV": BV,
             "FLOOR": LOG_DECAY_FLOOR, "VARLEN": varlen, "REVERSE": reverse}
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        const = {c: x for c, x in sizes.items() if c in fn.arg_names} | flags
        sig = {p: ("i32" if p in _INTS else "*i32" if p in _TABLES else "*fp32")
               for p in fn.arg_names if p not in const}
        warps, stages = LAUNCH[name]
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=warps, num_stages=stages,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
