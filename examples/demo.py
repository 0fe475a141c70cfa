"""The main job (`make demo`): every stdlib cell and example is parsed, checked and
analysed; the sequence cells are compiled to torch modules and run on random data; the
plans are printed, with the time each stage of the pipeline took. Then the `triton`
backend: a few cells of each kernel family run in Triton's interpreter (no GPU here) and
are compared with `reference`, and their kernels are compiled ahead of time for sm_90
(registers, spills, shared memory per kernel)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import recdsl
from recdsl.parser import parse
from recdsl.pipeline import emit_cell
from recdsl.plan import render
from recdsl.printer import to_source
from recdsl.spec import stdlib_files

HERE = Path(__file__).resolve().parent
SHOW_PLANS = ("mlstm", "gated_deltanet", "lru", "lstm")
TRITON_CELLS = ("hgrn", "mamba", "aaren", "lru", "retnet", "lstm", "gru")


def main() -> None:
    console = Console(width=150)
    torch.manual_seed(0)
    table = Table("cell", "classes (stage: states)", "check ms", "analyse ms", "torch vs reference (B=2, T=256)",
                  "round trip")
    paths = list(stdlib_files().values()) + sorted(HERE.glob("*.rec"))
    t_all = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        spec = recdsl.load(path)
        t1 = time.perf_counter()
        plan = spec.plan()
        t2 = time.perf_counter()
        tree = parse(path.read_text(), str(path))
        same = parse(to_source(tree)) == tree
        classes = "; ".join(f"{s.cls}: {', '.join(s.states)}" for s in plan.stages)
        run = _run(spec)
        table.add_row(spec.name, classes, f"{(t1 - t0) * 1e3:.1f}", f"{(t2 - t1) * 1e3:.1f}", run,
                      "ok" if same else "[red]DIFFERS[/red]")
    console.print(table)
    console.print(f"{len(paths)} cells parsed, checked, analysed and run in {time.perf_counter() - t_all:.2f} s\n")
    for name in SHOW_PLANS:
        console.print(render(recdsl.load(name).plan()), markup=False, highlight=False)
        console.print()
    _triton(console)


def _triton(console) -> None:
    from recdsl.backends import triton as triton_backend
    from recdsl.backends.triton import aot
    table = Table("cell", "stages (triton backend)", "triton (interpreter) vs reference, B=2 T=37, fp32 + grads")
    compiled = []
    for name in TRITON_CELLS:
        spec = recdsl.load(name)
        emitted = emit_cell(spec.lower(**spec.analysis_dims()), "triton")
        errs = _compare(spec, "triton")
        table.add_row(spec.name, "; ".join(c.kernel.name for c in emitted.selection.stages), errs)
        compiled += triton_backend.compile_cell(emitted, 90)[1]
    console.print(table)
    console.print("ahead-of-time compile for sm_90 (ptxas -v):")
    console.print(aot.summary_table(compiled), markup=False, highlight=False)


def _compare(spec, backend: str) -> str:
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims)
    other = spec(backend=backend, **dims)
    other.load_state_dict(ref.state_dict())
    heads = (ref.heads,) if ref.heads else ()
    g = torch.Generator().manual_seed(0)
    xs = {n: (torch.randn((2, 37) + heads + ref.ir.concrete(v.shape), generator=g) * 0.5).requires_grad_()
          for n, v in spec.cell.inputs.items()}
    outs = []
    for layer in (ref, other):
        o, st = layer(**xs)
        o = o if isinstance(o, tuple) else (o,)
        loss = sum(x.sum() for x in o) + sum(v.sum() for v in st.values())
        grads = torch.autograd.grad(loss, list(xs.values()), allow_unused=True)
        outs.append((o, grads))
    err_o = max(float((a - b).detach().abs().max()) for a, b in zip(outs[0][0], outs[1][0]))
    err_g = max(float((a - b).abs().max()) for a, b in zip(outs[0][1], outs[1][1]) if a is not None)
    ok = err_o < 1e-4 and err_g < 1e-3
    return f"{'agree' if ok else '[red]DISAGREE[/red]'} (outputs {err_o:.0e}, gradients {err_g:.0e})"


def _run(spec) -> str:
    """Both backends on the same data: max difference and the time of each."""
    if spec.cell.over != "seq":
        return "reference only (tests/graph: vs the equations)"
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims)
    fast = spec(backend="torch", **dims)
    fast.load_state_dict(ref.state_dict())
    heads = (ref.heads,) if ref.heads else ()
    xs = {n: torch.randn((2, 256) + heads + ref.ir.concrete(v.shape)) * 0.5 for n, v in spec.cell.inputs.items()}
    for n in ("g", "gk"):  # log forget gates: keep the decays below one, as trained models do
        if n in xs:
            xs[n] = -xs[n].abs()
    with torch.no_grad():
        fast(**xs)  # builds the C scans on first use
        t0 = time.perf_counter()
        o1, _ = ref(**xs)
        t1 = time.perf_counter()
        o2, _ = fast(**xs)
        t2 = time.perf_counter()
    o1, o2 = (o1 if isinstance(o1, tuple) else (o1,)), (o2 if isinstance(o2, tuple) else (o2,))
    err = max(float((a - b).abs().max()) for a, b in zip(o1, o2))
    scale = max(1.0, max(float(a.abs().max()) for a in o1))   # fp32: relative to the outputs' size
    ok = err < 1e-3 * scale and all(torch.isfinite(o).all() for o in o2)
    return (f"{'agree' if ok else '[red]DISAGREE[/red]'} ({err:.0e}); "
            f"{(t1 - t0) * 1e3:.0f} ms -> {(t2 - t1) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
