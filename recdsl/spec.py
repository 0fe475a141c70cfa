"""The public entry point: `recdsl.load(...)` -> CellSpec.

`load` takes a stdlib name ("gla"), a path to a .rec file, or .rec source text, parses
and checks it, and returns a CellSpec: the checked cell, ready for the later stages."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from .checker import CheckedCell, check
from .errors import RecError
from .parser import parse

PACKAGE_DIR = Path(__file__).resolve().parent


def stdlib_dir() -> Path:
    installed = PACKAGE_DIR / "stdlib"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "stdlib"


def stdlib_files() -> dict[str, Path]:
    """stdlib name (file stem, lower case) -> path, over all family folders."""
    return {p.stem.lower(): p for p in sorted(stdlib_dir().rglob("*.rec"))}


@dataclass
class CellSpec:
    """A parsed and checked cell."""
    cell: CheckedCell
    source_text: str
    filename: str

    @property
    def name(self) -> str:
        return self.cell.name

    @property
    def doc(self) -> str | None:
        return self.cell.doc

    def summary(self) -> str:
        return self.cell.summary()

    def __call__(self, backend: str = "auto", heads: int | None = None, reverse: bool = False,
                 dtype=None, device=None, **dims):
        """Instantiate: dims and hyper-parameters by name -> a torch.nn.Module (RecModule)."""
        from .runtime import RecModule
        return RecModule(self, dims, heads=heads, backend=backend, reverse=reverse, dtype=dtype, device=device)

    def analysis_dims(self, **given) -> dict:
        """Dims for analysing without an instantiation: given ones, defaults, else small
        distinct sizes (3, 4, 5, ...) so that no two dimensions coincide by accident, chosen
        to satisfy the cell's `where` clause (recdsl.checker.example_dims)."""
        from .checker import example_dims
        invented = example_dims(self.cell, {k: v for k, v in given.items() if k in self.cell.dims})
        out = {}
        for name, var in self.cell.dims.items():
            if name in given:
                out[name] = given[name]
            elif name in invented:
                out[name] = invented[name]
        out.update({k: v for k, v in given.items() if k not in out})
        return out

    def plan(self, trace: dict | None = None, /, **dims):
        """Analyse the cell (for these dims, else analysis dims) and select per backend ->
        the Plan (what `recdsl check` prints; the same pipeline builds modules). `trace` is
        positional only, so that a dimension may be called trace."""
        from .pipeline import plan_cell
        return plan_cell(self.lower(**self.analysis_dims(**dims)), trace=trace)

    def lower(self, **dims):
        """The IR of one step for these dims (defaults where the cell gives them)."""
        from .ir import lower
        return lower(self.cell, dims)

    def __repr__(self) -> str:
        return f"<CellSpec {self.name} from {self.filename}>"


def parse_and_check(text: str, filename: str = "<string>") -> list[CheckedCell]:
    return check(parse(text, filename))


def load_all(what: str | Path) -> list[CellSpec]:
    """Every cell of a file, a stdlib entry or a source text."""
    text, filename = _resolve(what)
    return [CellSpec(c, text, filename) for c in parse_and_check(text, filename)]


def load(what: str | Path, cell: str | None = None) -> CellSpec:
    """Load one cell: from a stdlib name, a .rec path, or source text.

    A file with several cells needs `cell=` to say which."""
    specs = load_all(what)
    if cell is not None:
        for s in specs:
            if s.name == cell:
                return s
        raise RecError(f"no cell named {cell} in {specs[0].filename}",
                       hint="cells there: " + ", ".join(s.name for s in specs))
    if len(specs) > 1:
        raise RecError(f"{specs[0].filename} defines {len(specs)} cells; say which with cell=",
                       hint="cells there: " + ", ".join(s.name for s in specs))
    return specs[0]


def _resolve(what: str | Path) -> tuple[str, str]:
    if isinstance(what, Path):
        return _read(what), str(what)
    if "\n" in what or what.lstrip().startswith("cell "):
        return what, "<string>"
    path = Path(what)
    if path.suffix == ".rec" or path.exists():
        return _read(path), what
    files = stdlib_files()
    key = what.lower()
    if key in files:
        return _read(files[key]), str(files[key])
    close = difflib.get_close_matches(key, list(files), n=3, cutoff=0.6)
    raise RecError(f"'{what}' is neither a .rec file nor a stdlib cell",
                   hint=(f"did you mean {', '.join(close)}? " if close else "") + "`recdsl stdlib` lists the cells")


def _read(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecError(f"{path}: no such file") from None
    except OSError as e:
        raise RecError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecError(f"{path}:{line}: the file is not UTF-8 text", hint="save it as UTF-8") from None
