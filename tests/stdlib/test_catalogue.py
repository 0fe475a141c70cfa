"""The stdlib as a whole: at least 38 sequence cells in family folders, every one covered by
a family test file here (classes, backends, oracle), every docstring citing its paper."""
from __future__ import annotations

import re

import recdsl
from recdsl.spec import stdlib_files

from . import test_block, test_delta, test_diagonal, test_matrix, test_nonlinear, test_semiring

FAMILIES = {"nonlinear": test_nonlinear, "diagonal": test_diagonal, "matrix": test_matrix, "delta": test_delta,
            "block": test_block, "semiring": test_semiring}


def _seq_cells():
    return {n: p for n, p in stdlib_files().items() if recdsl.load(n).cell.over == "seq"}


def test_at_least_38_sequence_cells():
    assert len(_seq_cells()) >= 38, sorted(_seq_cells())


def test_every_sequence_cell_is_tested_by_its_family():
    for name, path in _seq_cells().items():
        fam = path.parent.name
        assert fam in FAMILIES, f"{name}: unknown family folder {fam}"
        assert name in FAMILIES[fam].EXPECTED, f"{name} has no expectation in tests/stdlib/test_{fam}.py"
        src = (path.parent.parent.parent / "tests" / "stdlib" / f"test_{fam}.py").read_text()
        assert re.search(rf'ORACLE\["{name}"\]|_torch_rnn\("{name}"', src), f"{name} has no oracle test"


def test_the_dag_cells_stay():
    assert {"plstm2d", "plstm2d_dmode", "plstm_graph", "tree_lstm", "mdlstm2d"} <= set(stdlib_files())


def test_docstrings_name_the_variant():
    for name in _seq_cells():
        doc = recdsl.load(name).doc
        assert len(doc) > 80 and ("et al." in doc or "&" in doc or "Team" in doc or "Katsch" in doc
                                  or "Elman" in doc), name
