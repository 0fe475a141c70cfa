"""Golden files for what recdsl prints: the IR dump and the reference backend's code.
Regenerate with RECDSL_UPDATE_GOLDENS=1 (and read the diff before committing it)."""
import os
from pathlib import Path

import pytest

import recdsl
from recdsl.backends import reference
from recdsl.ir import dump

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = [("lstm", {"D": 3, "H": 4}), ("mlstm", {"K": 3, "V": 4}), ("deltaproduct", {"K": 3, "V": 4})]


def _compare(name: str, text: str):
    path = GOLDEN / name
    if os.environ.get("RECDSL_UPDATE_GOLDENS"):
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with RECDSL_UPDATE_GOLDENS=1"
    assert text == path.read_text()


@pytest.mark.parametrize("cell, dims", CASES)
def test_ir_dump(cell, dims):
    _compare(f"{cell}.ir.txt", dump(recdsl.load(cell).lower(**dims)) + "\n")


@pytest.mark.parametrize("cell, dims", CASES)
def test_reference_code(cell, dims):
    _compare(f"{cell}.reference.py.txt", reference.emit_step(recdsl.load(cell).lower(**dims)))


def test_generated_code_annotates_every_line_with_its_source():
    code = reference.emit_step(recdsl.load("lstm").lower(D=3, H=4))
    body = [ln for ln in code.splitlines() if ln.startswith("    ") and "return" not in ln]
    assert body and all("# lstm.rec:" in ln for ln in body)
