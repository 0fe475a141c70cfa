"""Printer round trips: `parse(to_source(parse(src))) == parse(src)` for every LANGUAGE.md
example, stdlib cell and example cell; and, with hypothesis, for random trees built from the
AST constructors (this is what tests the printer's parenthesisation)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recdsl import ast as A
from recdsl import RecError, parse_and_check
from recdsl.parser import parse
from recdsl.printer import to_source

from .corpus import LANGUAGE_MD, example_sources, language_examples, spec_or_stdlib, stdlib_sources

SPEC = spec_or_stdlib()


def test_corpora_are_found():
    # LANGUAGE.md holds twelve contract examples; without it the stdlib stands in (never an
    # empty, silently skipped parametrisation).
    if LANGUAGE_MD.exists():
        assert len(language_examples()) >= 12
    assert len(SPEC) >= 12
    assert len(stdlib_sources()) >= 12
    assert example_sources()


def _roundtrip(src: str, name: str):
    tree = parse(src, name)
    printed = to_source(tree)
    again = parse(printed, "printed.rec")
    assert again == tree, printed
    # The printer is a fixed point after one step, and the printed cell checks the same.
    assert to_source(again) == printed
    before = [c.summary() for c in parse_and_check(src, name)]
    after = [c.summary() for c in parse_and_check(printed, name)]
    assert before == after


@pytest.mark.parametrize("name, src", SPEC, ids=[n for n, _ in SPEC])
def test_roundtrip_language_examples(name, src):
    _roundtrip(src, name)


@pytest.mark.parametrize("name, src", stdlib_sources() + example_sources(),
                         ids=[n for n, _ in stdlib_sources() + example_sources()])
def test_roundtrip_stdlib_and_examples(name, src):
    _roundtrip(src, name)


def test_roundtrip_keeps_docstring_comments_are_dropped():
    src = '# header\ncell A(D):\n    """Doc: "quoted", back\\\\slash."""\n    input x[D]  # c\n    output x\n'
    printed = to_source(parse(src))
    assert "#" not in printed
    assert '"""Doc: "quoted", back\\\\slash."""' in printed
    assert parse(printed) == parse(src)


# --------------------------------------------------------------------------- random trees

NAMES = ["a", "b", "x", "W", "K", "h0", "T", "left", "z_1", "sigmoid", "split"]
NUM_TEXTS = ["0", "1", "2", "42", "1.5", "1.", ".5", "1e-5", "2E3", "0.25e+2"]
FUNCS = ["f", "exp", "sum", "max", "outer", "reshape", "split", "g2"]
KWNAMES = ["axis", "k", "over", "edge"]

names = st.sampled_from(NAMES)
leaves = st.one_of(
    names.map(A.Name),
    names.map(A.Primed),
    st.sampled_from(NUM_TEXTS).map(lambda t: A.Num(int(t) if t.isdigit() else float(t), t)),
    st.just(A.NoneLit()),
)


def _extend(children):
    opt = st.none() | children
    sub = children | st.builds(A.Slice, opt, opt)
    return st.one_of(
        st.builds(A.BinOp, st.sampled_from(["+", "-", "*", "/", "@", "**"]), children, children),
        st.builds(A.UnaryOp, st.sampled_from(["-", "+"]), children),
        st.builds(A.Compare, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), children, children),
        st.builds(A.Call, st.sampled_from(FUNCS), st.lists(children, max_size=3),
                  st.lists(st.builds(A.Keyword, st.sampled_from(KWNAMES), children), max_size=2)),
        st.builds(A.Index, children, st.lists(sub, min_size=1, max_size=3)),
        st.builds(A.Attr, children, st.sampled_from(["T", "left", "up", "prev"])),
        st.builds(A.ListExpr, st.lists(children, max_size=3)),
    )


exprs = st.recursive(leaves, _extend, max_leaves=14)


def _statements(depth: int):
    assign = st.builds(A.Assign, st.lists(st.one_of(names.map(A.Name), names.map(A.Primed)), min_size=1,
                                          max_size=3), exprs)
    output = st.builds(A.Output, st.none() | names, exprs)
    simple = assign | output
    if depth == 0:
        return simple
    loop = st.builds(A.For, names, st.sampled_from(["range", "f"]),
                     st.lists(exprs, max_size=2), st.lists(_statements(depth - 1), min_size=1, max_size=3))
    return simple | loop


@st.composite
def decls(draw):
    kind = draw(st.sampled_from(["input", "param", "state", "edge", "pair"]))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        init = draw(st.one_of(
            st.none(),
            st.builds(A.ValueInit, exprs),
            st.builds(lambda d, pos, kw: A.RandomInit(d, pos + kw), st.sampled_from(["normal", "uniform", "f"]),
                      st.lists(exprs, max_size=2),
                      st.lists(st.builds(A.Keyword, st.sampled_from(["mean", "std"]), exprs), max_size=2)),
        ))
        out.append(A.DeclVar(draw(names), draw(st.lists(exprs, max_size=3)), draw(st.booleans()), init))
    return A.Decl(kind, out)


docs = st.text(st.one_of(st.sampled_from(list('\n\n  \t"\'\\#ax')), st.characters(codec="utf-8",
                                                                                exclude_categories=["Cs"])),
               max_size=40).filter(lambda s: '"""' not in s)

cells = st.builds(
    A.Cell,
    st.sampled_from(["A", "MyCell", "GLA"]),
    st.lists(st.builds(A.CellArg, names, st.none() | exprs), max_size=4),
    st.none(),
    st.lists(st.one_of(st.builds(A.Heads, exprs), st.builds(A.Over, st.sampled_from(["seq", "grid2d", "dag", "x"])),
                       decls(), _statements(2)), min_size=1, max_size=6),
)

SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(exprs)
def test_random_expressions_print_and_reparse(e):
    text = to_source(e)
    tree = parse(f"cell A(D):\n    y = {text}\n")
    assert tree.cells[0].items[0].value == e, text


@SETTINGS
@given(cells)
def test_random_cells_print_and_reparse(c):
    text = to_source(c)
    (again,) = parse(text).cells
    assert again == c, text


@SETTINGS
@given(docs)
def test_random_docstrings_print_and_reparse(doc):
    # A docstring as the parser makes it (stripped, common indentation removed) survives printing.
    try:
        tree = parse(f'cell A(D):\n    """{doc}"""\n    input x[D]\n')
    except RecError:  # `""" text ending in a quote""""` is a docstring and a stray quote
        assert doc.endswith('"')
        return
    text = to_source(tree)
    assert parse(text) == tree, text
    assert parse(text).cells[0].doc == tree.cells[0].doc


@pytest.mark.parametrize("e, text", [
    (A.BinOp("-", A.Name("a"), A.BinOp("-", A.Name("b"), A.Name("c"))), "a - (b - c)"),
    (A.BinOp("-", A.BinOp("-", A.Name("a"), A.Name("b")), A.Name("c")), "a - b - c"),
    (A.BinOp("**", A.BinOp("**", A.Name("a"), A.Name("b")), A.Name("c")), "(a ** b) ** c"),
    (A.BinOp("**", A.Name("a"), A.BinOp("**", A.Name("b"), A.Name("c"))), "a ** b ** c"),
    (A.UnaryOp("-", A.BinOp("**", A.Name("x"), A.Num(2, "2"))), "-x ** 2"),
    (A.BinOp("**", A.UnaryOp("-", A.Name("x")), A.Num(2, "2")), "(-x) ** 2"),
    (A.BinOp("**", A.Name("K"), A.UnaryOp("-", A.Num(0.5, "0.5"))), "K ** -0.5"),
    (A.BinOp("*", A.BinOp("+", A.Name("a"), A.Name("b")), A.Name("c")), "(a + b) * c"),
    (A.Index(A.BinOp("*", A.Name("d"), A.Name("x")), [A.Slice(None, None), A.NoneLit()]), "(d * x)[:, None]"),
    (A.Attr(A.Num(2, "2"), "T"), "(2).T"),
    (A.BinOp("+", A.Compare("<", A.Name("a"), A.Name("b")), A.Name("c")), "(a < b) + c"),
    (A.Compare("<", A.Compare("<", A.Name("a"), A.Name("b")), A.Name("c")), "(a < b) < c"),
])
def test_minimal_parentheses(e, text):
    assert to_source(e) == text
    assert parse(f"cell A(D):\n    y = {text}\n").cells[0].items[0].value == e
