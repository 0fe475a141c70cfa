"""Constraints on dimensions (`cell A(M, P) where 0 <= P <= M:`), zero-size dimensions, the
param computations inv / solve / expm, and the hints for logsumexp(a, b) and for misplaced
complex values (docs/LANGUAGE.md: *Constraints on dimensions*, *Param computations*).

Errors are asserted on their type, line:col and message/hint substrings; the numerics of
the new builtins against a hand-written float64 loop (outputs and the gradient of A), on
the reference and torch backends."""
from __future__ import annotations

import pytest

from recdsl import RecError, load, parse_and_check
from recdsl.parser import parse
from recdsl.printer import to_source
from recdsl.types import ONE, Dim, DimFacts, needed


def err(src: str) -> RecError:
    with pytest.raises(RecError) as info:
        parse_and_check(src, "t.rec")
    return info.value


def ok(src: str):
    (cell,) = parse_and_check(src, "t.rec")
    return cell


ALRNN_BODY = """    input x[M]
    param A[M] ~ uniform(0.2, 0.6)
    param W[M, M] ~ normal(0, 0.3)
    state z[M] = 0
    phi = concat(z[0:M-P], relu(z[M-P:M]))
    z' = A * z + W @ phi + x
    output z'
"""
ALRNN = "cell ALRNN(M, P) where 0 <= P <= M:\n" + ALRNN_BODY


# --------------------------------------------------------------------------- syntax

def test_where_clause_parses_prints_and_round_trips():
    src = "cell A(M, P, K) where 0 <= P <= M, K == 2 * M, P < K:\n    input x[M]\n    output x\n"
    (cell,) = parse(src).cells
    assert [k.ops for k in cell.where] == [["<=", "<="], ["=="], ["<"]]
    printed = to_source(parse(src))
    assert printed.splitlines()[0] == "cell A(M, P, K) where 0 <= P <= M, K == 2 * M, P < K:"
    assert parse(printed) == parse(src)


@pytest.mark.parametrize("head, col, message", [
    ("cell A(M, P) where P:", 21, "unexpected ':'"),
    ("cell A(M, P) where P <= M and P >= 1:", 27, "'and' does not join constraints"),
    ("cell A(M, P) where (P <= M):", 28, "unexpected ':'"),
])
def test_where_syntax_errors(head, col, message):
    e = err(head + "\n    input x[M]\n    output x\n")
    assert (e.line, e.col) == (1, col) and e.message == message and "separated by commas" in e.hint


def test_where_missing_colon_and_misspelt():
    e = err("cell A(M, P) where P <= M\n    input x[M]\n    output x\n")
    assert e.message == "missing ':' at the end of the line"
    e = err("cell A(M, P) wher P <= M:\n    input x[M]\n    output x\n")
    assert (e.line, e.col) == (1, 14) and "'where'" in e.hint


def test_where_is_still_a_function_in_expressions():
    c = ok("cell A(D) where D >= 2:\n    input x[D]\n    output y = where(x > 0, x, 0)\n")
    assert [k.text for k in c.constraints] == ["D >= 2"]


# --------------------------------------------------------------------------- the checker

def test_slice_that_could_wrap_needs_a_constraint():
    src = "cell ALRNN(M, P):\n    input x[M]\n    state z[M] = 0\n    z' = z + x\n    output y = z'[0:M-P]\n"
    e = err(src)
    assert (e.line, e.col) == (5, 21)
    assert "the slice bound M - P is negative for some sizes" in e.message
    assert "where P <= M" in e.hint and "do not wrap around" in e.hint
    c = ok(src.replace("ALRNN(M, P):", "ALRNN(M, P) where P <= M:"))
    assert str(c.outputs[0].type) == "[M - P]"


def test_alrnn_checks_and_zero_is_allowed_only_where_stated():
    c = ok(ALRNN)
    assert c.facts.low("P") == 0 and c.facts.low("M") == 1
    assert [k.text for k in c.constraints] == ["0 <= P", "P <= M"]


@pytest.mark.parametrize("where, expr, line_col, fragments", [
    ("", "x[M-P:M]", (3, 18), ["slice bound M - P is negative", "where P <= M"]),
    ("where P <= M", "x[M-P]", None, []),
    ("where 0 <= P <= M", "x[M-P]", (3, 18), ["out of range for an axis of size M for some sizes of P", "P >= 1"]),
    ("where P < M", "x[M-P-1]", None, []),
    ("", "x[0:P]", (3, 18), ["slice end P is past the axis size M for some sizes", "P <= M"]),
    ("where P <= M", "x[P:P+1]", (3, 18), ["slice end P + 1 is past", "P < M"]),
    ("", "x[P:M]", (3, 18), ["ends before it starts", "where P <= M"]),
    ("where P <= M", "x[M:P]", (3, 18), ["ends before it starts", "M <= P"]),
    ("", "x[3]", (3, 18), ["index 3 is out of range", "M >= 4"]),
    ("where M >= 4", "x[3] + x[-4]", None, []),
    ("", "x[-1]", None, []),
    ("", "x[1-M]", (3, 18), ["index -M + 1 is negative for some sizes", "where M >= 2"]),
    ("where M >= 2", "x[1-M]", None, []),
    ("", "x[P-2]", (3, 18), ["index P - 2 is negative for some sizes of P", "where P >= 2"]),
    ("", "x[-1:]", (3, 18), ["a slice bound is negative (-1)"]),
    ("where 2*P <= M", "x[P:2*P]", None, []),
    ("where K*P <= M", "x[0:K*P]", None, []),
    ("where P <= M", "x[0:M*M-P*M]", (3, 18), ["past the axis size M"]),
    ("where P <= M", "eye(M - P)", None, []),
    ("", "eye(M - P)", (3, 20), ["the size of eye is M - P, which is negative", "P <= M"]),
    ("", "arange(P, M)", (3, 16), ["arange has M - P elements", "P <= M"]),
])
def test_bounds_are_checked_under_the_constraints(where, expr, line_col, fragments):
    src = f"cell A(M, P, K) {where}:\n    input x[M]\n    output y = {expr}\n".replace(" :", ":")
    if line_col is None:
        ok(src)
        return
    e = err(src)
    assert (e.line, e.col) == line_col, str(e)
    text = e.message + "\n" + (e.hint or "")
    for f in fragments:
        assert f in text, str(e)


def test_declared_shape_and_loop_count_are_checked():
    e = err("cell A(M, P):\n    input x[M]\n    state z[M - P] = 0\n    z' = z\n    output x\n")
    assert (e.line, e.col) == (3, 13) and "which is negative for some sizes" in e.message and "P <= M" in e.hint
    e = err("cell A(M, P):\n    input x[M]\n    for j in range(M - P):\n        y = x\n    output x\n")
    assert (e.line, e.col) == (3, 20) and "loop count M - P is negative" in e.message and "P <= M" in e.hint
    ok("cell A(M, P) where P <= M:\n    input x[M]\n    acc = x\n    for j in range(M - P):\n"
       "        acc = acc * 2\n    output acc\n")
    e = err("cell A(M, K, NH):\n    input k[NH, K]\n    acc = k[0]\n    for j in range(M):\n"
            "        acc = acc + k[j]\n    output acc\n")
    assert (e.line, e.col) == (5, 23) and "j runs to M, past the axis size NH" in e.message and "M <= NH" in e.hint


def test_a_local_of_a_loop_that_may_not_run_is_not_read_after_it():
    e = err("cell A(M, P) where 0 <= P:\n    input x[M]\n    for j in range(P):\n        y = x * 2\n    output y\n")
    assert (e.line, e.col) == (5, 12) and "runs 0 times for some sizes" in e.message
    ok("cell A(M, P) where 1 <= P:\n    input x[M]\n    for j in range(P):\n        y = x * 2\n    output y\n")
    ok("cell A(M, P) where 0 <= P:\n    input x[M]\n    y = x\n    for j in range(P):\n        y = y * 2\n"
       "    output y\n")


@pytest.mark.parametrize("where, line_col, fragment", [
    ("where P != M", (1, 30), "not !="),
    ("where P < 0", (1, 30), "this constraint never holds: P < 0"),
    ("where M <= M - 1", (1, 30), "never holds"),
    ("where Q <= M", (1, 30), "unknown dimension Q"),
    ("where eps <= M", (1, 30), "eps is a hyper-parameter, not a dimension"),
    ("where x <= M", (1, 30), "unknown dimension x"),
])
def test_bad_constraints(where, line_col, fragment):
    e = err(f"cell A(M, P, eps=1e-5) {where}:\n    input x[M]\n    output x\n")
    assert (e.line, e.col) == line_col and fragment in e.message, str(e)


def test_an_equality_reads_the_dimension_as_its_expression():
    c = ok("cell A(D, H) where D == 2*H:\n    input x[D], h[H]\n    a, b = split(x, 2)\n"
           "    output y = a + b + h\n    output z = x + concat(h, h)\n")
    assert str(c.inputs["x"].type) == "[2*H]"
    e = err("cell A(D, H):\n    input x[D]\n    a, b = split(x, 2)\n    output a\n")
    assert "cannot split an axis of size D" in e.message


def test_zero_default_needs_the_clause():
    ok("cell A(M, P=0) where 0 <= P:\n    input x[M]\n    output y = x\n")
    e = err("cell A(M, P=0):\n    input x[M]\n    output y = x\n")
    assert "between 1 and" in e.message


# --------------------------------------------------------------------------- the prover

def test_dim_facts():
    M, P, K, V = (Dim.sym(n) for n in "MPKV")
    plain = DimFacts()
    assert plain.nonneg(M - ONE) and not plain.nonneg(M - P) and plain.nonneg(K * V - K)
    assert not plain.nonneg(K * V - K - V) and plain.negative(-M)
    f = DimFacts({"P": 0}, [M - P])
    assert f.nonneg(P) and not f.positive(P) and f.nonneg(M - P) and not f.nonneg(M - P - ONE)
    assert f.nonneg(M * M - P * P) and f.nonneg(M * K - P * K)
    assert needed(M - P) == "P <= M" and needed(M - P - ONE) == "P < M" and needed(P - ONE) == "P >= 1"
    assert needed(Dim.const(3) - P) == "P <= 3"


# --------------------------------------------------------------------------- instantiation

def test_broken_constraint_at_construction_names_the_clause():
    spec = load(ALRNN)
    with pytest.raises(RecError) as info:
        spec(M=4, P=5, backend="reference")
    e = info.value
    assert (e.line, e.col) == (1, 29)
    assert "the dimensions break the constraint P <= M of cell ALRNN: M = 4, P = 5" in e.message
    assert "needs P <= M" in e.hint


def test_zero_is_refused_without_the_clause():
    spec = load("cell A(M, P) where P <= M:\n" + ALRNN_BODY)
    with pytest.raises(RecError) as info:
        spec(M=4, P=0, backend="reference")
    assert "must be a positive integer, got 0" in info.value.message and "where 0 <= P" in info.value.hint


@pytest.mark.parametrize("where, given, check", [
    ("", {}, lambda d: d == {"M": 3, "P": 4, "K": 5}),
    ("where P <= M", {}, lambda d: d["P"] <= d["M"] and len(set(d.values())) == 3),
    ("where 0 <= P <= M, K > M + 2", {}, lambda d: d["P"] <= d["M"] and d["K"] > d["M"] + 2),
    ("where M == 2*P", {}, lambda d: d["M"] == 2 * d["P"]),
    ("where P < M", {"M": 2}, lambda d: d["M"] == 2 and d["P"] == 1),
    ("where P == M, K == M", {}, lambda d: d["M"] == d["P"] == d["K"]),
])
def test_analysis_dims_satisfy_the_constraints(where, given, check):
    spec = load(f"cell A(M, P, K) {where}:\n    input x[M], y[P], z[K]\n    output x\n".replace(" :", ":"))
    dims = spec.analysis_dims(**given)
    assert check(dims), dims
    spec.lower(**dims)   # and bind: the constraints hold


def test_unsatisfiable_search_is_a_located_error():
    spec = load("cell A(M, P) where M > 40:\n    input x[M]\n    output x\n")
    with pytest.raises(RecError) as info:
        spec.analysis_dims()
    assert info.value.line == 1 and "no sizes up to 32" in info.value.message
    assert spec.analysis_dims(M=41)["M"] == 41


def test_check_plans_with_dims_that_satisfy_the_clause():
    plan = load(ALRNN).plan()
    assert plan.dims["P"] <= plan.dims["M"]


# --------------------------------------------------------------------------- zero-size dims

def _hand_alrnn(layer, x, P):
    import torch
    A, W = layer.A.detach(), layer.W.detach()
    M = A.shape[0]
    z = torch.zeros(x.shape[0], M, dtype=x.dtype)
    out = []
    for t in range(x.shape[1]):
        phi = torch.cat([z[:, :M - P], torch.relu(z[:, M - P:])], -1)
        z = A * z + phi @ W.T + x[:, t]
        out.append(z)
    return torch.stack(out, 1)


@pytest.mark.parametrize("P", [0, 2, 4])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_alrnn_zero_p_is_the_linear_limit(backend, P):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    spec = load(ALRNN)
    layer = spec(M=4, P=P, backend=backend).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y, st = layer(x=x)
    want = _hand_alrnn(layer, x, P)
    assert torch.allclose(y, want, atol=1e-12) and torch.allclose(st["z"], want[:, -1], atol=1e-12)


CELLS_WITH_EMPTY_PARTS = {
    # a state that is empty for P = 0, read through a product with an empty axis
    "two": ("cell Two(M, P) where 0 <= P:\n    input x[M], u[P]\n    param a[P] ~ uniform(0.5, 0.9)\n"
            "    param W[M, P] ~ normal(0, 0.3)\n    state h[M] = 0\n    state g[P] = 0\n"
            "    g' = a * g + u\n    h' = tanh(0.9 * h + W @ g' + x)\n    output y = concat(h', g')\n",
            {"M": 3, "P": 0}),
    # a matrix state with an empty axis (chunkwise on torch for V > 0)
    "gla": ("cell GLA(K, V) where 0 <= V:\n    input q[K], k[K], v[V], gk[K]\n    state S[K, V] = 0\n"
            "    S' = exp(gk)[:, None] * S + outer(k, v)\n    output o = q @ S'\n    output n = q * 2\n",
            {"K": 4, "V": 0}),
}


@pytest.mark.parametrize("name", list(CELLS_WITH_EMPTY_PARTS))
def test_empty_states_run_on_torch_as_on_the_reference(name):
    torch = pytest.importorskip("torch")
    src, dims = CELLS_WITH_EMPTY_PARTS[name]
    spec = load(src)
    torch.manual_seed(0)
    ref = spec(backend="reference", **dims).double()
    other = spec(backend="torch", **dims).double()
    other.load_state_dict(ref.state_dict())
    xs = {n: torch.randn(2, 5, *ref.ir.shape_of(node), dtype=torch.float64, requires_grad=True)
          for n, node in ref.ir.inputs.items()}
    (o1, s1), (o2, s2) = ref(**xs), other(**xs)
    o1 = o1 if isinstance(o1, tuple) else (o1,)
    o2 = o2 if isinstance(o2, tuple) else (o2,)
    for a, b in zip(o1, o2):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    for k in s1:
        assert s1[k].shape == s2[k].shape and torch.allclose(s1[k], s2[k], atol=1e-12)
    loss = lambda outs: sum((o * o).sum() for o in outs)  # noqa: E731
    g1 = torch.autograd.grad(loss(o1), list(xs.values()), allow_unused=True)
    g2 = torch.autograd.grad(loss(o2), list(xs.values()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None) or float((a if a is not None else b).abs().max(initial=0)) == 0
        if a is not None and b is not None:
            assert torch.allclose(a, b, atol=1e-12)


def test_a_maximum_over_an_empty_axis_is_a_located_error():
    spec = load("cell A(M, P) where 0 <= P:\n    input x[M], u[P]\n    output y = x * amax(u)\n")
    spec(M=3, P=1, backend="reference")
    with pytest.raises(RecError) as info:
        spec(M=3, P=0, backend="reference")
    assert (info.value.line, info.value.col) == (3, 20) and "amax(...) over an axis of size 0 (P = 0)" in \
        info.value.message


# --------------------------------------------------------------------------- hints

@pytest.mark.parametrize("expr, line_col, message, hint", [
    ("logsumexp(a, b)", (3, 16), "logsumexp takes 1 argument, got 2", "logaddexp(a, b)"),
    ("logsumexp(a, 0)", (3, 16), "logsumexp takes 1 argument", "logsumexp(a, axis=0)"),
    ("amax(a, b)", (3, 16), "amax takes 1 argument", "max(a, b)"),
    ("logaddexp(a)", (3, 16), "logaddexp takes 2 arguments", "logsumexp(a)"),
    # complex values are in the language (tests/frontend/test_complex.py); an output is real
    ("a * 1j", (3, 16), "output y is complex; outputs are real tensors", "real(...)"),
    ("a * 2.5e-3J", (3, 16), "output y is complex", "abs(...)"),
    ("complex(a, b)", (3, 16), "output y is complex", "real(...)"),
    ("a.real", (3, 16), ".real is not an attribute", "real(a)"),
    ("angle(complex(a, b))", (3, 16), "angle(...) is not in the language", "exp(1j * theta)"),
])
def test_hints(expr, line_col, message, hint):
    e = err(f"cell A(D):\n    input a[D], b[D]\n    output y = {expr}\n")
    assert (e.line, e.col) == line_col, str(e)
    assert message in e.message and hint in e.hint, str(e)


def test_a_number_glued_to_a_name_is_still_not_a_complex_number():
    e = err("cell A(D):\n    input a[D]\n    output y = 3a\n")
    assert "'3a' is not a number" in e.message and "3*a" in e.hint


# --------------------------------------------------------------------------- inv / solve / expm

PARAM_DECLS = ("cell A(N, K):\n    input x[N]\n    param A[N, N] ~ normal(0, 0.1)\n    param B[N, K] ~ normal(0, 0.1)\n"
               "    param R[N, K] ~ normal(0, 0.1)\n    state h[N] = 0\n")


@pytest.mark.parametrize("stmts, shape", [
    ("    y = inv(A)\n", "[N, N]"),
    ("    y = expm(0.5 * A)\n", "[N, N]"),
    ("    y = solve(eye(N) - A, B)\n", "[N, K]"),
    ("    y = solve(A, A[:, 0])\n", "[N]"),
    ("    I = eye(N)\n    y = solve(I - A / 2, I + A / 2)\n", "[N, N]"),
    ("    y = inv(eye(N) * 2)\n", "[N, N]"),
])
def test_param_linalg_shapes(stmts, shape):
    c = ok(PARAM_DECLS + stmts + "    h' = h + x\n    output h'\n")
    assert str(c.locals["y"].type) == shape


@pytest.mark.parametrize("stmts, line_col, fragments", [
    ("    y = inv(A * x)\n", (7, 17), ["argument reads the input x", "hoisted param computations only"]),
    ("    z = A + outer(h, h)\n    y = expm(z)\n", (8, 14), ["reads the local z, which reads the state h"]),
    ("    y = solve(A, x)\n", (7, 18), ["reads the input x"]),
    ("    y = inv(B)\n", (7, 13), ["inv needs a square matrix [n, n]; this argument has shape [N, K]"]),
    ("    y = inv(A[0])\n", (7, 13), ["square matrix", "[N]"]),
    ("    y = solve(A, R.T)\n", (7, 18), ["solve(A, B) needs B of shape [N] or [N, k]"]),
    ("    y = inv(A > 0)\n", (7, 13), ["not a mask"]),
    ("    y = inv(A, A)\n", (7, 9), ["inv takes 1 argument", "solve(A, B)"]),
])
def test_param_linalg_errors(stmts, line_col, fragments):
    e = err(PARAM_DECLS + stmts + "    h' = h + x\n    output h'\n")
    assert (e.line, e.col) == line_col, str(e)
    for f in fragments:
        assert f in e.message + "\n" + (e.hint or ""), str(e)


LSSL = """cell LSSL(N, D):
    input u[D]
    param A[N, N] ~ normal(0, 0.3)
    param B[N, D] ~ normal(0, 0.3)
    param C[D, N] ~ normal(0, 0.3)
    param log_dt[] = -1.5
    state h[N] = 0
    dt = exp(log_dt)
    I = eye(N)
    {discretise}
    h' = A_bar @ h + B_bar @ u
    output y = C @ h'
"""
BILINEAR = "A_bar = solve(I - dt/2 * A, I + dt/2 * A)\n    B_bar = solve(I - dt/2 * A, dt * B)"
ZOH = "A_bar = expm(dt * A)\n    B_bar = solve(A, (A_bar - I) @ B)"


def _hand_lssl(A, B, C, log_dt, u, kind):
    import torch
    dt = torch.exp(log_dt)
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    if kind == "bilinear":
        A_bar = torch.linalg.inv(eye - dt / 2 * A) @ (eye + dt / 2 * A)
        B_bar = torch.linalg.inv(eye - dt / 2 * A) @ (dt * B)
    else:
        A_bar = torch.linalg.matrix_exp(dt * A)
        B_bar = torch.linalg.inv(A) @ (A_bar - eye) @ B
    h = torch.zeros(u.shape[0], A.shape[0], dtype=A.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = h @ A_bar.T + u[:, t] @ B_bar.T
        ys.append(h @ C.T)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("kind", ["bilinear", "zoh"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_lssl_discretisation_matches_a_hand_float64_loop(backend, kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    spec = load(LSSL.replace("{discretise}", BILINEAR if kind == "bilinear" else ZOH))
    layer = spec(N=4, D=3, backend=backend).double()
    u = torch.randn(2, 9, 3, dtype=torch.float64)
    y, st = layer(u=u)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    want, h_last = _hand_lssl(params["A"], params["B"], params["C"], params["log_dt"], u, kind)
    assert torch.allclose(y, want, atol=1e-12) and torch.allclose(st["h"], h_last, atol=1e-12)
    w = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum(), [layer.A, layer.B, layer.log_dt])
    ref = torch.autograd.grad((want * w).sum(), [params["A"], params["B"], params["log_dt"]])
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-10), (g - r).abs().max()


def test_param_linalg_is_computed_once_per_forward_on_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    spec = load(LSSL.replace("{discretise}", BILINEAR))
    layer = spec(N=4, D=3, backend="torch").double()
    calls = []
    real = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    for T in (5, 17):
        calls.clear()
        layer(u=torch.randn(2, T, 3, dtype=torch.float64))
        assert len(calls) == 2, (T, len(calls))    # A_bar and B_bar, whatever T
    hoisted = " ".join(layer.plan.hoisted)
    assert "A_bar" in hoisted
