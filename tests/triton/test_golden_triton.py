"""Golden files for what `recdsl inspect --stage triton` shows: the generated scan and loop
kernels (lstm, mamba, lru), and for the chunkwise cells (GLA, Gated DeltaNet) the whole
page -- the kernels generated for the cell, the fixed chunkwise kernel set its stages run,
and the driver -- so that a change to any kernel a cell runs shows up as a diff here.
Regenerate with RECDSL_UPDATE_GOLDENS=1 and read the diff before committing it."""
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import recdsl
from recdsl.cli import main
from recdsl.pipeline import emit_cell

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = [("lstm", {"D": 3, "H": 4}), ("mamba", {"D": 3, "N": 4}), ("lru", {"D": 3, "N": 4})]
CHUNKWISE = [("gla", "K=3,V=4"), ("gated_deltanet", "K=3,V=4")]


def _against_golden(text: str, path: Path):
    if os.environ.get("RECDSL_UPDATE_GOLDENS"):
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with RECDSL_UPDATE_GOLDENS=1"
    assert text == path.read_text()


@pytest.mark.parametrize("cell, dims", CASES)
def test_kernel_module(cell, dims):
    _against_golden(emit_cell(recdsl.load(cell).lower(**dims), "triton").kernels, GOLDEN / f"{cell}.triton.py.txt")


@pytest.mark.parametrize("cell, dims", CHUNKWISE)
def test_chunkwise_inspect_page(cell, dims):
    result = CliRunner().invoke(main, ["inspect", cell, "--stage", "triton", "--dims", dims])
    assert result.exit_code == 0, result.output
    _against_golden(result.output, GOLDEN / f"{cell}.inspect-triton.txt")


def test_every_kernel_line_from_the_cell_names_its_source():
    text = emit_cell(recdsl.load("mamba").lower(D=3, N=4), "triton").kernels
    fused = [ln for ln in text.splitlines() if " = _" in ln or " = (" in ln or " = tl.exp(" in ln]
    assert fused and all("# mamba.rec:" in ln for ln in fused if ln.startswith("        v"))
