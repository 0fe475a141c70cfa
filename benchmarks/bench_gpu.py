"""The GPU check (`make gpu-check`): on a CUDA machine, first correctness, then speed.

1. Correctness: every stdlib matrix-state cell (stdlib/matrix/*.rec, stdlib/delta/*.rec) on
   the triton backend in float32 against the `reference` backend in float64, small shapes:
   outputs and the gradients of inputs and parameters, by fla's error ratio
   rmse(triton - reference) / rmse(reference) <= 0.005 (outputs) and 0.008 (gradients), the
   tolerances of fla's own tests (TF32 dots on a GPU). `layer.ran` says which kernel ran.
2. Speed, `triton.testing.do_bench` (median and 20/80 % quantiles, ms), forward and
   forward + backward, bf16 inputs: the triton backend against fla's chunk ops (gla,
   simple_gla, gated_delta_rule, delta_rule; when fla imports) and, for the lstm cell,
   against torch.nn.LSTM (cuDNN) with the same weights.

Shapes: fla's own op benchmarks (benchmarks/ops/benchmark_gla.py) time B=16, H=8, D=128 over
T = 128·2^i in bf16; the defaults here are B=4, T=2048, H=16, K=V=128 (the size of a 1.3B
model's layer, within the device time of a check); --B/--T/--H/--K/--V change them. The lstm
rows take B, T and --lstm-hidden (input size = hidden size).

Works on Triton 3.6 / torch 2.11 up to Triton 3.9 / torch 2.13: do_bench is called with
(fn, warmup, rep, quantiles) only, the arguments both have.

Without CUDA it refuses (exit 2), unless --cpu-interpreter: the same code path on CPU
tensors in Triton's interpreter, tiny shapes, one timed call instead of do_bench, fla through
bench_roofline's interpreter shim (tests/triton/test_bench_gpu.py runs it).

    .venv/bin/python benchmarks/bench_gpu.py [--T 2048,4096] [--cells gla,lstm] [--skip-check]
    .venv/bin/python benchmarks/bench_gpu.py --cpu-interpreter --check-cells gla --cells gla --B 1 --T 64 --H 1 --K 16 --V 16
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

if "--cpu-interpreter" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: fla's kernels are decorated then

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

import recdsl  # noqa: E402

OUT = Path(__file__).with_name("gpu_latest.txt")
STDLIB = ROOT / "stdlib"
# cell -> (recdsl source, fla op name); the lstm is timed against torch.nn.LSTM
TIMED = {"gla": "chunk_gla", "simple_gla": "chunk_simple_gla", "gated_deltanet": "chunk_gated_delta_rule",
         "deltanet": "chunk_delta_rule", "lstm": "torch.nn.LSTM (cuDNN)"}
OUTPUT_RATIO, GRAD_RATIO = 0.005, 0.008


def matrix_cells() -> list[Path]:
    return sorted((STDLIB / "matrix").glob("*.rec")) + sorted((STDLIB / "delta").glob("*.rec"))


def err_ratio(ref: torch.Tensor, got: torch.Tensor) -> float:
    """fla's error ratio: rmse of the difference over the rms of the reference."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    scale = ref.pow(2).mean().sqrt().item()
    return (ref - got).pow(2).mean().sqrt().item() / max(scale, 1e-12)


# --- 1. correctness -----------------------------------------------------------------------

def check_cell(spec, device, B: int, T: int) -> tuple[float, float, str]:
    """(output ratio, worst gradient ratio, kernels that ran) of triton float32 vs reference float64."""
    from helpers import random_inputs
    dims = spec.analysis_dims()
    torch.manual_seed(0)
    ref = spec(backend="reference", **dims).double()
    tri = spec(backend="triton", **dims).float().to(device)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, torch.float64).items()}
    xs_tri = {k: v.detach().float().to(device).requires_grad_() for k, v in xs.items()}
    o_ref, o_tri = _outputs(ref(**xs)), _outputs(tri(**xs_tri))
    out = max(err_ratio(a, b) for a, b in zip(o_ref, o_tri))
    weights = [torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) for a in o_ref]
    leaves_ref = list(xs.values()) + list(ref.parameters())
    leaves_tri = list(xs_tri.values()) + list(tri.parameters())
    g_ref = torch.autograd.grad(sum((a * w).sum() for a, w in zip(o_ref, weights)), leaves_ref, allow_unused=True)
    g_tri = torch.autograd.grad(sum((a * w.float().to(device)).sum() for a, w in zip(o_tri, weights)), leaves_tri,
                                allow_unused=True)
    grad = max((err_ratio(a, b) for a, b in zip(g_ref, g_tri) if a is not None and b is not None), default=0.0)
    return out, grad, ",".join(tri.ran)


def _outputs(result):
    o, _state = result
    return o if isinstance(o, tuple) else (o,)


def run_checks(paths: list[Path], device, B: int, T: int, records: list) -> tuple[list[str], int]:
    lines = [f"correctness: triton float32 vs reference float64, B={B} T={T}, the cells' analysis dims; "
             f"pass: output ratio <= {OUTPUT_RATIO}, gradient ratio <= {GRAD_RATIO}",
             f"{'cell':24s} {'out ratio':>10s} {'grad ratio':>10s} {'':6s} kernel"]
    failures = 0
    for path in paths:
        for spec in recdsl.load_all(path):
            name = f"{path.parent.name}/{spec.name}"
            try:
                out, grad, ran = check_cell(spec, device, B, T)
                ok = out <= OUTPUT_RATIO and grad <= GRAD_RATIO
                lines.append(f"{name:24s} {out:10.2e} {grad:10.2e} {'ok' if ok else 'FAIL':6s} {ran}")
                records.append({"cell": name, "output_ratio": out, "grad_ratio": grad, "ran": ran, "ok": ok})
            except Exception as e:  # a cell that cannot run is a failure, reported with its reason
                ok = False
                lines.append(f"{name:24s} {'-':>10s} {'-':>10s} {'ERROR':6s} {type(e).__name__}: {str(e)[:120]}")
                records.append({"cell": name, "error": f"{type(e).__name__}: {e}", "ok": False})
            failures += not ok
            print(lines[-1], flush=True)
    return lines, failures


# --- 2. speed ------------------------------------------------------------------------------

def timer(device):
    """ms (median, 20 %, 80 %) of fn: do_bench on CUDA, one wall-clock call otherwise."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    else:
        def bench(fn):
            fn()
            started = time.perf_counter()
            fn()
            ms = (time.perf_counter() - started) * 1e3
            return ms, ms, ms
    return bench


def shim(device):
    """fla in Triton's interpreter when on CPU (bench_roofline's test-only shim)."""
    if device.type == "cuda":
        return contextlib.nullcontext()
    from bench_roofline import fla_in_interpreter
    return fla_in_interpreter()


def fla_available() -> bool:
    try:
        import fla.ops  # noqa: F401
        return True
    except Exception:
        return False


def time_chunk_cell(cell: str, a, device, bench) -> list[tuple]:
    """Rows (cell, impl, pass, ms triple) for recdsl's triton backend and fla's chunk op."""
    from bench_roofline import CELLS, cell_inputs, fla_op
    source = CELLS.get(cell, cell)
    spec = recdsl.load(source)
    dims = {"K": a.K, "V": a.V}
    xs = cell_inputs(spec, a.B, a.T, a.H, dims, a.dtype, device, unit_keys=cell == "deltanet")
    layer = spec(backend="triton", heads=a.H, **dims).to(device=device, dtype=a.dtype)
    rows = time_both_passes(cell, "recdsl", lambda x: layer(**x)[0], xs, bench, layer)
    if a.fla:
        with shim(device):
            op = fla_op(cell)
            rows += time_both_passes(cell, "fla", lambda x: op(x)[0], xs, bench)
    return rows


def time_both_passes(cell, impl, call, xs, bench, layer=None) -> list[tuple]:
    """Forward (no graph) and forward + backward rows; a recdsl `layer` reports what ran."""
    with torch.no_grad():
        forward = bench(lambda: call(xs))
    leaves = {k: v.detach().requires_grad_() for k, v in xs.items()}
    do = torch.ones_like(call(leaves))

    def train():
        for v in leaves.values():
            v.grad = None
        call(leaves).backward(do)
    both = bench(train)
    ran = ",".join(layer.ran) if layer is not None else ""
    return [(cell, impl, "fwd", forward, ran), (cell, impl, "fwd+bwd", both, ran)]


def time_lstm(a, device, bench) -> list[tuple]:
    spec = recdsl.load("lstm")
    hidden = a.lstm_hidden
    layer = spec(backend="triton", D=hidden, H=hidden).to(device=device, dtype=a.dtype)
    cudnn = torch.nn.LSTM(hidden, hidden, batch_first=True).to(device=device, dtype=a.dtype)
    with torch.no_grad():  # the same weights (both in torch.nn.LSTM's layout and gate order)
        for mine, theirs in (("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"), ("b_ih", "bias_ih_l0"),
                             ("b_hh", "bias_hh_l0")):
            getattr(cudnn, theirs).copy_(getattr(layer, mine))
    g = torch.Generator().manual_seed(0)
    x = {"x": torch.randn(a.B, a.T, hidden, generator=g).to(device=device, dtype=a.dtype)}
    rows = time_both_passes("lstm", "recdsl", lambda v: layer(**v)[0], x, bench, layer)
    rows += time_both_passes("lstm", "cudnn", lambda v: cudnn(v["x"])[0], x, bench)
    return rows


def run_timings(cells: list[str], a, device, records: list) -> list[str]:
    bench = timer(device)
    lines = [f"speed: {a.dtype_name} inputs, B={a.B} T={a.T} H={a.H} K={a.K} V={a.V}; lstm hidden {a.lstm_hidden}; "
             f"{'do_bench median [20%, 80%]' if device.type == 'cuda' else 'one wall-clock call (CPU interpreter)'}"
             + ("" if a.fla else "; fla not importable: recdsl rows only"),
             f"{'cell':15s} {'impl':7s} {'pass':8s} {'ms':>9s} {'[20%':>9s} {'80%]':>9s} {'vs other':>8s}  kernel"]
    for cell in cells:
        try:
            rows = time_lstm(a, device, bench) if cell == "lstm" else time_chunk_cell(cell, a, device, bench)
        except Exception as e:
            lines.append(f"{cell:15s} ERROR {type(e).__name__}: {str(e)[:160]}")
            records.append({"cell": cell, "T": a.T, "error": f"{type(e).__name__}: {e}"})
            print(lines[-1], flush=True)
            traceback.print_exc()
            continue
        baseline = {(r[2]): r[3][0] for r in rows if r[1] != "recdsl"}
        for cell_, impl, pass_, (med, lo, hi), ran in rows:
            other = baseline.get(pass_)
            speedup = f"{other / med:7.2f}x" if impl == "recdsl" and other else ""
            lines.append(f"{cell_:15s} {impl:7s} {pass_:8s} {med:9.3f} {lo:9.3f} {hi:9.3f} {speedup:>8s}  {ran}")
            records.append({"cell": cell_, "T": a.T, "impl": impl, "pass": pass_, "ms": [med, lo, hi], "ran": ran})
            print(lines[-1], flush=True)
    lines.append("vs other: the other implementation's median over recdsl's (> 1: recdsl is faster)")
    return lines


# --- main ----------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-interpreter", action="store_true",
                    help="no GPU: run the same code path in Triton's interpreter on CPU tensors (tiny shapes!)")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", default="2048", help="comma-separated sequence lengths")
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--lstm-hidden", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--cells", default=",".join(TIMED), help="cells to time: " + ",".join(TIMED))
    ap.add_argument("--check-cells", default="all", help="'all' (stdlib matrix + delta), 'none', or names")
    ap.add_argument("--check-B", type=int, default=2)
    ap.add_argument("--check-T", type=int, default=40)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default=None, help=f"the report file (default {OUT.name} on a GPU, none on CPU)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args(argv)
    a.dtype_name, a.dtype = a.dtype, getattr(torch, a.dtype)
    return a


def check_paths(which: str) -> list[Path]:
    if which == "none":
        return []
    paths = matrix_cells()
    if which == "all":
        return paths
    wanted = set(which.split(","))
    return [p for p in paths if p.stem in wanted]


def main(argv=None) -> int:
    a = parse(argv)
    if a.cpu_interpreter:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU "
              "(or --cpu-interpreter for a dry run of the code path on CPU).", file=sys.stderr)
        return 2
    a.fla = fla_available()
    import triton
    out = Path(a.out) if a.out is not None else (OUT if device.type == "cuda" else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [".venv/bin/python benchmarks/bench_gpu.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
             f"{name}; triton {triton.__version__}, torch {torch.__version__}"
             + (f", fla {__import__('fla').__version__}" if a.fla else ", no fla"), ""]
    print("\n".join(lines), flush=True)
    failures, checks, timings = 0, [], []
    if not a.skip_check:
        check, failures = run_checks(check_paths(a.check_cells), device, a.check_B, a.check_T, checks)
        lines += check + [""]
    for T in [int(t) for t in a.T.split(",")]:
        a.T = T
        lines += run_timings([c for c in a.cells.split(",") if c], a, device, timings) + [""]
    lines.append(f"correctness failures: {failures}")
    print(lines[-1])
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "checks": checks, "timings": timings,
                                            "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
