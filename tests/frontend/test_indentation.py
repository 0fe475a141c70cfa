"""Indentation is strict: a file indents with spaces or with tabs, never both (a tab's width is
the editor's choice, so a mix reads differently to the user than to the parser)."""
from __future__ import annotations

import pytest

from recdsl.errors import RecError
from recdsl.parser import parse

HEAD = "cell c(D):\n"


@pytest.mark.parametrize("body, line", [
    ("        input x[D]\n\tstate h[D]\n", 3),              # 8 spaces, then a tab: same width, refused
    ("\tinput x[D]\n        state h[D]\n", 3),
    ("    input x[D]\n \tstate h[D]\n", 3),                 # one line mixing both
    ("\t input x[D]\n", 2),
    ("    input x[D]\n    for j in range(2):\n\t\th = x\n", 4),
])
def test_mixed_tabs_and_spaces_are_refused_at_the_line(body, line):
    with pytest.raises(RecError) as e:
        parse(HEAD + body)
    assert (e.value.line, e.value.col) == (line, 1)
    assert e.value.hint


@pytest.mark.parametrize("indent", ["    ", "\t", "  "])
def test_one_kind_of_indentation_parses(indent):
    text = HEAD + "".join(indent + ln for ln in ["input x[D]\n", "state h[D]\n", "h' = h + x\n", "output y = h'\n"])
    assert parse(text).cells[0].name == "c"
