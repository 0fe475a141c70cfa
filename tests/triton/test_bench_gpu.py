"""benchmarks/bench_gpu.py (the `make gpu-check` script) without a GPU: it imports, parses
its arguments, refuses without CUDA, and its --cpu-interpreter mode runs the GPU code path
(correctness against the reference, timings of recdsl vs fla and vs torch.nn.LSTM) on tiny
shapes in Triton's interpreter. The run is a subprocess: fla's kernels must be decorated
with TRITON_INTERPRET set, which this process's Triton was not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402


def test_arguments_and_the_cells_it_checks():
    a = bench_gpu.parse([])
    assert (a.B, a.T, a.H, a.K, a.V, a.dtype) == (4, "2048", 16, 128, 128, torch.bfloat16)
    assert a.cells.split(",") == ["gla", "simple_gla", "gated_deltanet", "deltanet", "lstm"]
    paths = bench_gpu.check_paths("all")
    assert {p.parent.name for p in paths} == {"matrix", "delta"}
    assert len(paths) == len(list((ROOT / "stdlib/matrix").glob("*.rec")) + list((ROOT / "stdlib/delta").glob("*.rec")))
    assert [p.stem for p in bench_gpu.check_paths("gla,deltanet")] == ["gla", "deltanet"]
    assert bench_gpu.check_paths("none") == []


def test_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--out", ""]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_err_ratio_is_flas():
    ref = torch.tensor([3.0, 4.0])
    assert bench_gpu.err_ratio(ref, ref) == 0
    # rmse of the difference [0.1, 0] over the reference's rms 5/sqrt(2)
    assert bench_gpu.err_ratio(ref, torch.tensor([3.1, 4.0])) == pytest.approx((0.01 / 2) ** 0.5 / (25 / 2) ** 0.5)


def test_cpu_interpreter_runs_the_gpu_code_path(tmp_path):
    report, results = tmp_path / "gpu.txt", tmp_path / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--cpu-interpreter", "--check-cells", "gla",
           "--check-B", "1", "--check-T", "9", "--cells", "gla,lstm", "--B", "1", "--T", "16", "--H", "1",
           "--K", "16", "--V", "16", "--lstm-hidden", "8", "--dtype", "float32",
           "--out", str(report), "--json", str(results)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    r = json.loads(results.read_text())
    assert r["failures"] == 0
    (check,) = r["checks"]
    assert check["cell"] == "matrix/GLA" and check["ok"] and "triton.chunk_diag" in check["ran"].split(",")
    assert check["output_ratio"] <= bench_gpu.OUTPUT_RATIO and check["grad_ratio"] <= bench_gpu.GRAD_RATIO
    rows = {(t["cell"], t["impl"], t["pass"]): t for t in r["timings"]}
    assert set(rows) == {(c, i, p) for c, impls in (("gla", ("recdsl", "fla")), ("lstm", ("recdsl", "cudnn")))
                         for i in impls for p in ("fwd", "fwd+bwd")}
    assert all(t["ms"][0] > 0 and t["T"] == 16 for t in rows.values())
    assert "triton.chunk_diag" in rows[("gla", "recdsl", "fwd")]["ran"].split(",")
    assert "triton.sequential" in rows[("lstm", "recdsl", "fwd+bwd")]["ran"].split(",")
    assert report.read_text().splitlines()[0].startswith(".venv/bin/python benchmarks/bench_gpu.py --cpu-interpreter")
