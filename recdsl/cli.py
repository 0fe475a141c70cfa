"""The `recdsl` command line: check, inspect (and its --html page), bench, stdlib, builtins, fuzz.

Every user mistake is printed as a located RecError and exits 1; an internal error prints
one line asking for a report (RECDSL_DEBUG=1 shows the traceback) and exits 2."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import RecError


def _fail(err: RecError) -> None:
    click.echo(str(err), err=True)
    sys.exit(1)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RecError as e:
            _fail(e)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # an internal bug: one line, not a traceback
            if os.environ.get("RECDSL_DEBUG"):
                raise
            click.echo(f"recdsl: internal error: {type(e).__name__}: {e} "
                       "(please report it; RECDSL_DEBUG=1 shows the traceback)", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recdsl", message="recdsl %(version)s")
def main():
    """recdsl: compile recurrent cells written in .rec files."""


def _parse_dims(text: str | None) -> dict:
    """--dims K=16,V=16 -> {"K": 16, "V": 16} (ints, or floats for hyper-parameters)."""
    out: dict = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq or not name.strip().isidentifier():
            raise RecError(f"--dims expects NAME=VALUE pairs separated by commas, got {part!r}")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise RecError(f"--dims: {value!r} is not a number") from None
    return out


DIMS_HELP = "Dimension values, e.g. K=16,V=16 (default: the cell's defaults, else small distinct sizes)."


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("--dims", default=None, help=DIMS_HELP)
@click.option("--no-plan", is_flag=True, help="Only parse and check; skip the analysis.")
def check(files, quiet, dims, no_plan):
    """Parse, check and analyse .rec FILES (or stdlib names): a summary and the plan of each cell."""
    from .plan import render
    from .spec import load_all
    given = _parse_dims(dims)
    failed = 0
    for f in files:
        try:
            specs = load_all(Path(f) if Path(f).exists() else f)
            plans = [None if no_plan else s.plan(**{k: v for k, v in given.items()
                                                   if k in s.cell.dims or k in s.cell.hypers}) for s in specs]
        except RecError as e:
            click.echo(str(e), err=True)
            failed += 1
            continue
        if not quiet:
            for s, p in zip(specs, plans):
                click.echo(s.summary())
                if p is not None:
                    click.echo(render(p, verbose=False))
            click.echo(f"{f}: ok ({len(specs)} cell{'s' if len(specs) != 1 else ''})")
    sys.exit(1 if failed else 0)


STAGES = ("ast", "source", "ir", "passes", "plan", "reference", "torch", "c", "triton", "ttir", "ttgir", "ptx", "newton")


@main.command()
@click.argument("file")
@click.option("--stage", type=click.Choice(STAGES), default="plan", show_default=True,
              help="ast: syntax tree with spans; source: the tree printed back; ir: one step as a graph; "
                   "passes: each analysis pass; plan: classes, coefficients, checks, and per backend the form and kernel of "
                   "every stage; reference/torch/triton/newton: generated code (newton: the forward with each "
                   "Newton stage's step and forward-mode Jacobian); c: the generated C of the torch backend's "
                   "fused loops; ttir/ttgir/ptx: the Triton kernels compiled ahead of time (no GPU needed), with registers, "
                   "spills and shared memory per kernel.")
@click.option("--dims", default=None, help=DIMS_HELP)
@click.option("--arch", type=click.Choice(["sm_80", "sm_90"]), default="sm_90", show_default=True,
              help="GPU target of --stage ttir|ttgir|ptx and of --aot.")
@click.option("--html", "html_out", default=None, metavar="OUT.html",
              help="Instead of printing a stage: write one self-contained HTML page with the .rec source, the plan "
                   "and selection of every backend, and each backend's generated code side by side with the .rec "
                   "(click a line to highlight where it came from or went).")
@click.option("--aot", is_flag=True, help="With --html: also compile the Triton kernels ahead of time for --arch "
                                          "(no GPU needed; seconds a kernel the first time) and list registers, "
                                          "spills and shared memory.")
def inspect(file, stage, dims, arch, html_out, aot):
    """Print one compilation stage of FILE (a .rec path or a stdlib name), or with --html
    write an inspection page of every stage."""
    from . import printer
    from .spec import load_all
    if aot and html_out is None:
        raise RecError("--aot goes with --html", hint="for one stage in text: --stage ptx (or ttir, ttgir)")
    specs = load_all(Path(file) if Path(file).exists() else file)
    given = _parse_dims(dims)
    if html_out is not None:
        _inspect_html(specs, given, html_out, aot, int(arch[3:]))
        return
    for s in specs:
        mine = {k: v for k, v in given.items() if k in s.cell.dims or k in s.cell.hypers}
        if stage == "ast":
            click.echo(_dump_ast(s.cell.ast))
        elif stage == "source":
            click.echo(printer.to_source(s.cell.ast), nl=False)
        elif stage == "ir":
            from .ir import dump
            click.echo(dump(s.lower(**s.analysis_dims(**mine))))
        elif stage == "passes":
            trace: dict = {}
            s.plan(trace, **mine)
            for name, text in trace.items():
                click.echo(f"== {name}")
                click.echo(text)
        elif stage == "plan":
            click.echo(str(s.plan(**mine)))
        elif stage == "reference":
            from .backends import reference
            click.echo(reference.emit_step(s.lower(**s.analysis_dims(**mine))), nl=False)
        elif stage in ("triton", "ttir", "ttgir", "ptx"):
            if stage != "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" not in sys.modules:
                # compiling for a GPU ahead of time has nothing to interpret; triton reads the
                # variable once, at import, so dropping it before the import is enough
                del os.environ["TRITON_INTERPRET"]
                click.echo(f"recdsl: TRITON_INTERPRET ignored: --stage {stage} compiles for {arch}, it runs nothing", err=True)
            _inspect_triton(s, mine, stage, int(arch[3:]))
        elif stage == "newton":
            from .pipeline import emit_cell
            emitted = emit_cell(s.lower(**s.analysis_dims(**mine)), "newton")
            click.echo("\n".join(f"# stage {c.stage}: {c.summary()}" + "".join(
                f"\n#     passed over: {p.summary()}" for p in c.passed) for c in emitted.selection.stages))
            click.echo(emitted.source, nl=False)
        else:
            from .pipeline import emit_cell
            emitted = emit_cell(s.lower(**s.analysis_dims(**mine)), "torch")
            click.echo(emitted.source if stage == "torch" else _generated_c(emitted), nl=False)


def _parse_ints(text: str, option: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise RecError(f"{option}: {part!r} is not an integer",
                           hint=f"{option} takes positive integers separated by commas, e.g. {option} 256,1024") from None
        if n < 1:
            raise RecError(f"{option}: {n} is not positive", hint=f"e.g. {option} 256,1024")
        out.append(n)
    if not out:
        raise RecError(f"{option}: no value given", hint=f"e.g. {option} 256,1024")
    return out


def _bench_spec(target: str, cell: str | None):
    from .spec import load_all
    specs = load_all(Path(target) if Path(target).exists() else target)
    if cell is not None:
        match = [s for s in specs if s.name == cell]
        if not match:
            raise RecError(f"no cell named {cell} in {specs[0].filename}",
                           hint="cells there: " + ", ".join(s.name for s in specs))
        specs = match
    if len(specs) > 1:
        raise RecError(f"{specs[0].filename} defines {len(specs)} cells; say which with --cell",
                       hint="cells there: " + ", ".join(s.name for s in specs))
    spec = specs[0]
    if spec.cell.over != "seq":
        raise RecError(f"recdsl bench times sequence cells; {spec.name} runs over {spec.cell.over}",
                       spec.cell.span, hint="time it from Python (layer(x=..., edges=...)) instead")
    return spec


def _bench_dims(spec, given: dict) -> dict:
    import difflib

    from .bench import cell_dims
    known = list(spec.cell.dims) + list(spec.cell.hypers)
    for name in given:
        if name not in known:
            close = [k for k in known if k.lower() == name.lower()] or difflib.get_close_matches(name, known, n=1)
            raise RecError(f"--dims: cell {spec.name} has no dimension or hyper-parameter {name}",
                           hint=(f"did you mean {close[0]}? " if close else "")
                           + f"its dimensions: {', '.join(spec.cell.dims) or 'none'}"
                           + (f"; hyper-parameters: {', '.join(spec.cell.hypers)}" if spec.cell.hypers else ""))
    return {**cell_dims(spec), **given}


def _stdlib_name(spec) -> str | None:
    """Which stdlib cell this source is (its text, wherever it was read from), else None."""
    from .spec import stdlib_files
    for name, path in stdlib_files().items():
        try:
            if path.read_text() == spec.source_text:
                return name
        except OSError:
            continue
    return None


@main.command()
@click.argument("target", metavar="FILE|NAME")
@click.option("--dims", default=None, help="Dimension and hyper-parameter values, e.g. D=64,H=64 "
                                           "(default: 64 for every dimension without a default, 4 heads).")
@click.option("--T", "T_list", default="256,1024", show_default=True, help="Sequence lengths, comma-separated.")
@click.option("--B", "B", type=int, default=4, show_default=True, help="Batch size.")
@click.option("--backends", "backend_list", default=None,
              help="Backends to time, comma-separated (default: torch,reference, and triton on a GPU); the "
                   "reference backend's per-step loop is always timed: the ratios are against it.")
@click.option("--train", is_flag=True, help="Also time forward + backward of a squared-mean loss.")
@click.option("--plot", "plot_path", default=None, metavar="OUT.png",
              help="Also save a plot of time vs T per backend, labelled with the lowering each runs.")
@click.option("--repeat", type=int, default=5, show_default=True, help="Timed runs per contender (median kept).")
@click.option("--cell", default=None, help="Which cell of a file that defines several.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
def bench(target, dims, T_list, B, backend_list, train, plot_path, repeat, cell, threads):
    """Time FILE|NAME per backend against the per-step loop (the reference backend), and
    against torch.nn.LSTM/GRU or fla's naive code where the cell is the stdlib cell they run.

    Runs are interleaved (every contender once per round) after one warm-up of each; the
    table shows medians in ms and the ratio loop ms / ms (> 1: faster than the per-step loop)."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import bench as B_

    if repeat < 1:
        raise RecError(f"--repeat: {repeat} is not positive", hint="e.g. --repeat 5")
    if B < 1:
        raise RecError(f"--B: {B} is not positive", hint="e.g. --B 4")
    if threads is not None:
        if threads < 1:
            raise RecError(f"--threads: {threads} is not positive", hint="e.g. --threads 2")
        torch.set_num_threads(threads)
    Ts = _parse_ints(T_list, "--T")
    gpu = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    wanted = _bench_backends(backend_list, gpu, interpret)
    if plot_path is not None:
        _bench_check_plot(plot_path)

    spec = _bench_spec(target, cell)
    values = _bench_dims(spec, _parse_dims(dims))
    device = "cuda" if gpu and not interpret else "cpu"
    order = ["reference"] + [b for b in wanted if b != "reference"]
    from .pipeline import plan_cell
    plan = plan_cell(spec.lower(**spec.analysis_dims(**values)), verify=False)
    for b in order:
        why = plan.selections[b].cannot
        if why:
            runs = [n for n, s in plan.selections.items() if not s.cannot]
            raise RecError(f"--backends: the {b} backend cannot run cell {spec.name}: {why}", spec.cell.span,
                           hint="backends that run it: " + ", ".join(runs))
    layers = {}
    for b in order:
        layers[b] = spec(backend=b, device=device, **values)
        if b != "reference":
            layers[b].load_state_dict(layers["reference"].state_dict())
    contenders = []
    for b in order:
        layer = layers[b]
        contenders.append(B_.Contender(
            b if b != "reference" else "reference", "baseline" if b == "reference" else "backend",
            B_.lowering(layer.selection), lambda xs, layer=layer: B_.first(layer(**xs)),
            list(layer.parameters()), layer))
    contenders += B_.anchors(_stdlib_name(spec), layers["reference"])
    modes = ["forward"] + (["train"] if train else [])

    err = Console(stderr=True)
    sync = torch.cuda.synchronize if device == "cuda" else None
    total = len(Ts) * len(modes) * len(contenders) * (repeat + 1)
    with Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(spec.name, total=total)
        result = B_.measure(contenders, lambda T: B_.make_inputs(layers["reference"], B, T, shaped=True, device=device),
                            Ts, modes, repeat, sync, tick=lambda name: bar.update(task, advance=1, description=name))

    _bench_report(result, spec, values, B, repeat, device, plot_path)


def _bench_backends(backend_list, gpu: bool, interpret: bool) -> list[str]:
    """The backends --backends names (default: torch and reference, triton on a GPU)."""
    from .pipeline import BUILT
    if backend_list is None:
        return ["torch", "reference"] + (["triton"] if gpu else [])
    wanted = list(dict.fromkeys(b.strip() for b in backend_list.split(",") if b.strip()))
    if not wanted:
        raise RecError("--backends: no backend given", hint="built: " + ", ".join(BUILT))
    for b in wanted:
        if b not in BUILT:
            import difflib
            close = difflib.get_close_matches(b, BUILT, n=1)
            raise RecError(f"--backends: unknown backend '{b}'",
                           hint=(f"did you mean {close[0]}? " if close else "") + "built: " + ", ".join(BUILT))
    if "triton" in wanted and not gpu and not interpret:
        raise RecError("--backends: the triton backend runs on a CUDA GPU, and there is none here",
                       hint="drop triton from --backends, or set TRITON_INTERPRET=1 to run it in Triton's "
                            "interpreter (seconds a step: useless for timing)")
    return wanted


def _bench_check_plot(plot_path: str) -> None:
    parent = Path(plot_path).resolve().parent
    if not parent.is_dir():
        raise RecError(f"--plot: no folder {parent}", hint="create it first, or give another path")
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise RecError("--plot needs matplotlib", hint="pip install matplotlib")


def _bench_report(result, spec, values: dict, B: int, repeat: int, device: str, plot_path) -> None:
    """The table (and the plot) of one `recdsl bench` run."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from . import bench as B_
    out = Console(width=None if Console().is_terminal else 160)
    shape = f"B={B} " + " ".join(f"{k}={v}" for k, v in values.items())
    out.print(f"{spec.name} ({spec.filename}), {shape}, device {device}", highlight=False, soft_wrap=True)
    out.print(B_.env_line(repeat, device), highlight=False, soft_wrap=True)
    table = Table("T", "mode", "backend / anchor", "lowering", "ms", "vs loop")
    table.columns[0].justify = table.columns[4].justify = table.columns[5].justify = "right"
    table.columns[2].no_wrap = True
    last = None
    for r in result.rows:
        if last is not None and (r.T, r.mode) != last:
            table.add_section()
        last = (r.T, r.mode)
        name = r.name + (" (per-step loop)" if r.kind == "baseline" else "")
        table.add_row(str(r.T), r.mode, name, r.lowering, f"{r.ms:.2f}", f"{r.ratio:.2f}x")
    out.print(table)
    for w in result.warnings:
        out.print(f"[yellow]{w}[/yellow]", soft_wrap=True)
    out.print("vs loop = reference per-step loop ms / ms (> 1: faster than the step as written, run one step at "
              "a time)", highlight=False, soft_wrap=True)
    if plot_path is not None:
        B_.plot(result, plot_path, f"{spec.name}: {shape}, {device} ({torch.get_num_threads()} threads)")
        out.print(f"plot: {plot_path}", highlight=False, soft_wrap=True)



def _fuzz_mutants(n: int, seed: int, backends: list[str], paths: list[str], out: str, err) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .fuzz.mutants import stdlib_mutants
    from .fuzz.runner import _read_cell_file
    sources = [_read_cell_file(p)[0] for p in paths] or None
    with Progress(TextColumn("[bold]mutants[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("", total=n)
        report = stdlib_mutants(n, seed, backends, sources, out, progress=lambda i, r: bar.update(task, completed=i))
    for _, what, path in report.crashes:
        click.echo(f"mutant crash: {what}" + (f" ({path})" if path else ""), err=True)
    click.echo(f"{report.summary_line()} in {report.seconds:.1f} s, seed {seed}, backends reference,"
               + ",".join(backends))
    sys.exit(1 if report.crashes else 0)


def _inspect_html(specs, given: dict, out: str, aot: bool, arch: int) -> None:
    from .inspect_html import page
    target = Path(out)
    if not target.resolve().parent.is_dir():
        raise RecError(f"--html: no folder {target.resolve().parent}", hint="create it first, or give another path")
    if aot and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" not in sys.modules:
        del os.environ["TRITON_INTERPRET"]   # as --stage ptx: compiling ahead of time interprets nothing
        click.echo(f"recdsl: TRITON_INTERPRET ignored: --aot compiles for sm_{arch}, it runs nothing", err=True)
    text = page(specs, given, aot=aot, arch=arch)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise RecError(f"--html: cannot write {out} ({e.strerror})") from None
    click.echo(f"wrote {out} ({len(text) // 1024} KiB): " + ", ".join(s.name for s in specs))


def _generated_c(emitted) -> str:
    """The C the torch backend generates for this cell: one fused loop per eligible loop stage."""
    loops = emitted.emitter.fused
    if not loops:
        kernels = ", ".join(sorted({c.kernel.name for c in emitted.selection.stages}))
        return (f"// {emitted.plan.cell}: no generated C (its stages run {kernels}; the scan and chunkwise "
                "C kernels are the fixed library backends/torch/csrc/scans.c)\n")
    return "".join(f"// ==== fused loop of stage(s) {', '.join(fl.states)} ====\n{fl.source}\n"
                   + (f"// ==== its decode step (layer.step()) ====\n{fl.step_source}\n"
                      if getattr(fl, "step_source", None) else "") for fl in loops)


def _inspect_triton(s, dims: dict, stage: str, arch: int):
    from .backends import triton as triton_backend
    from .pipeline import emit_cell
    ir = s.lower(**s.analysis_dims(**dims))
    why = triton_backend.supports(ir)
    if why:
        raise RecError(why, s.cell.span)
    if stage == "triton":
        emitted = emit_cell(ir, "triton")
        click.echo(emitted.kernels)
        for module in triton_backend.fixed_kernel_modules(emitted.selection):
            path = module.__name__.replace("recdsl.", "").replace(".", "/")
            click.echo(f"# ---- {path}.py: one kernel set for every cell, called by the driver below")
            click.echo(module.SOURCE)
        click.echo("# ---- driver (torch): launches the kernels above; what runs each stage (the selection):")
        for c in emitted.selection.stages:
            click.echo(f"# stage {c.stage}: {c.summary()}" + (f" -- {c.note}" if c.note else ""))
        click.echo(emitted.source, nl=False)
        return
    from .backends.triton import aot
    _, compiled = triton_backend.compile_cell(emit_cell(ir, "triton"), arch)
    for c in compiled:
        click.echo(f"// ==== {c.name} (sm_{arch}) ====")
        click.echo(c.asm[stage])
    click.echo("// " + aot.summary_table(compiled).replace("\n", "\n// "))


def _dump_ast(node, indent: int = 0) -> str:
    from dataclasses import fields
    from . import ast as A
    pad = "  " * indent
    sp = node.span
    where = f"  @{sp.line}:{sp.col}-{sp.end_line}:{sp.end_col}" if sp else ""
    scalars = []
    kids = []
    for f in fields(node):
        if f.name == "span":
            continue
        v = getattr(node, f.name)
        if isinstance(v, A.Node):
            kids.append((f.name, [v]))
        elif isinstance(v, list) and any(isinstance(x, A.Node) for x in v):
            kids.append((f.name, v))
        elif isinstance(v, list) and not v:
            continue
        elif f.name != "doc":
            scalars.append(f"{f.name}={v!r}")
    ty = f"  : {node.ty}" if getattr(node, "ty", None) is not None else ""
    lines = [f"{pad}{type(node).__name__}({', '.join(scalars)}){ty}{where}"]
    for name, items in kids:
        lines.append(f"{pad}  .{name}")
        lines.extend(_dump_ast(x, indent + 2) for x in items)
    return "\n".join(lines)


@main.command()
@click.option("--no-plan", is_flag=True, help="Skip the analysis (faster): names and families only.")
def stdlib(no_plan):
    """List the standard library: name, family, classes found, lowering per backend."""
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table
    from .spec import load_all, stdlib_dir, stdlib_files
    table = Table("name", "family", "cell", "classes (per stage)", "torch (kernel per stage)", "triton")
    root = stdlib_dir()
    files = stdlib_files()
    for name, path in track(list(files.items()), description="analysing", transient=True, disable=no_plan):
        family = str(path.parent.relative_to(root))
        try:
            specs = load_all(path)
        except RecError as e:
            table.add_row(name, family, "-", f"[red]error: {e.message}[/red]", "", "")
            continue
        for s in specs:
            if no_plan:
                table.add_row(name, family, s.name, ", ".join(s.cell.states), "", "")
                continue
            plan = s.plan()
            classes = "; ".join(f"{', '.join(st.states)}: {st.cls}" for st in plan.stages)
            runs = [sel.cannot or "; ".join(c.kernel.name for c in sel.stages)
                    for sel in (plan.selections["torch"], plan.selections["triton"])]
            table.add_row(name, family, s.name, classes, *runs)
    Console().print(table)


@main.command()
def builtins():
    """List the builtin functions of the language."""
    from rich.console import Console
    from rich.table import Table
    from .builtins import BUILTINS
    table = Table("function", "arguments", "shape rule", "meaning")
    for b in BUILTINS.values():
        lo, hi = b.nargs
        n = str(lo) if lo == hi else (f"{lo}+" if hi < 0 else f"{lo}-{hi}")
        if b.kwargs:
            n += " (" + ", ".join(f"{k}=" for k in b.kwargs) + ")"
        table.add_row(b.name, n, b.rule, b.doc)
    Console().print(table)


@main.command()
@click.argument("files", nargs=-1)
@click.option("--seconds", type=float, default=60.0, show_default=True, help="Time budget (generated cells).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cells and the data.")
@click.option("--backends", "backend_list", default=None,
              help="Backends to compare with reference, comma-separated (default: every built one that runs "
                   "at speed here; triton only on a GPU, its interpreter takes seconds a cell).")
@click.option("--cells", "cells", multiple=True,
              help="Fuzz these .rec files (random inputs and shapes) instead of generated cells; "
                   "a file written by the shrinker replays its recorded case.")
@click.option("--out", default="fuzz-out", show_default=True, help="Where shrunk reproducers are written.")
@click.option("--max-cells", type=int, default=None, help="Stop after this many cells.")
@click.option("--trials", type=int, default=8, show_default=True, help="Random configurations per --cells file.")
@click.option("--no-shrink", is_flag=True, help="Report disagreements without shrinking them.")
@click.option("--shrink-seconds", type=float, default=60.0, show_default=True, help="Budget per shrink.")
@click.option("--frontend/--no-frontend", default=True, show_default=True,
              help="Also fuzz the frontend with mutated sources (accepted, or rejected with a RecError).")
@click.option("--mutants", type=int, default=None,
              help="Instead: this many mutants of the stdlib (or of FILES), each checked, planned, built and "
                   "run on reference and the backends; exit 1 on any internal error or hang.")
def fuzz(files, seconds, seed, backend_list, cells, out, max_cells, trials, no_shrink, shrink_seconds, frontend,
         mutants):
    """Differential fuzzing: random well-typed cells (or your .rec FILES) on every backend,
    compared with reference (outputs, final states, gradients). Exit code 1 on any
    disagreement; each one is shrunk to a minimal .rec file in --out with its replay command."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .fuzz.runner import check_backends, fuzz as run_fuzz
    paths = list(cells) + list(files)
    backends = [b.strip() for b in backend_list.split(",") if b.strip()] if backend_list else None
    err = Console(stderr=True)
    if mutants is not None:
        _fuzz_mutants(mutants, seed, check_backends(backends), paths, out, err)
        return
    with Progress(TextColumn("[bold]fuzz[/bold] {task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("", total=seconds if not paths else None)

        def progress(elapsed, report):
            bar.update(task, completed=min(elapsed, seconds),
                       description=f"{report.cells} cells, {report.runs} runs, {report.disagreements} disagreements")

        report = run_fuzz(seconds=seconds, seed=seed, backends=backends, files=paths, out=out, max_cells=max_cells,
                          shrink=not no_shrink, shrink_budget=shrink_seconds, frontend=frontend, trials=trials,
                          progress=progress)
    for line in report.class_lines():
        click.echo(line)
    if report.declined:
        click.echo("declined: " + ", ".join(f"{b} {n} cells" for b, n in report.declined.items()))
    if report.skipped:
        click.echo(f"skipped: {report.skipped} cells (reference not finite)")
    if frontend:
        click.echo(f"frontend: {report.mutants} mutants, {report.mutants_accepted} accepted, "
                   f"{report.mutants - report.mutants_accepted - len(report.frontend_crashes)} rejected with a "
                   f"RecError, {len(report.frontend_crashes)} crashes")
    for src, what, path in report.frontend_crashes:
        click.echo(f"frontend crash: {what}" + (f" ({path})" if path else ""), err=True)
    for f in report.failures:
        best = f.shrunk or f.case
        click.echo(f"disagreement: {f.summary()}", err=True)
        click.echo(f"  case: {best.describe()}" + (f" (shrunk from {f.case.describe()})" if f.shrunk else ""),
                   err=True)
        if f.path:
            click.echo(f"  replay: recdsl fuzz --cells {f.path} --seed {seed} --backends {f.backend}", err=True)
    click.echo(f"{report.distinct} distinct cells in {report.seconds:.1f} s, seed {seed}, backends "
               + ",".join(report.backends))
    click.echo(report.summary_line())
    sys.exit(0 if report.ok else 1)
