"""The command line, run as a user runs it: `python -m recdsl ...` in a subprocess."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from recdsl.parser import parse

from .corpus import REPO

GOOD = """# a small cell
cell Tiny(D, H):
    \"\"\"A tiny gated cell.\"\"\"
    input x[D]
    param W[H, D] ~ normal(0, 1/sqrt(D))
    state h[H] = 0
    z = sigmoid(W @ x)
    h' = (1 - z) * h + z * tanh(W @ x)
    output h'
"""

BAD = """cell Tiny(D, H):
    input x[D]
    param W[H, D] ~ normal(0, 1)
    state h[H] = 0
    h' = W @ h
    output h'
"""


def recdsl(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "recdsl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "tiny.rec"
    p.write_text(GOOD)
    return p


def test_check_good_file(good):
    r = recdsl("check", good)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "cell Tiny -- A tiny gated cell." in out
    assert re.search(r"inputs\s+x\[D\]", out)
    assert re.search(r"params\s+W\[H, D\]", out)
    assert re.search(r"states\s+h\[H\]", out)
    assert re.search(r"outputs\s+h\[H\]", out)
    assert out.rstrip().endswith(f"{good}: ok (1 cell)")
    assert "Traceback" not in r.stdout + r.stderr


def test_check_bad_file(tmp_path):
    p = tmp_path / "bad.rec"
    p.write_text(BAD)
    r = recdsl("check", p)
    assert r.returncode == 1
    err = r.stderr
    assert "Traceback" not in err + r.stdout
    lines = err.splitlines()
    assert lines[0].startswith(f"{p}:5:10: error: '@' needs the inner dimensions to agree")
    assert lines[1] == "        h' = W @ h"
    assert lines[2] == "             ^^^^^"
    assert any(ln.startswith("hint: ") for ln in lines)


def test_check_syntax_error(tmp_path):
    p = tmp_path / "syntax.rec"
    p.write_text("cell A(D):\n    input x[D]\n    output y = sigmoid(x\n")
    r = recdsl("check", p)
    assert r.returncode == 1
    assert f"{p}:3:23: error: this '(' is never closed" in r.stderr
    assert "^" in r.stderr and "Traceback" not in r.stderr


def test_check_good_and_bad_together(good, tmp_path):
    bad = tmp_path / "bad.rec"
    bad.write_text(BAD)
    r = recdsl("check", good, bad)
    assert r.returncode == 1
    assert f"{good}: ok (1 cell)" in r.stdout
    assert f"{bad}:5:10: error:" in r.stderr


def test_check_missing_file(tmp_path):
    missing = tmp_path / "nope.rec"
    r = recdsl("check", missing)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert f"{missing}: no such file" in r.stderr


def test_check_unknown_name_that_is_not_a_file():
    r = recdsl("check", "no_such_cell_anywhere")
    assert r.returncode == 1
    assert "neither a .rec file nor a stdlib cell" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_not_utf8(tmp_path):
    p = tmp_path / "latin1.rec"
    p.write_bytes("# caf\xe9\ncell A(D):\n    input x[D]\n    output x\n".encode("latin-1"))
    r = recdsl("check", p)
    assert r.returncode == 1
    assert "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_inspect_source_reparses_to_the_same_ast(good):
    r = recdsl("inspect", "--stage", "source", good)
    assert r.returncode == 0, r.stderr
    assert "#" not in r.stdout  # comments are not part of the tree
    assert parse(r.stdout) == parse(GOOD)


def test_inspect_source_of_a_multi_cell_file(tmp_path):
    src = GOOD + "\n" + GOOD.replace("Tiny", "Tiny2")
    p = tmp_path / "two.rec"
    p.write_text(src)
    r = recdsl("inspect", "--stage", "source", p)
    assert r.returncode == 0, r.stderr
    assert parse(r.stdout) == parse(src)


def test_inspect_ast_shows_spans(good):
    r = recdsl("inspect", "--stage", "ast", good)
    assert r.returncode == 0, r.stderr
    assert "Cell(name='Tiny')" in r.stdout
    assert re.search(r"Decl\(kind='input'\)\s+@4:5-4:15", r.stdout)


def test_inspect_bad_file(tmp_path):
    p = tmp_path / "bad.rec"
    p.write_text(BAD)
    r = recdsl("inspect", "--stage", "source", p)
    assert r.returncode == 1
    assert f"{p}:5:10: error:" in r.stderr and "Traceback" not in r.stderr
