"""Shrinking a disagreement to a minimal cell and minimal shapes (greedy delta debugging).

Starting from a failing `Case` (a backend disagrees with `reference`), try simpler
variants one at a time and keep the first one that still fails, until none does:

- the run: T (towards 1, keeping one value past each chunk boundary), B = 1, no heads, no
  reverse, no initial state, float64;
- the cell: drop an output; drop a state (its reads become its initial value); inline a
  local; replace an expression by one of its sub-expressions of the same shape, by an
  input of the same shape, or by 0 / 1 / 0.5; drop unused locals and declarations;
  merge the input declarations into one line;
- the dims: each towards 1.

Every variant goes through the printer, the parser and the checker (a variant that does
not check is skipped) and is re-run; nothing is trusted from the original run."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Callable, Iterator

from recdsl import ast as A
from recdsl.errors import RecError
from recdsl.parser import parse
from recdsl.printer import to_source
from recdsl.spec import parse_and_check

from .runner import Case, disagrees

T_STEPS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 63, 64, 65, 66, 127, 128, 129]


def _checked_cell(source: str, cell: str | None):
    cells = parse_and_check(source)
    if cell is not None:
        cells = [c for c in cells if c.name == cell]
    return cells[0].ast


def _module_source(cell_ast: A.Cell) -> str:
    return to_source(A.Module([cell_ast]))


# ---------------------------------------------------------------------------- AST edits
def _reads(node: A.Node, name: str) -> bool:
    return any(isinstance(n, (A.Name, A.Primed)) and n.id == name for n in node.walk())


def _substitute(node: A.Node, pred: Callable[[A.Node], bool], make: Callable[[A.Node], A.Node]) -> A.Node:
    """A copy of node with every sub-node satisfying pred replaced by make(sub-node)."""
    if pred(node):
        return make(node)
    node = copy.copy(node)
    for f in node.__dataclass_fields__:
        v = getattr(node, f)
        if isinstance(v, A.Node):
            setattr(node, f, _substitute(v, pred, make))
        elif isinstance(v, list):
            setattr(node, f, [_substitute(x, pred, make) if isinstance(x, A.Node) else x for x in v])
    return node


def _statements(cell: A.Cell) -> list:
    return [it for it in cell.items if isinstance(it, (A.Assign, A.Output, A.For))]


def _decl_names(cell: A.Cell, kind: str) -> list[str]:
    return [v.name for it in cell.items if isinstance(it, A.Decl) and it.kind == kind for v in it.vars]


def _drop_decl(cell: A.Cell, name: str) -> A.Cell:
    items = []
    for it in cell.items:
        if isinstance(it, A.Decl):
            vs = [v for v in it.vars if v.name != name]
            if not vs:
                continue
            it = replace(it, vars=vs)
        items.append(it)
    return replace(cell, items=items)


def _cleanup(cell: A.Cell) -> A.Cell:
    """Drop locals, params, inputs and dims nothing reads (to a fixpoint)."""
    while True:
        changed = False
        stmts = _statements(cell)
        for it in stmts:
            if isinstance(it, A.Assign) and all(isinstance(t, A.Name) for t in it.targets):
                others = [s for s in cell.items if s is not it]
                if not any(_reads(s, t.id) for t in it.targets for s in others):
                    cell = replace(cell, items=[s for s in cell.items if s is not it])
                    changed = True
                    break
        if changed:
            continue
        for kind in ("param", "input"):
            for name in _decl_names(cell, kind):
                if not any(_reads(s, name) for s in cell.items if not (isinstance(s, A.Decl) and s.kind == kind
                                                                       and any(v.name == name for v in s.vars))):
                    cell = _drop_decl(cell, name)
                    changed = True
        if not changed:
            break
    used = {n.id for it in cell.items for n in it.walk() if isinstance(n, A.Name)}
    args = [a for a in cell.args if a.default is not None or a.name in used]
    return replace(cell, args=args)


def _merge_inputs(cell: A.Cell) -> A.Cell:
    decls = [it for it in cell.items if isinstance(it, A.Decl) and it.kind == "input"]
    if len(decls) <= 1:
        return cell
    merged = A.Decl("input", [v for d in decls for v in d.vars])
    items, placed = [], False
    for it in cell.items:
        if it in decls:
            if not placed:
                items.append(merged)
                placed = True
            continue
        items.append(it)
    return replace(cell, items=items)


def _expr_slots(cell: A.Cell) -> list[tuple[int, list[int]]]:
    """(item index, path) of every expression in the statements, parents first."""
    out = []

    def walk(node, path):
        if isinstance(node, A.Expr):
            out.append((i, path))
        for k, child in enumerate(_children(node)):
            walk(child, path + [k])

    for i, it in enumerate(cell.items):
        if isinstance(it, (A.Assign, A.Output)):
            walk(it.value, [])
    return out


def _children(node: A.Node) -> list:
    kids = []
    for f in node.__dataclass_fields__:
        v = getattr(node, f)
        if isinstance(v, A.Node):
            kids.append(v)
        elif isinstance(v, list):
            kids.extend(x for x in v if isinstance(x, A.Node))
    return kids


def _get(node: A.Node, path: list[int]) -> A.Node:
    for k in path:
        node = _children(node)[k]
    return node


def _set(node: A.Node, path: list[int], new: A.Node) -> A.Node:
    """A copy of node with the sub-node at path replaced by new."""
    if not path:
        return new
    target = _children(node)[path[0]]
    node = copy.copy(node)
    for f in node.__dataclass_fields__:
        v = getattr(node, f)
        if v is target:
            setattr(node, f, _set(v, path[1:], new))
            return node
        if isinstance(v, list) and any(x is target for x in v):
            setattr(node, f, [_set(x, path[1:], new) if x is target else x for x in v])
            return node
    raise AssertionError("path not found")


def _shape(e: A.Node):
    ty = getattr(e, "ty", None)
    return getattr(ty, "shape", None)


def _variants(cell: A.Cell) -> Iterator[A.Cell]:
    """Simpler variants of a checked cell (its expressions carry types), biggest cuts first."""
    items = cell.items
    outputs = [it for it in items if isinstance(it, A.Output)]
    # drop an output
    if len(outputs) > 1:
        for o in outputs:
            yield _cleanup(replace(cell, items=[it for it in items if it is not o]))
    # drop a state: reads of s and s' become its initial value
    for it in items:
        if not (isinstance(it, A.Decl) and it.kind == "state"):
            continue
        for v in it.vars:
            init = v.init.value if isinstance(v.init, A.ValueInit) else A.Num(0, "0")
            body = [s for s in items if not (isinstance(s, A.Assign) and any(
                isinstance(t, A.Primed) and t.id == v.name for t in s.targets))]
            body = [_substitute(s, lambda n, nm=v.name: isinstance(n, (A.Name, A.Primed)) and n.id == nm,
                                lambda n, init=init: copy.deepcopy(init)) if not isinstance(s, A.Decl) else s
                    for s in body]
            yield _cleanup(_drop_decl(replace(cell, items=body), v.name))
    # inline a local (single-target assignment outside loops)
    for it in items:
        if isinstance(it, A.Assign) and len(it.targets) == 1 and isinstance(it.targets[0], A.Name):
            name = it.targets[0].id
            rest = [s for s in items if s is not it]
            yield _cleanup(replace(cell, items=[
                _substitute(s, lambda n, nm=name: isinstance(n, A.Name) and n.id == nm,
                            lambda n, val=it.value: copy.deepcopy(val)) if not isinstance(s, A.Decl) else s
                for s in rest]))
    # simplify an expression
    inputs = {}
    for it in items:
        if isinstance(it, A.Decl) and it.kind == "input":
            for v in it.vars:
                inputs.setdefault(len(v.shape), []).append(v.name)
    for i, path in _expr_slots(cell):
        e = _get(items[i].value, path)
        if isinstance(e, (A.Num, A.NoneLit)):
            continue
        shape = _shape(e)
        repl: list[A.Node] = []
        for kid in _children(e):
            if isinstance(kid, A.Expr) and shape is not None and _shape(kid) == shape:
                repl.append(kid)
        if not isinstance(e, A.Name):
            repl += [A.Num(0, "0"), A.Num(1, "1"), A.Num(0.5, "0.5")]
            if shape is not None:
                for nm in inputs.get(len(shape), [])[:2]:
                    repl.append(A.Name(nm))
        for r in repl:
            new = replace(items[i], value=_set(items[i].value, path, copy.deepcopy(r)))
            yield _cleanup(replace(cell, items=items[:i] + [new] + items[i + 1:]))


# ---------------------------------------------------------------------------- driver
def shrink(case: Case, backend: str, budget_s: float = 60.0, max_tries: int = 2000, kinds: set | None = None,
           still_fails: Callable[[Case], bool] | None = None) -> Case:
    """The smallest case found (within the budget) on which `backend` still disagrees in
    one of the ways of `kinds` (runner.signature; None: any way)."""
    fails = still_fails or (lambda c: disagrees(c, backend, kinds))
    deadline = time.monotonic() + budget_s
    tries = 0

    def attempt(c: Case) -> bool:
        nonlocal tries
        tries += 1
        return fails(c)

    def out_of_time() -> bool:
        return time.monotonic() > deadline or tries >= max_tries

    def shortest(case: Case, lengths) -> Case:
        """The first of the shorter runs that still fails (lengths from short to long)."""
        for T in lengths:
            if out_of_time():
                break
            c = replace(case, T=T)
            if attempt(c):
                return c
        return case

    # the run first: a short T makes every later try cheap
    case = shortest(case, [t for t in T_STEPS if t < case.T] + ([case.T - 1] if case.T > 1 else []))
    for field, value in (("B", 1), ("heads", None), ("reverse", False), ("init_state", False),
                         ("dtype", "float64")):
        if getattr(case, field) != value and not out_of_time():
            c = replace(case, **{field: value})
            if attempt(c):
                case = c

    # the cell, to a fixpoint
    source = case.source
    if case.cell is not None:  # keep only the failing cell of a multi-cell file
        source = _module_source(_checked_cell(source, case.cell))
    progress = True
    while progress and not out_of_time():
        progress = False
        try:
            cell = _checked_cell(source, case.cell)
        except RecError:
            break
        seen = {source}
        for variant in _variants(cell):
            if out_of_time():
                break
            try:
                text = _module_source(_merge_inputs(variant))
                if text in seen:
                    continue
                seen.add(text)
                parse_and_check(text)
            except (RecError, TypeError, AssertionError):
                continue
            if len(text) >= len(source):
                continue
            c = replace(case, source=text, dims={k: v for k, v in case.dims.items()
                                                 if _uses_dim(text, k)})
            if attempt(c):
                case, source, progress = c, text, True
                break
    # dims towards 1, then T again (the cell may fail on a shorter run now)
    for name in list(case.dims):
        for v in (1, 2):
            if v < case.dims[name] and not out_of_time():
                c = replace(case, dims={**case.dims, name: v})
                if attempt(c):
                    case = c
                    break
    case = shortest(case, [t for t in T_STEPS if t < case.T])
    # a canonical print of the final cell (merged input line), with the case line
    try:
        text = _module_source(_merge_inputs(_checked_cell(case.source, case.cell)))
        c = replace(case, source=text, cell=None)
        if text != case.source and fails(c):
            case = c
    except RecError:
        pass
    return case


def _uses_dim(text: str, name: str) -> bool:
    import re
    head = text.split("\n", 1)[0] if text.startswith("cell") else next(
        (ln for ln in text.splitlines() if ln.startswith("cell ")), "")
    return re.search(rf"\b{name}\b", head) is not None


def statement_lines(source: str) -> int:
    """Declaration and statement lines of a cell (not the cell line, comments, blank lines)."""
    return sum(1 for ln in source.splitlines()
               if ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("cell "))


def parse_ok(source: str) -> bool:
    try:
        parse(source)
        return True
    except RecError:
        return False
