"""The general compiled loop (backends/torch/general_loop.py) computes what the reference
backend computes: outputs, final states and, in float64, the gradients of every input,
param and initial state (its reverse-time C backward), for

  * every stdlib nonlinear cell (the lane-eligible ones too) and every benchmark cell;
  * small cells written here, one per op family: every unary op, binary op and
    comparison; concat, where, clamp, a per-step scalar input, a scalar state; softmax,
    logsumexp, amax, sum, mean, norms over small axes; matrix states, matmuls and outer
    products of computed values (vector-matrix, matrix-vector, matrix-matrix), transpose,
    reshape (a view and a strided copy), index with ints, slices and None, eye, diag,
    arange; heads with per-head params; a state read by a later stage; two states swapped.

Each layer is the torch backend with every loop stage's C runner replaced by a
GeneralLoop (kernels.compiled_loop, which selection and codegen ask), and the test asserts that the loop ran. Also: the
inference path (no autograd), float32, create_graph=True (second derivatives through the
torch re-run), what the loop rejects, and the generated C (source notes on every line of a
node, no user name in it)."""
from __future__ import annotations

import re

import pytest
import torch

import recdsl
from helpers import ROOT, as_tuple, random_inputs
from recdsl.backends.torch import kernels
from recdsl.backends.torch.fused_loop import NotEligible
from recdsl.backends.torch.general_loop import GeneralLoop
from recdsl.ir import Op, toposort
from recdsl.lowering import SequentialLoop
from recdsl.torch_expr import compile_nodes

STDLIB = sorted(p.stem for p in (ROOT / "stdlib" / "nonlinear").glob("*.rec"))
BENCH = sorted((ROOT / "benchmarks" / "cells").glob("*.rec"))

CELLS = {
    "unary_zoo": ("""
cell Zoo(H):
    input x[H]
    param a[H] ~ normal(0, 0.5)
    state h[H] = 0
    u = tanh(h + x)
    p = sigmoid(u) + 0.5
    e1 = exp(u) + log(p) + log1p(p) + expm1(u) + logsigmoid(u) + softplus(u) + softplus(30 * p)
    e2 = relu(u) + silu(u) + gelu(u) + elu(u) + abs(u) + sign(u) + sqrt(p) + rsqrt(p) + sin(u) + cos(u)
    e3 = -u + p ** 1.5 + p ** u + 2 ** u + max(u, a) + min(u, a) + logaddexp(u, a) + u / p - u * p
    m = (u < a) + (u <= a) * 2 + (u > a) * 3 + (u >= a) * 4 + (u == a) + (u != a)
    e4 = exp(a) * u + sigmoid(0.5) * u
    h' = tanh(0.05 * (e1 + e2 + e3 + e4) + 0.1 * m)
    output h'
""", dict(H=5)),
    "concat_where_clamp_scalar": ("""
cell Mix(D, H):
    input x[D], s[]
    param W[H, 2*H] ~ normal(0, 0.3)
    param U[H, D] ~ normal(0, 0.3)
    state h[H] = 0
    state c[] = 0
    z = concat(h, tanh(U @ x) * c)
    a = W @ z
    g = where(a > 0, a, 0.1 * a)
    h' = clamp(g * s + c + 0.3 * s, -0.5, 0.7)
    c' = mean(h') + 0.5 * tanh(c) + 0.2 * s
    output h'
""", dict(D=3, H=4)),
    "softmax_reductions_matrix_state": ("""
cell Attend(K, V):
    input q[K], k[K], v[V]
    state M[K, V] = 0
    state z[K] = 0
    s = softmax(M @ v + q)
    r = s @ M
    lse = logsumexp(M, axis=0)
    mx = amax(M, axis=1)
    M' = 0.9 * M + outer(k, tanh(v - r)) + 0.01 * lse[None, :] - 0.01 * mx[:, None]
    z' = l2norm(z + k * mean(r)) + rmsnorm(z) * 0.1 + layernorm(z + k) * 0.1 + norm(z) * 0.01
    output o = q @ M' + sum(z')
""", dict(K=3, V=4)),
    "structure": ("""
cell Struct(H):
    input x[H], s[]
    param P[H, H] ~ normal(0, 0.3)
    state h[H] = 0
    state A[H, H] = 0
    c = concat(h, x)
    r = reshape(c, [2, H])
    m = (A @ A.T) * 0.1 + diag(h) + eye(H) * s
    f = reshape(A.T, [H * H])
    h' = tanh(r[0] * r[1, :] + m @ x + dot(h, x) + h[0] + h[-1] + arange(0, H) * 0.01 + mean(f * f) + sum(A, axis=None))
    A' = tanh(A * 0.5 + outer(h', x) + P)
    output h'
""", dict(H=3)),
    "heads_per_head_params": ("""
cell HeadMix(D, H, NH):
    heads NH
    input x[D]
    param W[H, D] ~ normal(0, 0.3)
    param R[H, H] ~ normal(0, 0.3)
    param u[H] ~ normal(0, 0.3)
    state h[H] = 0
    state S[H, H] = 0
    h' = tanh(W @ x + R @ h + S @ h * 0.1 + u * h)
    S' = 0.5 * S + outer(h', h)
    output h'
""", dict(D=3, H=4, NH=2)),
    "state_of_an_earlier_stage": ("""
cell Two(H):
    input x[H]
    state a[H] = 0
    state h[H] = 0
    a' = 0.9 * a + x
    h' = tanh(h * a' + a + x)
    output h'
""", dict(H=4)),
    "swapped_states": ("""
cell Swap(H):
    input x[H]
    state a[H] = 0
    state b[H] = 0
    a' = b
    b' = tanh(a + x)
    output b'
""", dict(H=4)),
}


@pytest.fixture
def general(monkeypatch):
    """Every loop stage of the torch layers built in the test runs a GeneralLoop. Returns
    the log of its runs: (states, grad mode on)."""
    runs = []

    def general(ir, states, core, readouts=()):
        return GeneralLoop(ir, list(states), list(core), readouts=list(readouts))

    run = GeneralLoop.run

    def logged(self, *args):
        runs.append((tuple(self.states), torch.is_grad_enabled()))
        return run(self, *args)
    monkeypatch.setattr(kernels, "compiled_loop", general)
    monkeypatch.setattr(GeneralLoop, "run", logged)
    return runs


def _layers(src, dims, heads, dtype):
    spec = recdsl.load(src)
    ref = spec(backend="reference", heads=heads, **dims).to(dtype)
    fast = spec(backend="torch", heads=heads, **dims).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return spec, ref, fast


def _loop_stages(layer) -> list[tuple[str, ...]]:
    return [tuple(c.form.states) for c in layer.selection.stages if isinstance(c.form, SequentialLoop)]


def compare(src, dims, runs, heads=None, B=2, T=9, dtype=torch.float64, grads=True, seed=0):
    """The largest errors of outputs, final states and gradients (inputs, params, initial
    states) of the GeneralLoop layer against the reference, relative to max(1, |reference|)."""
    spec, ref, fast = _layers(src, dims, heads, dtype)
    xs = random_inputs(spec, ref, B, T, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    st = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in ref.initial_state(B, dtype).items()}
    leaves = list(xs.values()) + list(st.values())
    for t in leaves:
        t.requires_grad_(grads)
    o1, s1 = ref(**xs, state=st)
    runs.clear()
    o2, s2 = fast(**xs, state=st)
    mode = torch.is_grad_enabled()
    assert runs and sorted(runs) == sorted((s, mode) for s in _loop_stages(fast)), runs
    o1, o2 = as_tuple(o1), as_tuple(o2)
    rel = lambda a, b: float((a - b).abs().max() / max(1.0, float(a.abs().max())))  # noqa: E731
    errs = {"out": max(rel(a.detach(), b.detach()) for a, b in zip(o1, o2)),
            "state": max(rel(s1[k].detach(), s2[k].detach()) for k in s1)}
    if grads:
        w = [torch.randn(a.shape, dtype=dtype, generator=g) for a in o1]
        ws = {k: torch.randn(v.shape, dtype=dtype, generator=g) for k, v in s1.items()}

        def loss(o, s):
            return sum((a * c).sum() for a, c in zip(o, w)) + sum((s[k] * ws[k]).sum() for k in s)
        wrt1, wrt2 = leaves + list(ref.parameters()), leaves + list(fast.parameters())
        g1 = torch.autograd.grad(loss(o1, s1), wrt1, allow_unused=True)
        g2 = torch.autograd.grad(loss(o2, s2), wrt2, allow_unused=True)
        assert [a is None for a in g1] == [b is None for b in g2]
        errs["grad"] = max(rel(a, b) for a, b in zip(g1, g2) if a is not None)
    return errs


def _ok(errs, tol=1e-9):
    return all(v <= (tol * 10 if k == "grad" else tol) for k, v in errs.items())


@pytest.mark.parametrize("name", STDLIB)
def test_stdlib_nonlinear_cells(name, general):
    spec = recdsl.load(name)
    for T in (1, 9):
        errs = compare(name, spec.analysis_dims(), general, T=T)
        assert _ok(errs), (T, errs)


@pytest.mark.parametrize("path", BENCH, ids=[p.stem for p in BENCH])
def test_benchmark_cells(path, general):
    errs = compare(path, recdsl.load(path).analysis_dims(), general, T=11)
    assert _ok(errs), errs


@pytest.mark.parametrize("name", sorted(CELLS))
def test_op_families(name, general):
    src, dims = CELLS[name]
    errs = compare(src, dims, general, heads=dims.get("NH") if "heads NH" in src else None, T=7)
    assert _ok(errs), errs


@pytest.mark.parametrize("cell", ["lstm", "slstm", str(ROOT / "benchmarks" / "cells" / "yaad.rec")])
def test_heads(cell, general):
    """heads=3: per-head params (the rows of one head read its slice) and a head axis on every sequence."""
    spec = recdsl.load(cell)
    dims = spec.analysis_dims()
    dims = {**dims, "NH": 3} if "NH" in dims else dims
    errs = compare(cell, dims, general, heads=3, T=5)
    assert _ok(errs), errs


@pytest.mark.parametrize("name", ["lstm", "structure", "softmax_reductions_matrix_state"])
def test_inference_path_and_float32(name, general):
    """Without autograd the forward C call runs alone (keeping only the state sequences the
    forward reads); float32 outputs and gradients agree within float32 tolerance."""
    src, dims = CELLS.get(name, (name, None))
    dims = dims or recdsl.load(src).analysis_dims()
    with torch.no_grad():
        errs = compare(src, dims, general, grads=False)
        assert _ok(errs), errs
        errs = compare(src, dims, general, grads=False, dtype=torch.float32, T=30)
        assert errs["out"] < 1e-4 and errs["state"] < 1e-4, errs
    errs = compare(src, dims, general, dtype=torch.float32, T=30)   # the float32 C backward
    assert max(errs.values()) < 1e-4, errs


def test_double_backward(general):
    """create_graph=True: the backward re-runs the stage as a torch loop, so the gradient of
    a gradient penalty matches the reference's."""
    src, dims = CELLS["concat_where_clamp_scalar"]
    spec, ref, fast = _layers(src, dims, None, torch.float64)
    xs = random_inputs(spec, ref, 2, 6, torch.float64, seed=3)
    got = []
    for layer in (ref, fast):
        x = {k: v.clone().requires_grad_() for k, v in xs.items()}
        o, s = layer(**x)
        first = torch.autograd.grad(o.pow(2).sum() + sum(v.pow(2).sum() for v in s.values()), list(x.values()),
                                    create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        got.append(torch.autograd.grad(penalty, list(x.values()) + list(layer.parameters())))
    assert general and all(grad for _, grad in general)
    for a, b in zip(*got):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["yaad", "lstm", "structure", "concat_where_clamp_scalar"])
@pytest.mark.parametrize("heads", [None, 2])
def test_readouts(name, heads):
    """Outputs computed inside the loop (readouts=): no state sequence is kept, the outputs
    and their gradients are the reference's. The loop runs straight from the layer's plan;
    its whole-sequence inputs are computed from the layer's inputs by the IR."""
    src, dims = CELLS.get(name, (str(ROOT / "benchmarks" / "cells" / "yaad.rec") if name == "yaad" else name, None))
    dims = dims or recdsl.load(src).analysis_dims()
    spec, ref, fast = _layers(src, dims, heads, torch.float64)
    ir = fast.compiled.plan.ir   # the IR the plan was made on (the analysis rewrites the layer's)
    (stage,) = [c.form for c in fast.selection.stages if isinstance(c.form, SequentialLoop)]
    gl = GeneralLoop(ir, list(stage.states), list(stage.core), readouts=list(ir.outputs.values()))
    gl.keep = set()
    xs = random_inputs(spec, ref, 2, 6, torch.float64, seed=4)
    st = {k: v + 0.1 for k, v in ref.initial_state(2, torch.float64).items()}
    for t in list(xs.values()) + list(st.values()):
        t.requires_grad_()
    nb = 2 if heads else 1
    P0 = dict(fast.named_parameters())
    hoisted = compile_nodes(gl.seqs, list(ir.inputs.values()) + list(ir.params.values()))
    pre = [p[(None,) * (nb + 1 - (1 if heads else 0))] for p in P0.values()]   # [heads, ...] -> prefix [1, 1, heads]
    seq_values = hoisted([xs[n.arg] for n in ir.inputs.values()] + pre, nb + 1, torch.float64, "cpu")
    assert gl.usable(torch.float64)
    seqs, finals = gl.run(seq_values, P0, st, next(iter(xs.values())), nb + 1, torch.float64)
    assert set(seqs) == set(range(len(ir.outputs)))   # no state sequence: only the readouts, by position
    o1, s1 = ref(**xs, state=st)
    o2 = tuple(seqs[i] for i in range(len(ir.outputs)))
    o1 = as_tuple(o1)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=1e-10) for a, b in zip(o1, o2))
    assert all(torch.allclose(s1[k], finals[k], atol=1e-12, rtol=1e-10) for k in s1)
    wrt1 = list(xs.values()) + list(st.values()) + list(ref.parameters())
    wrt2 = list(xs.values()) + list(st.values()) + list(fast.parameters())
    loss = lambda o, s: sum(a.sin().sum() for a in o) + sum(v.cos().sum() for v in s.values())  # noqa: E731
    g1 = torch.autograd.grad(loss(o1, s1), wrt1, allow_unused=True)
    g2 = torch.autograd.grad(loss(o2, finals), wrt2, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-10, rtol=1e-9))


def _core(ir):
    """Every computed node the updates read, and the states (what a loop stage's core holds)."""
    return [n for n in toposort(list(ir.updates.values())) if n.op not in (Op.INPUT, Op.PARAM, Op.CONST, Op.EYE)]


@pytest.mark.parametrize("cell,why", [("TreeLSTM", "sum_in"), ("PLSTM2D", "neighbour")])
def test_rejects_grids_and_dags(cell, why, examples):
    spec = recdsl.load(examples[cell])
    ir = spec.lower(**{k: 2 for k in spec.analysis_dims()})
    with pytest.raises(NotEligible, match=why):
        GeneralLoop(ir, list(ir.states), _core(ir))


def _loops(src, dims):
    """GeneralLoops built straight from a layer's plan, as the torch backend selects them."""
    layer = recdsl.load(src)(backend="torch", **dims)
    return [GeneralLoop(layer.compiled.plan.ir, list(c.form.states), list(c.form.core)) for c in layer.selection.stages
            if isinstance(c.form, SequentialLoop)]


def test_user_names_like_the_c_names(general):
    """No user name reaches the C (its values are numbered): a cell whose names are the C's
    own (v0, g1, acc, in0, sp0, w) computes the reference's numbers."""
    src = """
cell Names(H):
    input x[H], w[]
    param acc[H] ~ normal(0, 0.5)
    state v0[H] = 0
    state g1[H] = 0
    in0 = tanh(v0 * acc + x)
    sp0 = softmax(in0 + g1) * w
    v0' = in0 + sp0
    g1' = amax(outer(sp0, v0), axis=0)
    output v0'
"""
    errs = compare(src, dict(H=4), general)
    assert _ok(errs), errs


def test_generated_c():
    """Each C line that computes a value names the .rec line it came from; the loop's
    leaves are the params and whole-sequence values the core reads; no user name is in the C."""
    src = """
cell Quokka(D, H):
    input xylophone[D], zebra[]
    param Wombat[H, D] ~ normal(0, 0.5)
    param Numbat[H, H] ~ normal(0, 0.5)
    state koala[H] = 0
    state emu[H, H] = 0
    platypus = softmax(Numbat @ koala + Wombat @ xylophone)
    koala' = tanh(emu @ platypus) * zebra
    emu' = 0.5 * emu + outer(platypus, koala)
    output koala'
"""
    (gl,) = _loops(src, dict(D=3, H=4))
    assert gl.states == ["koala", "emu"] and [n.arg for n in gl.params] == ["Numbat"]
    assert any(n.name == "zebra" for n in gl.seqs) and all(n.op != Op.PARAM for n in gl.seqs)
    assert gl.keep == {"koala", "emu"}
    computes = [line for line in gl.source.splitlines() if re.search(r"\w\[[^\]]*\] \+?= ", line)]
    assert len(computes) > 20 and all(re.search(r"/\* \S+:\d+ \*/$", line) for line in computes), computes
    assert not gl.usable(torch.float16) and not gl.usable(torch.bfloat16)
    lowered = gl.source.lower()
    assert not any(name.lower() in lowered for name in ("quokka", "xylophone", "zebra", "wombat", "numbat",
                                                        "koala", "emu", "platypus"))
