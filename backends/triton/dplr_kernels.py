"""The triton backend's kernels for the diagonal-plus-low-rank delta rule (the ChunkDPLR
form: KDA, RWKV-7), forward and backward, as a fused recurrence (what flash-linear-attention
offers as fused_recurrent_dplr_delta_rule), not yet the chunkwise WY form.

Per row (batch * head), state S [K, V], MATH.md's generalised delta rule:

    u_t = S_{t-1}ᵀ b_t,    S_t = e^{g_t} ⊙ S_{t-1} + a_t u_tᵀ + k_t v_tᵀ,    o_t = S_tᵀ q_t

(g a per-key log decay, e^{g_t} ⊙ S scales row k by e^{g_tk}). The kernels:

  dplr_fwd   one program per (V block, row): the [K, BV] columns of the state evolve
             independently (u_t reads S's column through b_t only), so they stay in registers
             for the whole time loop; o_t is written per step, the state before every
             CHECKPOINT-th step is stored (checkpoints [BH, NS, K, V]), and the final state.
  dplr_bwd   the adjoint, a reverse-time loop with the same programs. With Λ_t = ∂L/∂S_t
             (do_t added first: Λ_t += q_t do_tᵀ),
                 dq_t = S_t do_t          dk_t = Λ_t v_t       dv_t = Λ_tᵀ k_t
                 du_t = Λ_tᵀ a_t          da_t = Λ_t u_t       db_t = S_{t-1} du_t
                 dg_t = e^{g_t} ⊙ Σ_V (Λ_t ⊙ S_{t-1})
                 Λ_{t-1} = (diag(e^{g_t}) + a_t b_tᵀ)ᵀ Λ_t = e^{g_t} ⊙ Λ_t + b_t du_tᵀ
             ending at dS0 = Λ_0. The states S_{t-1} are recomputed segment by segment,
             last segment first: from the segment's checkpoint, forward over its CHECKPOINT
             steps into a per-program scratch buffer, then backward over them (S_t again one
             step from S_{t-1}). The key-side gradients (dq, dk, da, db, dg) are partial sums
             over the program's V block, written per V block and summed by the caller.

Every exponent is a single step's log decay g_t ≤ 0 (floored at LOG_DECAY_FLOOR, the gradient
as clamp's), so nothing overflows under strong decay. The time loops stop at T (the last
segment may be short); padded keys read zeros and keep zero rows of S and Λ. Outputs are causal by construction
(step t reads only steps <= t), so no NaN guard is needed; the backward pairs a step's
cotangent only with steps it passed through, as the per-step reference does.

Reverse and cu_seqlens are the runtime's (it flips / splits around the stage)."""
from __future__ import annotations

import torch
import triton

from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.dplr import LOG_DECAY_FLOOR
from .launch import Kernels, launcher

SOURCE = r'''
@triton.jit
def _row(ptr, t, cols, W, mask):
    """Step t (< T: the loops stop there) of one row's contiguous [T, W] slice."""
    return tl.load(ptr + t * W + cols, mask=mask, other=0.0)


@triton.jit
def _store_row(ptr, t, cols, W, mask, x):
    tl.store(ptr + t * W + cols, x, mask=mask)


@triton.jit
def _state_tile(ptr, index, keys, vals, K, V):
    """The [K, V] state `index` of a contiguous [.., K, V] tensor, as a [BK, BV] tile."""
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    return tl.load(ptr + index * K * V + keys[:, None] * V + vals[None, :], mask=mask, other=0.0)


@triton.jit
def _store_state(ptr, index, keys, vals, K, V, x):
    mask = (keys[:, None] < K) & (vals[None, :] < V)
    tl.store(ptr + index * K * V + keys[:, None] * V + vals[None, :], x, mask=mask)


@triton.jit
def _step(S, k, v, a, b, g, t, keys, vals, K, V, key_mask, val_mask):
    """One step: (u_t = S_{t-1}ᵀ b_t, e^{g_t}, S_t) for the columns `vals`. Padded keys read
    g = a = b = k = 0: their rows of S stay zero."""
    decay = tl.exp(_row(g, t, keys, K, key_mask))
    u = tl.sum(_row(b, t, keys, K, key_mask)[:, None] * S, 0)
    S_next = (decay[:, None] * S + _row(a, t, keys, K, key_mask)[:, None] * u[None, :]
              + _row(k, t, keys, K, key_mask)[:, None] * _row(v, t, vals, V, val_mask)[None, :])
    return u, decay, S_next


@triton.jit
def dplr_fwd(q, k, v, a, b, g, S0, o, checkpoints, ST, T, K, V, NS,
             CHECKPOINT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """o_t = S_tᵀ q_t for every step, the state before every CHECKPOINT-th step, and S_T.
    Program (V block, row)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    key_mask, val_mask = keys < K, vals < V
    q, k, a, b, g = q + bh * T * K, k + bh * T * K, a + bh * T * K, b + bh * T * K, g + bh * T * K
    v, o = v + bh * T * V, o + bh * T * V
    S = _state_tile(S0, bh, keys, vals, K, V)
    for segment in range(NS):
        _store_state(checkpoints, bh * NS + segment, keys, vals, K, V, S)
        for t in range(segment * CHECKPOINT, tl.minimum(segment * CHECKPOINT + CHECKPOINT, T)):
            u, decay, S = _step(S, k, v, a, b, g, t, keys, vals, K, V, key_mask, val_mask)
            _store_row(o, t, vals, V, val_mask, tl.sum(_row(q, t, keys, K, key_mask)[:, None] * S, 0))
    _store_state(ST, bh, keys, vals, K, V, S)


@triton.jit
def dplr_bwd(q, k, v, a, b, g, checkpoints, do, dST, scratch, dq, dk, dv, da, db, dg, dS0, T, K, V, NS,
             CHECKPOINT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr):
    """The reverse-time adjoint (module docstring). dv and dS0 are this program's columns;
    dq, dk, da, db, dg [NV, BH, T, K] this V block's partial sums. Program (V block, row)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    program = pid_v * tl.num_programs(1) + bh          # its scratch slots, and its partial sums' row
    keys = tl.arange(0, BK)
    vals = pid_v * BV + tl.arange(0, BV)
    key_mask, val_mask = keys < K, vals < V
    q, k, a, b, g = q + bh * T * K, k + bh * T * K, a + bh * T * K, b + bh * T * K, g + bh * T * K
    v, do, dv = v + bh * T * V, do + bh * T * V, dv + bh * T * V
    dq, dk, da, db, dg = (dq + program * T * K, dk + program * T * K, da + program * T * K, db + program * T * K,
                          dg + program * T * K)
    # the program's [CHECKPOINT, BK, BV] scratch, padded tiles (no masks)
    scratch += program * CHECKPOINT * BK * BV + keys[:, None] * BV + tl.arange(0, BV)[None, :]
    if HAS_DST:
        lam = _state_tile(dST, bh, keys, vals, K, V)
    else:
        lam = tl.zeros([BK, BV], dtype=dS0.dtype.element_ty)
    for back in range(NS):
        segment = NS - 1 - back
        first = segment * CHECKPOINT
        steps = tl.minimum(CHECKPOINT, T - first)
        # the segment's states before each step, recomputed from its checkpoint
        S = _state_tile(checkpoints, bh * NS + segment, keys, vals, K, V)
        for j in range(steps):
            tl.store(scratch + j * BK * BV, S)
            u, decay, S = _step(S, k, v, a, b, g, first + j, keys, vals, K, V, key_mask, val_mask)
        tl.debug_barrier()               # the scratch written above is read by other threads below
        for jb in range(steps):
            j = steps - 1 - jb
            t = first + j
            S_prev = tl.load(scratch + j * BK * BV)
            u, decay, S = _step(S_prev, k, v, a, b, g, t, keys, vals, K, V, key_mask, val_mask)
            do_t = _row(do, t, vals, V, val_mask)
            a_t = _row(a, t, keys, K, key_mask)
            lam += _row(q, t, keys, K, key_mask)[:, None] * do_t[None, :]
            du = tl.sum(lam * a_t[:, None], 0)
            _store_row(dq, t, keys, K, key_mask, tl.sum(S * do_t[None, :], 1))
            _store_row(dk, t, keys, K, key_mask, tl.sum(lam * _row(v, t, vals, V, val_mask)[None, :], 1))
            _store_row(da, t, keys, K, key_mask, tl.sum(lam * u[None, :], 1))
            _store_row(db, t, keys, K, key_mask, tl.sum(S_prev * du[None, :], 1))
            _store_row(dg, t, keys, K, key_mask, decay * tl.sum(lam * S_prev, 1))
            _store_row(dv, t, vals, V, val_mask, tl.sum(lam * _row(k, t, keys, K, key_mask)[:, None], 0))
            lam = decay[:, None] * lam + _row(b, t, keys, K, key_mask)[:, None] * du[None, :]
        tl.debug_barrier()               # the next segment overwrites the scratch
    _store_state(dS0, bh, keys, vals, K, V, lam)
'''

CHECKPOINT = 16     # steps between stored states: the backward recomputes at most this many into scratch
MAX_BV = 32         # V block: one program per (V block, row); [BK, BV] state tiles stay in registers
STATE_TILE = 2048   # elements of a [BK, BV] tile at most (see _blocks)

_KERNELS = Kernels(SOURCE, "recdsl-triton-dplr")

# num_warps per kernel on a GPU (num_stages 1: each step's loads depend on nothing the loop
# could prefetch usefully ahead). The backward keeps three [BK, BV] tiles live (Λ, S_{t-1},
# S_t), hence twice the forward's warps; with _blocks' tile bound nothing spills at K = V = 64
# or 128 on sm_80 / sm_90 (tests/triton/test_chunk_dplr.py compiles them).
LAUNCH = {"dplr_fwd": 4, "dplr_bwd": 8}


def _launcher(ns: dict, device):
    """kernel name, grid -> the launch, with LAUNCH's warps on a GPU."""
    return launcher(ns, device, lambda name: {"num_warps": LAUNCH[name], "num_stages": 1})


def _blocks(K: int, V: int) -> tuple[int, int]:
    """BK (all keys: u_t = S_{t-1}ᵀ b_t sums over them) and BV, at most STATE_TILE elements a
    tile: at K = 128 the backward's three [128, 32] tiles spill on sm_90, [128, 16] do not."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, min(max(16, triton.next_power_of_2(V)), MAX_BV, max(16, STATE_TILE // BK))


def _forward(launch, q, k, v, a, b, g, S0):
    """(o, S_T, checkpoints) on contiguous [BH, T, .] tensors, g already floored."""
    BH, T, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    NS = triton.cdiv(T, CHECKPOINT)
    o, ST, checkpoints = v.new_empty(BH, T, V), k.new_empty(BH, K, V), k.new_empty(BH, NS, K, V)
    launch("dplr_fwd", (triton.cdiv(V, BV), BH))(q, k, v, a, b, g, S0, o, checkpoints, ST, T, K, V, NS,
                                                 CHECKPOINT=CHECKPOINT, BK=BK, BV=BV)
    return o, ST, checkpoints


def _backward(launch, q, k, v, a, b, g, checkpoints, do, dST):
    """(dq, dk, dv, da, db, dg, dS0) for the cotangents do (None: unread) and dST (None: unread)."""
    BH, T, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    NS, NV = checkpoints.shape[1], triton.cdiv(V, BV)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    partial = [k.new_empty(NV, BH, T, K) for _ in range(5)]     # dq, dk, da, db, dg per V block
    dv, dS0 = torch.empty_like(v), k.new_empty(BH, K, V)
    scratch = k.new_empty(NV * BH, CHECKPOINT, BK, BV)
    launch("dplr_bwd", (NV, BH))(q, k, v, a, b, g, checkpoints, do, dS0 if dST is None else dST.contiguous(),
                                 scratch, *partial[:2], dv, *partial[2:], dS0, T, K, V, NS,
                                 CHECKPOINT=CHECKPOINT, BK=BK, BV=BV, HAS_DST=dST is not None)
    dq, dk, da, db, dg = (p.sum(0) for p in partial)
    return dq, dk, dv, da, db, dg, dS0


class DPLRFunction(torch.autograd.Function):
    """The fused recurrence on the Triton kernels: saves the inputs and the checkpoints; the
    backward runs the reverse-time kernel. Under create_graph=True the backward differentiates
    the torch chunk form instead (second derivatives are autograd's)."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, S0):
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        o, ST, checkpoints = _forward(launch, q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR), S0)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, a, b, g, S0, checkpoints)
        return o, ST

    @staticmethod
    def backward(ctx, do, dST):
        q, k, v, a, b, g, S0, checkpoints = ctx.saved_tensors
        inputs = (q, k, v, a, b, g, S0)
        if wants_graph(inputs, (do, dST)):
            from ..torch.dplr import chunk_dplr
            return tuple(recompute_vjp(lambda *xs: chunk_dplr(*xs), inputs, ctx.needs_input_grad, (do, dST)))
        if do is None and dST is None:
            return (None,) * len(inputs)
        launch = _launcher(_KERNELS.ns(k.device), k.device)
        dq, dk, dv, da, db, dg, dS0 = _backward(launch, q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR), checkpoints,
                                                do, dST)
        dg = torch.where(g >= LOG_DECAY_FLOOR, dg, 0)            # as torch.clamp's gradient
        return tuple(d if need else None for d, need in zip((dq, dk, dv, da, db, dg, dS0), ctx.needs_input_grad))


def fused_recurrent_dplr(q, k, v, a, b, g, S0):
    """As backends/torch/dplr.chunk_dplr (same arguments, same results), on the Triton kernels:
    q, k, a, b, g [BH, T, K] (g a per-key log decay), v [BH, T, V], S0 [BH, K, V]
    -> (o [BH, T, V], S_T [BH, K, V])."""
    BH, T, K = k.shape
    if T == 0:
        return v.new_zeros(BH, 0, v.shape[-1]), S0
    return DPLRFunction.apply(*(x.contiguous() for x in (q, k, v, a, b, g, S0)))


def dplr_stage(q, k, v, a, b, g, S0, first_input, ns: int, ran: list | None = None):
    """The triton backend's ChunkDPLR stage, from the driver's whole-sequence values as
    backends/torch/scans.dplr_stage takes them: heads folded into the rows, a scalar decay
    broadcast over the keys."""
    from ..torch import seq_rt as rt
    vecs = [rt.to_bt(x, 1, first_input, ns) for x in (q, k, a, b)]
    K = vecs[0].shape[-1]
    gb = rt.to_bt(g, g.dim() - ns, first_input, ns)
    gb = gb[..., None].expand(gb.shape[:2] + (K,)) if gb.dim() == 2 else gb
    o, ST = fused_recurrent_dplr(vecs[0], vecs[1], rt.to_bt(v, 1, first_input, ns), vecs[2], vecs[3], gb,
                                 rt.to_b(S0, ns - 1))
    return rt.from_bt(o, first_input, ns), rt.from_b(ST, S0)


# Every kernel as the GPU launches it, for ahead-of-time compiles: (name, constexprs beyond the blocks).
AOT_VARIANTS = [("dplr_fwd", {}), ("dplr_bwd", {"HAS_DST": True}), ("dplr_bwd", {"HAS_DST": False})]
_INTS = {"T", "K", "V", "NS"}


def compile_ahead(arch: int = 90, K: int = 64, V: int = 64) -> list:
    """The kernels compiled for sm_<arch> at K x V float32 states (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-dplr-aot", interpret=False)
    BK, BV = _blocks(K, V)
    out = []
    for name, flags in AOT_VARIANTS:
        fn = ns[name]
        const = {"CHECKPOINT": CHECKPOINT, "BK": BK, "BV": BV} | flags
        sig = {p: ("i32" if p in _INTS else "*fp32") for p in fn.arg_names if p not in const}
        out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=LAUNCH[name], num_stages=1,
                                      extra_options={"maxnreg": MAXNREG}))
    return out
