"""Training (forward + backward) and inference of recdsl's `torch` backend against anchors,
per class, as ratios measured in one run (CPU, fp32, 2 threads).

    .venv/bin/python benchmarks/bench_train.py [--quick] [--only lstm,gla,nonlinear,...] [--out file.txt]

Modes: inference = forward under torch.no_grad(); training = forward + backward of
out.pow(2).mean() with inputs and parameters requiring grad. Each pair is timed
interleaved (ours, anchor, ours, anchor, ...) after one warm-up of each, and the median
kept; the warm-up outputs are compared (a WARNING row when ours and the anchor disagree).
Anchors: torch.nn.LSTM/GRU, fla-core's naive references (n/a when fla is missing),
hand-written per-step torch loops, and recdsl's `reference` backend (a plain per-step
loop of generated torch code, one line per operation of the step, autograd through it)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import recdsl

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "benchmarks" / "cells"
NONLINEAR = sorted(p.stem for p in (ROOT / "stdlib" / "nonlinear").glob("*.rec"))
NEW_CELLS = ("alrnn", "cfc", "yaad")

from bench_torch import DELTANET  # noqa: E402  (the same cell as the forward benchmark: q scaled, as fla)
# the timing helpers and anchors `recdsl bench` runs too
from recdsl.bench import (TOL, cell_dims, disagreement, env_line, first, inference, leaves,  # noqa: E402,F401
                          make_inputs, timed_pair, torch_nn_twin, training)
from recdsl.bench import fla as _fla, ms as _ms  # noqa: E402


# ----------------------------------------------------------------------------- one comparison
class Bench:
    """Collects rows; `pair` times one workload in both modes against one anchor."""

    def __init__(self, repeat: int):
        self.repeat, self.rows, self.warnings = repeat, [], []

    def pair(self, name, layer, xs, shape, anchor_name, anchor, anchor_leaves, targets, repeat=None):
        """`anchor()` returns the output in recdsl's layout; `targets`: mode -> target ratio
        (None: timed for information). A None anchor is a missing package (n/a). `repeat`:
        more interleaved runs where two close timings decide a target."""
        repeat = repeat or self.repeat
        cls = classes(layer)
        ours_leaves = list(xs.values()) + list(layer.parameters())
        ours = lambda: first(layer(**xs))  # noqa: E731
        for mode, target in targets.items():
            if anchor is None:
                run_ours = inference(ours) if mode == "inference" else training(ours, ours_leaves)
                t_ours = statistics.median(_ms(run_ours) for _ in range(repeat + 1))
                self.rows.append((name, cls, shape, mode, t_ours, anchor_name, None, target))
                continue
            if mode == "inference":
                fns = inference(ours), inference(anchor)
            else:
                fns = training(ours, ours_leaves), training(anchor, anchor_leaves)
            t_ours, t_anchor, (o1, o2) = timed_pair(*fns, repeat)
            self.rows.append((name, cls, shape, mode, t_ours, anchor_name, t_anchor, target))
            err = disagreement(o1, o2)
            if err > TOL:
                self.warnings.append(f"WARNING {name} ({mode}): recdsl and {anchor_name} disagree, "
                                     f"max rel. error {err:.2e} > {TOL:g}")


def classes(layer) -> str:
    seen = [s.cls for s in layer.compiled.plan.stages]
    return ", ".join(dict.fromkeys(seen)) or "hoisted"


# ----------------------------------------------------------------------------- LSTM / GRU vs torch.nn
def bench_torch_nn(bench: Bench, name: str, quick: bool):
    B, T, H = (16, 64, 256) if quick else (16, 256, 256)
    layer = recdsl.load(name)(D=H, H=H, backend="torch")
    ref = torch_nn_twin(name, layer)
    xs = {"x": torch.randn(B, T, H).requires_grad_()}
    bench.pair(name.upper(), layer, xs, f"B={B} T={T} D=H={H}", f"torch.nn.{name.upper()}",
               lambda: ref(xs["x"])[0], [xs["x"], *ref.parameters()], {"inference": 1.0, "training": 1.0},
               repeat=3 * bench.repeat)   # both near 1x: more runs against this machine's noise


# ----------------------------------------------------------------------------- GLA, DeltaNet vs fla
def _qkv(B, T, NH, K):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, NH, K, generator=g) for _ in range(3))
    return q, F.normalize(k, dim=-1), v


def bench_gla(bench: Bench, quick: bool):
    B, T, NH, K = (2, 256, 4, 64) if quick else (2, 1024, 4, 64)
    q, k, v = _qkv(B, T, NH, K)
    gk = F.logsigmoid(torch.randn(B, T, NH, K)) / 16
    layer = recdsl.load("gla")(K=K, V=K, heads=NH, backend="torch")
    xs = dict(zip("q k v gk".split(), leaves(q, k, v, gk)))
    naive = _fla("fla.ops.gla.naive", "naive_recurrent_gla")
    anchor = (lambda: naive(**xs)[0]) if naive else None
    bench.pair("GLA", layer, xs, f"B={B} T={T} H={NH} K=V={K}", "fla naive_recurrent_gla", anchor,
               list(xs.values()), {"inference": None, "training": 5.0})


def bench_deltanet(bench: Bench, quick: bool):
    B, T, NH, K = (2, 256, 4, 64) if quick else (2, 1024, 4, 64)
    q, k, v = _qkv(B, T, NH, K)
    beta = torch.rand(B, T, NH)
    layer = recdsl.load(DELTANET)(K=K, V=K, heads=NH, backend="torch")
    xs = dict(zip("q k v beta".split(), leaves(q, k, v, beta)))
    chunkwise = _fla("fla.ops.delta_rule.naive", "delta_rule_chunkwise")
    ins = leaves(*(x.transpose(1, 2) for x in (q, k, v, beta)))   # fla's [B, H, T, ...] layout
    anchor = (lambda: chunkwise(*ins, chunk_size=32)[0].transpose(1, 2)) if chunkwise else None
    bench.pair("DeltaNet", layer, xs, f"B={B} T={T} H={NH} K=V={K}", "fla delta_rule_chunkwise", anchor, ins,
               {"inference": None, "training": 2.0})


# ----------------------------------------------------------------------------- nonlinear cells vs per-step loops
def bench_nonlinear(bench: Bench, name: str, quick: bool, stdlib: bool = True):
    """A stdlib cell against the reference backend's per-step loop (and lstm / gru against
    a hand-written one), or one of benchmarks/cells/ against its hand-written loop."""
    B, T = (4, 256) if quick else (4, 1024)
    spec = recdsl.load(name if stdlib else str(CELLS / f"{name}.rec"))
    if spec.cell.over != "seq":
        return
    dims = cell_dims(spec)
    layer = spec(**dims, backend="torch")
    ref = spec(**dims, backend="reference")
    ref.load_state_dict(layer.state_dict())
    xs = make_inputs(layer, B, T)
    shape = f"B={B} T={T} " + " ".join(f"{d}={n}" for d, n in dims.items())
    targets = {"inference": 3.0, "training": 3.0}
    if name in HAND and (not stdlib or name in ("lstm", "gru")):   # the loops read these cells' params
        bench.pair(name, layer, xs, shape, "hand-written loop", lambda: HAND[name](layer, xs),
                   list(xs.values()) + list(layer.parameters()), targets)
    if stdlib:
        bench.pair(name, layer, xs, shape, "reference loop", lambda: first(ref(**xs)),
                   list(xs.values()) + list(ref.parameters()), targets)


# The per-step loops a researcher writes by hand (as nn.LSTMCell / nn.GRUCell compute a
# step; per-token work that reads no state, like key normalisation, before the loop).
def lstm_loop(m, xs):
    x = xs["x"]
    h = c = x.new_zeros(x.shape[0], m.W_hh.shape[1])
    out = []
    for t in range(x.shape[1]):
        i, f, g, o = (F.linear(x[:, t], m.W_ih, m.b_ih) + F.linear(h, m.W_hh, m.b_hh)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h)
    return torch.stack(out, 1)


def gru_loop(m, xs):
    x = xs["x"]
    h = x.new_zeros(x.shape[0], m.W_hh.shape[1])
    out = []
    for t in range(x.shape[1]):
        xr, xz, xn = F.linear(x[:, t], m.W_ih, m.b_ih).chunk(3, -1)
        hr, hz, hn = F.linear(h, m.W_hh, m.b_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        out.append(h)
    return torch.stack(out, 1)


def alrnn_loop(m, xs):
    x = xs["x"]
    N = m.dims["N"]
    z = x.new_zeros(x.shape[0], m.A.shape[0])
    out = []
    for t in range(x.shape[1]):
        phi = torch.cat([z[:, :N], torch.relu(z[:, N:])], -1)
        z = m.A * z + F.linear(phi, m.W) + F.linear(x[:, t], m.C) + m.h0
        out.append(z)
    return torch.stack(out, 1)


def cfc_loop(m, xs):
    x, dt = xs["x"], xs["dt"]
    h = x.new_zeros(x.shape[0], m.W_1.shape[0])
    out = []
    for t in range(x.shape[1]):
        bb = 1.7159 * torch.tanh(0.666 * F.linear(torch.cat([x[:, t], h], -1), m.W_bb, m.b_bb))
        f1, f2 = torch.tanh(F.linear(bb, m.W_1, m.b_1)), torch.tanh(F.linear(bb, m.W_2, m.b_2))
        gate = torch.sigmoid(F.linear(bb, m.W_a, m.b_a) * dt[:, t, None] + F.linear(bb, m.W_b, m.b_b))
        h = f1 * (1 - gate) + gate * f2
        out.append(h)
    return torch.stack(out, 1)


def yaad_loop(m, xs):
    q, k, v = xs["q"] * xs["q"].shape[-1] ** -0.5, xs["k"], xs["v"]
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    a, lr = torch.sigmoid(xs["ga"])[..., None, None], torch.sigmoid(xs["gl"])[..., None, None]
    delta = m.ir.hypers["delta"]
    M = v.new_zeros(v.shape[0], k.shape[-1], v.shape[-1])
    out = []
    for t in range(v.shape[1]):
        err = ((k[:, t, None] @ M)[:, 0] - v[:, t]).clamp(-delta, delta)
        M = a[:, t] * M - lr[:, t] * k[:, t, :, None] * err[:, None, :]
        out.append((q[:, t, None] @ M)[:, 0])
    return torch.stack(out, 1)


HAND = {"lstm": lstm_loop, "gru": gru_loop, "alrnn": alrnn_loop, "cfc": cfc_loop, "yaad": yaad_loop}


# ----------------------------------------------------------------------------- the run
def benches() -> dict:
    """--only keys -> (group, function of (bench, quick))."""
    out = {n: ("nn", lambda b, q, n=n: bench_torch_nn(b, n, q)) for n in ("lstm", "gru")}
    out["gla"] = ("fla", bench_gla)
    out["deltanet"] = ("fla", bench_deltanet)
    for n in NONLINEAR:
        out[f"nl-{n}"] = ("nonlinear", lambda b, q, n=n: bench_nonlinear(b, n, q))
    for n in NEW_CELLS:
        out[n] = ("cells", lambda b, q, n=n: bench_nonlinear(b, n, q, stdlib=False))
    return out


NOTES = """notes: ratio = anchor ms / recdsl ms (> 1: recdsl faster); met: ok = ratio >= target, '-' = no target.
  class: the classes of the cell's stages as recdsl's plan finds them.
  reference loop: recdsl's `reference` backend, a plain per-step torch loop of generated code (one torch op
    per operation of the step, every matmul per step, autograd through the loop); the hand-written rows for
    lstm and gru show what it costs against a loop written by hand (F.linear per step, as nn.LSTMCell).
  hand-written loop: written in this file, per step as a researcher would (per-token work that reads no
    state, such as key normalisation, before the loop); the anchor of benchmarks/cells/*.rec.
  slstm runs NH=4 heads of H=64. DeltaNet: q scaled by K**-0.5 and L2-normalised keys, as fla's naive code."""


def table(rows) -> str:
    head = ("workload", "class", "shape", "mode", "recdsl ms", "anchor", "anchor ms", "ratio", "target", "met")
    body = []
    for name, cls, shape, mode, ours, anchor, base, target in rows:
        ratio = base / ours if base else None
        ok = "-" if target is None or ratio is None else "ok" if ratio >= target else "BELOW"
        body.append((name, cls, shape, mode, f"{ours:.1f}", anchor, f"{base:.1f}" if base else "n/a",
                     f"{ratio:.2f}x" if ratio else "n/a", f">= {target:g}x" if target else "-", ok))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    right = {4, 6, 7}
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--only", default=None,
                    help="comma-separated keys or groups: lstm,gru,gla,deltanet,nl-<stdlib cell>,alrnn,cfc,yaad; "
                         "groups nn, fla, nonlinear, cells")
    ap.add_argument("--out", default=None, help="also write the table here (default without --quick: "
                                                "benchmarks/train_latest.txt)")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else None
    bench = Bench(repeat=3 if a.quick else 5)
    t0 = time.perf_counter()
    for key, (group, fn) in benches().items():
        if only is None or key in only or group in only:
            fn(bench, a.quick)
    lines = [f"$ {' '.join([os.path.relpath(sys.executable), *sys.argv])}",
             f"{env_line(bench.repeat)}; {time.perf_counter() - t0:.0f} s in all", "",
             table(bench.rows), *bench.warnings, "", NOTES]
    text = "\n".join(lines)
    print(text)
    out = a.out or (None if a.quick else str(ROOT / "benchmarks" / "train_latest.txt"))
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
