"""2-D pLSTM on grids (issue 16): the `torch` backend against the `reference` backend, and
how the torch backend's time grows with the grid, measured in one run (CPU, fp32).

    .venv/bin/python benchmarks/bench_grid.py [--quick] [--threads N] [--out file.txt] [--json file.json]

One thread by default (both backends): on the shared 2-core machine this was written on, the
C loop's second OpenMP thread often waits a whole time slice for a core (16 ms per call at
8x8 with 2 threads against 1 ms with one); --threads 2 where the cores are free.

Cells: stdlib/dag/plstm2d.rec (P-mode) and stdlib/dag/plstm2d_dmode.rec (D-mode), K = V = 32
(the state of each edge is K x V: "D = 32"), B = 4. Inputs as the pLSTM layer makes them:
P-mode transitions t and 1 - t (each in-edge's out-transitions sum to 1), D-mode
pre-activations N(0, 1) (tanh inside the cell), sources / marks / direct terms in (0, 1).
Modes: forward = the layer under torch.no_grad(); forward+backward = forward, then the
backward of y.pow(2).mean() with every input requiring grad. A pair is timed interleaved
(torch, reference, torch, reference, ...) after one warm-up of each, and the median kept;
the warm-up outputs are compared (a WARNING line when they disagree). The scaling rows time
the torch backend alone at 32², 64², 128² (the sizes interleaved) and give the time per
cell, t / (X·Y): flat per-cell times are linear growth; `exponent` is
log(t / t_32²) / log(X·Y / 32²) (1 = linear).
The reference backend (one cell at a time in Python, ~20 torch ops per cell) is not run at
128²: one forward there takes seconds, one forward+backward tens of seconds.

The `torch` backend runs a grid cell on CPU as one generated C loop over the cells in raster
order with a derived reverse-raster backward (backends/torch/grid_loop.py); the `torch
wavefront` row times its fallback (no C compiler, tensors off the CPU): the torch ops of the
step once per anti-diagonal, X + Y - 1 Python steps, autograd backward (backends/torch/graph.py)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import recdsl
from recdsl.bench import TOL, disagreement, env_line, first, inference, interleaved, timed_pair, training

ROOT = Path(__file__).resolve().parents[1]
CELLS = {"pLSTM P-mode": "plstm2d", "pLSTM D-mode": "plstm2d_dmode"}
TARGET = 20.0          # torch / reference at 64², forward
LINEAR_EXPONENT = 1.15  # "at most ~linear": t grows no faster than (X·Y)^1.15 from 32² to 128²


@dataclass
class Row:
    """One timed workload. kind: "pair" (torch against an anchor) or "scaling" (torch alone)."""
    kind: str
    cell: str
    mode: str                    # "forward" | "forward+backward"
    X: int
    Y: int
    torch_ms: float
    anchor: str | None = None
    anchor_ms: float | None = None
    ratio: float | None = None   # anchor_ms / torch_ms
    target: float | None = None
    met: bool | None = None
    us_per_cell: float | None = None
    exponent: float | None = None   # scaling: log(t / t_first) / log(cells / cells_first)
    max_rel_err: float | None = None
    kernel: str = ""


def inputs(name: str, B: int, X: int, Y: int, K: int, V: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda: torch.sigmoid(r(B, X, Y))        # noqa: E731
    xs = {"q": r(B, X, Y, K) * K ** -0.5, "k": r(B, X, Y, K) * K ** -0.5, "v": r(B, X, Y, V)}
    xs.update({n: u() for n in ("s_r", "s_d", "m_l", "m_u", "d")})
    if name == "plstm2d":
        t_rl, t_ru = u(), u()
        xs.update(t_rl=t_rl, t_dl=1 - t_rl, t_ru=t_ru, t_du=1 - t_ru)
    else:
        xs.update({n: r(B, X, Y) for n in ("a_rl", "a_ru", "a_du")})
    return xs


def _runner(layer, xs: dict, mode: str):
    leaves = {n: x.clone().requires_grad_(mode != "forward") for n, x in xs.items()}
    fn = lambda: first(layer(**leaves))  # noqa: E731
    return inference(fn) if mode == "forward" else training(fn, list(leaves.values()))


def bench(quick: bool, repeat: int, log=print) -> list[Row]:
    B, K = (2, 8) if quick else (4, 32)
    pair_sizes = [8, 16] if quick else [32, 64]
    scale_sizes = [8, 16, 32] if quick else [32, 64, 128]
    rows: list[Row] = []
    for label, name in CELLS.items():
        spec = recdsl.load(name)
        fast = spec(K=K, V=K, backend="torch")
        ref = spec(K=K, V=K, backend="reference")
        wave = spec(K=K, V=K, backend="torch")
        wave._program.grid_loop = None          # the torch fallback: anti-diagonal wavefront
        for mode in ("forward", "forward+backward"):
            for n in pair_sizes:
                xs = inputs(name, B, n, n, K, K)
                t_ours, t_ref, (o1, o2) = timed_pair(_runner(fast, xs, mode), _runner(ref, xs, mode), repeat)
                kernel = ",".join(dict.fromkeys(fast.ran))
                target = TARGET if (mode == "forward" and n == pair_sizes[-1]) else None
                rows.append(Row("pair", label, mode, n, n, t_ours, "reference", t_ref, t_ref / t_ours, target,
                                None if target is None else t_ref / t_ours >= target,
                                max_rel_err=disagreement(o1, o2), kernel=kernel))
                log(f"  {label} {mode} {n}x{n}: torch {t_ours:.1f} ms, reference {t_ref:.1f} ms")
                if n == pair_sizes[-1] and label == "pLSTM P-mode":
                    t_ours, t_wave, (o1, o3) = timed_pair(_runner(fast, xs, mode), _runner(wave, xs, mode), repeat)
                    rows.append(Row("pair", label, mode, n, n, t_ours, "torch wavefront", t_wave, t_wave / t_ours,
                                    max_rel_err=disagreement(o1, o3), kernel=kernel))
            # the sizes interleaved too (32², 64², 128², 32², ...): the machine's load moves them alike
            runs = {n: _runner(fast, inputs(name, B, n, n, K, K), mode) for n in scale_sizes}
            medians, _ = interleaved(runs, repeat)
            first_t = first_cells = None
            for n in scale_sizes:
                t = medians[n]
                cells = n * n
                if first_t is None:
                    first_t, first_cells = t, cells
                exp = None if cells == first_cells else math.log(t / first_t) / math.log(cells / first_cells)
                target = LINEAR_EXPONENT if exp is not None and n == scale_sizes[-1] else None
                rows.append(Row("scaling", label, mode, n, n, t, us_per_cell=t * 1e3 / cells, exponent=exp,
                                target=target, met=None if target is None else exp <= target,
                                kernel=",".join(dict.fromkeys(fast.ran))))
                log(f"  {label} {mode} {n}x{n}: torch {t:.1f} ms")
    return rows


def table(rows: list[Row], B: int, K: int) -> str:
    head = ("cell", "mode", "grid", "torch ms", "anchor", "anchor ms", "ratio", "us/cell", "exponent", "target", "met")
    body = []
    for r in rows:
        if r.kind == "pair":
            tgt = f">= {r.target:g}x" if r.target else "-"
        else:
            tgt = f"exp <= {r.target:g}" if r.target else "-"
        body.append((r.cell, r.mode, f"{r.X}x{r.Y}", f"{r.torch_ms:.1f}", r.anchor or "-",
                     f"{r.anchor_ms:.1f}" if r.anchor_ms else "-", f"{r.ratio:.1f}x" if r.ratio else "-",
                     f"{r.us_per_cell:.2f}" if r.us_per_cell else "-",
                     f"{r.exponent:.2f}" if r.exponent is not None else "-", tgt,
                     "-" if r.met is None else "ok" if r.met else "BELOW"))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    right = {3, 5, 6, 7, 8}
    fmt = lambda x: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(x, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in body])


NOTES = """notes: B = {B}, K = V = {K} (each edge state K x V), fp32, {threads} thread(s).
  ratio = anchor ms / torch ms (> 1: torch faster); target: the 64x64 forward against the reference (>= 20x),
    the scaling exponent from 32x32 to 128x128 (<= 1.15: about linear).
  torch: the torch backend as a user gets it (on CPU: one generated C loop over the cells, raster order,
    derived backward; kernel {kernel}). reference: the reference backend, one cell at a time.
  torch wavefront: the torch backend's fallback for tensors off the CPU or without a C compiler.
  us/cell: torch ms * 1000 / (X*Y); exponent: log(t / t_first) / log(cells / cells_first) over the scaling
    rows (1.0 = linear). The reference is not run at 128x128 (seconds per forward, tens of seconds per
    forward+backward); its 32x32 and 64x64 rows give the ratio.
  Every state of every cell is an output of a grid layer ([B, X, Y, K, V] for each of Cr, Cd: 2 x 64 MiB at
    64x64, B = 4). Fresh blocks that large cost page faults on first touch, here more than the C loop itself
    and growing faster than the grid; the torch backend recycles its output blocks once nothing references
    them (grid_loop.buffer: here the previous repetition's outputs, dropped before the next call, as in a
    training loop); the reference allocates fresh ones (its per-cell tensors are small).
  This machine is shared (2 cores, other jobs running): absolute times move between runs by 2x and more;
    the ratios within one run, timed interleaved, are what this file reports."""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch / OpenMP threads (default 1: on a shared machine a second thread waits for a core)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved runs per pair (default 5; --quick 2)")
    ap.add_argument("--out", default=None, help="also write the table here (default without --quick: "
                                                "benchmarks/grid_latest.txt)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    repeat = a.repeat or (2 if a.quick else 5)
    B, K = (2, 8) if a.quick else (4, 32)
    t0 = time.perf_counter()
    rows = bench(a.quick, repeat, log=lambda s: print(s, file=sys.stderr))
    kernel = next((r.kernel for r in rows if r.kernel), "?")
    warnings_ = [f"WARNING {r.cell} {r.mode} {r.X}x{r.Y}: torch and {r.anchor} disagree, max rel. error "
                 f"{r.max_rel_err:.2e} > {TOL:g}" for r in rows if r.max_rel_err is not None and r.max_rel_err > TOL]
    text = "\n".join([f"$ {' '.join([os.path.relpath(sys.executable), *([sys.argv[0]] + (argv or sys.argv[1:]))])}",
                      f"{env_line(repeat)}; {time.perf_counter() - t0:.0f} s in all", "",
                      table(rows, B, K), *warnings_, "", NOTES.format(B=B, K=K, kernel=kernel, threads=a.threads)])
    print(text)
    out = a.out or (None if a.quick else str(ROOT / "benchmarks" / "grid_latest.txt"))
    if out:
        Path(out).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
