"""The benchmark's own cells (benchmarks/cells/*.rec, cells the compiler was not written
against): each parses and checks, and its torch backend matches the reference backend
in float64 (outputs, final states, gradients of inputs and params) at small shapes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import recdsl
from helpers import ROOT, compare_backends

CELLS = sorted((ROOT / "benchmarks" / "cells").glob("*.rec"))
TOL = 1e-9


def test_there_are_cells():
    assert {p.stem for p in CELLS} >= {"alrnn", "cfc", "yaad"}


@pytest.mark.parametrize("path", CELLS, ids=lambda p: p.stem)
def test_cell_checks(path):
    cli = Path(sys.executable).parent / "recdsl"
    res = subprocess.run([str(cli), "check", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok (1 cell)" in res.stdout


@pytest.mark.parametrize("path", CELLS, ids=lambda p: p.stem)
def test_torch_matches_reference(path):
    spec = recdsl.load(str(path))
    errs = compare_backends(spec, spec.analysis_dims(), "torch", B=2, T=9)
    bound = TOL * max(1.0, errs["scale"])
    assert errs["out"] <= bound and errs["state"] <= bound and errs["grad"] <= bound, errs
