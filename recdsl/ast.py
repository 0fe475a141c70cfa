"""The abstract syntax tree of a .rec file: one table of node types.

Every node carries `span` (file, line, column, end), which is not part of equality, so
`parse(print(tree)) == tree` compares structure only. The checker attaches `ty` (shape
and kind) to expression nodes; that is not part of equality either.

    Module     cells
    Cell       name, args: [CellArg], doc, items: [Heads | Over | Decl | Assign | Output | For],
               where: [Constraint]
    CellArg    name, default (Expr | None: a dimension)
    Constraint operands: [Expr], ops: [str]              `where 0 <= P <= M` (a chain)
    Heads      count                                   `heads NH`
    Over       kind                                    `over seq | grid2d | dag`
    Decl       kind, vars: [DeclVar]                   `input q[K], k[K]`
    DeclVar    name, shape: [Expr], on_edge, init, complex  `state C[K, V] on edge = 0`, `state h[N] complex`
    RandomInit dist, args: [Expr | Keyword]            `~ normal(0, 1/sqrt(D))`
    ValueInit  value                                   `= log(arange(1, N+1))`
    Assign     targets: [Name | Primed], value         `i, f = split(z, 2)` / `c' = ...`
    Output     name (str | None), value                `output y = ...` / `output h'`
    For        var, func, args, body: [Assign | Output | For]
    -- expressions --
    Name       id                 Primed     id (the new value of a state)
    Num        value, text        NoneLit    (a new axis in an index)
    Imag       value, text        (an imaginary literal: `0.5j` is Imag(0.5, "0.5j"))
    BinOp      op, left, right    UnaryOp    op, operand
    Compare    op, left, right    Call       func, args, kwargs: [Keyword]
    Keyword    name, value        Index      value, subs: [Expr | Slice]
    Slice      lo, hi             Attr       value, attr (`x.T`, `s.left`)
    ListExpr   items
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

from .errors import Span


@dataclass
class Node:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)

    def children(self) -> Iterator["Node"]:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Node):
                yield value
            elif isinstance(value, list):
                yield from (v for v in value if isinstance(v, Node))

    def walk(self) -> Iterator["Node"]:
        """This node and all nodes below it, parents first."""
        yield self
        for child in self.children():
            yield from child.walk()


class Expr(Node):
    ty = None  # set by the checker: recdsl.types.Type


# --- structure ---------------------------------------------------------------------------

@dataclass
class Module(Node):
    cells: list


@dataclass
class Cell(Node):
    name: str
    args: list
    doc: str | None
    items: list
    where: list = field(default_factory=list)    # [Constraint]: `cell A(M, P) where P <= M:`


@dataclass
class Constraint(Node):
    """A chain of comparisons between dimension expressions: operands[i] ops[i] operands[i+1]."""
    operands: list
    ops: list


@dataclass
class CellArg(Node):
    name: str
    default: Expr | None


@dataclass
class Heads(Node):
    count: Expr


@dataclass
class Over(Node):
    kind: str


@dataclass
class Decl(Node):
    kind: str  # input | param | state | edge | pair
    vars: list


@dataclass
class DeclVar(Node):
    name: str
    shape: list
    on_edge: bool
    init: Node | None
    complex: bool = False     # `param z[N] complex ~ ...`: a complex value (two real parts in the IR)


@dataclass
class RandomInit(Node):
    dist: str
    args: list


@dataclass
class ValueInit(Node):
    value: Expr


@dataclass
class Assign(Node):
    targets: list
    value: Expr


@dataclass
class Output(Node):
    name: str | None
    value: Expr


@dataclass
class For(Node):
    var: str
    func: str
    args: list
    body: list


# --- expressions -------------------------------------------------------------------------

@dataclass
class Name(Expr):
    id: str


@dataclass
class Primed(Expr):
    id: str


@dataclass
class Num(Expr):
    value: int | float
    text: str


@dataclass
class Imag(Expr):
    """An imaginary literal: `0.5j` is Imag(0.5, "0.5j"), the complex number 0 + 0.5i."""
    value: float
    text: str


@dataclass
class NoneLit(Expr):
    pass


@dataclass
class BinOp(Expr):
    op: str
    left: Expr
    right: Expr


@dataclass
class UnaryOp(Expr):
    op: str
    operand: Expr


@dataclass
class Compare(Expr):
    op: str
    left: Expr
    right: Expr


@dataclass
class Call(Expr):
    func: str
    args: list
    kwargs: list


@dataclass
class Keyword(Node):
    name: str
    value: Expr


@dataclass
class Index(Expr):
    value: Expr
    subs: list


@dataclass
class Slice(Node):
    lo: Expr | None
    hi: Expr | None


@dataclass
class Attr(Expr):
    value: Expr
    attr: str


@dataclass
class ListExpr(Expr):
    items: list


class NodeVisitor:
    """Dispatches `visit(node)` to `visit_<ClassName>`, else visits the children."""

    def visit(self, node: Node):
        method = getattr(self, "visit_" + type(node).__name__, None)
        return method(node) if method else self.generic_visit(node)

    def generic_visit(self, node: Node):
        for child in node.children():
            self.visit(child)
