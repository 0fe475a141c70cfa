"""flash-linear-attention-style functional ops, run by recdsl.

    from recdsl import ops
    o, ht = ops.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, ht = ops.chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)

Each function has the signature, argument order, defaults and return value of its namesake
in fla 0.6.0 (`fla.ops.gla.chunk_gla`, `fla.ops.delta_rule.chunk_delta_rule`, ...), so that
code written against fla runs by swapping the import:

  * tensors `[B, T, H, D]` (fla 0.6.0 removed `head_first`; passing it raises as fla does);
    B, T, H, K and V are read from the tensors on every call;
  * `scale` defaults to K ** -0.5;
  * `initial_state` and the returned final state are bare tensors `[N, H, K, V]` (`[N, H, V, K]`
    with `state_v_first=True`), N = B, or the number of sequences with `cu_seqlens` (B = 1);
  * every function returns `(o, final_state_or_None)`; bf16/fp16 inputs run with fp32 state
    accumulation and give outputs of their dtype and an fp32 final state.

Underneath, each call runs a recdsl module (`RecModule`) built once per (cell, K, V, H,
scale, options, backend, device, dtype) and cached (`cached_modules()`, `clear_cache()`).
The cell is the stdlib one where it is exactly fla's op (`gla`), else a small `.rec` text
written here (fla's query scale, optional in-kernel q/k L2 norm, gates on keys, values or
heads); recdsl analyses it and picks the lowering: chunkwise for GLA, simple GLA, retention,
the delta rule and the gated delta rule; the DPLR form for per-key gates on the delta rule; a
scan or a compiled loop for the value-side variants. docs/OPS.md lists every convention and
what differs from fla.

The backend: `torch` for CPU tensors, `auto` (Triton on a GPU) for others; set `ops.BACKEND`
to a backend name to force one.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

__all__ = [
    "chunk_gla", "fused_recurrent_gla",
    "chunk_simple_gla", "fused_recurrent_simple_gla", "fused_chunk_simple_gla", "parallel_simple_gla",
    "chunk_retention", "fused_recurrent_retention", "fused_chunk_retention", "parallel_retention",
    "chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_gdn", "fused_recurrent_gdn",
    "cached_modules", "clear_cache",
]

BACKEND: str | None = None     # None: "torch" for CPU tensors, "auto" for others
MAX_CACHED = 128               # modules kept (least recently used dropped first)

_LOCK = threading.Lock()
_SPECS: dict[str, object] = {}
_MODULES: OrderedDict = OrderedDict()


# ---------------------------------------------------------------------------- the cells
def _source(family: str, decay: tuple[str, ...], beta_vec: bool, norm: bool) -> str:
    """The .rec text of one op variant.

    family "attn": S' = D * S + outer(k, v), o = (q * scale) @ S' (GLA, simple GLA,
    retention, linear attention); family "delta": S' = D S + outer(k, beta * (v - k @ (D S))),
    o = (q * scale) @ S' (the delta rule, gated or not). D is the product of the decays
    present: exp(g) (one per head), exp(gk) on keys, exp(gv) on values. `norm`: q and k
    L2-normalised in the step (fla's use_qk_l2norm_in_kernel, eps 1e-6 inside the root as
    fla's l2norm)."""
    ins = ["q[K]", "k[K]", "v[V]"]
    factors = []
    if "g" in decay:
        ins.append("g[]")
        factors.append("exp(g)")
    if "gk" in decay:
        ins.append("gk[K]")
        factors.append("exp(gk)[:, None]")
    if "gv" in decay:
        ins.append("gv[V]")
        factors.append("exp(gv)[None, :]")
    if family == "delta":
        ins.append("beta[V]" if beta_vec else "beta[]")
    name = "Ops" + ("Delta" if family == "delta" else "Attn") + "".join(d.upper() for d in decay) + \
        ("VecBeta" if beta_vec else "") + ("Norm" if norm else "")
    lines = [f"cell {name}(K, V, scale=K**-0.5):",
             f'    """recdsl.ops: {family} family, decays {list(decay) or "none"}'
             f'{", vector beta" if beta_vec else ""}{", q/k L2-normalised" if norm else ""}."""',
             "    input " + ", ".join(ins),
             "    state S[K, V] = 0"]
    qn, kn = "q", "k"
    if norm:
        lines += ["    qn = l2norm(q)", "    kn = l2norm(k)"]
        qn, kn = "qn", "kn"
    s = "S"
    if factors:
        lines.append("    Sd = " + " * ".join(factors) + " * S")
        s = "Sd"
    if family == "attn":
        lines.append(f"    S' = {s} + outer({kn}, v)")
    elif beta_vec:
        lines.append(f"    S' = {s} + outer({kn}, beta * (v - {kn} @ {s}))")
    else:
        lines.append(f"    S' = {s} - beta * outer({kn}, {kn} @ {s}) + beta * outer({kn}, v)")
    lines.append(f"    output o = ({qn} * scale) @ S'")
    return "\n".join(lines) + "\n"


def _spec(family: str, decay: tuple[str, ...], beta_vec: bool, norm: bool):
    import recdsl
    if family == "attn" and decay == ("gk",):
        key = "gla"   # the stdlib cell is fla's chunk_gla exactly (gk: log gate on keys, scale)
    else:
        key = _source(family, decay, beta_vec, norm)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = recdsl.load(key)
    return spec


def _backend(device) -> str:
    if BACKEND is not None:
        return BACKEND
    return "torch" if device.type == "cpu" else "auto"


def _module(family, decay, beta_vec, norm, K, V, H, scale, device, dtype):
    backend = _backend(device)
    key = (family, decay, beta_vec, norm, K, V, H, scale, backend, str(device), dtype)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            _MODULES.move_to_end(key)
            return mod
        spec = _spec(family, decay, beta_vec, norm)
        mod = spec(K=K, V=V, heads=H, backend=backend, scale=scale)
        _MODULES[key] = mod
        while len(_MODULES) > MAX_CACHED:
            _MODULES.popitem(last=False)
        return mod


def cached_modules() -> list:
    """[(key, RecModule)] of the modules built so far, least recently used first; a module's
    `.selection` says which kernel runs each stage, `.ran` what the last call executed."""
    with _LOCK:
        return list(_MODULES.items())


def clear_cache() -> None:
    with _LOCK:
        _MODULES.clear()


# ---------------------------------------------------------------------------- the driver
def _shape_error(name, t, want):
    return ValueError(f"{name} has shape {list(t.shape)}, expected {want}")


def _run(family, q, k, v, *, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
         output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
         cu_seqlens_cpu=None, norm=False, grouped_values=False):
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor [B, T, H, {'V' if name == 'v' else 'K'}]"
                             + (f", got shape {list(t.shape)}" if isinstance(t, torch.Tensor) else ""))
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise _shape_error("k", k, f"the shape of q, {list(q.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if tuple(v.shape[:2]) != (B, T):
        raise _shape_error("v", v, f"[B, T, H, V] = [{B}, {T}, H, V]")
    if HV != H:
        if not grouped_values or HV % H:
            raise _shape_error("v", v, f"[B, T, H, V] with H = {H}" +
                               (" or a multiple of it (grouped value heads)" if grouped_values else ""))
        G = HV // H   # value head i reads query/key head i // G, as fla's GVA
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    H = HV

    def want(name, t, tail):
        if t is not None and tuple(t.shape) != (B, T, H) + tail:
            raise _shape_error(name, t, str([B, T, H, *tail]))

    want("g", g, ())
    want("gk", gk, (K,))
    want("gv", gv, (V,))
    beta_vec = beta is not None and beta.dim() == 4
    if beta is not None:
        want("beta", beta, (V,) if beta_vec else ())

    # One decay factor per axis: a per-head gate folds into the key (or value) gate.
    if g is not None and gk is not None:
        gk, g = gk + g[..., None], None
    elif g is not None and gv is not None:
        gv, g = gv + g[..., None], None
    decay = tuple(n for n, t in (("g", g), ("gk", gk), ("gv", gv)) if t is not None)

    if cu_seqlens_cpu is not None:
        cu_seqlens = cu_seqlens_cpu   # the host copy: no device synchronisation
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"The batch size is expected to be 1 rather than {B} when using `cu_seqlens`. "
                             f"Please flatten variable-length inputs before processing.")
        N = len(cu_seqlens) - 1
    state = None
    if initial_state is not None:
        want_s = (N, H, V, K) if state_v_first else (N, H, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want_s:
            got = list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state has shape {got}, expected {list(want_s)}"
                             + (" (one state per sequence of cu_seqlens)" if cu_seqlens is not None else ""))
        state = {"S": initial_state.transpose(-1, -2) if state_v_first else initial_state}

    scale = K ** -0.5 if scale is None else float(scale)
    mod = _module(family, decay, beta_vec, norm, K, V, H, scale, q.device, q.dtype)
    inputs = {"q": q, "k": k, "v": v}   # q first: the output takes its dtype
    if g is not None:
        inputs["g"] = g
    if gk is not None:
        inputs["gk"] = gk
    if gv is not None:
        inputs["gv"] = gv
    if family == "delta":
        inputs["beta"] = beta
    o, st = mod(state=state, reverse=bool(reverse), cu_seqlens=cu_seqlens, **inputs)
    if not output_final_state:
        return o, None
    S = st["S"]
    if state_v_first:
        S = S.transpose(-1, -2)
    return o, S.contiguous()


def _state_layout(state_v_first, kwargs):
    """fla's deprecated spelling of state_v_first."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
                      DeprecationWarning, stacklevel=3)
        state_v_first = kwargs.pop("transpose_state_layout")
    return state_v_first


def _no_head_first(kwargs):
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    kwargs.pop("chunk_size", None)   # a tiling hint of fla's kernels; recdsl picks its own


def _check_varlen_state(q, initial_state, cu_seqlens):
    if cu_seqlens is not None and initial_state is not None and initial_state.shape[0] != len(cu_seqlens) - 1:
        raise ValueError(f"The number of initial states is expected to be equal to the number of input sequences, "
                         f"i.e., {len(cu_seqlens) - 1} rather than {initial_state.shape[0]}.")


def _unexpected(kwargs, fn):
    if kwargs:
        raise TypeError(f"{fn}() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")


def _retention_gamma(q):
    """fla's fixed retention decays, log(1 - 2^(-5 - h)) per head, in float32 as fla computes them."""
    import torch
    return (1 - 2.0 ** (-5.0 - torch.arange(q.shape[2], dtype=torch.float, device=q.device))).log()


def _head_gate(q, g, g_gamma):
    if g is not None and g_gamma is not None:
        raise ValueError("Only one of `g` or `g_gamma` should be provided.")
    if g_gamma is not None:
        B, T, H = q.shape[:3]
        if tuple(g_gamma.shape) != (H,):
            raise ValueError(f"g_gamma has shape {list(g_gamma.shape)}, expected [H] = [{H}]")
        return g_gamma[None, None, :].expand(B, T, H)
    return g


# ---------------------------------------------------------------------------- GLA
def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    """fla.ops.gla.chunk_gla: S' = exp(g)[:, None] * S + k vᵀ, o = (q * scale) S'; g [B, T, H, K] the
    log forget gate on keys (stdlib `gla`, whose input is called gk)."""
    if q.shape != k.shape or g.shape != q.shape:
        raise ValueError("q, k, g must have the same shape.")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, gk=g, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
    """fla.ops.gla.fused_recurrent_gla: gates on keys (gk) and/or values (gv), both optional."""
    state_v_first = _state_layout(state_v_first, kwargs)
    _unexpected(kwargs, "fused_recurrent_gla")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------- simple GLA
def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """fla.ops.simple_gla.chunk_simple_gla: one log gate per head and step, g [B, T, H], or per head,
    g_gamma [H]; neither: no decay (linear attention)."""
    _no_head_first(kwargs)
    _unexpected(kwargs, "chunk_simple_gla")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, g, g_gamma), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
                               **kwargs):
    """fla.ops.simple_gla.fused_recurrent_simple_gla (the same math as chunk_simple_gla, and reverse)."""
    state_v_first = _state_layout(state_v_first, kwargs)
    _unexpected(kwargs, "fused_recurrent_simple_gla")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, g, g_gamma), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens)


def fused_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None):
    """fla.ops.simple_gla.fused_chunk_simple_gla (the same math as chunk_simple_gla)."""
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, g, g_gamma), scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def parallel_simple_gla(q, k, v, g=None, scale=None, output_attentions=False, cu_seqlens=None,
                        cu_seqlens_cpu=None):
    """fla.ops.simple_gla.parallel_simple_gla: (o, None); the attention matrix is not materialised."""
    if output_attentions:
        raise NotImplementedError("recdsl.ops.parallel_simple_gla does not materialise the attention "
                                  "matrix (output_attentions=True)")
    return _run("attn", q, k, v, g=g, scale=scale, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)


# ---------------------------------------------------------------------------- retention
def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    **kwargs):
    """fla.ops.retention.chunk_retention: simple GLA with fla's fixed per-head decays
    g_gamma = log(1 - 2^(-5 - h))."""
    _no_head_first(kwargs)
    _unexpected(kwargs, "chunk_retention")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, None, _retention_gamma(q)), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None, **kwargs):
    """fla.ops.retention.fused_recurrent_retention (the same math as chunk_retention, and reverse)."""
    state_v_first = _state_layout(state_v_first, kwargs)
    _unexpected(kwargs, "fused_recurrent_retention")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, None, _retention_gamma(q)), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, reverse=reverse,
                state_v_first=state_v_first, cu_seqlens=cu_seqlens)


def fused_chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla.ops.retention.fused_chunk_retention (the same math as chunk_retention)."""
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("attn", q, k, v, g=_head_gate(q, None, _retention_gamma(q)), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    """fla.ops.retention.parallel_retention: (o, None); the attention matrix is not materialised."""
    if output_attentions:
        raise NotImplementedError("recdsl.ops.parallel_retention does not materialise the attention "
                                  "matrix (output_attentions=True)")
    return _run("attn", q, k, v, g=_head_gate(q, None, _retention_gamma(q)), scale=scale, cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------- delta rule
def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """fla.ops.delta_rule.chunk_delta_rule: S' = S - beta k (kᵀ S) + beta k vᵀ, o = (q * scale) S';
    beta [B, T, H]; with use_qk_l2norm_in_kernel, q and k are L2-normalised first."""
    _no_head_first(kwargs)
    _unexpected(kwargs, "chunk_delta_rule")
    if beta.dim() != 3:
        raise ValueError("beta must be of shape (batch size, num of head, seq len).")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("delta", q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                norm=bool(use_qk_l2norm_in_kernel))


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """fla.ops.delta_rule.fused_recurrent_delta_rule: as chunk_delta_rule; beta may also be one per
    value channel, [B, T, H, V], and defaults to ones."""
    import torch
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("delta", q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, norm=bool(use_qk_l2norm_in_kernel))


# ---------------------------------------------------------------------------- gated delta rule
def _gdn_gate(g, use_gate_in_kernel, A_log, dt_bias):
    """fla's in-kernel gate: g = -exp(A_log) * softplus(g + dt_bias), in float32."""
    import torch.nn.functional as F
    if not use_gate_in_kernel:
        return g
    if A_log is None:
        raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
    if g is None:
        raise ValueError("`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`.")
    x = g.float()
    if dt_bias is not None:
        x = x + dt_bias.float()
    return -A_log.float().exp() * F.softplus(x)


def _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if not use_beta_sigmoid_in_kernel:
        return beta
    b = beta.float().sigmoid()
    return 2 * b if allow_neg_eigval else b


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, **kwargs):
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule: S' = exp(g) (S - beta k (kᵀ S)) + beta k vᵀ,
    o = (q * scale) S'; g [B, T, HV] the log decay, beta [B, T, HV]; v may have HV = G * H heads
    (value head i reads q/k head i // G); use_gate_in_kernel / A_log / dt_bias by keyword, as fla."""
    state_v_first = _state_layout(state_v_first, kwargs)
    _no_head_first(kwargs)
    if cp_context is not None:
        raise NotImplementedError("recdsl.ops does not run context parallelism (cp_context)")
    # chunk_indices: fla's precomputed tiling of cu_seqlens, an optimisation; not needed here
    use_gate_in_kernel = kwargs.pop("use_gate_in_kernel", False)
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    _unexpected(kwargs, "chunk_gated_delta_rule")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, but got q.shape[2]={q.shape[2]} "
                         f"and k.shape[2]={k.shape[2]}")
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("delta", q, k, v, g=_gdn_gate(g, use_gate_in_kernel, A_log, dt_bias),
                beta=_beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu, norm=bool(use_qk_l2norm_in_kernel),
                grouped_values=True)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None, **kwargs):
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule: the state decays by exp(g) (per
    head), exp(gk) (per key, [B, T, HV, K]: KDA) and exp(gv) (per value), whichever are given,
    then takes the delta-rule step; beta [B, T, HV] or [B, T, HV, V], default ones."""
    import torch
    state_v_first = _state_layout(state_v_first, kwargs)
    _unexpected(kwargs, "fused_recurrent_gated_delta_rule")
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    if not use_gate_in_kernel:
        A_log = dt_bias = None
    _check_varlen_state(q, initial_state, cu_seqlens)
    return _run("delta", q, k, v, g=_gdn_gate(g, use_gate_in_kernel, A_log, dt_bias), gk=gk, gv=gv,
                beta=_beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, norm=bool(use_qk_l2norm_in_kernel), grouped_values=True)


chunk_gdn = chunk_gated_delta_rule
fused_recurrent_gdn = fused_recurrent_gated_delta_rule
