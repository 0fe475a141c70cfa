"""split_concat (recdsl/analysis/concat_split.py): `W @ concat(x, h)` becomes
`W[:, 0:D] @ x + W[:, D:] @ h`, so that the x-part hoists over the whole sequence.

It fires on CfC-like cells (both operand orders, heads, three-way and nested concats, dot)
and not where it separates nothing (a concat of two state parts or of two input parts, an
operand that reads a state, a concat that is not along the contracted axis); after it the
x-part is placed at stage -1; the torch backend still matches the reference (which runs the
cell as written) in float64, outputs, final states and gradients; and no stdlib cell (none
has a concat) is changed."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import ROOT, compare_backends
from recdsl.analysis import stages as S
from recdsl.analysis.concat_split import split_concat_matmuls
from recdsl.ir import Op
from recdsl.pipeline import plan_cell
from recdsl.spec import stdlib_files

TOL = 1e-10

CFC = ROOT / "benchmarks" / "cells" / "cfc.rec"
ALRNN = ROOT / "benchmarks" / "cells" / "alrnn.rec"

MINRNN = """
cell MinRNN(D, H):
    input x[D]
    param W[H, D+H] ~ normal(0, 0.3)
    param b[H] ~ normal(0, 0.1)
    state h[H] = 0
    h' = tanh(W @ concat(x, h) + b)
    output h'
"""

LEFT = """
cell LeftRNN(D, H):
    input x[D]
    param W[D+H, H] ~ normal(0, 0.3)
    param b[H] ~ normal(0, 0.1)
    state h[H] = 0
    h' = tanh(b + concat(x, h) @ W)
    output h'
"""

# three runs (x | h | dt): the two state-free products come first
THREE = """
cell ThreeRNN(D, H):
    input x[D], dt[]
    param W[H, D+H+1] ~ normal(0, 0.3)
    param b[H] ~ normal(0, 0.1)
    state h[H] = 0
    h' = tanh(W @ concat(x, h, dt[None]) + b)
    output h'
"""

# nested: concat(x, dt[None]) is one state-free run; a named matmul (z) keeps its name
NESTED = """
cell NestedRNN(D, H):
    input x[D], dt[]
    param W[H, D+1+H] ~ normal(0, 0.3)
    param W2[H, D+1+H] ~ normal(0, 0.3)
    param b[H] ~ normal(0, 0.1)
    state h[H] = 0
    xd = concat(x, dt[None])
    z = W @ concat(xd, h)
    h' = tanh(z + b) * sigmoid(W2 @ concat(concat(x, dt[None]), h))
    output h'
"""

# AL-RNN-like: the input joins the piecewise-linear latent in one concat; plus a dot
ALRNN_LIKE = """
cell ALRNNLike(D, N, P):
    input x[D]
    param A[N+P] ~ uniform(0.5, 0.9)
    param W[N+P, D+N+P] ~ normal(0, 0.3)
    param v[D+N+P] ~ normal(0, 0.3)
    state z[N+P] = 0
    phi = concat(z[0:N], relu(z[N:N+P]))
    z' = A * z + W @ concat(x, phi) + tanh(dot(v, concat(x, phi)))
    output z'
"""

# a matrix state: concat(X, S) @ W joins along the contracted (last) axis of the left side
MATRIX = """
cell MatrixLeft(M, D, K):
    input X[M, D]
    param W[D+K, K] ~ normal(0, 0.3)
    state S[M, K] = 0
    S' = tanh(concat(X, S) @ W)
    output S'
"""

FIRING = {  # name -> (source, dims, splits expected)
    "cfc": (CFC, dict(D=3, H=4, U=5), 1),
    "minrnn": (MINRNN, dict(D=3, H=4), 1),
    "left": (LEFT, dict(D=3, H=4), 1),
    "three": (THREE, dict(D=3, H=4), 1),
    "nested": (NESTED, dict(D=3, H=4), 2),
    "alrnn_like": (ALRNN_LIKE, dict(D=3, N=4, P=2), 2),
    "matrix": (MATRIX, dict(M=3, D=4, K=5), 1),
}

NOT_FIRING = {
    "alrnn": ALRNN,   # concat(z[0:N], relu(z[N:N+P])): two state parts
    "two_states": """
cell TwoStates(H):
    input x[H]
    param W[H, 2*H] ~ normal(0, 0.3)
    state h[H] = 0
    state g[H] = 0
    h' = tanh(W @ concat(h, g) + x)
    g' = h
    output h'
""",
    "two_inputs": """
cell TwoInputs(D, H):
    input x[D], y[D]
    param W[H, 2*D] ~ normal(0, 0.3)
    state h[H] = 0
    h' = tanh(W @ concat(x, y) + h)
    output h'
""",
    "state_operand": """
cell StateOperand(D, H):
    input x[D]
    state S[H, D+H] = 0
    state h[H] = 0
    h' = tanh(S @ concat(x, h))
    S' = S + outer(h', concat(x, h))
    output h'
""",
    "columns": """
cell Columns(D, H):
    input X[H, D]
    param W[H, H] ~ normal(0, 0.3)
    state S[H, H] = 0
    Y = W @ concat(X, S)
    S' = tanh(Y[:, D:D+H])
    output S'
""",
}


def _spec(src):
    return recdsl.load(src if isinstance(src, str) else str(src))


def _lower(src, dims):
    return _spec(src).lower(**dims)


@pytest.mark.parametrize("name", list(FIRING))
def test_fires(name):
    src, dims, want = FIRING[name]
    ir = _lower(src, dims)
    out, lines = split_concat_matmuls(ir)
    assert len(lines) == want, lines
    assert out is not ir
    # no matmul (or dot) of a concat with mixed parts is left
    reads = S.state_reads(out)
    for n in out.nodes():
        if n.op in (Op.MATMUL, Op.DOT):
            for s in n.srcs:
                if s.op == Op.CONCAT:
                    kinds = {bool(reads[p.id]) for p in s.srcs}
                    assert len(kinds) == 1, lines
    # shapes of the updates and outputs are unchanged
    for k in ir.updates:
        assert out.updates[k].shape == ir.updates[k].shape
    # and the trace of the pipeline says it
    trace: dict = {}
    plan_cell(ir, verify=False, trace=trace)
    assert trace["split_concat"].startswith(f"{want} matmul(s)"), trace["split_concat"]
    assert list(trace)[0] == "split_concat"


def test_cfc_trace_text():
    trace: dict = {}
    plan_cell(_lower(CFC, dict(D=3, H=4, U=5)), verify=False, trace=trace)
    assert "W_bb @ concat(x, h) (line 16) -> W_bb[:, 0:3] @ x + W_bb[:, 3:7] @ h" in trace["split_concat"]
    assert "(W_bb[:, 0:3] @ x) + b_bb [U] (matmul over B*T" in trace["hoist"]


def test_three_way_order():
    """concat(x, h, dt[None]): three products, the two state-free ones first."""
    out, _ = split_concat_matmuls(_lower(THREE, dict(D=3, H=4)))
    mms = [n for n in out.nodes() if n.op == Op.MATMUL]
    assert [m.srcs[0].arg[1] for m in mms] == [slice(0, 3), slice(7, 8), slice(3, 7)]
    assert [m.srcs[1].op for m in mms] == [Op.INPUT, Op.INDEX, Op.STATE]


def test_nested_keeps_run_together():
    """concat(concat(x, dt[None]), h): one product for the state-free run x|dt, one for h;
    the named matmul keeps its name on the sum."""
    ir = _lower(NESTED, dict(D=3, H=4))
    out, _ = split_concat_matmuls(ir)
    mms = [n for n in out.nodes() if n.op == Op.MATMUL]
    cols = [(m.srcs[0].arg[1].start, m.srcs[0].arg[1].stop) for m in mms]
    assert sorted(cols) == [(0, 4), (0, 4), (4, 8), (4, 8)]   # W and W2: x|dt, then h
    assert any(n.op == Op.ADD and n.name == "z" for n in out.nodes())


@pytest.mark.parametrize("name", list(NOT_FIRING))
def test_does_not_fire(name):
    ir = _lower(NOT_FIRING[name], _spec(NOT_FIRING[name]).analysis_dims())
    out, lines = split_concat_matmuls(ir)
    assert lines == [] and out is ir
    trace: dict = {}
    plan_cell(ir, verify=False, trace=trace)
    assert trace["split_concat"].startswith("0 matmul(s)")


@pytest.mark.parametrize("name", ["cfc", "minrnn", "left", "three", "nested", "alrnn_like", "matrix"])
def test_hoisted_part_at_stage_minus_one(name):
    """After split + reassociate, every product of a state-free part (and the sum that adds
    the biases to it) reads no state: placed at -1, hoisted; the products of the state
    parts run in the stage."""
    src, dims, _ = FIRING[name]
    ir, _ = split_concat_matmuls(_lower(src, dims))
    ir, _ = S.reassociate(ir)
    stage_list = S.stages(ir, S.dependency_graph(ir))
    place = S.placement(ir, stage_list)
    reads = S.state_reads(ir)
    products = [n for n in ir.nodes() if n.op in (Op.MATMUL, Op.DOT)    # the pass's: by a slice of a param
                and any(s.op == Op.INDEX and s.srcs[0].op == Op.PARAM for s in n.srcs)]
    free = [n for n in products if not reads[n.id]]
    dep = [n for n in products if reads[n.id]]
    assert free and dep
    assert all(place[n.id] == -1 for n in free)
    assert all(place[n.id] == 0 for n in dep)
    hoisted = S.frontier(ir, place)
    assert any(n.op in (Op.ADD, Op.MATMUL, Op.DOT) and place[n.id] == -1 for n in hoisted)


def test_minrnn_hoists_one_expression():
    """W[:, 0:D] @ x + b is one hoisted value; only W[:, D:] @ h is added per step."""
    ir, _ = split_concat_matmuls(_lower(MINRNN, dict(D=3, H=4)))
    ir, n = S.reassociate(ir)
    assert n == 1
    stage_list = S.stages(ir, S.dependency_graph(ir))
    place = S.placement(ir, stage_list)
    top = ir.updates["h"].srcs[0]          # tanh(top)
    assert top.op == Op.ADD
    a, b = top.srcs
    assert place[a.id] == -1 and a.op == Op.ADD and {s.op for s in a.srcs} == {Op.MATMUL, Op.PARAM}
    assert place[b.id] == 0 and b.op == Op.MATMUL and b.srcs[1].op == Op.STATE


@pytest.mark.parametrize("name,heads", [("cfc", None), ("cfc", 2), ("minrnn", None), ("minrnn", 3),
                                        ("left", None), ("left", 2), ("three", None), ("three", 2),
                                        ("nested", None), ("alrnn_like", None), ("alrnn_like", 2),
                                        ("matrix", None)])
def test_torch_matches_reference(name, heads):
    src, dims, _ = FIRING[name]
    spec = _spec(src)
    errs = compare_backends(spec, dims, "torch", B=2, T=7, heads=heads)
    bound = TOL * max(1.0, errs["scale"])
    assert errs["out"] <= bound and errs["state"] <= bound and errs["grad"] <= bound, errs


def test_cfc_runs_in_the_c_loop():
    """The general C loop accepts the split stage (a matmul of a view of a param by the state)."""
    spec = _spec(CFC)
    layer = spec(backend="torch", D=3, H=4, U=5).double()
    assert layer.plan.selections["torch"].stages[0].kernel.name == "torch.c_loop"
    xs = {"x": torch.randn(2, 5, 3, dtype=torch.float64), "dt": torch.rand(2, 5, dtype=torch.float64)}
    layer(**xs)
    if layer.ran != ["torch.loop"]:   # the C toolchain is there: it ran the C
        assert layer.ran == ["torch.c_loop"]


@pytest.mark.parametrize("name", sorted(stdlib_files()))
def test_stdlib_unchanged(name):
    """No stdlib cell has a concat: the pass changes none (the same IR object, so the same plan)."""
    spec = recdsl.load(name)
    ir = spec.lower(**spec.analysis_dims())
    out, lines = split_concat_matmuls(ir)
    assert lines == [] and out is ir
