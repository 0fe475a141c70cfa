"""recdsl.ops, the flash-linear-attention-style functional ops, against fla 0.6.0.

Every op is checked against fla's own naive references (`fla.ops.*.naive`, test-only oracles:
they compute in float32 whatever the input dtype, so the comparisons are float32, relative to
the largest reference value: outputs and final states within FWD_TOL, gradients of q, k, v,
the gates, beta and the initial state within GRAD_TOL): with and without an initial state,
with the default scale (K ** -0.5) and an explicit one, L2 norm of q/k in the kernel both ways,
packed variable-length batches (cu_seqlens) against one naive call per sequence, reverse,
the V-first state layout, grouped value heads, fla's in-kernel gate and beta sigmoid, and
bf16 inputs. The value-side gates (gv), which no naive reference of fla covers, are checked
against the per-step loop written here from fla's docstrings. Then: the signatures equal
fla's, a small model written against fla's API gives the same outputs and gradients with
recdsl.ops swapped in, and the kernels that run are the chunkwise ones."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recdsl import ops

with warnings.catch_warnings():   # fla warns at import that Triton has no driver here
    warnings.simplefilter("ignore")
    fla = pytest.importorskip("fla")
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.kda.naive import naive_recurrent_kda
    from fla.ops.retention.naive import naive_retention
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla, naive_recurrent_simple_gla

FWD_TOL = 5e-6    # float32, relative to the largest reference value (measured: <= 7e-7)
GRAD_TOL = 1e-5   # (measured: <= 8e-7)
B, T, H, K, V = 2, 37, 2, 16, 8
SCALES = [None, 0.3]


# ---------------------------------------------------------------------------- helpers
def l2(x):
    """fla's l2norm (fla.modules.norm.l2norm: x / sqrt(sum x^2 + 1e-6))."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item() / max(1.0, ref.double().abs().max().item())


def _data(seed, B=B, T=T, H=H, K=K, V=V, HV=None, unit_keys=False, beta_vec=False):
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    r = lambda *s: torch.randn(*s, generator=gen)
    k = r(B, T, H, K)
    return {
        "q": r(B, T, H, K), "k": F.normalize(k, dim=-1) if unit_keys else k, "v": r(B, T, HV, V),
        "gk": F.logsigmoid(r(B, T, HV, K) + 2), "g": F.logsigmoid(r(B, T, HV) + 2),
        "gv": F.logsigmoid(r(B, T, HV, V) + 2), "g_gamma": F.logsigmoid(r(HV) + 3),
        "beta": torch.rand(B, T, HV, V, generator=gen) if beta_vec else torch.rand(B, T, HV, generator=gen),
        "h0": r(B, HV, K, V),
    }


def _ref_scale(q, scale):
    """Naive references that fix the scale at K ** -0.5 get q pre-multiplied instead."""
    return q if scale is None else q * (scale * q.shape[-1] ** 0.5)


def _retention_g(B, T, H):
    # fla's retention decays (fla.ops.retention: g_gamma = log(1 - 2^(-5 - h)))
    return (1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float))).log()[None, None].expand(B, T, H)


def loop_ref(q, k, v, beta=None, g=None, gk=None, gv=None, scale=None, h0=None, delta=True):
    """The per-step recurrence of fla's fused_recurrent kernels, written here from their docstrings
    (decay S by exp(g), exp(gk) on keys, exp(gv) on values; then S += k vᵀ, or the delta-rule step
    S += k (beta * (v - kᵀ S))ᵀ; o = (q * scale) S), in float64: the oracle for gv."""
    q, k, v = q.double(), k.double(), v.double()
    Bq, Tq, Hq, Kq = q.shape
    scale = Kq ** -0.5 if scale is None else scale
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    outs = []
    for t in range(Tq):
        if g is not None:
            S = S * g[:, t].double().exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].double().exp()[..., :, None]
        if gv is not None:
            S = S * gv[:, t].double().exp()[..., None, :]
        kt = k[:, t]
        if delta:
            b = beta[:, t].double()
            u = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
            u = u * (b if b.dim() == 3 else b[..., None])
        else:
            u = v[:, t]
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, 1), S


# ---------------------------------------------------------------------------- the cases
# name -> (data options, leaves with gradients, our call, the reference call). Our call takes
# the data and fla's keyword arguments; the reference takes the data, scale and initial state
# (one batch, no cu_seqlens) and returns (o [B, T, H, V], final state [B, H, K, V]).
def _gla_ref(d, scale, h0):
    return naive_recurrent_gla(_ref_scale(d["q"], scale), d["k"], d["v"], d["gk"], initial_state=h0,
                               output_final_state=True)


def _sgla_ref(d, scale, h0, g=None):
    return naive_recurrent_simple_gla(d["q"], d["k"], d["v"], d["g"] if g is None else g, scale=scale,
                                      initial_state=h0, output_final_state=True)


def _delta_ref(d, scale, h0, norm=False):
    q, k = (l2(d["q"]), l2(d["k"])) if norm else (d["q"], d["k"])
    hf = lambda x: x.transpose(1, 2)
    o, S = delta_rule_recurrence(hf(_ref_scale(q, scale)), hf(k), hf(d["v"]), hf(d["beta"]), initial_state=h0,
                                 output_final_state=True)
    return hf(o), S


def _gdn_ref(d, scale, h0, norm=False, g=None, beta=None):
    q, k = (l2(d["q"]), l2(d["k"])) if norm else (d["q"], d["k"])
    return naive_recurrent_gated_delta_rule(q, k, d["v"], d["beta"] if beta is None else beta,
                                            d["g"] if g is None else g, scale=scale, initial_state=h0,
                                            output_final_state=True)


def _kda_ref(d, scale, h0, gk=None):
    return naive_recurrent_kda(d["q"], d["k"], d["v"], d["gk"] if gk is None else gk, d["beta"], scale=scale,
                               initial_state=h0, output_final_state=True)


CASES = {
    "chunk_gla": ({}, "q k v gk",
                  lambda d, **kw: ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], **kw), _gla_ref),
    "fused_recurrent_gla": ({}, "q k v gk",
                            lambda d, **kw: ops.fused_recurrent_gla(d["q"], d["k"], d["v"], gk=d["gk"], **kw),
                            _gla_ref),
    "fused_recurrent_gla.gv": ({}, "q k v gk gv",
                               lambda d, **kw: ops.fused_recurrent_gla(d["q"], d["k"], d["v"], d["gk"], d["gv"],
                                                                       **kw),
                               lambda d, scale, h0: loop_ref(d["q"], d["k"], d["v"], gk=d["gk"], gv=d["gv"],
                                                             scale=scale, h0=h0, delta=False)),
    "chunk_simple_gla": ({}, "q k v g",
                         lambda d, **kw: ops.chunk_simple_gla(d["q"], d["k"], d["v"], d["g"], **kw), _sgla_ref),
    "chunk_simple_gla.g_gamma": ({}, "q k v g_gamma",
                                 lambda d, **kw: ops.chunk_simple_gla(d["q"], d["k"], d["v"], g_gamma=d["g_gamma"],
                                                                      **kw),
                                 lambda d, scale, h0: _sgla_ref(d, scale, h0,
                                                                g=d["g_gamma"].expand(d["q"].shape[:3]))),
    "chunk_retention": ({}, "q k v",
                        lambda d, **kw: ops.chunk_retention(d["q"], d["k"], d["v"], **kw),
                        lambda d, scale, h0: _sgla_ref(d, scale, h0, g=_retention_g(*d["q"].shape[:3]))),
    "chunk_delta_rule": ({"unit_keys": True}, "q k v beta",
                         lambda d, **kw: ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"], **kw), _delta_ref),
    "chunk_delta_rule.l2norm": ({}, "q k v beta",
                                lambda d, **kw: ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"],
                                                                     use_qk_l2norm_in_kernel=True, **kw),
                                lambda d, scale, h0: _delta_ref(d, scale, h0, norm=True)),
    "fused_recurrent_delta_rule.vector_beta": ({"unit_keys": True, "beta_vec": True}, "q k v beta",
                                               lambda d, **kw: ops.fused_recurrent_delta_rule(
                                                   d["q"], d["k"], d["v"], d["beta"], **kw), _delta_ref),
    "chunk_gated_delta_rule": ({"unit_keys": True}, "q k v g beta",
                               lambda d, **kw: ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"],
                                                                          **kw), _gdn_ref),
    "chunk_gated_delta_rule.l2norm": ({}, "q k v g beta",
                                      lambda d, **kw: ops.chunk_gated_delta_rule(
                                          d["q"], d["k"], d["v"], d["g"], d["beta"], use_qk_l2norm_in_kernel=True,
                                          **kw),
                                      lambda d, scale, h0: _gdn_ref(d, scale, h0, norm=True)),
    "chunk_gated_delta_rule.gva": ({"unit_keys": True, "H": 2, "HV": 4}, "q k v g beta",
                                   lambda d, **kw: ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"],
                                                                              d["beta"], **kw),
                                   lambda d, scale, h0: _kda_ref(d, scale, h0,
                                                                 gk=d["g"][..., None].expand(*d["g"].shape, K))),
    "chunk_gated_delta_rule.gate_in_kernel": (
        {"unit_keys": True}, "q k v g beta",
        lambda d, **kw: ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"],
                                                   use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                                                   use_gate_in_kernel=True, A_log=torch.tensor([-1.0, 0.5]),
                                                   dt_bias=torch.tensor([0.3, -0.2]), **kw),
        lambda d, scale, h0: _gdn_ref(d, scale, h0, beta=2 * d["beta"].sigmoid(),
                                      g=naive_gdn_gate(d["g"], torch.tensor([-1.0, 0.5]), torch.tensor([0.3, -0.2])))),
    "fused_recurrent_gated_delta_rule.gk": ({"unit_keys": True}, "q k v gk beta",
                                            lambda d, **kw: ops.fused_recurrent_gated_delta_rule(
                                                d["q"], d["k"], d["v"], gk=d["gk"], beta=d["beta"], **kw), _kda_ref),
    "fused_recurrent_gated_delta_rule.g_gk": ({"unit_keys": True}, "q k v g gk beta",
                                              lambda d, **kw: ops.fused_recurrent_gated_delta_rule(
                                                  d["q"], d["k"], d["v"], g=d["g"], gk=d["gk"], beta=d["beta"],
                                                  **kw),
                                              lambda d, scale, h0: _kda_ref(d, scale, h0,
                                                                            gk=d["gk"] + d["g"][..., None])),
    "fused_recurrent_gated_delta_rule.gv": ({"unit_keys": True}, "q k v g gv beta",
                                            lambda d, **kw: ops.fused_recurrent_gated_delta_rule(
                                                d["q"], d["k"], d["v"], g=d["g"], gv=d["gv"], beta=d["beta"], **kw),
                                            lambda d, scale, h0: loop_ref(d["q"], d["k"], d["v"], d["beta"], g=d["g"],
                                                                          gv=d["gv"], scale=scale, h0=h0)),
}


def _leaves(d, names):
    out = {n: t.clone() for n, t in d.items()}
    for n in names.split() + ["h0"]:
        out[n].requires_grad_(True)
    return out


def _compare(case, seed, scale, with_h0, **extra):
    """Ours vs the reference: outputs, final states, then the gradients of every leaf for one
    random cotangent of both. Returns the errors."""
    opts, names, ours, ref = CASES[case]
    d = _data(seed, **opts)
    a, b = _leaves(d, names), _leaves(d, names)
    o, S = ours(a, scale=scale, initial_state=a["h0"] if with_h0 else None, output_final_state=True, **extra)
    ro, rS = ref(b, scale, b["h0"] if with_h0 else None)
    assert o.shape == ro.shape and S.shape == rS.shape
    assert o.dtype == d["q"].dtype and S.dtype == torch.float32
    errs = {"o": _err(o, ro), "S": _err(S, rS)}
    gen = torch.Generator().manual_seed(seed + 1)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    ((o * do).sum() + (S * dS).sum()).backward()
    ((ro * do).sum() + (rS * dS).sum()).backward()
    for n in names.split() + (["h0"] if with_h0 else []):
        errs["d" + n] = _err(a[n].grad, b[n].grad)
    return errs


def _assert_errs(errs):
    bad = {n: e for n, e in errs.items() if e > (FWD_TOL if n in ("o", "S") else GRAD_TOL)}
    assert not bad, errs


# ---------------------------------------------------------------------------- against fla
@pytest.mark.parametrize("scale", SCALES, ids=["scale_default", "scale_0.3"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0_none", "h0"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_fla_naive(case, with_h0, scale):
    _assert_errs(_compare(case, seed=len(case), scale=scale, with_h0=with_h0))


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_per_sequence_calls(case):
    """cu_seqlens: one packed call against one reference call per sequence, N initial and
    final states [N, H, K, V]; gradients through the packing."""
    opts, names, ours, ref = CASES[case]
    lens = [5, 1, 20, 11]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.long)
    N, TT = len(lens), sum(lens)
    d = _data(7, B=1, T=TT, **{k: v for k, v in opts.items() if k not in ("B", "T")})
    d["h0"] = torch.randn((N,) + tuple(d["h0"].shape[1:]), generator=torch.Generator().manual_seed(3))
    a, b = _leaves(d, names), _leaves(d, names)
    o, S = ours(a, initial_state=a["h0"], output_final_state=True, cu_seqlens=cu)
    assert S.shape[0] == N
    ro, rS = [], []
    for i in range(N):
        s, e = int(cu[i]), int(cu[i + 1])
        part = {n: (t[:, s:e] if t.dim() >= 3 and t.shape[1] == TT and n != "h0" else t) for n, t in b.items()}
        oi, Si = ref(part, None, b["h0"][i:i + 1])
        ro.append(oi)
        rS.append(Si)
    ro, rS = torch.cat(ro, 1), torch.cat(rS, 0)
    errs = {"o": _err(o, ro), "S": _err(S, rS)}
    gen = torch.Generator().manual_seed(11)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    ((o * do).sum() + (S * dS).sum()).backward()
    ((ro * do).sum() + (rS * dS).sum()).backward()
    for n in names.split() + ["h0"]:
        errs["d" + n] = _err(a[n].grad, b[n].grad)
    _assert_errs(errs)


def test_cu_seqlens_cpu_and_batch_check():
    d = _data(5, B=1)
    cu = torch.tensor([0, 10, T])
    o1, S1 = ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], output_final_state=True, cu_seqlens=cu)
    o2, S2 = ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], output_final_state=True, cu_seqlens=cu,
                           cu_seqlens_cpu=cu.clone())
    assert torch.equal(o1, o2) and torch.equal(S1, S2) and S1.shape == (2, H, K, V)
    d = _data(5)
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], cu_seqlens=cu)
    with pytest.raises(ValueError, match="number of initial states"):
        ops.chunk_gla(d["q"][:1], d["k"][:1], d["v"][:1], d["gk"][:1], cu_seqlens=cu, initial_state=d["h0"][:1])


def test_retention_matches_naive_retention():
    """fla's parallel-form reference of retention (head first, no state), its fixed decays."""
    d = _data(2)
    hf = lambda x: x.transpose(1, 2)
    ref = hf(naive_retention(hf(d["q"]), hf(d["k"]), hf(d["v"])))
    for fn in (ops.chunk_retention, ops.fused_recurrent_retention, ops.fused_chunk_retention):
        o, S = fn(d["q"], d["k"], d["v"])
        assert S is None and _err(o, ref) < FWD_TOL
    o, attn = ops.parallel_retention(d["q"], d["k"], d["v"])
    assert attn is None and _err(o, ref) < FWD_TOL


def test_simple_gla_chunk_and_parallel_forms():
    d = _data(4)
    ref, rS = naive_chunk_simple_gla(d["q"], d["k"], d["v"], d["g"], initial_state=d["h0"], output_final_state=True,
                                     scale=0.3)
    for fn in (ops.chunk_simple_gla, ops.fused_recurrent_simple_gla, ops.fused_chunk_simple_gla):
        o, S = fn(d["q"], d["k"], d["v"], d["g"], scale=0.3, initial_state=d["h0"], output_final_state=True)
        assert _err(o, ref) < FWD_TOL and _err(S, rS) < FWD_TOL
    o, _ = ops.parallel_simple_gla(d["q"], d["k"], d["v"], d["g"], scale=0.3)
    ref0, _ = naive_recurrent_simple_gla(d["q"], d["k"], d["v"], d["g"], scale=0.3)
    assert _err(o, ref0) < FWD_TOL
    # no gate at all: plain linear attention
    o, _ = ops.chunk_simple_gla(d["q"], d["k"], d["v"])
    ref1, _ = naive_recurrent_simple_gla(d["q"], d["k"], d["v"], torch.zeros_like(d["g"]))
    assert _err(o, ref1) < FWD_TOL
    with pytest.raises(ValueError, match="Only one of"):
        ops.chunk_simple_gla(d["q"], d["k"], d["v"], d["g"], g_gamma=d["g_gamma"])


@pytest.mark.parametrize("fn,gate", [(ops.fused_recurrent_gla, "gk"), (ops.fused_recurrent_simple_gla, "g"),
                                     (ops.fused_recurrent_retention, None)], ids=["gla", "simple_gla", "retention"])
def test_reverse(fn, gate):
    """reverse=True runs right to left from initial_state: the reference on flipped inputs."""
    d = _data(9)
    f = lambda x: x.flip(1)
    args = (d["q"], d["k"], d["v"]) + ((d[gate],) if gate else ())
    o, S = fn(*args, initial_state=d["h0"], output_final_state=True, reverse=True)
    o2, S2 = fn(*(f(x) for x in args), initial_state=d["h0"], output_final_state=True)
    assert _err(o, f(o2)) < FWD_TOL and _err(S, S2) < FWD_TOL
    if gate == "gk":
        ro, rS = naive_recurrent_gla(*(f(x) for x in args), initial_state=d["h0"], output_final_state=True)
        assert _err(o, f(ro)) < FWD_TOL and _err(S, rS) < FWD_TOL


def test_state_v_first():
    d = _data(6, unit_keys=True)
    h0t = d["h0"].transpose(-1, -2).contiguous()
    o, S = ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], initial_state=d["h0"], output_final_state=True)
    o2, S2 = ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], initial_state=h0t, output_final_state=True,
                           state_v_first=True)
    assert S2.shape == (B, H, V, K) and torch.allclose(o, o2) and torch.allclose(S, S2.transpose(-1, -2))
    o, S = ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], initial_state=d["h0"],
                                      output_final_state=True)
    with pytest.warns(DeprecationWarning):
        o2, S2 = ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], initial_state=h0t,
                                            output_final_state=True, transpose_state_layout=True)
    assert torch.allclose(o, o2) and torch.allclose(S, S2.transpose(-1, -2))


@pytest.mark.parametrize("case", ["chunk_gla", "chunk_delta_rule"])
def test_half_precision(case):
    """bf16 / fp16 inputs: outputs of their dtype, fp32 final state, the fp32 result rounded."""
    opts, names, ours, _ = CASES[case]
    d = _data(8, **opts)
    o32, S32 = ours(d, initial_state=d["h0"], output_final_state=True)
    for dt in (torch.bfloat16, torch.float16):
        low = {n: (t.to(dt) if n != "h0" else t) for n, t in d.items()}
        o, S = ours(low, initial_state=d["h0"], output_final_state=True)
        assert o.dtype == dt and S.dtype == torch.float32
        tol = 3e-2 if dt == torch.bfloat16 else 5e-3
        assert _err(o, o32) < tol and _err(S, S32) < tol


# ---------------------------------------------------------------------------- conventions
def _signature(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(inspect.unwrap(fn)).parameters.values()]


FLA_NAMES = {
    "chunk_gla": "fla.ops.gla", "fused_recurrent_gla": "fla.ops.gla",
    "chunk_simple_gla": "fla.ops.simple_gla", "fused_recurrent_simple_gla": "fla.ops.simple_gla",
    "fused_chunk_simple_gla": "fla.ops.simple_gla", "parallel_simple_gla": "fla.ops.simple_gla",
    "chunk_retention": "fla.ops.retention", "fused_recurrent_retention": "fla.ops.retention",
    "fused_chunk_retention": "fla.ops.retention", "parallel_retention": "fla.ops.retention",
    "chunk_delta_rule": "fla.ops.delta_rule", "fused_recurrent_delta_rule": "fla.ops.delta_rule",
    "chunk_gated_delta_rule": "fla.ops.gated_delta_rule", "chunk_gdn": "fla.ops.gated_delta_rule",
    "fused_recurrent_gated_delta_rule": "fla.ops.gated_delta_rule",
    "fused_recurrent_gdn": "fla.ops.gated_delta_rule",
}


@pytest.mark.parametrize("name", list(FLA_NAMES))
def test_signature_is_fla(name):
    """Same parameter names, order, kinds and defaults as fla 0.6.0's function."""
    import importlib
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(importlib.import_module(FLA_NAMES[name]), name)
    assert _signature(getattr(ops, name)) == _signature(theirs)


def test_head_first_is_refused_as_fla_does():
    d = _data(1)
    with pytest.raises(DeprecationWarning, match="head_first"):
        ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"], head_first=True)
    with pytest.raises(TypeError):
        ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], head_first=True)


def test_shape_errors():
    d = _data(1)
    with pytest.raises(ValueError, match="same shape"):
        ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"][..., :4])
    with pytest.raises(ValueError, match="initial_state"):
        ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"], initial_state=d["h0"][:, :, :3])
    with pytest.raises(ValueError, match="beta"):
        ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"][..., None].expand(B, T, H, V))
    with pytest.raises(ValueError, match="v has shape"):
        ops.chunk_delta_rule(d["q"], d["k"], torch.randn(B, T, 2 * H, V), d["beta"])


def test_delta_rule_scale_default_is_fla():
    """fla scales queries by K ** -0.5 by default (the stdlib DeltaNet cell has no query scale)."""
    d = _data(3, unit_keys=True)
    o, _ = ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"])
    o1, _ = ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"], scale=1.0)
    assert torch.allclose(o1 * K ** -0.5, o, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- kernels, cache
@pytest.mark.parametrize("call,kernel", [
    (lambda d: ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"]), "torch.chunk_diag"),
    (lambda d: ops.chunk_simple_gla(d["q"], d["k"], d["v"], d["g"]), "torch.chunk_diag"),
    (lambda d: ops.chunk_retention(d["q"], d["k"], d["v"]), "torch.chunk_diag"),
    (lambda d: ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"]), "torch.chunk_delta"),
    (lambda d: ops.chunk_delta_rule(d["q"], d["k"], d["v"], d["beta"], use_qk_l2norm_in_kernel=True),
     "torch.chunk_delta"),
    (lambda d: ops.chunk_gated_delta_rule(d["q"], d["k"], d["v"], d["g"], d["beta"], use_qk_l2norm_in_kernel=True),
     "torch.chunk_delta"),
    (lambda d: ops.fused_recurrent_gated_delta_rule(d["q"], d["k"], d["v"], gk=d["gk"], beta=d["beta"]),
     "torch.chunk_dplr"),
], ids=["gla", "simple_gla", "retention", "delta_rule", "delta_rule_l2", "gated_delta_rule", "kda"])
def test_runs_the_chunkwise_kernel(call, kernel):
    """The module behind each op is planned chunkwise on the torch backend (not a per-step loop),
    with and without gradients."""
    ops.clear_cache()
    d = _data(12)
    with torch.no_grad():
        call(d)
    d = {n: t.requires_grad_() for n, t in d.items()}
    call(d)[0].sum().backward()
    ((key, mod),) = ops.cached_modules()
    assert mod.backend_name == "torch"
    assert [c.kernel.name for c in mod.selection.stages] == [kernel]
    assert mod.ran == [kernel]


def test_module_cache():
    ops.clear_cache()
    d = _data(13)
    ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"])
    ops.chunk_gla(d["q"] * 2, d["k"], d["v"], d["gk"], initial_state=d["h0"])
    ops.chunk_gla(d["q"][:1, :5], d["k"][:1, :5], d["v"][:1, :5], d["gk"][:1, :5])   # other B, T: same module
    assert len(ops.cached_modules()) == 1
    ops.chunk_gla(d["q"], d["k"], d["v"], d["gk"], scale=0.5)                          # another scale
    ops.chunk_gla(d["q"][..., :8], d["k"][..., :8], d["v"], d["gk"][..., :8])           # another K
    ops.chunk_gla(d["q"][:, :, :1], d["k"][:, :, :1], d["v"][:, :, :1], d["gk"][:, :, :1])   # another H
    ops.chunk_gla(*(d[n].double() for n in ("q", "k", "v", "gk")))                     # another dtype
    keys = [k for k, _ in ops.cached_modules()]
    assert len(keys) == 5
    assert {k[4:8] for k in keys} == {(16, 8, 2, 0.25), (16, 8, 2, 0.5), (8, 8, 2, 8 ** -0.5), (16, 8, 1, 0.25)}


# ---------------------------------------------------------------------------- a model, swapped
class FlaNaive:
    """fla's signatures over fla's naive references (fla's chunk kernels need Triton on a GPU):
    what the model below runs against when recdsl is not swapped in."""

    @staticmethod
    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
                  cu_seqlens=None, cu_seqlens_cpu=None):
        return FlaNaive._varlen(lambda s, h: naive_recurrent_gla(_ref_scale(q[:, s], scale), k[:, s], v[:, s],
                                                                 g[:, s], initial_state=h, output_final_state=True),
                                q, initial_state, output_final_state, cu_seqlens)

    @staticmethod
    def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
        if use_qk_l2norm_in_kernel:
            q, k = l2(q), l2(k)
        hf = lambda x: x.transpose(1, 2)

        def one(s, h):
            o, S = delta_rule_recurrence(hf(_ref_scale(q[:, s], scale)), hf(k[:, s]), hf(v[:, s]), hf(beta[:, s]),
                                         initial_state=h, output_final_state=True)
            return hf(o), S
        return FlaNaive._varlen(one, q, initial_state, output_final_state, cu_seqlens)

    @staticmethod
    def _varlen(one, q, h0, output_final_state, cu_seqlens):
        if cu_seqlens is None:
            o, S = one(slice(None), h0)
        else:
            outs, finals = [], []
            for i in range(len(cu_seqlens) - 1):
                o_i, S_i = one(slice(int(cu_seqlens[i]), int(cu_seqlens[i + 1])),
                               None if h0 is None else h0[i:i + 1])
                outs.append(o_i)
                finals.append(S_i)
            o, S = torch.cat(outs, 1), torch.cat(finals, 0)
        return o, (S if output_final_state else None)


class TinyFlaModel(nn.Module):
    """A two-branch layer written the way fla users write one: projections to [B, T, H, D],
    fla's functional ops called by keyword, states carried between calls."""

    def __init__(self, api, d_model=32, heads=2, head_k=16, head_v=8):
        super().__init__()
        self.api, self.h, self.dk, self.dv = api, heads, head_k, head_v
        self.qkg = nn.Linear(d_model, 3 * heads * head_k)
        self.vb = nn.Linear(d_model, heads * head_v + heads)
        self.out = nn.Linear(heads * head_v, d_model)

    def forward(self, x, state=None, cu_seqlens=None):
        b, t, _ = x.shape
        q, k, g = self.qkg(x).view(b, t, 3, self.h, self.dk).unbind(2)
        v, beta = self.vb(x).split([self.h * self.dv, self.h], -1)
        v, beta = v.view(b, t, self.h, self.dv), beta.sigmoid()
        g = F.logsigmoid(g) / 16
        s_gla, s_delta = state if state is not None else (None, None)
        o1, s_gla = self.api.chunk_gla(q=q, k=k, v=v, g=g, initial_state=s_gla, output_final_state=True,
                                       cu_seqlens=cu_seqlens)
        o2, s_delta = self.api.chunk_delta_rule(q=q, k=k, v=v, beta=beta, initial_state=s_delta,
                                                output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                cu_seqlens=cu_seqlens)
        return self.out((o1 + o2).reshape(b, t, -1)), (s_gla, s_delta)


def test_fla_shim_has_fla_signatures():
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gla import chunk_gla
    assert _signature(FlaNaive.chunk_gla) == _signature(chunk_gla)
    assert _signature(FlaNaive.chunk_delta_rule) == _signature(chunk_delta_rule)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "cu_seqlens"])
def test_model_written_for_fla_runs_with_recdsl_swapped_in(varlen):
    torch.manual_seed(0)
    theirs = TinyFlaModel(FlaNaive)
    mine = TinyFlaModel(ops)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(1 if varlen else 2, 29, 32)
    cu = torch.tensor([0, 12, 29]) if varlen else None
    y1, st1 = theirs(x, cu_seqlens=cu)
    y2, st2 = mine(x, cu_seqlens=cu)
    y1b, _ = theirs(x, state=st1, cu_seqlens=cu)   # carry the states into a second call
    y2b, _ = mine(x, state=st2, cu_seqlens=cu)
    assert _err(y2, y1) < FWD_TOL and _err(y2b, y1b) < FWD_TOL
    for a, b in zip(st2, st1):
        assert _err(a, b) < FWD_TOL
    (y1.square().mean() + y1b.square().mean()).backward()
    (y2.square().mean() + y2b.square().mean()).backward()
    for (n, p1), p2 in zip(theirs.named_parameters(), mine.parameters()):
        assert _err(p2.grad, p1.grad) < GRAD_TOL, n


def test_stdlib_cells_against_fla():
    """The stdlib cells themselves, in fla's conventions: gated_deltanet is fla's gated delta rule
    with use_qk_l2norm_in_kernel=True and the default scale; retnet with gamma = 1 - 2^(-5-h) is
    fla's retention; deltanet is fla's delta rule with scale=1 (no query scale); kda is fla's KDA."""
    import recdsl
    d = _data(14, unit_keys=True)
    gdn = recdsl.load("gated_deltanet")(K=K, V=V, heads=H, backend="torch")
    o, st = gdn(q=d["q"], k=d["k"], v=d["v"], beta=d["beta"], g=d["g"], state={"S": d["h0"]})
    ro, rS = _gdn_ref(d, None, d["h0"], norm=True)
    assert _err(o, ro) < FWD_TOL and _err(st["S"], rS) < FWD_TOL
    ret = recdsl.load("retnet")(K=K, V=V, NH=H, backend="torch")
    with torch.no_grad():
        ret.gamma.copy_(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float)))
    o, _ = ret(q=d["q"], k=d["k"], v=d["v"])
    hf = lambda x: x.transpose(1, 2)
    assert _err(o, hf(naive_retention(hf(d["q"]), hf(d["k"]), hf(d["v"])))) < FWD_TOL
    dn = recdsl.load("deltanet")(K=K, V=V, heads=H, backend="torch")
    o, st = dn(q=d["q"], k=d["k"], v=d["v"], beta=d["beta"], state={"S": d["h0"]})
    ro, rS = _delta_ref(d, 1.0, d["h0"])
    assert _err(o, ro) < FWD_TOL and _err(st["S"], rS) < FWD_TOL
    kda = recdsl.load("kda")(K=K, V=V, heads=H, backend="torch")
    o, st = kda(q=d["q"], k=d["k"], v=d["v"], g=d["gk"], beta=d["beta"], state={"S": d["h0"]})
    ro, rS = _kda_ref(d, None, d["h0"])
    assert _err(o, ro) < FWD_TOL and _err(st["S"], rS) < FWD_TOL
