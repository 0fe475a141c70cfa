"""Forward time of the chunkwise DPLR delta rule (backends/torch/dplr.py) against its per-step
loop, measured in one run (torch.no_grad, fp32, 2 threads).

    .venv/bin/python benchmarks/bench_dplr.py [--N 8] [--T 2048] [--K 64] [--V 64]
                                              [--chunks 16 32 64] [--repeat 15] [--threads 2]

The runs of the loop and of each chunk size are interleaved and each is timed by its fastest
run (the machine is shared: the minimum is the least disturbed run); the ratio is
loop / chunked. rel.err is the float32 chunked output against the float32 loop."""
from __future__ import annotations

import argparse
import time

import torch

from recdsl.backends.torch.dplr import chunk_dplr, naive_dplr


def inputs(N, T, K, V, seed=0):
    """KDA-like inputs: normalised keys, β in (0, 1), per-key log decays mostly near 0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    q = r(N, T, K) * K ** -0.5
    kappa = torch.nn.functional.normalize(r(N, T, K), dim=-1)
    beta = torch.sigmoid(r(N, T, 1))
    g = torch.nn.functional.logsigmoid(r(N, T, K) + 3)
    k, a, b = beta * kappa, -beta * kappa, kappa * torch.exp(g)
    return q, k, r(N, T, V), a, b, g, torch.zeros(N, K, V)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = inputs(args.N, args.T, args.K, args.V)
    fns = {"loop": lambda: naive_dplr(*x)}
    fns.update({C: (lambda C=C: chunk_dplr(*x, chunk=C)) for C in args.chunks})
    with torch.no_grad():
        o_ref, _ = fns["loop"]()
        err = {C: ((fns[C]()[0] - o_ref).norm() / o_ref.norm()).item() for C in args.chunks}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(args.repeat):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t0)
    t_loop = best["loop"] * 1e3
    print(f"DPLR delta rule forward, N={args.N} T={args.T} K={args.K} V={args.V}, fp32, "
          f"{torch.get_num_threads()} threads, no_grad (fastest of {args.repeat} interleaved runs)")
    print(f"  per-step loop (naive_dplr)    {t_loop:8.2f} ms")
    for C in args.chunks:
        t = best[C] * 1e3
        print(f"  chunk_dplr chunk={C:<4d}        {t:8.2f} ms   {t_loop / t:5.2f}x   rel.err {err[C]:.1e}")


if __name__ == "__main__":
    main()
