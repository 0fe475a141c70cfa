"""Whole-sequence recurrences in torch: the kernels the `torch` backend's generated code
calls. Element scans go to the C library when it is available (cpu_kernels), else to
log-depth doubling scans in torch; matrix states with diagonal decay and the delta rule
use the chunkwise forms of MATH.md §3-4 (matmuls inside chunks, a short loop over chunks).

Layouts: sequences [B, T, *shape] (B may include heads), initial states [B, *shape]."""
from __future__ import annotations

import torch

from . import cpu_kernels


# A step's log decay below this wipes the state anyway (exp(-80) ~ 2e-35); clamping it keeps
# cumulative sums inside a chunk free of cancellation (a decay of -1e9 used as a reset would
# otherwise cost 1e9 * eps of absolute precision in every later exponent of the chunk).
LOG_DECAY_FLOOR = -80.0

# Chunk lengths of the chunkwise forms on the training path (module constants, read at every call:
# tests shorten them to cover several chunks and sub-blocks on short sequences).
DIAG_CHUNK = 64
DELTA_CHUNK = 64


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
        return torch.matmul(Q, K.transpose(-1, -2)).masked_fill(~mask, 0)

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
        E = torch.exp((bq[..., :, None, :] - b[..., None, :, :]).masked_fill(~mask, float("-inf")))
        ctx.strict = strict
        ctx.save_for_backward(E)
        return E

    @staticmethod
    def backward(ctx, dE):
        (E,) = ctx.saved_tensors
        s = int(ctx.strict)
        C = E.shape[-2]
        dL = (dE * E).masked_fill(~causal_mask(C, ctx.strict, E.device)[..., None], 0)     # [..., i, j, F]
        # dg_t = Σ_{i >= t + s} Σ_{j < t} dL_ij: a prefix over j (R_ij = Σ_{j' <= j} dL_ij', which
        # for j < t reads the pairs that contain step t only), summed over the rows i >= j + 1 + s
        idx = torch.arange(C, device=E.device)
        below = (idx[:, None] >= idx[None, :] + 1 + s)[..., None]
        dg = dL.cumsum(-2).masked_fill(~below, 0).sum(-3)                                   # [..., j, F]: dg_{j+1}
        return torch.nn.functional.pad(dg[..., :C - 1, :], (0, 0, 1, 0)), None


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


def chunk_diag(readouts: list[tuple[torch.Tensor, bool]], k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               S0: torch.Tensor, chunk: int | None = None):
    """Matrix state with diagonal decay, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, read out
    as q_t^T S_t (inclusive) or q_t^T S_{t-1} (exclusive), without materialising S_t.

    readouts: [(q [B, T, K], inclusive)]; k [B, T, K]; v [B, T, V]; g [B, T] (scalar decay)
    or [B, T, K] (vector decay over keys), log space, <= 0 in practice; S0 [B, K, V].
    Returns ([o [B, T, V] per readout], S_T). Inside a chunk every exponent is <= 0 for
    non-positive g (MATH.md §3): scalar decay uses two matmuls per chunk, vector decay the
    exact C x C x K contraction on diagonal sub-blocks and factored matmuls below them.
    Causal inside a chunk, forward and backward (a non-finite input at step p leaves the
    outputs before p, and the gradients that do not pass through step p, untouched)."""
    B, T, K = k.shape
    V = v.shape[-1]
    scalar = g.dim() == 2
    g = g.clamp(min=LOG_DECAY_FLOOR)
    C = chunk or DIAG_CHUNK
    N = (T + C - 1) // C
    Tp = N * C
    k, v, g = _pad_t(k, Tp), _pad_t(v, Tp), _pad_t(g, Tp)
    kc, vc = k.reshape(B, N, C, K), v.reshape(B, N, C, V)
    gc = g.reshape(B, N, C, 1 if scalar else K)          # log decays, F = 1 (scalar) or K
    # chunk-local state contributions and the decay across whole chunks
    wk = kc * torch.exp(suffix_sum(gc, 2))               # k_j exp(b_C - b_j), exponent <= 0
    decay_c = torch.exp(gc.sum(2))[..., None]            # [B, N, F, 1]
    U = wk.transpose(-1, -2) @ vc                        # [B, N, K, V]
    decay_c, U = _PerChunk(decay_c), _PerChunk(U)
    states = []                                          # S before each chunk
    S = S0
    for n in range(N):
        states.append(S)
        S = decay_c[:, n] * S + U[:, n]
    S_prev = torch.stack(states, 1)                      # [B, N, K, V]
    outs = []
    for q, inclusive in readouts:
        qc = _pad_t(q, Tp).reshape(B, N, C, K)
        strict = not inclusive                           # the query sees S_t, or S_{t-1}
        if scalar:
            A = causal_scores(qc, kc, strict) * decay_pairs(gc, strict)[..., 0]          # [B, N, C, C]
        else:
            A = _vector_decay_scores(qc, kc, gc, strict)
        o = causal_mm(A, vc, strict, zeros_above=True) + (qc * torch.exp(prefix_sum(gc, 2, inclusive))) @ S_prev
        outs.append(o.reshape(B, Tp, V)[:, :T])
    return outs, S


def chunk_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                S0: torch.Tensor, chunk: int | None = None):
    """Gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with
    readout o_t = q_t^T S_t, in the WY/UT chunkwise form of MATH.md §4.
    q, k [B, T, K]; v [B, T, V]; beta, g [B, T] (g None: ungated); S0 [B, K, V].
    Û = (I + A)^{-1} diag(β) V and Ŵ by triangular solves (forward substitution: row i reads
    rows < i only); the intra-chunk products are causal (see causal_mm). Per chunk only the
    state recurrence runs in the loop; the readouts of all chunks are two batched products:
        O = (Q ⊙ e^b - QK⋆Ŵ) S_prev + QK⋆Û,   S_C = e^{b_C} S_0 + (K ⊙ e^{b_C - b})ᵀ (Û - Ŵ S_0)."""
    B, T, K = k.shape
    V = v.shape[-1]
    C = min(chunk or DELTA_CHUNK, max(T, 1))
    N = (T + C - 1) // C
    Tp = N * C
    g = torch.zeros_like(beta) if g is None else g.clamp(min=LOG_DECAY_FLOOR)
    q, k, v, beta, g = (_pad_t(x, Tp) for x in (q, k, v, beta, g))
    qc, kc, vc = q.reshape(B, N, C, K), k.reshape(B, N, C, K), v.reshape(B, N, C, V)
    bc, gc = beta.reshape(B, N, C, 1), g.reshape(B, N, C, 1)
    eb = torch.exp(prefix_sum(gc, 2))                     # exp(b_i) <= 1
    D = decay_pairs(gc)[..., 0]                           # exp(b_i - b_j), j <= i  [B, N, C, C]
    A = bc * causal_scores(kc, kc, strict=True) * D       # strict_lower(diag(β) (K Kᵀ ⊙ D))
    L = A + torch.eye(C, dtype=k.dtype, device=k.device)
    U = torch.linalg.solve_triangular(L, bc * vc, upper=False, unitriangular=True)        # Û [B, N, C, V]
    W = torch.linalg.solve_triangular(L, bc * kc * eb, upper=False, unitriangular=True)   # Ŵ [B, N, C, K]
    QK = causal_scores(qc, kc) * D                        # (Q Kᵀ) ⊙ D, lower incl.  [B, N, C, C]
    wk = kc * torch.exp(suffix_sum(gc, 2))                # K ⊙ exp(b_C - b)
    decay = torch.exp(gc.sum(2))[..., None]               # [B, N, 1, 1]
    Wn, Un, wkT, dn = (x.unbind(1) for x in (W, U, wk.transpose(-1, -2), decay))
    S, prev = S0, []
    for n in range(N):
        prev.append(S)
        S = dn[n] * S + wkT[n] @ (Un[n] - Wn[n] @ S)
    S_prev = torch.stack(prev, 1)                         # [B, N, K, V]
    o = (qc * eb - causal_mm(QK, W, zeros_above=True)) @ S_prev + causal_mm(QK, U, zeros_above=True)
    return o.reshape(B, Tp, V)[:, :T], S


SUB = 16  # sub-block of the vector-decay score matrix


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


def diag_matrix_stage(reads, k, v, g, S0, X0, ns: int):
    """A matrix-state stage with key-side decay, from the generated code's whole-sequence
    values (prefix [B, T] or [B, T, heads]): the inference kernel reads them in place; with
    gradients (or without the C library) the chunkwise form runs on [B*heads, T, ...]."""
    from . import seq_rt as rt
    heads = ns == 3
    tensors = [k, v, S0] + ([g] if g is not None else []) + [q for q, _ in reads]
    if not _needs_grad(*tensors) and use_c(*tensors):
        def bthf(x, rank):
            x = rt.full_seq(x, X0, ns, rank)
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
    gb = None if g is None else rt.to_bt(g, g_rank, X0, ns)
    kb, vb = rt.to_bt(k, 1, X0, ns), rt.to_bt(v, 1, X0, ns)
    if gb is None:
        gb = torch.zeros(kb.shape[:2], dtype=kb.dtype, device=kb.device)
    outs, ST = chunk_diag([(rt.to_bt(q, 1, X0, ns), incl) for q, incl in reads], kb, vb, gb, rt.to_b(S0, ns - 1))
    return [rt.from_bt(o, X0, ns) for o in outs], rt.from_b(ST, S0)


def signed_decay(reads, k, v, d, S0, X0, ns: int):
    """S_t = diag(d_t) S_{t-1} + k_t v_t^T with d of unknown sign (a raw param, tanh(.)):
    with sigma_t the running product of sign(d) (per key), S~_t = diag(sigma_t) S_t obeys
    the same recurrence with |d| and keys sigma_t k_t, and q^T S_t = (sigma_t q)^T S~_t.
    So the log-space chunkwise form runs on log|d| (zeros clamped, as every log decay is),
    queries and keys times their running sign, and the final state gets sigma_T back."""
    from . import seq_rt as rt
    rank = d.dim() - ns if d.dim() > ns else 0          # 0: scalar decay, 1: per key
    full = rt.full_seq(d, X0, ns, rank)
    sign = torch.where(full < 0, -1.0, 1.0).to(full.dtype)
    running = sign.cumprod(1)                           # sigma_t
    before = rt.shift(running, torch.ones_like(running[:, 0]))   # sigma_{t-1}, for reads of S_{t-1}
    log_abs = torch.log(full.abs()).clamp(min=LOG_DECAY_FLOOR)

    def signed(x, s):
        return x * (rt.lift(s, rank, 1) if rank == 0 else s)
    reads = [(signed(rt.full_seq(q, X0, ns, 1), running if inc else before), inc) for q, inc in reads]
    outs, ST = diag_matrix_stage(reads, signed(rt.full_seq(k, X0, ns, 1), running), v, log_abs, S0, X0, ns)
    last = running[:, -1]
    return outs, ST * (last[..., None, None] if rank == 0 else last[..., None])


def delta_stage(q, k, v, beta, g, S0, X0, ns: int):
    """The (gated) delta-rule stage: inference kernel in place, or chunkwise with gradients."""
    from . import seq_rt as rt
    heads = ns == 3
    tensors = [q, k, v, beta, S0] + ([g] if g is not None else [])
    if not _needs_grad(*tensors) and use_c(*tensors):
        def bthf(x, rank):
            x = rt.full_seq(x, X0, ns, rank)
            return x if heads else x.unsqueeze(2)
        o, ST = cpu_kernels.delta(bthf(q, 1), bthf(k, 1), bthf(v, 1), bthf(beta, 0),
                                  None if g is None else bthf(g, 0), S0 if heads else S0.unsqueeze(1))
        return (o if heads else o[:, :, 0]), (ST if heads else ST[:, 0])
    o, ST = chunk_delta(rt.to_bt(q, 1, X0, ns), rt.to_bt(k, 1, X0, ns), rt.to_bt(v, 1, X0, ns),
                        rt.to_bt(beta, 0, X0, ns), None if g is None else rt.to_bt(g, 0, X0, ns),
                        rt.to_b(S0, ns - 1))
    return rt.from_bt(o, X0, ns), rt.from_b(ST, S0)


def dplr_stage(q, k, v, a, b, g, S0, X0, ns: int):
    """Diagonal plus low rank (KDA, RWKV-7): S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,
    read out as q_t^T S_t, chunkwise (dplr.py) on [B*heads, T, ...]."""
    from . import seq_rt as rt
    from . import dplr
    from .dplr import chunk_dplr
    vecs = [rt.to_bt(x, 1, X0, ns) for x in (q, k, a, b)]
    K = vecs[0].shape[-1]
    gb = rt.to_bt(g, g.dim() - ns, X0, ns)
    gb = gb[..., None].expand(gb.shape[:2] + (K,)) if gb.dim() == 2 else gb   # a scalar decay: the same for every key
    o, ST = chunk_dplr(vecs[0], vecs[1], rt.to_bt(v, 1, X0, ns), vecs[2], vecs[3], gb.contiguous(),
                       rt.to_b(S0, ns - 1), chunk=dplr.CHUNK)
    return rt.from_bt(o, X0, ns), rt.from_b(ST, S0)


def delta_product_stage(q, ks: list, vs: list, betas: list, S0, X0, ns: int):
    """DeltaProduct: n delta-rule steps per token. The steps are interleaved into one
    sequence n times as long ([B, T, n, ...] -> [B, T * n, ...]); the delta rule runs over
    it and the readout of each token is the one after its last step."""
    from . import seq_rt as rt
    n = len(ks)
    B, T = X0.shape[:2]

    def interleave(xs, rank):
        full = torch.stack([rt.full_seq(x, X0, ns, rank) for x in xs], 2)   # [B, T, n, (H), ...]
        return full.reshape((B, T * n) + tuple(full.shape[3:]))
    Xn = X0[:, :1].expand((B, T * n) + tuple(X0.shape[2:]))   # the longer sequence's shape (a view)
    qn = interleave([q] * n, 1)
    o, ST = delta_stage(qn, interleave(ks, 1), interleave(vs, 1), interleave(betas, 0), None, S0, Xn, ns)
    return o.reshape((B, T, n) + tuple(o.shape[2:]))[:, :, -1], ST
