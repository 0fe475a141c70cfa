"""Golden files for what recdsl prints: the IR dump and the reference backend's code.
Regenerate with RECDSL_UPDATE_GOLDENS=1 (and read the diff before committing it)."""
import os
from pathlib import Path

import pytest

import recdsl
from recdsl.backends import reference
from recdsl.ir import dump
from recdsl.pipeline import emit_cell
from recdsl.plan import render

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


# The torch backend: its driver for a loop cell (LSTM), a chunkwise diagonal-decay cell
# (GLA), a delta-rule cell (DeltaNet) and the transposed SSD form (Mamba-2); the generated C
# loop of the LSTM; and the plan `recdsl check` prints (selected forms, passed-over ones).
TORCH_CASES = [("lstm", {"D": 3, "H": 4}), ("gla", {"K": 3, "V": 4}), ("deltanet", {"K": 3, "V": 4}),
               ("mamba2", {"P": 3, "N": 4, "NH": 2})]


@pytest.mark.parametrize("cell, dims", TORCH_CASES)
def test_torch_driver(cell, dims):
    _compare(f"{cell}.torch.py.txt", emit_cell(recdsl.load(cell).lower(**dims), "torch").source)


def test_generated_c_loop():
    fused = emit_cell(recdsl.load("lstm").lower(D=3, H=4), "torch").emitter.fused
    _compare("lstm.c.txt", "".join(fl.source for fl in fused))


@pytest.mark.parametrize("cell, dims", [("kda", {"K": 3, "V": 4}), ("retnet", {"K": 3, "V": 4, "NH": 2})])
def test_check_output(cell, dims):
    _compare(f"{cell}.plan.txt", render(recdsl.load(cell).plan(**dims), verbose=False) + "\n")
