"""CPU benchmarks of the `torch` backend against the per-step loop a researcher writes and
the anchors' CPU paths, as ratios measured in one run (fp32, 2 threads).

    .venv/bin/python benchmarks/bench_torch.py [--quick] [--png out.png]

Anchors are test/benchmark-only dependencies (fla-core's naive references, mlstm-kernels'
native torch kernels, torch.nn.LSTM); a missing one shows as n/a."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import recdsl

torch.set_num_threads(2)

HGRN = """
cell DiagScan(D):
    input x[D], g[D]
    state h[D] = 0
    h' = exp(g) * h + x
    output h'
"""
RETNET = """
cell ScalarDecay(K, V):
    input q[K], k[K], v[V], g[]
    state S[K, V] = 0
    S' = exp(g) * S + outer(k, v)
    output o = (q * K**-0.5) @ S'
"""
DELTANET = """
cell DeltaNet(K, V):
    input q[K], k[K], v[V], beta[]
    state S[K, V] = 0
    S' = S - beta * outer(k, k @ S) + beta * outer(k, v)
    output o = (q * K**-0.5) @ S'
"""


def timeit(fn, repeat: int, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up (and JIT builds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd_bwd(fn, inputs):
    def run():
        for x in inputs:
            x.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


def bench_diag(rows, quick):
    B, T, D = (4, 1024, 256) if quick else (4, 4096, 512)
    layer = recdsl.load(HGRN)(D=D, backend="torch")
    x = torch.randn(B, T, D, requires_grad=True)
    g = (-torch.rand(B, T, D) * 0.1).requires_grad_()

    def loop():
        h, out = torch.zeros(B, D), []
        for t in range(T):
            h = torch.exp(g[:, t]) * h + x[:, t]
            out.append(h)
        return torch.stack(out, 1)
    with torch.no_grad():
        ours, base = timeit(lambda: layer(x=x, g=g), 5), timeit(loop, 3)
    rows.append(("diagonal scan fwd", f"B={B} T={T} D={D}", ours, "per-step loop", base, ">= 5x"))
    ours = timeit(fwd_bwd(lambda: layer(x=x, g=g), [x, g]), 3)
    base = timeit(fwd_bwd(loop, [x, g]), 1, warm=False)  # minutes per run: autograd through 4096 steps
    rows.append(("diagonal scan fwd+bwd", f"B={B} T={T} D={D}", ours, "per-step loop", base, ">= 5x"))


def _qkv(BH, T, K, V):
    q, k, v = torch.randn(1, T, BH, K), torch.randn(1, T, BH, K) / K ** 0.5, torch.randn(1, T, BH, V)
    return q, k, v


def bench_retnet(rows, quick):
    BH, T, K = (8, 512, 64) if quick else (8, 2048, 64)
    q, k, v = _qkv(BH, T, K, K)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, BH)) / 16
    layer = recdsl.load(RETNET)(K=K, V=K, heads=BH, backend="torch")
    with torch.no_grad():
        ours = timeit(lambda: layer(q=q, k=k, v=v, g=g), 5)
        try:
            from fla.ops.simple_gla.naive import naive_chunk_simple_gla
            base = timeit(lambda: naive_chunk_simple_gla(q, k, v, g), 5)
        except ImportError:
            base = None
    rows.append(("scalar decay (RetNet/SSD)", f"BH={BH} T={T} K=V={K}", ours, "fla naive_chunk_simple_gla",
                 base, ">= 1x"))


# The same retention cell in the spellings users write: the decay's spelling must not
# decide the speed (each is planned and run chunkwise, log space or signed).
SPELLINGS = {
    "0.9": ("", "0.9"), "hyper gamma=0.9": (", gamma=0.9", "gamma"), "exp(g)": ("", "exp(g)"),
    "sigmoid(z)": ("", "sigmoid(z)"), "param (stdlib retnet)": None,
}


def _retention(spelling: str) -> str:
    hyper, decay = SPELLINGS[spelling]
    extra = ", g[]" if "g)" in decay else ", z[]" if "z)" in decay else ""
    return (f"cell Retention(K, V{hyper}):\n    input q[K], k[K], v[V]{extra}\n    state S[K, V] = 0\n"
            f"    S' = {decay} * S + outer(k, v)\n    output o = (q * K**-0.5) @ S'\n")


def bench_decay_spellings(rows, quick):
    BH, T, K = (8, 512, 64) if quick else (8, 2048, 64)
    q, k, v = _qkv(BH, T, K, K)
    gates = {"g": torch.full((1, T, BH), -0.1053605), "z": torch.full((1, T, BH), 2.1972246)}   # decay 0.9

    def loop():
        S, out = torch.zeros(1, BH, K, K), []
        for t in range(T):
            S = 0.9 * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            out.append((q[:, t, :, None, :] * K ** -0.5 @ S)[..., 0, :])
        return torch.stack(out, 1)
    with torch.no_grad():
        base = timeit(loop, 2)
        for spelling in SPELLINGS:
            if SPELLINGS[spelling] is None:
                layer = recdsl.load("retnet")(K=K, V=K, NH=BH, backend="torch")
                ins = {}
            else:
                layer = recdsl.load(_retention(spelling))(K=K, V=K, heads=BH, backend="torch")
                ins = {n: gates[n] for n in layer.spec.cell.inputs if n in gates}
            ours = timeit(lambda: layer(q=q, k=k, v=v, **ins), 5)
            rows.append((f"retention, decay {spelling}", f"BH={BH} T={T} K=V={K}", ours, "per-step loop", base,
                         ">= 7x"))


def bench_gla(rows, quick):
    BH, T, K = (8, 512, 64) if quick else (8, 2048, 64)
    q, k, v = _qkv(BH, T, K, K)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, T, BH, K)) / 16
    layer = recdsl.load("gla")(K=K, V=K, heads=BH, backend="torch")

    def loop():
        S, out = torch.zeros(1, BH, K, K), []
        for t in range(T):
            S = torch.exp(gk[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            out.append((q[:, t, :, None, :] * K ** -0.5 @ S)[..., 0, :])
        return torch.stack(out, 1)
    with torch.no_grad():
        ours, base = timeit(lambda: layer(q=q, k=k, v=v, gk=gk), 5), timeit(loop, 2)
    rows.append(("vector decay (GLA)", f"BH={BH} T={T} K=V={K}", ours, "per-step loop", base, ">= 7x"))


def bench_deltanet(rows, quick):
    BH, T, K = (8, 512, 64) if quick else (8, 2048, 64)
    q, k, v = _qkv(BH, T, K, K)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, T, BH)
    layer = recdsl.load(DELTANET)(K=K, V=K, heads=BH, backend="torch")
    with torch.no_grad():
        ours = timeit(lambda: layer(q=q, k=k, v=v, beta=beta), 5)
        try:
            from fla.ops.delta_rule.naive import delta_rule_chunkwise
            tr = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
            bt = beta.transpose(1, 2).contiguous()
            base = timeit(lambda: delta_rule_chunkwise(*tr, bt, chunk_size=32), 3)
        except ImportError:
            base = None
    rows.append(("delta rule (DeltaNet)", f"BH={BH} T={T} K=V={K}", ours, "fla delta_rule_chunkwise", base, ">= 1x"))


def bench_mlstm(rows, quick):
    BH, T, K = (8, 512, 64) if quick else (8, 2048, 64)
    q, k, v = _qkv(BH, T, K, K)
    ig, fg = torch.randn(1, T, BH), torch.randn(1, T, BH) + 3
    layer = recdsl.load("mlstm")(K=K, V=K, heads=BH, backend="torch")
    with torch.no_grad():
        ours = timeit(lambda: layer(q=q, k=k, v=v, ig=ig, fg=fg), 5)
        try:
            from mlstm_kernels.torch import get_mlstm_kernel
            kern = get_mlstm_kernel("chunkwise--native_autograd")
            tr = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
            i2, f2 = ig.transpose(1, 2).contiguous(), fg.transpose(1, 2).contiguous()
            base = timeit(lambda: kern(*tr, i2, f2, chunk_size=64), 5)
        except ImportError:
            base = None
    rows.append(("mLSTM", f"BH={BH} T={T} K=V={K}", ours, "mlstm-kernels chunkwise--native_autograd", base, ">= 1x"))


def bench_lstm(rows, quick):
    B, T, H = (16, 128, 256) if quick else (16, 512, 256)
    layer = recdsl.load("lstm")(D=H, H=H, backend="torch")
    ref = torch.nn.LSTM(H, H, batch_first=True)
    x = torch.randn(B, T, H)
    with torch.no_grad():
        ours, base = timeit(lambda: layer(x=x), 3), timeit(lambda: ref(x), 3)
    rows.append(("LSTM", f"B={B} T={T} D=H={H}", ours, "torch.nn.LSTM", base, ">= 1/1.3x"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--png", default=None, help="also save a bar plot of the speed-ups")
    ap.add_argument("--only", default=None, help="comma-separated subset: diag,retnet,spellings,gla,deltanet,mlstm,lstm")
    a = ap.parse_args()
    rows: list = []
    benches = {"diag": bench_diag, "retnet": bench_retnet, "spellings": bench_decay_spellings, "gla": bench_gla,
               "deltanet": bench_deltanet,
               "mlstm": bench_mlstm, "lstm": bench_lstm}
    for name, fn in benches.items():
        if a.only and name not in a.only.split(","):
            continue
        fn(rows, a.quick)
    print(f"{'workload':28s} {'shape':22s} {'recdsl ms':>10s} {'baseline':>42s} {'base ms':>9s} {'speed-up':>9s} target")
    for name, shape, ours, base_name, base, target in rows:
        ratio = f"{base / ours:8.2f}x" if base else "     n/a"
        base_s = f"{base:9.1f}" if base else "      n/a"
        print(f"{name:28s} {shape:22s} {ours:10.1f} {base_name:>42s} {base_s} {ratio} {target}")
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [r[0] for r in rows if r[4]]
        ratios = [r[4] / r[2] for r in rows if r[4]]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names, ratios)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speed-up of recdsl's torch backend over the baseline (CPU, 2 threads)")
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)


if __name__ == "__main__":
    main()
