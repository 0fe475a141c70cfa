"""Dense semiring recurrences for the `torch` backend: the kernel of DenseSemiringScan.

    h_t[i] = (+)_j (h_{t-1}[j] + A_t[j, i]) + b_t[i]        (+) = logsumexp (lse) or max (maxplus)

The HMM forward algorithm (log semiring) and Viterbi (tropical). The step is the semiring
matrix-vector product h_t = h_{t-1} (x) M_t with M_t = A_t + b_t[None, :]; products of the
M_t compose steps, and their product is associative (the analysis proves both with sympy).

Two ways to run it, chosen by the matcher from the state's size N (the form's `products`):

- products (small N): a log-depth (Hillis-Steele) scan of the [N, N] semiring matrix
  products, h_0 folded into the first matrix (every row of h_0 (x) M_1 is h_1), N^3 work a
  step; vectorised torch, no loop over T.
- sequential: the semiring matrix-vector loop in one C call (csrc/semiring.c, OpenMP over
  batch rows), N^2 a step; without a C compiler or off the CPU, a per-step torch loop
  (the runtime records `torch.loop` in layer.ran then).

Both have a derived backward (MATH.md §2 with a dense transition): the weights
W_t[j, i] = exp(h_{t-1}[j] + M_t[j, i] - h_t[i]) are the posteriors of the transition j -> i
(log semiring), or the indicator of the first argmax (max-plus: the subgradient through the
winning path); lambda_t = g_t + W_{t+1} lambda_{t+1} (a reverse (+, x) scan with those
weights: the block scan of scans.py for the products form, the C adjoint for the loop);
dM_t = W_t * lambda_t[None, :], dh_0 = W_1 lambda_1. Under create_graph=True the backward is
autograd's through the same computation in differentiable torch (double_backward.py).

Layouts here: rows r = batch x heads. M / A per step [R, T, N, N] or, for the loop, a
transition shared by every row of a head [H, N, N]; b [R, T, N]; h0 [R, N]; h [R, T, N]."""
from __future__ import annotations

import torch

from . import cpu_kernels
from .double_backward import recompute_vjp, wants_graph
from .seq_rt import lift

# Elements of one [.., N, N, N] temporary of a semiring matrix product (the products are
# computed in slices of the batch of matrices so that this bounds the memory).
PRODUCT_ELEMS = 1 << 22


# --------------------------------------------------------------------------- the stage

def dense_semiring_stage(kind: str, A: torch.Tensor, b: torch.Tensor | None, h0: torch.Tensor,
                         first_input: torch.Tensor, ns: int, products: bool, ran: list | None = None,
                         loop=None) -> torch.Tensor:
    """The state sequence [B, T, (H,) N] of a dense semiring stage. A: the transition's
    whole-sequence value (ns prefix axes, possibly of size 1; node axes [N, N] in (from, to)
    layout or broadcastable to it); b: [..., N] the same way, or None; h0 [B, (H,) N].
    `loop`: another backend's sequential loop, called as _Loop.apply (the triton backend's
    kernel), instead of the C loop."""
    B, T = first_input.shape[:2]
    H = first_input.shape[2] if ns == 3 else 1
    N = h0.shape[-1]
    A = _prefixed(A, ns, 2)
    shared = A.shape[0] == 1 and A.shape[1] == 1      # a param (per head at most): one matrix a head
    R = B * H
    h0r = h0.expand((B,) + ((H,) if ns == 3 else ()) + (N,)).reshape(R, N)
    bs = _rows(_prefixed(b, ns, 1), B, T, H, N, ns) if b is not None else h0.new_zeros(R, T, N)
    if T == 0:
        return h0.new_zeros((B, 0) + ((H,) if ns == 3 else ()) + (N,))
    if products:
        M = _rows(A, B, T, H, N, ns, node=(N, N)) + bs[..., None, :]
        h = _Products.apply(kind, M, h0r)
    else:
        As = A[0, 0].expand(((H,) if ns == 3 else ()) + (N, N)).reshape(H, N, N) if shared \
            else _rows(A, B, T, H, N, ns, node=(N, N))
        if loop is not None:
            h = loop(kind, As, shared, bs, h0r)
        elif _c_usable(As, bs, h0r):
            h = _Loop.apply(kind, As, shared, bs, h0r)
        else:
            if ran:
                ran[-1] = "torch.loop"   # what ran instead of the C loop
            h = loop_torch(kind, As, shared, bs, h0r)
    h = h.reshape((B, H, T, N)).transpose(1, 2) if ns == 3 else h
    return h


def _prefixed(x: torch.Tensor, ns: int, rank: int) -> torch.Tensor:
    """x with ns prefix axes and `rank` node axes (sizes kept: 1 where it does not vary)."""
    x = lift(x, x.dim() - ns, rank) if x.dim() - ns < rank else x
    while x.dim() < ns + rank:
        x = x[None]
    return x


def _rows(x: torch.Tensor, B: int, T: int, H: int, N: int, ns: int, node: tuple = None) -> torch.Tensor:
    """[B, T, (H), *node] (broadcast) -> [B*H, T, *node], heads folded into the rows."""
    node = node or (N,)
    x = x.expand((B, T) + ((H,) if ns == 3 else ()) + node)
    if ns == 3:
        x = x.transpose(1, 2)
    return x.reshape((B * H, T) + node)


# --------------------------------------------------------------------------- semiring algebra

def _plus(kind: str, x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(x, dim=dim) if kind == "lse" else torch.amax(x, dim=dim)


def matmul(kind: str, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The semiring matrix product (X (x) Y)[j, i] = (+)_k X[j, k] + Y[k, i] of [..., N, N]
    matrices, in slices of at most PRODUCT_ELEMS elements of the [.., N, N, N] temporary."""
    lead = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
    N = X.shape[-1]
    X, Y = X.expand(lead + (N, N)).reshape(-1, N, N), Y.expand(lead + (N, N)).reshape(-1, N, N)
    step = max(1, PRODUCT_ELEMS // max(N ** 3, 1))
    out = [_plus(kind, X[s:s + step, :, :, None] + Y[s:s + step, None, :, :], -2) for s in range(0, X.shape[0], step)]
    return torch.cat(out, 0).reshape(lead + (N, N)) if out else X.new_empty(lead + (N, N))


def vecmat(kind: str, h: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """(h (x) M)[i] = (+)_j h[j] + M[j, i]: h [..., N], M [..., N, N]."""
    return _plus(kind, h[..., :, None] + M, -2)


def products_scan(kind: str, M: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = h_{t-1} (x) M_t for all t by a log-depth scan of semiring matrix products:
    M [R, T, N, N], h0 [R, N] -> h [R, T, N]. Differentiable torch ops (the twin of
    _Products' derived backward)."""
    R, T, N = M.shape[0], M.shape[1], M.shape[-1]
    first = vecmat(kind, h0, M[:, 0])                        # h_1; as a matrix of equal rows,
    P = torch.cat([first[:, None, None, :].expand(R, 1, N, N), M[:, 1:]], 1)   # row j of P_t is h_t
    d = 1
    while d < T:
        P = torch.cat([P[:, :d], matmul(kind, P[:, :-d], P[:, d:])], 1)
        d *= 2
    return P[:, :, 0, :]


def weights(kind: str, hp: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """W[.., j, i]: how much h[i] = (+)_j hp[j] + M[j, i] moves with hp[j] + M[j, i]: the
    posterior exp(hp[j] + M[j, i] - h[i]) (lse, h recomputed here), the indicator of the first
    argmax (maxplus); 0 where every term is -inf. hp [..., N], M [..., N, N]."""
    S = hp[..., :, None] + M
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    if kind == "lse":
        z = torch.logsumexp(S, dim=-2, keepdim=True)
        return torch.where(z == float("-inf"), zero, torch.exp(S - z))
    W = torch.zeros_like(S).scatter_(-2, S.argmax(dim=-2, keepdim=True), 1.0)
    return torch.where(S.amax(dim=-2, keepdim=True) == float("-inf"), zero, W)   # no path: no winner (as the C)


def adjoint(W: torch.Tensor, gh: torch.Tensor) -> torch.Tensor:
    """lambda_t = g_t + W_{t+1} lambda_{t+1} (lambda_T = g_T): W [R, T, N, N], gh [R, T, N]
    -> lambda [R, T, N]; the reverse (+, x) scan as the block scan of scans.py (C for N <= 16
    on CPU, else its doubling scan) on time reversed."""
    from . import cpu_kernels, scans
    R, T, N = gh.shape
    Wn = torch.cat([W[:, 1:], torch.zeros_like(W[:, :1])], 1).flip(1)[:, :, None]   # [R, T, 1, N, N]
    x = gh.flip(1)[:, :, None].contiguous()
    h0 = gh.new_zeros(R, 1, N)
    if scans.use_c(Wn, x, h0) and N <= 16:
        lam = cpu_kernels.block_scan(Wn.contiguous(), x, h0)
    else:
        lam = scans._block_doubling(Wn, x, h0)
    return lam[:, :, 0].flip(1)


class _Products(torch.autograd.Function):
    """products_scan with the derived backward: dM_t = W_t * lambda_t[None, :]."""

    @staticmethod
    def forward(ctx, kind, M, h0):
        h = products_scan(kind, M, h0)
        ctx.kind = kind
        ctx.save_for_backward(M, h0, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        M, h0, h = ctx.saved_tensors
        if wants_graph((M, h0), (gh,)):
            fn = lambda M_, h0_: products_scan(ctx.kind, M_, h0_)   # noqa: E731
            return (None,) + tuple(recompute_vjp(fn, (M, h0), ctx.needs_input_grad[1:], (gh,)))
        hp = torch.cat([h0[:, None], h[:, :-1]], 1)
        W = weights(ctx.kind, hp, M)
        lam = adjoint(W, gh.contiguous())
        dM = W * lam[..., None, :]
        dh0 = (W[:, 0] @ lam[:, 0, :, None])[..., 0]
        return None, dM, dh0


# --------------------------------------------------------------------------- the sequential loop

def loop_torch(kind: str, A: torch.Tensor, shared: bool, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The semiring matrix-vector loop, one torch step per t (differentiable): the fallback
    of the C loop and its twin for double backward."""
    R, T, N = b.shape
    if shared:
        A = A.repeat(R // A.shape[0], 1, 1)     # row r = b * H + h reads A[h]
    h, out = h0, []
    for t in range(T):
        h = vecmat(kind, h, A if shared else A[:, t]) + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


class _Loop(torch.autograd.Function):
    """The C loop (csrc/semiring.c) with its C adjoint."""

    @staticmethod
    def forward(ctx, kind, A, shared, b, h0):
        Ac, bc, h0c = (t.contiguous() for t in (A, b, h0))
        R, T, N = bc.shape
        h = torch.empty_like(bc)
        cpu_kernels._call("dense_semiring_fwd", bc.dtype, _KIND[kind], Ac, int(shared), A.shape[0] if shared else 1, bc, h0c, h,
              R, T, N)
        ctx.kind, ctx.shared = kind, shared
        ctx.save_for_backward(A, b, h0, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        A, b, h0, h = ctx.saved_tensors
        if wants_graph((A, b, h0), (gh,)):
            fn = lambda A_, b_, h0_: loop_torch(ctx.kind, A_, ctx.shared, b_, h0_)   # noqa: E731
            needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
            dA, db, dh0 = recompute_vjp(fn, (A, b, h0), needs, (gh,))
            return None, dA, None, db, dh0
        Ac, h0c, gc = A.contiguous(), h0.contiguous(), gh.contiguous()
        R, T, N = h.shape
        H = A.shape[0] if ctx.shared else 1
        dA = h.new_empty((R, N, N) if ctx.shared else (R, T, N, N))
        db, dh0 = torch.empty_like(h), torch.empty_like(h0c)
        cpu_kernels._call("dense_semiring_bwd", h.dtype, _KIND[ctx.kind], Ac, int(ctx.shared), H, h0c, h, gc, dA, db, dh0,
              R, T, N)
        if ctx.shared:
            dA = dA.reshape(R // H, H, N, N).sum(0)
        return None, dA, None, db, dh0


# --------------------------------------------------------------------------- the C library

_KIND = {"lse": 0, "maxplus": 1}   # the C library (csrc/semiring.c, built with the scans: cpu_kernels)


def _c_usable(*ts) -> bool:
    return all(t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu" for t in ts) \
        and len({t.dtype for t in ts}) == 1 and cpu_kernels.available()
