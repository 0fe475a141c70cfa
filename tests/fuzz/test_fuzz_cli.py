"""`recdsl fuzz` as a command: the summary line, exit codes, reproducers and their replay."""
import os
import re
import subprocess
import sys
from pathlib import Path

SUMMARY = re.compile(r"^fuzz: (\d+) cells, (\d+) backend runs, (\d+) disagreements$", re.M)
RECDSL = [sys.executable, "-m", "recdsl"]

GLA_CASE = """# fuzz-case: {"B": 1, "T": 70, "cell": null, "dims": {"K": 2, "V": 2}, "dtype": "float64", "grad": true, "heads": null, "init_state": false, "reverse": false, "seed": 3}
cell G(K, V):
    input q[K], k[K], v[V], g[]
    state S[K, V] = 0
    S' = exp(logsigmoid(g)) * S + outer(k, v)
    output o = q @ S'
"""


def _run(args, tmp_path, env=None):
    return subprocess.run(RECDSL + ["fuzz", "--out", str(tmp_path / "out")] + args, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=tmp_path, timeout=120)


def test_generated_run_prints_histogram_and_summary(tmp_path):
    # bounded by a cell count, not the clock: a loaded machine runs the same ten cells
    r = _run(["--seconds", "100", "--max-cells", "10", "--seed", "11"], tmp_path)
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout + r.stderr
    assert int(m.group(1)) == 10 and int(m.group(2)) >= 10
    assert r.stdout.strip().splitlines()[-1] == m.group(0)
    assert "classes (stages seen):" in r.stdout and "frontend:" in r.stdout
    assert r.returncode == (0 if m.group(3) == "0" else 1), r.stderr


def test_user_cells_and_replay(tmp_path):
    f = tmp_path / "g.rec"
    f.write_text(GLA_CASE)
    r = _run(["--cells", str(f), "--seed", "2", "--backends", "torch", "--no-frontend"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert SUMMARY.search(r.stdout).group(0) == "fuzz: 1 cells, 1 backend runs, 0 disagreements"
    # the injected chunk-carry bug: exit 1, a shrunk reproducer and its replay command
    r = _run(["--cells", str(f), "--seed", "2", "--backends", "torch", "--no-frontend", "--shrink-seconds", "20"],
             tmp_path, env={"RECDSL_FUZZ_INJECT": "chunk-carry"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert SUMMARY.search(r.stdout).group(0) == "fuzz: 1 cells, 1 backend runs, 1 disagreements"
    readme = (tmp_path / "out" / "README").read_text()
    cmd = re.search(r"replay: (recdsl fuzz --cells \S+ --seed 2 --backends torch)", readme).group(1)
    assert cmd in r.stderr
    rec = Path(cmd.split()[3])
    assert rec.exists() and "# fuzz-case:" in rec.read_text()


def test_user_mistakes_are_recerrors(tmp_path):
    r = _run(["--cells", str(tmp_path / "missing.rec")], tmp_path)
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--seconds", "1", "--backends", "newton"], tmp_path)   # opt-in (solves to a tolerance): not fuzzed
    assert r.returncode == 1 and "backend" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.rec"
    bad.write_text("cell A(D):\n    input x[D]\n    output y = x +\n")
    r = _run(["--cells", str(bad)], tmp_path)
    assert r.returncode == 1 and "bad.rec:3" in r.stderr
