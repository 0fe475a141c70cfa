"""Forward traffic of the generated scan kernels, counted in the interpreter: at most 1.05x
the analytic minimum (each distinct input element read once, each output written once),
one launch per stage."""
from __future__ import annotations

import pytest

from recdsl.backends.triton import launch


@pytest.mark.parametrize("name", ["hgrn", "mamba", "lru", "aaren", "block_diag_lrnn", "lstm"])
def test_scan_kernels_move_the_minimum(name):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_triton_traffic import measure
    rows, launches, stages = measure(name, 2, 40)
    assert launches == stages          # one launch per stage (forward)
    for cell, kernel, n, got, want in rows:
        assert n == 1
        assert got <= 1.05 * want, f"{kernel}: {got:.1f} bytes/token vs minimum {want:.1f}"
    assert launch.RECORD is None
