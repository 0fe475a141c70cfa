"""The `recdsl` command line: check, inspect, stdlib, builtins.

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


STAGES = ("ast", "source", "ir", "passes", "plan", "reference", "torch")


@main.command()
@click.argument("file")
@click.option("--stage", type=click.Choice(STAGES), default="plan", show_default=True,
              help="ast: syntax tree with spans; source: the tree printed back; ir: one step as a graph; "
                   "passes: each analysis pass; plan: classes, coefficients, checks; reference/torch: generated code.")
@click.option("--dims", default=None, help=DIMS_HELP)
def inspect(file, stage, dims):
    """Print one compilation stage of FILE (a .rec path or a stdlib name)."""
    from . import printer
    from .spec import load_all
    specs = load_all(Path(file) if Path(file).exists() else file)
    given = _parse_dims(dims)
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
        else:
            from .backends import torch as torch_backend
            ir = s.lower(**s.analysis_dims(**mine))
            why = torch_backend.supports(ir)
            if why:
                raise RecError(why, s.cell.span)
            click.echo(torch_backend.emit(ir)[0], nl=False)


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
def stdlib():
    """List the cells of the standard library."""
    from rich.console import Console
    from rich.table import Table
    from .spec import load_all, stdlib_dir, stdlib_files
    table = Table("name", "family", "cell", "states", "summary")
    root = stdlib_dir()
    for name, path in stdlib_files().items():
        try:
            specs = load_all(path)
        except RecError as e:
            table.add_row(name, path.parent.name, "-", "-", f"[red]error: {e.message}[/red]")
            continue
        for s in specs:
            states = ", ".join(s.cell.states)
            doc = (s.doc or "").splitlines()[0] if s.doc else ""
            table.add_row(name, str(path.parent.relative_to(root)), s.name, states, doc)
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
