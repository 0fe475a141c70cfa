"""stdlib/matrix (matrix state, diagonal decay): load + classes, reference vs torch, and an
oracle per cell: fla-core's naive kernels (GLA, simple GLA for SSD / lightning attention /
RetNet, linear attention, RWKV-6, HGRN2 through GLA, GSA, retention), mlstm-kernels
(mLSTM, chunkwise and parallel), or the closed (parallel, attention-like) forms written
here from the papers (LightNet, Aaren)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.lowering import ChunkDiag, ElementScan
from recdsl import plan as PL

from .common import (B, T, ORACLE, P, check_backends, check_loads, close, family_cells, fla_naive, require, rn,
                     run_both)

EXPECTED = {
    "linear_attention": {"S": PL.DIAGONAL, "z": PL.DIAGONAL},
    "linear_attention_nonorm": {"S": PL.DIAGONAL},
    "retnet": {"S": PL.DIAGONAL},
    "gla": {"S": PL.DIAGONAL},
    "mamba2": {"h": PL.DIAGONAL},
    "mlstm": {"m": PL.SEMIRING, "C": PL.DIAGONAL, "n": PL.DIAGONAL},
    "hgrn2": {"S": PL.DIAGONAL},
    "rwkv6": {"S": PL.DIAGONAL},
    "lightning_attention": {"S": PL.DIAGONAL},
    "gsa": {"Hk": PL.DIAGONAL, "Hv": PL.DIAGONAL},
    "lightnet": {"z": PL.SEMIRING, "S": PL.DIAGONAL},
    "aaren": {"m": PL.SEMIRING, "num": PL.DIAGONAL, "den": PL.DIAGONAL},
}
DECAY = {"linear_attention": "identity", "linear_attention_nonorm": "identity", "retnet": "scalar", "gla": "vector",
         "mamba2": "scalar", "hgrn2": "vector", "rwkv6": "vector", "lightning_attention": "scalar",
         "gsa": "vector", "lightnet": "vector", "mlstm": "scalar", "aaren": "scalar"}
SEMIRING = {"mlstm": ("m", "max-plus"), "aaren": ("m", "max-plus"), "lightnet": ("z", "log-sum-exp")}


def test_family_is_complete():
    assert set(family_cells("matrix")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    plan = check_loads(name, EXPECTED[name])
    main = [s for s in plan.stages if s.cls == PL.DIAGONAL]
    assert main and all(s.decay == DECAY[name] for s in main), [(s.states, s.decay) for s in main]
    if name in SEMIRING:
        st, kind = SEMIRING[name]
        assert plan.stage_of(st).detail.startswith(kind)
        assert all(f"given {st}" in s.detail for s in main)
    for s in main:  # a matrix state built from outer products with a non-identity decay: chunkwise
        if len(s.states) == 1 and s.decay in ("scalar", "vector") and name != "aaren":
            if name == "mlstm" and s.states == ["n"]:
                continue
            choice = plan.selections["torch"].choice(s.index)
            if (name, s.states) == ("gsa", ["Hk"]):   # its decay is on the value (slot) axis: no chunk form yet
                assert isinstance(choice.form, ElementScan) and "value axis" in choice.passed[0].reason
            else:
                assert isinstance(choice.form, ChunkDiag), name


def test_readout_kinds():
    kinds = {n: {o.name: o.kind for o in recdsl.load(n).plan().outputs} for n in EXPECTED}
    for n in ("linear_attention_nonorm", "retnet", "gla", "mamba2", "hgrn2", "rwkv6", "lightning_attention",
              "lightnet"):
        assert set(kinds[n].values()) == {"linear readout"}, n
    for n in ("linear_attention", "mlstm", "gsa", "aaren"):   # a division / softmax after the read
        assert set(kinds[n].values()) == {"epilogue"}, n


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    check_backends(name)


# ---------------------------------------------------------------------------- oracles

def _layers(name, **dims):
    """Oracle comparisons run on both backends."""
    return run_both(name, **dims)


def _cmp(name, layers, xs, want, states, tol, fn=lambda o, s: (o, s)):
    for layer in layers:
        out, st = fn(*layer(**xs))
        close(out, want, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in states.items():
            close(st[k], v, tol, f"{name} {k} ({layer.backend_name})", name)


def test_gla_matches_fla_naive_recurrent_gla():
    ORACLE["gla"] = "fla naive_recurrent_gla (fp32)"
    naive = fla_naive("gla.naive", "naive_recurrent_gla")
    K, V = 3, 4
    layers = _layers("gla", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    gk = F.logsigmoid(rn(B, T, K, seed=4) + 2)
    S0 = rn(B, K, V, seed=5)
    h = lambda a: a[:, :, None]  # noqa: E731  one head, fla layout [B, T, H, ...]
    o, S = naive(h(q), h(k), h(v), h(gk), initial_state=S0[:, None], output_final_state=True)
    _cmp("gla", layers, dict(q=q, k=k, v=v, gk=gk, state={"S": S0}), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_linear_attention_matches_fla_naive_linear_attn():
    """fla normalises by (scale q . cumsum k) + 1e-10: recdsl's eps is set to 1e-10/scale."""
    ORACLE["linear_attention"] = "fla naive_recurrent_linear_attn(normalize=True) (fp32)"
    naive = fla_naive("linear_attn.naive", "naive_recurrent_linear_attn")
    K, V = 3, 4
    ref, fast = run_both("linear_attention", K=K, V=V, eps=1e-10 / K ** -0.5)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    h = lambda a: a[:, :, None]  # noqa: E731
    o, (S, z) = naive(h(fq), h(fk), h(v), normalize=True, output_final_state=True)
    _cmp("linear_attention", (ref, fast), dict(q=q, k=k, v=v), o[:, :, 0], {"S": S[:, 0], "z": z[:, 0, 0]}, 1e-5)


def test_linear_attention_nonorm_matches_fla_naive_linear_attn():
    ORACLE["linear_attention_nonorm"] = "fla naive_recurrent_linear_attn (fp32)"
    naive = fla_naive("linear_attn.naive", "naive_recurrent_linear_attn")
    K, V = 3, 4
    layers = _layers("linear_attention_nonorm", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    S0 = rn(B, K, V, seed=5)
    h = lambda a: a[:, :, None]  # noqa: E731
    o, S = naive(h(q), h(k), h(v), initial_state=S0[:, None].float(), output_final_state=True)
    _cmp("linear_attention_nonorm", layers, dict(q=q, k=k, v=v, state={"S": S0}), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_retnet_matches_fla_naive_retention_and_simple_gla():
    ORACLE["retnet"] = "fla naive_retention, naive_recurrent_simple_gla (fp32)"
    retention = fla_naive("retention.naive", "naive_retention")
    sgla = fla_naive("simple_gla.naive", "naive_recurrent_simple_gla")
    K, V, NH = 3, 4, 3
    layers = _layers("retnet", K=K, V=V, NH=NH)
    gam = 1 - 2.0 ** (-5.0 - torch.arange(NH, dtype=torch.float64))      # the paper's (and fla's) decays
    with torch.no_grad():
        for layer in layers:
            layer.gamma.copy_(gam)
    q, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    want = retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    o2, S = sgla(q, k, v, torch.log(gam).expand(B, T, NH).contiguous(), output_final_state=True)
    _cmp("retnet", layers, dict(q=q, k=k, v=v), want, {}, 1e-5)
    _cmp("retnet", layers, dict(q=q, k=k, v=v), o2, {"S": S}, 1e-5)


def test_mamba2_matches_fla_naive_simple_gla():
    """SSD as scalar-decay linear attention (Dao & Gu 2024, Sec. 3): q = C, k = B, v = delta x,
    log decay -delta exp(A_log); fla's state is [N, P], recdsl's h [P, N]."""
    ORACLE["mamba2"] = "fla naive_recurrent_simple_gla (fp32)"
    sgla = fla_naive("simple_gla.naive", "naive_recurrent_simple_gla")
    Pd, N, NH = 3, 4, 2
    layers = _layers("mamba2", P=Pd, N=N, NH=NH)
    vals = {"A_log": [-0.5, 0.7], "dt_bias": [0.3, -0.4], "Dskip": [0.5, -1.5]}
    with torch.no_grad():
        for layer in layers:
            for n, val in vals.items():
                getattr(layer, n).copy_(torch.tensor(val, dtype=torch.float64))
    x, dt = rn(B, T, NH, Pd, seed=1), rn(B, T, NH, seed=2)
    Bm, Cm = rn(B, T, NH, N, seed=3), rn(B, T, NH, N, seed=4)
    delta = F.softplus(dt + torch.tensor(vals["dt_bias"], dtype=torch.float64))
    g = -delta * torch.exp(torch.tensor(vals["A_log"], dtype=torch.float64))
    o, S = sgla(Cm, Bm, x * delta[..., None], g, scale=1.0, output_final_state=True)
    y = o + torch.tensor(vals["Dskip"], dtype=torch.float64)[:, None] * x
    _cmp("mamba2", layers, dict(x=x, dt=dt, B=Bm, C=Cm), y, {"h": S.transpose(-1, -2)}, 1e-5)


def test_mlstm_matches_mlstm_kernels():
    """mlstm-kernels' chunkwise and parallel native kernels (eps = 0): outputs, and the final
    states up to the stabiliser (C exp(m), n exp(m) agree; m itself is chunk-dependent)."""
    ORACLE["mlstm"] = "mlstm-kernels chunkwise--native_autograd, parallel--native_autograd"
    mk = require("mlstm_kernels.torch")
    K, V = 3, 4
    layers = _layers("mlstm", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    ig, fg = rn(B, T, seed=4, scale=2.0), rn(B, T, seed=5, scale=2.0) + 2
    h = lambda a: a[:, None]  # noqa: E731   [B, NH=1, T, ...]
    chunk = mk.get_mlstm_kernel("chunkwise--native_autograd")
    par = mk.get_mlstm_kernel("parallel--native_autograd")
    hc, (C, n, m) = chunk(h(q), h(k), h(v), h(ig), h(fg), return_last_states=True, chunk_size=4, eps=0.0)
    hp = par(h(q), h(k), h(v), h(ig), h(fg), eps=0.0)
    for layer in layers:
        out, st = layer(q=q, k=k, v=v, ig=ig, fg=fg)
        close(out, hc[:, 0], 1e-9, "mLSTM vs chunkwise", "mlstm")
        close(out, hp[:, 0], 1e-9, "mLSTM vs parallel", "mlstm")
        em, em_ref = torch.exp(st["m"]), torch.exp(m[:, 0, 0])
        close(st["C"] * em[:, None, None], C[:, 0] * em_ref[:, None, None], 1e-9, "mLSTM C exp(m)", "mlstm")
        close(st["n"] * em[:, None], n[:, 0] * em_ref[:, None], 1e-9, "mLSTM n exp(m)", "mlstm")


def test_hgrn2_matches_fla_naive_gla():
    """HGRN2 = GLA with k = 1 - f and log decay log f (Qin et al. 2024, Sec. 3); fla scales q
    by K**-0.5, so q is fed multiplied by sqrt(K)."""
    ORACLE["hgrn2"] = "fla naive_recurrent_gla (fp32)"
    naive = fla_naive("gla.naive", "naive_recurrent_gla")
    K, V, lb = 3, 4, 0.3
    layers = _layers("hgrn2", K=K, V=V, lower_bound=lb)
    q, fg, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    f = lb + (1 - lb) * torch.sigmoid(fg)
    h = lambda a: a[:, :, None]  # noqa: E731
    o, S = naive(h(q * K ** 0.5), h(1 - f), h(v), h(torch.log(f)), output_final_state=True)
    _cmp("hgrn2", layers, dict(q=q, fg=fg, v=v), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_rwkv6_matches_fla_naive_recurrent_rwkv6():
    ORACLE["rwkv6"] = "fla naive_recurrent_rwkv6 (fp32)"
    naive = fla_naive("rwkv6.recurrent_naive", "naive_recurrent_rwkv6")
    K, V, NH = 3, 4, 2
    layers = _layers("rwkv6", K=K, V=V, NH=NH)
    r, k, v, w = (rn(B, T, NH, d, seed=s) for s, d in ((1, K), (2, K), (3, V), (4, K)))
    tr = lambda a: a.transpose(1, 2)  # noqa: E731   fla: [B, H, T, ...]; its w is the log decay
    o, S = naive(tr(r), tr(k), tr(v), tr(-torch.exp(w)), P(layers[0], "u"), scale=1.0, output_final_state=True)
    _cmp("rwkv6", layers, dict(r=r, k=k, v=v, w=w), tr(o), {"S": S}, 1e-5)


def test_lightning_attention_matches_fla_naive_simple_gla():
    ORACLE["lightning_attention"] = "fla naive_recurrent_simple_gla (fp32)"
    sgla = fla_naive("simple_gla.naive", "naive_recurrent_simple_gla")
    K, V, NH = 3, 4, 2
    layers = _layers("lightning_attention", K=K, V=V, NH=NH)
    slope = torch.tensor([2.0 ** -1, 2.0 ** -4], dtype=torch.float64)     # ALiBi-like slopes 2^(-8h/NH)
    with torch.no_grad():
        for layer in layers:
            layer.slope.copy_(slope)
    q, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    o, S = sgla(q, k, v, (-slope).expand(B, T, NH).contiguous(), scale=1.0, output_final_state=True)
    _cmp("lightning_attention", layers, dict(q=q, k=k, v=v), o, {"S": S}, 1e-5)


def test_gsa_matches_fla_naive_recurrent_gsa():
    ORACLE["gsa"] = "fla naive_recurrent_gsa (fp32)"
    naive = fla_naive("gsa.naive", "naive_recurrent_gsa")
    K, V, M = 3, 4, 5
    layers = _layers("gsa", K=K, V=V, M=M)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    g = F.logsigmoid(rn(B, T, M, seed=4) + 1)
    s = 1 - torch.exp(g)
    h = lambda a: a[:, :, None]  # noqa: E731
    o, (Hk, Hv) = naive(h(q), h(k), h(v), h(s), h(g), output_final_state=True)
    _cmp("gsa", layers, dict(q=q, k=k, v=v, s=s, g=g), o[:, :, 0], {"Hk": Hk[:, 0], "Hv": Hv[:, 0]}, 1e-5)


def test_lightnet_matches_its_parallel_form():
    """LightNet (Qin et al. 2024): per key channel a softmax over the prefix,
    S_t = sum_{j<=t} softmax_j(k_{<=t}) v_j^T, o_t = q_t S_t, written here without any recurrence."""
    ORACLE["lightnet"] = "parallel (softmax-over-prefix) form (Qin et al. 2024)"
    K, V = 3, 4
    layers = _layers("lightnet", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2, scale=2.0), rn(B, T, V, seed=3)
    outs, S = [], None
    for t in range(T):
        w = torch.softmax(k[:, :t + 1], dim=1)                      # [B, t+1, K], per channel over the prefix
        S = torch.einsum("bjk,bjv->bkv", w, v[:, :t + 1])
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    _cmp("lightnet", layers, dict(q=q, k=k, v=v), torch.stack(outs, 1),
         {"S": S, "z": torch.logsumexp(k, dim=1)}, 1e-10)


def test_aaren_matches_softmax_attention_over_the_prefix():
    ORACLE["aaren"] = "softmax attention over the prefix (Feng et al. 2024)"
    D, V = 3, 4
    layers = _layers("aaren", D=D, V=V)
    k, v = rn(B, T, D, seed=1, scale=1.5), rn(B, T, V, seed=2)
    s = k @ P(layers[0], "q")
    want = torch.stack([torch.einsum("bj,bjv->bv", torch.softmax(s[:, :i + 1], 1), v[:, :i + 1]) for i in range(T)], 1)
    m = s.max(1).values
    _cmp("aaren", layers, dict(k=k, v=v), want,
         {"m": m, "den": torch.exp(s - m[:, None]).sum(1), "num": torch.einsum("bj,bjv->bv", torch.exp(s - m[:, None]), v)},
         1e-10)
