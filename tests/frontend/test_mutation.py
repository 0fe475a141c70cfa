"""Mutation fuzzing of the frontend: a valid cell with tokens or lines deleted, duplicated,
swapped, or random characters inserted is either accepted or rejected with a RecError --
never any other exception (a crash of the parser, the builder or the checker is a bug).

The default run is bounded (a few hundred examples, well under a minute); the `slow`
variant runs many more."""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recdsl import RecError, parse_and_check
from recdsl.parser import parse
from recdsl.printer import to_source

from .corpus import all_valid_sources

SOURCES = [src for _, src in all_valid_sources()]

# Characters worth inserting: the language's punctuation, quotes, tabs, primes, brackets,
# line breaks, and non-ASCII letters and symbols.
JUNK = list("()[]{}:;,.=~+-*/@<>!'\"\\#\t \n\r\f_0123456789eE") + ["**", "'''", '"""', "λ", "→", "é", "\u00a0",
                                                                  "\u200b", "𝑥", "\x00", "None", "on", "edge",
                                                                  "cell", "for", "output", "state", "lambda",
                                                                  "__import__", "1.2.3", "3x", "1e", "sum_in"]

# Names with a meaning: builtins, neighbour attributes, declaration words.
NAMES = ["split", "concat", "reshape", "outer", "dot", "eye", "diag", "arange", "where", "sum", "amax", "max",
         "l2norm", "T", "left", "up", "prev", "heads", "over", "dag", "grid2d", "seq", "pair", "param", "input",
         "range", "normal", "uniform", "axis", "0", "1", "-1", "2", "0.5", "[:, None]", "[None, :]", "[0:2]"]

TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*'?|\d+\.?\d*(?:[eE][+-]?\d+)?|\*\*|\"\"\"|[^\sA-Za-z0-9_]|\n[ \t]*")


def _tokens(src: str) -> list[tuple[int, int]]:
    return [m.span() for m in TOKEN_RE.finditer(src)]


@st.composite
def mutated(draw, max_mutations: int = 4) -> str:
    src = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(["del_tok", "dup_tok", "swap_tok", "del_line", "dup_line", "swap_line",
                                     "insert", "replace_tok", "copy_tok", "indent"]))
        toks = _tokens(src)
        lines = src.split("\n")
        if kind.endswith("_tok") and toks:
            i = draw(st.integers(0, len(toks) - 1))
            a, b = toks[i]
            if kind == "del_tok":
                src = src[:a] + src[b:]
            elif kind == "dup_tok":
                src = src[:b] + src[a:b] + src[b:]
            elif kind == "replace_tok":
                src = src[:a] + draw(st.sampled_from(JUNK + NAMES)) + src[b:]
            elif kind == "copy_tok":  # another token of the same file: a well-formed but wrong program
                c, d = toks[draw(st.integers(0, len(toks) - 1))]
                src = src[:a] + src[c:d] + src[b:]
            else:
                j = draw(st.integers(0, len(toks) - 1))
                (a, b), (c, d) = sorted([toks[i], toks[j]])
                if b <= c:
                    src = src[:a] + src[c:d] + src[b:c] + src[a:b] + src[d:]
        elif kind.endswith("_line") and lines:
            i = draw(st.integers(0, len(lines) - 1))
            if kind == "del_line":
                del lines[i]
            elif kind == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            src = "\n".join(lines)
        elif kind == "indent" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", "        ", ""])) + lines[i].lstrip(
                " " if draw(st.booleans()) else "")
            src = "\n".join(lines)
        else:
            pos = draw(st.integers(0, len(src)))
            junk = draw(st.one_of(st.sampled_from(JUNK), st.text(min_size=1, max_size=3)))
            src = src[:pos] + junk + src[pos:]
    return src


def _accept_or_recerror(src: str) -> None:
    try:
        cells = parse_and_check(src, "mutant.rec")
    except RecError as e:
        # The error must render (str() walks the span and the source line) and be located
        # within the file when it has a span.
        text = str(e)
        assert "error:" in text
        if e.span is not None:
            assert text.startswith("mutant.rec:")
            assert 1 <= e.span.line <= max(1, src.count("\n") + 1)
        return
    # Accepted: it must also print back to source that parses to the same tree.
    assert cells
    tree = parse(src, "mutant.rec")
    assert parse(to_source(tree)) == tree


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutants_accept_or_raise_recerror(src):
    _accept_or_recerror(src)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated(max_mutations=8))
def test_mutants_accept_or_raise_recerror_long(src):
    _accept_or_recerror(src)


# Hand-picked edge cases. Some once crashed the frontend (a RecursionError on deep nesting, a
# RecursionError-free but endless `2**10000000` dimension, `x[H:0]` and `x[-1:]` accepted with
# a negative length); the rest probe corners of the parser, the builder and the checker.
REGRESSIONS = [
    "cell A(D):\n    input x[D]\n    output y = " + "+".join(["x"] * 3000) + "\n",
    "cell A(D):\n    input x[D]\n    output y = " + "-" * 3000 + "x\n",
    "cell A(D):\n    input x[D]\n    output y = " + "(" * 3000 + "x" + ")" * 3000 + "\n",
    "cell A(D):\n    input x[D]\n    output y = " + "x[0]" + "[0]" * 1000 + "\n",
    "cell A(D):\n    input x[2**10000000]\n    output x\n",
    "cell A(D, H):\n    input x[2*H]\n    output y = x[H:0]\n",
    "cell A(D, H):\n    input x[2*H]\n    output y = x[-1:]\n",
    "cell A(D):\r    input x[D]\r    output x\r",
    "cell A(D):\n    \"\"\"doc \\\"\"\"\n    input x[D]\n    output x\n",
    "cell A(D):\n    input x[D]\n    output y = sigmoid(x\n",
    "cell A(D):\n    input x[D\n",
    "cell A(D):\n    input x[D]\n    output y = x)\n",
    "cell A(D):\n    input x[D]\n    output y = x]\n",
    "cell A(D):\n\tinput x[D]\n        output x\n",
    "cell A(D):\n    input x[D]\n    output y = x \\\n",
    "",
    "\n\n",
    "# only a comment\n",
    "cell",
    "\x00",
    "cell A(D):\n    input x[D]\n    output y = x[::]\n",
    "cell A(D):\n    input x[D]\n    output y = x[1:2:3]\n",
    "cell A(D):\n    input x[D]\n    output y = x[None]\n",
    "cell A(D):\n    input x[D]\n    output y = x[0.5]\n",
    "cell A(D):\n    input x[D]\n    output y = x[-D]\n",
    "cell A(D):\n    input x[D]\n    output y = x[D:0]\n",
    "cell A(D):\n    input x[D]\n    output y = x[x]\n",
    "cell A(D):\n    input x[D]\n    output y = x[1][2]\n",
    "cell A(D):\n    input x[D]\n    output y = sum(x, axis=x)\n",
    "cell A(D):\n    input x[D]\n    output y = sum(x, axis=-x)\n",
    "cell A(D):\n    input x[D]\n    output y = sum(x, axis=None, axis=0)\n",
    "cell A(D):\n    input x[D]\n    output y = split(x, 0)\n",
    "cell A(D):\n    input x[D]\n    output y = reshape(x, [])\n",
    "cell A(D):\n    input x[D]\n    output y = reshape(x, [D, x])\n",
    "cell A(D):\n    input x[D]\n    output y = eye(x)\n",
    "cell A(D):\n    input x[D]\n    output y = arange(D, 1)\n",
    "cell A(D):\n    input x[D]\n    output y = x ** x\n",
    "cell A(D):\n    input x[D]\n    output y = x.T\n",
    "cell A(D):\n    input x[D]\n    output y = x.left\n",
    "cell A(D):\n    input x[D]\n    output y = (x + x).prev\n",
    "cell A(D, E=2**70):\n    input x[D]\n    output x\n",
    "cell A(D):\n    input x[D**-1]\n    output x\n",
    "cell A(D):\n    input x[99999999999999999999**9]\n    output x\n",
    "cell A(D):\n    input x[D]\n    output y = x[99999999999999999999999]\n",
    "cell A(D):\n    input x[1e400]\n    output x\n",
    "cell A(D, e=1e400):\n    input x[D]\n    output x\n",
    "cell A(D):\n    input x[D]\n    for j in range(D):\n        for j in range(D):\n            a = x\n    output x\n",
    "cell A(D):\n    input x[D]\n    for j in range(x):\n        a = x\n    output x\n",
    "cell A(D):\n    input x[D]\n    for j in foo(2):\n        a = x\n    output x\n",
    "cell A(D):\n    input x[D]\n    for j in range(n=2):\n        a = x\n    output x\n",
    "cell A(D):\n    state h[D] = h\n    h' = h\n    output h'\n",
    "cell A(D):\n    param p[D] ~ normal(0, 1, 2)\n    input x[D]\n    output x\n",
    "cell A(D):\n    param p[D] ~ normal(std=1, mean=0)\n    input x[D]\n    output y = p * x\n",
    "cell A(D):\n    param p[D] ~ normal(0, mean=0)\n    input x[D]\n    output x\n",
    "cell A(D):\n    param p[D] = arange(D)\n    input x[D]\n    output y = p * x\n",
    "cell A(D):\n    heads x\n    input x[D]\n    output x\n",
    "cell A(D):\n    heads 0.5\n    input x[D]\n    output x\n",
    "cell A(D):\n    over dag\n    over dag\n    input x[D]\n    output x\n",
    "cell A(D):\n    input x[D]\n    output\n",
    "cell A(D):\n    input x[D]\n    output y =\n",
    "cell A(D):\n    input x[D]\n    a, = x\n    output a\n",
    "cell A(D):\n    input x[D]\n    a, b = x, x\n    output a\n",
    "cell A(D):\n    input x[D]\n    y = concat(x[0], x)\n    output y\n",
    "cell A(D):\n    input x[D]\n    y = outer(x, split(x, 1))\n    output y\n",
]


@pytest.mark.parametrize("src", REGRESSIONS)
def test_regressions_accept_or_raise_recerror(src):
    _accept_or_recerror(src)
