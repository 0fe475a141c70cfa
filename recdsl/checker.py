"""Name resolution and static shape inference: AST -> CheckedCell.

The checker walks a cell once, in source order, with an environment of what each name
is (dim, hyper-parameter, input, param, state, edge/pair input, local, loop index). It
annotates every expression node with `ty` (recdsl.types.Type) and raises RecError at
the first mistake, always with the span of the offending node and, where possible, a
hint (the nearest known name, the primed form of an update, the rule that was broken).
"""
from __future__ import annotations

import difflib
import keyword
import math
import os
import re
from dataclasses import dataclass, field, replace

from . import ast as A
from .builtins import (BUILTINS, COMPLEX_FUNCS, COMPLEX_HINT, DISTRIBUTIONS, FORWARD_OPTIONS, INIT_COMPLEX_FUNCS,
                       INIT_FUNCS, LANGUAGE_KEYWORDS, LAYER_API, MODULE_API, NEIGHBOURS, OVER_KINDS, PARAM_ONLY,
                       SPEC_OPTIONS)
from .errors import RecError, Span
from .types import ONE, SCALAR, Dim, DimFacts, TupleType, Type, broadcast, fmt_shape, needed

DECL_KINDS = ("input", "param", "state", "edge", "pair")
MAX_DIM_EXPONENT = 64      # `K**2` is a dimension; `2**1000000` is a typo (and would take forever)
MAX_DIM_TERMS = 256        # the expanded polynomial of one dimension expression


@dataclass
class Var:
    """What a name stands for."""
    name: str
    kind: str                 # dim | hyper | input | param | state | edge | pair | local | loop
    type: Type
    span: Span | None
    decl: A.DeclVar | None = None
    default: A.Expr | None = None      # dims with a default, hyper-parameters
    loop_count: Dim | None = None     # loop indices: range(n)
    reads: tuple | None = None        # locals: (what, node) of the first state or input its value reads
    only_in: A.For | None = None      # locals bound only inside a for that may run 0 times

    @property
    def shape(self):
        return self.type.shape


@dataclass
class DimConstraint:
    """One comparison of a cell's `where` clause, `left op right`, as written (before any
    equality is substituted): checked for concrete dimensions by `check_constraints`."""
    left: Dim
    op: str
    right: Dim
    span: Span | None
    text: str

    def holds(self, values: dict[str, int]) -> bool:
        a, b = self.left.evaluate(values), self.right.evaluate(values)
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b}[self.op]

    @property
    def names(self) -> set[str]:
        return self.left.names | self.right.names


@dataclass
class OutputInfo:
    name: str
    type: Type
    node: A.Output


@dataclass
class CheckedCell:
    """A cell that passed the checker: every name resolved, every expression typed."""
    ast: A.Cell
    name: str
    doc: str | None
    dims: dict[str, Var]             # integer dimensions (int hyper-parameters included)
    hypers: dict[str, Var]           # hyper-parameters with a default (int ones are also dims)
    heads: A.Expr | None
    over: str
    inputs: dict[str, Var]
    params: dict[str, Var]
    states: dict[str, Var]
    edges: dict[str, Var]
    pairs: dict[str, Var]
    locals: dict[str, Var]
    outputs: list[OutputInfo]
    updates: dict[str, A.Assign]     # state -> its `s' = ...`
    body: list                       # statements (Assign, Output, For) in order
    loops: list = field(default_factory=list)   # top-level (For, count, operations per pass) as Dims
    constraints: list = field(default_factory=list)   # [DimConstraint]: the `where` clause
    facts: DimFacts = field(default_factory=DimFacts)  # what the checker knew of the dims' sizes

    @property
    def span(self) -> Span | None:
        return self.ast.span

    def summary(self) -> str:
        """A one-screen, human-readable description (what `recdsl check` prints)."""
        def shapes(vs):
            return ", ".join(f"{v.name}{fmt_shape(v.shape)}" + (" complex" if v.type.is_complex else "")
                             for v in vs.values()) or "-"
        dims = ", ".join(n if v.default is None else f"{n}={_printer().expr(v.default)}"
                         for n, v in self.dims.items())
        hypers = ", ".join(f"{n}={_printer().expr(v.default)}" for n, v in self.hypers.items()
                           if n not in self.dims)
        lines = [f"cell {self.name}" + (f" -- {self.doc.splitlines()[0]}" if self.doc else "")]
        lines.append(f"  dims     {dims or '-'}" + (f"   hyper {hypers}" if hypers else "") +
                     (f"   where {', '.join(k.text for k in self.constraints)}" if self.constraints else ""))
        if self.heads is not None or self.over != "seq":
            extra = []
            if self.heads is not None:
                extra.append(f"heads {_printer().expr(self.heads)}")
            if self.over != "seq":
                extra.append(f"over {self.over}")
            lines.append("  layout   " + ", ".join(extra))
        lines.append(f"  inputs   {shapes(self.inputs)}")
        if self.edges or self.pairs:
            lines.append(f"  edge     {shapes(self.edges)}   pair {shapes(self.pairs)}")
        lines.append(f"  params   {shapes(self.params)}")
        st = ", ".join(f"{v.name}{fmt_shape(v.shape)}" + (" complex" if v.type.is_complex else "")
                       + (" on edge" if v.decl.on_edge else "")
                       for v in self.states.values())
        lines.append(f"  states   {st or '-'}")
        lines.append("  outputs  " + (", ".join(f"{o.name}{fmt_shape(o.type.shape)}" for o in self.outputs) or "-"))
        return "\n".join(lines)


def _printer():
    from . import printer
    return printer


def check(module: A.Module) -> list[CheckedCell]:
    seen: dict[str, A.Cell] = {}
    out = []
    for cell in module.cells:
        if cell.name in seen:
            raise RecError(f"a cell named {cell.name} is already defined", cell.span,
                           notes=[("first defined here", seen[cell.name].span)])
        seen[cell.name] = cell
        try:
            out.append(Checker(cell).run())
        except RecursionError:  # the parser refuses deep nesting; a tree built by hand may not
            raise RecError(f"cell {cell.name} nests expressions too deeply to check", cell.span,
                           hint="split long expressions into several named values") from None
    return out


class Checker:
    def __init__(self, cell: A.Cell):
        self.cell = cell
        self.env: dict[str, Var] = {}
        self.over = "seq"
        self.heads: A.Expr | None = None
        self.dims: dict[str, Var] = {}
        self.hypers: dict[str, Var] = {}
        self.decls: dict[str, dict[str, Var]] = {k: {} for k in DECL_KINDS}
        self.locals: dict[str, Var] = {}
        self.outputs: list[OutputInfo] = []
        self.updates: dict[str, A.Assign] = {}
        self.body: list = []
        self.in_sum_in = False
        self.neighbour_ok = False     # inside s.left / s.up / s.prev
        self.const_only: str | None = None   # why only constants are allowed here
        self.loop_depth = 0
        self.loop_stack: list[A.For] = []
        self.values: dict[str, float] = {}    # dims and hyper-parameters whose defaults are known
        self.folded: dict[int, object] = {}   # id(expr) -> its value, for constant expressions
        self.folder = ConstFolder(self._lookup)
        self.loops: list = []                 # top-level (For, count, operations per pass)
        self.loop_costs: dict[int, Dim] = {}
        self.facts = DimFacts()               # the dims' lower bounds and the `where` clause
        self.subst: dict[str, Dim] = {}       # `where D == 2*H`: D is read as 2*H in shapes
        self.constraints: list[DimConstraint] = []

    # ------------------------------------------------------------------ entry
    def run(self) -> CheckedCell:
        c = self.cell
        check_identifier(c.name, _word_span(c.span, c.name), "a cell")
        self._cell_args(c.args)
        self._where(c.where)
        phase = "clause"
        for item in c.items:
            if isinstance(item, (A.Heads, A.Over)):
                if phase != "clause":
                    raise RecError(f"'{'heads' if isinstance(item, A.Heads) else 'over'}' must come right "
                                   "after the cell line", item.span,
                                   hint="clause lines (heads, over) go before declarations and statements")
                self._clause(item)
            elif isinstance(item, A.Decl):
                phase = "decl"
                self._decl(item)
            else:
                phase = "body"
                self.body.append(item)
                self._stmt(item)
        self._finish()
        return CheckedCell(c, c.name, c.doc, self.dims, self.hypers, self.heads, self.over,
                           self.decls["input"], self.decls["param"], self.decls["state"],
                           self.decls["edge"], self.decls["pair"], self.locals, self.outputs,
                           self.updates, self.body, self.loops, self.constraints, self.facts)

    def _finish(self):
        for name, var in self.decls["state"].items():
            if name not in self.updates:
                raise RecError(f"state {name} is never updated", var.span,
                               hint=f"add a line `{name}' = ...` (write `{name}' = {name}` for a constant state)")
        if not self.outputs:
            raise RecError(f"cell {self.cell.name} has no output", self.cell.span,
                           hint="add `output NAME = expr` (or `output h'`)")
        if not self.decls["input"]:
            raise RecError(f"cell {self.cell.name} has no input", self.cell.span,
                           hint="a recurrence runs along its inputs (they give the batch and the time axes); "
                                "declare one, e.g. `input x[D]`")

    # ------------------------------------------------------------------ header
    def _cell_args(self, args: list[A.CellArg]):
        seen_default = None
        for a in args:
            what = "a dimension" if a.default is None else "a hyper-parameter"
            check_identifier(a.name, _word_span(a.span, a.name), what)
            check_api_name(a.name, _word_span(a.span, a.name), "dim")
            self._fresh(a.name, a.span)
            if a.default is None:
                if seen_default is not None:
                    raise RecError(f"dimension {a.name} comes after hyper-parameter {seen_default.name}",
                                   a.span, hint="list the dimensions (no '=') first, then name=default")
                var = Var(a.name, "dim", SCALAR, a.span)
                self.dims[a.name] = var
            else:
                seen_default = a
                self.const_only = "a hyper-parameter's default"
                ty = self.expr(a.default)
                self.const_only = None
                if ty.is_complex:
                    raise RecError(f"the default of {a.name} is complex; a hyper-parameter is a real number",
                                   a.default.span, hint="make the complex value a param (`param z[] complex = ...`) "
                                                        "or build it in the step with complex(re, im)")
                if ty.shape:
                    raise RecError(f"the default of {a.name} must be a scalar, not {ty}", a.default.span)
                check_const_forms(a.default, "a hyper-parameter's default", arange=False)
                is_int = isinstance(a.default, A.Num) and isinstance(a.default.value, int)
                if is_int and not (1 <= a.default.value <= MAX_DIM or
                                   (a.default.value == 0 and a.name in _zero_names(self.cell.where))):
                    raise RecError(f"{a.name} has an integer default, so it is a dimension, and a dimension is "
                                   f"between 1 and {MAX_DIM} (2**31 - 1), not {a.default.text}", a.default.span,
                                   hint=f"for a number write a float, e.g. {a.name}={a.default.value}.0"
                                   if a.default.value < 1 else "dimensions are sizes of tensors")
                if id(a.default) in self.folded:
                    self.values[a.name] = self.folded[id(a.default)]
                var = Var(a.name, "dim" if is_int else "hyper", SCALAR, a.span, default=a.default)
                self.hypers[a.name] = var
                if is_int:
                    self.dims[a.name] = var
            self.env[a.name] = var

    def _where(self, constraints: list[A.Constraint]):
        """The `where` clause: comparisons between dimension expressions. Each becomes facts the
        shape checks use (g >= 0); `0 <= P` lets P be 0; `D == 2*H` reads D as 2*H."""
        pairs = []
        for k in constraints:
            sides = [self.static_dim(e, "a side of a constraint") for e in k.operands]
            for e in k.operands:
                e.ty = SCALAR
            for i, op in enumerate(k.ops):
                left, right = k.operands[i], k.operands[i + 1]
                span = left.span.to(right.span) if left.span is not None else k.span
                if op == "!=":
                    raise RecError("a where clause compares dimensions with <, <=, >, >= or ==, not !=", span,
                                   hint="say which side is larger, e.g. `P < M`")
                a, b = sides[i], sides[i + 1]
                self.constraints.append(DimConstraint(a, op, b, span, span_text(span) or f"{a} {op} {b}"))
                pairs.append((a, op, b, span))
        lower = {name: 0 for name in _zero_names(constraints)}  # `0 <= P`: P may be 0
        # equalities `NAME == expr` (NAME not in expr) are substituted: D is read as 2*H
        for a, op, b, span in pairs:
            if op != "==":
                continue
            for x, y in ((a, b), (b, a)):
                name = _bare_name(x.substitute(self.subst))
                y = y.substitute(self.subst)
                if name is not None and name not in y.names and name not in self.subst:
                    self.subst = {k: v.substitute({name: y}) for k, v in self.subst.items()}
                    self.subst[name] = y
                    break
        facts = []
        for a, op, b, span in pairs:
            a, b = a.substitute(self.subst), b.substitute(self.subst)
            gs = {"<=": [b - a], "<": [b - a - ONE], ">=": [a - b], ">": [a - b - ONE], "==": [b - a, a - b]}[op]
            for g in gs:
                if g.constant is not None and g.constant < 0 or DimFacts(lower).negative(g):
                    raise RecError(f"this constraint never holds: {span_text(span) or f'{a} {op} {b}'}", span,
                                   hint="dimensions are integers >= 1 (>= 0 where the clause says `0 <= P`)")
            facts += gs
        for name, d in self.subst.items():  # a substituted dimension keeps its lower bound
            facts.append(d - Dim.const(lower.get(name, 1)))
        self.facts = DimFacts(lower, [g for g in facts if g.constant is None])

    def _need(self, p: Dim) -> str:
        """The hint for a size that must be >= 0 but is not known to be: the constraint to add."""
        want = needed(p)
        if self.cell.where:
            from .printer import _constraint
            have = ", ".join(_constraint(k) for k in self.cell.where)
            return f"state it in the cell's where clause: `where {have}, {want}`"
        return f"state it on the cell line: `cell {self.cell.name}(...) where {want}:`"

    def _clause(self, item):
        if isinstance(item, A.Heads):
            if self.heads is not None:
                raise RecError("a second 'heads' line", item.span)
            count = self.static_dim(item.count, "the number of heads")
            if count.constant is not None and count.constant > MAX_DIM:
                raise RecError(f"{count.constant} heads is more than the maximum {MAX_DIM} (2**31 - 1)",
                               item.count.span)
            self.heads = item.count
        else:
            if item.kind not in OVER_KINDS:
                sp = item.span
                word = Span(sp.end_line, sp.end_col - len(item.kind), sp.end_line, sp.end_col, sp.source) \
                    if sp is not None and sp.end_col > len(item.kind) else sp
                raise RecError(f"unknown recurrence domain '{item.kind}'", word,
                               hint="write `over seq`, `over grid2d` or `over dag`" + _suggest(item.kind, OVER_KINDS))
            self.over = item.kind

    # ------------------------------------------------------------------ declarations
    def _decl(self, d: A.Decl):
        if d.kind in ("edge", "pair") and self.over != "dag":
            raise RecError(f"'{d.kind}' inputs exist only in a cell that runs `over dag`", d.span,
                           hint="add `over dag` right after the cell line, or declare it as `input`")
        for v in d.vars:
            check_identifier(v.name, _word_span(v.span, v.name), KIND_PHRASES[d.kind])
            if v.name in BUILTINS:
                raise RecError(f"'{v.name}' is a builtin function and cannot name {KIND_PHRASES[d.kind]}",
                               _word_span(v.span, v.name), hint=f"choose another name, e.g. {v.name}_")
            check_api_name(v.name, _word_span(v.span, v.name), d.kind)
            self._fresh(v.name, v.span)
            shape = tuple(self.static_dim(e, f"a dimension of {v.name}") for e in v.shape)
            for size, e in zip(shape, v.shape):
                if (size.constant is not None and size.constant <= 0) or self.facts.negative(size):
                    raise RecError(f"a dimension of {v.name} is {size}; dimensions are positive", e.span,
                                   hint="write [] for a scalar")
                if not self.facts.nonneg(size):
                    raise RecError(f"a dimension of {v.name} is {size}, which is negative for some sizes of "
                                   f"{', '.join(sorted(size.names))}", e.span, hint=self._need(size))
            check_size(shape, None, _word_span(v.span, v.name), f"{d.kind} {v.name}")
            if v.complex:
                self._complex_decl(d.kind, v)
            var = Var(v.name, d.kind, Type(shape, is_complex=v.complex), v.span, decl=v)
            if v.on_edge and not (d.kind == "state" and self.over == "dag"):
                raise RecError("only a state of a cell `over dag` can live `on edge`", v.span)
            self._init(d.kind, v, var)
            self.decls[d.kind][v.name] = var
            self.env[v.name] = var

    def _complex_decl(self, kind: str, v: A.DeclVar) -> None:
        """`complex` on a declaration: params and states (over seq) only."""
        word = _word_span(v.span, "complex")
        if kind in ("input", "edge", "pair"):
            raise RecError(f"{kind} {v.name} cannot be complex: inputs come with the data, as real tensors", word,
                           hint=f"declare its real and imaginary parts as two inputs and build the value in the "
                                f"step: `{v.name} = complex({v.name}_re, {v.name}_im)`")
        if kind == "state" and self.over != "seq":
            raise RecError(f"a complex state runs over seq only; this cell runs over {self.over}", word,
                           hint="write its real and imaginary parts as two real states")

    def _init(self, kind: str, v: A.DeclVar, var: Var):
        init = v.init
        if kind in ("input", "edge", "pair"):
            if init is not None:
                raise RecError(f"{kind} {v.name} takes no initial value; its value comes with the data",
                               init.span)
            return
        if kind == "param" and init is None:
            raise RecError(f"param {v.name} needs an initialiser", v.span,
                           hint=f"e.g. `param {v.name}[...] ~ normal(0, 0.02)` or `= 0`")
        if init is None:
            return  # a state without `= ...` starts at 0
        if isinstance(init, A.RandomInit):
            if kind != "param":
                raise RecError(f"a state starts from a value, not a random draw", init.span,
                               hint="make it a param (`param h0[H] ~ normal(0, 1)`) and write `= h0`")
            if init.dist not in DISTRIBUTIONS:
                raise RecError(f"unknown initialiser '{init.dist}'", init.span,
                               hint="use " + " or ".join(f"{k}({', '.join(a)})" for k, a in DISTRIBUTIONS.items())
                               + _suggest(init.dist, DISTRIBUTIONS))
            names = DISTRIBUTIONS[init.dist]
            pos = [a for a in init.args if not isinstance(a, A.Keyword)]
            kws = [a for a in init.args if isinstance(a, A.Keyword)]
            given = [n for n, _ in zip(names, pos)]
            for k in kws:
                if k.name not in names or k.name in given:
                    raise RecError(f"{init.dist}() has no argument '{k.name}' here", k.span,
                                   hint=f"{init.dist}({', '.join(names)})")
                given.append(k.name)
            if len(pos) > len(names) or len(given) != len(names):
                raise RecError(f"{init.dist} takes {len(names)} arguments ({', '.join(names)})", init.span)
            self.const_only = f"the initialiser of {v.name}"
            for a in init.args:
                ty = self.expr(a.value if isinstance(a, A.Keyword) else a)
                if ty.shape or ty.is_complex:
                    raise RecError(f"an argument of {init.dist}() must be a real scalar, not {ty}",
                                   (a.value if isinstance(a, A.Keyword) else a).span,
                                   hint="a complex param draws its real and imaginary parts independently "
                                        "from the (real) distribution" if ty.is_complex else None)
                check_const_forms(a.value if isinstance(a, A.Keyword) else a, "an initialiser", arange=False)
            self.const_only = None
            check_distribution(init, self.folder)
            return
        value = init.value
        if kind == "state" and isinstance(value, A.Name) and value.id in self.decls["param"]:
            ty = self.expr(value)  # a learned initial state
        else:
            self.const_only = f"the initial value of {v.name}"
            ty = self.expr(value)
            self.const_only = None
            check_const_forms(value, "an initialiser", arange=True)
        if ty.is_complex and not var.type.is_complex:
            raise RecError(f"the initial value of {v.name} is complex, but {kind} {v.name} is real", value.span,
                           hint=f"declare it complex: `{kind} {v.name}[...] complex = ...`")
        if broadcast(ty.shape, var.shape) != var.shape:
            raise RecError(f"the initial value {ty} does not broadcast to {v.name}'s shape {fmt_shape(var.shape)}",
                           value.span)

    # ------------------------------------------------------------------ statements
    def _stmt(self, s):
        if isinstance(s, A.Assign):
            self._assign(s)
        elif isinstance(s, A.Output):
            self._output(s)
        elif isinstance(s, A.For):
            self._for(s)
        else:  # pragma: no cover - the parser makes no other statements
            raise RecError(f"unexpected statement {type(s).__name__}", s.span)

    def _assign(self, s: A.Assign):
        ty = self.expr(s.value)
        targets = s.targets
        if isinstance(ty, TupleType):
            if len(targets) != len(ty.items):
                raise RecError(f"{len(ty.items)} values to unpack into {len(targets)} names", s.span,
                               hint=f"write {len(ty.items)} names on the left, separated by commas")
            types = list(ty.items)
        elif len(targets) > 1:
            raise RecError(f"{len(targets)} names on the left but the right side is one value of shape {ty}",
                           s.span, hint="only split(x, n) returns several values")
        else:
            types = [ty]
        reads = self._data_read(s.value)
        for t, tty in zip(targets, types):
            if isinstance(t, A.Primed):
                self._update(t, tty, s)
            else:
                self._bind_local(t, tty)
                var = self.env[t.id]
                var.reads = var.reads or reads

    def _update(self, t: A.Primed, ty: Type, s: A.Assign):
        var = self.env.get(t.id)
        if var is None:
            raise RecError(f"{t.id}' updates {t.id}, which is not declared", t.span,
                           hint=f"declare it: `state {t.id}[...] = 0`" + _suggest(t.id, self.decls["state"]))
        if var.kind != "state":
            hint = {"local": f"to name a new value write `{t.id}_new = ...`",
                    "input": "an input's value comes with the data at every step; to carry a value from step "
                             "to step, declare a state (`state s[...] = 0`) and write `s' = ...`",
                    "param": "params are learned, not updated by the cell; carry a value in a state instead"}
            raise RecError(f"{t.id} is {_kind_phrase(var)}; only a state has a next value ({t.id}')", t.span,
                           hint=hint.get(var.kind, f"name the new value `{t.id}_new = ...`"))
        if self.loop_depth:
            raise RecError(f"the update {t.id}' = ... is inside a for body", t.span,
                           hint=f"accumulate in a local inside the loop and write `{t.id}' = local` after it")
        if t.id in self.updates:
            raise RecError(f"state {t.id} is updated twice", t.span,
                           notes=[("first update here", self.updates[t.id].span)],
                           hint="each state has exactly one `s' = ...`; combine the two expressions")
        if ty.is_bool:
            raise RecError(f"{t.id}' would be a mask (a comparison result)", s.value.span,
                           hint="use where(mask, a, b) to select values")
        if ty.shape != var.shape and broadcast(ty.shape, var.shape) != var.shape:
            raise RecError(f"{t.id}' has shape {fmt_shape(ty.shape)} but state {t.id} is {fmt_shape(var.shape)}",
                           s.value.span)
        if ty.is_complex and not var.type.is_complex:
            shape = ", ".join(_printer().expr(d) for d in var.decl.shape)
            raise RecError(f"{t.id}' is complex, but state {t.id} is real", s.value.span,
                           hint=f"declare the state complex (`state {t.id}[{shape}] complex = 0`), or keep a real "
                                "value of it: real(...), imag(...) or abs(...)")
        if self.over == "dag":
            on_edge = var.decl.on_edge
            if ty_per_edge(ty) and not on_edge:
                raise RecError(f"{t.id} lives on nodes, but its new value depends on the out-edge "
                               "(an edge input outside sum_in, or a pair input)", s.value.span,
                               hint=f"declare `state {t.id}[...] on edge`, or read edge inputs inside sum_in(...)")
        self.updates[t.id] = s

    def _bind_local(self, t: A.Name, ty):
        name = t.id
        var = self.env.get(name)
        if var is not None and var.kind == "state":
            raise RecError(f"{name} is a state: assign its next value with a prime", t.span,
                           hint=f"did you mean {name}' = ...?")
        if var is not None and var.kind != "local":
            raise RecError(f"{name} is {_kind_phrase(var)} and cannot be assigned", t.span,
                           notes=[("declared here", var.span)] if var.span else None,
                           hint="choose another name for the new value")
        if var is not None and not self.loop_depth:
            raise RecError(f"{name} is already defined", t.span, notes=[("first defined here", var.span)],
                           hint="a name is assigned once (only a for body may rebind it); choose a new name")
        if var is not None and var.type.shape != ty.shape:
            raise RecError(f"{name} is rebound with shape {fmt_shape(ty.shape)}, but it was {fmt_shape(var.shape)}",
                           t.span, notes=[("first defined here", var.span)])
        if var is not None and var.type.is_complex != ty.is_complex:
            what = ("complex", "real") if ty.is_complex else ("real", "complex")
            raise RecError(f"{name} is rebound with a {what[0]} value, but it was {what[1]}", t.span,
                           notes=[("first defined here", var.span)],
                           hint="a name keeps its kind: start a complex accumulator complex, e.g. `acc = 0 * z` "
                                "or `acc = complex(0 * x, 0 * x)`")
        check_identifier(name, t.span, "a value")
        if name in BUILTINS:
            raise RecError(f"'{name}' is a builtin function and cannot name a value", t.span,
                           hint=f"choose another name, e.g. {name}_")
        t.ty = ty
        if var is None:
            var = Var(name, "local", ty, t.span)
            self.locals[name] = var
            self.env[name] = var

    def _output(self, s: A.Output):
        if self.loop_depth:
            raise RecError("output inside a for body", s.span, hint="compute it in a local, output it after the loop")
        ty = self.expr(s.value)
        if isinstance(ty, TupleType):
            raise RecError("an output is one value, not the parts of split(...)", s.value.span)
        name = s.name
        if name is None:
            name = s.value.id if isinstance(s.value, (A.Name, A.Primed)) else f"out{len(self.outputs)}"
        else:
            check_identifier(name, _word_span(s.span, name, after="output"), "an output")
        if any(o.name == name for o in self.outputs):
            raise RecError(f"a second output named {name}", s.span, hint="give it another name: output y2 = ...")
        if ty.is_complex:
            raise RecError(f"output {name} is complex; outputs are real tensors", s.value.span,
                           hint="output a real value of it: real(...), imag(...) or abs(...) (or both parts, as "
                                "two outputs)")
        if self.over == "dag" and ty_per_edge(ty):
            raise RecError("an output is per node, but this value depends on the out-edge", s.value.span,
                           hint="read edge inputs inside sum_in(...)")
        self.outputs.append(OutputInfo(name, ty, s))

    def _for(self, s: A.For):
        check_identifier(s.var, _word_span(s.span, s.var, after="for"), "a loop index")
        if s.func != "range":
            raise RecError(f"a for loop runs over range(n), not {s.func}(...)", s.span,
                           hint="write `for j in range(n):` with n a dimension or a literal")
        if len(s.args) != 1 or isinstance(s.args[0], A.Keyword):
            raise RecError("range takes one argument here: the number of iterations", s.span,
                           hint="write `for j in range(n):` with n a dimension or a literal")
        count = self.static_dim(s.args[0], "the loop count")
        if (count.constant is not None and count.constant <= 0) or self.facts.negative(count):
            raise RecError(f"range({count}) never runs", s.args[0].span,
                           hint="the loop count is a positive dimension or literal")
        if not self.facts.nonneg(count):
            raise RecError(f"the loop count {count} is negative for some sizes of {', '.join(sorted(count.names))}",
                           s.args[0].span, hint=self._need(count))
        if s.var in self.env:
            raise RecError(f"loop index {s.var} is already defined", s.span,
                           notes=[("defined here", self.env[s.var].span)])
        var = Var(s.var, "loop", SCALAR, s.span, loop_count=count)
        self.env[s.var] = var
        self.loop_depth += 1
        self.loop_stack.append(s)
        before = set(self.locals)
        for inner in s.body:
            self._stmt(inner)
        self.loop_stack.pop()
        self.loop_depth -= 1
        del self.env[s.var]
        if not self.facts.positive(count):  # it may run 0 times: what it binds may not exist after it
            for name in set(self.locals) - before:
                if self.locals[name].only_in is None:
                    self.locals[name].only_in = s
        # What it unrolls into, checked now where the count is a literal, else when the dims
        # are known (recdsl.ir.lower), always before unrolling.
        per = pass_cost(s, self.loop_costs)
        self.loop_costs[id(s)] = count * per
        check_unroll([(s, count, per)], None)
        if not self.loop_depth:
            self.loops.append((s, count, per))
            check_unroll(self.loops, None)

    # ------------------------------------------------------------------ helpers
    def _fresh(self, name: str, span: Span):
        if name in self.env:
            prev = self.env[name]
            raise RecError(f"{name} is already declared as {_kind_phrase(prev)}", span,
                           notes=[("declared here", prev.span)] if prev.span else None)

    def static_dim(self, e: A.Expr, what: str) -> Dim:
        """Evaluate an expression that must be an integer polynomial of the dimensions."""
        def bad(msg=None):
            return RecError(msg or f"{what} must be an integer expression of the dimensions", e.span,
                            hint="use literals, dimension names, + - * and ** with a literal exponent")
        if isinstance(e, A.Num):
            if not isinstance(e.value, int):
                raise bad(f"{what} must be an integer, not {e.text}")
            return Dim.const(e.value)
        if isinstance(e, A.Name):
            var = self.env.get(e.id)
            if var is None:
                raise RecError(f"unknown dimension {e.id}", e.span,
                               hint=f"add it to the cell's parameters: cell {self.cell.name}(..., {e.id})"
                               + _suggest(e.id, self.dims))
            if var.kind != "dim":
                raise bad(f"{what}: {e.id} is {_kind_phrase(var)}, not a dimension")
            e.ty = SCALAR
            return self.subst.get(e.id) or Dim.sym(e.id)
        if isinstance(e, A.UnaryOp):
            d = self.static_dim(e.operand, what)
            return -d if e.op == "-" else d
        if isinstance(e, A.BinOp) and e.op in "+-*":
            a, b = self.static_dim(e.left, what), self.static_dim(e.right, what)
            return a + b if e.op == "+" else a - b if e.op == "-" else a * b
        if isinstance(e, A.BinOp) and e.op == "**":
            base = self.static_dim(e.left, what)
            if isinstance(e.right, A.Num) and isinstance(e.right.value, int) and e.right.value >= 0:
                if e.right.value > MAX_DIM_EXPONENT:
                    raise RecError(f"the exponent {e.right.value} is too large for a dimension", e.right.span,
                                   hint=f"a dimension's exponent is at most {MAX_DIM_EXPONENT}")
                out = ONE
                for _ in range(e.right.value):
                    out = out * base
                    if len(out.terms) > MAX_DIM_TERMS:
                        raise bad(f"{what} expands to more than {MAX_DIM_TERMS} terms")
                return out
            raise bad()
        raise bad()

    # ------------------------------------------------------------------ expressions
    def expr(self, e: A.Expr):
        method = getattr(self, "_e_" + type(e).__name__)
        ty = method(e)
        e.ty = ty
        self._fold(e, ty)
        return ty

    def _fold(self, e: A.Expr, ty):
        """Sizes known from literals within bounds; constants (literals, and dims and
        hyper-parameters with defaults) folded, with a located error for one that is not a
        finite real number (an overflow, a NaN, a domain error)."""
        if isinstance(ty, Type) and ty.shape and not isinstance(e, (A.Name, A.Primed)):
            check_size(ty.shape, None, e.span, "this value")
        if isinstance(e, A.Call) and e.func == "arange":
            if not self.const_only:
                return  # a constant vector of the step: not folded (the runtime computes it)
            fold = self.folder.value  # its bounds are dimension expressions, not typed by expr()
        else:
            fold = lambda x: self.folder.node(x, self._folded)  # noqa: E731
        if isinstance(e, (A.Num, A.Imag, A.Name, A.UnaryOp, A.BinOp, A.Call)):
            try:
                self.folded[id(e)] = fold(e)
            except NotConstant:
                pass

    def _folded(self, e: A.Expr):
        if id(e) in self.folded:
            return self.folded[id(e)]
        raise NotConstant

    def _lookup(self, name: str):
        if name in self.values:
            return self.values[name]
        raise NotConstant

    def _e_Num(self, e: A.Num):
        return SCALAR

    def _e_Imag(self, e: A.Imag):
        return Type((), is_complex=True)

    def _e_NoneLit(self, e):
        raise RecError("None only appears inside an index, as a new axis: x[:, None]", e.span)

    def _e_ListExpr(self, e):
        raise RecError("a list [...] only appears as the shape argument of reshape", e.span,
                       hint="e.g. reshape(x, [NH, K])")

    def _e_Name(self, e: A.Name):
        var = self.env.get(e.id)
        if var is None:
            if e.id in BUILTINS:
                raise RecError(f"{e.id} is a function; call it: {e.id}(...)", e.span)
            raise RecError(f"unknown name {e.id}", e.span, hint=self._name_hint(e.id))
        if self.const_only and var.kind not in ("dim", "hyper"):
            raise RecError(f"{self.const_only} may only use constants and dimensions, not {_kind_phrase(var)} {e.id}",
                           e.span)
        if var.kind == "state":
            return self._state_read(e, var)
        if var.only_in is not None and not any(f is var.only_in for f in self.loop_stack):
            raise RecError(f"{e.id} is bound only inside the for loop of line {var.only_in.span.line}, which runs "
                           "0 times for some sizes", e.span,
                           hint=f"bind {e.id} before the loop (e.g. an accumulator `{e.id} = 0 * ...`), or state "
                                "that the count is at least 1 in the cell's where clause")
        if var.kind == "edge":
            if not self.in_sum_in:
                return _edge(var.type)
        if var.kind == "pair":
            if not self.in_sum_in:
                raise RecError(f"pair input {e.id} belongs to an (in-edge, out-edge) pair and is read inside "
                               "sum_in(...)", e.span, hint=f"e.g. sum_in({e.id} * C)")
            return _edge(var.type)
        return var.type

    def _state_read(self, e: A.Name, var: Var) -> Type:
        if self.neighbour_ok:
            return var.type
        if self.over == "grid2d":
            raise RecError(f"over grid2d a state is read from a neighbour: {e.id}.left or {e.id}.up", e.span)
        if self.over == "dag":
            if not self.in_sum_in:
                raise RecError(f"over dag the state {e.id} is read from the incoming edges, inside sum_in(...)",
                               e.span, hint=f"e.g. sum_in({e.id})")
            return var.type
        if var.decl.on_edge:  # pragma: no cover - on edge is only accepted over dag
            raise RecError("an edge state outside a dag", e.span)
        return var.type

    def _e_Primed(self, e: A.Primed):
        var = self.env.get(e.id)
        if var is None:
            raise RecError(f"unknown name {e.id}'", e.span, hint=self._name_hint(e.id))
        if var.kind != "state":
            raise RecError(f"{e.id} is {_kind_phrase(var)}; only a state has a next value ({e.id}')", e.span,
                           hint=f"write {e.id} without the prime")
        if self.const_only:
            raise RecError(f"{self.const_only} may only use constants and dimensions", e.span)
        if e.id not in self.updates:
            raise RecError(f"{e.id}' is read before it is defined", e.span,
                           hint=f"move `{e.id}' = ...` above this line, or read the previous value {e.id}")
        if self.over == "dag" and var.decl.on_edge and not self.in_sum_in:
            return _edge(var.type)
        return var.type

    def _data_read(self, e: A.Expr) -> tuple | None:
        """(what, node) for the first state or input e reads, directly or through a local
        (what: e.g. "the state h", "the local z, which reads the input x"); None if it reads
        only params, constants and dimensions."""
        for n in e.walk():
            if not isinstance(n, (A.Name, A.Primed)):
                continue
            var = self.env.get(n.id)
            if var is None:
                continue
            if isinstance(n, A.Primed) or var.kind in ("state", "input", "edge", "pair"):
                what = "edge input" if var.kind in ("edge", "pair") else var.kind
                return f"the {what} {n.id}" + ("'" if isinstance(n, A.Primed) else ""), n
            if var.kind == "local" and var.reads is not None:
                return f"the local {n.id}, which reads {var.reads[0]}", n
        return None

    def _name_hint(self, name: str) -> str:
        if name.lower() in ("nan", "inf", "infinity"):
            return "constants are finite numbers: there is no nan or inf; for a very large one write e.g. 1e30"
        close = difflib.get_close_matches(name, list(self.env) + list(BUILTINS), n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]}?"
        return "declare it (input, param, state), add it to the cell's dimensions, or assign it first"

    def _e_Attr(self, e: A.Attr):
        if e.attr == "T":
            ty = self.expr(e.value)
            if ty.rank != 2:
                raise RecError(f".T transposes a matrix; this value has shape {ty}", e.span)
            return replace(ty, shape=(ty.shape[1], ty.shape[0]))
        allowed = NEIGHBOURS.get(self.over, ())
        if e.attr in ("left", "up", "prev"):
            if e.attr not in allowed:
                where = {"left": "over grid2d", "up": "over grid2d", "prev": "over seq"}[e.attr]
                raise RecError(f"the neighbour read .{e.attr} exists only in a cell that runs {where}", e.span,
                               hint="this cell runs " + f"over {self.over}"
                               + ("; read the previous value as the bare state name" if self.over == "seq" else ""))
            if not isinstance(e.value, A.Name) or self.env.get(e.value.id) is None \
                    or self.env[e.value.id].kind != "state":
                raise RecError(f".{e.attr} reads a state's value at a neighbour; this is not a state", e.value.span)
            self.neighbour_ok = True
            try:
                return self.expr(e.value)
            finally:
                self.neighbour_ok = False
        if e.attr in ("real", "imag", "conj"):
            raise RecError(f".{e.attr} is not an attribute; the {e.attr} part is a function: {e.attr}(...)", e.span,
                           hint=f"write {e.attr}({_span_text(e.value) or 'z'})")
        raise RecError(f"unknown attribute .{e.attr}", e.span,
                       hint="attributes are .T (transpose)" + (", " + ", ".join("." + a for a in allowed) if allowed else ""))

    def _e_UnaryOp(self, e: A.UnaryOp):
        ty = self._value(e.operand)
        return replace(ty, is_bool=False)

    def _e_BinOp(self, e: A.BinOp):
        a, b = self._value(e.left), self._value(e.right)
        if e.op == "@":
            return self._matmul(e, a, b)
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            raise RecError(f"shapes {a} and {b} do not broadcast in '{e.op}'", e.span,
                           hint=_bcast_hint(a.shape, b.shape))
        if e.op == "**" and (a.is_complex or b.is_complex):
            raise RecError("'**' is not defined on complex values", e.span,
                           hint="multiply (z * z), or write the power through exp of a real modulus and phase: "
                                "r**k * exp(1j * k * theta)")
        return _merge_edge(Type(shape), a, b)

    def _matmul(self, e, a: Type, b: Type) -> Type:
        if a.rank == 0 or b.rank == 0 or a.rank > 2 or b.rank > 2:
            raise RecError(f"'@' needs vectors or matrices, got {a} @ {b}", e.span,
                           hint="use '*' to scale by a scalar")
        if a.shape[-1] != b.shape[0]:
            raise RecError(f"'@' needs the inner dimensions to agree: {a} @ {b}", e.span,
                           hint=f"the last dimension on the left ({a.shape[-1]}) must equal the first on the right "
                                f"({b.shape[0]})" + ("; transpose the left with .T?" if a.rank == 2 and
                                                     a.shape[0] == b.shape[0] else ""))
        shape = a.shape[:-1] + b.shape[1:]
        return _merge_edge(Type(shape), a, b)

    def _e_Compare(self, e: A.Compare):
        a, b = self._value(e.left), self._value(e.right)
        for side, ty in ((e.left, a), (e.right, b)):
            if ty.is_complex:
                raise RecError(f"'{e.op}' compares real values; this side is complex", side.span,
                               hint="complex numbers are not ordered: compare real(z), imag(z) or abs(z)")
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            raise RecError(f"shapes {a} and {b} do not broadcast in '{e.op}'", e.span)
        return Type(shape, True, a.per_edge or b.per_edge) if _has_edge(a, b) else Type(shape, True)

    def _value(self, e: A.Expr) -> Type:
        ty = self.expr(e)
        if isinstance(ty, TupleType):
            raise RecError(f"split(...) returns {len(ty.items)} values; unpack them before using them", e.span,
                           hint="a, b = split(x, 2)")
        return ty

    def _e_Index(self, e: A.Index):
        ty = self._value(e.value)
        shape = list(ty.shape)
        out: list[Dim] = []
        axis = 0
        for sub in e.subs:
            if isinstance(sub, A.NoneLit):
                out.append(ONE)
                continue
            if axis >= len(shape):
                raise RecError(f"too many indices for a value of shape {ty}", sub.span)
            size = shape[axis]
            if isinstance(sub, A.Slice):
                out.append(self._slice(sub, size))
            else:
                self._int_index(sub, size)
            axis += 1
        out.extend(shape[axis:])
        return replace(ty, shape=tuple(out))

    def _slice(self, sub: A.Slice, size: Dim) -> Dim:
        """The length of lo:hi on an axis of `size`, after checking, for every size the cell
        allows (its `where` clause), that 0 <= lo <= hi <= size: slices never wrap around."""
        F = self.facts
        lo = self.static_dim(sub.lo, "a slice bound") if sub.lo is not None else Dim.const(0)
        hi = self.static_dim(sub.hi, "a slice bound") if sub.hi is not None else size
        for bound, node in ((lo, sub.lo), (hi, sub.hi)):
            if node is None:
                continue
            if F.negative(bound):
                raise RecError(f"a slice bound is negative ({bound})", node.span,
                               hint=f"slices count from 0 and do not wrap around: write the bound as an offset "
                                    f"from the start, e.g. {size} - 1")
            if not F.nonneg(bound):
                raise RecError(f"the slice bound {bound} is negative for some sizes of "
                               f"{', '.join(sorted(bound.names))}", node.span,
                               hint="slices do not wrap around; " + self._need(bound))
        length = hi - lo
        if length.constant == 0 or F.negative(length):
            raise RecError(f"the slice is empty ({lo}:{hi})", sub.span,
                           hint="the end of a slice lo:hi must be after its start")
        if not F.nonneg(length):
            raise RecError(f"the slice {lo}:{hi} ends before it starts for some sizes of "
                           f"{', '.join(sorted(length.names))}", sub.span, hint=self._need(length))
        if not F.le(hi, size):
            if F.lt(size, hi):
                raise RecError(f"slice end {hi} is past the axis size {size}", sub.span)
            raise RecError(f"slice end {hi} is past the axis size {size} for some sizes of "
                           f"{', '.join(sorted((hi - size).names))}", sub.span, hint=self._need(size - hi))
        return length

    def _int_index(self, sub: A.Expr, size: Dim):
        F = self.facts
        if isinstance(sub, A.Name) and self.env.get(sub.id) is not None and self.env[sub.id].kind == "loop":
            sub.ty = SCALAR
            count = self.env[sub.id].loop_count
            if not F.le(count, size):
                if F.lt(size, count):
                    raise RecError(f"{sub.id} runs to {count} but the axis has size {size}", sub.span)
                raise RecError(f"{sub.id} runs to {count}, past the axis size {size} for some sizes of "
                               f"{', '.join(sorted((count - size).names))}", sub.span, hint=self._need(size - count))
            return
        idx = self.static_dim(sub, "an index")
        sub.ty = SCALAR
        # In range for every size the cell allows: 0 <= idx < size, or -size <= idx < 0 (from the end).
        hint = f"indices run from 0 to {size - Dim.const(1)} (or -1 down to {-size} from the end)"
        if F.nonneg(idx):
            if F.lt(idx, size):
                return
            if F.le(size, idx):
                raise RecError(f"index {idx} is out of range for an axis of size {size}", sub.span, hint=hint)
            raise RecError(f"index {idx} is out of range for an axis of size {size} for some sizes of "
                           f"{', '.join(sorted((size - idx).names))}", sub.span, hint=self._need(size - idx - ONE))
        if F.negative(idx):
            if F.nonneg(idx + size):
                return
            if F.negative(idx + size):
                raise RecError(f"index {idx} is out of range for an axis of size {size}", sub.span, hint=hint)
            raise RecError(f"index {idx} is out of range for an axis of size {size} for some sizes of "
                           f"{', '.join(sorted((size + idx).names))}", sub.span, hint=self._need(size + idx))
        # the constraint that makes it count one way: from the end if its names come with a minus (1 - M)
        from_end = all(c < 0 for m, c in idx.terms.items() if m)
        raise RecError(f"index {idx} is negative for some sizes of {', '.join(sorted(idx.names))}", sub.span,
                       hint="an index counts from 0 (or from the end when it is negative for every size) and "
                            "never changes direction with the sizes; " + self._need(-idx - ONE if from_end else idx))

    # --- calls
    def _e_Call(self, e: A.Call):
        b = BUILTINS.get(e.func)
        if b is None:
            if e.func in DISTRIBUTIONS:
                raise RecError(f"{e.func}(...) draws a param's initial value: `param W[...] ~ {e.func}(...)`", e.span)
            if e.func == "angle":
                raise RecError("angle(...) is not in the language (it needs atan2)", _word_span(e.span, e.func),
                               hint="keep the phase as a real value and build the number from it: "
                                    "r * exp(1j * theta)")
            raise RecError(f"unknown function {e.func}", _word_span(e.span, e.func),
                           hint=(_suggest(e.func, BUILTINS, cutoff=0.65).lstrip("; ") or
                                 "see `recdsl builtins` for the list of functions"))
        lo, hi = b.nargs
        n = len(e.args)
        if n < lo or (hi >= 0 and n > hi):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi < 0 else f"{lo} to {hi}")
            raise RecError(f"{e.func} takes {want} argument{'s' if want != '1' else ''}, got {n}", e.span,
                           hint=_arity_hint(e))
        for i, k in enumerate(e.kwargs):
            if any(other.name == k.name for other in e.kwargs[:i]):
                raise RecError(f"keyword argument '{k.name}' is given twice", k.span)
            if k.name not in b.kwargs:
                raise RecError(f"{e.func} has no keyword argument '{k.name}'", k.span,
                               hint=f"it takes {', '.join(b.kwargs)}" if b.kwargs else f"{e.func} takes no keywords")
        if self.const_only and e.func in ("sum_in",):
            raise RecError(f"{self.const_only} may only use constants and dimensions", e.span)
        special = getattr(self, "_call_" + e.func, None)
        if special is not None:
            return special(e)
        types = [self._value(a) for a in e.args]
        if b.rule == "unary":
            if types[0].is_complex:
                self._complex_arg(e, e.args[0], ok=e.func in COMPLEX_FUNCS)
                return replace(types[0], is_bool=False, is_complex=e.func != "abs")
            return replace(types[0], is_bool=False)
        for a, t in zip(e.args, types):
            if t.is_complex:  # where(mask, a, b) selects, sum and mean add: the others need real values
                self._complex_arg(e, a, ok=b.rule == "where" or e.func in ("sum", "mean"))
        if b.rule in ("bcast", "where"):
            if b.rule == "where" and not types[0].is_bool:
                raise RecError("the first argument of where is a mask", e.args[0].span,
                               hint="compare something: where(x > 0, a, b)")
            shape = types[0].shape
            for a, t in zip(e.args[1:], types[1:]):
                new = broadcast(shape, t.shape)
                if new is None:
                    raise RecError(f"the arguments of {e.func} do not broadcast: {fmt_shape(shape)} and {t}",
                                   a.span)
                shape = new
            return _merge_edge(Type(shape), *types)
        if b.rule == "reduce":
            return self._reduce(e, types[0])
        if b.rule == "lastaxis":
            if types[0].rank == 0:
                raise RecError(f"{e.func} works along the last axis; this value is a scalar", e.args[0].span)
            return replace(types[0], is_bool=False)
        raise AssertionError(b.rule)  # pragma: no cover

    def _complex_arg(self, e: A.Call, arg: A.Expr, ok: bool) -> None:
        """A located error for a complex argument of a function that is only defined on real values."""
        if not ok:
            raise RecError(f"{e.func} is defined on real values; this argument is complex", arg.span,
                           hint=COMPLEX_HINT)

    def _reduce(self, e: A.Call, ty: Type) -> Type:
        axis = -1
        axis_span = e.span
        for k in e.kwargs:
            if isinstance(k.value, A.NoneLit):
                return replace(ty, shape=())
            v = k.value
            neg = isinstance(v, A.UnaryOp) and v.op == "-"
            num = v.operand if neg else v
            if not (isinstance(num, A.Num) and isinstance(num.value, int)):
                raise RecError("axis must be an integer literal (or None)", k.value.span)
            k.value.ty = SCALAR
            num.ty = SCALAR
            axis = -num.value if neg else num.value
            axis_span = k.span
        if ty.rank == 0:
            raise RecError(f"{e.func} reduces an axis; this value is a scalar", e.args[0].span)
        if not -ty.rank <= axis < ty.rank:
            raise RecError(f"axis {axis} is out of range for a value of shape {ty}", axis_span,
                           hint=f"its axes are {', '.join(str(i) for i in range(ty.rank))} "
                                f"(or {', '.join(str(i) for i in range(-ty.rank, 0))} from the end)")
        shape = list(ty.shape)
        del shape[axis]
        return replace(ty, shape=tuple(shape), is_bool=False)

    def _call_complex(self, e):
        re, im = (self._value(a) for a in e.args)
        for a, t in zip(e.args, (re, im)):
            if t.is_complex:
                raise RecError("complex(re, im) takes two real values; this one is complex", a.span,
                               hint="for re + i*im with complex parts write re + 1j * im")
        shape = broadcast(re.shape, im.shape)
        if shape is None:
            raise RecError(f"the parts of complex(re, im) do not broadcast: {re} and {im}", e.span,
                           hint=_bcast_hint(re.shape, im.shape))
        return _merge_edge(Type(shape, is_complex=True), re, im)

    def _call_real(self, e):
        return replace(self._value(e.args[0]), is_bool=False, is_complex=False)

    def _call_imag(self, e):
        return replace(self._value(e.args[0]), is_bool=False, is_complex=False)

    def _call_conj(self, e):
        return replace(self._value(e.args[0]), is_bool=False)

    def _vector(self, e: A.Expr, fname: str) -> Type:
        ty = self._value(e)
        if ty.rank != 1:
            raise RecError(f"{fname} takes vectors; this argument has shape {ty}", e.span)
        return ty

    def _call_outer(self, e):
        a, b = self._vector(e.args[0], "outer"), self._vector(e.args[1], "outer")
        return _merge_edge(Type((a.shape[0], b.shape[0])), a, b)

    def _call_dot(self, e):
        a, b = self._vector(e.args[0], "dot"), self._vector(e.args[1], "dot")
        if a.shape != b.shape:
            raise RecError(f"dot needs vectors of the same length: {a} and {b}", e.span)
        return _merge_edge(SCALAR, a, b)

    def _call_eye(self, e):
        n = self.static_dim(e.args[0], "the size of eye")
        e.args[0].ty = SCALAR
        self._size(n, e.args[0], "the size of eye")
        return Type((n, n))

    def _size(self, n: Dim, node: A.Expr, what: str) -> None:
        """A located error unless n >= 0 for every size the cell allows (and n >= 1 if a constant)."""
        if (n.constant is not None and n.constant <= 0) or self.facts.negative(n):
            raise RecError(f"{what} is {n}; sizes are positive", node.span)
        if not self.facts.nonneg(n):
            raise RecError(f"{what} is {n}, which is negative for some sizes of {', '.join(sorted(n.names))}",
                           node.span, hint=self._need(n))

    def _call_diag(self, e):
        a = self._vector(e.args[0], "diag")
        return _merge_edge(Type((a.shape[0], a.shape[0])), a)

    def _call_arange(self, e):
        ds = [self.static_dim(a, "an arange bound") for a in e.args]
        for a in e.args:
            a.ty = SCALAR
        lo, hi = (Dim.const(0), ds[0]) if len(ds) == 1 else ds
        n = hi - lo
        if (n.constant is not None and n.constant <= 0) or self.facts.negative(n):
            raise RecError("arange is empty", e.span)
        if not self.facts.nonneg(n):
            raise RecError(f"arange has {n} elements, which is negative for some sizes of "
                           f"{', '.join(sorted(n.names))}", e.span, hint=self._need(n))
        return Type((n,))

    def _call_split(self, e):
        ty = self._value(e.args[0])
        if ty.rank == 0:
            raise RecError("split divides the last axis; this value is a scalar", e.args[0].span)
        nd = e.args[1]
        if not (isinstance(nd, A.Num) and isinstance(nd.value, int) and nd.value >= 1):
            raise RecError("the number of parts must be a positive integer literal", nd.span)
        nd.ty = SCALAR
        part = ty.shape[-1].divide(nd.value)
        if part is None:
            size = ty.shape[-1]
            example = f"{nd.value}*{size}" if len(size.terms) == 1 and size.constant is None else f"{nd.value}*H"
            raise RecError(f"cannot split an axis of size {size} into {nd.value} equal parts", e.span,
                           hint=f"declare the size as a multiple of {nd.value}, e.g. [{example}]")
        return TupleType(tuple(replace(ty, shape=ty.shape[:-1] + (part,)) for _ in range(nd.value)))

    def _call_concat(self, e):
        types = [self._value(a) for a in e.args]
        first = types[0]
        if first.rank == 0:
            raise RecError("concat joins along the last axis; scalars have none", e.args[0].span,
                           hint="index a vector x[None] to make a length-1 vector")
        last = first.shape[-1]
        for a, t in zip(e.args[1:], types[1:]):
            if t.rank != first.rank or t.shape[:-1] != first.shape[:-1]:
                raise RecError(f"concat needs equal leading shapes: {first} and {t}", a.span)
            last = last + t.shape[-1]
        return _merge_edge(Type(first.shape[:-1] + (last,)), *types)

    def _call_reshape(self, e):
        ty = self._value(e.args[0])
        target = e.args[1]
        if not isinstance(target, A.ListExpr):
            raise RecError("reshape's second argument is a list of dimensions", target.span,
                           hint="e.g. reshape(x, [NH, K])")
        dims = tuple(self.static_dim(d, "a reshape dimension") for d in target.items)
        target.ty = SCALAR
        for d, node in zip(dims, target.items):
            self._size(d, node, "a reshape dimension")
        size_in, size_out = ONE, ONE
        for d in ty.shape:
            size_in = size_in * d
        for d in dims:
            size_out = size_out * d
        if size_in != size_out:
            raise RecError(f"cannot reshape {ty} ({size_in} elements) to {fmt_shape(dims)} ({size_out})", e.span)
        return replace(ty, shape=dims)

    def _param_matrix(self, e: A.Call, arg: A.Expr, square: bool = True) -> Type:
        """The type of an argument of inv/solve/expm: a matrix (square) computed from params,
        constants and dimensions only: it is computed once per forward, before the time loop."""
        ty = self._value(arg)
        reads = self._data_read(arg)
        if reads is not None:
            what, node = reads
            raise RecError(f"{e.func}(...) is computed once per forward, from params and constants, but this "
                           f"argument reads {what}", node.span,
                           hint=f"{', '.join(PARAM_ONLY)} take hoisted param computations only (e.g. the "
                                "discretisation solve(I - dt/2 * A, I + dt/2 * A) of params A, dt); "
                                "apply the result to the state with @")
        if ty.is_bool:
            raise RecError(f"{e.func} takes numbers, not a mask", arg.span)
        if ty.is_complex:
            raise RecError(f"{e.func} takes real matrices; this argument is complex", arg.span,
                           hint="for a complex diagonal transition write the diagonal as a complex vector: "
                                "exp(Lambda * dt) elementwise")
        if square and (ty.rank != 2 or ty.shape[0] != ty.shape[1]):
            raise RecError(f"{e.func} needs a square matrix [n, n]; this argument has shape {ty}", arg.span,
                           hint="e.g. a param A[N, N], or eye(N) - dt * A")
        return Type(ty.shape)

    def _call_inv(self, e):
        return self._param_matrix(e, e.args[0])

    def _call_expm(self, e):
        return self._param_matrix(e, e.args[0])

    def _call_solve(self, e):
        a = self._param_matrix(e, e.args[0])
        b = self._param_matrix(e, e.args[1], square=False)
        if b.rank not in (1, 2) or b.shape[0] != a.shape[0]:
            raise RecError(f"solve(A, B) needs B of shape [{a.shape[0]}] or [{a.shape[0]}, k] for A {a}; "
                           f"B has shape {b}", e.args[1].span,
                           hint="solve(A, B) is inv(A) @ B: B's first axis is A's size")
        return Type(b.shape)

    def _call_sum_in(self, e):
        if self.over != "dag":
            raise RecError("sum_in(...) sums over incoming edges and exists only in a cell `over dag`", e.span,
                           hint=f"this cell runs over {self.over}; add `over dag` right after the cell line"
                           + (", or read the previous state value directly" if self.over == "seq" else ""))
        if self.in_sum_in:
            raise RecError("sum_in(...) inside sum_in(...)", e.span)
        self.in_sum_in = True
        try:
            ty = self._value(e.args[0])
        finally:
            self.in_sum_in = False
        # Inside, edge inputs and states are the in-edge's; pair inputs make the sum per out-edge.
        uses_pair = any(isinstance(n, A.Name) and self.env.get(n.id) is not None and self.env[n.id].kind == "pair"
                        for n in e.args[0].walk())
        return replace(ty, per_edge=uses_pair)


# --------------------------------------------------------------------------- helpers

def _edge(ty: Type) -> Type:
    return Type(ty.shape, ty.is_bool, True)


def _has_edge(*types) -> bool:
    return any(t.per_edge for t in types)


def _merge_edge(out: Type, *types) -> Type:
    """out, per edge if any of types is, complex if any of types is."""
    return replace(out, per_edge=out.per_edge or _has_edge(*types),
                   is_complex=out.is_complex or any(t.is_complex for t in types))


def ty_per_edge(ty) -> bool:
    return bool(getattr(ty, "per_edge", False))


KIND_PHRASES = {"dim": "a dimension", "hyper": "a hyper-parameter", "input": "an input", "param": "a param",
                "state": "a state", "edge": "an edge input", "pair": "a pair input", "local": "a local value",
                "loop": "a loop index"}


def _kind_phrase(var: Var) -> str:
    return KIND_PHRASES[var.kind]


def _word_span(span: Span | None, word: str, after: str | None = None) -> Span | None:
    """The span of `word` on the first line of `span` (after the keyword `after`, if given),
    for pointing at a name rather than at the whole declaration or statement."""
    if span is None or span.source is None:
        return span
    text = span.source.line(span.line)
    start = span.col - 1
    if after is not None:
        m = re.compile(rf"\b{re.escape(after)}\b").search(text, start)
        start = m.end() if m else start
    m = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_'])").search(text, start)
    if m is None:
        return span
    return Span(span.line, m.start() + 1, span.line, m.end() + 1, span.source)


_REDUCE_INSTEAD = {"logsumexp": ("logaddexp", "log(exp(a) + exp(b))"), "amax": ("max", "the elementwise maximum"),
                   "sum": (None, "a sum of values"), "mean": (None, "the mean of values"),
                   "norm": (None, "a norm of values")}


def _arity_hint(e: A.Call) -> str | None:
    """What the user probably meant by calling e.func with the wrong number of arguments."""
    f, args = e.func, e.args
    text = [_span_text(a) for a in args]
    if f in ("max", "min"):
        return "amax(x) reduces over an axis; max(a, b) compares two values"
    if f in _REDUCE_INSTEAD and len(args) >= 2:
        second = args[1].operand if isinstance(args[1], A.UnaryOp) and args[1].op == "-" else args[1]
        if len(args) == 2 and isinstance(second, A.Num) and isinstance(second.value, int):
            return f"the axis is a keyword argument: {f}({text[0]}, axis={text[1]})"
        other, what = _REDUCE_INSTEAD[f]
        if other is not None:
            return f"{f}(x) reduces one value over an axis; for {what} write {other}({', '.join(text)})"
        return f"{f}(x) reduces one value over an axis; for {what} write {' + '.join(text)}" + \
            (" and divide" if f == "mean" else "")
    if f == "logaddexp" and len(args) == 1:
        return f"logaddexp(a, b) combines two values; to reduce one over an axis write logsumexp({text[0]})"
    if f in ("inv", "expm") and len(args) == 2:
        return f"{f}(A) takes one square matrix; to apply an inverse write solve(A, B)"
    return None


def _zero_names(constraints: list[A.Constraint]) -> set[str]:
    """The dimensions a `where` clause allows to be 0: those it bounds below by 0, as `0 <= P`
    or `P >= 0` (every other dimension is at least 1)."""
    out = set()
    for k in constraints:
        for i, op in enumerate(k.ops):
            a, b = k.operands[i], k.operands[i + 1]
            lo, hi = (a, b) if op == "<=" else (b, a) if op == ">=" else (None, None)
            if isinstance(lo, A.Num) and lo.value == 0 and isinstance(hi, A.Name):
                out.add(hi.id)
    return out


def _bare_name(d: Dim) -> str | None:
    """The name if d is a single dimension name (coefficient 1, nothing else), else None."""
    if len(d.terms) == 1:
        (m, c), = d.terms.items()
        if len(m) == 1 and c == 1:
            return m[0]
    return None


def _suggest(name: str, options, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


def _bcast_hint(a, b) -> str:
    if len(a) == 1 and len(b) == 2 and a[0] == b[0]:
        return "to scale the rows of a matrix by a vector v write v[:, None]"
    if len(a) == 1 and len(b) == 1:
        return "the sizes differ; did you mean outer(a, b) or a different variable?"
    return "numpy broadcasting: sizes must match or be 1, aligned from the right; add axes with x[:, None]"


def check_identifier(name: str, span: Span | None, what: str) -> None:
    """Names reach generated code, so they are restricted: no Python keywords, no dunders."""
    if keyword.iskeyword(name):
        raise RecError(f"'{name}' is a Python keyword and cannot name {what}", span,
                       hint=f"choose another name, e.g. {name}_")
    if name.startswith("__"):
        raise RecError(f"'{name}' cannot name {what}: names starting with '__' are reserved", span,
                       hint="drop the leading underscores")
    if name in LANGUAGE_KEYWORDS:
        raise RecError(f"'{name}' is a word of the .rec language and cannot name {what}", span,
                       hint=f"choose another name, e.g. {name}_")


# --------------------------------------------------------------------------- limits

MAX_DIM = 2**31 - 1          # a dimension's value (given at instantiation or as a default)
MAX_NUMEL = 2**31 - 1        # the elements of one value of the step (per batch row and head)
# What the `for` loops of a cell may unroll into, in all, in operations (about one IR node
# each; RECDSL_MAX_UNROLL overrides it). Stdlib loops unroll into a few dozen (DeltaProduct
# NH=2: 32, LTC L=6: 78); 4096 admits a 2000-step scalar chain (4000) and DeltaProduct up to
# NH=256. Compile time grows faster than linearly with the step: a 4000-node chain plans in a
# few seconds and builds in one; a 20000-node one takes ~15 s to plan and ~10 s to build.
DEFAULT_MAX_UNROLL = 4096
MAX_FOLD_LEN = 1 << 16       # constant vectors (arange) longer than this are not folded at check time


def max_unroll() -> int:
    """The bound on what `for` loops unroll into: RECDSL_MAX_UNROLL, else DEFAULT_MAX_UNROLL."""
    text = os.environ.get("RECDSL_MAX_UNROLL", "").strip()
    if not text:
        return DEFAULT_MAX_UNROLL
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise RecError(f"RECDSL_MAX_UNROLL must be a positive integer, got {text!r}",
                       hint=f"unset it for the default ({DEFAULT_MAX_UNROLL})")
    return value


# Operations a call lowers to (the normalisations are sugar for several); any other counts 1.
_CALL_COST = {"l2norm": 5, "rmsnorm": 6, "layernorm": 10, "softmax": 5, "mean": 2, "norm": 3, "clamp": 2,
              "diag": 3}
_LEAVES = (A.Name, A.Num, A.Imag, A.Primed, A.NoneLit, A.ListExpr)


def expr_cost(e: A.Node) -> int:
    """About how many IR nodes an expression lowers to: one per operator, call (the
    normalisations count what they expand to), index and attribute; leaves are free."""
    total = 0
    stack = [e]
    while stack:
        n = stack.pop()
        if isinstance(n, A.Call):
            parts = n.args[1] if n.func == "split" and len(n.args) == 2 else None
            total += parts.value if isinstance(parts, A.Num) and isinstance(parts.value, int) \
                else _CALL_COST.get(n.func, 1)
        elif isinstance(n, A.Expr) and not isinstance(n, _LEAVES) and not isinstance(n, (A.Slice, A.Keyword)):
            total += 1
        stack.extend(n.children())
    return total


def pass_cost(loop: A.For, costs: dict[int, Dim]) -> Dim:
    """The operations of one pass of a `for` (at least 1): its body's, nested loops included
    (what they unroll into, in `costs` by id of their For node)."""
    per = Dim.const(0)
    for s in loop.body:
        if isinstance(s, A.For):
            per = per + costs[id(s)]
        else:
            per = per + Dim.const(expr_cost(s.value))
    return Dim.const(1) if per.constant == 0 else per


def check_unroll(loops: list, values: dict[str, int] | None, limit: int | None = None) -> None:
    """A located error at the first `for` of `loops` ((For, count, per-pass cost) each, as
    Dims, top-level loops in source order) at which the operations unrolled so far pass the
    limit. values: the dims (None at check time: only loops whose sizes are literals count)."""
    limit = max_unroll() if limit is None else limit
    total = 0
    for loop, count, per in loops:
        if values is None:
            if count.constant is None or per.constant is None:
                continue
            c, p = count.constant, per.constant
        else:
            c, p = count.evaluate(values), per.evaluate(values)
        total += c * p
        if total > limit:
            names = sorted((count.names | per.names) & set(values or {}))
            given = f" with {', '.join(f'{d} = {values[d]}' for d in names)}" if names else ""
            mine = f"this loop unrolls into {c * p} operations ({c} passes of {p}{given})" + \
                (f", {total} with the loops before it" if total != c * p else "")
            raise RecError(f"{mine}; the limit is {limit}", _word_span(loop.span, "for") or loop.span,
                           hint="a `for` is unrolled at compile time, each pass into one operation per "
                                "operator, call and index of its body: keep loops short (a few Householder "
                                "or solver steps), or raise the limit with the environment variable "
                                "RECDSL_MAX_UNROLL")


def check_constraints(cell: CheckedCell, dims: dict[str, int]) -> None:
    """A located error (at the comparison, in the cell line) for concrete dimensions that break
    the cell's `where` clause."""
    for k in cell.constraints:
        if k.names <= set(dims) and not k.holds(dims):
            given = ", ".join(f"{n} = {dims[n]}" for n in sorted(k.names))
            raise RecError(f"the dimensions break the constraint {k.text} of cell {cell.name}: {given}", k.span,
                           hint=f"cell {cell.name} needs {k.text} (its where clause); give dimensions that satisfy it")


def example_dims(cell: CheckedCell, given: dict | None = None, limit: int = 20000) -> dict[str, int]:
    """Sizes for the dimensions without a given value or a default, for analysing a cell
    without an instantiation: small and distinct (3, 4, 5, ... in order), so that no two
    dimensions coincide by accident, and satisfying the cell's `where` clause (a search over
    sizes up to 32, distinct ones first; 0 only where nothing else fits). A located error at
    the clause when none is found."""
    given = dict(given or {})
    fixed: dict[str, int] = {}
    free = []
    for name, var in cell.dims.items():
        if name in given:
            if isinstance(given[name], int) and not isinstance(given[name], bool):
                fixed[name] = given[name]
        elif var.default is not None:
            if isinstance(var.default, A.Num) and isinstance(var.default.value, int):
                fixed[name] = var.default.value
        else:
            free.append(name)
    plain = {name: 3 + i for i, name in enumerate(free)}
    cons = [k for k in cell.constraints]
    if all(k.holds({**fixed, **plain}) for k in cons if k.names <= set(fixed) | set(plain)):
        return plain
    order = [n for n in free]
    # the constraints to test once the i-th free dimension has its size
    ready = [[k for k in cons if order[i] in k.names and k.names <= set(fixed) | set(order[:i + 1])]
             for i in range(len(order))]
    prefs = list(range(3, 33)) + [2, 1]
    steps = [0]

    def search(i: int, got: dict, distinct: bool):
        if i == len(order):
            return dict(got)
        name = order[i]
        values = prefs + ([0] if cell.facts.low(name) == 0 else [])
        for v in values:
            steps[0] += 1
            if steps[0] > limit:
                return None
            if distinct and v in got.values() and v not in (0,):
                continue
            got[name] = v
            env = {**fixed, **got}
            if all(k.holds(env) for k in ready[i]):
                found = search(i + 1, got, distinct)
                if found is not None:
                    return found
            del got[name]
        return None

    for distinct in (True, False):
        steps[0] = 0
        found = search(0, {}, distinct)
        if found is not None:
            return found
    span = cons[0].span.to(cons[-1].span) if cons and cons[0].span is not None else cell.span
    have = ", ".join(f"{k}={v}" for k, v in fixed.items())
    raise RecError(f"no sizes up to 32 satisfy the where clause of cell {cell.name}" +
                   (f" with {have}" if have else ""), span,
                   hint="check the constraints (and the dimensions given); `recdsl check --dims` takes sizes")


def _names(e: A.Node) -> set[str]:
    return {n.id for n in e.walk() if isinstance(n, A.Name)}


def check_size(shape, values: dict[str, int] | None, span: Span | None, what: str) -> None:
    """A located error when a value's shape is absurd: a dimension above MAX_DIM or more than
    MAX_NUMEL elements. values: the dims (None: only constant dimensions are checked)."""
    sizes = []
    for d in shape:
        v = d.constant if values is None else d.evaluate(values)
        if v is None:
            continue
        if v > MAX_DIM:
            raise RecError(f"{what} has a dimension of {v}" + (f" (= {d})" if d.names else "") +
                           f", more than the maximum {MAX_DIM} (2**31 - 1)",
                           span, hint="dimensions are sizes of tensors; check the value given")
        sizes.append(v)
    numel = math.prod(sizes)
    if len(sizes) == len(shape) and numel > MAX_NUMEL:
        shown = "[" + ", ".join(str(s) for s in sizes) + "]"
        if any(d.names for d in shape):
            shown = f"{fmt_shape(shape)} = {shown}"
        raise RecError(f"{what} would have {numel} elements ({shown}), more than the "
                       f"maximum {MAX_NUMEL} (2**31 - 1) per batch row", span,
                       hint="a value of the step holds at most 2**31 - 1 elements (8 GiB in float32 per row)")


# --------------------------------------------------------------------------- constant folding

class NotConstant(Exception):
    """(internal) The expression has no value here: a name not known yet, or a construct
    that is not folded."""


FOLD_BINOPS = ("+", "-", "*", "/", "**")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _softplus(x: float) -> float:
    return x if x > 40 else math.log1p(math.exp(x))


# name -> the function on one float; it raises OverflowError or ValueError (a domain error) as
# math does, or returns an infinity (log of 0). _NUMPY_FUNCS: the same on arrays.
_SCALAR_FUNCS = {
    "exp": math.exp, "expm1": math.expm1, "sin": math.sin, "cos": math.cos, "tanh": math.tanh,
    "abs": abs, "sigmoid": _sigmoid, "softplus": _softplus, "logsigmoid": lambda x: -_softplus(-x),
    "relu": lambda x: max(x, 0.0), "silu": lambda x: x * _sigmoid(x), "sign": lambda x: float((x > 0) - (x < 0)),
    "gelu": lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
    "elu": lambda x: x if x > 0 else math.expm1(x),
    "log": lambda x: -math.inf if x == 0 else math.log(x),
    "log1p": lambda x: -math.inf if x == -1 else math.log1p(x),
    "sqrt": math.sqrt,
    "rsqrt": lambda x: math.inf if x == 0 else 1.0 / math.sqrt(x),
}
_NUMPY_FUNCS = {"exp": lambda np, x: np.exp(x), "log": lambda np, x: np.log(x), "sqrt": lambda np, x: np.sqrt(x),
                "rsqrt": lambda np, x: 1.0 / np.sqrt(x), "sin": lambda np, x: np.sin(x),
                "cos": lambda np, x: np.cos(x), "tanh": lambda np, x: np.tanh(x),
                "sigmoid": lambda np, x: 1.0 / (1.0 + np.exp(-x)), "abs": lambda np, x: np.abs(x),
                "log1p": lambda np, x: np.log1p(x), "expm1": lambda np, x: np.expm1(x)}
_DOMAIN = {"log": "the log of a negative number", "log1p": "log1p of a number below -1",
           "sqrt": "the square root of a negative number", "rsqrt": "rsqrt of a negative number"}
_POLE = {"log": "the log of 0", "log1p": "log1p of -1", "rsqrt": "rsqrt of 0"}


def span_text(sp: Span | None) -> str:
    """The source text under a one-line span ('' if there is none)."""
    if sp is not None and sp.source is not None and sp.end_line == sp.line:
        return sp.source.line(sp.line)[sp.col - 1:sp.end_col - 1].strip()
    return ""


def _span_text(e: A.Node) -> str:
    return span_text(e.span) or (_printer().expr(e) if isinstance(e, A.Expr) else "")


class ConstFolder:
    """Values of constant expressions (numbers, dimensions and hyper-parameters with known
    values, + - * / **, elementwise math, arange) in float64, and a located RecError for a
    constant that is not a finite real number: an overflow, a NaN, a domain error, a
    division by zero. `lookup(name)` gives a name's value or raises NotConstant; `max_len`
    bounds the arange vectors folded (longer ones raise NotConstant)."""

    def __init__(self, lookup, max_len: int = MAX_FOLD_LEN):
        self.lookup = lookup
        self.max_len = max_len

    def value(self, e: A.Expr):
        """The value of e (a float, or a numpy array for arange): NotConstant if it has none."""
        return self.node(e, self.value)

    def node(self, e: A.Expr, arg):
        """The value of e from its operands' values, arg(child) (which may raise NotConstant)."""
        if isinstance(e, A.Num):
            return self._num(e)
        if isinstance(e, A.Imag):
            return complex(0.0, self._num(e))
        if isinstance(e, A.Name):
            return self.lookup(e.id)
        if isinstance(e, A.UnaryOp):
            v = arg(e.operand)
            return -v if e.op == "-" else v
        if isinstance(e, A.BinOp) and e.op in FOLD_BINOPS:
            a, b = arg(e.left), arg(e.right)
            return self._binop(e, a, b)
        if isinstance(e, A.Call) and not e.kwargs:
            if e.func in _SCALAR_FUNCS and len(e.args) == 1:
                return self._call(e, arg(e.args[0]))
            if e.func == "arange" and 1 <= len(e.args) <= 2:
                return self._arange(e, [arg(a) for a in e.args])
            if e.func in ("real", "imag", "conj") and len(e.args) == 1:
                return _complex_part(e.func, arg(e.args[0]))
            if e.func == "complex" and len(e.args) == 2:
                return _complex_value(arg(e.args[0]), arg(e.args[1]))
        raise NotConstant

    # --- leaves
    def _num(self, e: A.Num | A.Imag) -> float:
        try:
            v = float(e.value)
        except OverflowError:
            v = math.inf
        if math.isinf(v):
            raise RecError(f"the number {e.text} is too large: it overflows to infinity", e.span,
                           hint="numbers are 64-bit floats, at most about 1.8e308")
        return v

    def _arange(self, e: A.Call, bounds):
        import numpy as np
        if any(not isinstance(b, float) or not b.is_integer() for b in bounds):
            raise NotConstant
        lo, hi = (0, int(bounds[0])) if len(bounds) == 1 else (int(bounds[0]), int(bounds[1]))
        if hi - lo > self.max_len:
            raise NotConstant
        return np.arange(lo, hi, dtype=np.float64)

    # --- operations
    def _binop(self, e: A.BinOp, a, b):
        if isinstance(a, float) and isinstance(b, float):
            r, kind, why = fold_scalar(e.op, a, b)
            return self._fail(e, kind, why) if kind else r
        import numpy as np
        dtype = np.complex128 if _is_complex(a) or _is_complex(b) else np.float64
        with np.errstate(all="ignore"):
            r = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "**": np.power}[e.op](
                np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype))
        if dtype is np.complex128 and r.ndim == 0:
            r = complex(r)
        why = {"/": ("", "division by zero"),
               "**": ("a negative number to a fractional power", "0 to a negative power")}
        return self._finite(e, r, why.get(e.op, ("", "")))

    def _call(self, e: A.Call, x):
        if _is_complex(x) and e.func not in ("exp", "abs"):
            raise NotConstant   # the checker refuses it: a real function of a complex value
        if isinstance(x, float):
            r, kind, why = fold_scalar(e.func, x)
            return self._fail(e, kind, why) if kind else r
        import numpy as np
        with np.errstate(all="ignore"):
            if e.func in _NUMPY_FUNCS:
                r = _NUMPY_FUNCS[e.func](np, x)
            else:
                r = np.vectorize(lambda v: fold_scalar(e.func, float(v))[0], otypes=[np.float64])(x)
        return self._finite(e, r, (_DOMAIN.get(e.func, ""), _POLE.get(e.func, "")))

    def _finite(self, e: A.Expr, r, why: tuple[str, str]):
        """r (an array) if every element is finite; why: the causes of a NaN and of an infinity."""
        import numpy as np
        if not np.all(np.isfinite(r)):
            nan = bool(np.any(np.isnan(r)))
            return self._fail(e, "nan" if nan else "inf", why[0] if nan else why[1])
        return r

    def _fail(self, e: A.Expr, kind: str, why: str):
        known = []
        for name in sorted(_names(e)):
            try:
                v = self.lookup(name)
            except NotConstant:
                continue
            if isinstance(v, float):
                known.append(f"{name} = {v:g}")
        raise const_error(e.span, _span_text(e), kind, why, known)


def _is_complex(v) -> bool:
    """A folded value that is complex: a Python (or numpy) complex scalar, or a complex array."""
    return isinstance(v, complex) or getattr(getattr(v, "dtype", None), "kind", "") == "c"


def _complex_value(re, im):
    """complex(re, im) of folded real values (floats or numpy arrays)."""
    if _is_complex(re) or _is_complex(im):
        raise NotConstant   # the checker refuses it
    import numpy as np
    r = np.asarray(re, dtype=np.float64) + 1j * np.asarray(im, dtype=np.float64)
    return complex(r) if r.ndim == 0 else r


def _complex_part(func: str, v):
    """real / imag / conj of a folded value (a float, a complex number or a numpy array)."""
    import numpy as np
    if func == "conj":
        return v.conjugate() if _is_complex(v) else v
    if isinstance(v, (float, complex)):
        return float(v.real if func == "real" else v.imag)
    return np.real(v).astype(np.float64) if func == "real" else np.imag(v).astype(np.float64)


def fold_scalar(op: str, *args: float) -> tuple[float, str, str]:
    """op (+ - * / ** max min, or an elementwise function's name) on floats, in float64:
    (value, "", "") or, for a result that is not a finite real number, (nan or inf, kind,
    why) with kind "nan" or "inf" and why the cause when it is not a plain overflow."""
    try:
        if op in _SCALAR_FUNCS:
            (x,) = args
            r = _SCALAR_FUNCS[op](x)
            if math.isinf(r) and op in _POLE:
                return r, "inf", _POLE[op]
        else:
            a, b = args
            if op == "/" and b == 0:
                return math.inf, "inf", "division by zero"
            if op == "**" and a == 0 and b < 0:
                return math.inf, "inf", "0 to a negative power"
            r = _BINARY_FUNCS[op](a, b)
            if isinstance(r, complex):
                return math.nan, "nan", "a negative number to a fractional power"
    except OverflowError:
        return math.inf, "inf", ""
    except ValueError:
        return math.nan, "nan", _DOMAIN.get(op, "")
    r = float(r)
    if math.isnan(r):
        return r, "nan", _DOMAIN.get(op, "")
    if math.isinf(r):
        return r, "inf", ""
    return r, "", ""


_BINARY_FUNCS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                 "/": lambda a, b: a / b, "**": lambda a, b: a ** b, "max": max, "min": min}


def const_error(span: Span | None, text: str, kind: str, why: str, known: list[str] | None = None) -> RecError:
    """The error for a constant `text` that folds to NaN (kind "nan") or an infinity."""
    subject = (f"the constant {text}" if text else "this constant") + \
        (f" (with {', '.join(known)})" if known else "")
    if kind == "nan":
        return RecError(f"{subject} is not a real number" + (f": {why}" if why else ""), span,
                        hint="sqrt and log need arguments >= 0 (log > 0), fractional powers a base >= 0")
    if why:
        return RecError(f"{subject} is infinite: {why}", span,
                        hint="constants must be finite numbers; for a very large one write e.g. 1e30")
    return RecError(f"{subject} overflows to infinity", span,
                    hint="constants are 64-bit floats, at most about 1.8e308: use a smaller value")


def check_distribution(init: A.RandomInit, folder: ConstFolder) -> None:
    """A located error for a normal(mean, std) with std < 0 or a uniform(low, high) with
    low > high (when their values are known)."""
    names = DISTRIBUTIONS[init.dist]
    args = dict(zip(names, [a for a in init.args if not isinstance(a, A.Keyword)]))
    args.update({a.name: a.value for a in init.args if isinstance(a, A.Keyword)})
    vals = {}
    for n, e in args.items():
        try:
            v = folder.value(e)
        except NotConstant:
            continue
        if isinstance(v, float):
            vals[n] = v
    if init.dist == "normal" and "std" in vals and vals["std"] < 0:
        raise RecError(f"normal(mean, std) needs std >= 0, got {vals['std']:g}", args["std"].span,
                       hint="std is the standard deviation of the draw: a number >= 0")
    if init.dist == "uniform" and "low" in vals and "high" in vals and vals["low"] > vals["high"]:
        raise RecError(f"uniform(low, high) needs low <= high, got {vals['low']:g} > {vals['high']:g}",
                       _word_span(init.span, init.dist),
                       hint="write the smaller bound first: uniform(low, high) draws from [low, high)")


# --------------------------------------------------------------------------- names of the module API

def check_api_name(name: str, span: Span | None, kind: str) -> None:
    """Names that would collide with the compiled module's Python API: `self` anywhere;
    dims and hyper-parameters are keyword arguments of spec(...), inputs of forward(...)
    and step(...), params attributes of a torch.nn.Module."""
    what = {"dim": "a dimension or hyper-parameter"}.get(kind) or KIND_PHRASES[kind]
    if name == "self":
        raise RecError(f"'self' cannot name {what}: the compiled module is a Python object and `self` is "
                       "its own name in every method", span, hint="rename it, e.g. self_")
    if kind == "dim" and name in SPEC_OPTIONS:
        raise RecError(f"'{name}' cannot name {what}: dimensions and hyper-parameters are given as keyword "
                       f"arguments of spec(...), and `{name}=` is an option of spec(...) itself", span,
                       hint=f"rename it, e.g. {name}_ (spec(...) takes {', '.join(o + '=' for o in SPEC_OPTIONS)} "
                            "and the dimensions)")
    if kind in ("input", "edge", "pair") and name in FORWARD_OPTIONS:
        raise RecError(f"input {name} would share its name with an option of forward(): inputs are given as "
                       f"keyword arguments of forward(...) and step(...), which take `{name}=` themselves", span,
                       hint=f"rename it, e.g. {name}_")
    if kind == "param" and name in MODULE_API:
        api = "recdsl's layer" if name in LAYER_API else "torch.nn.Module"
        raise RecError(f"param {name} would collide with the module's own attribute `{name}`: params become "
                       "attributes of the compiled module (a torch.nn.Module)", span,
                       hint=f"rename it, e.g. {name}_ (`{name}` is an attribute of {api})")


def check_const_forms(e: A.Expr, what: str, arange: bool) -> None:
    """A constant expression the runtime can evaluate: numbers, names (dims, hyper-parameters),
    + - * / **, the functions of INIT_FUNCS and, where `arange`, arange(...)."""
    funcs = INIT_FUNCS + (("arange",) if arange else ()) + INIT_COMPLEX_FUNCS
    stack = [e]
    while stack:
        n = stack.pop()
        if isinstance(n, (A.Num, A.Imag, A.Name)):
            continue
        if isinstance(n, A.UnaryOp):
            stack.append(n.operand)
            continue
        if isinstance(n, A.BinOp) and n.op in FOLD_BINOPS:
            stack += [n.left, n.right]
            continue
        if isinstance(n, A.Call) and n.func in funcs and not n.kwargs:
            stack += n.args
            continue
        if isinstance(n, A.Call):
            word = _word_span(n.span, n.func)
            raise RecError(f"{n.func}(...) is not available in {what}", word,
                           hint=f"{what} may call {', '.join(funcs)}")
        raise RecError(f"{what} is a constant expression: numbers, dimensions, hyper-parameters, "
                       f"+ - * / ** and {', '.join(funcs[:-1])} or {funcs[-1]}; not this", n.span,
                       hint="compute anything else in the step, from the constant")
