"""The IR: one step of a cell as a graph of typed, shaped nodes.

One node class (`Node`), an op enum (`Op`) and op property sets (ELEMENTWISE, LINEAR,
BILINEAR, ...), as in tinygrad. Leaves are INPUT, PARAM, STATE (a state's previous
value, or a neighbour's) and CONST. Lowering from the checked AST expands the language's
sugar (split -> slices, for -> unrolled, l2norm/rmsnorm/layernorm/softmax/norm/mean,
clamp, diag, concat) so that later passes see a small op set. Every node keeps the span
of the .rec text it came from, and the name of the local it was bound to, if any.

The IR is built for concrete dimension values (for loops are unrolled, so their counts
must be known); shapes stay symbolic (`Dim`) so that dumps read like the source.

Complex values are sugar: the IR is real. While lowering, a complex value is a `Pair` of
real nodes (its real and imaginary parts, of one shape), and each complex operation is
expanded into real ones ((a + ib)(c + id) = (ac - bd) + i(ad + bc), exp, abs, /, @, ...).
A complex state `h` is two real states named `h.re` and `h.im`; a complex param `z` is one
real PARAM `z` with a trailing axis of 2 (`[..., 0]` the real part, named `z.re`, `[..., 1]`
the imaginary part, `z.im`), which `torch.view_as_complex` reads as the complex tensor.
The nodes of a complex value bound to a local `w` are named `w.re` and `w.im`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum, auto

from . import ast as A
from .checker import (MAX_DIM, MAX_FOLD_LEN, CheckedCell, ConstFolder, NotConstant, _word_span, check_constraints,
                      check_distribution, check_size, check_unroll, const_error, fold_scalar, span_text)
from .errors import RecError, Span
from .types import Dim, ONE, broadcast

PARTS = ("re", "im")
TWO = Dim.const(2)


def part_name(name: str, part: str) -> str:
    """The IR name of one real part of the complex state (or param) `name`: `h.re`, `h.im`.
    A .rec name has no dot, so these never collide with a user's name."""
    return f"{name}.{part}"


class Op(Enum):
    # leaves
    INPUT = auto(); PARAM = auto(); STATE = auto(); CONST = auto()
    # elementwise unary
    NEG = auto(); EXP = auto(); LOG = auto(); LOG1P = auto(); EXPM1 = auto(); SIGMOID = auto()
    LOGSIGMOID = auto(); TANH = auto(); SOFTPLUS = auto(); RELU = auto(); SILU = auto(); GELU = auto()
    ELU = auto(); ABS = auto(); SIGN = auto(); SQRT = auto(); RSQRT = auto(); SIN = auto(); COS = auto()
    # elementwise binary / ternary
    ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); POW = auto(); MAX = auto(); MIN = auto()
    LOGADDEXP = auto(); LT = auto(); LE = auto(); GT = auto(); GE = auto(); EQ = auto(); NE = auto()
    WHERE = auto()
    # contractions
    MATMUL = auto(); OUTER = auto(); DOT = auto()
    # reductions (arg: (axis or None, keepdim))
    SUM = auto(); AMAX = auto(); LOGSUMEXP = auto()
    # structure
    INDEX = auto()       # arg: tuple of int | slice | None over the node axes
    TRANSPOSE = auto(); RESHAPE = auto(); CONCAT = auto(); EYE = auto()
    EXPAND = auto()      # broadcast to a larger node shape; arg: the concrete target shape
    SUM_IN = auto()      # over dag: sum over incoming edges
    # linear algebra of params and constants (hoisted: computed once per forward)
    INV = auto(); SOLVE = auto(); EXPM = auto()


UNARY = {Op.NEG, Op.EXP, Op.LOG, Op.LOG1P, Op.EXPM1, Op.SIGMOID, Op.LOGSIGMOID, Op.TANH, Op.SOFTPLUS,
         Op.RELU, Op.SILU, Op.GELU, Op.ELU, Op.ABS, Op.SIGN, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN, Op.LOGADDEXP} | COMPARE
ELEMENTWISE = UNARY | BINARY | {Op.WHERE}
LEAVES = {Op.INPUT, Op.PARAM, Op.STATE, Op.CONST, Op.EYE}
# Linear in their (single) tensor argument / in the sum of their arguments.
LINEAR = {Op.NEG, Op.ADD, Op.SUB, Op.SUM, Op.INDEX, Op.TRANSPOSE, Op.RESHAPE, Op.CONCAT, Op.SUM_IN, Op.EXPAND}
# Linear in each argument separately.
BILINEAR = {Op.MUL, Op.MATMUL, Op.OUTER, Op.DOT}
# Functions of params and constants only (the checker refuses a state or an input in them).
PARAM_LINALG = {Op.INV, Op.SOLVE, Op.EXPM}
TRANSCENDENTAL = {Op.EXP, Op.LOG, Op.LOG1P, Op.EXPM1, Op.SIGMOID, Op.LOGSIGMOID, Op.TANH, Op.SOFTPLUS,
                  Op.SILU, Op.GELU, Op.ELU, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS, Op.LOGADDEXP, Op.LOGSUMEXP}
COMMUTATIVE = {Op.ADD, Op.MUL, Op.MAX, Op.MIN, Op.LOGADDEXP}
ASSOCIATIVE = {Op.ADD, Op.MUL, Op.MAX, Op.MIN, Op.LOGADDEXP}

EPS = 1e-6  # of l2norm / rmsnorm / layernorm

_ids = itertools.count()


@dataclass(eq=False)
class Node:
    op: Op
    srcs: tuple["Node", ...]
    shape: tuple[Dim, ...]
    arg: object = None
    span: Span | None = field(default=None, repr=False)
    name: str | None = None          # the .rec local this value was bound to
    is_bool: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    # a part of a complex value the .rec text did not name: its complex form, `exp(L * dt).re`,
    # which plans show instead of the real expansion of the complex arithmetic (display only)
    label: str | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"%{self.id}:{self.op.name}"


@dataclass
class IRCell:
    """One step of a cell for given dims: leaves, updates and outputs as IR nodes."""
    checked: CheckedCell
    dims: dict[str, int]
    hypers: dict[str, float]
    inputs: dict[str, Node]
    params: dict[str, Node]
    states: dict[str, Node]                # previous value of each state (seq)
    neighbours: dict[tuple[str, str], Node]  # (state, left|up|in) leaves, grids and dags
    updates: dict[str, Node]               # state -> its new value
    outputs: dict[str, Node]
    edge_inputs: dict[str, Node] = field(default_factory=dict)
    over: str = "seq"
    # complex state -> the IR names of its parts (`h` -> ("h.re", "h.im")); complex params
    complex_states: dict[str, tuple[str, str]] = field(default_factory=dict)
    complex_params: set = field(default_factory=set)
    _sizes: dict = field(default_factory=dict, repr=False, compare=False)   # concrete()'s and shape_of()'s memo

    @property
    def name(self) -> str:
        return self.checked.name

    def state_leaves(self) -> list[Node]:
        return list(self.states.values()) + list(self.neighbours.values())

    def nodes(self) -> list[Node]:
        """All nodes reachable from the updates and outputs, in topological order."""
        return toposort(list(self.updates.values()) + list(self.outputs.values()))

    def shape_of(self, node: Node) -> tuple[int, ...]:
        got = self._sizes.get(node.id)     # by node (a decode step asks every call; Dim hashing is slow)
        if got is None:
            got = self._sizes[node.id] = self.concrete(node.shape)
        return got

    def concrete(self, shape) -> tuple[int, ...]:
        """The sizes of a symbolic shape under self.dims (remembered: a decode step asks for
        the same few shapes every call, and each evaluation is exact rational arithmetic)."""
        key = tuple(shape)
        got = self._sizes.get(key)
        if got is None:
            got = self._sizes[key] = tuple(d.evaluate(self.dims) for d in key)
        return got


@dataclass(frozen=True, eq=False)
class Pair:
    """A complex value while lowering: its real and imaginary parts, real nodes of one shape."""
    re: Node
    im: Node

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.re.shape

    @property
    def rank(self) -> int:
        return self.re.rank

    @property
    def is_bool(self) -> bool:
        return False


def toposort(roots: list[Node]) -> list[Node]:
    seen: set[int] = set()
    order: list[Node] = []
    stack = [(r, False) for r in reversed(roots)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node.id in seen:
            continue
        seen.add(node.id)
        stack.append((node, True))
        for s in reversed(node.srcs):
            if s.id not in seen:
                stack.append((s, False))
    return order


# --------------------------------------------------------------------------- dims

def bind_dims(cell: CheckedCell, given: dict[str, int] | None) -> tuple[dict[str, int], dict[str, float]]:
    """Values for every dimension and hyper-parameter: given ones, else defaults. A located
    error (at the parameter in the cell line) for a value that is not a positive integer up
    to MAX_DIM (dimensions) or a finite number (hyper-parameters)."""
    given = dict(given or {})
    values: dict[str, float] = {}
    unknown = [k for k in given if k not in cell.dims and k not in cell.hypers]
    if unknown:
        raise RecError(f"cell {cell.name} has no dimension or hyper-parameter {', '.join(unknown)}",
                       cell.span, hint="its parameters are " + ", ".join(list(cell.dims) + [h for h in cell.hypers
                                                                                         if h not in cell.dims]))
    for name, var in list(cell.dims.items()) + [(h, v) for h, v in cell.hypers.items() if h not in cell.dims]:
        if name in given:
            v = given[name]
            if var.kind == "dim":
                low = cell.facts.low(name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise RecError(f"dimension {name} must be a {'positive' if low else 'non-negative'} integer, "
                                   f"got {_short(v)}", var.span,
                                   hint=f"a dimension that may be 0 says so in the cell's where clause: "
                                        f"`where 0 <= {name}`" if v == 0 and low else None)
                if v > MAX_DIM:
                    raise RecError(f"dimension {name} = {_short(v)} is more than the maximum {MAX_DIM} (2**31 - 1)",
                                   var.span, hint="dimensions are sizes of tensors; check the value given")
            else:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise RecError(f"hyper-parameter {name} must be a number, got {_short(v)}", var.span)
                try:
                    f = float(v)
                except OverflowError:
                    f = math.inf
                if not math.isfinite(f):
                    raise RecError(f"hyper-parameter {name} must be a finite number, got {_short(v)}", var.span,
                                   hint="numbers are 64-bit floats, at most about 1.8e308")
                v = f
            values[name] = v
        elif var.default is not None:
            d = var.default
            values[name] = d.value if var.kind == "dim" and isinstance(d, A.Num) else _const_value(d, values)
        else:
            raise RecError(f"cell {cell.name} needs a value for dimension {name}", cell.span,
                           hint=f"e.g. spec({', '.join(f'{d}=16' for d in cell.dims if cell.dims[d].default is None)})")
    dims = {k: int(v) for k, v in values.items() if k in cell.dims}
    for k in dims:
        if values[k] != dims[k]:
            raise RecError(f"dimension {k} must be an integer, got {values[k]}", cell.dims[k].span)
    check_constraints(cell, dims)
    return dims, values


def _short(v) -> str:
    """repr(v), with the middle of a very long one (an integer of hundreds of digits) left out."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def _const_value(e: A.Expr, values: dict[str, float]) -> float:
    """Evaluate a constant expression of literals and dimension/hyper values (no eval): a
    located error for one that is not a finite real number, or not a constant."""
    def lookup(name):
        if name not in values:
            raise RecError(f"{name} has no value here", e.span, hint=f"give {name}= when instantiating the cell")
        return float(values[name])
    try:
        return ConstFolder(lookup, max_len=0).value(e)
    except NotConstant:
        return _bad_const(e)


def _bad_const(e):
    raise RecError("this default must be a constant expression of numbers and dimensions", e.span)


def check_instance(cell: CheckedCell, dims: dict[str, int], values: dict[str, float]) -> None:
    """Before anything is built for these dims: every declared value's size within bounds,
    the `for` loops within RECDSL_MAX_UNROLL, every initialiser a finite real number and the
    distributions' arguments valid (std >= 0, low <= high). Located errors."""
    for kind, group in (("input", cell.inputs), ("edge", cell.edges), ("pair", cell.pairs), ("param", cell.params),
                        ("state", cell.states)):
        for name, var in group.items():
            check_size(var.shape, dims, _word_span(var.span, name), f"{kind} {name}")
    check_unroll(cell.loops, dims)

    def lookup(name):
        if name in values:
            return float(values[name])
        raise NotConstant
    folder = ConstFolder(lookup, max_len=MAX_FOLD_LEN * 16)
    for var in list(cell.params.values()) + list(cell.states.values()):
        init = var.decl.init
        if isinstance(init, A.RandomInit):
            for a in init.args:
                _try_fold(folder, a.value if isinstance(a, A.Keyword) else a)
            check_distribution(init, folder)
        elif init is not None and not (isinstance(init.value, A.Name) and init.value.id in cell.params):
            _try_fold(folder, init.value)


def _try_fold(folder: ConstFolder, e: A.Expr) -> None:
    try:
        folder.value(e)
    except NotConstant:  # a vector too long to fold here: the runtime computes it
        pass


# --------------------------------------------------------------------------- lowering

UNARY_OPS = {n: Op[n.upper()] for n in ("exp log log1p expm1 sigmoid logsigmoid tanh softplus relu silu gelu "
                                         "elu abs sign sqrt rsqrt sin cos").split()}
BIN_OPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW}
CMP_OPS = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}


def lower(cell: CheckedCell, dims: dict[str, int] | None = None) -> IRCell:
    """Checked cell + dimension values -> IRCell."""
    dim_values, values = bind_dims(cell, dims)
    check_instance(cell, dim_values, values)
    return _Lowerer(cell, dim_values, values).run()


class _Lowerer:
    def __init__(self, cell: CheckedCell, dims: dict[str, int], values: dict[str, float]):
        self.cell, self.dims, self.values = cell, dims, values
        self.env: dict[str, Node] = {}
        self.primed: dict[str, Node] = {}
        self.neighbours: dict[tuple[str, str], Node] = {}
        self.in_sum_in = False
        self.span: Span | None = None
        self.cur: A.Expr | None = None     # the expression being lowered (self.span is its span)
        self.memo: dict = {}
        self.cstates: dict[str, tuple[str, str]] = {}   # complex state -> its parts' IR names
        self.labels: dict[str, int] = {}                 # labels of complex parts given so far

    def node(self, op: Op, srcs, shape, arg=None, is_bool=False) -> Node:
        """A new node, or the existing one for the same op, sources and argument (CSE by
        hash-consing: `lf + m` written twice is one node)."""
        empty = self._empty(op, srcs, shape, arg)
        if empty is not None:
            return empty
        key = (op, tuple(s.id for s in srcs), arg_key(arg), tuple(shape))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if shape:
            check_size(shape, self.dims, self.span, "this value")
        n = Node(op, tuple(srcs), tuple(shape), arg, self.span, None, is_bool)
        self.memo[key] = n
        return n

    def _empty(self, op: Op, srcs, shape, arg) -> Node | None:
        """Zero-size dimensions (`where 0 <= P`, P = 0): a value with no elements, a product
        or a sum over an empty axis, is a constant 0 broadcast to its shape (no state, no
        input in it), so that what a dimension of 0 empties out (a state z[P], a slice
        z[M-P:M], W @ u with u [0]) never reaches a kernel: it contributes nothing."""
        if op in (Op.EXPAND, Op.CONST) or not self.dims or 0 not in self.dims.values():
            return None
        sizes = tuple(d.evaluate(self.dims) for d in shape)
        contracted = None
        if op == Op.MATMUL or op == Op.DOT:
            contracted = srcs[0].shape[-1]
        elif op == Op.SUM:
            axis = arg[0]
            src = srcs[0].shape
            contracted = None if not src else (math.prod(d.evaluate(self.dims) for d in src) if axis is None
                                                else src[axis])
        if 0 in sizes or (contracted is not None and
                          (contracted if isinstance(contracted, int) else contracted.evaluate(self.dims)) == 0):
            zero = self.const(0.0)
            return self.node(Op.EXPAND, [zero], shape, sizes) if shape else zero
        return None

    def const(self, value: float) -> Node:
        return self.node(Op.CONST, (), (), float(value))

    def fold(self, op: str, *args: float) -> Node:
        """A folded scalar constant; a located error when it is not a finite real number."""
        v, kind, why = fold_scalar(op, *args)
        if kind:
            e = self.cur
            known = [f"{n.id} = {self.values[n.id]:g}" for n in (e.walk() if e is not None else ())
                     if isinstance(n, A.Name) and n.id in self.values]
            raise const_error(self.span, span_text(self.span), kind, why, list(dict.fromkeys(known)))
        return self.const(v)


    def run(self) -> IRCell:
        c = self.cell
        inputs = {n: Node(Op.INPUT, (), v.shape, n, v.span, n) for n, v in c.inputs.items()}
        edges = {n: Node(Op.INPUT, (), v.shape, n, v.span, n) for n, v in {**c.edges, **c.pairs}.items()}
        params = {n: Node(Op.PARAM, (), v.shape + ((TWO,) if v.type.is_complex else ()), n, v.span, n)
                  for n, v in c.params.items()}
        states = {}
        for n, v in c.states.items():
            keys = tuple(part_name(n, p) for p in PARTS) if v.type.is_complex else (n,)
            for k in keys:
                states[k] = Node(Op.STATE, (), v.shape, (k, "prev"), v.span, k)
            if v.type.is_complex:
                self.cstates[n] = keys
        self.inputs, self.edges, self.params, self.states = inputs, edges, params, states
        for n, v in c.dims.items():
            self.env[n] = Node(Op.CONST, (), (), float(self.dims[n]), v.span, n)
        for n in c.hypers:
            if n not in self.env:
                self.env[n] = Node(Op.CONST, (), (), float(self.values[n]), c.hypers[n].span, n)
        self.env.update(inputs)
        self.env.update(edges)
        self.env.update(params)
        for n, v in c.params.items():
            if v.type.is_complex:
                self.span = v.span
                self.env[n] = self._param_pair(n, params[n], v.shape)
        self.span = None
        outputs: dict[str, Node] = {}
        for stmt in c.body:
            self.stmt(stmt, outputs)
        return IRCell(c, self.dims, self.values, inputs, params, states, self.neighbours, dict(self.primed),
                      outputs, edges, c.over, dict(self.cstates),
                      {n for n, v in c.params.items() if v.type.is_complex})

    def _param_pair(self, name: str, p: Node, shape) -> "Pair":
        """The parts of a complex param, stored with a trailing axis of 2: p[..., 0], p[..., 1]."""
        parts = []
        for i, part in enumerate(PARTS):
            x = self.node(Op.INDEX, [p], shape, tuple([slice(None)] * len(shape) + [i]))
            if x.name is None:
                x.name = part_name(name, part)
            parts.append(x)
        return Pair(*parts)

    # --- statements
    def stmt(self, s, outputs):
        self.span = s.span
        if isinstance(s, A.Assign):
            value = self.expr(s.value)
            values = value if isinstance(value, tuple) else (value,)
            for t, v in zip(s.targets, values):
                if isinstance(t, A.Primed):
                    want = self.cell.states[t.id].shape
                    keys = self.cstates.get(t.id)
                    parts = (self.as_pair(v).re, self.as_pair(v).im) if keys else (v,)
                    for key, x in zip(keys or (t.id,), parts):
                        x = self.fit(x, want)  # e.g. h' = 0 for a vector state: broadcast it
                        self.primed[key] = x
                        if x.name is None:
                            x.name = key + "'"
                else:
                    for x, name in ((v.re, part_name(t.id, "re")), (v.im, part_name(t.id, "im"))) \
                            if isinstance(v, Pair) else ((v, t.id),):
                        if x.name is None and x.op not in LEAVES:
                            x.name = name
                    self.env[t.id] = v
        elif isinstance(s, A.Output):
            info = next(o for o in self.cell.outputs if o.node is s)
            outputs[info.name] = self.expr(s.value)
        elif isinstance(s, A.For):
            count = self.cell_static(s.args[0])
            for j in range(count):
                self.env[s.var] = Node(Op.CONST, (), (), float(j), s.span, s.var)
                for inner in s.body:
                    self.stmt(inner, outputs)
            self.env.pop(s.var, None)

    def cell_static(self, e: A.Expr) -> int:
        return int(round(_const_value(e, self.values)))

    # --- expressions
    def expr(self, e: A.Expr):
        old, self.span, old_e, self.cur = self.span, e.span, self.cur, e
        try:
            out = getattr(self, "_" + type(e).__name__)(e)
        finally:
            self.span, self.cur = old, old_e
        if isinstance(out, Pair):
            self._label(e, out)
        return out

    def _label(self, e: A.Expr, z: Pair) -> None:
        """Label the parts of a complex value by the text it came from, `exp(L * dt).re`, so
        that a plan shows its complex form rather than pages of real arithmetic. A label is
        unique (`#2`, ... when the same text gives another value, as in an unrolled loop):
        it also names the value when the analysis treats it as a symbol."""
        if isinstance(e, (A.Name, A.Primed)):
            return
        text = span_text(e.span) or _printer_expr(e)
        if not isinstance(e, (A.Call, A.Index, A.Attr, A.Imag, A.Num)):
            text = f"({text})"
        for part, x in zip(PARTS, (z.re, z.im)):
            if x.name is not None or x.label is not None or x.op in LEAVES or x.op == Op.EXPAND:
                continue
            label = f"{text}.{part}"
            k = self.labels.get(label, 0)
            self.labels[label] = k + 1
            x.label = label if k == 0 else f"{label}#{k + 1}"

    def _Num(self, e):
        return self.const(e.value)

    def _Imag(self, e):
        return Pair(self.const(0.0), self.const(e.value))

    def _Name(self, e: A.Name):
        if e.id in self.cstates:
            return Pair(*(self.states[k] for k in self.cstates[e.id]))
        if e.id in self.states:
            if self.in_sum_in:
                return self._neighbour(e.id, "in")
            return self.states[e.id]
        return self.env[e.id]

    def _Primed(self, e: A.Primed):
        if e.id in self.cstates:
            return Pair(*(self.primed[k] for k in self.cstates[e.id]))
        return self.primed[e.id]

    def _neighbour(self, name: str, where: str) -> Node:
        key = (name, where)
        if key not in self.neighbours:
            st = self.states[name]
            self.neighbours[key] = Node(Op.STATE, (), st.shape, key, st.span, f"{name}.{where}")
        return self.neighbours[key]

    def _Attr(self, e: A.Attr):
        if e.attr == "T":
            return self.partwise(lambda x: self.node(Op.TRANSPOSE, [x], (x.shape[1], x.shape[0]), is_bool=x.is_bool),
                                 self.expr(e.value))
        if e.attr == "prev":
            return self._Name(e.value)
        return self._neighbour(e.value.id, e.attr)

    def _UnaryOp(self, e: A.UnaryOp):
        x = self.expr(e.operand)
        return x if e.op == "+" else self.partwise(self.neg, x)

    def neg(self, x: Node) -> Node:
        if x.op == Op.CONST and not x.shape:
            return self.const(-x.arg)
        return self.node(Op.NEG, [x], x.shape)

    def _BinOp(self, e: A.BinOp):
        a, b = self.expr(e.left), self.expr(e.right)
        if e.op == "@":
            return self.bilinear(self.matmul, a, b)
        if isinstance(a, Pair) or isinstance(b, Pair):
            return self.complex_binary(BIN_OPS[e.op], a, b)
        return self.binary(BIN_OPS[e.op], a, b)

    # --- complex values: pairs of real nodes
    def partwise(self, f, *xs):
        """f applied to the real values xs, or, if one is complex, to the real parts and to the
        imaginary parts (a real x counts as x + 0i): for the operations that act on each part
        alone (negation, indexing, sums, concatenation, ...)."""
        if not any(isinstance(x, Pair) for x in xs):
            return f(*xs)
        pairs = [self.as_pair(x) for x in xs]
        re, im = f(*(p.re for p in pairs)), f(*(p.im for p in pairs))
        if isinstance(re, tuple):   # split(...)
            return tuple(Pair(r, i) for r, i in zip(re, im))
        return Pair(re, im)

    def as_pair(self, x) -> Pair:
        return x if isinstance(x, Pair) else Pair(x, self.zeros(x.shape))

    def zeros(self, shape) -> Node:
        return self.fit(self.const(0.0), shape)

    def fit(self, x: Node, shape) -> Node:
        """x broadcast to shape (x itself when it has it)."""
        if tuple(x.shape) == tuple(shape):
            return x
        return self.node(Op.EXPAND, [x], tuple(shape), tuple(d.evaluate(self.dims) for d in shape))

    @staticmethod
    def _is_const(x: Node, value: float) -> bool:
        while x.op == Op.EXPAND:
            x = x.srcs[0]
        return x.op == Op.CONST and not x.shape and x.arg == value

    def real_op(self, op: Op, a: Node, b: Node) -> Node:
        """a op b inside a complex expansion, the zeros and ones of literal parts (1j is 0 + 1i)
        folded away so that `2j * x` lowers to 2 * x, not to 0 * x and 2 * x."""
        shape = broadcast(a.shape, b.shape)
        zero_a, zero_b = self._is_const(a, 0.0), self._is_const(b, 0.0)
        if op == Op.MUL and (zero_a or zero_b) or op == Op.DIV and zero_a:
            return self.zeros(shape)
        if op == Op.MUL and self._is_const(a, 1.0) or op == Op.ADD and zero_a:
            return self.fit(b, shape)
        if op in (Op.MUL, Op.DIV) and self._is_const(b, 1.0) or op in (Op.ADD, Op.SUB) and zero_b:
            return self.fit(a, shape)
        if op == Op.SUB and zero_a:
            return self.fit(self.neg(b), shape)
        return self.binary(op, a, b)

    def bilinear(self, f, a, b):
        """A product (*, @, outer, dot: f on real nodes) of values of which one may be complex:
        (a + ib)(c + id) = (ac - bd) + i(ad + bc); a real factor scales both parts."""
        def g(x, y):
            if self._is_const(x, 0.0) or self._is_const(y, 0.0):
                return self.zeros(f(x, y).shape) if x.shape or y.shape else self.const(0.0)
            return f(x, y)
        if not isinstance(a, Pair) and not isinstance(b, Pair):
            return f(a, b)
        if not isinstance(b, Pair):
            return Pair(g(a.re, b), g(a.im, b))
        if not isinstance(a, Pair):
            return Pair(g(a, b.re), g(a, b.im))
        return Pair(self.real_op(Op.SUB, g(a.re, b.re), g(a.im, b.im)),
                    self.real_op(Op.ADD, g(a.re, b.im), g(a.im, b.re)))

    def complex_binary(self, op: Op, a, b) -> Pair:
        """+ - * / with at least one complex operand (the checker refuses ** and comparisons)."""
        if op in (Op.ADD, Op.SUB):
            a, b = self.as_pair(a), self.as_pair(b)
            return Pair(self.real_op(op, a.re, b.re), self.real_op(op, a.im, b.im))
        if op == Op.MUL:
            return self.bilinear(lambda x, y: self.real_op(Op.MUL, x, y), a, b)
        if op == Op.DIV:
            if not isinstance(b, Pair):
                return Pair(self.real_op(Op.DIV, a.re, b), self.real_op(Op.DIV, a.im, b))
            # a / (c + id) = a (c - id) / (c^2 + d^2)
            den = self.real_op(Op.ADD, self.real_op(Op.MUL, b.re, b.re), self.real_op(Op.MUL, b.im, b.im))
            num = self.complex_binary(Op.MUL, a, Pair(b.re, self.neg(b.im)))
            return Pair(self.real_op(Op.DIV, num.re, den), self.real_op(Op.DIV, num.im, den))
        raise AssertionError(op)  # pragma: no cover - refused by the checker

    def unary(self, f: str, x: Node) -> Node:
        """An elementwise function of a real node inside a complex expansion (constants folded)."""
        if x.op == Op.CONST and not x.shape:
            return self.fold(f, x.arg)
        return self.node(UNARY_OPS[f], [x], x.shape)

    def complex_exp(self, z: Pair) -> Pair:
        """exp(a + ib) = exp(a) (cos b + i sin b)."""
        m = self.unary("exp", z.re)
        return Pair(self.real_op(Op.MUL, m, self.unary("cos", z.im)), self.real_op(Op.MUL, m, self.unary("sin", z.im)))

    def complex_abs(self, z: Pair) -> Node:
        """|a + ib| = sqrt(a^2 + b^2)."""
        sq = self.real_op(Op.ADD, self.real_op(Op.MUL, z.re, z.re), self.real_op(Op.MUL, z.im, z.im))
        return self.unary("sqrt", sq)

    def binary(self, op: Op, a: Node, b: Node) -> Node:
        if a.op == Op.CONST and b.op == Op.CONST and not a.shape and not b.shape and op in _FOLD:
            return self.fold(_FOLD[op], a.arg, b.arg)
        return self.node(op, [a, b], broadcast(a.shape, b.shape), is_bool=op in COMPARE)

    def matmul(self, a: Node, b: Node) -> Node:
        if a.rank == 1 and b.rank == 1:
            return self.node(Op.DOT, [a, b], ())
        return self.node(Op.MATMUL, [a, b], a.shape[:-1] + b.shape[1:])

    def _Compare(self, e: A.Compare):
        return self.binary(CMP_OPS[e.op], self.expr(e.left), self.expr(e.right))

    def _Index(self, e: A.Index):
        return self.partwise(lambda x: self._index(e, x), self.expr(e.value))

    def _index(self, e: A.Index, x: Node) -> Node:
        items, axis = [], 0
        for sub in e.subs:
            if isinstance(sub, A.NoneLit):
                items.append(None)
                continue
            size = x.shape[axis]
            if isinstance(sub, A.Slice) and sub.lo is None and sub.hi is None:
                items.append(slice(None))
            elif isinstance(sub, A.Slice):
                lo = self.cell_static(sub.lo) if sub.lo is not None else 0
                n = size.evaluate(self.dims)
                hi = self.cell_static(sub.hi) if sub.hi is not None else n
                if not 0 <= lo <= hi <= n:  # the checker proved it for every size the cell allows
                    raise RecError(f"the slice {lo}:{hi} is not within an axis of size {n}", sub.span,
                                   hint="slices do not wrap around; state the sizes the cell needs in its "
                                        "where clause")
                items.append(slice(lo, hi))
            else:
                idx = self.cell_static(sub) if not (isinstance(sub, A.Name) and sub.id in self.env
                                                    and self.env[sub.id].op == Op.CONST) else int(self.env[sub.id].arg)
                n = size.evaluate(self.dims)
                if not -n <= idx < n:
                    raise RecError(f"index {idx} is out of range for an axis of size {n}", sub.span)
                items.append(idx % n)
            axis += 1
        items.extend([slice(None)] * (x.rank - axis))
        return self.node(Op.INDEX, [x], e.ty.shape, tuple(items), is_bool=x.is_bool)

    def _Call(self, e: A.Call):
        f = e.func
        if f in UNARY_OPS:
            x = self.expr(e.args[0])
            if isinstance(x, Pair):   # exp and abs (the checker refuses the others)
                return self.complex_exp(x) if f == "exp" else self.complex_abs(x)
            if x.op == Op.CONST and not x.shape and f in ("exp", "log", "sqrt", "abs", "rsqrt"):
                return self.fold(f, x.arg)
            return self.node(UNARY_OPS[f], [x], x.shape)
        method = getattr(self, "_call_" + f)
        if f == "sum_in":
            return method(e)
        args = [self.expr(a) for a in e.args]
        if not any(isinstance(a, Pair) for a in args) or f in ("complex", "real", "imag", "conj"):
            return method(e, *args)
        if f in ("outer", "dot"):
            return self.bilinear(lambda x, y: method(e, x, y), *args)
        if f == "where":
            c, a, b = args
            return self.partwise(lambda x, y: method(e, c, x, y), a, b)
        if f in ("split", "reshape"):   # the second argument is a count or a list of dimensions
            return self.partwise(lambda x: method(e, x, args[1]), args[0])
        # sum, mean, diag, concat: on each part
        return self.partwise(lambda *xs: method(e, *xs), *args)

    def _call_complex(self, e, re, im):
        shape = broadcast(re.shape, im.shape)
        return Pair(self.fit(re, shape), self.fit(im, shape))

    def _call_real(self, e, z):
        return z.re if isinstance(z, Pair) else z

    def _call_imag(self, e, z):
        return z.im if isinstance(z, Pair) else self.zeros(z.shape)

    def _call_conj(self, e, z):
        return Pair(z.re, self.neg(z.im)) if isinstance(z, Pair) else z

    def _axis(self, e: A.Call, x: Node):
        for k in e.kwargs:
            if k.name == "axis":
                if isinstance(k.value, A.NoneLit):
                    return None
                return self.cell_static(k.value) % x.rank
        return x.rank - 1

    def reduce(self, op: Op, x: Node, axis, keepdim=False) -> Node:
        if axis is None:
            shape = tuple(ONE for _ in x.shape) if keepdim else ()
        else:
            shape = tuple(ONE if i == axis else d for i, d in enumerate(x.shape) if keepdim or i != axis)
        return self.node(op, [x], shape, (axis, keepdim))

    def _call_max(self, e, a, b):
        return self.binary(Op.MAX, a, b)

    def _call_min(self, e, a, b):
        return self.binary(Op.MIN, a, b)

    def _call_logaddexp(self, e, a, b):
        return self.binary(Op.LOGADDEXP, a, b)

    def _call_clamp(self, e, x, lo, hi):
        return self.binary(Op.MIN, self.binary(Op.MAX, x, lo), hi)

    def _call_where(self, e, c, a, b):
        shape = broadcast(broadcast(c.shape, a.shape), b.shape)
        return self.node(Op.WHERE, [c, a, b], shape)

    def _call_sum(self, e, x):
        return self.reduce(Op.SUM, x, self._axis(e, x))

    def _call_amax(self, e, x):
        axis = self._axis(e, x)
        self._not_empty(e, x, axis)
        return self.reduce(Op.AMAX, x, axis)

    def _not_empty(self, e: A.Call, x: Node, axis) -> None:
        """A located error for a maximum or a mean over no elements (a dimension that is 0)."""
        if self._count(x, axis) == 0:
            zero = sorted({n for d in (x.shape if axis is None else (x.shape[axis],)) for n in d.names
                           if self.dims.get(n) == 0})
            raise RecError(f"{e.func}(...) over an axis of size 0" + (f" ({', '.join(f'{n} = 0' for n in zero)})"
                                                                       if zero else "") + " has no value",
                           e.span, hint="a maximum or a mean needs at least one element: give the dimension a "
                                        "size >= 1, or compute this only where it is not empty")

    def _call_logsumexp(self, e, x):
        return self.reduce(Op.LOGSUMEXP, x, self._axis(e, x))

    def _count(self, x: Node, axis) -> float:
        dims = x.shape if axis is None else (x.shape[axis],)
        n = 1
        for d in dims:
            n *= d.evaluate(self.dims)
        return float(n)

    def _call_mean(self, e, x):
        axis = self._axis(e, x)
        self._not_empty(e, x, axis)
        return self.binary(Op.DIV, self.reduce(Op.SUM, x, axis), self.const(self._count(x, axis)))

    def _call_norm(self, e, x):
        ss = self.reduce(Op.SUM, self.binary(Op.MUL, x, x), self._axis(e, x))
        return self.node(Op.SQRT, [ss], ss.shape)

    def _call_l2norm(self, e, x):
        ss = self.reduce(Op.SUM, self.binary(Op.MUL, x, x), x.rank - 1, keepdim=True)
        inv = self.node(Op.RSQRT, [self.binary(Op.ADD, ss, self.const(EPS))], ss.shape)
        return self.binary(Op.MUL, x, inv)

    def _call_rmsnorm(self, e, x):
        n = self._count(x, x.rank - 1)
        ms = self.binary(Op.DIV, self.reduce(Op.SUM, self.binary(Op.MUL, x, x), x.rank - 1, True), self.const(n))
        inv = self.node(Op.RSQRT, [self.binary(Op.ADD, ms, self.const(EPS))], ms.shape)
        return self.binary(Op.MUL, x, inv)

    def _call_layernorm(self, e, x):
        n = self._count(x, x.rank - 1)
        mu = self.binary(Op.DIV, self.reduce(Op.SUM, x, x.rank - 1, True), self.const(n))
        xc = self.binary(Op.SUB, x, mu)
        var = self.binary(Op.DIV, self.reduce(Op.SUM, self.binary(Op.MUL, xc, xc), x.rank - 1, True), self.const(n))
        inv = self.node(Op.RSQRT, [self.binary(Op.ADD, var, self.const(EPS))], var.shape)
        return self.binary(Op.MUL, xc, inv)

    def _call_softmax(self, e, x):
        self._not_empty(e, x, x.rank - 1)
        m = self.reduce(Op.AMAX, x, x.rank - 1, True)
        ex = self.node(Op.EXP, [self.binary(Op.SUB, x, m)], x.shape)
        return self.binary(Op.DIV, ex, self.reduce(Op.SUM, ex, x.rank - 1, True))

    def _call_outer(self, e, a, b):
        return self.node(Op.OUTER, [a, b], (a.shape[0], b.shape[0]))

    def _call_dot(self, e, a, b):
        return self.node(Op.DOT, [a, b], ())

    def _call_eye(self, e, n):
        return self.node(Op.EYE, [], e.ty.shape, e.ty.shape[0].evaluate(self.dims))

    def _call_diag(self, e, v):
        d = v.shape[0]
        col = self.node(Op.INDEX, [v], (d, ONE), (slice(None), None))
        return self.binary(Op.MUL, col, self.node(Op.EYE, [], (d, d), d.evaluate(self.dims)))

    def _call_split(self, e, x, n):
        parts = int(n.arg)
        size = x.shape[-1].evaluate(self.dims) // parts
        part_dim = x.shape[-1].divide(parts)
        out = []
        for p in range(parts):
            items = tuple([slice(None)] * (x.rank - 1) + [slice(p * size, (p + 1) * size)])
            out.append(self.node(Op.INDEX, [x], x.shape[:-1] + (part_dim,), items))
        return tuple(out)

    def _call_concat(self, e, *xs):
        last = xs[0].shape[-1]
        for x in xs[1:]:
            last = last + x.shape[-1]
        return self.node(Op.CONCAT, xs, xs[0].shape[:-1] + (last,))

    def _call_reshape(self, e, x, _shape_list=None):
        return self.node(Op.RESHAPE, [x], e.ty.shape, tuple(d.evaluate(self.dims) for d in e.ty.shape))

    def _ListExpr(self, e):
        return None  # only reshape's shape argument; read from the AST there

    def _call_arange(self, e, *bounds):
        vals = [int(b.arg) for b in bounds]
        lo, hi = (0, vals[0]) if len(vals) == 1 else vals
        d = e.ty.shape[0]
        check_size((d,), self.dims, e.span, "this value")  # before the tuple of its values is built
        return self.node(Op.CONST, [], (d,), tuple(float(v) for v in range(lo, hi)))

    def _call_inv(self, e, a):
        return self.node(Op.INV, [a], a.shape)

    def _call_expm(self, e, a):
        return self.node(Op.EXPM, [a], a.shape)

    def _call_solve(self, e, a, b):
        return self.node(Op.SOLVE, [a, b], b.shape)

    def _call_sum_in(self, e):
        self.in_sum_in = True
        try:
            x = self.expr(e.args[0])
        finally:
            self.in_sum_in = False
        return self.partwise(lambda v: self.node(Op.SUM_IN, [v], v.shape), x)


def _printer_expr(e: A.Expr) -> str:
    from .printer import expr
    return expr(e)


def arg_key(arg):
    """A node's arg as a hashable key (slices are not hashable before Python 3.12)."""
    if isinstance(arg, slice):
        return ("slice", arg.start, arg.stop)
    if isinstance(arg, tuple):
        return tuple(arg_key(a) for a in arg)
    return arg


_FOLD = {Op.MAX: "max", Op.MIN: "min", Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**"}


# --------------------------------------------------------------------------- dump

def fmt_arg(node: Node) -> str:
    a = node.arg
    if node.op == Op.INDEX:
        def one(i):
            if i is None:
                return "None"
            if isinstance(i, slice):
                return ":" if i.start is None and i.stop is None else f"{i.start}:{i.stop}"
            return str(i)
        return "[" + ", ".join(one(i) for i in a) + "]"
    if node.op == Op.STATE:
        return a[0] if a[1] == "prev" else f"{a[0]}.{a[1]}"
    if node.op == Op.CONST:
        return repr(a) if not isinstance(a, tuple) else f"[{a[0]:g} .. {a[-1]:g}]"
    if node.op in (Op.SUM, Op.AMAX, Op.LOGSUMEXP):
        return f"axis={a[0]}" + (", keepdim" if a[1] else "")
    return "" if a is None else str(a)


def dump(ir: IRCell) -> str:
    """The IR as text: one line per node, `%id = OP(srcs) [shape]  name  # file:line`."""
    lines = [f"ir {ir.name}  dims " + ", ".join(f"{k}={v}" for k, v in ir.dims.items())]
    roots = {n.id: f"{s}'" for s, n in ir.updates.items()}
    roots.update({n.id: f"output {o}" for o, n in ir.outputs.items()})
    nodes = ir.nodes()
    num = {n.id: i for i, n in enumerate(nodes)}  # stable numbering: position in the order
    ref = lambda n: f"%{num[n.id]}"  # noqa: E731
    for n in nodes:
        args = ", ".join(ref(s) for s in n.srcs)
        extra = fmt_arg(n)
        inside = ", ".join(x for x in (args, extra) if x)
        shape = "[" + ", ".join(str(d) for d in n.shape) + "]"
        label = roots.get(n.id) or n.name or ""
        where = f"  # {n.span.file.rsplit('/', 1)[-1]}:{n.span.line}" if n.span else ""
        lines.append(f"  {ref(n):<5} = {n.op.name}({inside}) {shape}{'  ' + label if label else ''}{where}")
    return "\n".join(lines)
