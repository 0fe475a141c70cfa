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


def chunk_diag(readouts: list[tuple[torch.Tensor, bool]], k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               S0: torch.Tensor, chunk: int | None = None):
    """Matrix state with diagonal decay, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, read out
    as q_t^T S_t (inclusive) or q_t^T S_{t-1} (exclusive), without materialising S_t.

    readouts: [(q [B, T, K], inclusive)]; k [B, T, K]; v [B, T, V]; g [B, T] (scalar decay)
    or [B, T, K] (vector decay over keys), log space, <= 0 in practice; S0 [B, K, V].
    Returns ([o [B, T, V] per readout], S_T). Inside a chunk every exponent is <= 0 for
    non-positive g (MATH.md §3): scalar decay uses two matmuls per chunk, vector decay the
    exact C x C x K contraction with small chunks."""
    B, T, K = k.shape
    V = v.shape[-1]
    scalar = g.dim() == 2
    g = g.clamp(min=LOG_DECAY_FLOOR)
    C = chunk or 64
    N = (T + C - 1) // C
    Tp = N * C
    k, v, g = _pad_t(k, Tp), _pad_t(v, Tp), _pad_t(g, Tp)
    kc, vc = k.reshape(B, N, C, K), v.reshape(B, N, C, V)
    gc = g.reshape(B, N, C) if scalar else g.reshape(B, N, C, K)
    b = gc.cumsum(2)                                     # within-chunk cumulative log decay
    bC = b[:, :, -1]                                     # [B, N] or [B, N, K]
    # chunk-local state contributions and the decay across whole chunks
    if scalar:
        wk = kc * torch.exp(bC[..., None] - b)[..., None]    # exp(b_C - b_j) <= 1
        decay_c = torch.exp(bC)[..., None, None]             # [B, N, 1, 1]
    else:
        wk = kc * torch.exp(bC[:, :, None, :] - b)
        decay_c = torch.exp(bC)[..., None]                   # [B, N, K, 1]
    U = wk.transpose(-1, -2) @ vc                            # [B, N, K, V]
    states = []                                              # S before each chunk
    S = S0
    for n in range(N):
        states.append(S)
        S = decay_c[:, n] * S + U[:, n]
    S_prev = torch.stack(states, 1)                          # [B, N, K, V]
    idx = torch.arange(C, device=k.device)
    outs = []
    for q, inclusive in readouts:
        qc = _pad_t(q, Tp).reshape(B, N, C, K)
        bq = b if inclusive else b - gc                      # the query sees S_t or S_{t-1}
        mask = (idx[None, :] <= idx[:, None]) if inclusive else (idx[None, :] < idx[:, None])
        if scalar:
            expo = (bq[..., :, None] - b[..., None, :]).masked_fill(~mask, float("-inf"))
            A = (qc @ kc.transpose(-1, -2)) * torch.exp(expo)                          # [B, N, C, C]
            o = A @ vc + (qc * torch.exp(bq)[..., None]) @ S_prev
        else:
            A = _vector_decay_scores(qc, kc, bq, b, mask)
            o = A @ vc + (qc * torch.exp(bq)) @ S_prev
        outs.append(o.reshape(B, Tp, V)[:, :T])
    return outs, S


def chunk_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                S0: torch.Tensor, chunk: int = 64):
    """Gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with
    readout o_t = q_t^T S_t, in the WY/UT chunkwise form of MATH.md §4.
    q, k [B, T, K]; v [B, T, V]; beta, g [B, T] (g None: ungated); S0 [B, K, V]."""
    B, T, K = k.shape
    V = v.shape[-1]
    C = min(chunk, max(T, 1))
    N = (T + C - 1) // C
    Tp = N * C
    g = torch.zeros_like(beta) if g is None else g.clamp(min=LOG_DECAY_FLOOR)
    q, k, v, beta, g = (_pad_t(x, Tp) for x in (q, k, v, beta, g))
    qc, kc, vc = q.reshape(B, N, C, K), k.reshape(B, N, C, K), v.reshape(B, N, C, V)
    bc, b = beta.reshape(B, N, C), g.reshape(B, N, C).cumsum(2)
    idx = torch.arange(C, device=k.device)
    incl = idx[None, :] <= idx[:, None]
    D = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~incl, float("-inf")))  # [B, N, C, C]
    KK = kc @ kc.transpose(-1, -2)
    A = torch.tril(bc[..., :, None] * KK * D, diagonal=-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    Tm = torch.linalg.solve_triangular(eye + A, torch.diag_embed(bc), upper=False, unitriangular=True)
    U = Tm @ vc                                           # [B, N, C, V]
    W = Tm @ (kc * torch.exp(b)[..., None])               # [B, N, C, K]
    QK = (qc @ kc.transpose(-1, -2)) * D                  # [B, N, C, C]
    wk = kc * torch.exp(b[..., -1:] - b)[..., None]       # K ⊙ exp(b_C - b)
    qe = qc * torch.exp(b)[..., None]
    decay = torch.exp(b[..., -1])[..., None, None]        # [B, N, 1, 1]
    S, outs = S0, []
    for n in range(N):
        R = U[:, n] - W[:, n] @ S                         # Û - Ŵ S_0
        outs.append(qe[:, n] @ S + QK[:, n] @ R)
        S = decay[:, n] * S + wk[:, n].transpose(-1, -2) @ R
    o = torch.stack(outs, 1).reshape(B, Tp, V)[:, :T]
    return o, S


SUB = 16  # sub-block of the vector-decay score matrix


def _vector_decay_scores(qc, kc, bq, b, mask):
    """A_ij = sum_k q_ik k_jk exp(bq_ik - b_jk) for the allowed (i, j) of a chunk, with every
    exponent <= 0: sub-blocks below the diagonal factor through the key sub-block's last
    cumulative decay r (exp(bq_i - r) and exp(r - b_j) are both <= 1, so two matmuls);
    the diagonal sub-blocks use the exact C x C x K contraction (MATH.md §3)."""
    B, N, C, K = qc.shape
    c = SUB if C % SUB == 0 and C > SUB else C
    M = C // c
    qs, ks = qc.reshape(B, N, M, c, K), kc.reshape(B, N, M, c, K)
    bqs, bs = bq.reshape(B, N, M, c, K), b.reshape(B, N, M, c, K)
    # diagonal sub-blocks: exact
    expo = (bqs[..., :, None, :] - bs[..., None, :, :])
    sub_mask = mask[:c, :c]
    expo = expo.masked_fill(~sub_mask[..., None], float("-inf"))
    diag = torch.einsum("bnmik,bnmjk,bnmijk->bnmij", qs, ks, torch.exp(expo))       # [B, N, M, c, c]
    A = torch.zeros(B, N, M, c, M, c, dtype=qc.dtype, device=qc.device)
    idx = torch.arange(M, device=qc.device)
    A[:, :, idx, :, idx, :] = diag.permute(2, 0, 1, 3, 4)
    if M > 1:
        r = bs[..., -1, :]                                                           # [B, N, M, K]
        kr = ks * torch.exp(r[..., None, :] - bs)                                    # exp <= 1
        # query sub-block I against key sub-block J < I: exp(bq_I - r_J) <= 1
        lower = (idx[:, None] > idx[None, :])                                        # [M(I), M(J)]
        expo_q = bqs[:, :, :, None] - r[:, :, None, :, None, :]                      # [B, N, I, J, c, K]
        expo_q = expo_q.masked_fill(~lower[:, :, None, None], float("-inf"))
        qr = qs[:, :, :, None] * torch.exp(expo_q)
        off = torch.einsum("bnIJik,bnJjk->bnIiJj", qr, kr)
        A = A + off
    return A.reshape(B, N, C, C)



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
    from .dplr import chunk_dplr
    vecs = [rt.to_bt(x, 1, X0, ns) for x in (q, k, a, b)]
    K = vecs[0].shape[-1]
    gb = rt.to_bt(g, g.dim() - ns, X0, ns)
    gb = gb[..., None].expand(gb.shape[:2] + (K,)) if gb.dim() == 2 else gb   # a scalar decay: the same for every key
    o, ST = chunk_dplr(vecs[0], vecs[1], rt.to_bt(v, 1, X0, ns), vecs[2], vecs[3], gb.contiguous(),
                       rt.to_b(S0, ns - 1))
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
