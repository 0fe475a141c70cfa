"""Checker tests: the static shapes inferred for representative expressions (matmul rules,
broadcasting, split, concat, reshape, reductions, indexing with symbolic dims), the rules the
checker enforces, and that every LANGUAGE.md example checks with the names and shapes its
text implies."""
from __future__ import annotations

import pytest

from recdsl import RecError, parse_and_check
from recdsl.types import Dim, fmt_shape

from .corpus import spec_or_stdlib

HEADER = "cell A(K, V, H, N, M, P, NH=2) where NH >= 2, K >= 2:"
DECLS = """    input q[K], k[K], v[V], x[N], y[N], u[M], g[K], s[], b4[4*H], z2[2*H], kk[NH, K], big[8]
    input W[M, N], Wt[N, M], A2[M, N], B2[N, P], S[K, V], G[K, 1], R[1, V], dual[K, 2*V], S2[K, H]
    state hs[K, V] = 0
"""


def shape_of(expr: str, extra: str = "") -> str:
    """The shape the checker infers for `expr` in a cell with the declarations above."""
    src = f"{HEADER}\n{DECLS}{extra}    out_ = {expr}\n    hs' = hs\n    output o_ = s\n"
    (cell,) = parse_and_check(src, "t.rec")
    return fmt_shape(cell.locals["out_"].shape)


def check_error(expr: str) -> RecError:
    with pytest.raises(RecError) as info:
        shape_of(expr)
    return info.value


@pytest.mark.parametrize("expr, shape", [
    # matmul: [m,n]@[n] -> [m], [n]@[n,m] -> [m], [m,n]@[n,p] -> [m,p], [n]@[n] -> []
    ("W @ x", "[M]"),
    ("x @ Wt", "[M]"),
    ("A2 @ B2", "[M, P]"),
    ("x @ y", "[]"),
    ("q @ S", "[V]"),
    ("W.T @ u", "[N]"),
    ("(W @ x) @ u", "[]"),
    # outer / dot
    ("outer(k, v)", "[K, V]"),
    ("dot(q, k)", "[]"),
    ("outer(q, S @ v)", "[K, K]"),
    # elementwise and broadcasting
    ("q + k", "[K]"),
    ("s * q", "[K]"),
    ("2 * q - 1", "[K]"),
    ("-q ** 2", "[K]"),
    ("g[:, None]", "[K, 1]"),
    ("v[None, :]", "[1, V]"),
    ("g[:, None] * S", "[K, V]"),
    ("exp(g)[:, None] * S + outer(k, v)", "[K, V]"),
    ("q[:, None] * v[None, :]", "[K, V]"),
    ("G + R", "[K, V]"),
    ("G * v", "[K, V]"),
    ("S * v", "[K, V]"),
    ("s + S", "[K, V]"),
    ("max(q, 0)", "[K]"),
    ("logaddexp(s, q)", "[K]"),
    ("clamp(S, -1, 1)", "[K, V]"),
    ("where(q > 0, q, k)", "[K]"),
    ("where(s > 0, S, 0)", "[K, V]"),
    ("sigmoid(W @ x) * tanh(u)", "[M]"),
    # split / concat / reshape
    ("concat(q, k)", "[2*K]"),
    ("concat(q, v, s * v)", "[K + 2*V]"),
    ("concat(S, S2)", "[K, H + V]"),
    ("reshape(kk, [NH * K])", "[K*NH]"),
    ("reshape(S, [V, K])", "[V, K]"),
    ("reshape(big, [2, 4])", "[2, 4]"),
    # reductions
    ("sum(S, axis=0)", "[V]"),
    ("sum(S)", "[K]"),
    ("sum(S, axis=-1)", "[K]"),
    ("mean(S, axis=1)", "[K]"),
    ("amax(q, axis=0)", "[]"),
    ("logsumexp(S, axis=None)", "[]"),
    ("norm(q)", "[]"),
    ("norm(S)", "[K]"),
    # indexing and slicing, with symbolic dims
    ("big[3]", "[]"),
    ("big[-1]", "[]"),
    ("kk[1]", "[K]"),
    ("S[0]", "[V]"),
    ("S[:, 0]", "[K]"),
    ("S[0, 0]", "[]"),
    ("z2[0:H]", "[H]"),
    ("z2[H:2*H]", "[H]"),
    ("z2[H:]", "[H]"),
    ("z2[:H]", "[H]"),
    ("z2[:]", "[2*H]"),
    ("big[2:5]", "[3]"),
    ("dual[:, V:]", "[K, V]"),
    ("dual[:, 0:V] + dual[:, V:2*V]", "[K, V]"),
    ("S[0:2]", "[2, V]"),
    ("S.T", "[V, K]"),
    ("q[None]", "[1, K]"),
    # constructors and last-axis functions
    ("eye(K)", "[K, K]"),
    ("eye(3)", "[3, 3]"),
    ("diag(q)", "[K, K]"),
    ("arange(1, N + 1)", "[N]"),
    ("arange(K)", "[K]"),
    ("l2norm(q)", "[K]"),
    ("rmsnorm(S)", "[K, V]"),
    ("s", "[]"),
    ("hs", "[K, V]"),
])
def test_inferred_shapes(expr, shape):
    assert shape_of(expr) == shape


def test_split_gives_equal_parts():
    src = f"{HEADER}\n{DECLS}    i, f, gg, o = split(b4, 4)\n    l, r = split(dual, 2)\n    hs' = hs\n    output o_ = s\n"
    (cell,) = parse_and_check(src, "t.rec")
    assert [fmt_shape(cell.locals[n].shape) for n in ("i", "f", "gg", "o")] == ["[H]"] * 4
    assert fmt_shape(cell.locals["l"].shape) == fmt_shape(cell.locals["r"].shape) == "[K, V]"


def test_comparisons_are_masks():
    src = f"{HEADER}\n{DECLS}    m = q > k\n    hs' = hs\n    output o_ = s\n"
    (cell,) = parse_and_check(src, "t.rec")
    assert cell.locals["m"].type.is_bool
    assert not parse_and_check(src.replace("q > k", "q + k"), "t.rec")[0].locals["m"].type.is_bool


def test_loop_rebinding_keeps_the_shape():
    src = f"{HEADER}\n{DECLS}    acc = hs\n    for j in range(NH):\n        kj = kk[j]\n        acc = acc + outer(kj, v)\n" \
          "    hs' = acc\n    output o_ = q @ hs'\n"
    (cell,) = parse_and_check(src, "t.rec")
    assert fmt_shape(cell.locals["acc"].shape) == "[K, V]"
    assert fmt_shape(cell.locals["kj"].shape) == "[K]"
    assert fmt_shape(cell.outputs[0].type.shape) == "[V]"


@pytest.mark.parametrize("expr, message", [
    ("q + v", "shapes [K] and [V] do not broadcast in '+'"),
    ("S + q", "shapes [K, V] and [K] do not broadcast in '+'"),
    ("W @ u", "'@' needs the inner dimensions to agree: [M, N] @ [M]"),
    ("A2 @ A2", "'@' needs the inner dimensions to agree: [M, N] @ [M, N]"),
    ("s @ q", "'@' needs vectors or matrices, got [] @ [K]"),
    ("outer(S, v)", "outer takes vectors; this argument has shape [K, V]"),
    ("dot(q, v)", "dot needs vectors of the same length: [K] and [V]"),
    ("split(b4, 3)", "cannot split an axis of size 4*H into 3 equal parts"),
    ("reshape(S, [K, K])", "cannot reshape [K, V] (K*V elements) to [K, K]"),
    ("sum(q, axis=1)", "axis 1 is out of range for a value of shape [K]"),
    ("sum(s)", "sum reduces an axis; this value is a scalar"),
    ("z2[0:3*H]", "slice end 3*H is past the axis size 2*H"),
    ("z2[H:H]", "the slice is empty (H:H)"),
    ("big[8]", "index 8 is out of range for an axis of size 8"),
    ("big[-9]", "index -9 is out of range for an axis of size 8"),
    ("S[0, 0, 0]", "too many indices for a value of shape [K, V]"),
    ("q.T", ".T transposes a matrix; this value has shape [K]"),
    ("where(q, q, k)", "the first argument of where is a mask"),
    ("concat(q, S)", "concat needs equal leading shapes: [K] and [K, V]"),
    ("z2[0:s]", "a slice bound: s is an input, not a dimension"),
    ("max(q)", "max takes 2 arguments, got 1"),
])
def test_shape_errors(expr, message):
    err = check_error(expr)
    assert err.message.startswith(message), err.message
    assert err.span is not None and err.span.line == 5


def test_dims_are_polynomials():
    H = Dim.sym("H")
    assert Dim.const(2) * H + H == Dim.const(3) * H
    assert (Dim.const(4) * H).divide(4) == H
    assert (Dim.const(4) * H).divide(3) is None
    assert str(Dim.const(4) * H + Dim.sym("D") + Dim.const(1)) == "D + 4*H + 1"
    assert (H - H).sign == 0 and H.sign == 1 and (-H).sign == -1 and (H - Dim.const(1)).sign is None


# --------------------------------------------------------------------------- rules

@pytest.mark.parametrize("src, fragment", [
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    h = x\n    output h\n", "did you mean h' = ...?"),
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    h' = x\n    h' = x\n    output h'\n", "updated twice"),
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    output x\n", "never updated"),
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    y = h'\n    h' = x\n    output y\n", "read before"),
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    h' = outer(x, x)\n    output h'\n", "has shape [D, D]"),
    ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    h' = x > 0\n    output h'\n", "mask"),
    ("cell A(D):\n    input x[D]\n    output y = x\n    output y = x\n", "a second output named y"),
    ("cell A(D):\n    input x[D]\n    input x[D]\n    output x\n", "already declared"),
    ("cell A(D):\n    input x[D]\n    output y = x\ncell A(D):\n    input x[D]\n    output x\n", "already defined"),
    ("cell A(D):\n    input x[D]\n    sigmoid = x\n    output sigmoid\n", "builtin function"),
    ("cell A(D):\n    param p[D] = x\n    input x[D]\n    output y = p\n", "unknown name x"),
    ("cell A(D):\n    input x[D]\n    param p[D] = x\n    output y = p\n", "may only use constants"),
    ("cell A(D):\n    param p[D] ~ normal(0)\n    input x[D]\n    output y = p\n", "normal takes 2 arguments"),
    ("cell A(D):\n    param p[D] ~ gauss(0, 1)\n    input x[D]\n    output y = p\n", "unknown initialiser"),
    ("cell A(D):\n    state h[D] ~ normal(0, 1)\n    input x[D]\n    h' = h\n    output h'\n", "not a random draw"),
    ("cell A(D):\n    input x[D] = 0\n    output x\n", "takes no initial value"),
    ("cell A(D):\n    input x[D]\n    for j in range(D):\n        y = x\n    output j\n", "unknown name j"),
    ("cell A(D):\n    over dag\n    input x[D]\n    state h[D] = 0\n    h' = h + x\n    output h'\n",
     "read from the incoming edges"),
    ("cell A(D):\n    over dag\n    input x[D]\n    pair t[]\n    output y = t * x\n", "inside sum_in"),
    ("cell A(D):\n    input x[D]\n    state h[D] on edge = 0\n    h' = h\n    output h'\n", "on edge"),
    ("cell A(D):\n    over grid2d\n    input x[D]\n    state h[D] = 0\n    h' = h.prev + x\n    output h'\n",
     ".prev exists only"),
    ("cell A(D):\n    input x[D]\n    heads 2.5\n    output x\n", "heads"),
    ("cell A(D):\n    input x[D]\n    output y = split(x, 1)\n", "one value"),
    ("cell A(D):\n    input x[D]\n    a, b = x\n    output a\n", "only split"),
    ("cell A(D):\n    input x[D]\n    output y = sum(x, axis=0, axis=0)\n", "'axis' is given twice"),
    ("cell A(D):\n    input x[D]\n    for j in range(0):\n        a = x\n    output x\n", "range(0) never runs"),
    ("cell A(D):\n    input x[0]\n    output x\n", "a dimension of x is 0; dimensions are positive"),
    ("cell A(D):\n    input x[D - D]\n    output x\n", "dimensions are positive"),
    ("cell A(D):\n    input x[-D]\n    output x\n", "a dimension of x is -D"),
    ("cell A(D):\n    input x[D]\n    output y = x[-1:]\n", "a slice bound is negative"),
    ("cell A(D):\n    input x[D]\n    output y = x[D:0]\n", "the slice is empty (D:0)"),
    ("cell A(D):\n    input x[2**100000000]\n    output x\n", "the exponent 100000000 is too large"),
    ("cell A(D, E, F):\n    input x[(D + E + F + 1)**40]\n    output x\n", "more than 256 terms"),
    ("cell A(D):\n    input x[2, D]\n    for j in range(3):\n        a = x[j]\n    output x\n",
     "j runs to 3 but the axis has size 2"),
    ("cell A(D):\n    input x[D]\n    output y = x[D]\n", "index D is out of range"),
])
def test_rules(src, fragment):
    with pytest.raises(RecError) as info:
        parse_and_check(src, "t.rec")
    assert fragment in str(info.value)


def test_hyper_parameters_int_is_a_dim_float_is_not():
    (c,) = parse_and_check("cell A(K, NH=2, eps=1e-5):\n    input k[NH, K]\n    output y = k * eps\n")
    assert list(c.dims) == ["K", "NH"]
    assert list(c.hypers) == ["NH", "eps"]
    with pytest.raises(RecError, match="eps is a hyper-parameter, not a dimension"):
        parse_and_check("cell A(K, eps=1e-5):\n    input k[eps]\n    output k\n")


def test_state_initialised_from_a_param():
    (c,) = parse_and_check("cell A(H):\n    input x[H]\n    param h0[H] ~ normal(0, 1)\n    state h[H] = h0\n"
                           "    h' = h + x\n    output h'\n")
    assert c.states["h"].decl.init.value.id == "h0"


# --------------------------------------------------------------------------- LANGUAGE.md contracts

def _shapes(vars_):
    return {n: fmt_shape(v.shape) for n, v in vars_.items()}


CONTRACTS = {
    "LSTM": dict(dims=["D", "H"], inputs={"x": "[D]"},
                 params={"W_ih": "[4*H, D]", "W_hh": "[4*H, H]", "b_ih": "[4*H]", "b_hh": "[4*H]"},
                 states={"h": "[H]", "c": "[H]"}, outputs=[("h", "[H]")],
                 locals={"i": "[H]", "f": "[H]", "g": "[H]", "o": "[H]"}),
    "MinGRU": dict(dims=["D", "H"], inputs={"x": "[D]"}, params={"W_z": "[H, D]", "W_h": "[H, D]"},
                   states={"h": "[H]"}, outputs=[("h", "[H]")], locals={"z": "[H]"}),
    "GLA": dict(dims=["K", "V"], hypers=["scale"], inputs={"q": "[K]", "k": "[K]", "v": "[V]", "gk": "[K]"},
                params={}, states={"S": "[K, V]"}, outputs=[("o", "[V]")]),
    "SelectiveSSM": dict(dims=["D", "N"], inputs={"x": "[D]", "dt": "[D]", "B": "[N]", "C": "[N]"},
                         params={"A_log": "[D, N]", "Dskip": "[D]"}, states={"h": "[D, N]"},
                         outputs=[("y", "[D]")], locals={"delta": "[D]"}),
    "MLSTM": dict(dims=["K", "V"], inputs={"q": "[K]", "k": "[K]", "v": "[V]", "ig": "[]", "fg": "[]"},
                  params={}, states={"C": "[K, V]", "n": "[K]", "m": "[]"}, outputs=[("h", "[V]")],
                  locals={"lf": "[]", "i": "[]", "f": "[]", "qs": "[K]"}),
    "GatedDeltaNet": dict(dims=["K", "V"], inputs={"q": "[K]", "k": "[K]", "v": "[V]", "beta": "[]", "g": "[]"},
                          params={}, states={"S": "[K, V]"}, outputs=[("o", "[V]")], locals={"kn": "[K]"}),
    "DeltaProduct": dict(dims=["K", "V", "NH"], hypers=["NH"],
                         inputs={"q": "[K]", "k": "[NH, K]", "v": "[NH, V]", "beta": "[NH]"},
                         params={}, states={"S": "[K, V]"}, outputs=[("o", "[V]")],
                         locals={"acc": "[K, V]", "kj": "[K]"}),
    "LRU": dict(dims=["D", "N"], inputs={"x": "[D]"},
                params={"nu_log": "[N]", "theta_log": "[N]", "B_re": "[N, D]", "B_im": "[N, D]",
                        "C_re": "[D, N]", "C_im": "[D, N]"},
                states={"hr": "[N]", "hi": "[N]"}, outputs=[("y", "[D]")],
                locals={"r": "[N]", "th": "[N]", "g": "[N]"}),
    "SLSTM": dict(dims=["D", "H", "NH"], heads="NH", inputs={"x": "[D]"},
                  params={"W": "[4*H, D]", "R": "[4*H, H]", "b": "[4*H]"},
                  states={"c": "[H]", "n": "[H]", "m": "[H]", "y": "[H]"}, outputs=[("y", "[H]")],
                  locals={"zi": "[H]", "lf": "[H]", "i": "[H]", "f": "[H]"}),
    "PLSTM2D": dict(dims=["K", "V"], over="grid2d", params={}, states={"Cr": "[K, V]", "Cd": "[K, V]"},
                    outputs=[("y", "[V]")],
                    inputs={"q": "[K]", "k": "[K]", "v": "[V]", **{n: "[]" for n in
                            ["s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l", "m_u", "d"]}}),
    "PLSTMGraph": dict(dims=["K", "V"], over="dag", inputs={"q": "[K]", "k": "[K]", "v": "[V]", "d": "[]"},
                       edges={"s": "[]", "m": "[]"}, pairs={"t": "[]"}, params={}, states={"C": "[K, V]"},
                       on_edge=["C"], outputs=[("y", "[V]")]),
    "TreeLSTM": dict(dims=["D", "H"], over="dag", inputs={"x": "[D]"},
                     params={"W": "[4*H, D]", "U": "[3*H, H]", "Uf": "[H, H]", "b": "[4*H]"},
                     states={"h": "[H]", "c": "[H]"}, outputs=[("h", "[H]")],
                     locals={"wi": "[H]", "ui": "[H]", "i": "[H]", "u": "[H]"}),
}


SPEC = spec_or_stdlib()


def test_every_contract_example_is_covered():
    names = set()
    for _, src in SPEC:
        names.update(c.name for c in parse_and_check(src))
    assert names == set(CONTRACTS)


@pytest.mark.parametrize("name, src", SPEC, ids=[n for n, _ in SPEC])
def test_language_examples_check_as_described(name, src):
    (cell,) = parse_and_check(src, f"{name}.rec")
    want = CONTRACTS[cell.name]
    assert list(cell.dims) == want["dims"]
    assert [n for n in cell.hypers] == want.get("hypers", [])
    assert _shapes(cell.inputs) == want["inputs"]
    assert _shapes(cell.params) == want["params"]
    assert _shapes(cell.states) == want["states"]
    assert set(cell.updates) == set(want["states"])
    assert [(o.name, fmt_shape(o.type.shape)) for o in cell.outputs] == want["outputs"]
    assert cell.over == want.get("over", "seq")
    assert _shapes(cell.edges) == want.get("edges", {})
    assert _shapes(cell.pairs) == want.get("pairs", {})
    assert [n for n, v in cell.states.items() if v.decl.on_edge] == want.get("on_edge", [])
    heads = cell.heads.id if cell.heads is not None else None
    assert heads == want.get("heads")
    for local, shape in want.get("locals", {}).items():
        assert fmt_shape(cell.locals[local].shape) == shape, local
    # Every expression node of the body got a type.
    from recdsl import ast as A
    for stmt in cell.body:
        for node in stmt.walk():
            if isinstance(node, A.Expr) and not isinstance(node, (A.Name, A.Primed, A.NoneLit, A.ListExpr)):
                assert node.ty is not None, (cell.name, node)
