"""How a training step (forward + backward) of the chunkwise forms grows with the sequence
length, on the `torch` backend (CPU, fp32): DeltaNet (ChunkDelta) and GLA (ChunkDiag with a
per-key decay), at T = 2048 and 8192 (and 32768 with --long), in one run. A linear form
grows about 4x per 4x of T; the ratio column says how far from that each step is.

    .venv/bin/python benchmarks/bench_scaling.py [--long] [--B 1] [--heads 4] [--K 64] [--V 64]
                                                 [--repeat 3] [--threads 2]

Each figure is the fastest of `repeat` runs (the machine is shared: the minimum is the least
disturbed run), after one warm-up run; `cpu s` is the process CPU time of that run (all
threads), less sensitive to other load than wall time. At T = 32768 single tensors pass
glibc's mmap threshold (32 MB): each one is then fresh pages, faulted in on first touch (system
time that grows with the step); MALLOC_MMAP_THRESHOLD_=17179869184 in the environment keeps
them on the heap and shows the algorithm's own growth."""
from __future__ import annotations

import argparse
import time

import torch

import recdsl

CELLS = ("deltanet", "gla")


def inputs(name: str, B: int, T: int, H: int, K: int, V: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs in the ranges the cells expect: L2-normalised keys, beta in (0, 1), log decays <= 0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    xs = {"q": r(B, T, H, K) * K ** -0.5, "k": torch.nn.functional.normalize(r(B, T, H, K), dim=-1),
          "v": r(B, T, H, V)}
    if name == "deltanet":
        xs["beta"] = torch.sigmoid(r(B, T, H))
    else:
        xs["gk"] = torch.nn.functional.logsigmoid(r(B, T, H, K) + 3) / 16
    return xs


def train_step(layer, xs):
    leaves = {k: v.clone().requires_grad_() for k, v in xs.items()}
    o, _ = layer(**leaves)
    o.square().mean().backward()


def best_of(fn, repeat: int) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest run."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--long", action="store_true", help="also T = 32768")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [2048, 8192] + ([32768] if args.long else [])
    print(f"training step (forward + backward), torch backend, fp32, B={args.B} heads={args.heads} "
          f"K={args.K} V={args.V}, {torch.get_num_threads()} threads, fastest of {args.repeat}")
    print(f"  {'cell':10s} {'T':>6s} {'kernel':18s} {'wall s':>8s} {'cpu s':>8s} {'x prev':>7s} {'per 4x T':>9s}")
    for name in CELLS:
        layer = recdsl.load(name)(K=args.K, V=args.V, heads=args.heads, backend="torch")
        prev = None
        for T in lengths:
            xs = inputs(name, args.B, T, args.heads, args.K, args.V)
            t, cpu = best_of(lambda: train_step(layer, xs), args.repeat)
            kernel = ",".join(layer.ran)
            growth = "" if prev is None else f"{t / prev[1]:7.2f} {(t / prev[1]) / (T / prev[0]) * 4:9.2f}"
            print(f"  {name:10s} {T:6d} {kernel:18s} {t:8.3f} {cpu:8.3f} {growth}")
            prev = (T, t)


if __name__ == "__main__":
    main()
