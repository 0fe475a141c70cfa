"""`recdsl bench`: the table, the plot, and bad arguments (no timing is asserted)."""
from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from recdsl.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    png = tmp_path_factory.mktemp("bench") / "lstm.png"
    res = _run("bench", "lstm", "--dims", "D=8,H=8", "--T", "16", "--B", "2", "--repeat", "1",
               "--backends", "torch,reference", "--train", "--plot", str(png))
    return res, png


def test_bench_table_has_a_row_per_backend_and_mode(lstm_run):
    res, _ = lstm_run
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    rows = [line for line in res.output.splitlines() if re.search(r"\d+\.\d+x", line)]
    for backend in ("reference", "torch", "torch.nn.LSTM"):
        for mode in ("forward", "train"):
            hits = [r for r in rows if re.search(rf"\b{mode}\b", r) and re.search(rf"\s{re.escape(backend)}\s", r)]
            assert len(hits) == 1, (backend, mode, res.output)
    # the reference is the baseline: its ratio is 1 in both modes
    assert sum("(per-step loop)" in r and "1.00x" in r for r in rows) == 2
    # each row names the lowering it runs, sequential or parallel
    assert "torch.c_loop (sequential)" in res.output and "reference.loop (sequential)" in res.output
    assert re.search(r"torch \S+, \d+ threads, fp32, .*cpus", res.output)   # the line benchmarks/ print


def test_bench_plot_is_a_non_blank_png(lstm_run):
    import matplotlib.image as mpimg
    res, png = lstm_run
    assert res.exit_code == 0, res.output
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01      # not a uniform image


def test_bench_chunkwise_cell_runs_a_parallel_form():
    res = _run("bench", "gla", "--dims", "K=4,V=4", "--T", "8", "--B", "1", "--repeat", "1", "--backends", "torch")
    assert res.exit_code == 0, res.output
    assert "torch.chunk_diag (parallel)" in res.output
    assert "reference (per-step loop)" in res.output    # always timed: the ratios are against it
    assert "WARNING" not in res.output                  # every contender agrees with the reference


@pytest.mark.parametrize("args, message, hint", [
    (["lstm", "--dims", "Q=3"], "has no dimension or hyper-parameter Q", "its dimensions: D, H"),
    (["lstm", "--dims", "d=3"], "has no dimension or hyper-parameter d", "did you mean D?"),
    (["lstm", "--backends", "torch,refrence"], "unknown backend 'refrence'", "did you mean reference?"),
    (["lstm", "--T", "16,x"], "'x' is not an integer", "--T 256,1024"),
    (["lstm", "--T", "0"], "0 is not positive", "--T"),
    (["lstm", "--repeat", "0"], "--repeat: 0 is not positive", "--repeat 5"),
    (["tree_lstm"], "bench times sequence cells", "time it from Python"),
    (["no_such_cell"], "neither a .rec file nor a stdlib cell", "recdsl stdlib"),
    (["lstm", "--plot", "/nonexistent-dir/x.png"], "--plot: no folder", "create it first"),
])
def test_bench_bad_arguments_are_errors_with_hints(args, message, hint):
    res = _run("bench", *args)
    assert res.exit_code == 1, res.output
    assert message in res.output and "hint:" in res.output and hint in res.output, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)   # no other exception


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the triton backend")
def test_bench_backend_that_cannot_run_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    res = _run("bench", "lstm", "--backends", "triton")
    assert res.exit_code == 1
    assert "triton backend runs on a CUDA GPU" in res.output and "hint: drop triton" in res.output


def test_bench_bad_option_type_is_a_usage_error():
    res = _run("bench", "lstm", "--B", "two")
    assert res.exit_code == 2 and "Invalid value for '--B'" in res.output and "Traceback" not in res.output
