"""Decoding: per-token time of `layer.step()` (recdsl's torch backend) against the steps
a user would otherwise call, as ratios measured in one run (CPU, fp32, 2 threads).

    .venv/bin/python benchmarks/bench_decode.py [--quick] [--out file.txt]

LSTM / GRU against torch.nn.LSTMCell / GRUCell (oneDNN / MKL GEMMs and a fused gate
kernel); GLA and DeltaNet (heads, K = V = 64) against the per-token update written in
torch ops, as a decode loop would. Each token is one call with the state carried over;
the two sides are timed interleaved over the same tokens, the median of the repeats kept,
and the states they reach compared (a WARNING row when they disagree)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import recdsl

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def _torch_cell(name: str, cell_type):
    """A recdsl stdlib cell and the torch.nn cell of the same layout and weights (LSTM, GRU)."""
    def make(B, H):
        layer = recdsl.load(name)(D=H, H=H, backend="torch")
        cell = cell_type(H, H)
        with torch.no_grad():
            for a, b in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                getattr(layer, a).copy_(getattr(cell, b))

        def anchor(x, st):
            st = cell(x, st) if st is not None else cell(x)
            return st, st
        # the state compared: h (an LSTMCell returns (h, c))
        return layer, anchor, {"x": (H,)}, lambda st: st[0] if isinstance(st, tuple) else st
    return make


def _gla(B, H, NH=4):
    K = V = H // NH
    layer = recdsl.load("gla")(K=K, V=V, heads=NH, backend="torch")
    scale = K ** -0.5

    def anchor(x, S):
        q, k, v, gk = x
        S = (torch.exp(gk)[..., None] * S if S is not None else 0) + k[..., None] * v[..., None, :]
        return ((q * scale)[..., None, :] @ S)[..., 0, :], S
    return layer, anchor, {"q": (NH, K), "k": (NH, K), "v": (NH, V), "gk": (NH, K)}, lambda S: S


def _deltanet(B, H, NH=4):
    K = V = H // NH
    layer = recdsl.load("deltanet")(K=K, V=V, heads=NH, backend="torch")

    def anchor(x, S):
        q, k, v, beta = x
        S = S if S is not None else torch.zeros(q.shape[:-1] + (K, V))
        kS = (k[..., None, :] @ S)[..., 0, :]
        S = S + beta[..., None, None] * k[..., None] * (v - kS)[..., None, :]
        return (q[..., None, :] @ S)[..., 0, :], S
    return layer, anchor, {"q": (NH, K), "k": (NH, K), "v": (NH, V), "beta": (NH,)}, lambda S: S


CASES = (("LSTM", _torch_cell("lstm", torch.nn.LSTMCell), "torch.nn.LSTMCell"),
         ("GRU", _torch_cell("gru", torch.nn.GRUCell), "torch.nn.GRUCell"),
         ("GLA", _gla, "per-token torch update"), ("DeltaNet", _deltanet, "per-token torch update"))


def _tokens(shapes, B, n):
    out = []
    for _ in range(n):
        xs = {k: torch.randn((B,) + s) * 0.5 for k, s in shapes.items()}
        if "gk" in xs:
            xs["gk"] = torch.nn.functional.logsigmoid(xs["gk"]) / 16
        if "k" in xs and "beta" in xs:
            xs["k"] = torch.nn.functional.normalize(xs["k"], dim=-1)
            xs["beta"] = torch.sigmoid(xs["beta"])
        out.append(xs)
    return out


def run(quick: bool) -> list[dict]:
    H, tokens, repeat = (64, 8, 3) if quick else (256, 64, 9)
    rows = []
    for name, make, anchor_name in CASES:
        for B in (1, 16):
            layer, anchor, shapes, state_of = make(B, H)
            toks = _tokens(shapes, B, tokens)
            state_key = next(iter(layer.ir.states))

            def ours():
                st = None
                for xs in toks:
                    _, st = layer.step(st, **xs)
                return st[state_key]

            def theirs():
                st = None
                for xs in toks:
                    _, st = anchor(tuple(xs.values()) if len(xs) > 1 else xs["x"], st)
                return state_of(st)
            with torch.no_grad():
                agree = torch.allclose(ours(), theirs(), atol=1e-4, rtol=1e-4)
                t_ours, t_theirs = [], []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    ours()
                    t1 = time.perf_counter()
                    theirs()
                    t2 = time.perf_counter()
                    t_ours.append((t1 - t0) / tokens)
                    t_theirs.append((t2 - t1) / tokens)
            us, them = statistics.median(t_ours) * 1e6, statistics.median(t_theirs) * 1e6
            rows.append(dict(cell=name, B=B, H=H, ours_us=us, anchor=anchor_name, anchor_us=them,
                             ratio=them / us, agree=agree, fused=type(layer._step_fn).__name__ == "FusedStep"))
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'cell':9s} {'B':>3s} {'H':>4s}  {'step':9s} {'recdsl us/token':>16s}  {'anchor':24s} "
             f"{'anchor us/token':>16s}  {'ratio':>6s}"]
    for r in rows:
        lines.append(f"{r['cell']:9s} {r['B']:3d} {r['H']:4d}  {'fused C' if r['fused'] else 'reference':9s} "
                     f"{r['ours_us']:16.1f}  {r['anchor']:24s} {r['anchor_us']:16.1f}  {r['ratio']:5.2f}x"
                     + ("" if r["agree"] else "  WARNING: states disagree"))
    lines.append("ratio = anchor time / recdsl time per token (> 1: recdsl faster); GLA and DeltaNet: 4 heads, "
                 "K = V = H / 4")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    text = (f"$ .venv/bin/python benchmarks/bench_decode.py{' --quick' if args.quick else ''}\n"
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n\n" + table(run(args.quick)))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
