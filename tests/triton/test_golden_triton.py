"""Golden files for the triton backend's generated kernels (the text `recdsl inspect
--stage triton` prints before the driver). Regenerate with RECDSL_UPDATE_GOLDENS=1 and read
the diff before committing it."""
import os
from pathlib import Path

import pytest

import recdsl
from recdsl.pipeline import emit_cell

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = [("lstm", {"D": 3, "H": 4}), ("mamba", {"D": 3, "N": 4}), ("lru", {"D": 3, "N": 4})]


@pytest.mark.parametrize("cell, dims", CASES)
def test_kernel_module(cell, dims):
    text = emit_cell(recdsl.load(cell).lower(**dims), "triton").kernels
    path = GOLDEN / f"{cell}.triton.py.txt"
    if os.environ.get("RECDSL_UPDATE_GOLDENS"):
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with RECDSL_UPDATE_GOLDENS=1"
    assert text == path.read_text()


def test_every_kernel_line_from_the_cell_names_its_source():
    text = emit_cell(recdsl.load("mamba").lower(D=3, N=4), "triton").kernels
    fused = [ln for ln in text.splitlines() if " = _" in ln or " = (" in ln or " = tl.exp(" in ln]
    assert fused and all("# mamba.rec:" in ln for ln in fused if ln.startswith("        v"))
