"""Parser tests: every construct of the language parses to the expected AST (node types,
fields and tree shapes), and nodes carry the right source spans."""
from __future__ import annotations

import pytest

from recdsl import RecError
from recdsl import ast as A
from recdsl.parser import parse


def N(i):
    return A.Name(i)


def P(i):
    return A.Primed(i)


def num(text):
    return A.Num(int(text) if text.isdigit() else float(text), text)


def B(op, left, right):
    return A.BinOp(op, left, right)


def cell_of(src: str) -> A.Cell:
    mod = parse(src, "t.rec")
    assert len(mod.cells) == 1
    return mod.cells[0]


def items_of(body: str, header: str = "cell A(D, H):") -> list:
    """Parse statements (indented by 4) inside a cell and return its items."""
    lines = "\n".join("    " + ln if ln else ln for ln in body.split("\n"))
    return cell_of(f"{header}\n{lines}\n").items


def expr_of(text: str) -> A.Expr:
    (item,) = items_of(f"y = {text}")
    assert isinstance(item, A.Assign)
    return item.value


# --------------------------------------------------------------------------- cell header

def test_cell_dims_and_hyper_params():
    c = cell_of("cell X(D, H, k=2, eps=1e-5):\n    input x[D]\n")
    assert c.name == "X"
    assert c.args == [A.CellArg("D", None), A.CellArg("H", None), A.CellArg("k", num("2")),
                      A.CellArg("eps", num("1e-5"))]
    assert isinstance(c.args[2].default.value, int) and c.args[2].default.value == 2
    assert isinstance(c.args[3].default.value, float) and c.args[3].default.value == 1e-5


def test_cell_hyper_param_default_is_an_expression():
    c = cell_of("cell GLA(K, V, scale=K**-0.5):\n    input q[K]\n")
    assert c.args[2] == A.CellArg("scale", B("**", N("K"), A.UnaryOp("-", num("0.5"))))


def test_cell_without_args_and_trailing_comma():
    assert cell_of("cell A():\n    input x[]\n").args == []
    assert [a.name for a in cell_of("cell A(D, H,):\n    input x[]\n").args] == ["D", "H"]


def test_several_cells_in_one_file():
    mod = parse("cell A(D):\n    input x[D]\n\ncell B(H):\n    input y[H]\n")
    assert [c.name for c in mod.cells] == ["A", "B"]
    assert mod.cells[1].items == [A.Decl("input", [A.DeclVar("y", [N("H")], False, None)])]


def test_docstring_single_line():
    c = cell_of('cell A(D):\n    """Feng et al., "Were RNNs All We Needed?", 2024."""\n    input x[D]\n')
    assert c.doc == 'Feng et al., "Were RNNs All We Needed?", 2024.'
    assert c.items == [A.Decl("input", [A.DeclVar("x", [N("D")], False, None)])]


def test_docstring_multi_line_strips_common_indentation():
    c = cell_of('cell A(D):\n    """First line.\n\n    Second,\n      indented.\n    """\n    input x[D]\n')
    assert c.doc == "First line.\n\nSecond,\n  indented."


def test_no_docstring():
    assert cell_of("cell A(D):\n    input x[D]\n").doc is None


def test_comments_full_line_and_trailing():
    src = """# a comment before the cell
# and another

cell A(D):  # trailing, after the cell line
    # a full-line comment first in the body
    input x[D]   # trailing, after a declaration

    # between lines
    y = x * 2    # trailing, after a statement
    for j in range(2):  # after a for line
        # inside a for body
        y2 = x   # trailing in the body
    output y     # the end
# after the cell
"""
    c = cell_of(src)
    assert [type(i).__name__ for i in c.items] == ["Decl", "Assign", "For", "Output"]
    assert c.items[2].body == [A.Assign([N("y2")], N("x"))]


def test_hash_inside_docstring_is_text():
    c = cell_of('cell A(D):\n    """see # not a comment"""\n    input x[D]\n')
    assert c.doc == "see # not a comment"


def test_no_final_newline_and_crlf_and_tabs():
    ref = cell_of("cell A(D):\n    input x[D]\n    output x\n")
    assert cell_of("cell A(D):\n    input x[D]\n    output x") == ref
    assert cell_of("cell A(D):\r\n    input x[D]\r\n    output x\r\n") == ref
    assert cell_of("cell A(D):\n\tinput x[D]\n\toutput x\n") == ref


# --------------------------------------------------------------------------- clauses

def test_heads_clause():
    c = cell_of("cell A(D, NH):\n    heads NH\n    input x[D]\n")
    assert c.items[0] == A.Heads(N("NH"))
    assert cell_of("cell A(D):\n    heads 4\n    input x[D]\n").items[0] == A.Heads(num("4"))


@pytest.mark.parametrize("kind", ["seq", "grid2d", "dag"])
def test_over_clause(kind):
    c = cell_of(f"cell A(D):\n    over {kind}\n    input x[D]\n")
    assert c.items[0] == A.Over(kind)


def test_heads_and_over_together():
    c = cell_of("cell A(D, NH):\n    heads NH\n    over dag\n    input x[D]\n")
    assert c.items[:2] == [A.Heads(N("NH")), A.Over("dag")]


# --------------------------------------------------------------------------- declarations

def test_input_several_on_one_line():
    (d,) = items_of("input q[K], k[K], v[V]", "cell A(K, V):")
    assert d == A.Decl("input", [A.DeclVar("q", [N("K")], False, None), A.DeclVar("k", [N("K")], False, None),
                                 A.DeclVar("v", [N("V")], False, None)])


def test_scalar_and_matrix_inputs():
    (d,) = items_of("input ig[], S[K, V]", "cell A(K, V):")
    assert d.vars[0] == A.DeclVar("ig", [], False, None)
    assert d.vars[1].shape == [N("K"), N("V")]


def test_param_random_init():
    (d,) = items_of("param W[4*H, D] ~ uniform(-1/sqrt(H), 1/sqrt(H))")
    bound = B("/", num("1"), A.Call("sqrt", [N("H")], []))
    assert d == A.Decl("param", [A.DeclVar(
        "W", [B("*", num("4"), N("H")), N("D")], False,
        A.RandomInit("uniform", [B("/", A.UnaryOp("-", num("1")), A.Call("sqrt", [N("H")], [])), bound]))])


def test_param_random_init_keywords():
    (d,) = items_of("param W[H, D] ~ normal(mean=0, std=0.02)")
    assert d.vars[0].init == A.RandomInit("normal", [A.Keyword("mean", num("0")), A.Keyword("std", num("0.02"))])


def test_param_value_inits():
    b, a = items_of("param b[H] = 0\nparam A_log[D, H] = log(arange(1, H+1))")
    assert b.vars[0].init == A.ValueInit(num("0"))
    assert a.vars[0].init == A.ValueInit(A.Call("log", [A.Call("arange", [num("1"), B("+", N("H"), num("1"))], [])],
                                                []))


def test_state_decls():
    h, C = items_of("state h[H] = 0\nstate C[K, V] on edge = 0", "cell A(K, V, H):")
    assert h == A.Decl("state", [A.DeclVar("h", [N("H")], False, A.ValueInit(num("0")))])
    assert C == A.Decl("state", [A.DeclVar("C", [N("K"), N("V")], True, A.ValueInit(num("0")))])


def test_state_learned_initial_value_and_no_initialiser():
    (d,) = items_of("state h[H] = h0, c[H]")
    assert d.vars[0].init == A.ValueInit(N("h0"))
    assert d.vars[1].init is None


def test_edge_and_pair_decls():
    e, p = items_of("edge  s[], m[]\npair  t[]")
    assert e == A.Decl("edge", [A.DeclVar("s", [], False, None), A.DeclVar("m", [], False, None)])
    assert p == A.Decl("pair", [A.DeclVar("t", [], False, None)])


# --------------------------------------------------------------------------- statements

def test_assign_and_primed_update():
    a, u = items_of("z = sigmoid(x)\nh' = (1 - z) * h")
    assert a == A.Assign([N("z")], A.Call("sigmoid", [N("x")], []))
    assert u == A.Assign([P("h")], B("*", B("-", num("1"), N("z")), N("h")))


def test_tuple_unpacking_from_split():
    (s,) = items_of("i, f, g, o = split(W @ x + b, 4)")
    assert s.targets == [N("i"), N("f"), N("g"), N("o")]
    assert s.value == A.Call("split", [B("+", B("@", N("W"), N("x")), N("b")), num("4")], [])


def test_semicolon_separated_statements():
    items = items_of("r = exp(-x); th = exp(y)\ni = 1; f = 2;")
    assert [i.targets[0].id for i in items] == ["r", "th", "i", "f"]
    assert items[0].value == A.Call("exp", [A.UnaryOp("-", N("x"))], [])


def test_for_loop_with_nested_body():
    (f,) = items_of("for j in range(NH):\n    kj = k[j]\n    for i in range(2):\n        a = a + kj\n    b = a")
    assert f.var == "j" and f.func == "range" and f.args == [N("NH")]
    assert f.body[0] == A.Assign([N("kj")], A.Index(N("k"), [N("j")]))
    inner = f.body[1]
    assert isinstance(inner, A.For) and inner.args == [num("2")]
    assert inner.body == [A.Assign([N("a")], B("+", N("a"), N("kj")))]
    assert f.body[2] == A.Assign([N("b")], N("a"))


def test_for_loop_keyword_argument_is_kept():
    (f,) = items_of("for j in range(n=2):\n    a = 1")
    assert f.args == [A.Keyword("n", num("2"))]


def test_outputs_both_forms():
    a, b, c = items_of("output h'\noutput y = q @ S'\noutput x * 2")
    assert a == A.Output(None, P("h"))
    assert b == A.Output("y", B("@", N("q"), P("S")))
    assert c == A.Output(None, B("*", N("x"), num("2")))


def test_output_and_assign_share_a_line():
    items = items_of("a = x; output y = a")
    assert items == [A.Assign([N("a")], N("x")), A.Output("y", N("a"))]


# --------------------------------------------------------------------------- expressions

@pytest.mark.parametrize("text, tree", [
    ("a + b * c", B("+", N("a"), B("*", N("b"), N("c")))),
    ("a * b + c", B("+", B("*", N("a"), N("b")), N("c"))),
    ("a - b - c", B("-", B("-", N("a"), N("b")), N("c"))),
    ("a / b * c", B("*", B("/", N("a"), N("b")), N("c"))),
    ("(a + b) * c", B("*", B("+", N("a"), N("b")), N("c"))),
    ("-x ** 2", A.UnaryOp("-", B("**", N("x"), num("2")))),
    ("(-x) ** 2", B("**", A.UnaryOp("-", N("x")), num("2"))),
    ("K**-0.5", B("**", N("K"), A.UnaryOp("-", num("0.5")))),
    ("2 ** 3 ** 2", B("**", num("2"), B("**", num("3"), num("2")))),
    ("-a * b", B("*", A.UnaryOp("-", N("a")), N("b"))),
    ("a * -b", B("*", N("a"), A.UnaryOp("-", N("b")))),
    ("--a", A.UnaryOp("-", A.UnaryOp("-", N("a")))),
    ("+a", A.UnaryOp("+", N("a"))),
    ("W @ x + b", B("+", B("@", N("W"), N("x")), N("b"))),
    ("a @ b @ c", B("@", B("@", N("a"), N("b")), N("c"))),
    ("q * s @ S", B("@", B("*", N("q"), N("s")), N("S"))),
    ("a ** b[0]", B("**", N("a"), A.Index(N("b"), [num("0")]))),
    ("-x.T", A.UnaryOp("-", A.Attr(N("x"), "T"))),
    ("x > 0", A.Compare(">", N("x"), num("0"))),
    ("a + 1 <= b * 2", A.Compare("<=", B("+", N("a"), num("1")), B("*", N("b"), num("2")))),
    ("a == b", A.Compare("==", N("a"), N("b"))),
    ("a != b", A.Compare("!=", N("a"), N("b"))),
    ("a >= b", A.Compare(">=", N("a"), N("b"))),
    ("a < -b", A.Compare("<", N("a"), A.UnaryOp("-", N("b")))),
])
def test_precedence(text, tree):
    assert expr_of(text) == tree


def test_chained_comparison_is_a_syntax_error():
    with pytest.raises(RecError):
        expr_of("a < b < c")


@pytest.mark.parametrize("text, tree", [
    ("x[3]", A.Index(N("x"), [num("3")])),
    ("x[-1]", A.Index(N("x"), [A.UnaryOp("-", num("1"))])),
    ("x[a:b]", A.Index(N("x"), [A.Slice(N("a"), N("b"))])),
    ("x[0:H]", A.Index(N("x"), [A.Slice(num("0"), N("H"))])),
    ("x[H:]", A.Index(N("x"), [A.Slice(N("H"), None)])),
    ("x[:H]", A.Index(N("x"), [A.Slice(None, N("H"))])),
    ("x[:]", A.Index(N("x"), [A.Slice(None, None)])),
    ("x[:, None]", A.Index(N("x"), [A.Slice(None, None), A.NoneLit()])),
    ("B[None, :]", A.Index(N("B"), [A.NoneLit(), A.Slice(None, None)])),
    ("x[1][2]", A.Index(A.Index(N("x"), [num("1")]), [num("2")])),
    ("x[j, 2*H:3*H]", A.Index(N("x"), [N("j"), A.Slice(B("*", num("2"), N("H")), B("*", num("3"), N("H")))])),
    ("exp(gk)[:, None]", A.Index(A.Call("exp", [N("gk")], []), [A.Slice(None, None), A.NoneLit()])),
    ("(delta * x)[:, None]", A.Index(B("*", N("delta"), N("x")), [A.Slice(None, None), A.NoneLit()])),
    ("x.T", A.Attr(N("x"), "T")),
    ("s.left", A.Attr(N("s"), "left")),
    ("Cd.up", A.Attr(N("Cd"), "up")),
    ("W.T @ x", B("@", A.Attr(N("W"), "T"), N("x"))),
    ("h'", P("h")),
    ("h'[0]", A.Index(P("h"), [num("0")])),
    ("S'.T", A.Attr(P("S"), "T")),
])
def test_postfix(text, tree):
    assert expr_of(text) == tree


@pytest.mark.parametrize("text, tree", [
    ("sum(x, axis=-1)", A.Call("sum", [N("x")], [A.Keyword("axis", A.UnaryOp("-", num("1")))])),
    ("sum(x, axis=None)", A.Call("sum", [N("x")], [A.Keyword("axis", A.NoneLit())])),
    ("norm(x)", A.Call("norm", [N("x")], [])),
    ("eye(2)", A.Call("eye", [num("2")], [])),
    ("clamp(x, -1, 1)", A.Call("clamp", [N("x"), A.UnaryOp("-", num("1")), num("1")], [])),
    ("reshape(x, [d1, d2])", A.Call("reshape", [N("x"), A.ListExpr([N("d1"), N("d2")])], [])),
    ("reshape(x, [NH * K])", A.Call("reshape", [N("x"), A.ListExpr([B("*", N("NH"), N("K"))])], [])),
    ("concat(a, b, c,)", A.Call("concat", [N("a"), N("b"), N("c")], [])),
    ("where(x > 0, a, b)", A.Call("where", [A.Compare(">", N("x"), num("0")), N("a"), N("b")], [])),
    ("max(abs(dot(qs, n')), exp(-m'))",
     A.Call("max", [A.Call("abs", [A.Call("dot", [N("qs"), P("n")], [])], []),
                    A.Call("exp", [A.UnaryOp("-", P("m"))], [])], [])),
])
def test_calls(text, tree):
    assert expr_of(text) == tree


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), ("1.5", 1.5), ("1.", 1.0), (".5", 0.5), ("1e-5", 1e-5), ("2E3", 2000.0), ("1.5e+2", 150.0),
])
def test_numbers(text, value):
    n = expr_of(text)
    assert isinstance(n, A.Num) and n.value == value and type(n.value) is type(value) and n.text == text


def test_line_continuation_inside_parentheses_and_brackets():
    src = """cell A(D, H):
    y = sigmoid(W_ih @ x +
                b_ih
                + W_hh @ h)
    z = x[0:
          H]
    w = concat(a,
               b,
    )
    v = a \\
        + b
    output y
"""
    items = cell_of(src).items
    assert items[0].value == A.Call("sigmoid", [B("+", B("+", B("@", N("W_ih"), N("x")), N("b_ih")),
                                                   B("@", N("W_hh"), N("h")))], [])
    assert items[1].value == A.Index(N("x"), [A.Slice(num("0"), N("H"))])
    assert items[2].value == A.Call("concat", [N("a"), N("b")], [])
    assert items[3].value == B("+", N("a"), N("b"))
    assert isinstance(items[4], A.Output)


def test_soft_keywords_as_attribute_names_and_kwargs():
    # `on`, `edge`, `over` are only keywords where a declaration or clause expects them.
    assert expr_of("f(x, over=1)") == A.Call("f", [N("x")], [A.Keyword("over", num("1"))])


# --------------------------------------------------------------------------- spans

SPAN_SRC = """cell LSTM(D, H):
    input  x[D]
    param  W[4*H, D] ~ normal(0, 1)
    state  h[H] = 0
    z = W @ x + b
    h' = tanh(z[0:H])
    for j in range(2):
        a = x[j]
    output y = h' * 2
"""


def _pos(node):
    s = node.span
    return (s.line, s.col, s.end_line, s.end_col)


def test_spans_of_nodes():
    c = cell_of(SPAN_SRC)
    inp, par, st, z, upd, loop, out = c.items
    assert _pos(c) == (1, 1, 9, 22)
    assert c.span.file == "t.rec" and str(c.span) == "t.rec:1:1"
    assert _pos(c.args[1]) == (1, 14, 1, 15)
    assert _pos(inp) == (2, 5, 2, 16)
    assert _pos(inp.vars[0]) == (2, 12, 2, 16)
    assert _pos(par.vars[0].shape[0]) == (3, 14, 3, 17)        # 4*H
    assert _pos(par.vars[0].init) == (3, 22, 3, 36)             # ~ normal(0, 1)
    assert _pos(st) == (4, 5, 4, 20)
    assert _pos(z) == (5, 5, 5, 18)
    assert _pos(z.targets[0]) == (5, 5, 5, 6)
    assert _pos(z.value) == (5, 9, 5, 18)                        # W @ x + b
    assert _pos(z.value.left) == (5, 9, 5, 14)                   # W @ x
    assert _pos(z.value.right) == (5, 17, 5, 18)                 # b
    assert _pos(upd.targets[0]) == (6, 5, 6, 7)                  # h'
    call = upd.value
    assert _pos(call) == (6, 10, 6, 22)
    idx = call.args[0]
    assert _pos(idx) == (6, 15, 6, 21)
    assert _pos(idx.subs[0]) == (6, 17, 6, 20)                   # the slice 0:H
    assert _pos(loop) == (7, 5, 8, 17)
    assert _pos(loop.body[0]) == (8, 9, 8, 17)
    assert _pos(out) == (9, 5, 9, 22)
    assert _pos(out.value.left) == (9, 16, 9, 18)                # h'


def test_spans_of_clauses_end_on_their_own_line():
    c = cell_of("cell A(D, NH):\n    heads NH\n    over dag\n    input x[D]\n")
    assert _pos(c.items[0]) == (2, 5, 2, 13)
    assert _pos(c.items[1]) == (3, 5, 3, 13)


def test_spans_of_a_multiline_expression():
    c = cell_of("cell A(D):\n    y = (a +\n         b)\n")
    y = c.items[0]
    assert _pos(y) == (2, 5, 3, 12)                              # with the closing paren
    assert _pos(y.value) == (2, 10, 3, 11)


def test_span_source_and_file_name():
    c = parse("cell A(D):\n    input x[D]\n", "dir/cell.rec").cells[0]
    sp = c.items[0].vars[0].span
    assert sp.file == "dir/cell.rec"
    assert sp.source.line(sp.line) == "    input x[D]"


def test_equality_ignores_spans():
    a = parse("cell A(D):\n    y = a+b\n").cells[0]
    b = parse("cell A(D):\n\n    # moved\n    y   =   a   +   b\n").cells[0]
    assert a == b
    assert _pos(a.items[0]) != _pos(b.items[0])


def test_every_node_has_a_span():
    from .corpus import all_valid_sources
    for name, src in all_valid_sources():
        for node in parse(src, name).walk():
            assert node.span is not None, (name, node)
            assert node.span.line >= 1 and node.span.col >= 1
            assert (node.span.end_line, node.span.end_col) >= (node.span.line, node.span.col), (name, node)


# --------------------------------------------------------------------------- limits

def test_deep_nesting_is_a_located_error_not_a_crash():
    deep = "+".join(["x"] * 400)
    with pytest.raises(RecError) as info:
        parse(f"cell A(D):\n    input x[D]\n    output y = {deep}\n", "t.rec")
    assert "nested more than" in info.value.message
    assert (info.value.line, info.value.col) == (3, 5)
    with pytest.raises(RecError):
        parse(f"cell A(D):\n    y = {'-' * 1000}x\n")


def test_moderate_nesting_is_fine():
    expr = "+".join(["x"] * 150)
    parse(f"cell A(D):\n    y = {expr}\n    z = {'(' * 300}x{')' * 300}\n")


def test_old_mac_line_endings_are_a_located_error():
    with pytest.raises(RecError) as info:
        parse("cell A(D):\r    input x[D]\r    output x\r", "t.rec")
    err = info.value
    assert (err.line, err.col) == (1, 11)
    assert "carriage return" in err.message
    assert "\r" not in str(err) and "\x00" not in str(err)


def test_control_characters_are_not_echoed():
    with pytest.raises(RecError) as info:
        parse("cell A(D):\n    input x[D]\x00\n", "t.rec")
    assert "control character U+0000" in str(info.value)
    assert "\x00" not in str(info.value)
