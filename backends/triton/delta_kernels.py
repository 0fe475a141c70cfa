"""The triton backend's chunkwise kernels for the (gated) delta rule (the ChunkDelta form:
DeltaNet, Gated DeltaNet; and DeltaProduct's HouseholderProducts, interleaved into it),
forward and backward.

    S_t = e^{g_t} (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = q_tᵀ S_t

g is a scalar log decay per step (zeros for the ungated rule). MATH.md §4, the WY/UT form:
per chunk of BT steps with b_i the chunk-local inclusive cumulative sum of g (≤ 0), D_ij =
e^{b_i - b_j} for j ≤ i, and S the state before the chunk,

    A  = strict_lower(diag(β) (K Kᵀ ⊙ D)),      T = (I + A)⁻¹   (unit lower triangular)
    W  = T diag(β) (K ⊙ e^b),   U = T diag(β) V
    Vn = U - W S                                  (the values the chunk really writes)
    S' = e^{b_C} S + (K ⊙ e^{b_C - b})ᵀ Vn
    O  = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn

The kernels:

  delta_fwd_solve     per chunk: b (g floored at LOG_DECAY_FLOOR in the load), A and
                      T = (I + A)⁻¹ by forward substitution over the chunk's rows (row i of
                      T is e_i - Σ_{j<i} A_ij T_j: only earlier rows), its lower triangle
                      stored per chunk [BH, NT, BT, BT] for the backward
  delta_fwd_wu        per chunk: W and U
  delta_fwd_states    the state before every chunk [BH, NT, K, V], the new values Vn and
                      each sequence's last state, by a sequential pass over its chunks;
                      program (V block, sequence)
  delta_fwd_output    O per chunk (the V blocks in a loop: q and k read once)
  delta_bwd_readout   per chunk (V blocks looped), the readout's state-free parts of the reverse pass:
                      QK⋆ᵀ dO and Y_n = (Q ⊙ e^b)ᵀ dO
  delta_bwd_dstates   the reverse pass over a sequence's chunks, Λ_n the gradient of the
                      state after chunk n:
                      dVn = QK⋆ᵀ dO + (K ⊙ e^{b_C - b}) Λ_n,
                      Λ_{n-1} = e^{b_C} Λ_n + Y_n - Wᵀ dVn;  program (V block, sequence)
  delta_bwd_readout_grads, delta_bwd_state_grads, delta_bwd_solve_values, delta_bwd_pairs
                      per chunk, the adjoint of the rest (as scans._delta_backward), split so
                      that each holds few [BT, BT] / [BT, K] tiles (no spills on sm_80 / sm_90):
                      through the readout (dq; dk's and db's parts), the state update (dR_W =
                      Tᵀ dW with dW = -dVn Sᵀ), the solve (dR_U = Tᵀ dVn, dv, dR Xᵀ) and A
                      (dA = -strict(dR Xᵀ): dβ, dg; dk += (dKK + dKKᵀ) K); each adds its part
                      of dk, dβ and db to the earlier ones'; delta_bwd_pairs sums db into dg
                      (zero where g was below the floor: clamp's gradient).

Saved for the backward (not recomputed): b, T, W, U, Vn and the state before every chunk
([BH, NT, K, V]); dk is written by delta_bwd_readout_grads and added to by the later kernels.
Tiles a tl.dot takes transposed are loaded transposed (_tile_t): on sm_80 a transpose in
registers costs registers that spill -- except where the tile is needed both ways in one
kernel (k in delta_fwd_solve and delta_bwd_pairs, dR Xᵀ in delta_bwd_pairs, dP in
delta_bwd_readout_grads): there tl.dot takes tl.trans of the one load or sum (the compiles
stay spill-free), so no tile is read twice.
The [BT, BT] per-chunk matrices (T, dR Xᵀ) are triangular: only their lower triangles are
stored and read (_store_lower, _lower), half the bytes of the square.
The log decays' gradient: with db the gradient of the cumulative b (a pair b_i - b_j gives
+ to i and - to j), dg_t = Σ_{s ≥ t} db_s; db_C (e^{b_C}, e^{b_C - b_j}) is added at the
chunk's last step, so the sum carries it to every step of the chunk.

Exponents stay ≤ 0: pairs j ≤ i only (masked to -inf before the exponential, also for rows
past the sequence's end, which read b = 0), b_C - b_j with j ≤ C and b_i ≤ 0.

Layout, reverse and cu_seqlens as chunk_kernels.py's (registry caps "kernel": the runtime
neither flips nor splits): q, k, v, β, g, o and their gradients are the driver's
[B, T, H, .] tensors, read and written in place -- step t of sequence i of row bh = b * H +
head is row at + dt * t of the tensor seen as B * T * H rows (_span, its helpers included
from chunk_kernels' SOURCE); dt = -H under REVERSE. Under VARLEN the host's chunk table
(chunk_kernels.sequences: every chunk of every sequence, none straddling two) gives one
launch per kernel for all sequences, the state passes one program per (V block, sequence)
with its own initial and final state (sequence-major, heads inner). The per-step buffers
(b, W, U, Vn, their gradients) share that layout; the per-chunk ones are [BH, NT, ..] with
NT the row's chunks over all its sequences. BT (chunk_size) is at most the longest
sequence rounded up to a power of two (>= 16): a short sequence solves no padded rows.

Dtypes: bf16 / fp16 (and fp32) inputs are loaded and widened to fp32 (_widen), float64 stays
float64; the sums, the buffers and the gradients are in that accumulation dtype, the output
and gradients are returned in their inputs' dtypes. A tl.dot of float32 tiles runs in TF32
on a GPU, as fla's chunk kernels."""
from __future__ import annotations

from functools import reduce

import torch
import triton

from recdsl.memory import recomputing_chunk_states

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.scans import LOG_DECAY_FLOOR
from . import chunk_kernels
from .chunk_kernels import Sequences, longest, sequences
from .jit import jit_functions
from .launch import Kernels, launcher

# chunk_kernels' jit helpers, included as text: the in-place [B, T, H, .] addressing (_span),
# the chunk table (_chunk, _sequence), widening loads and the tile / state loads and stores.
SHARED_HELPERS = ("_widen", "_span", "_chunk", "_sequence", "_tile", "_store_tile", "_state_tile",
                  "_store_state", "_chunk_end")


SOURCE = jit_functions(chunk_kernels.SOURCE, SHARED_HELPERS, __name__) + r'''
@triton.jit
def _locate(c, bh, cu, chunks, T, HEADS, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """(n, at, dt, Tn): row bh's c-th chunk (over all its sequences) is chunk n of the
    sequence of Tn steps whose step t is row at + dt * t (_span)."""
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    return n, at, dt, Tn


@triton.jit
def _tile_t(ptr, at, dt, rows, cols, Tn, W):
    """_tile transposed, [cols, rows], loaded as such: a tl.dot operand that needs no
    transpose in registers (on sm_80 one costs registers and spills at BT = K = 64)."""
    mask = (rows[None, :] < Tn) & (cols[:, None] < W)
    return _widen(tl.load(ptr + (at + dt * rows[None, :]) * W + cols[:, None], mask=mask, other=0.0))


@triton.jit
def _steps(ptr, at, dt, rows, Tn):
    """A per-step scalar (a [B, T, H] tensor) at the sequence's steps `rows`; zeros past Tn."""
    return _widen(tl.load(ptr + at + dt * rows, mask=rows < Tn, other=0.0))


@triton.jit
def _store_steps(ptr, at, dt, rows, Tn, x):
    tl.store(ptr + at + dt * rows, x, mask=rows < Tn)


@triton.jit
def _lower(ptr, index, BT: tl.constexpr, STRICT: tl.constexpr):
    """The lower triangle (j <= i - STRICT) of the [BT, BT] matrix `index` (row * NT + chunk)
    of a contiguous [.., BT, BT] tensor, zeros above: only the triangle is stored
    (_store_lower), so only it is read -- half the bytes of the square."""
    idx = tl.arange(0, BT)
    mask = idx[None, :] <= idx[:, None] - STRICT
    return tl.load(ptr + index * BT * BT + idx[:, None] * BT + idx[None, :], mask=mask, other=0.0)


@triton.jit
def _lower_t(ptr, index, BT: tl.constexpr, STRICT: tl.constexpr):
    """_lower transposed (an upper triangle), loaded as such."""
    idx = tl.arange(0, BT)
    mask = idx[:, None] <= idx[None, :] - STRICT
    return tl.load(ptr + index * BT * BT + idx[None, :] * BT + idx[:, None], mask=mask, other=0.0)


@triton.jit
def _store_lower(ptr, index, x, BT: tl.constexpr, STRICT: tl.constexpr):
    """x's lower triangle (j <= i - STRICT) into matrix `index`; the rest is never read."""
    idx = tl.arange(0, BT)
    mask = idx[None, :] <= idx[:, None] - STRICT
    tl.store(ptr + index * BT * BT + idx[:, None] * BT + idx[None, :], x, mask=mask)


@triton.jit
def _state_tile_t(ptr, index, keys, vals, K, V):
    """The state tile `index` transposed, [vals, keys], loaded as such."""
    mask = (keys[None, :] < K) & (vals[:, None] < V)
    return _widen(tl.load(ptr + index * K * V + keys[None, :] * V + vals[:, None], mask=mask, other=0.0))


@triton.jit
def _last(x, rows, Tn, n, BT: tl.constexpr):
    """x at chunk n's last step (the last chunk may be short), as a scalar."""
    return tl.sum(tl.where(rows == _chunk_end(n, Tn, BT), x, 0.0), 0)


@triton.jit
def _pair_decay(b, rows, Tn, STRICT: tl.constexpr):
    """D_ij = e^{b_i - b_j} for the pairs j <= i - s of the chunk's steps (rows i, columns j)
    with step i before Tn, zero elsewhere: masked before the exponential, so every exponent
    is <= 0 (rows past Tn read b = 0)."""
    seen = (rows[None, :] <= rows[:, None] - STRICT) & (rows[:, None] < Tn)
    return tl.exp(tl.where(seen, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _pair_decay_t(b, rows, Tn, STRICT: tl.constexpr):
    """_pair_decay transposed (rows j, columns i), built as such."""
    seen = (rows[:, None] <= rows[None, :] - STRICT) & (rows[None, :] < Tn)
    return tl.exp(tl.where(seen, b[None, :] - b[:, None], float("-inf")))


@triton.jit
def delta_fwd_solve(k, beta, g, gcum, solve, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FLOOR: tl.constexpr,
                    VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Per chunk: b (gcum, of g floored at FLOOR) and T = (I + A)⁻¹ (solve [BH, NT, BT, BT]),
    A = strict_lower(diag(β) (K Kᵀ ⊙ D)), by forward substitution over the chunk's rows.
    Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    idx = tl.arange(0, BT)
    rows = n * BT + idx
    keys = tl.arange(0, BK)
    b = tl.cumsum(tl.maximum(_steps(g, at, dt, rows, Tn), FLOOR), 0)
    _store_steps(gcum, at, dt, rows, Tn, b)
    beta_c = _steps(beta, at, dt, rows, Tn)
    k_c = _tile(k, at, dt, rows, keys, Tn, K)      # read once: tl.dot takes its transpose too
    A = tl.dot(k_c, tl.trans(k_c)) * _pair_decay(b, rows, Tn, 1) * beta_c[:, None]
    A_t = tl.trans(A)
    # row i of T is e_i - Σ_{j<i} A_ij T_j, and rows j >= i of T are still those of I,
    # which A_ij = 0 leaves out
    inverse = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0).to(A_t.dtype)
    for i in range(1, BT):
        a_i = tl.sum(tl.where(idx[None, :] == i, A_t, 0.0), 1)          # A_ij along j (axis 0)
        row = tl.where(idx == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inverse, 0)
        inverse = tl.where(idx[:, None] == i, row[None, :], inverse)
    _store_lower(solve, bh * NT + c, inverse, BT, 0)


@triton.jit
def delta_fwd_wu(k, v, beta, gcum, solve, w, u, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                 REVERSE: tl.constexpr):
    """Per chunk: W = T diag(β) (K ⊙ e^b) and U = T diag(β) V. Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    beta_c = _steps(beta, at, dt, rows, Tn)
    inverse = _lower(solve, bh * NT + c, BT, 0)
    k_c = _tile(k, at, dt, rows, keys, Tn, K) * (beta_c * tl.exp(_steps(gcum, at, dt, rows, Tn)))[:, None]
    _store_tile(w, at, dt, rows, keys, Tn, K, tl.dot(inverse, k_c), False)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        v_c = _tile(v, at, dt, rows, vals, Tn, V) * beta_c[:, None]
        _store_tile(u, at, dt, rows, vals, Tn, V, tl.dot(inverse, v_c), False)


@triton.jit
def delta_fwd_states(k, u, w, gcum, S0, states, vnew, ST, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                     REVERSE: tl.constexpr):
    """The state before every chunk (states [BH, NT, K, V]), the new values Vn = U - W S and
    each sequence's last state ST, from its S0. Program (V block, sequence): the columns
    of a V block evolve independently."""
    pid_v, sid = tl.program_id(0), tl.program_id(1)
    i, bh, c0 = _sequence(sid, offsets, BH, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, sid, keys, vals, K, V)
    for n in range(0, tl.cdiv(Tn, BT)):
        _store_state(states, bh * NT + c0 + n, keys, vals, K, V, S, False)
        rows = n * BT + tl.arange(0, BT)
        b = _steps(gcum, at, dt, rows, Tn)
        b_end = _last(b, rows, Tn, n, BT)
        new = _tile(u, at, dt, rows, vals, Tn, V) - tl.dot(_tile(w, at, dt, rows, keys, Tn, K), S)
        _store_tile(vnew, at, dt, rows, vals, Tn, V, new, False)
        # k_j e^{b_C - b_j}: exponents <= 0 (rows past Tn have k = 0)
        k_to_end_t = _tile_t(k, at, dt, rows, keys, Tn, K) * tl.exp(b_end - b)[None, :]
        S = S * tl.exp(b_end) + tl.dot(k_to_end_t, new)
    _store_state(ST, sid, keys, vals, K, V, S, False)


@triton.jit
def delta_fwd_output(q, k, vnew, gcum, states, o, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                     REVERSE: tl.constexpr):
    """O = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn for one chunk. Program (chunk, row); the V
    blocks in a loop, so that q and k are read once (not once per V block)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, at, dt, rows, Tn)
    q_c = _tile(q, at, dt, rows, keys, Tn, K)
    scores = tl.dot(q_c, _tile_t(k, at, dt, rows, keys, Tn, K)) * _pair_decay(b, rows, Tn, 0)
    q_decayed = q_c * tl.exp(b)[:, None]
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        out = tl.dot(q_decayed, _state_tile(states, bh * NT + c, keys, vals, K, V))
        out += tl.dot(scores, _tile(vnew, at, dt, rows, vals, Tn, V))
        _store_tile(o, at, dt, rows, vals, Tn, V, out, False)


@triton.jit
def delta_bwd_readout(q, k, gcum, do, dvnew, ystates, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                      REVERSE: tl.constexpr):
    """The readout's parts of the reverse pass, which need no state: QK⋆ᵀ dO (into dvnew, to
    which the pass adds its state term) and Y_n = (Q ⊙ e^b)ᵀ dO (ystates [BH, NT, K, V]).
    Program (chunk, row); the V blocks in a loop, so that q and k are read once."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, at, dt, rows, Tn)
    q_t = _tile_t(q, at, dt, rows, keys, Tn, K)
    scores_t = tl.dot(_tile(k, at, dt, rows, keys, Tn, K), q_t) * _pair_decay_t(b, rows, Tn, 0)
    q_decayed_t = q_t * tl.exp(b)[None, :]
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_c = _tile(do, at, dt, rows, vals, Tn, V)
        _store_state(ystates, bh * NT + c, keys, vals, K, V, tl.dot(q_decayed_t, do_c), False)
        _store_tile(dvnew, at, dt, rows, vals, Tn, V, tl.dot(scores_t, do_c), False)


@triton.jit
def delta_bwd_dstates(k, w, gcum, ystates, dvnew, dstates, dST, dS0, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr,
                      VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Λ_n, the gradient of the state after chunk n (dstates [BH, NT, K, V]), the new values'
    gradient dVn = QK⋆ᵀ dO + (K ⊙ e^{b_C - b}) Λ_n (dvnew: its first term is there) and dS0
    per sequence, by the reverse pass Λ_{n-1} = e^{b_C} Λ_n + Y_n - Wᵀ dVn over the
    sequence's chunks. Program (V block, sequence)."""
    pid_v, sid = tl.program_id(0), tl.program_id(1)
    i, bh, c0 = _sequence(sid, offsets, BH, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    if HAS_DST:
        lam = _state_tile(dST, sid, keys, vals, K, V)
    else:
        lam = tl.zeros([BK, BV], dtype=dS0.dtype.element_ty)
    chunks_in = tl.cdiv(Tn, BT)
    for back in range(0, chunks_in):
        n = chunks_in - 1 - back
        _store_state(dstates, bh * NT + c0 + n, keys, vals, K, V, lam, False)
        rows = n * BT + tl.arange(0, BT)
        b = _steps(gcum, at, dt, rows, Tn)
        b_end = _last(b, rows, Tn, n, BT)
        k_to_end = _tile(k, at, dt, rows, keys, Tn, K) * tl.exp(b_end - b)[:, None]
        d_new = _tile(dvnew, at, dt, rows, vals, Tn, V) + tl.dot(k_to_end, lam)
        _store_tile(dvnew, at, dt, rows, vals, Tn, V, d_new, False)
        lam = lam * tl.exp(b_end) + _state_tile(ystates, bh * NT + c0 + n, keys, vals, K, V) \
            - tl.dot(_tile_t(w, at, dt, rows, keys, Tn, K), d_new)
    _store_state(dS0, sid, keys, vals, K, V, lam, False)


@triton.jit
def delta_bwd_readout_grads(q, k, vnew, gcum, states, do, dq, dk, db, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                            REVERSE: tl.constexpr):
    """Through O = (Q ⊙ e^b) S + lower_incl(Q Kᵀ ⊙ D) Vn, with dP = dO Vnᵀ ⊙ D (of Q Kᵀ):
    dq = dP K + (dO Sᵀ) ⊙ e^b, the readout's part of dk, dPᵀ Q, and of db (the gradient of
    the cumulative decays b, before the sum over steps): e^{b_i}'s, Σ_k (dO Sᵀ ⊙ e^b ⊙ Q), and
    each pair's exponent b_i - b_j (+ dP_ij (q_i·k_j) to i, - to j), which sum to
    Σ_k (dq ⊙ Q) - Σ_k (dPᵀ Q ⊙ K): no [BT, BT] Q Kᵀ is formed. q, k, Vn and S are read once
    (tl.dot takes dP's transpose), dO twice: a pass over the V blocks for dP, then one for
    the state term, so that few tiles are held at once (no spills on sm_80). Program
    (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, at, dt, rows, Tn)
    d_scores = tl.zeros([BT, BT], dtype=b.dtype)       # dO Vnᵀ: of lower_incl(Q Kᵀ ⊙ D)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_scores += tl.dot(_tile(do, at, dt, rows, vals, Tn, V), _tile_t(vnew, at, dt, rows, vals, Tn, V))
    d_scores = d_scores * _pair_decay(b, rows, Tn, 0)   # dP, of Q Kᵀ
    q_c = _tile(q, at, dt, rows, keys, Tn, K)
    d_k = tl.dot(tl.trans(d_scores), q_c)
    k_c = _tile(k, at, dt, rows, keys, Tn, K)
    d_b = -tl.sum(d_k * k_c, 1)
    _store_tile(dk, at, dt, rows, keys, Tn, K, d_k, False)
    # dq's state term (dO Sᵀ) ⊙ e^b = (diag(e^b) dO) Sᵀ is summed into the pairs' term: one
    # [BT, K] sum held
    d_q = tl.dot(d_scores, k_c)
    e_b = tl.exp(b)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_decayed = _tile(do, at, dt, rows, vals, Tn, V) * e_b[:, None]
        d_q += tl.dot(do_decayed, _state_tile_t(states, bh * NT + c, keys, vals, K, V))
    _store_steps(db, at, dt, rows, Tn, d_b + tl.sum(d_q * q_c, 1))
    _store_tile(dq, at, dt, rows, keys, Tn, K, d_q, False)


@triton.jit
def delta_bwd_state_grads(k, beta, gcum, solve, vnew, states, dstates, dvnew, dk, dbeta, db, d_rw,
                          cu, chunks, offsets, T, K, V, NT, BH, HEADS, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Through S' = e^{b_C} S + (K ⊙ e^{b_C - b})ᵀ Vn and Vn = U - W S: dk's and db's parts,
    and dR_W = Tᵀ dW with dW = -dVn Sᵀ (d_rw: the cotangent of diag(β) K ⊙ e^b), its part of
    dk and dβ. db_C (the whole chunk's exponent) goes to the chunk's last step: the sum over
    steps carries it to every step. Program (chunk, row); the V blocks are summed in a loop."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, at, dt, rows, Tn)
    b_end = _last(b, rows, Tn, n, BT)
    # two passes over the V blocks, so that the two [BT, K] sums are not held at once (one
    # pass spills on sm_80 at BT = K = 64); Λ is read twice
    d_w = tl.zeros([BT, BK], dtype=b.dtype)            # -dVn Sᵀ: of W
    lam_state = tl.zeros([BK], dtype=b.dtype)          # Σ_V Λ ⊙ S: of e^{b_C}
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        S_t = _state_tile_t(states, bh * NT + c, keys, vals, K, V)
        d_w -= tl.dot(_tile(dvnew, at, dt, rows, vals, Tn, V), S_t)
        lam_state += tl.sum(_state_tile_t(dstates, bh * NT + c, keys, vals, K, V) * S_t, 0)
    d_k_end = tl.zeros([BT, BK], dtype=b.dtype)        # Vn Λᵀ: of K ⊙ e^{b_C - b}
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        lam_t = _state_tile_t(dstates, bh * NT + c, keys, vals, K, V)
        d_k_end += tl.dot(_tile(vnew, at, dt, rows, vals, Tn, V), lam_t)
    d_r = tl.dot(_lower_t(solve, bh * NT + c, BT, 0), d_w)
    _store_tile(d_rw, at, dt, rows, keys, Tn, K, d_r, False)
    beta_c = _steps(beta, at, dt, rows, Tn)
    k_c = _tile(k, at, dt, rows, keys, Tn, K)
    e_b, e_to_end = tl.exp(b), tl.exp(b_end - b)
    d_rk = tl.sum(d_r * k_c, 1) * e_b
    _store_steps(dbeta, at, dt, rows, Tn, d_rk)
    d_to_end = tl.sum(d_k_end * k_c, 1) * e_to_end
    _store_tile(dk, at, dt, rows, keys, Tn, K, d_k_end * e_to_end[:, None] + d_r * (beta_c * e_b)[:, None], True)
    d_b_end = tl.sum(d_to_end, 0) + tl.sum(lam_state, 0) * tl.exp(b_end)
    d_b = _steps(db, at, dt, rows, Tn) + beta_c * d_rk - d_to_end \
        + tl.where(rows == _chunk_end(n, Tn, BT), d_b_end, 0.0)
    _store_steps(db, at, dt, rows, Tn, d_b)


@triton.jit
def delta_bwd_solve_values(v, beta, solve, u, w, dvnew, dv, dbeta, d_rw, d_pairs, cu, chunks, offsets,
                           T, K, V, NT, BH, HEADS, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Through [U | W] = T diag(β) [V | K ⊙ e^b]: dR_U = Tᵀ dVn, dv = β dR_U, its part of dβ,
    and dR Xᵀ = dR_U Uᵀ + dR_W Wᵀ (d_pairs [BH, NT, BT, BT], for delta_bwd_pairs). Program
    (chunk, row); the V blocks are summed in a loop."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    beta_c = _steps(beta, at, dt, rows, Tn)
    inverse_t = _lower_t(solve, bh * NT + c, BT, 0)
    d_rx = tl.dot(_tile(d_rw, at, dt, rows, keys, Tn, K), _tile_t(w, at, dt, rows, keys, Tn, K))
    d_beta = _steps(dbeta, at, dt, rows, Tn)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        d_ru = tl.dot(inverse_t, _tile(dvnew, at, dt, rows, vals, Tn, V))
        _store_tile(dv, at, dt, rows, vals, Tn, V, d_ru * beta_c[:, None], False)
        d_beta += tl.sum(d_ru * _tile(v, at, dt, rows, vals, Tn, V), 1)
        d_rx += tl.dot(d_ru, _tile_t(u, at, dt, rows, vals, Tn, V))
    _store_steps(dbeta, at, dt, rows, Tn, d_beta)
    _store_lower(d_pairs, bh * NT + c, d_rx, BT, 1)    # only its strict lower triangle is read


@triton.jit
def delta_bwd_pairs(k, beta, g, gcum, d_pairs, dbeta, db, dg, dk, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FLOOR: tl.constexpr,
                    VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Through A = diag(β) strict(K Kᵀ ⊙ D) with dA = -dR Xᵀ strictly below the diagonal (dR Xᵀ
    read from d_pairs): the rest of dβ, the pairs' part of db, dg_t = Σ_{s >= t} db_s, zero
    where g_t < FLOOR (the floor's gradient, as torch.clamp's), and dk += (dKK + dKKᵀ) K with
    dKK = dA ⊙ D the cotangent of K Kᵀ (both sides of the product are keys). k and dR Xᵀ are
    read once, their transposes taken by tl.dot. Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n, at, dt, Tn = _locate(c, bh, cu, chunks, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b = _steps(gcum, at, dt, rows, Tn)
    beta_c = _steps(beta, at, dt, rows, Tn)
    k_c = _tile(k, at, dt, rows, keys, Tn, K)
    d_rx = _lower(d_pairs, bh * NT + c, BT, 1) * _pair_decay(b, rows, Tn, 1)        # (dR Xᵀ ⊙ D), strict
    kk = tl.dot(k_c, tl.trans(k_c))
    d_rx_kk = d_rx * kk
    _store_steps(dbeta, at, dt, rows, Tn, _steps(dbeta, at, dt, rows, Tn) - tl.sum(d_rx_kk, 1))
    pairs = -d_rx_kk * beta_c[:, None]                 # dA ⊙ A / β: each pair's b_i - b_j, + to i, - to j
    d_b = _steps(db, at, dt, rows, Tn) + tl.sum(pairs, 1) - tl.sum(pairs, 0)
    d_g = tl.sum(d_b, 0) - tl.cumsum(d_b, 0) + d_b     # Σ_{s >= t} db_s
    _store_steps(dg, at, dt, rows, Tn, tl.where(_steps(g, at, dt, rows, Tn) >= FLOOR, d_g, 0.0))
    d_kk = -d_rx * beta_c[:, None]
    d_k = tl.dot(d_kk, k_c) + tl.dot(tl.trans(d_kk), k_c)
    _store_tile(dk, at, dt, rows, keys, Tn, K, d_k, True)
'''

MAX_BV = 32         # V blocks: the state passes run one program per V block; the others loop over them
KERNEL_NAMES = ("delta_fwd_solve", "delta_fwd_wu", "delta_fwd_states", "delta_fwd_output", "delta_bwd_readout",
                "delta_bwd_dstates", "delta_bwd_readout_grads", "delta_bwd_state_grads",
                "delta_bwd_solve_values", "delta_bwd_pairs")

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-delta")

# (num_warps, num_stages) per kernel on a GPU (tests/triton/test_chunk_delta.py compiles
# them at K = V = 64 and 128: no spills).
LAUNCH = {name: (8, 1) for name in KERNEL_NAMES}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's options on a GPU."""
    return launcher(ns, device, lambda name: dict(zip(("num_warps", "num_stages"), LAUNCH[name])))


def chunk_size(device, K: int) -> int:
    """BT: 64 on a GPU (fla's chunk size for the delta rule) up to K = 64, 32 above (the
    backward's [BT, K] tiles spill at BT = 64, K = 128 on sm_80 / sm_90); 32 in the
    interpreter, where the tests' short sequences still cross chunks."""
    return (64 if K <= 64 else 32) if device.type == "cuda" else 32


def _chunk_for(device, K: int, T: int) -> int:
    """chunk_size, never more than the longest sequence rounded up to a power of two (>= 16,
    tl.dot's smallest side): a short sequence solves no padded rows."""
    return min(chunk_size(device, K), max(16, triton.next_power_of_2(T)))


def _blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): all keys in one tile; V blocks of 32 columns, 16 from K = 128 on (the state
    passes hold [BT, K] tiles of k and w with the state's [K, BV] columns)."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV if BK <= 64 else MAX_BV // 2)


def _acc_dtype(*tensors) -> torch.dtype:
    """The accumulation dtype: float64 if any input is, else float32 (bf16 / fp16 widen)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _forward(launch, q, k, v, beta, g, S0, BT: int, seqs: Sequences):
    """(o, S_T per sequence, saved) on contiguous [B, T, H, .] tensors: o in the inputs'
    dtype, the rest in the accumulation dtype; saved: what the backward reads (b, T, U, W,
    Vn and the state before every chunk)."""
    B, T, H, K = k.shape
    BH, V, NT = B * H, v.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)
    acc = _acc_dtype(q, k, v, beta, g, S0)
    where = (*seqs.args(), T, K, V, NT, BH, H)
    blocks = dict(BT=BT, BK=BK, BV=BV, **seqs.flags())

    def buffer(*shape):
        return torch.empty(shape, dtype=acc, device=k.device)
    gcum, solve = buffer(*g.shape), buffer(BH, NT, BT, BT)
    launch("delta_fwd_solve", (NT, BH))(k, beta, g, gcum, solve, *where, FLOOR=LOG_DECAY_FLOOR, **blocks)
    w, u = buffer(*k.shape), buffer(*v.shape)
    launch("delta_fwd_wu", (NT, BH))(k, v, beta, gcum, solve, w, u, *where, **blocks)
    states, new, ST = _states(launch, k, u, w, gcum, S0, BT, seqs)
    o = torch.empty(v.shape, dtype=reduce(torch.promote_types, (q.dtype, k.dtype, v.dtype)), device=v.device)
    launch("delta_fwd_output", (NT, BH))(q, k, new, gcum, states, o, *where, **blocks)
    return o, ST, (gcum, solve, u, w, new, states)


def _states(launch, k, u, w, gcum, S0, BT: int, seqs: Sequences):
    """(the state before every chunk [BH, NT, K, V], the chunks' new values Vn, S_T per
    sequence): the forward's state pass, and the backward's when it recomputes them
    (recdsl.recompute_chunk_states)."""
    B, T, H, K = k.shape
    V, NT = u.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)

    def buffer(*shape):
        return torch.empty(shape, dtype=gcum.dtype, device=k.device)
    states, new, ST = buffer(B * H, NT, K, V), buffer(*u.shape), buffer(seqs.count, K, V)
    launch("delta_fwd_states", (triton.cdiv(V, BV), seqs.count))(k, u, w, gcum, S0, states, new, ST, *seqs.args(),
                                                                 T, K, V, NT, B * H, H, BT=BT, BK=BK, BV=BV,
                                                                 **seqs.flags())
    return states, new, ST


def _backward(launch, q, k, v, beta, g, saved, do, dST, BT: int, seqs: Sequences):
    """(dq, dk, dv, dβ, dg, dS0) of _forward in the accumulation dtype; do None: the output
    unread (zeros), dST None: the final state unread. The kernels run in order: the
    readout's state-free parts, the reverse pass, then per chunk the readout's, the state
    update's, the solve's and A's adjoints (each adds its parts of dk, dβ and db to the
    earlier ones')."""
    gcum, solve, u, w, new, states = saved
    B, T, H, K = k.shape
    BH, V, NT = B * H, v.shape[-1], seqs.NT
    BK, BV = _blocks(K, V)
    where = (*seqs.args(), T, K, V, NT, BH, H)
    blocks = dict(BT=BT, BK=BK, BV=BV, **seqs.flags())
    v_blocks = triton.cdiv(V, BV)

    def like(x):
        return torch.empty(x.shape, dtype=states.dtype, device=x.device)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    d_new, ystates = like(v), like(states)
    launch("delta_bwd_readout", (NT, BH))(q, k, gcum, do, d_new, ystates, *where, **blocks)
    dstates, dS0 = like(states), torch.empty(seqs.count, K, V, dtype=states.dtype, device=k.device)
    launch("delta_bwd_dstates", (v_blocks, seqs.count))(k, w, gcum, ystates, d_new, dstates,
                                                        dS0 if dST is None else dST.contiguous(), dS0, *where,
                                                        HAS_DST=dST is not None, **blocks)
    dq, dk, dv, d_rw = like(q), like(k), like(v), like(k)
    dbeta, db, dg = like(gcum), like(gcum), like(gcum)
    launch("delta_bwd_readout_grads", (NT, BH))(q, k, new, gcum, states, do, dq, dk, db, *where, **blocks)
    launch("delta_bwd_state_grads", (NT, BH))(k, beta, gcum, solve, new, states, dstates, d_new, dk, dbeta, db, d_rw,
                                              *where, **blocks)
    d_pairs = like(solve)
    launch("delta_bwd_solve_values", (NT, BH))(v, beta, solve, u, w, d_new, dv, dbeta, d_rw, d_pairs, *where, **blocks)
    launch("delta_bwd_pairs", (NT, BH))(k, beta, g, gcum, d_pairs, dbeta, db, dg, dk, *where, FLOOR=LOG_DECAY_FLOOR,
                                        **blocks)
    return dq, dk, dv, dbeta, dg, dS0


class ChunkDeltaFunction(torch.autograd.Function):
    """chunk_delta on the Triton kernels: saves the inputs, b, T, U, W, Vn and the state
    before every chunk (or, under recdsl.recompute_chunk_states, not the last two: the
    backward runs the state pass again); the backward runs the adjoint kernels. Under create_graph=True the
    backward differentiates the torch chunk form instead (by_torch: second derivatives are
    autograd's)."""

    @staticmethod
    def forward(ctx, gated, reverse, cu_seqlens, q, k, v, beta, g, S0):
        B, T, H, K = k.shape
        BT = _chunk_for(k.device, K, longest(T, cu_seqlens))
        seqs = sequences(B * H, T, BT, reverse, cu_seqlens, k.device)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        o, ST, saved = _forward(launch, q, k, v, beta, g, S0, BT, seqs)
        ctx.set_materialize_grads(False)
        ctx.gated, ctx.reverse, ctx.cu, ctx.BT, ctx.seqs = gated, reverse, cu_seqlens, BT, seqs
        if recomputing_chunk_states():      # neither the states nor the new values are kept
            saved = (*saved[:4], None, None)
        ctx.save_for_backward(q, k, v, beta, g, S0, *saved)
        return o, ST.to(S0.dtype)

    @staticmethod
    def backward(ctx, do, dST):
        q, k, v, beta, g, S0, *saved = ctx.saved_tensors
        inputs, needs = (q, k, v, beta, g, S0), ctx.needs_input_grad[3:]
        none = (None, None, None)
        if wants_graph(inputs, (do, dST)):
            def twin(q, k, v, beta, g, S0):
                return by_torch(q, k, v, beta, g if ctx.gated else None, S0, ctx.reverse, ctx.cu)
            return none + tuple(recompute_vjp(twin, inputs, needs, (do, dST)))
        if do is None and dST is None:
            return none + (None,) * len(inputs)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        if saved[-1] is None:    # recdsl.recompute_chunk_states: the state pass again
            gcum, solve, u, w = saved[:4]
            states, new, _ = _states(launch, k, u, w, gcum, S0, ctx.BT, ctx.seqs)
            saved = (gcum, solve, u, w, new, states)
        dq, dk, dv, dbeta, dg, dS0 = _backward(launch, q, k, v, beta, g, saved, do, dST, ctx.BT, ctx.seqs)
        got = (None if do is None else dq, dk, dv, dbeta, dg if ctx.gated else None, dS0)
        return none + tuple(d.to(x.dtype) if need and d is not None else None
                            for d, x, need in zip(got, inputs, needs))


def chunk_delta_heads(q, k, v, beta, g, S0, reverse: bool = False, cu_seqlens=None):
    """The delta rule on the layout the driver holds, read in place: q, k [B, T, H, K], v
    [B, T, H, V], beta [B, T, H], g [B, T, H] log decays or None (ungated), S0 [B * H, K, V]
    (b-major, heads inner; with cu_seqlens (N + 1 offsets, sequences packed along T of
    B = 1) [N * H, K, V], sequence-major). `reverse`: right to left. Returns (o [B, T, H, V]
    in the inputs' dtype, S_T [B * H or N * H, K, V] in S0's)."""
    B, T, H, K = k.shape
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=k.device)
    count = B * H if cu_seqlens is None else (len(cu_seqlens) - 1) * B * H
    if S0.shape[0] != count:
        raise ValueError(f"chunk_delta: {count} initial states expected (one per row and sequence), got {S0.shape[0]}")
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1]), S0
    gated = g is not None
    g = g.contiguous() if gated else beta.new_zeros(beta.shape)
    return ChunkDeltaFunction.apply(gated, bool(reverse), cu_seqlens, q.contiguous(), k.contiguous(), v.contiguous(),
                                    beta.contiguous(), g, S0.contiguous())


def chunk_delta(q, k, v, beta, g, S0, reverse: bool = False, cu_seqlens=None):
    """As backends/torch/scans.chunk_delta, on the Triton kernels: q, k [BH, T, K], v
    [BH, T, V], beta [BH, T], g [BH, T] log decays or None (ungated), S0 [BH, K, V] ([N * BH,
    K, V] with cu_seqlens). Returns (o [BH, T, V], S_T). (The rows as one head each of the
    kernels' [B, T, H, .] layout: chunk_delta_heads.)"""
    o, ST = chunk_delta_heads(q[:, :, None], k[:, :, None], v[:, :, None], beta[:, :, None],
                              None if g is None else g[:, :, None], S0, reverse, cu_seqlens)
    return o[:, :, 0], ST


def by_torch(q, k, v, beta, g, S0, reverse: bool = False, cu_seqlens=None):
    """chunk_delta_heads' result by the torch chunk form (scans.chunk_delta, on [B * H, T, .]
    rows), one call per sequence, flipped for reverse: the double backward's twin and the
    non-finite inputs' path (the torch form is causal under NaN)."""
    from ..torch import scans
    B, T, H = k.shape[:3]
    q, k, v, beta = (chunk_kernels._rows(x) for x in (q, k, v, beta))
    g = None if g is None else chunk_kernels._rows(g)

    def one(steps: slice, s0):
        def part(x):
            return None if x is None else x[:, steps].flip(1) if reverse else x[:, steps]
        if part(k).shape[1] == 0:
            return v.new_zeros(v.shape[0], 0, v.shape[-1]), s0
        o, S = scans.chunk_delta(part(q), part(k), part(v), part(beta), part(g), s0)
        return (o.flip(1) if reverse else o), S
    if cu_seqlens is None:
        o, S = one(slice(None), S0)
    else:
        BH, bounds = k.shape[0], [int(x) for x in cu_seqlens]
        parts = [one(slice(a, b), S0[i * BH:(i + 1) * BH]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        o, S = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])
    return chunk_kernels._unrows(o, B, H), S


def delta_stage(q, k, v, beta, g, S0, first_input, ns: int, ran: list | None = None, rev: bool = False, cu=None):
    """The triton backend's ChunkDelta stage, from the driver's whole-sequence values as
    backends/torch/scans.delta_stage takes them ([B, T, (H), .]: read as they are, heads
    indexed by the kernels); `rev` and `cu` (cu_seqlens, int32: sequences packed along T of
    a batch of one, S0 one per sequence) as the runtime hands them to kernels that index
    time themselves.

    A non-finite input runs torch's chunk form for this call instead (by_torch), and `ran`
    (the driver's record) says so: the kernels' tile products (K Kᵀ, Q Kᵀ, W S) multiply the
    masked pairs (i, j > i) of a chunk too, and 0 * NaN = NaN would carry a later step's NaN
    into the earlier outputs and gradients of its chunk. One check per call."""
    finite = rt.all_finite(q, k, v, beta, g)
    qh, kh, vh = (chunk_kernels._heads_layout(x, 1, first_input, ns) for x in (q, k, v))
    beta_h = chunk_kernels._heads_layout(beta, 0, first_input, ns)
    g_h = None if g is None else chunk_kernels._heads_layout(g, 0, first_input, ns)
    run = chunk_delta_heads
    if not finite:
        if ran is not None:
            ran[-1] = "torch.chunk_delta"
        run = by_torch
    o, ST = run(qh, kh, vh, beta_h, g_h, rt.to_b(S0, ns - 1), rev, cu)
    return (o if ns == 3 else o[:, :, 0]), rt.from_b(ST, S0)


def delta_product_stage(q, ks: list, vs: list, betas: list, S0, first_input, ns: int, ran: list | None = None,
                        rev: bool = False, cu=None):
    """DeltaProduct (HouseholderProducts) on the same kernels: the n steps of every token
    interleaved into one delta rule over T * n steps (one launch for all sequences), read out
    after each token's last applied step. `rev` and `cu` as delta_stage takes them.

    The kernels walk the interleaved rows in their own direction, so under reverse (right to
    left) a token's steps are laid out last first ([t0 s_{n-1} .. t0 s0, t1 s_{n-1} ..]): the
    walk then applies s0 .. s_{n-1} in order, and the token's last applied step is the first
    of its n rows. Under cu_seqlens a sequence [a, b) of tokens is rows [a * n, b * n).

    A non-finite input runs torch's chunk form on the same interleaved rows (by_torch,
    causal under NaN), and `ran` says so, as delta_stage does."""
    steps = len(ks)
    order = slice(None, None, -1) if rev else slice(None)

    def interleaved(xs, rank):
        return _interleave_steps([chunk_kernels._heads_layout(x, rank, first_input, ns) for x in xs[order]])
    queries = chunk_kernels._heads_layout(q, 1, first_input, ns)
    run = chunk_delta_heads
    if not rt.all_finite(q, *ks, *vs, *betas):
        if ran is not None:
            ran[-1] = "torch.delta_product"
        run = by_torch
    o, ST = run(_repeat_steps(queries, steps), interleaved(ks, 1), interleaved(vs, 1), interleaved(betas, 0), None,
                rt.to_b(S0, ns - 1), rev, None if cu is None else cu * steps)
    last_applied = 0 if rev else steps - 1
    o = o.reshape((o.shape[0], -1, steps) + tuple(o.shape[2:]))[:, :, last_applied]
    return (o if ns == 3 else o[:, :, 0]), rt.from_b(ST, S0)


def _interleave_steps(steps: list) -> torch.Tensor:
    """n tensors [B, T, H, *node] (a token's steps, in the order the rows are to hold them)
    as one sequence [B, T * n, H, *node]: token t's steps are rows t * n .. t * n + n - 1."""
    stacked = torch.stack(steps, 2)   # [B, T, n, H, *node]
    return stacked.reshape((stacked.shape[0], -1) + tuple(stacked.shape[3:]))


def _repeat_steps(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x [B, T, H, *node] on every one of a token's rows: only the last applied step's
    readout is kept, the others read the same query for nothing."""
    return _interleave_steps([x] * steps)


# Every kernel as the GPU launches it (chunk_size's BT, LAUNCH's warps), for ahead-of-time compiles:
# (name, the constexprs beyond the block sizes, FLOOR, VARLEN and REVERSE).
AOT_VARIANTS = [
    ("delta_fwd_solve", {}),
    ("delta_fwd_wu", {}),
    ("delta_fwd_states", {}),
    ("delta_fwd_output", {}),
    ("delta_bwd_readout", {}),
    ("delta_bwd_dstates", {"HAS_DST": True}),
    ("delta_bwd_dstates", {"HAS_DST": False}),
    ("delta_bwd_readout_grads", {}),
    ("delta_bwd_state_grads", {}),
    ("delta_bwd_solve_values", {}),
    ("delta_bwd_pairs", {}),
]
_INTS = {"T", "K", "V", "NT", "BH", "HEADS"}
_TABLES = {"cu", "chunks", "offsets"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64, varlen: bool = False, reverse: bool = False) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-delta-aot", interpret=False)
    BK, BV = _blocks(K, V)
    sizes = {"BT": chunk_size(torch.device("cuda"), K), "BK": BK, "BV": BV, "FLOOR": LOG_DECAY_FLOOR,
             "VARLEN": varlen, "REVERSE": reverse}
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        const = {k: v for k, v in sizes.items() if k in fn.arg_names} | flags
        sig = {a: ("i32" if a in _INTS else "*i32" if a in _TABLES else "*fp32")
               for a in fn.arg_names if a not in const}
        warps, stages = LAUNCH[name]
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=warps, num_stages=stages,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
