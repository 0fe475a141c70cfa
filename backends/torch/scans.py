"""Whole-sequence recurrences in torch: the kernels the `torch` backend's generated code
calls. Element scans go to the C library when it is available (cpu_kernels), else to
log-depth doubling scans in torch; matrix states with diagonal decay and the delta rule
use the chunkwise forms of MATH.md §3-4 (matmuls inside chunks, a short loop over chunks),
with a hand-derived backward (the section "The chunkwise forms with a derived backward").

Layouts: sequences [B, T, *shape] (B may include heads), initial states [B, *shape]."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_kernels
from .double_backward import recompute_vjp, wants_graph


# A step's log decay below this wipes the state anyway (exp(-80) ~ 2e-35); clamping it keeps
# cumulative sums inside a chunk free of cancellation (a decay of -1e9 used as a reset would
# otherwise cost 1e9 * eps of absolute precision in every later exponent of the chunk).
LOG_DECAY_FLOOR = -80.0

# Chunk lengths of the chunkwise forms on the training path (module constants, read at every call:
# tests shorten them to cover several chunks and sub-blocks on short sequences). The delta rule's
# intra-chunk work (scores, solve and their adjoints) grows with C per step while its chunk-to-
# chunk products do not: 32 is the faster one of its training steps on CPU (measured at K = V = 64).
DIAG_CHUNK = 64
DELTA_CHUNK = 32


def use_c(*ts) -> bool:
    return all(t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu" for t in ts) \
        and cpu_kernels.available()


def _flat(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    return x.reshape(B, T, -1)


def element_scan(kind: str, a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t (diag), exp(a_t) * h_{t-1} + x_t (diagexp: the decay in log
    space, exponentiated inside the scan), max(h_{t-1} + a_t, x_t) (maxplus) or
    logaddexp(h_{t-1} + a_t, x_t) (lse). a broadcasts to x: [B, T, *shape]."""
    shape = torch.broadcast_shapes(a.shape, x.shape, h0[:, None].shape)   # S' = S: the state alone has its shape
    B, T = shape[:2]
    a, x = a.expand(shape), x.expand(shape)
    h0 = h0.expand((B,) + tuple(shape[2:]))
    if T == 0:
        return x.clone()
    if use_c(a, x, h0):
        h = cpu_kernels.element_scan(kind, _flat(a, B, T), _flat(x, B, T), h0.reshape(B, -1))
    else:
        if kind == "diagexp":
            kind, a = "diag", torch.exp(a)
        h = doubling_scan(kind, _flat(a, B, T), _flat(x, B, T), h0.reshape(B, -1))
    return h.reshape(shape)


def doubling_scan(kind: str, a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The same scans in log2(T) rounds of whole-tensor ops (Hillis-Steele), for when no C
    compiler is available. Differentiable by autograd. Combine of (a1, x1) then (a2, x2):
    diag (a1 a2, a2 x1 + x2); maxplus (a1 + a2, max(x1 + a2, x2)); lse likewise."""
    first = {"diag": lambda a0, x0: a0 * h0 + x0,
             "maxplus": lambda a0, x0: torch.maximum(h0 + a0, x0),
             "lse": lambda a0, x0: torch.logaddexp(h0 + a0, x0)}[kind]
    x = torch.cat([first(a[:, :1].squeeze(1), x[:, :1].squeeze(1))[:, None], x[:, 1:]], 1)
    T = x.shape[1]
    d = 1
    while d < T:
        a_hi, x_hi, x_lo, a_lo = a[:, d:], x[:, d:], x[:, :-d], a[:, :-d]
        if kind == "diag":
            x = torch.cat([x[:, :d], a_hi * x_lo + x_hi], 1)
            a = torch.cat([a[:, :d], a_hi * a_lo], 1)
        elif kind == "maxplus":
            x = torch.cat([x[:, :d], torch.maximum(x_lo + a_hi, x_hi)], 1)
            a = torch.cat([a[:, :d], a_hi + a_lo], 1)
        else:
            x = torch.cat([x[:, :d], torch.logaddexp(x_lo + a_hi, x_hi)], 1)
            a = torch.cat([a[:, :d], a_hi + a_lo], 1)
        d *= 2
    return x


def block_scan(A: list[list[torch.Tensor | None]], xs: list[torch.Tensor], h0s: list[torch.Tensor]):
    """k coupled states with elementwise coefficients: h_i' = sum_j A[i][j] * h_j + x_i.
    Returns the k sequences [B, T, *shape]."""
    k = len(xs)
    shape = xs[0].shape
    for x in xs[1:]:
        shape = torch.broadcast_shapes(shape, x.shape)
    for row in A:
        for a in row:
            if a is not None:
                shape = torch.broadcast_shapes(shape, a.shape)
    B, T = shape[:2]
    ref = xs[0]
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    Am = torch.stack([torch.stack([(a if a is not None else zero).expand(shape) for a in row], -1) for row in A], -2)
    X = torch.stack([x.expand(shape) for x in xs], -1)
    H0 = torch.stack([h.expand((B,) + tuple(shape[2:])) for h in h0s], -1)
    C = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    Am, X, H0 = Am.reshape(B, T, C, k, k), X.reshape(B, T, C, k), H0.reshape(B, C, k)
    if T == 0:
        H = X
    elif use_c(Am, X, H0) and k <= 16:
        H = cpu_kernels.block_scan(Am, X, H0)
    else:
        H = _block_doubling(Am, X, H0)
    H = H.reshape(tuple(shape) + (k,))
    return [H[..., i] for i in range(k)]


def _block_doubling(A, X, H0):
    X = torch.cat([(A[:, 0] @ H0[..., None])[..., 0][:, None] + X[:, :1], X[:, 1:]], 1)
    T, d = X.shape[1], 1
    while d < T:
        X = torch.cat([X[:, :d], (A[:, d:] @ X[:, :-d, ..., None])[..., 0] + X[:, d:]], 1)
        A = torch.cat([A[:, :d], A[:, d:] @ A[:, :-d]], 1)
        d *= 2
    return X


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _pad_t(x: torch.Tensor, T_pad: int) -> torch.Tensor:
    if x.shape[1] == T_pad:
        return x
    pad = torch.zeros((x.shape[0], T_pad - x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], 1)


# ---------------------------------------------------------------------------------------------
# Causal building blocks of the chunkwise forms.
#
# Inside a chunk, row i may only depend on rows j <= i (or j < i). A dense matmul with a
# triangular matrix still multiplies the masked zeros by the later rows, and 0 * NaN = NaN
# (0 * inf too): one non-finite input at step p would poison every earlier output of its
# chunk, and, in the backward, every earlier gradient. These three functions never touch a
# pair (i, j) outside the mask, forward or backward:
#   causal_mm      L @ X for a lower-triangular L: one dense matmul when X is all finite (then
#                  the masked zeros multiply finite numbers; checked on CPU), else by halving
#                  (no masked block is multiplied);
#   causal_scores  (Q Kᵀ) with exact zeros above the diagonal, its dQ by causal_mm;
#   decay_pairs    exp(Σ_{j < t <= i} g_t) with exact zeros above the diagonal, whose backward
#                  routes the gradient of pair (i, j) to the steps (j, i] only (prefix sums of
#                  the pair gradients, never a difference of two cumulative sums, which would
#                  carry a later row's NaN into every earlier step as NaN - NaN).
# Every backward is written in differentiable ops (second derivatives work).
# ---------------------------------------------------------------------------------------------

def causal_mask(C: int, strict, device) -> torch.Tensor:
    """[C, C] bool: j <= i (j < i when strict); for a tuple of flags, [len, C, C], one per slice."""
    idx = torch.arange(C, device=device)
    if isinstance(strict, tuple):
        return torch.stack([idx[None, :] <= idx[:, None] - int(s) for s in strict])
    return idx[None, :] <= idx[:, None] - int(strict)


def _tril_product(A: torch.Tensor, X: torch.Tensor, strict, zeros_above: bool = False) -> torch.Tensor:
    """o_i = Σ_{j <= i - strict} A_ij X_j reading only those A_ij and X_j (no autograd).
    A [..., C, C], X [..., C, V]; strict a flag, or a tuple of flags for the slices of A's
    third-last axis; zeros_above: the caller's A is exactly zero outside the mask (the dense
    path then skips masking it). Halving: level s adds, inside every 2s-block, the block of
    its second half's rows against its first half's columns (log2 C batched matmuls)."""
    C, V = X.shape[-2], X.shape[-1]
    mask = causal_mask(C, strict, A.device)
    if X.device.type == "cpu" and bool(torch.isfinite(X.sum())):
        # X finite (a sum is finite only then): the masked zeros multiply finite values, so one
        # dense matmul is exact. (On an accelerator the test would be a device sync per call.)
        A = A if zeros_above else A.masked_fill(~mask, 0)
        if A.dim() == X.dim() and A.dim() > 3 and X.shape[-3] == 1 < A.shape[-3]:   # slices of A share X: one matmul
            return torch.matmul(A.flatten(-3, -2), X.squeeze(-3).contiguous()).unflatten(-2, A.shape[-3:-1])
        return torch.matmul(A, X.contiguous())           # (contiguous: a strided batch runs one gemm per matrix)
    # the diagonal: masked after the product, so a strict slice gets exact zeros, not 0 * X_i
    diag = (A.diagonal(dim1=-2, dim2=-1)[..., None] * X).masked_fill(~mask.diagonal(dim1=-2, dim2=-1)[..., None], 0)
    lead = torch.broadcast_shapes(A.shape[:-2], X.shape[:-2], diag.shape[:-2])
    Cp = 1 << max(C - 1, 0).bit_length()                # C rounded up to a power of two
    A = A.expand(lead + (C, C)).reshape(-1, C, C)
    X = X.expand(lead + (C, V)).reshape(-1, C, V)
    out = diag.expand(lead + (C, V)).reshape(-1, C, V)
    if Cp != C:                                          # padded rows come last: no real row reads them
        A = torch.nn.functional.pad(A, (0, Cp - C, 0, Cp - C))
        X = torch.nn.functional.pad(X, (0, 0, 0, Cp - C))
        out = torch.nn.functional.pad(out, (0, 0, 0, Cp - C))
    A, out = A.contiguous(), out.clone()
    n = A.shape[0]
    s = 1
    while s < Cp:
        nb = Cp // (2 * s)
        # the (second half, first half) block of every 2s-block on the diagonal: [n, nb, s, s]
        blk = A.as_strided((n, nb, s, s), (Cp * Cp, 2 * s * (Cp + 1), Cp, 1), A.storage_offset() + s * Cp)
        xf = X.view(n, nb, 2, s, V)[:, :, 0]
        dst = out.view(n, nb, 2, s, V)[:, :, 1]
        if s <= 2:                                       # tiny blocks: broadcast, not a batch of 1x1 matmuls
            dst += (blk[..., None] * xf[:, :, None]).sum(-2)
        else:
            dst += torch.matmul(blk, xf)
        s *= 2
    return out[:, :C].reshape(lead + (C, V))


class _CausalMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, X, strict, zeros_above):
        ctx.strict = strict
        ctx.save_for_backward(A, X)
        return _tril_product(A, X, strict, zeros_above)

    @staticmethod
    def backward(ctx, dO):
        A, X = ctx.saved_tensors
        mask = causal_mask(A.shape[-1], ctx.strict, A.device)
        dA = dX = None
        if ctx.needs_input_grad[0]:                      # row i: dO_i · X_j for j <= i only
            dA = _sum_to(torch.matmul(dO, X.transpose(-1, -2)).masked_fill(~mask, 0), A.shape)
        if ctx.needs_input_grad[1]:                      # column j: Σ_{i >= j} A_ij dO_i (masked A: exact zeros)
            dX = _sum_to(torch.matmul(A.masked_fill(~mask, 0).transpose(-1, -2), dO), X.shape)
        return dA, dX, None, None


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    return x if x.shape == shape else x.sum_to_size(shape)


def causal_mm(A: torch.Tensor, X: torch.Tensor, strict=False, zeros_above: bool = False) -> torch.Tensor:
    """o_i = Σ_{j <= i} A_ij X_j (j < i when strict; a tuple of flags: one per slice of A's
    third-last axis): A [..., C, C] lower triangular (its upper part is never read; say
    zeros_above when it is exactly zero, to spare a masked copy), X [..., C, V]. A
    non-finite X_j reaches rows i >= j only."""
    if torch.is_grad_enabled() and (A.requires_grad or X.requires_grad):
        return _CausalMM.apply(A, X, strict, zeros_above)
    return _tril_product(A, X, strict, zeros_above)


class _CausalScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, K, strict):
        mask = causal_mask(Q.shape[-2], strict, Q.device)
        ctx.strict = strict
        ctx.save_for_backward(Q, K)
        return torch.matmul(Q, K.transpose(-1, -2)).masked_fill_(~mask, 0)   # in place: the product is ours

    @staticmethod
    def backward(ctx, dS):
        Q, K = ctx.saved_tensors
        dS = dS.masked_fill(~causal_mask(Q.shape[-2], ctx.strict, Q.device), 0)
        dQ = causal_mm(dS, K, ctx.strict, zeros_above=True) if ctx.needs_input_grad[0] else None
        dK = torch.matmul(dS.transpose(-1, -2), Q) if ctx.needs_input_grad[1] else None
        return dQ, dK, None


def causal_scores(Q: torch.Tensor, K: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """S_ij = q_i · k_j for j <= i (j < i when strict), exact zeros elsewhere; Q, K [..., C, K]."""
    return _CausalScores.apply(Q, K, strict)


class _DecayPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, strict):
        C = g.shape[-2]
        mask = causal_mask(C, strict, g.device)[..., None]
        b = g.cumsum(-2)
        bq = torch.nn.functional.pad(b[..., :-1, :], (0, 0, 1, 0)) if strict else b
        E = (bq[..., :, None, :] - b[..., None, :, :]).masked_fill_(~mask, float("-inf")).exp_()   # one [.., C, C, F] buffer
        ctx.strict = strict
        ctx.save_for_backward(E)
        return E

    @staticmethod
    def backward(ctx, dE):
        (E,) = ctx.saved_tensors
        dL = (dE * E).masked_fill(~causal_mask(E.shape[-2], ctx.strict, E.device)[..., None], 0)   # [..., i, j, F]
        return pair_grads_to_steps(dL, ctx.strict), None


def pair_grads_to_steps(dL: torch.Tensor, strict: bool) -> torch.Tensor:
    """The gradient of the log decays from the gradients of the pair exponents: pair (i, j)
    spans the steps (j, i - s], so dg_t = Σ_{i >= t + s} Σ_{j < t} dL_ij (s = 1 when strict).
    dL [..., C, C, F], exactly zero outside the pairs -> [..., C, F]. A prefix over j
    (R_ij = Σ_{j' <= j} dL_ij', which for j < t reads the pairs that contain step t only),
    summed over the rows i >= j + 1 + s: never a difference of two cumulative sums, which
    would carry a later row's NaN into every earlier step as NaN - NaN."""
    C = dL.shape[-2]
    idx = torch.arange(C, device=dL.device)
    below = (idx[:, None] >= idx[None, :] + 1 + int(strict))[..., None]
    dg = dL.cumsum(-2).masked_fill_(~below, 0).sum(-3)                                  # [..., j, F]: dg_{j+1}
    return torch.nn.functional.pad(dg[..., :C - 1, :], (0, 0, 1, 0))


def decay_pairs(g: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """E_ij = exp(Σ_{j < t <= i - strict} g_t) for j <= i - strict, exact zeros elsewhere.
    g [..., C, F] (log decays, F = 1 for a scalar decay) -> [..., C, C, F]. Every exponent
    is <= 0 for non-positive g."""
    return _DecayPairs.apply(g, strict)


def prefix_sum(g: torch.Tensor, dim: int, inclusive: bool = True) -> torch.Tensor:
    """Σ_{t <= i} g_t (t < i when not inclusive) along dim."""
    b = g.cumsum(dim)
    if inclusive:
        return b
    return torch.cat([torch.zeros_like(b.narrow(dim, 0, 1)), b.narrow(dim, 0, b.shape[dim] - 1)], dim)


def suffix_sum(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_{t > j} g_t along dim (a reverse cumulative sum, not a difference of two cumulative
    sums: its gradient reaches the steps after j only, and it keeps full precision)."""
    r = g.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([r.narrow(dim, 1, r.shape[dim] - 1), torch.zeros_like(r.narrow(dim, 0, 1))], dim)


class _PerChunk:
    """A [B, N, ...] tensor's chunks, unbound once: x[:, n] is chunk n. (Indexing the tensor
    itself per chunk would cost, in the backward, a zero-filled gradient of the whole tensor
    for every chunk: O(N^2) work for a loop over N chunks.)"""

    def __init__(self, x: torch.Tensor):
        self.parts = x.unbind(1)

    def __getitem__(self, key):
        _, n = key
        return self.parts[n]


def _rev_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_{t >= j} x_t along dim (the adjoint of an inclusive prefix sum)."""
    return x.flip(dim).cumsum(dim).flip(dim)


# ---------------------------------------------------------------------------------------------
# The chunkwise forms with a derived backward.
#
# With gradients, chunk_diag and chunk_delta run as autograd Functions: the forward keeps
# its inputs and the state before every chunk (nothing of the chunks' insides), and the
# backward recomputes the intra-chunk values and runs the adjoint of the chunk form (MATH.md
# §3-4) in a few large batched ops over all chunks at once plus one reverse pass over the
# chunk states -- instead of autograd through dozens of small ops, each keeping its inputs.
# The adjoint keeps the forward's causality: every product with a triangular matrix that
# must not see later rows is causal_mm (or the C kernel, which reads the pairs j <= i only),
# and a decay's gradient reaches the steps its exponent spans, through prefix / suffix sums.
# Under create_graph=True the backward instead differentiates the same chunk form written
# in differentiable ops (the "twin"), so second derivatives are autograd's.
# ---------------------------------------------------------------------------------------------

def chunk_diag(readouts: list[tuple[torch.Tensor, bool]], k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               S0: torch.Tensor, chunk: int | None = None):
    """Matrix state with diagonal decay, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, read out
    as q_t^T S_t (inclusive) or q_t^T S_{t-1} (exclusive), without materialising S_t.

    readouts: [(q [B, T, K], inclusive)]; k [B, T, K]; v [B, T, V]; g [B, T] (scalar decay)
    or [B, T, K] (vector decay over keys), log space, <= 0 in practice; S0 [B, K, V].
    Returns ([o [B, T, V] per readout], S_T). Inside a chunk every exponent is <= 0 for
    non-positive g (MATH.md §3): scalar decay uses two matmuls per chunk, vector decay the
    exact C x C x K contraction (on CPU a C kernel; in torch on diagonal sub-blocks, with
    factored matmuls below them). Causal inside a chunk, forward and backward (a non-finite
    input at step p leaves the outputs before p, and the gradients that do not pass through
    step p, untouched)."""
    B, T, K = k.shape
    V = v.shape[-1]
    if T == 0:
        return [v.new_zeros(B, 0, V) for _ in readouts], S0
    C = chunk or DIAG_CHUNK
    N = (T + C - 1) // C
    Tp = N * C

    def chunks(x):                                        # [B, T, F] -> [B, N, C, F], inert padding
        return _pad_t(x, Tp).reshape(B, N, C, -1)
    kc, vc, gc = chunks(k), chunks(v), chunks(g)       # gc [B, N, C, 1 or K], clamped inside
    qcs = [chunks(q) for q, _ in readouts]
    strict = tuple(not inclusive for _, inclusive in readouts)   # the query sees S_t, or S_{t-1}

    def carry(decay_c, U, S):
        """The state before every chunk [B, N, K, V], and after the last."""
        decay_c, U = _PerChunk(decay_c), _PerChunk(U)
        states = []
        for n in range(N):
            states.append(S)
            S = decay_c[:, n] * S + U[:, n]
        return torch.stack(states, 1), S

    if _needs_grad(kc, vc, gc, S0, *qcs):
        *outs, S = _ChunkDiag.apply(carry, strict, kc, vc, gc, S0, *qcs)
    else:
        outs, S, _ = _diag_forward(carry, strict, kc, vc, _floor(gc), S0, qcs, kernel=True)
    return [o.reshape(B, Tp, V)[:, :T] for o in outs], S


def _floor(g):
    """The log decays clamped at LOG_DECAY_FLOOR (inside the Functions: a clamp outside them
    would keep a copy of g for its own backward)."""
    return g.clamp(min=LOG_DECAY_FLOOR)


def _floor_vjp(g, dg):
    """The gradient through _floor: none below the floor (nor for NaN), as torch.clamp's."""
    return torch.where(g >= LOG_DECAY_FLOOR, dg, 0)


def _diag_forward(carry, strict, kc, vc, gc, S0, qcs, kernel: bool):
    """chunk_diag on chunks ([B, N, C, .]): (outputs, S_T, the state before every chunk).
    Differentiable by autograd when kernel is False (the C kernel carries no graph)."""
    wk = kc * torch.exp(suffix_sum(gc, 2))               # k_j exp(b_C - b_j), exponent <= 0
    decay_c = torch.exp(gc.sum(2))[..., None]            # [B, N, F, 1]
    U = wk.transpose(-1, -2) @ vc                        # each chunk's own contribution [B, N, K, V]
    S_prev, S = carry(decay_c, U, S0)
    outs = [_diag_intra(qc, kc, vc, gc, s, kernel) + (qc * torch.exp(prefix_sum(gc, 2, not s))) @ S_prev
            for qc, s in zip(qcs, strict)]
    return outs, S, S_prev


def _diag_intra(qc, kc, vc, gc, strict: bool, kernel: bool) -> torch.Tensor:
    """Σ_{j <= i - s} A_ij v_j inside each chunk, A the decayed scores."""
    if gc.shape[-1] == 1:                                # scalar decay: (Q Kᵀ) ⊙ D, two matmuls
        A = causal_scores(qc, kc, strict) * decay_pairs(gc, strict)[..., 0]
    elif kernel and use_c(qc, kc, vc, gc):
        return cpu_kernels.vdecay_intra(*(_by_chunk(x) for x in (qc, kc, vc, gc)), strict).view(vc.shape)
    else:
        A = _vector_decay_scores(qc, kc, gc, strict)
    return causal_mm(A, vc, strict, zeros_above=True)


def _by_chunk(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C, F] -> [B * N, C, F] (the 3-d batches of bmm and the C kernels)."""
    return x.reshape((-1,) + tuple(x.shape[-2:]))


def _diag_intra_vjp(qc, kc, vc, gc, strict: bool, do):
    """(dq, dk, dv, dg) of _diag_intra for the cotangent do."""
    if gc.shape[-1] == 1:                                # (in place where a buffer is ours: fresh big temporaries cost)
        mask = causal_mask(qc.shape[-2], strict, qc.device)
        E = decay_pairs(gc, strict)[..., 0]
        A = causal_scores(qc, kc, strict).mul_(E)
        dA = (do @ vc.transpose(-1, -2)).masked_fill_(~mask, 0)
        dv = A.transpose(-1, -2) @ do                    # A is exactly zero above the pairs
        dg = pair_grads_to_steps(A.mul_(dA)[..., None], strict)    # the pairs' exponents: dA ⊙ A
        dQK = dA.mul_(E)                                 # the cotangent of the raw scores q_i · k_j
        dq = causal_mm(dQK, kc, strict, zeros_above=True)
        dk = dQK.transpose(-1, -2) @ qc
        return dq, dk, dv, dg
    if use_c(qc, kc, vc, gc, do):
        grads = cpu_kernels.vdecay_intra_bwd(*(_by_chunk(x) for x in (qc, kc, vc, gc, do)), strict)
        return tuple(d.view(x.shape) for d, x in zip(grads, (qc, kc, vc, gc)))
    with torch.enable_grad():                            # no C library: autograd through the exact contraction
        xs = [x.detach().requires_grad_() for x in (qc, kc, vc, gc)]
        o = causal_mm(_vector_decay_scores(xs[0], xs[1], xs[3], strict), xs[2], strict, zeros_above=True)
        return torch.autograd.grad(o, xs, do)


class _ChunkDiag(torch.autograd.Function):
    """chunk_diag with gradients (see the section comment above). Saves the inputs and the
    state before every chunk."""

    @staticmethod
    def forward(ctx, carry, strict, kc, vc, gc, S0, *qcs):
        outs, S, S_prev = _diag_forward(carry, strict, kc, vc, _floor(gc), S0, qcs, kernel=True)
        ctx.set_materialize_grads(False)                 # an unread output's gradient stays None
        ctx.carry, ctx.strict = carry, strict
        ctx.save_for_backward(kc, vc, gc, S0, S_prev, *qcs)
        return (*outs, S)

    @staticmethod
    def backward(ctx, *grads):
        kc, vc, gc, S0, S_prev, *qcs = ctx.saved_tensors
        inputs, needs = (kc, vc, gc, S0, *qcs), ctx.needs_input_grad[2:]
        if wants_graph(inputs, grads):
            def twin(kc, vc, gc, S0, *qcs):
                outs, S, _ = _diag_forward(ctx.carry, ctx.strict, kc, vc, _floor(gc), S0, qcs, kernel=False)
                return (*outs, S)
            return (None, None) + tuple(recompute_vjp(twin, inputs, needs, grads))
        dk, dv, dg, dS0, *dqs = _diag_backward(ctx.strict, kc, vc, _floor(gc), S0, S_prev, qcs, grads[:-1], grads[-1])
        got = (dk, dv, _floor_vjp(gc, dg), dS0, *dqs)
        return (None, None) + tuple(d if need else None for d, need in zip(got, needs))


def _diag_backward(strict, kc, vc, gc, S0, S_prev, qcs, dos, dS_T):
    """The adjoint of _diag_forward: (dk, dv, dg, dS0, *dq). With Λ_n the gradient of the
    state after chunk n and b the cumulative log decay inside a chunk (MATH.md §3):
        Λ_{n-1} = e^{b_C} ⊙ Λ_n + Σ_i (q_i ⊙ e^{b_i}) do_iᵀ     (one reverse pass)
        dv += (k ⊙ e^{b_C - b}) Λ_n,   d(k ⊙ e^{b_C - b}) = v Λ_nᵀ,   d e^{b_C} = Σ_V Λ_n ⊙ S_{n-1}
    plus the intra-chunk terms; a log decay's gradient is the sum over the exponents that
    contain it: suffix sums for the readouts' e^{b_i}, prefix sums for the keys' e^{b_C - b_j}."""
    e_sfx = torch.exp(suffix_sum(gc, 2))
    wk = kc * e_sfx
    decay_c = torch.exp(gc.sum(2))                       # [B, N, F]
    X = dk = dv = dg = None                              # X: what each chunk's readouts send to the state before it
    dqs = []
    for qc, s, do in zip(qcs, strict, dos):
        if do is None:                                   # an unread output: its query gets no gradient
            dqs.append(None)
            continue
        eP = torch.exp(prefix_sum(gc, 2, not s))         # e^{b_i}, or e^{b_{i-1}} for an exclusive readout
        Qd = qc * eP
        dQd = do @ S_prev.transpose(-1, -2)
        X = _accumulate(X, Qd.transpose(-1, -2) @ do)
        dq, dk_, dv_, dg_ = _diag_intra_vjp(qc, kc, vc, gc, s, do)
        dqs.append(dq.addcmul_(dQd, eP))
        dk, dv = _accumulate(dk, dk_), _accumulate(dv, dv_)
        dP = _sum_to(dQd.mul_(Qd), gc.shape)             # d(b_i) (or d(b_{i-1})) of the readout
        dg = _accumulate(dg, dg_.add_(suffix_sum(dP, 2) if s else _rev_cumsum(dP, 2)))
    if X is None:                                        # only the final state is read
        X, dk, dv, dg = torch.zeros_like(S_prev), torch.zeros_like(kc), torch.zeros_like(vc), torch.zeros_like(gc)
    Lam, dS0 = _carry_adjoint(decay_c[..., None], X, dS_T)
    dwk = vc @ Lam.transpose(-1, -2)
    dv = dv.contiguous()                                 # (a view of itself: the in-place product lands in dv)
    _by_chunk(dv).baddbmm_(_by_chunk(wk), _by_chunk(Lam))
    dk.addcmul_(dwk, e_sfx)
    dg += prefix_sum(_sum_to(dwk.mul_(wk), gc.shape), 2, inclusive=False)       # e^{b_C - b_j}: the steps after j
    dg += _sum_to(Lam.mul_(S_prev).sum(-1) * decay_c, gc.shape[:2] + gc.shape[3:])[:, :, None]   # e^{b_C}: all
    return (dk, dv, dg, dS0, *dqs)


def _accumulate(total, x):
    return x if total is None else total.add_(x)


def _carry_adjoint(decay_c, X, dS_T):
    """The reverse pass over chunk states S_n = decay_n ⊙ S_{n-1} + U_n (decay_c [B, N, F, 1]),
    with X_n the gradient reaching S_{n-1} from outside the recurrence (chunk n's readouts)
    and dS_T that of the last state: returns (Λ [B, N, K, V] the gradient of each chunk's
    state after it, = dU; dS0)."""
    lam = torch.zeros_like(X[:, 0]) if dS_T is None else dS_T
    dn, Xn = decay_c.unbind(1), X.unbind(1)
    out = [None] * len(Xn)
    for n in range(len(Xn) - 1, -1, -1):
        out[n] = lam
        lam = torch.addcmul(Xn[n], dn[n], lam)
    return torch.stack(out, 1), lam


def chunk_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                S0: torch.Tensor, chunk: int | None = None):
    """Gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with
    readout o_t = q_t^T S_t, in the WY/UT chunkwise form of MATH.md §4.
    q, k [B, T, K]; v [B, T, V]; beta, g [B, T] (g None: ungated); S0 [B, K, V].
    Û = (I + A)^{-1} diag(β) V and Ŵ by triangular solves (forward substitution: row i reads
    rows < i only); the intra-chunk products are causal (see causal_mm). Per chunk the loop
    runs the state recurrence and the new values it writes; the readouts of all chunks are
    two batched products:
        Vn = Û - Ŵ S_prev,   S_C = e^{b_C} S_prev + (K ⊙ e^{b_C - b})ᵀ Vn,   O = (Q ⊙ e^b) S_prev + QK⋆ Vn."""
    B, T, K = k.shape
    V = v.shape[-1]
    if T == 0:
        return v.new_zeros(B, 0, V), S0
    C = min(chunk or DELTA_CHUNK, T)
    N = (T + C - 1) // C
    Tp = N * C

    def chunks(x):
        return _pad_t(x, Tp).reshape(B, N, C, -1)
    qc, kc, vc, bc = (chunks(x) for x in (q, k, v, beta))
    gc = None if g is None else chunks(g)                 # clamped inside
    if _needs_grad(qc, kc, vc, bc, S0, *([] if gc is None else [gc])):
        o, S = _ChunkDelta.apply(qc, kc, vc, bc, gc, S0)
    else:
        o, S, _ = _delta_forward(qc, kc, vc, bc, None if gc is None else _floor(gc), S0)
    return o.reshape(B, Tp, V)[:, :T], S


class _DeltaChunks(NamedTuple):
    """The chunk-local quantities of the WY/UT form, batched over chunks [B, N, ...]; the
    decay terms are None for the ungated rule."""
    QK: torch.Tensor                # lower_incl(Q Kᵀ) ⊙ D               [B, N, C, C]
    KK: torch.Tensor                # strict_lower(K Kᵀ) ⊙ D
    D: torch.Tensor | None          # exp(b_i - b_j), j <= i, zeros above
    L: torch.Tensor                 # I + diag(β) KK, unit lower triangular
    R: torch.Tensor                 # [V | K ⊙ e^b], the solve's right-hand side before diag(β)
    X: torch.Tensor                 # [Û | Ŵ] = L⁻¹ diag(β) R            [B, N, C, V + K]
    V: int
    eb: torch.Tensor | None         # e^{b_i}                             [B, N, C, 1]
    e_sfx: torch.Tensor | None      # e^{b_C - b_j}                       [B, N, C, 1]
    decay: torch.Tensor | None      # e^{b_C}                             [B, N, 1, 1]

    @property
    def U(self):
        return self.X[..., :self.V]

    @property
    def W(self):
        return self.X[..., self.V:]

    def rows(self, x, e):           # x scaled row by row by e (nothing when ungated)
        return x if e is None else x * e


def _delta_chunks(qc, kc, vc, bc, gc) -> _DeltaChunks:
    C = kc.shape[-2]
    D = eb = e_sfx = decay = None
    KK, QK = causal_scores(kc, kc, strict=True), causal_scores(qc, kc)
    if gc is not None:
        D = decay_pairs(gc)[..., 0]
        eb, e_sfx = torch.exp(prefix_sum(gc, 2)), torch.exp(suffix_sum(gc, 2))
        decay = torch.exp(gc.sum(2, keepdim=True))
        KK, QK = KK * D, QK * D
    L = torch.addcmul(torch.eye(C, dtype=kc.dtype, device=kc.device), bc, KK)
    R = torch.cat([vc, kc if eb is None else kc * eb], -1)
    X = _solve_unit_lower(L, R, bc)
    return _DeltaChunks(QK, KK, D, L, R, X, vc.shape[-1], eb, e_sfx, decay)


def _solve_unit_lower(L, R, scale=None, transposed: bool = False):
    """L⁻¹ diag(scale) R by forward substitution (row i reads rows < i only), or L⁻ᵀ R by back
    substitution, for unit lower-triangular L; scale [..., C, 1] or None; no autograd. On CPU
    the C library's solve (torch's batched solve costs several matmuls' time per small
    system, and more when transposed)."""
    if use_c(L, R):
        return cpu_kernels.trisolve(L, R, None if scale is None else scale[..., 0], transposed)
    R = R if scale is None else scale * R
    if transposed:
        return torch.linalg.solve_triangular(L.transpose(-1, -2), R, upper=True, unitriangular=True)
    return torch.linalg.solve_triangular(L, R, upper=False, unitriangular=True)


def _delta_forward(qc, kc, vc, bc, gc, S0):
    """chunk_delta on chunks, without autograd: (o [B, N, C, V], S_T, the state before every chunk)."""
    ch = _delta_chunks(qc, kc, vc, bc, gc)
    S_prev, Vn, o, S = _delta_carry(ch, ch.rows(kc, ch.e_sfx), S0, ch.rows(qc, ch.eb))
    o += causal_mm(ch.QK, Vn, zeros_above=True)
    return o, S, S_prev


def _delta_carry(ch: _DeltaChunks, wk, S0, Qe):
    """Chunk by chunk: Vn = Û - Ŵ S, then S <- e^{b_C} S + wkᵀ Vn (wk = K ⊙ e^{b_C - b}).
    Returns (the state before every chunk S_prev [B, N, K, V], Vn [B, N, C, V], the readout's
    inter-chunk term Qe S_prev [B, N, C, V], S_T). On CPU one C call that also reads the
    states out while they are in cache (a torch loop pays two small matmuls' dispatch per
    chunk)."""
    if use_c(ch.X, wk, S0, Qe):
        return cpu_kernels.delta_carry(ch.X, ch.V, wk, _chunk_decays(ch), S0, Qe)
    Un, Wn, wkT = ch.U.unbind(1), ch.W.unbind(1), wk.transpose(-1, -2).unbind(1)
    dn = [None] * len(Un) if ch.decay is None else ch.decay.unbind(1)
    S, prev, new = S0, [], []
    for n in range(len(Un)):
        prev.append(S)
        new.append(torch.baddbmm(Un[n], Wn[n], S, alpha=-1))
        S = torch.baddbmm(S if dn[n] is None else dn[n] * S, wkT[n], new[-1])
    S_prev = torch.stack(prev, 1)
    return S_prev, torch.stack(new, 1), Qe @ S_prev, S


def _chunk_decays(ch: _DeltaChunks):
    return None if ch.decay is None else ch.decay.reshape(ch.decay.shape[:2])


class _ChunkDelta(torch.autograd.Function):
    """chunk_delta with gradients (see the section comment above chunk_diag). Saves the
    inputs and the state before every chunk."""

    @staticmethod
    def forward(ctx, qc, kc, vc, bc, gc, S0):
        o, S, S_prev = _delta_forward(qc, kc, vc, bc, None if gc is None else _floor(gc), S0)
        ctx.set_materialize_grads(False)                 # an unread output's gradient stays None
        ctx.save_for_backward(qc, kc, vc, bc, gc, S0, S_prev)
        return o, S

    @staticmethod
    def backward(ctx, do, dS_T):
        qc, kc, vc, bc, gc, S0, S_prev = ctx.saved_tensors
        inputs = (qc, kc, vc, bc, gc, S0)
        if wants_graph(inputs, (do, dS_T)):
            return tuple(recompute_vjp(_delta_twin, inputs, ctx.needs_input_grad, (do, dS_T)))
        gl = None if gc is None else _floor(gc)
        dq, dk, dv, dbeta, dg, dS0 = _delta_backward(qc, kc, vc, bc, gl, S0, S_prev, do, dS_T)
        got = (dq, dk, dv, dbeta, None if gc is None else _floor_vjp(gc, dg), dS0)
        return tuple(d if need else None for d, need in zip(got, ctx.needs_input_grad))


def _delta_backward(qc, kc, vc, bc, gc, S0, S_prev, do, dS_T):
    """The adjoint of _delta_forward: (dq, dk, dv, dβ, dg, dS0). Per chunk, with Λ_n the
    gradient of the state after it and P = QK⋆ᵀ dO (what the new values get from the readouts):
        dVn = P + wk Λ_n,   Λ_{n-1} = e^{b_C} Λ_n + (Q ⊙ e^b)ᵀ dO - Ŵᵀ dVn      (one reverse pass)
        dÛ = dVn,   dŴ = -dVn S_prevᵀ,   dQK⋆ = lower(dO Vnᵀ),   dwk = Vn Λ_nᵀ
    then back through the solve and the scores (_delta_solve_vjp, _delta_scores_vjp)."""
    ch = _delta_chunks(qc, kc, vc, bc, gc)
    unread = do is None                            # only the final state is read: q gets no gradient
    do = torch.zeros_like(vc) if unread else do
    wk, Qe = ch.rows(kc, ch.e_sfx), ch.rows(qc, ch.eb)
    dX = torch.empty_like(ch.X)                                                 # [dÛ | dŴ] = [dVn | -dVn S_prevᵀ]
    dVn = dX[..., :ch.V]
    Lam, Vn, dS0 = _delta_carry_adjoint(ch, wk, S_prev, ch.QK.transpose(-1, -2) @ do, Qe.transpose(-1, -2) @ do,
                                        dS_T, dVn)
    torch.neg(dVn @ S_prev.transpose(-1, -2), out=dX[..., ch.V:])
    dQe = do @ S_prev.transpose(-1, -2)
    dQK = (do @ Vn.transpose(-1, -2)).masked_fill_(~causal_mask(kc.shape[-2], False, kc.device), 0)
    dwk = Vn @ Lam.transpose(-1, -2)
    dR, dKK = _delta_solve_vjp(ch, bc, dX)
    dq, dk = _delta_scores_vjp(ch, qc, kc, dQK, bc * dKK)
    dq += ch.rows(dQe, ch.eb)
    dk += ch.rows(dwk, ch.e_sfx)
    dRk = dR[..., ch.V:]                           # β dR is the cotangent of R = [V | K ⊙ e^b]
    dv = dR[..., :ch.V] * bc
    dk.addcmul_(dRk, ch.rows(bc, ch.eb))
    dbeta = (dR * ch.R).sum(-1, keepdim=True) + (dKK * ch.KK).sum(-1)[..., None]
    dg = None
    if gc is not None:
        de_b = (dQe * qc).sum(-1, keepdim=True) + bc * (dRk * kc).sum(-1, keepdim=True)     # d e^{b_i}
        dg = _delta_decay_vjp(dKK * bc * ch.KK + dQK * ch.QK, de_b * ch.eb, (dwk * wk).sum(-1, keepdim=True),
                              (Lam * S_prev).sum((-1, -2), keepdim=True) * ch.decay)
    return None if unread else dq, dk, dv, dbeta, dg, dS0


def _delta_decay_vjp(d_pairs, d_b, d_sfx, d_total):
    """The log decays' gradient from the cotangents of the exponents (each exp's cotangent
    times the exp): every exponent reaches the steps it sums -- a pair's b_i - b_j (d_pairs
    [.., C, C]) the steps (j, i], b_i the steps up to i (a suffix sum), b_C - b_j those after
    j (a prefix sum), b_C the whole chunk."""
    return pair_grads_to_steps(d_pairs[..., None], False) + _rev_cumsum(d_b, 2) \
        + prefix_sum(d_sfx, 2, inclusive=False) + d_total


def _bmm_sub(A, B, C):
    """A - B @ C for [B, N, x, y] batches, in one baddbmm."""
    out = torch.baddbmm(_by_chunk(A), _by_chunk(B), _by_chunk(C), alpha=-1)
    return out.view(B.shape[:-1] + C.shape[-1:])


def _delta_carry_adjoint(ch: _DeltaChunks, wk, S_prev, P, Y, dS_T, dVn):
    """The reverse pass of _delta_carry: Λ_n (the gradient of the state after chunk n) and
    dVn = P + wk Λ_n, from P = QK⋆ᵀ dO and Y = (Q ⊙ e^b)ᵀ dO; dVn [B, N, C, V] is written into
    the given view. Returns (Λ [B, N, K, V], the new values Vn = Û - Ŵ S_prev recomputed, dS0)."""
    if use_c(ch.X, wk, S_prev, P, Y):
        return cpu_kernels.delta_carry_adjoint(ch.X, ch.V, wk, _chunk_decays(ch), S_prev, P, Y, dS_T, dVn)
    lam = torch.zeros_like(Y[:, 0]) if dS_T is None else dS_T
    Pn, Yn, wkn, WnT = P.unbind(1), Y.unbind(1), wk.unbind(1), ch.W.transpose(-1, -2).unbind(1)
    dn = [None] * len(Pn) if ch.decay is None else ch.decay.unbind(1)
    lams, dnew = [None] * len(Pn), dVn.unbind(1)
    for n in range(len(Pn) - 1, -1, -1):
        lams[n] = lam
        dnew[n].copy_(torch.baddbmm(Pn[n], wkn[n], lam))
        lam = torch.baddbmm(Yn[n] + (lam if dn[n] is None else dn[n] * lam), WnT[n], dnew[n], alpha=-1)
    return torch.stack(lams, 1), _bmm_sub(ch.U, ch.W, S_prev), lam


def _delta_solve_vjp(ch: _DeltaChunks, bc, dX):
    """Through [Û | Ŵ] = L⁻¹ (β R), L = I + diag(β) KK: the cotangent of β R, dR = L⁻ᵀ dX (back
    substitution), and that of KK, dKK = -strict(dR Xᵀ) (its rows are scaled by β after)."""
    dR = _solve_unit_lower(ch.L, dX, transposed=True)
    dKK = (dR @ ch.X.transpose(-1, -2)).masked_fill_(~causal_mask(ch.L.shape[-1], True, dX.device), 0).neg_()
    return dR, dKK


def _delta_scores_vjp(ch: _DeltaChunks, qc, kc, dQK, dKK):
    """dq, dk through QK⋆ = lower_incl(Q Kᵀ) ⊙ D and KK = strict_lower(K Kᵀ) ⊙ D. A row's
    query reads earlier keys only (causal_mm); the keys' gradients read later rows like any
    transposed product (one dense matmul for both sides of K Kᵀ)."""
    dQKr, dKKr = (dQK, dKK) if ch.D is None else (dQK * ch.D, dKK * ch.D)   # cotangents of Q Kᵀ, K Kᵀ
    dq = causal_mm(dQKr, kc, zeros_above=True)
    dk = torch.baddbmm(_by_chunk(dQKr.transpose(-1, -2) @ qc), _by_chunk(dKKr + dKKr.transpose(-1, -2)), _by_chunk(kc))
    return dq, dk.view(kc.shape)


def _delta_twin(qc, kc, vc, bc, gc, S0):
    """chunk_delta's chunk form in differentiable ops (for create_graph=True): (o, S_T)."""
    C = kc.shape[-2]
    gc = torch.zeros_like(bc) if gc is None else _floor(gc)
    eb = torch.exp(prefix_sum(gc, 2))                     # exp(b_i) <= 1
    D = decay_pairs(gc)[..., 0]                           # exp(b_i - b_j), j <= i  [B, N, C, C]
    A = bc * causal_scores(kc, kc, strict=True) * D       # strict_lower(diag(β) (K Kᵀ ⊙ D))
    L = A + torch.eye(C, dtype=kc.dtype, device=kc.device)
    U = torch.linalg.solve_triangular(L, bc * vc, upper=False, unitriangular=True)        # Û [B, N, C, V]
    W = torch.linalg.solve_triangular(L, bc * kc * eb, upper=False, unitriangular=True)   # Ŵ [B, N, C, K]
    QK = causal_scores(qc, kc) * D                        # (Q Kᵀ) ⊙ D, lower incl.  [B, N, C, C]
    wk = kc * torch.exp(suffix_sum(gc, 2))                # K ⊙ exp(b_C - b)
    decay = torch.exp(gc.sum(2))[..., None]               # [B, N, 1, 1]
    Wn, Un, wkT, dn = (x.unbind(1) for x in (W, U, wk.transpose(-1, -2), decay))
    S, prev = S0, []
    for n in range(len(Wn)):
        prev.append(S)
        S = dn[n] * S + wkT[n] @ (Un[n] - Wn[n] @ S)
    S_prev = torch.stack(prev, 1)                         # [B, N, K, V]
    o = (qc * eb - causal_mm(QK, W, zeros_above=True)) @ S_prev + causal_mm(QK, U, zeros_above=True)
    return o, S


SUB = 16  # sub-block of the vector-decay score matrix in torch (the twin, and the stand-in without C)


def _vector_decay_scores(qc, kc, gc, strict: bool):
    """A_ij = Σ_k q_ik k_jk exp(Σ_{j < t <= i - strict} g_tk) for j <= i - strict, exact zeros
    elsewhere, every exponent <= 0 (MATH.md §3). Diagonal sub-blocks: the exact c x c x K
    contraction (decay_pairs). Rows of sub-block I against columns of an earlier one J: the
    decay splits into the suffix of J after j, the sub-blocks strictly between (decay_pairs
    over sub-block totals) and the prefix of I up to i (- strict), each <= 1, so the pair is
    one matmul; only the pairs J < I are formed, and every exponent's gradient reaches its
    own steps only."""
    B, N, C, K = qc.shape
    c = SUB if C % SUB == 0 and C > SUB else C
    M = C // c
    qs, ks, gs = qc.reshape(B, N, M, c, K), kc.reshape(B, N, M, c, K), gc.reshape(B, N, M, c, K)
    # diagonal sub-blocks: exact
    mask = causal_mask(c, strict, qc.device)
    KE = (ks[..., None, :, :] * decay_pairs(gs, strict)).masked_fill(~mask[..., None], 0)   # [B, N, M, c, c, K]
    diag = torch.einsum("bnmik,bnmijk->bnmij", qs, KE)                                      # [B, N, M, c, c]
    A = qc.new_zeros(B, N, M, M, c, c)
    ar = torch.arange(M, device=qc.device)
    A[:, :, ar, ar] = diag
    if M > 1:
        I, J = torch.tril_indices(M, M, -1, device=qc.device)                               # the pairs J < I
        between = decay_pairs(gs.sum(3), strict=True)[:, :, I, J]                            # [B, N, P, K]
        qr = qs[:, :, I] * torch.exp(prefix_sum(gs, 3, not strict))[:, :, I] * between[..., None, :]
        kr = (ks * torch.exp(suffix_sum(gs, 3)))[:, :, J]
        A[:, :, I, J] = qr @ kr.transpose(-1, -2)                                             # [B, N, P, c, c]
    return A.transpose(3, 4).reshape(B, N, C, C)


def diag_matrix_stage(reads, k, v, g, S0, first_input, ns: int):
    """A matrix-state stage with key-side decay, from the generated code's whole-sequence
    values (prefix [B, T] or [B, T, heads]): the inference kernel reads them in place; with
    gradients (or without the C library) the chunkwise form runs on [B*heads, T, ...]."""
    from . import seq_rt as rt
    heads = ns == 3
    tensors = [k, v, S0] + ([g] if g is not None else []) + [q for q, _ in reads]
    if not _needs_grad(*tensors) and use_c(*tensors):
        def bthf(x, rank):
            x = rt.full_seq(x, first_input, ns, rank)
            return x if heads else x.unsqueeze(2)
        kk, vv = bthf(k, 1), bthf(v, 1)
        gg = bthf(g, g.dim() - ns) if g is not None else torch.zeros((), dtype=k.dtype).expand(kk.shape[:3])
        S = S0 if heads else S0.unsqueeze(1)
        outs, ST = [], S
        for q, incl in reads:
            o, ST_ = cpu_kernels.matdiag(bthf(q, 1), incl, kk, vv, gg, S)
            outs.append(o if heads else o[:, :, 0])
            ST = ST_
        if not reads:
            _, ST = cpu_kernels.matdiag(kk, True, kk, vv, gg, S)
        return outs, (ST if heads else ST[:, 0])
    g_rank = None if g is None else g.dim() - ns
    gb = None if g is None else rt.to_bt(g, g_rank, first_input, ns)
    kb, vb = rt.to_bt(k, 1, first_input, ns), rt.to_bt(v, 1, first_input, ns)
    if gb is None:
        gb = torch.zeros(kb.shape[:2], dtype=kb.dtype, device=kb.device)
    qs = [(rt.to_bt(q, 1, first_input, ns), incl) for q, incl in reads]
    outs, ST = chunk_diag(qs, kb, vb, gb, rt.to_b(S0, ns - 1))
    return [rt.from_bt(o, first_input, ns) for o in outs], rt.from_b(ST, S0)


def signed_decay(reads, k, v, d, S0, first_input, ns: int):
    """S_t = diag(d_t) S_{t-1} + k_t v_t^T with d of unknown sign (a raw param, tanh(.)):
    with sigma_t the running product of sign(d) (per key), S~_t = diag(sigma_t) S_t obeys
    the same recurrence with |d| and keys sigma_t k_t, and q^T S_t = (sigma_t q)^T S~_t.
    So the log-space chunkwise form runs on log|d| (zeros clamped, as every log decay is),
    queries and keys times their running sign, and the final state gets sigma_T back."""
    from . import seq_rt as rt
    rank = d.dim() - ns if d.dim() > ns else 0          # 0: scalar decay, 1: per key
    full = rt.full_seq(d, first_input, ns, rank)
    sign = torch.where(full < 0, -1.0, 1.0).to(full.dtype)
    running = sign.cumprod(1)                           # sigma_t
    before = rt.shift(running, torch.ones_like(running[:, 0]))   # sigma_{t-1}, for reads of S_{t-1}
    log_abs = torch.log(full.abs()).clamp(min=LOG_DECAY_FLOOR)

    def signed(x, s):
        return x * (rt.lift(s, rank, 1) if rank == 0 else s)
    reads = [(signed(rt.full_seq(q, first_input, ns, 1), running if inc else before), inc) for q, inc in reads]
    keys = signed(rt.full_seq(k, first_input, ns, 1), running)
    outs, ST = diag_matrix_stage(reads, keys, v, log_abs, S0, first_input, ns)
    last = running[:, -1]
    return outs, ST * (last[..., None, None] if rank == 0 else last[..., None])


def delta_stage(q, k, v, beta, g, S0, first_input, ns: int, ran: list | None = None):
    """The (gated) delta-rule stage: inference kernel in place, or chunkwise with gradients.
    `ran` (here and in dplr_stage, delta_product_stage): the driver's record of what ran,
    which every form's stage function takes (codegen's form_stage); these leave it as is."""
    from . import seq_rt as rt
    heads = ns == 3
    tensors = [q, k, v, beta, S0] + ([g] if g is not None else [])
    if not _needs_grad(*tensors) and use_c(*tensors):
        def bthf(x, rank):
            x = rt.full_seq(x, first_input, ns, rank)
            return x if heads else x.unsqueeze(2)
        o, ST = cpu_kernels.delta(bthf(q, 1), bthf(k, 1), bthf(v, 1), bthf(beta, 0),
                                  None if g is None else bthf(g, 0), S0 if heads else S0.unsqueeze(1))
        return (o if heads else o[:, :, 0]), (ST if heads else ST[:, 0])

    def rows(x, rank):
        return rt.to_bt(x, rank, first_input, ns)
    o, ST = chunk_delta(rows(q, 1), rows(k, 1), rows(v, 1), rows(beta, 0), None if g is None else rows(g, 0),
                        rt.to_b(S0, ns - 1))
    return rt.from_bt(o, first_input, ns), rt.from_b(ST, S0)


def dplr_stage(q, k, v, a, b, g, S0, first_input, ns: int, ran: list | None = None):
    """Diagonal plus low rank (KDA, RWKV-7): S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,
    read out as q_t^T S_t, chunkwise (dplr.py) on [B*heads, T, ...]."""
    from . import seq_rt as rt
    from . import dplr
    from .dplr import chunk_dplr
    vecs = [rt.to_bt(x, 1, first_input, ns) for x in (q, k, a, b)]
    K = vecs[0].shape[-1]
    gb = rt.to_bt(g, g.dim() - ns, first_input, ns)
    gb = gb[..., None].expand(gb.shape[:2] + (K,)) if gb.dim() == 2 else gb   # a scalar decay: the same for every key
    o, ST = chunk_dplr(vecs[0], vecs[1], rt.to_bt(v, 1, first_input, ns), vecs[2], vecs[3], gb.contiguous(),
                       rt.to_b(S0, ns - 1), chunk=dplr.CHUNK)
    return rt.from_bt(o, first_input, ns), rt.from_b(ST, S0)


def delta_product_stage(q, ks: list, vs: list, betas: list, S0, first_input, ns: int, ran: list | None = None):
    """DeltaProduct: n delta-rule steps per token. The steps are interleaved into one
    sequence n times as long ([B, T, n, ...] -> [B, T * n, ...]); the delta rule runs over
    it and the readout of each token is the one after its last step (the triton backend's
    delta_kernels.delta_product_stage lays the steps out for its kernels itself)."""
    from . import seq_rt as rt
    n = len(ks)
    B, T = first_input.shape[:2]

    def interleave(xs, rank):
        full = torch.stack([rt.full_seq(x, first_input, ns, rank) for x in xs], 2)   # [B, T, n, (H), ...]
        return full.reshape((B, T * n) + tuple(full.shape[3:]))
    Xn = first_input[:, :1].expand((B, T * n) + tuple(first_input.shape[2:]))   # the longer sequence's shape (a view)
    qn = interleave([q] * n, 1)
    o, ST = delta_stage(qn, interleave(ks, 1), interleave(vs, 1), interleave(betas, 0), None, S0, Xn, ns)
    return o.reshape((B, T, n) + tuple(o.shape[2:]))[:, :, -1], ST
