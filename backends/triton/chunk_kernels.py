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
  chunk_diag_fwd_states  the state before every chunk [BH, NT, K, V] and the last one, by a
                         sequential pass over the chunks; one program per (row, V block)
  chunk_diag_fwd_output  a readout's outputs; one program per (row, sub-block of BC rows,
                         V block): the state term, the earlier sub-blocks of the chunk as
                         tl.dot with the decay factored through a reference r (below), and
                         the diagonal sub-block as the exact per-key contraction
  chunk_diag_bwd_dstates the adjoint recurrence, a reverse pass over chunks:
                         Λ_{n-1} = e^{b_C} ⊙ Λ_n + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ
  chunk_diag_bwd_dq      dq per sub-block of rows
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

Reverse and cu_seqlens are the runtime's (it flips / splits around the stage); a signed
decay (log|d| and a running sign) is declined in the registry (kernels.py), with its reason.
The exponent-bounding masks keep every exponent <= 0 also for rows past T (they read b = 0).
A tl.dot of float32 tiles runs in TF32 on a GPU, as fla's chunk kernels."""
from __future__ import annotations

import torch
import triton

from ..torch import seq_rt as rt
from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.scans import LOG_DECAY_FLOOR
from .launch import Kernels

SOURCE = r'''
@triton.jit
def _tile(ptr, bh, rows, cols, T, W):
    """The [rows, cols] tile of a contiguous [BH, T, W] tensor at row bh; zeros outside."""
    mask = (rows[:, None] < T) & (rows[:, None] >= 0) & (cols[None, :] < W)
    return tl.load(ptr + bh * T * W + rows[:, None] * W + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _row(ptr, bh, t, cols, T, W):
    """Step t of a contiguous [BH, T, W] tensor at row bh; zeros outside."""
    steps = t + 0 * cols        # a vector: the interpreter rejects a scalar & vector mask
    mask = (cols < W) & (steps < T) & (steps >= 0)
    return tl.load(ptr + bh * T * W + t * W + cols, mask=mask, other=0.0)


@triton.jit
def _decay_tile(ptr, bh, rows, keys, T, K, SCALAR: tl.constexpr):
    """A [rows, keys] tile of a log decay (or its cumulative sum): [BH, T] broadcast over the
    keys when SCALAR, else [BH, T, K]."""
    if SCALAR:
        mask = (rows[:, None] < T) & (rows[:, None] >= 0) & (keys[None, :] < K)
        x = tl.load(ptr + bh * T + rows[:, None] + 0 * keys[None, :], mask=mask, other=0.0)
    else:
        x = _tile(ptr, bh, rows, keys, T, K)
    return x


@triton.jit
def _decay_row(ptr, bh, t, keys, T, K, SCALAR: tl.constexpr):
    if SCALAR:
        steps = t + 0 * keys
        x = tl.load(ptr + bh * T + steps, mask=(keys < K) & (steps < T) & (steps >= 0), other=0.0)
    else:
        x = _row(ptr, bh, t, keys, T, K)
    return x


@triton.jit
def _state_tile(ptr, index, keys, vals, K, V):
    """The [K, V] state `index` (row * NT + chunk, or the row) of a contiguous [.., K, V] tensor."""
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    return tl.load(ptr + index * K * V + keys[:, None] * V + vals[None, :], mask=mask, other=0.0)


@triton.jit
def _store_state(ptr, index, keys, vals, K, V, x, ACCUMULATE: tl.constexpr):
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    at = ptr + index * K * V + keys[:, None] * V + vals[None, :]
    if ACCUMULATE:
        x += tl.load(at, mask=mask, other=0.0)
    tl.store(at, x, mask=mask)


@triton.jit
def _store_tile(ptr, bh, rows, cols, T, W, x, ACCUMULATE: tl.constexpr):
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    at = ptr + bh * T * W + rows[:, None] * W + cols[None, :]
    if ACCUMULATE:
        x += tl.load(at, mask=mask, other=0.0)
    tl.store(at, x, mask=mask)


@triton.jit
def _chunk_end(n, T, BT: tl.constexpr):
    """The last step of chunk n (the last chunk may be short)."""
    return tl.minimum(n * BT + BT, T) - 1


@triton.jit
def _sub_blocks_in(n, T, BT: tl.constexpr, BC: tl.constexpr):
    """How many sub-blocks of chunk n hold steps. Rows past T read b = 0, so a reference r
    read there would not bound the exponents: no loop pairs a block past T with another."""
    return tl.minimum(BT // BC, tl.cdiv(T - n * BT, BC))


@triton.jit
def _readout_decay(gcum, g, bh, rows, keys, T, K, SCALAR: tl.constexpr, STRICT: tl.constexpr):
    """The readout's exponent b_i, or b_{i-1} = b_i - g_i when it reads the state before step i."""
    b = _decay_tile(gcum, bh, rows, keys, T, K, SCALAR)
    if STRICT:
        b -= _decay_tile(g, bh, rows, keys, T, K, SCALAR)
    return b


@triton.jit
def _scalar_pair_decay(gcum, g, bh, steps, T, STRICT: tl.constexpr):
    """e^{b_i - b_j} for the pairs j <= i - s of one sub-block's steps (rows i, columns j),
    zero elsewhere: a scalar decay's diagonal sub-block is then (Q Kᵀ ⊙ D) V, two tl.dot."""
    live = steps < T
    b_i = tl.load(gcum + bh * T + steps, mask=live, other=0.0)
    if STRICT:
        b_i -= tl.load(g + bh * T + steps, mask=live, other=0.0)
    b_j = tl.load(gcum + bh * T + steps, mask=live, other=0.0)
    seen = (steps[None, :] <= steps[:, None] - STRICT) & live[:, None]
    return tl.exp(tl.where(seen, b_i[:, None] - b_j[None, :], float("-inf")))


@triton.jit
def chunk_diag_cumsum(g, gcum, T, K, BT: tl.constexpr, BK: tl.constexpr, SCALAR: tl.constexpr):
    """b: the inclusive cumulative sum of g inside each chunk. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    if SCALAR:
        x = tl.load(g + bh * T + rows, mask=rows < T, other=0.0)
        tl.store(gcum + bh * T + rows, tl.cumsum(x, 0), mask=rows < T)
    else:
        keys = tl.arange(0, BK)
        x = _tile(g, bh, rows, keys, T, K)
        _store_tile(gcum, bh, rows, keys, T, K, tl.cumsum(x, 0), False)


@triton.jit
def chunk_diag_fwd_states(k, v, gcum, S0, states, ST, T, K, V, NT,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr):
    """The state before every chunk (states [BH, NT, K, V]) and after the last (ST), from S0.
    Program (V block, row): the columns of a V block evolve independently."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    S = _state_tile(S0, bh, keys, vals, K, V)
    for n in range(NT):
        _store_state(states, bh * NT + n, keys, vals, K, V, S, False)
        rows = n * BT + tl.arange(0, BT)
        b = _decay_tile(gcum, bh, rows, keys, T, K, SCALAR)
        b_end = _decay_row(gcum, bh, _chunk_end(n, T, BT), keys, T, K, SCALAR)
        # k_j e^{b_C - b_j}: exponents <= 0 (padded rows have k = 0)
        k_to_end = _tile(k, bh, rows, keys, T, K) * tl.exp(b_end[None, :] - b)
        S = S * tl.exp(b_end)[:, None] + tl.dot(tl.trans(k_to_end), _tile(v, bh, rows, vals, T, V))
    _store_state(ST, bh, keys, vals, K, V, S, False)


@triton.jit
def chunk_diag_fwd_output(q, k, v, gcum, g, states, o, T, K, V, NT,
                          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          SCALAR: tl.constexpr, STRICT: tl.constexpr):
    """o for the BC rows of one sub-block and one V block. Program (sub-block, row, V block)."""
    sub, bh, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, ib = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    q_i = _tile(q, bh, rows, keys, T, K)
    b_i = _readout_decay(gcum, g, bh, rows, keys, T, K, SCALAR, STRICT)
    # the state before the chunk, decayed to each row
    out = tl.dot(q_i * tl.exp(b_i), _state_tile(states, bh * NT + n, keys, vals, K, V))
    # the chunk's earlier sub-blocks: every pair is below the diagonal; r = b at row0 - 1
    r = _decay_row(gcum, bh, row0 - 1, keys, T, K, SCALAR) * (ib > 0)
    q_r = q_i * tl.exp(tl.where(rows[:, None] < T, b_i - r[None, :], 0.0))    # rows past T: b = 0, q = 0
    for jb in range(0, tl.where(ib < _sub_blocks_in(n, T, BT, BC), ib, 0)):
        cols = n * BT + jb * BC + tl.arange(0, BC)
        k_r = _tile(k, bh, cols, keys, T, K) * tl.exp(r[None, :] - _decay_tile(gcum, bh, cols, keys, T, K, SCALAR))
        out += tl.dot(tl.dot(q_r, tl.trans(k_r)), _tile(v, bh, cols, vals, T, V))
    if SCALAR:   # the diagonal sub-block: (Q Kᵀ ⊙ D) V
        A = tl.dot(q_i, tl.trans(_tile(k, bh, rows, keys, T, K))) * _scalar_pair_decay(gcum, g, bh, rows, T, STRICT)
        out += tl.dot(A, _tile(v, bh, rows, vals, T, V))
    else:        # the diagonal sub-block, column by column: the exact contraction over keys
        for jj in range(0, BC):
            col = row0 + jj
            seen = (rows >= col + STRICT) & (rows < T)  # j <= i - s (rows past T read b = 0: masked too)
            exponent = tl.where(seen[:, None], b_i - _decay_row(gcum, bh, col, keys, T, K, SCALAR)[None, :],
                                float("-inf"))
            a = tl.sum(q_i * _row(k, bh, col, keys, T, K)[None, :] * tl.exp(exponent), 1)
            out += a[:, None] * _row(v, bh, col, vals, T, V)[None, :]
    _store_tile(o, bh, rows, vals, T, V, out, False)


@triton.jit
def chunk_diag_bwd_dstates(q, do, gcum, g, dstates, dST, dS0, T, K, V, NT,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                           STRICT: tl.constexpr, HAS_READOUT: tl.constexpr, HAS_DST: tl.constexpr,
                           ACCUMULATE: tl.constexpr):
    """Λ_n, the gradient of the state after chunk n (dstates [BH, NT, K, V]), and dS0, by the
    reverse pass Λ_{n-1} = e^{b_C} ⊙ Λ_n + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ. Program (V block, row)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    if HAS_DST:
        lam = _state_tile(dST, bh, keys, vals, K, V)
    else:
        lam = tl.zeros([BK, BV], dtype=dS0.dtype.element_ty)
    for back in range(NT):
        n = NT - 1 - back
        _store_state(dstates, bh * NT + n, keys, vals, K, V, lam, ACCUMULATE)
        lam = lam * tl.exp(_decay_row(gcum, bh, _chunk_end(n, T, BT), keys, T, K, SCALAR))[:, None]
        if HAS_READOUT:
            rows = n * BT + tl.arange(0, BT)
            b = _readout_decay(gcum, g, bh, rows, keys, T, K, SCALAR, STRICT)
            q_b = _tile(q, bh, rows, keys, T, K) * tl.exp(b)
            lam += tl.dot(tl.trans(q_b), _tile(do, bh, rows, vals, T, V))
    _store_state(dS0, bh, keys, vals, K, V, lam, ACCUMULATE)


@triton.jit
def chunk_diag_bwd_dq(q, k, v, gcum, g, states, do, dq, T, K, V, NT,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SCALAR: tl.constexpr, STRICT: tl.constexpr):
    """dq_i = (do_i Sᵀ) ⊙ e^{b_i} + Σ_{j <= i-s} (do_i · v_j) k_j ⊙ e^{b_i - b_j} for one
    sub-block of rows. Program (sub-block, row); the V blocks are summed in a loop."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    n, ib = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + ib * BC
    rows = row0 + tl.arange(0, BC)
    cols_in_block = tl.arange(0, BC)
    keys = tl.arange(0, BK)
    b_i = _readout_decay(gcum, g, bh, rows, keys, T, K, SCALAR, STRICT)
    r = _decay_row(gcum, bh, row0 - 1, keys, T, K, SCALAR) * (ib > 0)
    from_state = tl.zeros([BC, BK], dtype=b_i.dtype)
    below = tl.zeros([BC, BK], dtype=b_i.dtype)     # pairs of earlier sub-blocks, still times e^{-(b_i - r)}
    diag = tl.zeros([BC, BK], dtype=b_i.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_i = _tile(do, bh, rows, vals, T, V)
        from_state += tl.dot(do_i, tl.trans(_state_tile(states, bh * NT + n, keys, vals, K, V)))
        for jb in range(0, tl.where(ib < _sub_blocks_in(n, T, BT, BC), ib, 0)):
            cols = n * BT + jb * BC + tl.arange(0, BC)
            k_r = _tile(k, bh, cols, keys, T, K) * tl.exp(r[None, :] - _decay_tile(gcum, bh, cols, keys, T, K, SCALAR))
            below += tl.dot(tl.dot(do_i, tl.trans(_tile(v, bh, cols, vals, T, V))), k_r)
        # the diagonal sub-block's do_i · v_j, then (scalar) one tl.dot with the pair decays,
        # or column by column with the exact exponents
        dA = tl.dot(do_i, tl.trans(_tile(v, bh, rows, vals, T, V)))
        if SCALAR:
            diag += tl.dot(dA * _scalar_pair_decay(gcum, g, bh, rows, T, STRICT), _tile(k, bh, rows, keys, T, K))
        else:
            for jj in range(0, BC):
                col = row0 + jj
                seen = (rows >= col + STRICT) & (rows < T)
                exponent = tl.where(seen[:, None], b_i - _decay_row(gcum, bh, col, keys, T, K, SCALAR)[None, :],
                                    float("-inf"))
                dA_col = tl.sum(tl.where(cols_in_block[None, :] == jj, dA, 0.0), 1)
                diag += dA_col[:, None] * _row(k, bh, col, keys, T, K)[None, :] * tl.exp(exponent)
    out = from_state * tl.exp(b_i) + below * tl.exp(tl.where(rows[:, None] < T, b_i - r[None, :], 0.0)) + diag
    _store_tile(dq, bh, rows, keys, T, K, out, False)


@triton.jit
def chunk_diag_bwd_dkv(q, k, v, gcum, g, do, dstates, dk, dv, T, K, V, NT,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       SCALAR: tl.constexpr, STRICT: tl.constexpr, HAS_READOUT: tl.constexpr,
                       WITH_STATE: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dk, dv for one sub-block of keys j: from the readouts' pairs i >= j + s (HAS_READOUT)
    and, WITH_STATE, from the state after the chunk, (k_j e^{b_C - b_j}) Λ_n.
    Program (sub-block, row); the V blocks in a loop (dk sums over them)."""
    sub, bh = tl.program_id(0), tl.program_id(1)
    n, jb = sub // (BT // BC), sub % (BT // BC)
    row0 = n * BT + jb * BC
    cols = row0 + tl.arange(0, BC)
    keys = tl.arange(0, BK)
    k_j = _tile(k, bh, cols, keys, T, K)
    b_j = _decay_tile(gcum, bh, cols, keys, T, K, SCALAR)
    to_end = tl.exp(_decay_row(gcum, bh, _chunk_end(n, T, BT), keys, T, K, SCALAR)[None, :] - b_j)
    dk_j = tl.zeros([BC, BK], dtype=b_j.dtype)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        v_j = _tile(v, bh, cols, vals, T, V)
        dv_j = tl.zeros([BC, BV], dtype=b_j.dtype)
        if WITH_STATE:
            lam = _state_tile(dstates, bh * NT + n, keys, vals, K, V)
            dv_j += tl.dot(k_j * to_end, lam)
            dk_j += tl.dot(v_j, tl.trans(lam)) * to_end
        if HAS_READOUT:
            # later sub-blocks of rows: r = b at the row before each
            for ib in range(jb + 1, _sub_blocks_in(n, T, BT, BC)):
                rows = n * BT + ib * BC + tl.arange(0, BC)
                r = _decay_row(gcum, bh, n * BT + ib * BC - 1, keys, T, K, SCALAR)
                # (rows past T read b = 0: their exponent is masked, not just their q = 0, as inf * 0 is NaN)
                q_r = _tile(q, bh, rows, keys, T, K) * tl.exp(tl.where(
                    rows[:, None] < T, _readout_decay(gcum, g, bh, rows, keys, T, K, SCALAR, STRICT) - r[None, :], 0.0))
                k_r_factor = tl.exp(r[None, :] - b_j)
                do_i = _tile(do, bh, rows, vals, T, V)
                A = tl.dot(q_r, tl.trans(k_j * k_r_factor))                  # [rows, cols]
                dv_j += tl.dot(tl.trans(A), do_i)
                dA = tl.dot(do_i, tl.trans(v_j))
                dk_j += tl.dot(tl.trans(dA), q_r) * k_r_factor
            if SCALAR:   # the diagonal sub-block (rows i and keys j the same steps): D ⊙ (Q Kᵀ), D ⊙ (dO Vᵀ)
                D = _scalar_pair_decay(gcum, g, bh, cols, T, STRICT)
                q_d, do_d = _tile(q, bh, cols, keys, T, K), _tile(do, bh, cols, vals, T, V)
                dv_j += tl.dot(tl.trans(tl.dot(q_d, tl.trans(k_j)) * D), do_d)
                dk_j += tl.dot(tl.trans(tl.dot(do_d, tl.trans(v_j)) * D), q_d)
            else:        # a per-key decay's diagonal sub-block, row by row with the exact exponents
                for ii in range(0, BC):
                    row = row0 + ii
                    seen = (cols <= row - STRICT) & (cols * 0 + row < T)      # j <= i - s, and row i exists
                    b_row = _decay_row(gcum, bh, row, keys, T, K, SCALAR)
                    if STRICT:
                        b_row -= _decay_row(g, bh, row, keys, T, K, SCALAR)
                    q_row = _row(q, bh, row, keys, T, K)
                    do_row = _row(do, bh, row, vals, T, V)
                    e = tl.exp(tl.where(seen[:, None], b_row[None, :] - b_j, float("-inf")))
                    a = tl.sum(q_row[None, :] * k_j * e, 1)
                    dv_j += a[:, None] * do_row[None, :]
                    dk_j += tl.sum(v_j * do_row[None, :], 1)[:, None] * q_row[None, :] * e
        _store_tile(dv, bh, cols, vals, T, V, dv_j, ACCUMULATE)
    _store_tile(dk, bh, cols, keys, T, K, dk_j, ACCUMULATE)


@triton.jit
def chunk_diag_bwd_dg(q, dq, k, dk, states, ST, dstates, dg, T, K, V, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr,
                      STRICT: tl.constexpr, HAS_READOUT: tl.constexpr, WITH_STATE: tl.constexpr,
                      ACCUMULATE: tl.constexpr):
    """dg_t = Σ_{i >= t+s} q_i ⊙ dq_i (HAS_READOUT) - Σ_{j >= t} k_j ⊙ dk_j + Σ_V Λ_n ⊙ S_after
    (WITH_STATE): each exponent's gradient reaches the steps its cumulative sum spans; the
    state after the chunk carries e^{b_C}, hence the last term for every step. SCALAR sums
    over keys. Program (chunk, row)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    rows = n * BT + tl.arange(0, BT)
    keys = tl.arange(0, BK)
    grad = tl.zeros([BT, BK], dtype=dg.dtype.element_ty)
    if HAS_READOUT:
        x = _tile(q, bh, rows, keys, T, K) * _tile(dq, bh, rows, keys, T, K)
        grad += tl.sum(x, 0)[None, :] - tl.cumsum(x, 0)       # Σ_{i > t}
        if not STRICT:
            grad += x
    if WITH_STATE:
        x = _tile(k, bh, rows, keys, T, K) * _tile(dk, bh, rows, keys, T, K)
        grad -= tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x   # Σ_{j >= t}
        end = tl.zeros([BK], dtype=dg.dtype.element_ty)
        for vb in range(0, tl.cdiv(V, BV)):
            vals = vb * BV + tl.arange(0, BV)
            at = keys[:, None] * V + vals[None, :]
            following = at * 0 + n + 1                  # the next chunk, as a tile (see _row)
            mask = (keys[:, None] < K) & (vals[None, :] < V)
            after = (tl.load(states + (bh * NT + n + 1) * K * V + at, mask=mask & (following < NT), other=0.0)
                     + tl.load(ST + bh * K * V + at, mask=mask & (following == NT), other=0.0))
            end += tl.sum(_state_tile(dstates, bh * NT + n, keys, vals, K, V) * after, 1)
        grad += end[None, :]
    if SCALAR:
        at = dg + bh * T + rows
        total = tl.sum(grad, 1)
        if ACCUMULATE:
            total += tl.load(at, mask=rows < T, other=0.0)
        tl.store(at, total, mask=rows < T)
    else:
        _store_tile(dg, bh, rows, keys, T, K, grad, ACCUMULATE)
'''

SUB_BLOCK = 16      # BC: rows of the exact diagonal contraction; tl.dot's smallest side
MAX_BV = 32         # V blocks: the state kernels run one program per V block; the others loop over them

_KERNELS = Kernels(SOURCE, "recdsl-triton-chunk-diag")

# (num_warps, num_stages) per kernel on a GPU: with 4 warps, or with loads multi-buffered
# across loop iterations, the [64, 64] tiles of K = V = 64 spill on sm_80 / sm_90
# (tests/triton/test_chunk_diag.py compiles them: no spills).
LAUNCH = {"chunk_diag_cumsum": (4, 1), "chunk_diag_fwd_states": (8, 1), "chunk_diag_fwd_output": (8, 1),
          "chunk_diag_bwd_dstates": (8, 1), "chunk_diag_bwd_dq": (8, 1), "chunk_diag_bwd_dkv": (8, 2),
          "chunk_diag_bwd_dg": (8, 1)}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's options on a GPU (the interpreter takes none)."""
    def launch(name, grid):
        if device.type != "cuda":
            return ns[name][grid]
        warps, stages = LAUNCH[name]
        kernel = ns[name][grid]
        return lambda *args, **kw: kernel(*args, num_warps=warps, num_stages=stages, **kw)
    return launch


def chunk_size(device) -> int:
    """BT: 64 on a GPU (fla's choice for chunk GLA); 32 in the interpreter, where a chunk's
    tile ops are numpy calls and the tests' short sequences still cross chunks."""
    return 64 if device.type == "cuda" else 32


def _blocks(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV)


def _geometry(k, v, BT):
    BH, T, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    return BH, T, K, V, triton.cdiv(T, BT), BK, BV


def _forward(launch, strict, k, v, g, S0, qs, BT):
    """(outputs, S_T, gcum, states) on contiguous [BH, T, .] tensors, g already floored."""
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    common = dict(BT=BT, BK=BK, SCALAR=g.dim() == 2)
    gcum = torch.empty_like(g)
    launch("chunk_diag_cumsum", (NT, BH))(g, gcum, T, K, **common)
    states, ST = k.new_empty(BH, NT, K, V), k.new_empty(BH, K, V)
    launch("chunk_diag_fwd_states", (triton.cdiv(V, BV), BH))(k, v, gcum, S0, states, ST, T, K, V, NT, BV=BV,
                                                              **common)
    outs = []
    for q, s in zip(qs, strict):
        o = v.new_empty(BH, T, V)
        launch("chunk_diag_fwd_output", (NT * (BT // SUB_BLOCK), BH, triton.cdiv(V, BV)))(
            q, k, v, gcum, g, states, o, T, K, V, NT, BC=SUB_BLOCK, BV=BV, STRICT=int(s), **common)
        outs.append(o)
    return outs, ST, gcum, states


def _backward(launch, strict, k, v, g, gcum, states, ST, qs, dos, dST, BT):
    """(dk, dv, dg, dS0, [dq per readout]) of _forward for the cotangents dos (None: an
    unread output) and dST (None: the final state unread). One launch of each per-readout
    kernel per read output (the first adds the state's terms, the others accumulate); with
    no output read, one launch without readout terms (q and do then unused)."""
    BH, T, K, V, NT, BK, BV = _geometry(k, v, BT)
    common = dict(BT=BT, BK=BK, BV=BV, SCALAR=g.dim() == 2)
    reads = [(q, int(s), do.contiguous()) for q, s, do in zip(qs, strict, dos) if do is not None]
    launches = [dict(STRICT=s, HAS_READOUT=True, WITH_STATE=i == 0, ACCUMULATE=i > 0, **common)
                for i, (_, s, _) in enumerate(reads)] or [dict(STRICT=0, HAS_READOUT=False, WITH_STATE=True,
                                                                ACCUMULATE=False, **common)]
    readouts = reads or [(k, 0, v)]
    sub_grid = (NT * (BT // SUB_BLOCK), BH)
    dstates, dS0 = torch.empty_like(states), torch.empty_like(ST)
    for (q, _, do), flags in zip(readouts, launches):
        first = not flags["ACCUMULATE"]
        launch("chunk_diag_bwd_dstates", (triton.cdiv(V, BV), BH))(
            q, do, gcum, g, dstates, ST if dST is None else dST.contiguous(), dS0, T, K, V, NT,
            HAS_DST=first and dST is not None, **{f: x for f, x in flags.items() if f != "WITH_STATE"})
    dqs = []
    for q, s, do in reads:
        dqs.append(torch.empty_like(q))
        launch("chunk_diag_bwd_dq", sub_grid)(q, k, v, gcum, g, states, do, dqs[-1], T, K, V, NT, BC=SUB_BLOCK,
                                              STRICT=s, **common)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for (q, _, do), flags in zip(readouts, launches):
        launch("chunk_diag_bwd_dkv", sub_grid)(q, k, v, gcum, g, do, dstates, dk, dv, T, K, V, NT, BC=SUB_BLOCK,
                                               **flags)
    dg = torch.empty_like(g)
    for (q, _, _), dq, flags in zip(readouts, dqs or [k], launches):
        launch("chunk_diag_bwd_dg", (NT, BH))(q, dq, k, dk, states, ST, dstates, dg, T, K, V, NT, **flags)
    return dk, dv, dg, dS0, _per_readout(dqs, dos)


def _per_readout(dqs: list, dos) -> list:
    """dq per readout (dqs: those of the read outputs, in order), None where unread."""
    it = iter(dqs)
    return [None if do is None else next(it) for do in dos]


class ChunkDiagFunction(torch.autograd.Function):
    """chunk_diag on the Triton kernels: saves the inputs, the cumulative decays and the
    state before every chunk; the backward runs the adjoint kernels. Under create_graph=True
    the backward differentiates the torch chunk form instead (second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, strict, k, v, g, S0, *qs):
        BT = chunk_size(k.device)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        outs, ST, gcum, states = _forward(launch, strict, k, v, g.clamp(min=LOG_DECAY_FLOOR), S0, qs, BT)
        ctx.set_materialize_grads(False)
        ctx.strict, ctx.BT = strict, BT
        ctx.save_for_backward(k, v, g, S0, gcum, states, ST, *qs)
        return (*outs, ST)

    @staticmethod
    def backward(ctx, *grads):
        k, v, g, S0, gcum, states, ST, *qs = ctx.saved_tensors
        inputs, needs = (k, v, g, S0, *qs), ctx.needs_input_grad[1:]
        if wants_graph(inputs, grads):
            from ..torch.scans import chunk_diag

            def twin(k, v, g, S0, *qs):
                outs, S = chunk_diag([(q, not s) for q, s in zip(qs, ctx.strict)], k, v, g, S0)
                return (*outs, S)
            return (None,) + tuple(recompute_vjp(twin, inputs, needs, grads))
        if all(d is None for d in grads):
            return (None,) * (1 + len(inputs))
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        gf = g.clamp(min=LOG_DECAY_FLOOR)
        dk, dv, dg, dS0, dqs = _backward(launch, ctx.strict, k, v, gf, gcum, states, ST, qs, grads[:-1], grads[-1],
                                         ctx.BT)
        dg = torch.where(g >= LOG_DECAY_FLOOR, dg, 0)            # as torch.clamp's gradient
        got = (dk, dv, dg, dS0, *dqs)
        return (None,) + tuple(d if need else None for d, need in zip(got, needs))


def chunk_diag(readouts, k, v, g, S0):
    """As backends/torch/scans.chunk_diag, on the Triton kernels: readouts [(q [BH, T, K],
    inclusive)], k [BH, T, K], v [BH, T, V], g [BH, T] or [BH, T, K] (log decays), S0
    [BH, K, V]. Returns ([o [BH, T, V]], S_T)."""
    BH, T, K = k.shape
    if T == 0:
        return [v.new_zeros(BH, 0, v.shape[-1]) for _ in readouts], S0
    strict = tuple(not inclusive for _, inclusive in readouts)
    *outs, ST = ChunkDiagFunction.apply(strict, k.contiguous(), v.contiguous(), g.contiguous(), S0.contiguous(),
                                        *(q.contiguous() for q, _ in readouts))
    return list(outs), ST


def diag_matrix_stage(reads, k, v, g, S0, X0, ns: int, ran: list | None = None):
    """The triton backend's ChunkDiag stage (log decay), from the driver's whole-sequence
    values as backends/torch/scans.diag_matrix_stage takes them: heads folded into the rows.

    A non-finite input runs torch's chunk form for this call instead, and `ran` (the
    driver's record) says so: the kernels' tile products multiply the masked pairs
    (i, j > i) of a chunk too, and 0 * NaN = NaN would carry a later step's NaN into the
    earlier outputs and gradients of its chunk; scans.py's form never touches a masked
    pair (the causality the tests hold every chunkwise form to). One check per call."""
    tensors = [t for t in (k, v, g, *(q for q, _ in reads)) if isinstance(t, torch.Tensor)]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        from ..torch import scans
        if ran is not None:
            ran[-1] = "torch.chunk_diag"
        return scans.diag_matrix_stage(reads, k, v, g, S0, X0, ns)
    g_rank = None if g is None else g.dim() - ns
    kb, vb = rt.to_bt(k, 1, X0, ns), rt.to_bt(v, 1, X0, ns)
    gb = rt.to_bt(g, g_rank, X0, ns) if g is not None else kb.new_zeros(kb.shape[:2])
    outs, ST = chunk_diag([(rt.to_bt(q, 1, X0, ns), incl) for q, incl in reads], kb, vb, gb, rt.to_b(S0, ns - 1))
    return [rt.from_bt(o, X0, ns) for o in outs], rt.from_b(ST, S0)


# Every kernel as the GPU launches it (BT 64, BC 16, LAUNCH's warps), for ahead-of-time
# compiles: (name, the constexprs beyond the block sizes and SCALAR); the readouts' pair
# kernels in both readout modes, the accumulating launches of a second readout.
_ONE_READOUT = {"HAS_READOUT": True, "WITH_STATE": True, "ACCUMULATE": False}
AOT_VARIANTS = [
    ("chunk_diag_cumsum", {}),
    ("chunk_diag_fwd_states", {}),
    ("chunk_diag_fwd_output", {"STRICT": 0}),
    ("chunk_diag_fwd_output", {"STRICT": 1}),
    ("chunk_diag_bwd_dstates", {"STRICT": 0, "HAS_READOUT": True, "HAS_DST": True, "ACCUMULATE": False}),
    ("chunk_diag_bwd_dstates", {"STRICT": 1, "HAS_READOUT": True, "HAS_DST": False, "ACCUMULATE": True}),
    ("chunk_diag_bwd_dq", {"STRICT": 0}),
    ("chunk_diag_bwd_dq", {"STRICT": 1}),
    ("chunk_diag_bwd_dkv", {"STRICT": 0, **_ONE_READOUT}),
    ("chunk_diag_bwd_dkv", {"STRICT": 1, "HAS_READOUT": True, "WITH_STATE": False, "ACCUMULATE": True}),
    ("chunk_diag_bwd_dg", {"STRICT": 0, **_ONE_READOUT}),
    ("chunk_diag_bwd_dg", {"STRICT": 1, "HAS_READOUT": True, "WITH_STATE": False, "ACCUMULATE": True}),
]
_INTS = {"T", "K", "V", "NT"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64, scalar: bool = False) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-chunk-diag-aot", interpret=False)
    BK, BV = _blocks(K, V)
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        blocks = {"BT": chunk_size(torch.device("cuda")), "BC": SUB_BLOCK, "BK": BK, "BV": BV}
        const = {k: v for k, v in blocks.items() if k in fn.arg_names} | {"SCALAR": scalar} | flags
        sig = {a: ("i32" if a in _INTS else "*fp32") for a in fn.arg_names if a not in const}
        warps, stages = LAUNCH[name]
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=warps, num_stages=stages,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
