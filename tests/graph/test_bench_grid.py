"""benchmarks/bench_grid.py (issue 16's grid benchmark) runs: its --quick form end to end as
a subprocess, asserted on the rows it writes as JSON (not on its prose): every workload
present, torch and the reference agree on the warm-up outputs, the torch backend ran its
C grid loop and beat the reference's cell-by-cell loop."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT

from recdsl.backends.torch.fused_loop import toolchain_missing
from recdsl.bench import TOL

CELLS = {"pLSTM P-mode", "pLSTM D-mode"}
MODES = {"forward", "forward+backward"}


def test_bench_grid_quick(tmp_path):
    out, rows_json = tmp_path / "grid.txt", tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grid.py"), "--quick",
                          "--out", str(out), "--json", str(rows_json)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(rows_json.read_text())
    pairs = [r for r in rows if r["kind"] == "pair" and r["anchor"] == "reference"]
    scaling = [r for r in rows if r["kind"] == "scaling"]
    assert {(r["cell"], r["mode"]) for r in pairs} == {(c, m) for c in CELLS for m in MODES}
    assert {(r["cell"], r["mode"]) for r in scaling} == {(c, m) for c in CELLS for m in MODES}
    for r in rows:
        assert r["torch_ms"] > 0
        if r["kind"] == "pair":
            assert r["anchor_ms"] > 0 and abs(r["ratio"] - r["anchor_ms"] / r["torch_ms"]) < 1e-6 * r["ratio"]
            assert r["max_rel_err"] <= TOL, r
    for c in CELLS:
        for m in MODES:
            sizes = [r["X"] * r["Y"] for r in scaling if r["cell"] == c and r["mode"] == m]
            assert len(sizes) == 3 and sizes == sorted(sizes)
            exps = [r["exponent"] for r in scaling if r["cell"] == c and r["mode"] == m]
            assert exps[0] is None and all(isinstance(e, float) for e in exps[1:])
    # the judged row: forward at the largest pair size carries the 20x target
    judged = [r for r in pairs if r["target"] is not None]
    assert {(r["cell"], r["mode"]) for r in judged} == {(c, "forward") for c in CELLS}
    assert any(r["anchor"] == "torch wavefront" for r in rows)
    if toolchain_missing() is None:
        assert all(r["kernel"] == "torch.c_grid" for r in rows)
        big = max(r["X"] for r in pairs)
        assert all(r["ratio"] > 1 for r in pairs if r["X"] == big and r["mode"] == "forward"), pairs
    text = out.read_text()
    assert text.startswith("$ ") and "bench_grid.py --quick" in text.splitlines()[0]
