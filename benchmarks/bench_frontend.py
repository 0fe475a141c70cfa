"""Front-end and analysis speed: parse + check of every LANGUAGE.md example, and the
analysis of each (warm: after one run, so imports and the grammar are loaded).

    .venv/bin/python benchmarks/bench_frontend.py"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import recdsl
from recdsl.parser import parse

SPEC = Path(__file__).resolve().parents[2] / "shared" / "LANGUAGE.md"


def main():
    text = SPEC.read_text()
    blocks = [b for b in re.findall(r"```\n(.*?)```", text, flags=re.S) if re.search(r"^cell\s", b, flags=re.M)]
    t0 = time.perf_counter()
    parse("cell X(H):\n    input x[H]\n    state h[H] = 0\n    h' = h + x\n    output h'\n")  # grammar load
    cold = time.perf_counter() - t0
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        specs = [recdsl.load(b) for b in blocks]
        runs.append(time.perf_counter() - t0)
    print(f"grammar load (once per process): {cold * 1e3:.0f} ms")
    print(f"parse + check all {len(blocks)} LANGUAGE.md examples: {statistics.median(runs) * 1e3:.1f} ms (median of 5)")
    for mod in ("sympy", "networkx", "torch"):  # imported lazily by the analysis; once per process
        t0 = time.perf_counter()
        __import__(mod)
        print(f"{mod} import (once per process): {(time.perf_counter() - t0) * 1e3:.0f} ms")
    print(f"{'cell':16s} {'first analysis ms':>18s} {'again ms':>10s}")
    worst = 0.0
    for s in specs:
        t0 = time.perf_counter()
        s.plan()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.plan()
        again = time.perf_counter() - t0
        worst = max(worst, first)
        print(f"{s.name:16s} {first * 1e3:18.1f} {again * 1e3:10.1f}")
    print(f"slowest analysis: {worst * 1e3:.1f} ms (target < 300 ms)")


if __name__ == "__main__":
    main()
