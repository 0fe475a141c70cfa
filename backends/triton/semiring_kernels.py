"""The triton backend's kernel for dense semiring recurrences (the DenseSemiringScan form's
sequential variant: the HMM forward algorithm, Viterbi), forward and backward.

    h_t[i] = (+)_j (h_{t-1}[j] + A_t[j, i]) + b_t[i]      (+) = logsumexp (LSE) or max

One program per row (batch x head) walks time; at each step it streams the transition in
tiles of BJ source states x all N target states from global memory (a param shared by the
rows of a head, or a per-step input), so N is bounded by one [BN] vector per program, not
by an [N, N] tile in registers (the generated sequential kernel holds its matrices whole:
above 64 x 64 it cannot run these cells). The (+) over the source states is online over
the tiles: a running max, and for LSE a running sum rescaled to it (every exponent <= 0).
The previous step's h is read back from the output row just written (a barrier between
steps makes one thread's store visible to the others' loads).

Backward (MATH.md §2 with a dense transition), a reverse pass over time: the weights
W_t[j, i] = exp(h_{t-1}[j] + A_t[j, i] - z_t[i]) with z_t = h_t - b_t (LSE: the posterior
of the transition j -> i), or the indicator of the first argmax over j (max-plus: the
subgradient of the winning path), recomputed per tile from one pass that rebuilds z (and
the argmax); then

    lambda_t = g_t + W_{t+1} lambda_{t+1},   dA_t = W_t * lambda_t[None, :],
    db_t[i] = lambda_t[i] sum_j W_t[j, i],   dh_0 = W_1 lambda_1

with W_{t+1} lambda_{t+1} handed from one step to the next through a scratch row (the
sum runs over the target states i, which a program holds whole, and lands on the source
states j, which it visits tile by tile). A shared transition's gradient is accumulated
per row in place over time and summed over the batch by the caller.

Reverse and cu_seqlens are the runtime's (the registry entry's caps); heads are rows.
Inputs in bfloat16 / float16 run in float32 (the state of a log-space recurrence
accumulates); float64 stays float64."""
from __future__ import annotations

import torch
import triton

from ..torch import semiring
from ..torch.double_backward import recompute_vjp, wants_graph
from .launch import Kernels, launcher

SOURCE = r'''
@triton.jit
def _scores(A, h_prev, t, sources, targets, N, a_step):
    """The tile x[j, i] = h_{t-1}[j] + A_t[j, i] of the source states `sources` (-inf outside)."""
    ok = (sources[:, None] < N) & (targets[None, :] < N)
    hp = tl.load(h_prev + sources, mask=sources < N, other=float("-inf"))
    a = tl.load(A + t * a_step + sources[:, None] * N + targets[None, :], mask=ok, other=float("-inf"))
    return hp[:, None] + a


@triton.jit
def _reduce(A, h_prev, t, targets, N, a_step, LSE: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    """z_t[i] = (+)_j h_{t-1}[j] + A_t[j, i] over tiles of BJ sources, and the first argmax
    over j (max-plus; the backward's winner)."""
    best = tl.full([BN], float("-inf"), h_prev.dtype.element_ty)
    total = tl.zeros([BN], h_prev.dtype.element_ty)
    winner = tl.zeros([BN], tl.int32)
    for first in range(0, N, BJ):
        sources = first + tl.arange(0, BJ)
        x = _scores(A, h_prev, t, sources, targets, N, a_step)
        tile_best = tl.max(x, axis=0)
        tile_winner = tl.min(tl.where(x == tile_best[None, :], sources[:, None], N), axis=0)
        better = tile_best > best          # strict: an earlier tile keeps a tie (the first argmax)
        winner = tl.where(better, tile_winner, winner)
        new_best = tl.maximum(best, tile_best)
        if LSE:
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)   # all -inf so far: nothing to rescale
            total = total * tl.exp(best - shift) + tl.sum(tl.exp(x - shift[None, :]), axis=0)
        best = new_best
    if LSE:
        z = tl.where(best == float("-inf"), best, best + tl.log(tl.where(best == float("-inf"), 1.0, total)))
    else:
        z = best
    return z, winner


@triton.jit
def dense_semiring_fwd(A, b, h0, h, T, N, HEADS, SHARED: tl.constexpr, LSE: tl.constexpr,
                       BN: tl.constexpr, BJ: tl.constexpr):
    row = tl.program_id(0)
    targets = tl.arange(0, BN)
    if SHARED:
        A = A + (row % HEADS) * N * N      # row = batch * HEADS + head reads its head's matrix
        a_step = 0
    else:
        A = A + row * T * N * N
        a_step = N * N
    out = h + row * T * N
    h_prev = h0 + row * N
    for t in range(T):
        z, _ = _reduce(A, h_prev, t, targets, N, a_step, LSE, BN, BJ)
        bias = tl.load(b + row * T * N + t * N + targets, mask=targets < N, other=0.0)
        tl.store(out + t * N + targets, z + bias, mask=targets < N)
        tl.debug_barrier()                 # h_t's stores before the next step's loads of it
        h_prev = out + t * N


@triton.jit
def dense_semiring_bwd(A, b, h0, h, gh, dA, db, dh0, carry, T, N, HEADS, SHARED: tl.constexpr,
                       LSE: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    row = tl.program_id(0)
    targets = tl.arange(0, BN)
    on = targets < N
    if SHARED:
        A = A + (row % HEADS) * N * N
        dA = dA + row * N * N              # this row's share of its head's gradient, summed by the caller
        a_step = 0
    else:
        A = A + row * T * N * N
        dA = dA + row * T * N * N
        a_step = N * N
    carry = carry + row * N                # W_{t+1} lambda_{t+1}, over the source states of step t+1
    for back in range(T):
        t = T - 1 - back
        lam = tl.load(gh + row * T * N + t * N + targets, mask=on, other=0.0)
        if back > 0:
            lam += tl.load(carry + targets, mask=on, other=0.0)
        tl.debug_barrier()                 # every thread has read the carry before it is overwritten
        if t > 0:
            h_prev = h + row * T * N + (t - 1) * N
            into = carry
        else:
            h_prev = h0 + row * N
            into = dh0 + row * N
        z, winner = _reduce(A, h_prev, t, targets, N, a_step, LSE, BN, BJ)
        reached = z != float("-inf")      # no path into i: no weights
        column_sum = tl.zeros([BN], h_prev.dtype.element_ty)
        for first in range(0, N, BJ):
            sources = first + tl.arange(0, BJ)
            x = _scores(A, h_prev, t, sources, targets, N, a_step)
            if LSE:
                w = tl.where(reached[None, :], tl.exp(x - tl.where(reached, z, 0.0)[None, :]), 0.0)
            else:
                w = tl.where(reached[None, :] & (sources[:, None] == winner[None, :]), 1.0, 0.0)
            w = tl.where((sources[:, None] < N) & on[None, :], w, 0.0)
            column_sum += tl.sum(w, axis=0)
            tl.store(into + sources, tl.sum(w * lam[None, :], axis=1), mask=sources < N)
            tile = sources[:, None] * N + targets[None, :]
            ok = (sources[:, None] < N) & on[None, :]
            if SHARED:                     # zeroed by the caller: accumulated over time
                seen = tl.load(dA + tile, mask=ok, other=0.0)
                tl.store(dA + tile, seen + w * lam[None, :], mask=ok)
            else:
                tl.store(dA + t * N * N + tile, w * lam[None, :], mask=ok)
        tl.store(db + row * T * N + t * N + targets, lam * column_sum, mask=on)
        tl.debug_barrier()                 # the carry's stores before the next step's loads
'''

_KERNELS = Kernels(SOURCE, "recdsl-triton-dense-semiring")

# Launch options on a GPU: one warp group streams [BJ, BN] tiles of the transition.
NUM_WARPS = 4


def _tiles(N: int, device) -> tuple[int, int]:
    """BN: every target state in one vector; BJ: source states per tile, so a tile holds
    about 4096 elements on a GPU (32 per thread at 4 warps: no spills), 16384 in the
    interpreter (one numpy call per tile op: fewer, bigger tiles)."""
    BN = max(16, triton.next_power_of_2(N))
    budget = 4096 if device.type == "cuda" else 16384
    return BN, max(1, min(triton.next_power_of_2(N), budget // BN))


def _launch(name: str, R: int, device):
    """One program per row; NUM_WARPS on a GPU."""
    return launcher(_KERNELS.ns(device), device, lambda _: {"num_warps": NUM_WARPS})(name, (R,))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class DenseSemiringLoop(torch.autograd.Function):
    """The Triton loop: A [H, N, N] (shared by the rows of a head) or [R, T, N, N], b [R, T, N],
    h0 [R, N] -> h [R, T, N]; the backward kernel's gradients of all three. Under
    create_graph=True the backward differentiates torch's per-step loop instead."""

    @staticmethod
    def forward(ctx, kind, A, shared, b, h0):
        dtype = _compute_dtype(b)
        Ac, bc, h0c = (x.to(dtype).contiguous() for x in (A, b, h0))
        R, T, N = bc.shape
        h = torch.empty_like(bc)
        BN, BJ = _tiles(N, bc.device)
        _launch("dense_semiring_fwd", R, bc.device)(Ac, bc, h0c, h, T, N, A.shape[0] if shared else 1,
                                                   SHARED=shared, LSE=kind == "lse", BN=BN, BJ=BJ)
        ctx.kind, ctx.shared, ctx.dtypes = kind, shared, (A.dtype, b.dtype, h0.dtype)
        ctx.save_for_backward(Ac, bc, h0c, h)
        return h.to(b.dtype)

    @staticmethod
    def backward(ctx, gh):
        A, b, h0, h = ctx.saved_tensors
        if wants_graph((A, b, h0), (gh,)):
            fn = lambda A_, b_, h0_: semiring.loop_torch(ctx.kind, A_, ctx.shared, b_, h0_)   # noqa: E731
            needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
            dA, db, dh0 = recompute_vjp(fn, (A, b, h0), needs, (gh.to(h.dtype),))
        else:
            dA, db, dh0 = _backward(ctx.kind, ctx.shared, A, b, h0, h, gh.to(h.dtype).contiguous())
        dA, db, dh0 = (None if d is None else d.to(t) for d, t in zip((dA, db, dh0), ctx.dtypes))
        return None, dA, None, db, dh0


def _backward(kind: str, shared: bool, A, b, h0, h, gh):
    R, T, N = h.shape
    heads = A.shape[0] if shared else 1
    dA = h.new_zeros(R, N, N) if shared else h.new_empty(R, T, N, N)
    db, dh0, carry = torch.empty_like(h), torch.empty_like(h0), h.new_empty(R, N)
    BN, BJ = _tiles(N, h.device)
    _launch("dense_semiring_bwd", R, h.device)(A, b, h0, h, gh, dA, db, dh0, carry, T, N, heads,
                                               SHARED=shared, LSE=kind == "lse", BN=BN, BJ=BJ)
    if shared:
        dA = dA.reshape(R // heads, heads, N, N).sum(0)
    return dA, db, dh0


def dense_semiring_stage(kind: str, A, b, h0, first_input, ns: int, products: bool = False, ran: list | None = None):
    """The triton backend's dense semiring stage, from the driver's whole-sequence values as
    backends/torch/semiring.dense_semiring_stage takes them: the sequential variant (the
    registry declines `products`, which has no Triton kernel)."""
    assert not products, "triton.dense_semiring runs the loop variant only (kernels.py)"
    return semiring.dense_semiring_stage(kind, A, b, h0, first_input, ns, products=False, ran=ran,
                                         loop=DenseSemiringLoop.apply)


def compile_ahead(arch: int = 90, N: int = 128) -> list:
    """Both kernels compiled for sm_<arch> at N states, float32 (aot.py: no GPU needed):
    [aot.Compiled] with registers, spills and shared memory."""
    from . import aot
    from .jit import module_from_source
    from .launch import MAXNREG
    ns = module_from_source(SOURCE, "recdsl-triton-dense-semiring-aot", interpret=False)
    BN, BJ = _tiles(N, torch.device("cuda"))
    out = []
    for name in ("dense_semiring_fwd", "dense_semiring_bwd"):
        for shared in (True, False):
            fn = ns[name]
            const = {"SHARED": shared, "LSE": True, "BN": BN, "BJ": BJ}
            sig = {a: ("i32" if a in ("T", "N", "HEADS") else "*fp32") for a in fn.arg_names if a not in const}
            out.append(aot.compile_kernel(fn, sig, const, arch=arch, num_warps=NUM_WARPS, num_stages=1,
                                          extra_options={"maxnreg": MAXNREG}))
    return out
