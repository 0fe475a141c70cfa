"""The `newton` backend (parallel Newton, backends/newton) against the `torch` backend (its
generated C loop) on the same cell in one run: forward (no grad) and training (forward +
backward of out.pow(2).mean()), CPU fp32, 2 threads; with Newton's iteration counts. The
`reference` backend (a per-step torch loop: what ParaRNN calls its sequential mode) is timed
beside them, forward only.

    .venv/bin/python benchmarks/bench_newton.py [--repeat 15] [--threads 2] [--out benchmarks/newton_latest.txt]

The issue's workload is IndRNN (stdlib `indrnn`: h' = relu(W x + u * h + b), a diagonal
Jacobian) at B=4, T=1024, D=H=64; ParaGRU / ParaLSTM (Danieli et al.'s cells) and a tanh
cell are timed for information. Pairs are timed interleaved after one warm-up each; the
medians are kept, and the warm-up outputs compared."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import recdsl
from recdsl.bench import env_line, inference, timed_pair, training

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]

TANH = """
cell TanhDiag(D):
    input x[D]
    param W[D, D] ~ normal(0, 1/sqrt(D))
    param w[D] ~ uniform(-0.9, 0.9)
    state h[D] = 0
    h' = tanh(W @ x + w * h)
    output h'
"""

CASES = [("indrnn", "indrnn", {"D": 64, "H": 64}), ("paragru", "paragru", {"D": 64, "H": 64}),
         ("paralstm", "paralstm", {"D": 64, "H": 64}), ("tanh (unseen)", TANH, {"D": 64})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"# bench_newton: newton vs torch backend, B={args.B} T={args.T}, dims 64, {args.threads} thread(s)",
             "# " + env_line(args.repeat),
             "# the machine was shared with other jobs while this ran (2 cores, load ~4): absolute times vary, "
             "ratios less",
             f"{'cell':<15} {'mode':<10} {'newton ms':>10} {'torch ms':>10} {'speed-up':>9} "
             f"{'iters':>6} {'evals':>6} {'residual':>9} {'max err':>9} {'per-step loop ms':>17} {'vs loop':>8}"]
    print("\n".join(lines), flush=True)
    for name, what, dims in CASES:
        spec = recdsl.load(what)
        torch.manual_seed(0)
        tl = spec(backend="torch", **dims)
        nw = spec(backend="newton", **dims)
        nw.load_state_dict(tl.state_dict())
        rf = spec(backend="reference", **dims)
        rf.load_state_dict(tl.state_dict())
        g = torch.Generator().manual_seed(1)
        xs = {n: torch.randn((args.B, args.T) + tl.ir.concrete(v.shape), generator=g) * 0.5
              for n, v in spec.cell.inputs.items()}
        leaves_n = list(xs.values()) + list(nw.parameters())
        leaves_t = list(xs.values()) + list(tl.parameters())
        fn_n = lambda: recdsl_first(nw(**xs))   # noqa: E731
        fn_t = lambda: recdsl_first(tl(**xs))   # noqa: E731
        for mode in ("forward", "training"):
            if mode == "forward":
                a, b = inference(fn_n), inference(fn_t)
            else:
                for x in xs.values():
                    x.requires_grad_(True)
                a, b = training(fn_n, leaves_n), training(fn_t, leaves_t)
            t_n, t_t, (o_n, o_t) = timed_pair(a, b, args.repeat)
            rep = nw.last_solve[0]
            err = float((o_n.detach() - o_t.detach()).abs().max())
            loop = ""
            if mode == "forward":
                t_n2, t_r, _ = timed_pair(a, inference(lambda: recdsl_first(rf(**xs))), max(3, args.repeat // 3))
                loop = f" {t_r:>17.2f} {t_r / t_n2:>7.2f}x"
            row = (f"{name:<15} {mode:<10} {t_n:>10.2f} {t_t:>10.2f} {t_t / t_n:>8.2f}x "
                   f"{rep.iterations:>6} {rep.evaluations:>6} {rep.residual:>9.1e} {err:>9.1e}{loop}")
            print(row, flush=True)
            lines.append(row)
    lines.append("# vs loop = reference (per-step torch loop) ms / newton ms, timed as its own interleaved pair")
    lines.append("# speed-up = torch ms / newton ms; iters = Newton updates, evals = vectorised step+Jacobian "
                 "evaluations (besides the warm start), residual = final max|f(h_{t-1}, x_t) - h_t| (fp32 tol 1e-5)")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def recdsl_first(out):
    o = out[0]
    return o[0] if isinstance(o, tuple) else o


if __name__ == "__main__":
    sys.exit(main())
