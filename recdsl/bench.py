"""Timing a cell's backends against the per-step loop: what `recdsl bench` runs, and the
timing helpers benchmarks/bench_train.py shares.

Modes: forward = the module's forward under torch.no_grad(); train = forward + backward of
out.pow(2).mean() (the first output) with inputs and parameters requiring grad. Every
contender of one (T, mode) is run once to warm up (JIT builds, C compiles; the outputs are
compared with the reference's), then `repeat` rounds run them interleaved (reference,
torch, anchor, reference, torch, anchor, ...) and the median of each is kept. Ratios are
against the reference backend's per-step loop (the step as written, one step at a time).

Anchors (timed for information, never imported by recdsl's compiler): torch.nn.LSTM/GRU
for the stdlib lstm/gru, and flash-linear-attention's naive references where fla-core is
installed and the cell is the stdlib cell they implement."""
from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

TOL = 1e-3   # fp32: max |ours - anchor| / max(1, max |anchor|) on the warm-up outputs
MODES = ("forward", "train")


# ----------------------------------------------------------------------------- timing
def ms(fn, sync: Callable | None = None) -> float:
    """Wall time of one call of fn, in milliseconds (`sync` waits for a device before and after)."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) * 1e3


def timed_pair(ours, anchor, repeat: int):
    """One warm-up of each (its outputs are returned for the agreement check), then
    `repeat` interleaved runs; the medians in ms."""
    warm = ours(), anchor()
    a, b = [], []
    for _ in range(repeat):
        a.append(ms(ours))
        b.append(ms(anchor))
    return statistics.median(a), statistics.median(b), warm


def interleaved(fns: dict, repeat: int, sync: Callable | None = None, tick: Callable | None = None):
    """One warm-up of every fn (outputs returned), then `repeat` rounds calling each once in
    turn: ({name: median ms}, {name: warm-up output}). `tick(name)` after every call."""
    warm = {}
    for name, fn in fns.items():
        warm[name] = fn()
        if tick is not None:
            tick(name)
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(ms(fn, sync))
            if tick is not None:
                tick(name)
    return {name: statistics.median(t) for name, t in times.items()}, warm


def inference(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def training(fn, leaves):
    def run():
        for p in leaves:
            p.grad = None
        out = fn()
        out.pow(2).mean().backward()
        return out.detach()
    return run


def disagreement(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def first(res):
    """The first output of a recdsl module's (outputs, state)."""
    out = res[0]
    return out[0] if isinstance(out, tuple) else out


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def env_line(repeat: int, device: str = "cpu") -> str:
    """The torch / threads / CPU line the benchmarks print above their tables."""
    where = f"{platform.machine()} ({os.cpu_count()} cpus), {platform.platform()}"
    if device != "cpu" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}; host {where}"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {where}; "
            f"median of {repeat} interleaved runs after a warm-up")


# ----------------------------------------------------------------------------- inputs and dims
def cell_dims(spec) -> dict:
    """Every dimension without a default = 64, except a head count (4 heads of 64)."""
    heads = getattr(spec.cell.heads, "id", None)
    return {d: 4 if d == heads else 64 for d, v in spec.cell.dims.items() if v.default is None}


def make_inputs(layer, B: int, T: int, seed: int = 0, shaped: bool = False, device=None) -> dict:
    """N(0, 0.5^2) inputs in the module's layout, requiring grad; a time gap `dt` is
    positive. shaped: also what the plan assumes of the caller -- log gates (fla's
    convention, and every input a decay range is assumed <= 0 of) negative, delta-rule keys
    L2-normalised and beta in (0, 1) -- so that long runs stay finite."""
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    gates, keys = _caller_ranges(layer) if shaped else ((), ())
    xs = {}
    for name, var in layer.spec.cell.inputs.items():
        shape = (B, T) + heads + layer.ir.concrete(var.shape)
        x = torch.rand(shape, generator=g) + 0.1 if name == "dt" else 0.5 * torch.randn(shape, generator=g)
        if name in gates:
            x = -x.abs()
        elif name in keys and name == "beta":
            x = torch.sigmoid(x)
        elif name in keys and x.dim() > 2 + len(heads):
            x = torch.nn.functional.normalize(x, dim=-1)
        xs[name] = x.to(device).requires_grad_() if device is not None else x.requires_grad_()
    return xs


def _caller_ranges(layer) -> tuple[set, set]:
    """(inputs the plan takes as log gates, inputs of a delta-rule stage to normalise)."""
    import re

    from .fuzz.runner import LOG_GATE_NAMES
    from .plan import LOW_RANK
    plan = layer.compiled.plan
    gates = set(LOG_GATE_NAMES)
    for st in plan.stages:
        gates.update(re.findall(r"assuming (\w+) <= 0", st.decay_range or ""))
    keys = {"k", "beta"} if any(st.cls == LOW_RANK for st in plan.stages) else set()
    return gates, keys


# ----------------------------------------------------------------------------- lowerings
def is_sequential(form) -> bool:
    """A form that walks time one step after another (the others are scans, chunkwise
    matmuls or one vectorised call over all steps: parallel over T)."""
    from .lowering import DenseSemiringScan, SequentialLoop
    return isinstance(form, SequentialLoop) or (isinstance(form, DenseSemiringScan) and not form.products)


def lowering(selection, ran: list[str] | None = None) -> str:
    """The kernel of every stage and whether it is a sequential or a parallel form:
    "torch.chunk_diag (parallel)"; several stages "m: ... ; C: ...". `ran` (layer.ran after a
    forward) names the kernels that actually ran where they differ from the selection."""
    stages = selection.stages
    if not stages:
        return "hoisted: all steps at once (parallel)"
    names = [c.kernel.name for c in stages]
    if ran and len(ran) == len(stages):
        names = list(ran)
    parts = [f"{n} ({'sequential' if is_sequential(c.form) else 'parallel'})" for n, c in zip(names, stages)]
    if len(set(parts)) == 1:   # one stage, or one kernel for all (the reference's loop)
        return parts[0]
    return "; ".join(f"{'/'.join(c.states)}: {p}" for c, p in zip(stages, parts))


# ----------------------------------------------------------------------------- anchors
def fla(module: str, fn: str):
    """fla-core's function `fn` of `module`, or None when fla is not installed."""
    try:
        with warnings.catch_warnings():   # "Triton is not supported on current platform" on CPU
            warnings.simplefilter("ignore")
            return getattr(__import__(module, fromlist=[fn]), fn)
    except ImportError:
        return None


def torch_nn_twin(name: str, layer):
    """torch.nn.LSTM / GRU with the weights of a recdsl stdlib lstm / gru module."""
    D, H = layer.dims["D"], layer.dims["H"]
    ref = (torch.nn.LSTM if name == "lstm" else torch.nn.GRU)(D, H, batch_first=True)
    ref = ref.to(device=layer.W_ih.device, dtype=layer.W_ih.dtype)
    with torch.no_grad():
        for p in ("W_ih", "W_hh", "b_ih", "b_hh"):
            getattr(ref, p.replace("W_", "weight_").replace("b_", "bias_") + "_l0").copy_(getattr(layer, p))
    return ref


@dataclass
class Contender:
    """One thing timed: a recdsl backend or an anchor. `call(xs)` returns the first output in
    recdsl's layout; `params` the leaves besides the inputs that training clears."""
    name: str
    kind: str                         # "baseline" (the reference loop) | "backend" | "anchor"
    lowering: str
    call: Callable
    params: list = field(default_factory=list)
    layer: object = None


def _heads_axis(layer, x):
    return x if layer.heads else x.unsqueeze(2)


def _no_heads(layer, y):
    return y if layer.heads else y.squeeze(2)


def anchors(stdlib_name: str | None, layer) -> list[Contender]:
    """The anchors of a stdlib cell (`stdlib_name`: which stdlib cell the benchmarked source
    is, None for any other source). A missing package gives no anchor."""
    out = []
    if stdlib_name in ("lstm", "gru"):
        twin = torch_nn_twin(stdlib_name, layer)
        out.append(Contender(f"torch.nn.{stdlib_name.upper()}", "anchor", "ATen fused RNN (sequential)",
                             lambda xs: twin(xs["x"])[0], list(twin.parameters())))
    elif stdlib_name == "gla" and abs(layer.ir.hypers.get("scale", 0) - layer.dims["K"] ** -0.5) < 1e-12:
        naive = fla("fla.ops.gla.naive", "naive_recurrent_gla")
        if naive is not None:
            def gla(xs):
                q, k, v, gk = (_heads_axis(layer, xs[n]) for n in ("q", "k", "v", "gk"))
                return _no_heads(layer, naive(q, k, v, gk)[0])
            out.append(Contender("fla naive_recurrent_gla", "anchor", "per-step torch loop (sequential)", gla))
    elif stdlib_name == "deltanet":
        chunkwise = fla("fla.ops.delta_rule.naive", "delta_rule_chunkwise")
        recurrence = fla("fla.ops.delta_rule.naive", "delta_rule_recurrence")
        if chunkwise is not None:
            K = layer.dims["K"]

            def delta(xs):   # fla scales q by K**-0.5, the stdlib cell does not: undo it
                q, k, v, beta = (_heads_axis(layer, xs[n]).transpose(1, 2) for n in ("q", "k", "v", "beta"))
                T = q.shape[2]
                fn = (lambda *a: chunkwise(*a, chunk_size=32)) if T % 32 == 0 else recurrence
                return _no_heads(layer, fn(q * K ** 0.5, k, v, beta)[0].transpose(1, 2))
            out.append(Contender("fla delta_rule_chunkwise", "anchor",
                                 "chunkwise WY (parallel; its recurrence when 32 does not divide T)", delta))
    return out


# ----------------------------------------------------------------------------- the measurement
@dataclass
class Row:
    T: int
    mode: str
    name: str
    kind: str
    lowering: str
    ms: float
    ratio: float | None = None        # reference loop ms / this ms (> 1: faster than the per-step loop)


@dataclass
class Result:
    rows: list[Row]
    warnings: list[str]


def measure(contenders: list[Contender], make_xs: Callable, Ts: list[int], modes: list[str], repeat: int,
            sync: Callable | None = None, tick: Callable | None = None) -> Result:
    """Every contender at every T in every mode, interleaved; ratios against the contender
    of kind "baseline" (the reference backend's per-step loop). make_xs(T) -> the inputs."""
    rows, warns = [], []
    base = next(c.name for c in contenders if c.kind == "baseline")
    for T in Ts:
        xs = make_xs(T)
        for mode in modes:
            fns = {}
            for c in contenders:
                call = (lambda c=c: c.call(xs))
                fns[c.name] = inference(call) if mode == "forward" else training(call, list(xs.values()) + c.params)
            times, warm = interleaved(fns, repeat, sync, tick)
            for c in contenders:
                if c.layer is not None and getattr(c.layer, "ran", None):
                    c.lowering = lowering(c.layer.selection, c.layer.ran)
                rows.append(Row(T, mode, c.name, c.kind, c.lowering, times[c.name], times[base] / times[c.name]))
                if c.name != base:
                    err = disagreement(warm[c.name].float(), warm[base].float())
                    if not err <= TOL:
                        warns.append(f"WARNING T={T} {mode}: {c.name} and the reference loop disagree, "
                                     f"max rel. error {err:.2e} > {TOL:g}")
    return Result(rows, warns)


def plot(result: Result, path: str, title: str) -> None:
    """Time vs T per contender and mode (log-log when several T), labelled with the lowering
    each runs, to a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict = {}
    for r in result.rows:
        series.setdefault((r.name, r.mode, r.lowering), []).append((r.T, r.ms))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    Ts = sorted({r.T for r in result.rows})
    colours = {}
    for (name, mode, low), pts in series.items():
        pts.sort()
        colour = colours.setdefault(name, f"C{len(colours) % 10}")   # one colour per contender, dashed: train
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if mode == "forward" else "--",
                color=colour, label=f"{name} {mode}: {low}")
    if len(Ts) > 1:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xticks(Ts, [str(t) for t in Ts])
    ax.set_xlabel("T (sequence length)")
    ax.set_ylabel("ms (median)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
