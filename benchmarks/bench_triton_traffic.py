"""Memory traffic of the triton backend's kernels, counted in Triton's interpreter.

Every load and store the interpreter executes is counted (masked-off lanes move nothing;
backends/triton/traffic.py), per kernel, for one forward of each stdlib cell the
backend runs with a Triton kernel; next to it the analytic minimum: every distinct input
element read once, every output written once (launch.distinct_bytes). Also: launches per
forward. Counts, not timings: the same on any machine.

    .venv/bin/python benchmarks/bench_triton_traffic.py [--B 2 --T 256] [--cells hgrn,lstm]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import recdsl  # noqa: E402
from recdsl.backends.triton import launch, traffic  # noqa: E402

CELLS = ["hgrn", "mamba", "mega_ema", "mingru", "minlstm", "qrnn", "rglru", "s4d", "sru", "lru", "gateloop",
         "block_diag_lrnn", "plstm1d", "aaren", "retnet", "hgrn2", "mamba2", "elman", "gru", "indrnn", "lstm", "slstm",
         "lem", "mgu"]


def measure(name: str, B: int, T: int):
    from helpers import random_inputs
    spec = recdsl.load(name)
    layer = spec(backend="triton", **spec.analysis_dims())
    xs = random_inputs(spec, layer, B, T, torch.float32)
    launch.RECORD = []
    try:
        with torch.no_grad():
            tr = traffic.count_traffic(lambda: layer(**xs))
        mins = dict(launch.RECORD)
    finally:
        launch.RECORD = None
    rows = []
    for kname, (ld, st, n) in tr.per_kernel.items():
        rows.append((spec.cell.name, kname, n, (ld + st) / (B * T), mins.get(kname, 0) / (B * T)))
    return rows, tr.launches, len(mins)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--cells", default=",".join(CELLS))
    a = ap.parse_args(argv)
    print(f"forward traffic per token (B={a.B}, T={a.T}, fp32), counted in the Triton interpreter")
    print(f"{'cell':16s} {'kernel':30s} {'launches':>8s} {'bytes/token':>12s} {'minimum':>10s} {'ratio':>7s}")
    worst = 0.0
    for name in a.cells.split(","):
        rows, launches, stages = measure(name, a.B, a.T)
        for cell, k, n, got, want in rows:
            ratio = got / want if want else float("nan")
            if k.endswith("_fwd") and "stage" in k and want:
                worst = max(worst, ratio) if "seq" not in k else worst
            print(f"{cell:16s} {k:30s} {n:8d} {got:12.1f} {want:10.1f} {ratio:7.3f}")
    print(f"worst scan-kernel ratio: {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
