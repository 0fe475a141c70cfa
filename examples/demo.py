"""The main job (`make demo`): load every stdlib cell and the example cells, check them,
print each one's summary, and show that printing and re-parsing gives the same tree.

Later stages (IR, analysis, backends) extend this script as they land."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import recdsl
from recdsl.parser import parse
from recdsl.printer import to_source
from recdsl.spec import stdlib_files

HERE = Path(__file__).resolve().parent


def main() -> None:
    console = Console()
    table = Table("cell", "file", "states", "outputs", "check ms", "round trip")
    paths = list(stdlib_files().values()) + sorted(HERE.glob("*.rec"))
    t_all = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        specs = recdsl.load_all(path)
        ms = (time.perf_counter() - t0) * 1e3
        tree = parse(path.read_text(), str(path))
        same = parse(to_source(tree)) == tree
        for s in specs:
            states = ", ".join(f"{n}{_shape(v)}" for n, v in s.cell.states.items())
            outs = ", ".join(o.name for o in s.cell.outputs)
            table.add_row(s.name, str(path.relative_to(HERE.parent)), states, outs, f"{ms:.1f}",
                          "ok" if same else "[red]DIFFERS[/red]")
    console.print(table)
    console.print(f"{len(paths)} files parsed and checked in {(time.perf_counter() - t_all) * 1e3:.0f} ms")
    console.print("\nOne cell in full:\n")
    console.print(recdsl.load("mlstm").summary(), markup=False)


def _shape(var) -> str:
    return "[" + ", ".join(str(d) for d in var.shape) + "]"


if __name__ == "__main__":
    main()
