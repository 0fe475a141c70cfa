"""The CPU recurrent core: scans compiled from csrc/scans.c, loaded with ctypes.

Why C and not a torch loop: a per-step torch loop over T is bound by op dispatch (tens of
microseconds per op), and torch.compile does not help scans on CPU. The scans are generic
(the cell's gate math runs vectorised in torch before them), so one small library serves
every cell: it is compiled once per machine (cc -O3 -fopenmp, about a second), cached
under ~/.cache/recdsl ($RECDSL_CACHE) keyed by the source hash and the compiler/CPU
(kcache.py: stamped, checked before it is loaded, rebuilt when damaged). Without a C
compiler (or with RECDSL_NO_CC=1) `available()` is False and the backend uses the
pure-torch scans in scans.py instead.

Each scan is a torch.autograd.Function whose backward is the adjoint scan (MATH.md §1-2).
The chunkwise forms' kernels (vector-decay intra-chunk terms, unit-triangular solves, the
delta rule's pass over chunks) are plain functions without autograd: scans.py's Functions
call them from their forward and their derived backward.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from . import kcache
from .double_backward import recompute_vjp, wants_graph

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "scans.c", CSRC / "semiring.c")   # one library: the scans and the dense semiring loops
_lock = threading.Lock()
_lib = None
_error: str | None = None


def cache_dir() -> Path:
    return kcache.cache_root()


_found: dict = {}


def _compiler() -> str | None:
    """The C compiler's path, or None. Asked on every forward of a C stage (is the fast path
    usable?), so the PATH search is remembered per (RECDSL_NO_CC, CC, PATH)."""
    env = os.environ
    key = (env.get("RECDSL_NO_CC"), env.get("CC"), env.get("PATH"))
    if key not in _found:
        _found[key] = None if key[0] else next(
            (shutil.which(cc) for cc in (key[1], "cc", "gcc", "clang") if cc and shutil.which(cc)), None)
    return _found[key]


# -fno-trapping-math / -fno-math-errno let loops with floorf and selects vectorise; unlike
# -ffast-math they keep inf and NaN semantics (the semiring scans use -inf). -ffp-contract=fast
# lets a * b + c be one fused multiply-add (ISO C mode would keep them apart: half the rate of
# the chunk kernels' inner loops, and one rounding more).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared",
         "-fPIC", "-std=c99"]
# what the library exports (kcache checks a loaded file has them all)
SYMBOLS = tuple(f"{name}_{sfx}" for sfx in ("f32", "f64")
                for name in [f"{k}_{d}" for k in ("diag", "diagexp", "maxplus", "lse", "block") for d in ("fwd", "bwd")]
                + ["matdiag_fwd", "delta_fwd", "vdecay_fwd", "vdecay_bwd", "trisolve", "delta_carry_fwd",
                   "delta_carry_bwd", "transpose"]
                + [f"dense_semiring_{d}" for d in ("fwd", "bwd")])


def machine_tag(cc: str, flags: list[str]) -> bytes:
    """What a compiled library depends on besides its source: compiler, flags, machine
    (-march=native code from another CPU in a shared home directory would not run here)."""
    return " ".join([cc] + flags + [platform.machine(), platform.node()]).encode()


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) found")
    src = b"".join(f.read_bytes() for f in SOURCES) + (CSRC / "vmath.h").read_bytes()
    key = hashlib.sha256(src + machine_tag(cc, FLAGS)).hexdigest()[:16]

    def build(out: Path) -> None:
        r = subprocess.run([cc, *FLAGS, f"-I{CSRC}", *map(str, SOURCES), "-o", str(out), "-lm"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise kcache.BuildError(f"compiling {', '.join(f.name for f in SOURCES)} failed: {r.stderr.strip()[:500]}")

    return kcache.load_library(f"scans-{key}", build, SYMBOLS)


def library():
    """The loaded library, or None (and the reason in `unavailable_reason()`). Once loaded,
    no lock: every C call of a forward asks (and recdsl::layer_forward under torch.compile)."""
    global _lib, _error
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, no OpenMP, no usable directory: fall back to torch
                _error = str(e)
    return _lib


def _forget() -> None:
    global _lib, _error
    with _lock:
        _lib = _error = None


kcache.on_reset(_forget)


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _error


_SFX = {torch.float32: "f32", torch.float64: "f64"}


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype, *args):
    fn = getattr(library(), f"{name}_{_SFX[dtype]}")
    conv = [_ptr(a) if isinstance(a, torch.Tensor) else ctypes.c_int64(int(a)) for a in args]
    fn(*conv)


def _prep(*ts):
    return [t.contiguous() for t in ts]


def _prep_as(dtype, *ts):
    """Contiguous and of one dtype (the C kernels read every buffer as the first one's type)."""
    return [t.to(dtype).contiguous() for t in ts]


def _i64(*ns):
    return [ctypes.c_int64(int(n)) for n in ns]


class _ElementScan(torch.autograd.Function):
    """diag / diagexp (decay given as its log) / maxplus / lse over [B, T, C], h0 [B, C].
    Under create_graph=True the backward is autograd's through the doubling scan of
    scans.py (double_backward.py): the C adjoint carries no graph."""

    @staticmethod
    def forward(ctx, kind, a, x, h0):
        ac, xc, h0c = _prep(a, x, h0)
        B, T, C = xc.shape
        h = torch.empty_like(xc)
        _call(f"{kind}_fwd", xc.dtype, ac, xc, h0c, h, B, T, C)
        ctx.kind = kind
        ctx.save_for_backward(a, x, h0, h)   # the inputs themselves: a second derivative reaches their history
        return h

    @staticmethod
    def twin(kind: str, a, x, h0):
        """The same scan in differentiable torch ops."""
        from .scans import doubling_scan
        if kind == "diagexp":
            kind, a = "diag", torch.exp(a)
        return doubling_scan(kind, a, x, h0)

    @staticmethod
    def backward(ctx, gh):
        a, x, h0, h = ctx.saved_tensors
        if wants_graph((a, x, h0), (gh,)):
            fn = lambda a_, x_, h0_: _ElementScan.twin(ctx.kind, a_, x_, h0_)  # noqa: E731
            return (None,) + tuple(recompute_vjp(fn, (a, x, h0), ctx.needs_input_grad[1:], (gh,)))
        a, x, h0 = _prep(a, x, h0)
        B, T, C = x.shape
        gh = gh.contiguous()
        gT = torch.zeros_like(h0)
        dx, da, dh0 = torch.empty_like(x), torch.empty_like(x), torch.empty_like(h0)
        if ctx.kind in ("diag", "diagexp"):
            _call(f"{ctx.kind}_bwd", x.dtype, a, h, h0, gh, gT, dx, da, dh0, B, T, C)
        else:
            _call(f"{ctx.kind}_bwd", x.dtype, a, x, h, h0, gh, gT, dx, da, dh0, B, T, C)
        return None, da, dx, dh0


class _BlockScan(torch.autograd.Function):
    """h_t[c] = A_t[c] h_{t-1}[c] + x_t[c]: A [B, T, C, K, K], x [B, T, C, K], h0 [B, C, K].
    Under create_graph=True the backward is autograd's through the doubling block scan."""

    @staticmethod
    def forward(ctx, A, x, h0):
        Ac, xc, h0c = _prep(A, x, h0)
        B, T, C, K = xc.shape
        h = torch.empty_like(xc)
        _call("block_fwd", xc.dtype, Ac, xc, h0c, h, B, T, C, K)
        ctx.save_for_backward(A, x, h0, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        A, x, h0, h = ctx.saved_tensors
        if wants_graph((A, x, h0), (gh,)):
            from .scans import _block_doubling
            return tuple(recompute_vjp(_block_doubling, (A, x, h0), ctx.needs_input_grad, (gh,)))
        A, h0 = _prep(A, h0)
        B, T, C, K = h.shape
        gh = gh.contiguous()
        dx, dA, dh0 = torch.empty_like(h), torch.empty_like(A), torch.empty_like(h0)
        _call("block_bwd", h.dtype, A, h, h0, gh, torch.zeros_like(h0), dx, dA, dh0, B, T, C, K)
        return dA, dx, dh0


def element_scan(kind: str, a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All h_t of the scan `kind` (diag | diagexp | maxplus | lse); a, x [B, T, C], h0 [B, C]."""
    return _ElementScan.apply(kind, a, x, h0)


def block_scan(A: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] > 16:
        raise ValueError("block scans take blocks of at most 16")
    return _BlockScan.apply(A, x, h0)



class View(ctypes.Structure):
    """A sequence tensor [B, T, H, F] read in place: base pointer and element strides."""
    _fields_ = [("p", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64),
                ("sf", ctypes.c_int64)]


def _view(x: torch.Tensor) -> View:
    """x: [B, T, H, F] (any strides, 0 for broadcast axes)."""
    sb, st, sh, sf = x.stride()
    return View(x.data_ptr(), sb, sh, st, sf)


def _bthf(x: torch.Tensor, B: int, T: int, H: int, F: int) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(-1)
    return x.expand(B, T, H, F)


def matdiag(q, incl: bool, k, v, g, S0):
    """Inference kernel (csrc/scans.c): q, k [B, T, H, K], g [B, T, H, K] or [B, T, H] (scalar
    decay), v [B, T, H, V], S0 [B, H, K, V] -> (o [B, T, H, V], S_T). No autograd."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = k.dtype
    views = [_view(_bthf(x, B, T, H, F)) for x, F in ((g, K), (k, K), (v, V), (q, K))]
    return _matrix_kernel("matdiag_fwd", views, incl, S0, B, H, T, K, V, dt)


def _matrix_kernel(name, views, flag, S0, B, H, T, K, V, dt):
    """Call a matrix-state kernel: (views..., flag, S0, out, ST, B, H, T, K, V)."""
    out = torch.empty((B, T, H, V), dtype=dt)
    ST = torch.empty((B, H, K, V), dtype=dt)
    S0 = S0.to(dt).contiguous()
    getattr(library(), f"{name}_{_SFX[dt]}")(*[ctypes.byref(w) for w in views], ctypes.c_int32(int(flag)),
                                             _ptr(S0), _ptr(out), _ptr(ST),
                                             *[ctypes.c_int64(n) for n in (B, H, T, K, V)])
    return out, ST


def delta(q, k, v, beta, g, S0):
    """Inference kernel for the (gated) delta rule: q, k [B, T, H, K], v [B, T, H, V],
    beta, g [B, T, H] (g None: ungated), S0 [B, H, K, V] -> (o [B, T, H, V], S_T)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = k.dtype
    gated = g is not None
    g = g if gated else beta
    views = [_view(_bthf(x, B, T, H, F)) for x, F in ((g, 1), (beta, 1), (k, K), (v, V), (q, K))]
    return _matrix_kernel("delta_fwd", views, gated, S0, B, H, T, K, V, dt)


def vdecay_intra(q, k, v, g, strict: bool) -> torch.Tensor:
    """The intra-chunk readout of the vector-decay chunkwise form (csrc/scans.c), no autograd:
    o_i = Σ_{j <= i - s} Σ_k q_ik k_jk exp(b_{i-s,k} - b_jk) v_j per chunk, b the cumulative
    log decay inside it. q, k, g [R, C, K] (R chunks of C steps), v [R, C, V] -> o [R, C, V]."""
    q, k, v, g = _prep_as(q.dtype, q, k, v, g)
    R, C, K = q.shape
    o = torch.empty_like(v)
    getattr(library(), f"vdecay_fwd_{_SFX[q.dtype]}")(*[_ptr(t) for t in (q, k, v, g, o)], ctypes.c_int32(int(strict)),
                                                      *_i64(R, C, K, v.shape[-1]))
    return o


def vdecay_intra_bwd(q, k, v, g, do, strict: bool):
    """The vector-Jacobian product of vdecay_intra: (dq, dk, dv, dg) for the cotangent do."""
    q, k, v, g, do = _prep_as(q.dtype, q, k, v, g, do)
    R, C, K = q.shape
    dq, dk, dg, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g), torch.empty_like(v)
    getattr(library(), f"vdecay_bwd_{_SFX[q.dtype]}")(*[_ptr(t) for t in (q, k, v, g, do, dq, dk, dv, dg)],
                                                      ctypes.c_int32(int(strict)), *_i64(R, C, K, v.shape[-1]))
    return dq, dk, dv, dg


def trisolve(L: torch.Tensor, R: torch.Tensor, scale: torch.Tensor | None = None, transposed: bool = False):
    """X = L⁻¹ diag(scale) R (forward substitution) or L⁻ᵀ diag(scale) R (back substitution) for
    unit lower-triangular L [..., C, C] (only its strictly lower part is read), R [..., C, W],
    scale [..., C] (None: 1); no autograd."""
    lead = torch.broadcast_shapes(L.shape[:-2], R.shape[:-2])
    C, W = R.shape[-2:]
    L, R = _prep_as(R.dtype, L.expand(lead + (C, C)), R.expand(lead + (C, W)))
    s = None if scale is None else _prep_as(R.dtype, scale.expand(lead + (C,)))[0]
    X = torch.empty_like(R)
    getattr(library(), f"trisolve_{_SFX[X.dtype]}")(_ptr(L), _ptr(R), None if s is None else _ptr(s), _ptr(X),
                                                    ctypes.c_int32(int(transposed)),
                                                    *_i64(R.numel() // max(C * W, 1), C, W))
    return X


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x.T as a dense tensor, for a 2-D float tensor whose columns are at stride 1."""
    rows, cols = x.shape
    out = torch.empty((cols, rows), dtype=x.dtype)
    getattr(library(), f"transpose_{_SFX[x.dtype]}")(_ptr(x), *_i64(x.stride(0)), _ptr(out), *_i64(rows, cols))
    return out


def delta_carry(X: torch.Tensor, V: int, wk: torch.Tensor, decay: torch.Tensor | None, S0: torch.Tensor,
                Qe: torch.Tensor):
    """The delta rule's pass over chunks (csrc/scans.c), no autograd: X [B, N, C, V + K] holds
    [Û | Ŵ] per chunk, wk [B, N, C, K], decay [B, N] (None: ungated), S0 [B, K, V], Qe [B, N, C, K]
    the queries the states before the chunks are read with. Returns (the state before every
    chunk [B, N, K, V], the new values Vn [B, N, C, V], Qe S_prev [B, N, C, V], S_T)."""
    X, wk, S0, Qe = _prep_as(X.dtype, X, wk, S0, Qe)
    B, N, C, W = X.shape
    K = W - V
    d = None if decay is None else _prep_as(X.dtype, decay)[0]
    Sp, Vn, O, ST = X.new_empty(B, N, K, V), X.new_empty(B, N, C, V), X.new_empty(B, N, C, V), X.new_empty(B, K, V)
    getattr(library(), f"delta_carry_fwd_{_SFX[X.dtype]}")(
        _ptr(X), ctypes.c_int64(W), _ptr(wk), None if d is None else _ptr(d), _ptr(S0), _ptr(Qe), _ptr(Sp), _ptr(Vn),
        _ptr(O), _ptr(ST), *_i64(B, N, C, K, V))
    return Sp, Vn, O, ST


def delta_carry_adjoint(X: torch.Tensor, V: int, wk: torch.Tensor, decay: torch.Tensor | None, S_prev: torch.Tensor,
                        P: torch.Tensor, Y: torch.Tensor, dS_T: torch.Tensor | None, dVn: torch.Tensor):
    """The adjoint of delta_carry: Λ_n (the gradient of the state after chunk n) and dVn, from
    the saved states before the chunks S_prev and P [B, N, C, V], Y [B, N, K, V] (what each
    chunk's readouts send to its new values and to the state before it). dVn: where to write
    dVn, [B, N, C, V] columns of a contiguous [B, N, C, ldo] buffer. Returns (Λ [B, N, K, V],
    the new values Vn [B, N, C, V] recomputed, dS0)."""
    X, wk, S_prev, P, Y = _prep_as(X.dtype, X, wk, S_prev, P, Y)
    B, N, C, W = X.shape
    K = W - V
    ldo = dVn.stride(-2)
    if dVn.dtype != X.dtype or dVn.stride() != (N * C * ldo, C * ldo, ldo, 1):
        raise ValueError("dVn must be a column slice of a contiguous buffer of X's dtype")
    d = None if decay is None else _prep_as(X.dtype, decay)[0]
    dST = None if dS_T is None else _prep_as(X.dtype, dS_T)[0]
    Lam, Vn, dS0 = X.new_empty(B, N, K, V), X.new_empty(B, N, C, V), X.new_empty(B, K, V)
    getattr(library(), f"delta_carry_bwd_{_SFX[X.dtype]}")(
        _ptr(X), ctypes.c_int64(W), _ptr(wk), None if d is None else _ptr(d), _ptr(S_prev), _ptr(P), _ptr(Y),
        None if dST is None else _ptr(dST), _ptr(Lam), _ptr(Vn), _ptr(dVn), ctypes.c_int64(ldo), _ptr(dS0),
        *_i64(B, N, C, K, V))
    return Lam, Vn, dS0
