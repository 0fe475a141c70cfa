"""GPU cost without a GPU: the triton backend's chunkwise kernels against flash-linear-attention's
(fla 0.6 `chunk_*` ops), both run in Triton's interpreter on CPU tensors and counted by
backends/triton/traffic.py, per cell and pass (forward; forward + backward):

  B/token            global-memory bytes over B·T tokens: of the Triton kernels only; then
                     with the torch operators around them (each one launch on a GPU: layout
                     copies, casts, checks), counted through a TorchDispatchMode
  x min              that over the analytic minimum: every input read once, every output
                     (and the final state) written once; forward + backward adds the
                     backward's minimum (inputs and output cotangents read, gradients written)
  launch             Triton grids; then grids + torch operators
  GFLOP              tl.dot FLOPs (2·M·N·K per call per program)
  chain              the most tl.dot calls one program executes (the serial steps)
  H100 / H200 us     roofline: Σ_launches max(bytes/BW, FLOPs/TF32 rate, busiest program's
                     FLOPs / one SM's rate) + launches · 3 µs (traffic.roofline, traffic.GPU)

The cells: GLA (stdlib gla: vector log decay), simple GLA (a scalar log decay per step,
written below; fla's chunk_simple_gla) and Gated DeltaNet (stdlib gated_deltanet; fla's
chunk_gated_delta_rule with use_qk_l2norm_in_kernel, as the cell normalises q and k).
recdsl runs whatever kernel the triton backend selects for the cell (`layer.ran` is printed).

fla's kernels expect CUDA; `fla_in_interpreter()` is a test-only shim: each autotuned
kernel keeps its first config (the interpreter cannot time configs; a GPU's autotuner may
pick other tile sizes, so fla's counts are for that config), and the `range` of fla's
kernels yields Triton scalars (fla calls `i_t.to(tl.int64)` on its loop index, which the
interpreter's plain Python ints lack). TRITON_INTERPRET must be set before Triton is
imported: this script sets it when no GPU is present.

    .venv/bin/python benchmarks/bench_roofline.py [--B 1 --T 256 --H 2 --K 64 --V 64] [--cells gla,simple_gla,gated_deltanet]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

if "torch" not in sys.modules:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # fla's kernels are decorated at import

import argparse  # noqa: E402
import builtins  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import recdsl  # noqa: E402
from recdsl.backends.triton import traffic  # noqa: E402

SIMPLE_GLA = """
cell SimpleGLA(K, V):
    # GLA with one log decay per step for the whole state (fla's simple GLA; RetNet / Mamba-2's decay)
    input q[K], k[K], v[V], g[]
    state S[K, V] = 0
    S' = exp(g) * S + outer(k, v)
    output o = (q * K**-0.5) @ S'
"""
CELLS = {"gla": "gla", "simple_gla": SIMPLE_GLA, "gated_deltanet": "gated_deltanet"}
OUT = Path(__file__).with_name("roofline_latest.txt")


# --- the fla shim (test-only: fla is an oracle, its code is not copied) ---------------------

_IN_GRID = [0]


def _triton_range(*bounds):
    """`range` for fla's modules: inside an interpreted launch it yields int32 Triton
    scalars (as the compiler's loop index is), elsewhere it is Python's."""
    if not _IN_GRID[0]:
        return builtins.range(*bounds)
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle
    return (tl.tensor(TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)
            for i in builtins.range(*[int(b) for b in bounds]))


@contextlib.contextmanager
def fla_in_interpreter():
    """Run fla's chunk ops in Triton's interpreter (see the module docstring); undone on exit."""
    from triton.runtime import autotuner
    from triton.runtime import interpreter
    import fla.ops.gated_delta_rule  # noqa: F401  (import the modules whose `range` we set)
    import fla.ops.gla  # noqa: F401
    import fla.ops.simple_gla  # noqa: F401
    prune, grid_call = autotuner.Autotuner.prune_configs, interpreter.GridExecutor.__call__

    def first_config(self, kwargs):
        return prune(self, kwargs)[:1]

    def flagged_call(self, *args, **kwargs):
        _IN_GRID[0] += 1
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _IN_GRID[0] -= 1
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("fla.") and m is not None]
    autotuner.Autotuner.prune_configs = first_config
    interpreter.GridExecutor.__call__ = flagged_call
    for m in modules:
        m.range = _triton_range
    try:
        yield
    finally:
        autotuner.Autotuner.prune_configs, interpreter.GridExecutor.__call__ = prune, grid_call
        for m in modules:
            m.__dict__.pop("range", None)


def fla_op(cell: str):
    """fla's chunk op for `cell`, as f(inputs) -> (o, final state), on recdsl's input names."""
    if cell == "gla":
        from fla.ops.gla import chunk_gla
        return lambda x: chunk_gla(x["q"], x["k"], x["v"], x["gk"], output_final_state=True)
    if cell == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True)
    if cell == "gated_deltanet":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    if cell == "deltanet":  # the cell neither scales q nor normalises k: its inputs' keys are unit
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=1.0, output_final_state=True)
    raise KeyError(cell)


# --- inputs and the analytic minimum ---------------------------------------------------------

def cell_inputs(spec, B: int, T: int, H: int, dims: dict, dtype, device="cpu", seed=0, unit_keys=False) -> dict:
    """Inputs [B, T, H, ...] as fla takes them: log decays in (-∞, 0), betas in (0, 1);
    `unit_keys`: L2-normalised keys (for a delta rule that does not normalise them itself)."""
    g = torch.Generator().manual_seed(seed)
    ir = spec(backend="reference", heads=H, **dims).ir
    xs = {}
    for name, var in spec.cell.inputs.items():
        shape = (B, T, H) + tuple(ir.concrete(var.shape))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if name in ("g", "gk"):
            x = F.logsigmoid(x) / 16   # fla's tests' gates: mild decay
        elif name == "beta":
            x = torch.sigmoid(x)
        elif name == "k" and unit_keys:
            x = F.normalize(x, dim=-1)
        xs[name] = x.to(device=device, dtype=dtype)
    return xs


def minimum_bytes(xs: dict, outputs: list, backward: bool) -> int:
    """Inputs read once, outputs (o, final state) written once; with the backward also the
    output cotangent read, the inputs read again and their gradients written."""
    inputs = list(xs.values())
    forward = traffic.analytic_minimum(inputs, outputs)
    if not backward:
        return forward
    return forward + traffic.analytic_minimum(inputs + outputs[:1], inputs)


# --- one measurement --------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    impl: str
    cell: str
    pass_: str
    ran: str
    tokens: int
    minimum: int
    counts: traffic.Traffic

    def kernel_runs(self):
        return [x for x in self.counts.launch_log if not x.torch_op]

    def op_runs(self):
        return [x for x in self.counts.launch_log if x.torch_op]


def _run(call, xs: dict, backward: bool):
    """The forward (no graph) or forward + backward of `call`; returns (o, final state)."""
    if not backward:
        with torch.no_grad():
            return call(xs)
    leaves = {k: v.detach().requires_grad_() for k, v in xs.items()}
    o, state = call(leaves)
    do = torch.ones_like(o)  # the cotangent's fill is counted: one small launch for both impls
    torch.autograd.grad(o, list(leaves.values()), grad_outputs=do)
    return o, state


@contextlib.contextmanager
def gpu_chunk_sizes():
    """recdsl's chunk kernels at the chunk length they take on a GPU (64 up to K = 64), not
    the interpreter's 32: the bytes of the state passes and the launch grids depend on it,
    and fla's kernels run at their GPU chunk length (64) here too."""
    from recdsl.backends.triton import chunk_kernels, delta_kernels
    gpu = torch.device("cuda")
    saved = chunk_kernels.chunk_size, delta_kernels.chunk_size
    chunk_kernels.chunk_size = lambda device, _size=saved[0]: _size(gpu)
    delta_kernels.chunk_size = lambda device, K, _size=saved[1]: _size(gpu, K)
    try:
        yield
    finally:
        chunk_kernels.chunk_size, delta_kernels.chunk_size = saved


def measure(impl: str, cell: str, B: int, T: int, H: int, K: int, V: int, backward: bool) -> Row:
    spec = recdsl.load(CELLS[cell])
    xs = cell_inputs(spec, B, T, H, {"K": K, "V": V}, torch.float32)
    ran = "fla"
    if impl.startswith("recdsl"):   # recdsl-recompute: the backward recomputes the chunk states
        layer = spec(backend="triton", heads=H, K=K, V=V)

        def call(x):
            o, state = layer(**x)
            return o, next(iter(state.values()))
        with gpu_chunk_sizes():
            with torch.no_grad():
                call(xs)  # build the kernels outside the count
            with recdsl.recompute_chunk_states(impl == "recdsl-recompute"):
                counts = traffic.count_traffic(lambda: _run(call, xs, backward), torch_ops=True)
            ran = ",".join(layer.ran)
            o, state = _run(call, xs, False)
    else:
        call = fla_op(cell)
        with fla_in_interpreter():
            call(xs)
            counts = traffic.count_traffic(lambda: _run(call, xs, backward), torch_ops=True)
            o, state = _run(call, xs, False)
    return Row(impl, cell, "fwd+bwd" if backward else "fwd", ran, B * T,
               minimum_bytes(xs, [o, state], backward), counts)


# --- the table --------------------------------------------------------------------------------

HEADER = (f"{'':41s} {'Triton kernels only':^40s} | {'+ torch operators around them':^33s} |\n"
          f"{'cell':15s} {'pass':8s} {'impl':16s} {'B/token':>8s} {'x min':>6s} {'launch':>6s} {'GFLOP':>6s} "
          f"{'chain':>5s} {'H100 us':>7s} | {'B/token':>8s} {'x min':>6s} {'launch':>6s} {'H100 us':>7s} "
          f"{'H200 us':>7s} | kernel")


def format_row(r: Row) -> str:
    c = r.counts
    kernels, ops = r.kernel_runs(), r.op_runs()
    kernel_bytes = sum(x.total_bytes for x in kernels)
    only = traffic.roofline(c, traffic.H100, torch_ops=False)
    h100, h200 = traffic.roofline(c, traffic.H100), traffic.roofline(c, traffic.H200)
    return (f"{r.cell:15s} {r.pass_:8s} {r.impl:16s} {kernel_bytes / r.tokens:8.0f} {kernel_bytes / r.minimum:6.2f} "
            f"{len(kernels):6d} {c.dot_flops / 1e9:6.3f} {c.chain:5d} {only.us:7.1f} | "
            f"{c.total_bytes / r.tokens:8.0f} {c.total_bytes / r.minimum:6.2f} {len(kernels) + len(ops):6d} "
            f"{h100.us:7.1f} {h200.us:7.1f} | {r.ran}")


def format_kernels(r: Row) -> list[str]:
    """Per kernel: launches, bytes / token, FLOPs, chain, H100 µs (each launch's max term)."""
    lines = []
    names = dict.fromkeys(x.kernel for x in r.kernel_runs())
    for name in names:
        runs = [x for x in r.kernel_runs() if x.kernel == name]
        nbytes = sum(x.total_bytes for x in runs)
        us = sum(max(traffic.launch_seconds(x, traffic.H100)) for x in runs) * 1e6
        lines.append(f"    {name:36s} {len(runs):3d}x {nbytes / r.tokens:9.0f} B/tok "
                     f"{sum(x.dot_flops for x in runs) / 1e6:8.1f} MFLOP chain {max(x.chain for x in runs):3d} "
                     f"{us:6.2f} us")
    ops = r.op_runs()
    if ops:
        nbytes = sum(x.total_bytes for x in ops)
        lines.append(f"    {'torch ops':36s} {len(ops):3d}x {nbytes / r.tokens:9.0f} B/tok: {torch_op_summary(ops, r.tokens)}")
    return lines


def torch_op_summary(ops, tokens: int) -> str:
    """The torch operators by name, most bytes first: 'clone 4x 2048 B/tok, ...'."""
    by_name = {}
    for x in ops:
        count, nbytes = by_name.get(x.kernel, (0, 0))
        by_name[x.kernel] = (count + 1, nbytes + x.total_bytes)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])
    return ", ".join(f"{name.removeprefix('aten.')} {n}x {b / tokens:.0f}" for name, (n, b) in ranked)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--impls", default="recdsl,fla",
                    help="recdsl, recdsl-recompute (fwd+bwd only: under recdsl.recompute_chunk_states), fla")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--out", default=str(OUT), help="where the table goes ('' : nowhere)")
    a = ap.parse_args(argv)
    command = ".venv/bin/python benchmarks/bench_roofline.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    lines = [command,
             f"B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} float32 (TF32 dots); counted in Triton's interpreter "
             f"(triton {__import__('triton').__version__}, torch {torch.__version__}); roofline: "
             f"{traffic.H100.name} {traffic.H100.bandwidth / 1e12:.2f} TB/s, {traffic.H200.name} "
             f"{traffic.H200.bandwidth / 1e12:.2f} TB/s, TF32 {traffic.H100.dot_rate / 1e12:.1f} TFLOP/s dense, "
             f"{traffic.H100.sms} SMs, {traffic.H100.launch_s * 1e6:.0f} us per launch", "", HEADER]
    print("\n".join(lines), flush=True)
    details = []
    started, cpu_started = time.time(), time.process_time()
    for cell in a.cells.split(","):
        for backward in ([False] if a.no_backward else [False, True]):
            for impl in a.impls.split(","):
                if impl == "recdsl-recompute" and not backward:
                    continue            # the forward is recdsl's
                r = measure(impl, cell, a.B, a.T, a.H, a.K, a.V, backward)
                lines.append(format_row(r))
                print(lines[-1], flush=True)
                details += [f"  {r.cell} {r.pass_} {r.impl}:"] + format_kernels(r)
    lines += ["", "per kernel (H100 us: each launch's largest term, without the launch cost):"] + details
    lines += ["", f"({time.time() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU in the interpreter)"]
    print("\n".join(lines[-len(details) - 3:]))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
