"""Value ranges (recdsl.analysis.ranges): interval rules on the usual spellings of gates
and decays, log forms checked numerically (exp(log_form(a)) == a in float64), transition
warnings on growing decays and none on any decay of the stdlib."""
from __future__ import annotations

import math

import pytest
import torch

import recdsl
from recdsl import plan as P
from recdsl.analysis import analyze
from recdsl.analysis.ranges import (Range, decay_range, describe, log_form, ranges, transition_warning,
                                    value_range)
from recdsl.analysis.symbolic import max_err, random_leaves
from recdsl.ir import Node, Op
from recdsl.torch_expr import compile_nodes

VALUE = """cell T(K, c=8.0, lower_bound=0.0, rate=0.9) where K >= 3:
    input z[K], u[K], x[K], g[K], k[K]
    param gamma[] = 0.9
    param w[K] ~ uniform(-1.0, 2.0)
    param W[K, K] ~ normal(0, 1)
    param A_log[K] = log(arange(1, K + 1))
    state h[K] = 0
    h' = h + x
    output o = {expr}
"""

GROW = """cell G(K):
    input z[K], x[K], g[K]
    param gamma[] = {gamma}
    state h[K] = 0
    h' = {decay} * h + x
    output o = h'
"""

LONGHORN_SHARE = "outer(sigmoid(u) / (1 + sigmoid(u) * dot(k, k)), k * k)"


def value(expr: str):
    """`expr` as an IR node, in a cell with inputs z, u, x, g, k [K=4], params gamma = 0.9,
    w ~ uniform(-1, 2), W ~ normal, A_log = log(arange(1, 5)) and hypers c, lower_bound, rate."""
    ir = recdsl.load(VALUE.format(expr=expr)).lower(K=4)
    return ir.outputs["o"], ir


def decay_of(src: str):
    """The decay of the first stage of a cell, and the (analysed) IR it belongs to."""
    s = recdsl.load(src)
    plan = analyze(s.lower(**s.analysis_dims()), verify=False)
    return plan.stages[0].nodes["a"], plan.ir


@pytest.mark.parametrize("expr, text", [
    ("sigmoid(z)", "(0, 1)"),
    ("exp(-softplus(z))", "(0, 1)"),
    ("lower_bound + (1 - lower_bound) * sigmoid(z)", "(0, 1)"),
    ("sigmoid(z) ** (1 / c)", "(0, 1)"),
    ("1 - sigmoid(z)", "(0, 1)"),
    ("exp(z)", "(0, inf)"),
    ("tanh(z)", "(-1, 1)"),
    ("logsigmoid(z)", "(-inf, 0)"),
    ("softplus(z)", "(0, inf)"),
    ("relu(z)", "[0, inf)"),
    ("abs(z) + 1", "[1, inf)"),
    ("sqrt(z * z)", "[0, inf)"),
    ("z ** 2", "[0, inf)"),
    ("log(1 + exp(z))", "(0, inf)"),
    ("log1p(sigmoid(z))", "(0, 0.6931)"),
    ("expm1(-softplus(z))", "(-1, 0)"),
    ("-sigmoid(z)", "(-1, 0)"),
    ("sigmoid(z) / 0.5", "(0, 2)"),
    ("z / sigmoid(u)", "(-inf, inf)"),
    ("z / (z - 1)", "(-inf, inf)"),
    ("max(sigmoid(z), 0.5)", "[0.5, 1)"),
    ("min(sigmoid(z), tanh(u))", "(-1, 1)"),
    ("clamp(z, -2, 3)", "[-2, 3]"),
    ("where(z > 0, sigmoid(u), 2.0)", "(0, 2]"),
    ("concat(sigmoid(z), tanh(u))", "(-1, 1)"),
    ("sigmoid(z)[1:3]", "(0, 1)"),
    ("sigmoid(z)[:, None]", "(0, 1)"),
    ("sum(sigmoid(z))", "(0, 4)"),
    ("dot(z, z)", "[0, inf)"),
    ("dot(sigmoid(z), sigmoid(u))", "(0, 4)"),
    ("rate", "[0.9, 0.9]"),
    ("sin(z) * cos(u)", "[-1, 1]"),
    # relations interval arithmetic alone loses
    ("exp(z - max(z, u))", "(0, 1]"),
    ("exp(z - logaddexp(z, u))", "(0, 1)"),
    ("sigmoid(z) / (sigmoid(z) + sigmoid(u))", "(0, 1)"),
    ("sigmoid(z) * (k * k) / (1 + sigmoid(z) * dot(k, k))", "[0, 1)"),
    ("k * k / (1 + sum(k * k))", "[0, 1)"),
    ("1 - " + LONGHORN_SHARE, "(0, 1]"),
    # ... and what they must not claim: a share of another sum, factors at other places
    ("sigmoid(z) / (sigmoid(u) + sigmoid(u))", "(0, inf)"),
    ("outer(sigmoid(z), 1 / (0.1 + sigmoid(z)))", "(0, 10)"),
    ("z * z / (1 + dot(u, u))", "[0, inf)"),
])
def test_range(expr, text):
    node, ir = value(expr)
    r = value_range(node, ir)
    assert str(r) == text
    assert r.proven and ranges(ir)[node.id] == r


@pytest.mark.parametrize("expr, at_init, always", [
    ("gamma", "[0.9, 0.9] at initialisation", "(-inf, inf)"),
    ("w", "[-1, 2] at initialisation", "(-inf, inf)"),
    ("exp(-gamma)", "[0.4066, 0.4066] at initialisation", "(0, inf)"),
    ("exp(A_log)", "[1, 4] at initialisation", "(0, inf)"),
    ("sigmoid(w)", "[0.2689, 0.8808] at initialisation", "(0, 1)"),
])
def test_param_ranges_hold_at_initialisation_only(expr, at_init, always):
    node, ir = value(expr)
    r = value_range(node, ir)
    assert str(r) == at_init and not r.proven and not r.positive
    assert str(value_range(node, ir, at_init=False)) == always


def test_normal_param_is_unbounded_and_so_proven():
    node, ir = value("W @ x")
    r = value_range(node, ir)
    assert str(r) == "(-inf, inf)" and r.proven


def test_helpers():
    sig = value_range(*value("sigmoid(z)"))
    assert sig.positive and sig.nonnegative and sig.magnitude_le_one
    gamma = value_range(*value("gamma"))
    assert gamma.within(-1, 1) and not gamma.magnitude_le_one and not gamma.positive
    assert not value_range(*value("relu(z)")).positive
    assert Range(0.0, math.inf, False, False).hi_open  # an infinite bound is never attained
    assert str(Range(-0.0, 0.0, False, False)) == "[0, 0]"


def test_products_that_reuse_each_other_stay_cheap():
    # 60 products, each of the two before it: unfolded, a tree of ~1e12 factors
    src = """cell F(K):
    input z[K], u[K], x[K]
    state h[K] = 0
    a = sigmoid(z)
    b = sigmoid(u)
    for j in range(60):
        c = a * b
        a = b
        b = c
    h' = b / (a + b) * h + x
    output o = h'
"""
    a, ir = decay_of(src)
    assert str(value_range(a, ir)) == "(0, 1)"
    assert log_form(a, ir).op == Op.SUB


# --------------------------------------------------------------------------- log_form

def _check_log_form(a: Node, g: Node, ir) -> None:
    """exp(g) == a in float64 on random positive leaves."""
    leaves = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
    fn = compile_nodes([a, g], leaves)
    got_a, got_g = fn(random_leaves(leaves, ir.shape_of, seed=1), 1, torch.float64, "cpu")
    a_t, g_t = torch.as_tensor(got_a, dtype=torch.float64), torch.as_tensor(got_g, dtype=torch.float64)
    assert max_err(torch.exp(g_t), a_t) < 1e-12


@pytest.mark.parametrize("expr, op", [
    ("0.9", Op.CONST),
    ("rate", Op.CONST),
    ("exp(z)", Op.INPUT),
    ("exp(-softplus(z))", Op.NEG),
    ("exp(-gamma)", Op.NEG),
    ("sigmoid(z)", Op.LOGSIGMOID),
    ("1 - sigmoid(z)", Op.LOGSIGMOID),
    ("sigmoid(z) ** (1 / c)", Op.MUL),
    ("sigmoid(z) ** (c * sigmoid(u))", Op.MUL),
    ("sigmoid(z) * exp(u)", Op.ADD),
    ("0.5 * sigmoid(z) * exp(-softplus(u))", Op.ADD),
    ("sigmoid(z) / (sigmoid(z) + sigmoid(u))", Op.SUB),
    ("exp(g)[:, None]", Op.INDEX),
    ("lower_bound + (1 - lower_bound) * sigmoid(z)", Op.LOGSIGMOID),
    ("1 - " + LONGHORN_SHARE, Op.LOG1P),
    ("0.25 + 0.75 * sigmoid(z)", Op.LOG),
    ("exp(A_log)", Op.PARAM),
])
def test_log_form(expr, op):
    a, ir = value(expr)
    g = log_form(a, ir)
    assert g is not None and g.op == op and tuple(g.shape) == tuple(a.shape)
    if a.op == Op.CONST:
        assert math.isclose(math.exp(g.arg), a.arg)
    else:
        _check_log_form(a, g, ir)


def test_log_form_of_a_constant_vector():
    a, ir = value("arange(1, 5)")
    g = log_form(a, ir)
    assert g.op == Op.CONST and g.arg == tuple(math.log(v) for v in (1, 2, 3, 4))


@pytest.mark.parametrize("expr", ["gamma", "w", "z", "sigmoid(z) - 0.5", "relu(z)", "0.0"])
def test_no_log_form_without_proven_positivity(expr):
    assert log_form(*value(expr)) is None


# --------------------------------------------------------------------------- warnings

@pytest.mark.parametrize("decay, gamma, line", [
    ("(1 + sigmoid(z))", 0.9, 5),
    ("2 * sigmoid(z)", 0.9, 5),
    ("(z * gamma)", 0.9, 5),
    ("exp(g - softplus(z))", 0.9, 5),  # g is a log gate only directly under exp
    ("gamma", 1.5, 3),  # a param's decay: where its initial value is declared
])
def test_warning_on_a_decay_that_can_exceed_one(decay, gamma, line):
    a, ir = decay_of(GROW.format(decay=decay, gamma=gamma))
    w = transition_warning(a, ir, "h")
    assert w is not None and w.startswith("h ") and f"line {line}" in w


@pytest.mark.parametrize("decay", ["sigmoid(z)", "gamma", "exp(g)", "exp(-softplus(z))", "(-tanh(z))"])
def test_no_warning_within_one(decay):
    a, ir = decay_of(GROW.format(decay=decay, gamma=0.9))
    assert transition_warning(a, ir, "h") is None


def test_log_gate_convention_is_an_assumption():
    a, ir = decay_of(GROW.format(decay="exp(g)", gamma=0.9))
    r = decay_range(a, ir)
    assert str(r) == "(0, 1]" and r.proven and len(r.assumes) == 1
    assert str(value_range(a, ir)) == "(0, inf)"  # the plain range knows nothing of it
    assert describe(a, ir).startswith("(0, 1]")


def test_describe_param_decay():
    a, ir = decay_of(GROW.format(decay="gamma", gamma=0.9))
    assert describe(a, ir).startswith("[0.9, 0.9] at initialisation")


def _sequence_stdlib():
    return [name for name, path in recdsl.spec.stdlib_files().items()
            if recdsl.spec.load_all(path)[0].cell.over == "seq"]


@pytest.mark.parametrize("name", _sequence_stdlib())
def test_stdlib_decays_stay_within_one(name):
    """No stdlib decay can exceed 1 in magnitude, and each log form found is exact. (A
    semiring stage's `a` is an offset in log space, not a decay: not checked here.)"""
    s = recdsl.load(name)
    plan = analyze(s.lower(**s.analysis_dims()), verify=False)
    for st in plan.stages:
        if st.cls not in (P.DIAGONAL, P.LOW_RANK):
            continue
        for key in ("a", "decay"):
            a = st.nodes.get(key)
            if not isinstance(a, Node):
                continue
            assert transition_warning(a, plan.ir, st.states[0]) is None
            g = log_form(a, plan.ir)
            if g is not None:
                _check_log_form(a, g, plan.ir)
