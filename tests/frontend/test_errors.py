"""Golden tests of error messages: every tests/frontend/errors/NAME.rec is a malformed cell;
NAME.expected is the full text of the RecError it must raise (location, source line, caret,
hint), exactly as `recdsl check` prints it.

To regenerate the goldens after a deliberate change of a message:

    RECDSL_UPDATE_GOLDENS=1 .venv/bin/python -m pytest -q tests/frontend/test_errors.py

and review the diff: each golden must point at the right line and column and say something
useful."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from recdsl import RecError, parse_and_check

ERRORS = Path(__file__).resolve().parent / "errors"
CASES = sorted(p.stem for p in ERRORS.glob("*.rec"))
UPDATE = os.environ.get("RECDSL_UPDATE_GOLDENS") == "1"


def _error_text(name: str) -> RecError:
    src = (ERRORS / f"{name}.rec").read_text(encoding="utf-8")
    with pytest.raises(RecError) as info:
        parse_and_check(src, f"{name}.rec")
    return info.value


def test_there_are_enough_cases():
    assert len(CASES) >= 30
    missing = [c for c in CASES if not (ERRORS / f"{c}.expected").exists() and not UPDATE]
    assert not missing, f"no .expected golden for {missing}"


@pytest.mark.parametrize("name", CASES)
def test_error_golden(name):
    err = _error_text(name)
    got = str(err)
    golden = ERRORS / f"{name}.expected"
    if UPDATE:
        golden.write_text(got + "\n", encoding="utf-8")
    expected = golden.read_text(encoding="utf-8").rstrip("\n")
    assert got == expected


@pytest.mark.parametrize("name", CASES)
def test_error_shape(name):
    """Independently of the goldens: the first line is `NAME.rec:L:C: error: ...`, a caret line
    follows the source line and sits under it, and the location is inside the file."""
    err = _error_text(name)
    src = (ERRORS / f"{name}.rec").read_text(encoding="utf-8")
    lines = str(err).split("\n")
    m = re.match(rf"{re.escape(name)}\.rec:(\d+):(\d+): error: \S", lines[0])
    assert m, lines[0]
    line, col = int(m.group(1)), int(m.group(2))
    src_lines = src.splitlines() or [""]
    assert 1 <= line <= len(src_lines)
    assert (line, col) == (err.line, err.col)
    if src_lines[line - 1].strip():
        assert lines[1] == "    " + src_lines[line - 1]
        caret = lines[2]
        assert set(caret.strip()) == {"^"}
        assert caret.index("^") == 4 + col - 1
        assert len(caret) - 4 <= len(src_lines[line - 1]) + 1
    assert "Traceback" not in str(err)
