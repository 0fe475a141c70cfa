"""The triton backend's chunkwise kernels for matrix states with diagonal decay (the
ChunkDiag form: GLA, GSA, HGRN2, RWKV-6, Mamba-2 / SSD, mLSTM's matrix memory, lightning and
linear attention), forward and backward.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t (inclusive) or q_tᵀ S_{t-1} (strict)

g is a scalar per step (SCALAR) or a vector over keys, in log space. MATH.md §3, per chunk
of BT steps with b_i the chunk-local inclusive cumulative sum of g (≤ 0) and S the state
before the chunk:

    o_i  = (q_i ⊙ e^{b_i}) S + Σ_{j ≤ i-s} [Σ_k q_ik k_jk e^{b_ik - b_jk}] v_j
    S'   = e^{b_C} ⊙ S + (K ⊙ e^{b_C - b})ᵀ V

(for a strict readout b_i is read as b_{i-1} = b_i - g_i and s = 1). The kernels:

  chunk_diag_cumsum      b per chunk, once (every other kernel loads it: rows, tiles)
  chunk_diag_fwd_states  the state before every chunk [BH, NT, K, V] and each sequence's
                         last, by a sequential pass over the chunks; one program per
                         (V block, sequence)
  chunk_diag_fwd_output  a readout's outputs; one program per (sub-block of BC rows, row,
                         V block): the state term, the earlier sub-blocks of the chunk as
                         tl.dot with the decay factored through a reference r (below), and
                         the diagonal sub-block as the exact per-key contraction
  chunk_diag_fwd_output_scalar  the same under a SCALAR decay, one program per (chunk, row,
                         V block): q, k, v of the chunk read once (the sub-block kernel
                         re-reads each earlier sub-block's k and v per sub-block of rows):
                         (q_i e^{b_i}) S + ((Q Kᵀ) ⊙ D) V, D_ij = e^{b_i - b_j} for j <= i - s,
                         its exponent masked to -inf elsewhere before the exponential
  chunk_diag_bwd_dstates the adjoint recurrence, a reverse pass over chunks:
                         Λ_{n-1} = e^{b_C} ⊙ Λ_n + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ
  chunk_diag_bwd_dq      dq per sub-block of rows
  chunk_diag_bwd_dq_scalar  the same under a SCALAR decay per whole chunk (one program per
                         (chunk, row)): dq = (dO Sᵀ) ⊙ e^{b_i} + ((dO Vᵀ) ⊙ D) K. dk / dv keep
                         the sub-block kernel for both decays: one program per chunk holding
                         q, k, dk and the [BT, BT] pair tiles spilled on sm_80 at BT = 64
  chunk_diag_bwd_dkv     dk, dv per sub-block of keys (the readouts' pairs and the state's Λ)
  chunk_diag_bwd_dg      the log decays' gradient: with db the gradient of the cumulative b,
                         dg_t = Σ_{s ≥ t} db_s, which sums to
                         Σ_{i ≥ t+s} q_i ⊙ dq_i - Σ_{j ≥ t} k_j ⊙ dk_j + Σ_V Λ_n ⊙ S_after

Exponents stay ≤ 0: between sub-blocks I > J of a chunk the pair exponent b_i - b_j splits
at r = b at the last row before sub-block I into (b_i - r) ≤ 0 and (r - b_j) ≤ 0, so the
two factors are tl.dot operands; inside a sub-block the pairs are summed exactly, masked
before the exponential. Nothing forms e^{-b} over a chunk (it overflows under strong decay).

Several readouts of one state (e.g. q_t @ S' and q_t @ S) run the per-readout kernels once
each: the adjoint is linear in the readouts' cotangents, so the later launches accumulate
(ACCUMULATE) and only the first adds the state's own terms (WITH_STATE).

The log decays are floored at LOG_DECAY_FLOOR in the kernels' loads of g (FLOOR, as
delta_kernels and chunk_dplr_kernels: no clamped copy of g), and dg is zero where g < FLOOR
(torch.clamp's gradient), in chunk_diag_bwd_dg. A readout may read c q for a constant c (the
driver's `q * K**-0.5`, passed as (q, inclusive, c)): the output kernels store c (q S), and the
backward kernels scale do at its load, as every gradient pairing q' = c q with do is the same
with (q, c do), and dq = c dq'(do) = dq'(c do); dg's q' ⊙ dq' = q ⊙ dq needs nothing.

Reverse and cu_seqlens are the kernels' own (registry caps "kernel": the runtime neither
flips nor splits). Every kernel addresses step t of a sequence as row at + dt * t of its
row's memory (_span): dt = -1 under REVERSE, so the recurrence runs right to left with no
copy. Under VARLEN the rows hold sequences packed along T (cu_seqlens, as fla's); the host
numbers every chunk of every sequence once (_Sequences: a table of (sequence, chunk), as
fla's prepare_chunk_indices, and each sequence's first chunk), so one launch per kernel
covers all sequences, no chunk straddles two, and the state kernels run one program per
(V block, sequence) with its own initial and final state (sequence-major, heads inner,
as the runtime orders them).

Dtypes: bf16 / fp16 (and fp32) inputs are loaded and widened to fp32 (_widen), float64
stays float64; sums, exponents, the chunk states and the gradient buffers are in that
accumulation dtype, outputs and gradients are returned in their inputs' dtypes. A tl.dot of
float32 tiles runs in TF32 on a GPU, as fla's chunk kernels.

Block sizes and warps (choose_blocks, shown in `recdsl inspect --stage triton`), per shape:
  BK = the keys padded to a power of two >= 16: the state kernels hold whole [BK, BV]
       columns of the state, every other kernel [BT or BC, BK] tiles;
  BT = 64 on a GPU (fla's chunk for GLA), 32 when BK > 128 (the [BT, BK] tiles of q, k, b
       and their products would not fit the registers); never more than the longest
       sequence rounded up to a power of two (>= BC): a short T wastes no padded rows.
       In the interpreter 32 (a chunk's tile ops are numpy calls; the tests' short
       sequences still cross chunks);
  BC = 16, tl.dot's smallest side: the exact per-key contraction runs over BC x BC pairs;
  BV = V padded, at most 32 (16 when BK > 64, or for float64 state tiles on a GPU): the
       state kernels run one program per V block, so a smaller BV means more programs and
       smaller [BK, BV] tiles;
  warps: 16 when BK >= 128, 8 when a [BT, BK] tile has 64 x 64 elements or more, else 4
       (fewer registers per thread for the same tiles: no spills at K = 128); num_stages 1
       (multi-buffered loops spill the [64, 64] tiles on sm_80 / sm_90) except the dk/dv
       kernel's 2 on sm_80 and newer (compute capability known; 1 below sm_80, whose
       shared memory is smaller). tests/triton/test_chunk_diag.py compiles the kernels
       ahead of time at K = V = 64 and 128 for sm_80 / sm_90: no spills.
The exponent-bounding masks keep every exponent <= 0 also for rows past Tn (they read b = 0)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import torch
import triton

from recdsl.memory import recomputing_chunk_states

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.scans import LOG_DECAY_FLOOR
from .launch import Kernels, launcher
SOURCE = r'''
@triton.jit
def _widen(x):
    """A load in the accumulation dtype: bf16 / fp16 to fp32, fp32 and fp64 as they are."""
    if x.dtype.is_fp64():
        y = x
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _span(i, bh, cu, T, HEADS, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """(at, dt, Tn): step t (in the recurrence's order, t < Tn) of sequence i of row bh is
    row at + dt * t of a contiguous [B, T, HEADS, ..] tensor seen as B * T * HEADS rows (bh =
    b * HEADS + head: the layout the driver holds, read in place -- no copy to [B * HEADS, T]).
    VARLEN: the sequences of cu_seqlens packed along T (else the row is one sequence of T
    steps); REVERSE: the recurrence runs right to left, so step 0 is the sequence's last row."""
    if VARLEN:
        bos = tl.load(cu + i)
        Tn = tl.load(cu + i + 1) - bos
    else:
        bos = i * 0
        Tn = T + i * 0
    first = (bh // HEADS) * T + bos
    if REVERSE:
        at = (first + Tn - 1) * HEADS + bh % HEADS
        dt = -HEADS
    else:
        at = first * HEADS + bh % HEADS
        dt = HEADS
    return at, dt, Tn


@triton.jit
def _chunk(c, chunks, VARLEN: tl.constexpr):
    """(sequence, chunk of that sequence) of a row's c-th chunk: under VARLEN the host's
    table (every chunk of every sequence, in order; none straddles two), else (0, c)."""
    if VARLEN:
        i = tl.load(chunks + 2 * c)
        n = tl.load(chunks + 2 * c + 1)
    else:
        i = c * 0
        n = c
    return i, n


@triton.jit
def _sequence(sid, offsets, BH, VARLEN: tl.constexpr):
    """(sequence, row, its first chunk in the row's chunk list) of the program for initial
    state sid: sid = sequence * BH + row under VARLEN (the initial states' order), else the row."""
    if VARLEN:
        i = sid // BH
        bh = sid % BH
        c0 = tl.load(offsets + i)
    else:
        i = sid * 0
        bh = sid
        c0 = sid * 0
    return i, bh, c0


@triton.jit
def _tile(ptr, at, dt, rows, cols, Tn, W):
    """The [rows, cols] tile of a contiguous [B, T, HEADS, W] tensor, rows the steps of the sequence
    at (at, dt) (see _span); zeros outside. In the accumulation dtype (see _widen)."""
    mask = (rows[:, None] < Tn) & (rows[:, None] >= 0) & (cols[None, :] < W)
    return _widen(tl.load(ptr + (at + dt * rows[:, None]) * W + cols[None, :], mask=mask, other=0.0))


@triton.jit
def _row(ptr, at, dt, t, cols, Tn, W):
    """Step t of the sequence at (at, dt) of a contiguous [B, T, HEADS, W] tensor; zeros outside."""
    steps = t + 0 * cols        # a vector: the interpreter rejects a scalar & vector mask
    mask = (cols < W) & (steps < Tn) & (steps >= 0)
    return _widen(tl.load(ptr + (at + dt * t) * W + cols, mask=mask, other=0.0))


@triton.jit
def _decay_tile(ptr, at, dt, rows, keys, Tn, K, SCALAR: tl.constexpr):
    """A [rows, keys] tile of a log decay (or its cumulative sum): [B, T, HEADS] broadcast over
    the keys when SCALAR, else [B, T, HEADS, K]."""
    if SCALAR:
        mask = (rows[:, None] < Tn) & (rows[:, None] >= 0) & (keys[None, :] < K)
        x = _widen(tl.load(ptr + at + dt * rows[:, None] + 0 * keys[None, :], mask=mask, other=0.0))
    else:
        x = _tile(ptr, at, dt, rows, keys, Tn, K)
    return x


@triton.jit
def _decay_row(ptr, at, dt, t, keys, Tn, K, SCALAR: tl.constexpr):
    if SCALAR:
        steps = t + 0 * keys
        x = _widen(tl.load(ptr + at + dt * steps, mask=(keys < K) & (steps < Tn) & (steps >= 0), other=0.0))
    else:
        x = _row(ptr, at, dt, t, keys, Tn, K)
    return x


@triton.jit
def _log_decay_tile(g, at, dt, rows, keys, Tn, K, SCALAR: tl.constexpr, FLOOR: tl.constexpr):
    """A [rows, keys] tile of the raw log decay g floored at FLOOR: the floor is taken in the
    load (g read in place, no clamped copy); its gradient is masked in chunk_diag_bwd_dg."""
    return tl.maximum(_decay_tile(g, at, dt, rows, keys, Tn, K, SCALAR), FLOOR)


@triton.jit
def _log_decay_steps(g, at, dt, steps, Tn, FLOOR: tl.constexpr):
    """A scalar log decay g at `steps`, floored at FLOOR in the load; 0 past Tn."""
    return tl.maximum(_widen(tl.load(g + at + dt * steps, mask=steps < Tn, other=0.0)), FLOOR)


@triton.jit
def _state_tile(ptr, index, keys, vals, K, V):
    """The [K, V] state `index` (row * NT + chunk, or the sequence) of a contiguous [.., K, V] tensor."""
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    return _widen(tl.load(ptr + index * K * V + keys[:, None] * V + vals[None, :], mask=mask, other=0.0))


@triton.jit
def _store_state(ptr, index, keys, vals, K, V, x, ACCUMULATE: tl.constexpr):
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    to = ptr + index * K * V + keys[:, None] * V + vals[None, :]
    if ACCUMULATE:
        x += tl.load(to, mask=mask, other=0.0)
    tl.store(to, x, mask=mask)


@triton.jit
def _store_tile(ptr, at, dt, rows, cols, Tn, W, x, ACCUMULATE: tl.constexpr):
    """x into the [rows, cols] tile of the sequence at (at, dt); tl.store casts to ptr's dtype."""
    mask = (rows[:, None] < Tn) & (rows[:, None] >= 0) & (cols[None, :] < W)
    to = ptr + (at + dt * rows[:, None]) * W + cols[None, :]
    if ACCUMULATE:
        x += tl.load(to, mask=mask, other=0.0)
    tl.store(to, x, mask=mask)


@triton.jit
def _chunk_end(n, Tn, BT: tl.constexpr):
    """The last step of chunk n (the last chunk may be short)."""
    return tl.minimum(n * BT + BT, Tn) - 1


@triton.jit
def _sub_blocks_in(n, Tn, BT: tl.constexpr, BC: tl.constexpr):
    """How many sub-blocks of chunk n hold steps. Rows past Tn read b = 0, so a reference r
    read there would not bound the exponents: no loop pairs a block past Tn with another."""
    return tl.minimum(BT // BC, tl.cdiv(Tn - n * BT, BC))


@triton.jit
def _readout_decay(gcum, g, at, dt, rows, keys, Tn, K, SCALAR: tl.constexpr, STRICT: tl.constexpr,
                   FLOOR: tl.constexpr):
    """The readout's exponent b_i, or b_{i-1} = b_i - g_i when it reads the state before step i."""
    b = _decay_tile(gcum, at, dt, rows, keys, Tn, K, SCALAR)
    if STRICT:
        b -= _log_decay_tile(g, at, dt, rows, keys, Tn, K, SCALAR, FLOOR)
    return b


@triton.jit
def _scalar_pair_decay(gcum, g, at, dt, steps, Tn, STRICT: tl.constexpr, FLOOR: tl.constexpr):
    """e^{b_i - b_j} for the pairs j <= i - s of one sub-block's steps (rows i, columns j),
    zero elsewhere: a scalar decay's diagonal sub-block is then (Q Kᵀ ⊙ D) V, two tl.dot."""
    live = steps < Tn
    b_i = _widen(tl.load(gcum + at + dt * steps, mask=live, other=0.0))
    if STRICT:
        b_i -= _log_decay_steps(g, at, dt, steps, Tn, FLOOR)
    b_j = _widen(tl.load(gcum + at + dt * steps, mask=live, other=0.0))
    return _causal_decay(b_i, b_j, steps, Tn, STRICT)


@triton.jit
def _causal_decay(b_read, b, steps, Tn, STRICT: tl.constexpr):
    """e^{b_read_i - b_j} for the pairs j <= i - s of `steps` (rows i, columns j), zero
    elsewhere: the exponent is masked to -inf before the exponential, so every exponent
    taken is <= 0 (rows past Tn read b = 0 and are masked too)."""
    seen = (steps[None, :] <= steps[:, None] - STRICT) & (steps[:, None] < Tn)
    return tl.exp(tl.where(seen, b_read[:, None] - b[None, :], float("-inf")))


@triton.jit
def chunk_diag_cumsum(g, gcum, cu, chunks, offsets, T, K, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, SCALAR: tl.constexpr, FLOOR: tl.constexpr,
                      VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """b: the inclusive cumulative sum of g (floored at FLOOR) inside each chunk, in the
    recurrence's order, stored where g is. Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    if SCALAR:
        live = rows < Tn
        x = _log_decay_steps(g, at, dt, rows, Tn, FLOOR)
        tl.store(gcum + at + dt * rows, tl.cumsum(x, 0), mask=live)
    else:
        keys = tl.arange(0, BK)
        x = _log_decay_tile(g, at, dt, rows, keys, Tn, K, False, FLOOR)
        _store_tile(gcum, at, dt, rows, keys, Tn, K, tl.cumsum(x, 0), False)


@triton.jit
def chunk_diag_fwd_states(k, v, gcum, S0, states, ST, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                          VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """The state before every chunk (states [BH, NT, K, V], NT the row's chunks over all its
    sequences) and after each sequence's last (ST), from S0 (one per sequence).
    Program (V block, sequence): the columns of a V block evolve independently."""
    pid_v, sid = tl.program_id(0), tl.program_id(1)
    i, bh, c0 = _sequence(sid, offsets, BH, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, sid, keys, vals, K, V)
    for n in range(0, tl.cdiv(Tn, BT)):
        _store_state(states, bh * NT + c0 + n, keys, vals, K, V, S, False)
        rows = n * BT + tl.arange(0, BT)
        b = _decay_tile(gcum, at, dt, rows, keys, Tn, K, SCALAR)
        b_end = _decay_row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K, SCALAR)
        # k_j e^{b_C - b_j}: exponents <= 0 (padded rows have k = 0)
        k_to_end = _tile(k, at, dt, rows, keys, Tn, K) * tl.exp(b_end[None, :] - b)
        S = S * tl.exp(b_end)[:, None] + tl.dot(tl.trans(k_to_end), _tile(v, at, dt, rows, vals, Tn, V))
    _store_state(ST, sid, keys, vals, K, V, S, False)


@triton.jit
def chunk_diag_fwd_output(q, k, v, gcum, g, states, o, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          SCALAR: tl.constexpr, STRICT: tl.constexpr, FLOOR: tl.constexpr, VARLEN: tl.constexpr,
                          REVERSE: tl.constexpr):
    """o for the BC rows of one sub-block and one V block, times the readout's constant
    SCALE (q' = SCALE q: o = SCALE (q S), taken at the store). Program (sub-block, row, V block)."""
    sub, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, ib = sub // (BT // BC), sub % (BT // BC)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    q_i = _tile(q, at, dt, rows, keys, Tn, K)
    b_i = _readout_decay(gcum, g, at, dt, rows, keys, Tn, K, SCALAR, STRICT, FLOOR)
    # the state before the chunk, decayed to each row
    out = tl.dot(q_i * tl.exp(b_i), _state_tile(states, bh * NT + c, keys, vals, K, V))
    # the chunk's earlier sub-blocks: every pair is below the diagonal; r = b at row0 - 1
    r = _decay_row(gcum, at, dt, row0 - 1, keys, Tn, K, SCALAR) * (ib > 0)
    q_r = q_i * tl.exp(tl.where(rows[:, None] < Tn, b_i - r[None, :], 0.0))    # rows past Tn: b = 0, q = 0
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, Tn, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        k_r = _tile(k, at, dt, cols, keys, Tn, K) * tl.exp(r[None, :] - _decay_tile(gcum, at, dt, cols, keys, Tn, K,
                                                                                   SCALAR))
        out += tl.dot(tl.dot(q_r, tl.trans(k_r)), _tile(v, at, dt, cols, vals, Tn, V))
    if SCALAR:   # the diagonal sub-block: (Q Kᵀ ⊙ D) V
        A = tl.dot(q_i, tl.trans(_tile(k, at, dt, rows, keys, Tn, K))) * _scalar_pair_decay(gcum, g, at, dt, rows,
                                                                                             Tn, STRICT, FLOOR)
        out += tl.dot(A, _tile(v, at, dt, rows, vals, Tn, V))
    else:        # the diagonal sub-block, column by column: the exact contraction over keys
        for jj in range(0, BC):
            col = row0 + jj
            seen = (rows >= col + STRICT) & (rows < Tn)  # j <= i - s (rows past Tn read b = 0: masked too)
            exponent = tl.where(seen[:, None], b_i - _decay_row(gcum, at, dt, col, keys, Tn, K, SCALAR)[None, :],
                                float("-inf"))
            a = tl.sum(q_i * _row(k, at, dt, col, keys, Tn, K)[None, :] * tl.exp(exponent), 1)
            out += a[:, None] * _row(v, at, dt, col, vals, Tn, V)[None, :]
    _store_tile(o, at, dt, rows, vals, Tn, V, out * SCALE, False)


@triton.jit
def chunk_diag_fwd_output_scalar(q, k, v, gcum, g, states, o, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STRICT: tl.constexpr,
                                 FLOOR: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """o for a whole chunk and one V block under a scalar decay, q, k, v of the chunk read
    once: (q_i e^{b_i}) S + ((Q Kᵀ) ⊙ D) V with D_ij = e^{b_i - b_j} for j <= i - s (b_i
    the readout's exponent, _readout_decay): a scalar pair exponent needs no sub-block
    factoring, it is masked to <= 0 before the exponential; times SCALE at the store (as
    chunk_diag_fwd_output). Program (chunk, row, V block)."""
    c, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    steps = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    b, b_read = _scalar_chunk_decay(gcum, g, at, dt, steps, Tn, STRICT, FLOOR)
    q_c = _tile(q, at, dt, steps, keys, Tn, K)
    # the state before the chunk, decayed to each row (b_read <= 0; rows past Tn: q = 0)
    out = tl.dot(q_c * tl.exp(b_read)[:, None], _state_tile(states, bh * NT + c, keys, vals, K, V))
    scores = tl.dot(q_c, tl.trans(_tile(k, at, dt, steps, keys, Tn, K))) * _causal_decay(b_read, b, steps, Tn,
                                                                                          STRICT)
    out += tl.dot(scores, _tile(v, at, dt, steps, vals, Tn, V))
    _store_tile(o, at, dt, steps, vals, Tn, V, out * SCALE, False)


@triton.jit
def chunk_diag_bwd_dstates(q, do, gcum, g, dstates, dST, dS0, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                           STRICT: tl.constexpr, FLOOR: tl.constexpr, HAS_READOUT: tl.constexpr, HAS_DST: tl.constexpr,
                           ACCUMULATE: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """Λ_n, the gradient of the state after chunk n (dstates [BH, NT, K, V]), and dS0 per
    sequence, by the reverse pass Λ_{n-1} = e^{b_C} ⊙ Λ_n + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ (a
    readout q' = SCALE q pairs as q with SCALE do: do scaled at its load). Program (V block, sequence)."""
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
        _store_state(dstates, bh * NT + c0 + n, keys, vals, K, V, lam, ACCUMULATE)
        lam = lam * tl.exp(_decay_row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K, SCALAR))[:, None]
        if HAS_READOUT:
            rows = n * BT + tl.arange(0, BT)
            b = _readout_decay(gcum, g, at, dt, rows, keys, Tn, K, SCALAR, STRICT, FLOOR)
            q_b = _tile(q, at, dt, rows, keys, Tn, K) * tl.exp(b)
            lam += tl.dot(tl.trans(q_b), _tile(do, at, dt, rows, vals, Tn, V) * SCALE)
    _store_state(dS0, sid, keys, vals, K, V, lam, ACCUMULATE)


@triton.jit
def chunk_diag_bwd_dq(q, k, v, gcum, g, states, do, dq, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SCALAR: tl.constexpr, STRICT: tl.constexpr, FLOOR: tl.constexpr, VARLEN: tl.constexpr,
                      REVERSE: tl.constexpr):
    """dq_i = (do_i Sᵀ) ⊙ e^{b_i} + Σ_{j <= i-s} (do_i · v_j) k_j ⊙ e^{b_i - b_j} for one
    sub-block of rows, with do scaled by SCALE at its load: for a readout q' = SCALE q this
    is dq = SCALE dq'(do) = dq'(SCALE do). Program (sub-block, row); the V blocks are summed in a loop."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    c, ib = sub // (BT // BC), sub % (BT // BC)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    cols_in_block = tl.arange(0, BC)
    keys = tl.arange(0, BK)
    b_i = _readout_decay(gcum, g, at, dt, rows, keys, Tn, K, SCALAR, STRICT, FLOOR)
    r = _decay_row(gcum, at, dt, row0 - 1, keys, Tn, K, SCALAR) * (ib > 0)
    from_state = tl.zeros([BC, BK], dtype=b_i.dtype)
    below = tl.zeros([BC, BK], dtype=b_i.dtype)     # pairs of earlier sub-blocks, still times e^{-(b_i - r)}
    diag = tl.zeros([BC, BK], dtype=b_i.dtype)
    dA = tl.zeros([BC, BC], dtype=b_i.dtype)        # the diagonal sub-block's do_i · v_j, over all V blocks
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_i = _tile(do, at, dt, rows, vals, Tn, V) * SCALE
        from_state += tl.dot(do_i, tl.trans(_state_tile(states, bh * NT + c, keys, vals, K, V)))
        for jb in range(0, tl.where(ib < _sub_blocks_in(n, Tn, BT, BC), ib, 0)):
            cols = n * BT + jb * BC + tl.arange(0, BC)
            k_r = _tile(k, at, dt, cols, keys, Tn, K) * tl.exp(r[None, :] - _decay_tile(gcum, at, dt, cols, keys, Tn,
                                                                                       K, SCALAR))
            below += tl.dot(tl.dot(do_i, tl.trans(_tile(v, at, dt, cols, vals, Tn, V))), k_r)
        # the diagonal sub-block's do_i · v_j: a scalar decay's pairs as one tl.dot per V block
        # (the fewest live registers), a per-key decay's summed over V blocks first
        dA_block = tl.dot(do_i, tl.trans(_tile(v, at, dt, rows, vals, Tn, V)))
        if SCALAR:
            diag += tl.dot(dA_block * _scalar_pair_decay(gcum, g, at, dt, rows, Tn, STRICT, FLOOR),
                           _tile(k, at, dt, rows, keys, Tn, K))
        else:
            dA += dA_block
    if not SCALAR:   # then column by column with the exact exponents, once
        for jj in range(0, BC):
            col = row0 + jj
            seen = (rows >= col + STRICT) & (rows < Tn)
            exponent = tl.where(seen[:, None], b_i - _decay_row(gcum, at, dt, col, keys, Tn, K, SCALAR)[None, :],
                                float("-inf"))
            dA_col = tl.sum(tl.where(cols_in_block[None, :] == jj, dA, 0.0), 1)
            diag += dA_col[:, None] * _row(k, at, dt, col, keys, Tn, K)[None, :] * tl.exp(exponent)
    out = from_state * tl.exp(b_i) + below * tl.exp(tl.where(rows[:, None] < Tn, b_i - r[None, :], 0.0)) + diag
    _store_tile(dq, at, dt, rows, keys, Tn, K, out, False)


@triton.jit
def _scalar_chunk_decay(gcum, g, at, dt, steps, Tn, STRICT: tl.constexpr, FLOOR: tl.constexpr):
    """(b, b_read) of a scalar decay over `steps`: the cumulative b, and the readout's
    exponent (b_{i-1} = b_i - g_i when STRICT); 0 past Tn."""
    live = steps < Tn
    b = _widen(tl.load(gcum + at + dt * steps, mask=live, other=0.0))
    if STRICT:
        b_read = b - _log_decay_steps(g, at, dt, steps, Tn, FLOOR)
    else:
        b_read = b
    return b, b_read


@triton.jit
def chunk_diag_bwd_dq_scalar(q, k, v, gcum, g, states, do, dq, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STRICT: tl.constexpr,
                             FLOOR: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """dq for a whole chunk under a scalar decay, do, v, k and the state read once:
    dq = (dO Sᵀ) ⊙ e^{b_read} + ((dO Vᵀ) ⊙ D) K, D as in chunk_diag_fwd_output_scalar, dO
    scaled by SCALE at its load (as chunk_diag_bwd_dq).
    Program (chunk, row); the V blocks in a loop (both products sum over them)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    steps = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    b, b_read = _scalar_chunk_decay(gcum, g, at, dt, steps, Tn, STRICT, FLOOR)
    from_state = tl.zeros([BT, BK], dtype=b.dtype)
    dA = tl.zeros([BT, BT], dtype=b.dtype)           # do_i · v_j over all V blocks
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_c = _tile(do, at, dt, steps, vals, Tn, V) * SCALE
        from_state += tl.dot(do_c, tl.trans(_state_tile(states, bh * NT + c, keys, vals, K, V)))
        dA += tl.dot(do_c, tl.trans(_tile(v, at, dt, steps, vals, Tn, V)))
    out = from_state * tl.exp(b_read)[:, None] + tl.dot(dA * _causal_decay(b_read, b, steps, Tn, STRICT),
                                                        _tile(k, at, dt, steps, keys, Tn, K))
    _store_tile(dq, at, dt, steps, keys, Tn, K, out, False)


@triton.jit
def chunk_diag_bwd_dkv(q, k, v, gcum, g, do, dstates, dk, dv, SCALE, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       SCALAR: tl.constexpr, STRICT: tl.constexpr, FLOOR: tl.constexpr, HAS_READOUT: tl.constexpr,
                       WITH_STATE: tl.constexpr, ACCUMULATE: tl.constexpr, VARLEN: tl.constexpr,
                       REVERSE: tl.constexpr):
    """dk, dv for one sub-block of keys j: from the readouts' pairs i >= j + s (HAS_READOUT)
    and, WITH_STATE, from the state after the chunk, (k_j e^{b_C - b_j}) Λ_n. A readout
    q' = SCALE q pairs as q with SCALE do (do scaled at its loads).
    Program (sub-block, row); the V blocks in a loop (dk sums over them)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    c, jb = sub // (BT // BC), sub % (BT // BC)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    row0 = n * BT + jb * BC
    cols = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    k_j = _tile(k, at, dt, cols, keys, Tn, K)
    b_j = _decay_tile(gcum, at, dt, cols, keys, Tn, K, SCALAR)
    to_end = tl.exp(_decay_row(gcum, at, dt, _chunk_end(n, Tn, BT), keys, Tn, K, SCALAR)[None, :] - b_j)
    dk_j = tl.zeros([BC, BK], dtype=b_j.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        v_j = _tile(v, at, dt, cols, vals, Tn, V)
        dv_j = tl.zeros([BC, BV], dtype=b_j.dtype)
        if WITH_STATE:
            lam = _state_tile(dstates, bh * NT + c, keys, vals, K, V)
            dv_j += tl.dot(k_j * to_end, lam)
            dk_j += tl.dot(v_j, tl.trans(lam)) * to_end
        if HAS_READOUT:
            # later sub-blocks of rows: r = b at the row before each
            for ib in range(jb + 1, _sub_blocks_in(n, Tn, BT, BC)):
                rows = n * BT + ib * BC + tl.arange(0, BC)
                r = _decay_row(gcum, at, dt, n * BT + ib * BC - 1, keys, Tn, K, SCALAR)
                # (rows past Tn read b = 0: their exponent is masked, not just their q = 0, as inf * 0 is NaN)
                q_r = _tile(q, at, dt, rows, keys, Tn, K) * tl.exp(tl.where(
                    rows[:, None] < Tn,
                    _readout_decay(gcum, g, at, dt, rows, keys, Tn, K, SCALAR, STRICT, FLOOR) - r[None, :], 0.0))
                k_r_factor = tl.exp(r[None, :] - b_j)
                do_i = _tile(do, at, dt, rows, vals, Tn, V) * SCALE
                A = tl.dot(q_r, tl.trans(k_j * k_r_factor))                  # [rows, cols]
                dv_j += tl.dot(tl.trans(A), do_i)
                dA = tl.dot(do_i, tl.trans(v_j))
                dk_j += tl.dot(tl.trans(dA), q_r) * k_r_factor
            if SCALAR:   # the diagonal sub-block (rows i and keys j the same steps): D ⊙ (Q Kᵀ), D ⊙ (dO Vᵀ)
                D = _scalar_pair_decay(gcum, g, at, dt, cols, Tn, STRICT, FLOOR)
                q_d, do_d = _tile(q, at, dt, cols, keys, Tn, K), _tile(do, at, dt, cols, vals, Tn, V) * SCALE
                dv_j += tl.dot(tl.trans(tl.dot(q_d, tl.trans(k_j)) * D), do_d)
                dk_j += tl.dot(tl.trans(tl.dot(do_d, tl.trans(v_j)) * D), q_d)
            else:        # a per-key decay's diagonal sub-block, row by row with the exact exponents
                for ii in range(0, BC):
                    row = row0 + ii
                    seen = (cols <= row - STRICT) & (cols * 0 + row < Tn)      # j <= i - s, and row i exists
                    b_row = _decay_row(gcum, at, dt, row, keys, Tn, K, SCALAR)
                    if STRICT:
                        b_row -= tl.maximum(_decay_row(g, at, dt, row, keys, Tn, K, SCALAR), FLOOR)
                    q_row = _row(q, at, dt, row, keys, Tn, K)
                    do_row = _row(do, at, dt, row, vals, Tn, V) * SCALE
                    e = tl.exp(tl.where(seen[:, None], b_row[None, :] - b_j, float("-inf")))
                    a = tl.sum(q_row[None, :] * k_j * e, 1)
                    dv_j += a[:, None] * do_row[None, :]
                    dk_j += tl.sum(v_j * do_row[None, :], 1)[:, None] * q_row[None, :] * e
        _store_tile(dv, at, dt, cols, vals, Tn, V, dv_j, ACCUMULATE)
    _store_tile(dk, at, dt, cols, keys, Tn, K, dk_j, ACCUMULATE)


@triton.jit
def chunk_diag_bwd_dg(q, dq, k, dk, g, states, ST, dstates, dg, cu, chunks, offsets, T, K, V, NT, BH, HEADS,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                      STRICT: tl.constexpr, FLOOR: tl.constexpr, HAS_READOUT: tl.constexpr, WITH_STATE: tl.constexpr,
                      ACCUMULATE: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """dg_t = Σ_{i >= t+s} q_i ⊙ dq_i (HAS_READOUT) - Σ_{j >= t} k_j ⊙ dk_j + Σ_V Λ_n ⊙ S_after
    (WITH_STATE): each exponent's gradient reaches the steps its cumulative sum spans; the
    state after the chunk carries e^{b_C}, hence the last term for every step. SCALAR sums
    over keys. Zero where g < FLOOR (the floor taken in the loads: clamp's gradient). dq is
    the gradient of the q the kernels read, so a readout q' = SCALE q needs nothing more:
    q' ⊙ dq' = q ⊙ dq. Program (chunk, row)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    i, n = _chunk(c, chunks, VARLEN)
    at, dt, Tn = _span(i, bh, cu, T, HEADS, VARLEN, REVERSE)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    grad = tl.zeros([BT, BK], dtype=dg.dtype.element_ty)
    if HAS_READOUT:
        x = _tile(q, at, dt, rows, keys, Tn, K) * _tile(dq, at, dt, rows, keys, Tn, K)
        grad += tl.sum(x, 0)[None, :] - tl.cumsum(x, 0)       # Σ_{i > t}
        if not STRICT:
            grad += x
    if WITH_STATE:
        x = _tile(k, at, dt, rows, keys, Tn, K) * _tile(dk, at, dt, rows, keys, Tn, K)
        grad -= tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x   # Σ_{j >= t}
        end = tl.zeros([BK], dtype=dg.dtype.element_ty)
        last = n + 1 == tl.cdiv(Tn, BT)      # the state after the sequence's last chunk is its ST
        for vb in range(0, tl.cdiv(V, BV)):
            vals = vb * BV + tl.arange(0, BV)
            kv = keys[:, None] * V + vals[None, :]
            is_last = kv * 0 + last                      # a tile (see _row)
            mask = (keys[:, None] < K) & (vals[None, :] < V)
            after = (tl.load(states + (bh * NT + c + 1) * K * V + kv, mask=mask & (is_last == 0), other=0.0)
                     + tl.load(ST + (i * BH + bh) * K * V + kv, mask=mask & (is_last != 0), other=0.0))
            end += tl.sum(_state_tile(dstates, bh * NT + c, keys, vals, K, V) * after, 1)
        grad += end[None, :]
    if SCALAR:
        to = dg + at + dt * rows
        total = tl.where(_widen(tl.load(g + at + dt * rows, mask=rows < Tn, other=0.0)) >= FLOOR, tl.sum(grad, 1), 0.0)
        if ACCUMULATE:
            total += tl.load(to, mask=rows < Tn, other=0.0)
        tl.store(to, total, mask=rows < Tn)
    else:
        grad = tl.where(_tile(g, at, dt, rows, keys, Tn, K) >= FLOOR, grad, 0.0)
        _store_tile(dg, at, dt, rows, keys, Tn, K, grad, ACCUMULATE)
'''

SUB_BLOCK = 16      # BC: rows of the exact diagonal contraction; tl.dot's smallest side
MAX_BV = 32         # V blocks: the state kernels run one program per V block; the others loop over them
KERNEL_NAMES = ("chunk_diag_cumsum", "chunk_diag_fwd_states", "chunk_diag_fwd_output",
                "chunk_diag_fwd_output_scalar", "chunk_diag_bwd_dstates", "chunk_diag_bwd_dq",
                "chunk_diag_bwd_dq_scalar", "chunk_diag_bwd_dkv", "chunk_diag_bwd_dg")

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-diag")


@dataclass(frozen=True)
class Blocks:
    """One shape's block sizes and launch options, by choose_blocks' rule."""
    BT: int
    BC: int
    BK: int
    BV: int
    num_warps: int
    dkv_stages: int                 # num_stages of chunk_diag_bwd_dkv (every other kernel: 1)
    rule: str = field(compare=False)

    def launch_options(self, name: str) -> dict:
        """num_warps / num_stages of kernel `name` on a GPU."""
        warps = 4 if name == "chunk_diag_cumsum" else self.num_warps
        return {"num_warps": warps, "num_stages": self.dkv_stages if name == "chunk_diag_bwd_dkv" else 1}

    def header(self) -> str:
        """The comment line `recdsl inspect` prints above the kernel listing."""
        return (f"# chunk_diag: BT={self.BT} BC={self.BC} BK={self.BK} BV={self.BV} num_warps={self.num_warps} "
                f"(rule: {self.rule})")


def chunk_size(device) -> int:
    """BT's upper bound: 64 on a GPU (fla's choice for chunk GLA); 32 in the interpreter, where
    a chunk's tile ops are numpy calls and the tests' short sequences still cross chunks."""
    return 64 if device.type == "cuda" else 32


def choose_blocks(K: int, V: int, T: int | None = None, dtype=torch.float32, device=torch.device("cuda"),
                  capability: tuple[int, int] | None = None) -> Blocks:
    """The module docstring's cost rule for K keys, V values, the longest sequence T (None:
    unknown, long), the inputs' dtype and the device (its compute capability when known)."""
    gpu = device.type == "cuda"
    BK = max(16, triton.next_power_of_2(K))
    BT = chunk_size(device)
    why = [f"BK=pow2(K); BT {BT} on {'a GPU' if gpu else 'the interpreter'}"]
    if gpu and BK > 128:
        BT = 32
        why.append("32 as BK > 128")
    if T is not None and BT > max(SUB_BLOCK, triton.next_power_of_2(T)):
        BT = max(SUB_BLOCK, triton.next_power_of_2(T))
        why.append(f"{BT} for T={T}")
    BV = min(max(16, triton.next_power_of_2(V)), MAX_BV)
    if gpu and BV > 16 and (BK > 64 or dtype == torch.float64):
        BV = 16
        why.append("BV 16 as " + ("BK > 64" if BK > 64 else "float64 tiles"))
    else:
        why.append(f"BV=min(pow2(V), {MAX_BV})")
    warps = 16 if BK >= 128 else 8 if BT * BK >= 64 * 64 else 4
    why.append(f"{warps} warps for [{BT}, {BK}] tiles")
    dkv_stages = 2 if capability is None or capability >= (8, 0) else 1
    return Blocks(BT, SUB_BLOCK, BK, BV, warps, dkv_stages, "; ".join(why))


def header(K: int, V: int) -> str:
    """The inspect line for a K x V state on a GPU, the sequence length unknown."""
    return choose_blocks(K, V).header()


def _launcher(ns: dict, device, blocks: Blocks):
    """kernel name, grid -> the launch, with the blocks' options on a GPU."""
    return launcher(ns, device, blocks.launch_options)


_DUMMY: dict = {}   # device -> the int32 table a launch without cu_seqlens passes (never read)


def _dummy(device) -> torch.Tensor:
    if device not in _DUMMY:
        _DUMMY[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _DUMMY[device]


@dataclass(frozen=True)
class Sequences:
    """How each row's steps split into sequences and chunks, as the kernels take them."""
    cu: torch.Tensor         # int32 [N + 1]: cu_seqlens (a dummy without)
    chunks: torch.Tensor     # int32 [NT, 2]: (sequence, chunk of it) of each chunk of a row (VARLEN)
    offsets: torch.Tensor    # int32 [N + 1]: each sequence's first chunk in that list (VARLEN)
    NT: int                  # chunks per row, over all its sequences
    count: int               # initial / final states: N * BH (sequence-major), or BH
    varlen: bool
    reverse: bool

    def args(self) -> tuple:
        return self.cu, self.chunks, self.offsets

    def flags(self) -> dict:
        return {"VARLEN": self.varlen, "REVERSE": self.reverse}


def longest(T: int, cu_seqlens) -> int:
    return T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def sequences(BH: int, T: int, BT: int, reverse: bool, cu_seqlens, device) -> Sequences:
    """The chunk tables, computed once per call on the device (fla's prepare_chunk_indices
    and prepare_chunk_offsets): every chunk of every sequence, none straddling two."""
    if cu_seqlens is None:
        dummy = _dummy(device)
        return Sequences(dummy, dummy, dummy, triton.cdiv(T, BT), BH, False, bool(reverse))
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    per_sequence = (cu[1:] - cu[:-1]).long().add(BT - 1).div(BT, rounding_mode="floor")
    offsets = torch.cat([per_sequence.new_zeros(1), per_sequence.cumsum(0)])
    NT = int(offsets[-1])
    owner = torch.repeat_interleave(torch.arange(len(per_sequence), device=device), per_sequence)
    chunks = torch.stack([owner, torch.arange(NT, device=device) - offsets[owner]], 1)
    return Sequences(cu, chunks.to(torch.int32).contiguous(), offsets.to(torch.int32), NT, (len(cu) - 1) * BH,
                     True, bool(reverse))


def _acc_dtype(*tensors) -> torch.dtype:
    """The accumulation dtype: float64 if any input is, else float32 (bf16 / fp16 widen)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _forward(launch, strict, scales, k, v, g, S0, qs, blocks: Blocks, seqs: Sequences):
    """(outputs, S_T per sequence, gcum, states) on contiguous [B, T, H, .] tensors, g raw
    (the kernels floor it in their loads), readout r reading scales[r] * qs[r]: outputs in
    the inputs' dtype, the rest in the accumulation dtype."""
    B, T, H, K = k.shape
    BH, V = B * H, v.shape[-1]
    acc, io = _acc_dtype(k, v, g, S0, *qs), reduce(torch.promote_types, [k.dtype, v.dtype] + [q.dtype for q in qs])
    BT, BV, NT = blocks.BT, blocks.BV, seqs.NT
    common = dict(BT=BT, BK=blocks.BK, SCALAR=g.dim() == 3, **seqs.flags())
    gcum = torch.empty(g.shape, dtype=acc, device=g.device)
    launch("chunk_diag_cumsum", (NT, BH))(g, gcum, *seqs.args(), T, K, NT, BH, H, FLOOR=LOG_DECAY_FLOOR, **common)
    states, ST = _states(launch, k, v, gcum, S0, blocks, seqs)
    outs = []
    for q, s, scale in zip(qs, strict, scales):
        o = torch.empty(B, T, H, V, dtype=io, device=v.device)
        where = (q, k, v, gcum, g, states, o, scale, *seqs.args(), T, K, V, NT, BH, H)
        if common["SCALAR"]:    # the whole chunk in one program: q, k, v read once per V block
            launch("chunk_diag_fwd_output_scalar", (NT, BH, triton.cdiv(V, BV)))(
                *where, BT=BT, BK=blocks.BK, BV=BV, STRICT=int(s), FLOOR=LOG_DECAY_FLOOR, **seqs.flags())
        else:                   # a per-key decay: sub-blocks (the decay factored through r)
            launch("chunk_diag_fwd_output", (NT * (BT // blocks.BC), BH, triton.cdiv(V, BV)))(
                *where, BC=blocks.BC, BV=BV, STRICT=int(s), FLOOR=LOG_DECAY_FLOOR, **common)
        outs.append(o)
    return outs, ST, gcum, states


def _states(launch, k, v, gcum, S0, blocks: Blocks, seqs: Sequences):
    """(the state before every chunk [BH, NT, K, V], S_T per sequence): the forward's state
    pass, and the backward's when it recomputes them (recdsl.recompute_chunk_states)."""
    B, T, H, K = k.shape
    V, acc = v.shape[-1], gcum.dtype
    states = torch.empty(B * H, seqs.NT, K, V, dtype=acc, device=k.device)
    ST = torch.empty(seqs.count, K, V, dtype=acc, device=k.device)
    launch("chunk_diag_fwd_states", (triton.cdiv(V, blocks.BV), seqs.count))(
        k, v, gcum, S0, states, ST, *seqs.args(), T, K, V, seqs.NT, B * H, H, BT=blocks.BT, BK=blocks.BK,
        BV=blocks.BV, SCALAR=gcum.dim() == 3, **seqs.flags())
    return states, ST


def _backward(launch, strict, scales, k, v, g, gcum, states, ST, qs, dos, dST, blocks: Blocks, seqs: Sequences):
    """(dk, dv, dg, dS0, [dq per readout]) of _forward, in the accumulation dtype, for the
    cotangents dos (None: an unread output) and dST (None: the final state unread): dq the
    gradient of qs[r] (the scale applied), dg masked below the floor as clamp's. One
    launch of each per-readout kernel per read output (the first adds the state's terms, the
    others accumulate); with no output read, one launch without readout terms (q and do
    then unused)."""
    B, T, H, K = k.shape
    BH, V = B * H, v.shape[-1]
    BT, BV, NT, acc = blocks.BT, blocks.BV, seqs.NT, states.dtype
    where = (*seqs.args(), T, K, V, NT, BH, H)
    common = dict(BT=BT, BK=blocks.BK, BV=BV, SCALAR=g.dim() == 3, FLOOR=LOG_DECAY_FLOOR, **seqs.flags())
    reads = [(q, int(s), do.contiguous(), scale) for q, s, do, scale in zip(qs, strict, dos, scales) if do is not None]
    launches = [dict(STRICT=s, HAS_READOUT=True, WITH_STATE=i == 0, ACCUMULATE=i > 0, **common)
                for i, (_, s, _, _) in enumerate(reads)] or [dict(STRICT=0, HAS_READOUT=False, WITH_STATE=True,
                                                                   ACCUMULATE=False, **common)]
    readouts = reads or [(k, 0, v, 1.0)]
    sub_grid = (NT * (BT // blocks.BC), BH)
    if common["SCALAR"]:    # dq: the whole chunk in one program (do, v, k and the state read once)
        dq_kernel, dq_grid = "chunk_diag_bwd_dq_scalar", (NT, BH)
        dq_flags = {f: x for f, x in common.items() if f != "SCALAR"}
    else:                   # a per-key decay: sub-blocks of BC rows
        dq_kernel, dq_grid, dq_flags = "chunk_diag_bwd_dq", sub_grid, dict(BC=blocks.BC, **common)
    dstates, dS0 = torch.empty_like(states), torch.empty_like(ST)
    for (q, _, do, scale), flags in zip(readouts, launches):
        first = not flags["ACCUMULATE"]
        launch("chunk_diag_bwd_dstates", (triton.cdiv(V, BV), seqs.count))(
            q, do, gcum, g, dstates, ST if dST is None else dST.contiguous(), dS0, scale, *where,
            HAS_DST=first and dST is not None, **{f: x for f, x in flags.items() if f != "WITH_STATE"})
    dqs = []
    for q, s, do, scale in reads:
        dqs.append(torch.empty(q.shape, dtype=acc, device=q.device))
        launch(dq_kernel, dq_grid)(q, k, v, gcum, g, states, do, dqs[-1], scale, *where, STRICT=s, **dq_flags)
    dk = torch.empty(k.shape, dtype=acc, device=k.device)
    dv = torch.empty(v.shape, dtype=acc, device=v.device)
    # dk, dv keep the sub-block kernel for both decays: a whole chunk's [BT, BT] pair tiles,
    # forward and by key, with q, k and dk live, spill on sm_80 at BT = 64 (tried)
    for (q, _, do, scale), flags in zip(readouts, launches):
        launch("chunk_diag_bwd_dkv", sub_grid)(q, k, v, gcum, g, do, dstates, dk, dv, scale, *where, BC=blocks.BC,
                                               **flags)
    dg = torch.empty(g.shape, dtype=acc, device=g.device)
    for (q, _, _, _), dq, flags in zip(readouts, dqs or [k], launches):
        launch("chunk_diag_bwd_dg", (NT, BH))(q, dq, k, dk, g, states, ST, dstates, dg, *where, **flags)
    return dk, dv, dg, dS0, _per_readout(dqs, dos)


def _per_readout(dqs: list, dos) -> list:
    """dq per readout (dqs: those of the read outputs, in order), None where unread."""
    it = iter(dqs)
    return [None if do is None else next(it) for do in dos]


def readout_parts(readout) -> tuple:
    """(q, inclusive, scale) of a readout given as (q, inclusive) or (q, inclusive, scale):
    scale a constant the output is multiplied by (the readout's q' = scale * q, applied in
    the kernels instead of as a torch op on q; 1.0 when absent)."""
    q, inclusive, *scale = readout
    return q, inclusive, float(scale[0]) if scale else 1.0


def by_torch(readouts, k, v, g, S0, reverse: bool = False, cu_seqlens=None):
    """chunk_diag's result by the torch chunk form (backends/torch/scans.py), one call per
    sequence, flipped for reverse: the double backward's twin and the non-finite inputs'
    path (the torch form is causal under NaN). Tensors [B, T, H, .] as the kernels take them
    (g [B, T, H] or [B, T, H, K]); the torch form runs on [B * H, T, .] rows. A readout's
    scale (readout_parts) multiplies its q here."""
    from ..torch import scans
    B, T, H = k.shape[:3]
    readouts = [(_rows(q if scale == 1.0 else q * scale), inc) for q, inc, scale in map(readout_parts, readouts)]
    k, v, g = _rows(k), _rows(v), _rows(g)
    outs, S = _by_torch_rows(scans, readouts, k, v, g, S0, reverse, cu_seqlens)
    return [_unrows(o, B, H) for o in outs], S


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, *] -> [B * H, T, *]."""
    B, T, H = x.shape[:3]
    return x.transpose(1, 2).reshape((B * H, T) + tuple(x.shape[3:]))


def _unrows(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[B * H, T, *] -> [B, T, H, *]."""
    return x.reshape((B, H) + tuple(x.shape[1:])).transpose(1, 2)


def _by_torch_rows(scans, readouts, k, v, g, S0, reverse, cu_seqlens):

    def one(steps: slice, s0):
        def flip(x):
            return x[:, steps].flip(1) if reverse else x[:, steps]
        if flip(k).shape[1] == 0:
            return [v.new_zeros(v.shape[0], 0, v.shape[-1]) for _ in readouts], s0
        outs, S = scans.chunk_diag([(flip(q), inc) for q, inc in readouts], flip(k), flip(v), flip(g), s0)
        return [o.flip(1) if reverse else o for o in outs], S
    if cu_seqlens is None:
        return one(slice(None), S0)
    BH, bounds = k.shape[0], [int(x) for x in cu_seqlens]
    parts = [one(slice(a, b), S0[i * BH:(i + 1) * BH]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    outs = [torch.cat([p[0][r] for p in parts], 1) for r in range(len(readouts))]
    return outs, torch.cat([p[1] for p in parts])


class ChunkDiagFunction(torch.autograd.Function):
    """chunk_diag on the Triton kernels: saves the inputs, the cumulative decays and the
    state before every chunk (or not: recdsl.recompute_chunk_states, the backward then runs
    the state pass again); the backward runs the adjoint kernels. Under create_graph=True
    the backward differentiates the torch chunk form instead (second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, strict, scales, reverse, cu_seqlens, k, v, g, S0, *qs):
        B, T, H, K = k.shape
        blocks = choose_blocks(K, v.shape[-1], longest(T, cu_seqlens), k.dtype, k.device,
                               torch.cuda.get_device_capability(k.device) if k.device.type == "cuda" else None)
        seqs = sequences(B * H, T, blocks.BT, reverse, cu_seqlens, k.device)
        launch = _launcher(_KERNELS.ns(k.device), k.device, blocks)
        outs, ST, gcum, states = _forward(launch, strict, scales, k, v, g, S0, qs, blocks, seqs)
        ctx.set_materialize_grads(False)
        ctx.strict, ctx.scales, ctx.blocks, ctx.seqs = strict, scales, blocks, seqs
        ctx.reverse, ctx.cu = reverse, cu_seqlens
        ctx.save_for_backward(k, v, g, S0, gcum, None if recomputing_chunk_states() else states, ST, *qs)
        return (*outs, ST.to(S0.dtype))

    @staticmethod
    def backward(ctx, *grads):
        k, v, g, S0, gcum, states, ST, *qs = ctx.saved_tensors
        inputs, needs = (k, v, g, S0, *qs), ctx.needs_input_grad[4:]
        none = (None, None, None, None)
        if wants_graph(inputs, grads):
            def twin(k, v, g, S0, *qs):
                outs, S = by_torch([(q, not s, c) for q, s, c in zip(qs, ctx.strict, ctx.scales)], k, v, g, S0,
                                   ctx.reverse, ctx.cu)
                return (*outs, S)
            return none + tuple(recompute_vjp(twin, inputs, needs, grads))
        if all(d is None for d in grads):
            return none + (None,) * len(inputs)
        launch = _launcher(_KERNELS.ns(k.device), k.device, ctx.blocks)
        if states is None:      # recdsl.recompute_chunk_states: the state pass again
            states, _ = _states(launch, k, v, gcum, S0, ctx.blocks, ctx.seqs)
        dk, dv, dg, dS0, dqs = _backward(launch, ctx.strict, ctx.scales, k, v, g, gcum, states, ST, qs, grads[:-1],
                                         grads[-1], ctx.blocks, ctx.seqs)
        got = (dk, dv, dg, dS0, *dqs)
        return none + tuple(d.to(x.dtype) if need and d is not None else None
                            for d, x, need in zip(got, inputs, needs))


def chunk_diag(readouts, k, v, g, S0, reverse: bool = False, cu_seqlens=None):
    """As backends/torch/scans.chunk_diag, on the Triton kernels: readouts [(q [BH, T, K],
    inclusive)] or [(q, inclusive, scale)] (reading scale * q), k [BH, T, K], v [BH, T, V],
    g [BH, T] or [BH, T, K] (log decays), S0
    [BH, K, V]. `reverse`: right to left; `cu_seqlens` (N + 1 offsets): sequences packed
    along T, S0 then [N * BH, K, V] (sequence-major). Returns ([o [BH, T, V]], S_T), S_T
    one per sequence; outputs in the inputs' dtype, S_T in S0's. (The rows as one head each
    of the kernels' [B, T, H, .] layout: chunk_diag_heads.)"""
    readouts = [readout_parts(r) for r in readouts]
    outs, ST = chunk_diag_heads([(q[:, :, None], inc, scale) for q, inc, scale in readouts], k[:, :, None],
                                v[:, :, None], g[:, :, None], S0, reverse, cu_seqlens)
    return [o[:, :, 0] for o in outs], ST


def chunk_diag_heads(readouts, k, v, g, S0, reverse: bool = False, cu_seqlens=None):
    """chunk_diag on the layout the driver holds, read in place: q, k [B, T, H, K], v
    [B, T, H, V], g [B, T, H] or [B, T, H, K], S0 [B * H, K, V] (b-major, heads inner; with
    cu_seqlens [N * H, K, V] over B = 1); readouts (q, inclusive) or (q, inclusive, scale)
    (readout_parts). Returns ([o [B, T, H, V]], S_T [B * H or N * H, K, V])."""
    B, T, H, K = k.shape
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=k.device)
    count = B * H if cu_seqlens is None else (len(cu_seqlens) - 1) * B * H
    if S0.shape[0] != count:
        raise ValueError(f"chunk_diag: {count} initial states expected (one per row and sequence), got {S0.shape[0]}")
    if T == 0:
        return [v.new_zeros(B, 0, H, v.shape[-1]) for _ in readouts], S0
    readouts = [readout_parts(r) for r in readouts]
    strict = tuple(not inclusive for _, inclusive, _ in readouts)
    scales = tuple(scale for _, _, scale in readouts)
    *outs, ST = ChunkDiagFunction.apply(strict, scales, bool(reverse), cu_seqlens, k.contiguous(), v.contiguous(),
                                        g.contiguous(), S0.contiguous(), *(q.contiguous() for q, _, _ in readouts))
    return list(outs), ST


def _heads_layout(x, rank: int, first_input, ns: int) -> torch.Tensor:
    """A driver's whole-sequence value as [B, T, H, *node] (H = 1 without heads), in place
    when it already is one (no transpose to rows: the kernels index heads themselves)."""
    x = rt.full_seq(x, first_input, ns, rank)
    return x if ns == 3 else x.unsqueeze(2)


def diag_matrix_stage(reads, k, v, g, S0, first_input, ns: int, ran: list | None = None, rev: bool = False, cu=None):
    """The triton backend's ChunkDiag stage (log decay), from the driver's whole-sequence
    values as backends/torch/scans.diag_matrix_stage takes them ([B, T, (H), .]: read as they
    are, heads indexed by the kernels); `rev` and `cu` (cu_seqlens, int32: sequences packed
    along T of a batch of one, S0 one per sequence) as the runtime hands them to kernels
    that index time themselves. reads: (q, inclusive) or (q, inclusive, scale), the latter
    reading scale * q with the scale applied in the kernels (readout_parts).

    A non-finite input runs torch's chunk form for this call instead (by_torch), and `ran`
    (the driver's record) says so: the kernels' tile products multiply the masked pairs
    (i, j > i) of a chunk too, and 0 * NaN = NaN would carry a later step's NaN into the
    earlier outputs and gradients of its chunk; scans.py's form never touches a masked
    pair (the causality the tests hold every chunkwise form to). One check per call."""
    reads = [readout_parts(r) for r in reads]
    finite = rt.all_finite(k, v, g, *(q for q, _, _ in reads))
    kh, vh = _heads_layout(k, 1, first_input, ns), _heads_layout(v, 1, first_input, ns)
    gh = _heads_layout(g, g.dim() - ns, first_input, ns) if g is not None else kh.new_zeros(kh.shape[:3])
    qhs = [(_heads_layout(q, 1, first_input, ns), incl, scale) for q, incl, scale in reads]
    run = chunk_diag_heads
    if not finite:
        if ran is not None:
            ran[-1] = "torch.chunk_diag"
        run = by_torch
    outs, ST = run(qhs, kh, vh, gh, rt.to_b(S0, ns - 1), rev, cu)
    return [o if ns == 3 else o[:, :, 0] for o in outs], rt.from_b(ST, S0)


def running_signs(d: torch.Tensor, rev: bool = False, cu=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, whole) for decays d [B, T, ...] of unknown sign: sigma_t the product of sign(d)
    over the steps of t's sequence up to t in the recurrence's order (right to left under
    `rev`; each sequence of cu_seqlens on its own), and whole the product over each sequence
    ([B, ...], or [N, ...] for the N sequences of cu_seqlens over B = 1). From counts of
    negative decays (a prefix sum over all of T, differenced at the sequence bounds), so it
    is one pass whatever the packing, and exact (integers)."""
    negative = (d < 0).to(torch.int64)
    B, T = negative.shape[:2]
    counts = torch.cat([negative.new_zeros((B, 1) + negative.shape[2:]), negative.cumsum(1)], 1)   # before t: [:, t]
    steps = torch.arange(T, device=d.device)
    bounds = torch.tensor([0, T], device=d.device) if cu is None else cu.to(device=d.device, dtype=torch.int64)
    seq = torch.searchsorted(bounds[1:], steps, right=True).clamp(max=len(bounds) - 2)
    if rev:
        count = counts[:, bounds[seq + 1]] - counts[:, steps]
    else:
        count = counts[:, steps + 1] - counts[:, bounds[seq]]
    whole = counts[:, bounds[1:]] - counts[:, bounds[:-1]]               # [B, N, ...]
    whole = whole[:, 0] if cu is None else whole[0]

    def parity(n):
        return (1 - 2 * (n % 2)).to(d.dtype)
    return parity(count), parity(whole)


def signed_matrix_stage(reads, k, v, d, S0, first_input, ns: int, ran: list | None = None, rev: bool = False, cu=None):
    """A ChunkDiag stage whose decay d has no proven sign (a raw param, tanh(.)), on the same
    kernels (backends/torch/scans.signed_decay's transform, per sequence and direction): with
    sigma_t the running product of sign(d), S~_t = diag(sigma_t) S_t obeys the recurrence with
    |d| and keys sigma_t k_t, a read of S_t is (sigma_t q)ᵀ S~_t (sigma_{t-1} = sigma_t sign(d_t)
    for a read of S_{t-1}), and each sequence's final state gets its sigma back. The kernels
    run on log|d| (a zero decay clamped, as every log decay is). d: [B, T, (H)] scalar or
    [B, T, (H), K] per key."""
    rank = d.dim() - ns if d.dim() > ns else 0
    full = rt.full_seq(d, first_input, ns, rank)
    sigma, whole = running_signs(full, rev, cu)
    before = sigma * torch.where(full < 0, -1.0, 1.0).to(full.dtype)

    def signed(x, s):
        return rt.full_seq(x, first_input, ns, 1) * (s[..., None] if rank == 0 else s)
    reads = [(signed(q, sigma if inclusive else before), inclusive, scale)
             for q, inclusive, scale in map(readout_parts, reads)]
    log_abs = torch.log(full.abs())
    outs, ST = diag_matrix_stage(reads, signed(k, sigma), v, log_abs, S0, first_input, ns, ran, rev, cu)
    return outs, ST * (whole[..., None, None] if rank == 0 else whole[..., None])


# Every kernel as the GPU launches it (choose_blocks' sizes and options), for ahead-of-time
# compiles: (name, the constexprs beyond the block sizes, SCALAR, FLOOR, VARLEN and REVERSE); the
# readouts' pair kernels in both readout modes, the accumulating launches of a second readout.
_ONE_READOUT = {"HAS_READOUT": True, "WITH_STATE": True, "ACCUMULATE": False}
AOT_VARIANTS = [
    ("chunk_diag_cumsum", {}),
    ("chunk_diag_fwd_states", {}),
    ("chunk_diag_fwd_output", {"STRICT": 0}),
    ("chunk_diag_fwd_output", {"STRICT": 1}),
    ("chunk_diag_fwd_output_scalar", {"STRICT": 0}),
    ("chunk_diag_fwd_output_scalar", {"STRICT": 1}),
    ("chunk_diag_bwd_dstates", {"STRICT": 0, "HAS_READOUT": True, "HAS_DST": True, "ACCUMULATE": False}),
    ("chunk_diag_bwd_dstates", {"STRICT": 1, "HAS_READOUT": True, "HAS_DST": False, "ACCUMULATE": True}),
    ("chunk_diag_bwd_dq", {"STRICT": 0}),
    ("chunk_diag_bwd_dq", {"STRICT": 1}),
    ("chunk_diag_bwd_dkv", {"STRICT": 0, **_ONE_READOUT}),
    ("chunk_diag_bwd_dkv", {"STRICT": 1, "HAS_READOUT": True, "WITH_STATE": False, "ACCUMULATE": True}),
    ("chunk_diag_bwd_dq_scalar", {"STRICT": 0}),
    ("chunk_diag_bwd_dq_scalar", {"STRICT": 1}),
    ("chunk_diag_bwd_dg", {"STRICT": 0, **_ONE_READOUT}),
    ("chunk_diag_bwd_dg", {"STRICT": 1, "HAS_READOUT": True, "WITH_STATE": False, "ACCUMULATE": True}),
]
_INTS = {"T", "K", "V", "NT", "BH", "HEADS"}
_TABLES = {"cu", "chunks", "offsets"}
_FLOATS = {"SCALE"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64, scalar: bool = False, varlen: bool = False,
                  reverse: bool = False) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states with choose_blocks' sizes
    and options (aot.py: no GPU needed): [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-diag-aot", interpret=False)
    blocks = choose_blocks(K, V, None, torch.float32, torch.device("cuda"), (arch // 10, arch % 10))
    sizes = {"BT": blocks.BT, "BC": blocks.BC, "BK": blocks.BK, "BV": blocks.BV}
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        const = {k: v for k, v in (sizes | {"SCALAR": scalar, "FLOOR": LOG_DECAY_FLOOR, "VARLEN": varlen,
                                            "REVERSE": reverse}).items()
                 if k in fn.arg_names} | flags     # (the scalar-only kernel takes no SCALAR)
        sig = {a: ("i32" if a in _INTS else "*i32" if a in _TABLES else "fp32" if a in _FLOATS else "*fp32")
               for a in fn.arg_names if a not in const}
        options = blocks.launch_options(name)
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=options["num_warps"],
                                      num_stages=options["num_stages"], extra_options={"maxnreg": MAXNREG}))
    return out
