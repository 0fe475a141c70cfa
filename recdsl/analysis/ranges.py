"""Value ranges: an interval and sign analysis over the IR.

Every node gets a `Range` (bounds, open or closed), computed bottom-up by interval
arithmetic, plus a few relational rules that plain intervals lose because the operands
vary together: `x - max(x, y) <= 0`, `x - logaddexp(x, y) < 0` (the stabilisers of mLSTM,
Aaren, LightNet) and shares of a sum, `N / (T + R)` with `0 <= N <= T`, `R >= 0` (minLSTM's
f / (f + i), Longhorn's beta k_j^2 / (1 + beta k.k)).

Params are read twice: at their initial values (from the .rec initialiser) and as
anything (a trained param can move). A range is `proven` when both readings give the
same bounds. Inputs and states are unknown.

On top of it, for the decay `a` of a stage: `decay_range` (plus one convention, recorded
in `assumes`: a decay exp(g) of an input g is a log gate the caller keeps <= 0, as
flash-linear-attention's gk), `log_form` (an IR node g with exp(g) == a, for decays
proven positive) and `transition_warning` (a decay that can exceed 1 in magnitude lets
the state grow without bound)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from .. import ast as A
from ..builtins import DISTRIBUTIONS
from ..ir import COMPARE, UNARY_OPS, IRCell, Node, Op, toposort
from ..types import ONE, broadcast
from .symbolic import node_text

INF = math.inf
VIEWS = (Op.INDEX, Op.EXPAND, Op.TRANSPOSE, Op.RESHAPE)  # the same values, seen differently


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (strict where *_open). `proven`: holds for every value of the
    params (else only at their initial values); `assumes`: conventions it relies on."""
    lo: float = -INF
    hi: float = INF
    lo_open: bool = True
    hi_open: bool = True
    proven: bool = True
    assumes: tuple[str, ...] = ()

    def __post_init__(self):
        # An unknown (NaN) bound is no bound; an infinite one is never attained; no -0.
        lo = -INF if math.isnan(self.lo) else self.lo + 0.0
        hi = INF if math.isnan(self.hi) else self.hi + 0.0
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "lo_open", self.lo_open or math.isinf(lo))
        object.__setattr__(self, "hi_open", self.hi_open or math.isinf(hi))

    def within(self, lo: float, hi: float) -> bool:
        """The bounds lie in [lo, hi] (proven or not)."""
        return self.lo >= lo and self.hi <= hi

    @property
    def positive(self) -> bool:
        return self.proven and (self.lo > 0 or (self.lo == 0 and self.lo_open))

    @property
    def nonnegative(self) -> bool:
        return self.proven and self.lo >= 0

    @property
    def magnitude_le_one(self) -> bool:
        return self.proven and self.within(-1.0, 1.0)

    def __str__(self) -> str:
        text = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        return text if self.proven else text + " at initialisation"


def _num(x: float) -> str:
    return f"{x:.4g}"


TOP = Range()
ZERO = Range(0.0, 0.0, False, False)
UNIT = Range(-1.0, 1.0, False, False)
MASK = Range(0.0, 1.0, False, False)
POSITIVE = Range(0.0, INF, True, True)
NONNEGATIVE = Range(0.0, INF, False, True)


def _point(v: float) -> Range:
    return Range(v, v, False, False)


# --------------------------------------------------------------------------- interval arithmetic

def _lowest(ends) -> tuple[float, bool]:
    """The least of (value, open) candidates; open only if every candidate at that value is."""
    v = min(x for x, _ in ends)
    return v, all(o for x, o in ends if x == v)


def _highest(ends) -> tuple[float, bool]:
    v = max(x for x, _ in ends)
    return v, all(o for x, o in ends if x == v)


def _bounds(lo: tuple[float, bool], hi: tuple[float, bool]) -> Range:
    return Range(lo[0], hi[0], lo[1], hi[1])


def _union(*rs: Range) -> Range:
    return _bounds(_lowest([(r.lo, r.lo_open) for r in rs]), _highest([(r.hi, r.hi_open) for r in rs]))


def _meet(a: Range, b: Range) -> Range:
    """The intersection; an empty one (a value that is NaN everywhere) is unknown."""
    lo, hi = max(a.lo, b.lo), min(a.hi, b.hi)
    lo_open = any(o for x, o in ((a.lo, a.lo_open), (b.lo, b.lo_open)) if x == lo)
    hi_open = any(o for x, o in ((a.hi, a.hi_open), (b.hi, b.hi_open)) if x == hi)
    if lo > hi or (lo == hi and (lo_open or hi_open)):
        return TOP
    return Range(lo, hi, lo_open, hi_open)


def _add(a: Range, b: Range) -> Range:
    return Range(a.lo + b.lo, a.hi + b.hi, a.lo_open or b.lo_open, a.hi_open or b.hi_open)


def _neg(r: Range) -> Range:
    return Range(-r.hi, -r.lo, r.hi_open, r.lo_open)


def _mul(a: Range, b: Range) -> Range:
    """The extremes of a product are products of extremes; a closed 0 times anything is an
    attained 0 (also against an infinite end, whose values are all finite)."""
    ends = []
    for x, xo in ((a.lo, a.lo_open), (a.hi, a.hi_open)):
        for y, yo in ((b.lo, b.lo_open), (b.hi, b.hi_open)):
            zero = (x == 0 and not xo) or (y == 0 and not yo)
            ends.append((0.0 if x == 0 or y == 0 else x * y, (xo or yo) and not zero))
    return _bounds(_lowest(ends), _highest(ends))


def _excludes_zero(r: Range) -> bool:
    return r.lo > 0 or (r.lo == 0 and r.lo_open) or r.hi < 0 or (r.hi == 0 and r.hi_open)


def _div(a: Range, b: Range) -> Range:
    if not _excludes_zero(b):
        return TOP
    # 1/x is decreasing on each side of 0; an end at 0 (open) goes to the infinity of its side.
    side = INF if b.lo >= 0 else -INF
    recip = Range(1 / b.hi if b.hi != 0 else side, 1 / b.lo if b.lo != 0 else side, b.hi_open, b.lo_open)
    return _mul(a, recip)


def _square(r: Range) -> Range:
    m = _abs(r)
    return _mul(m, m)


def _abs(r: Range) -> Range:
    if r.lo >= 0:
        return r
    if r.hi <= 0:
        return _neg(r)
    return _bounds((0.0, False), _highest([(-r.lo, r.lo_open), (r.hi, r.hi_open)]))


def _max(a: Range, b: Range) -> Range:
    return _bounds(_highest([(a.lo, a.lo_open), (b.lo, b.lo_open)]), _highest([(a.hi, a.hi_open), (b.hi, b.hi_open)]))


def _min(a: Range, b: Range) -> Range:
    return _bounds(_lowest([(a.lo, a.lo_open), (b.lo, b.lo_open)]), _lowest([(a.hi, a.hi_open), (b.hi, b.hi_open)]))


def _logaddexp(a: Range, b: Range) -> Range:
    # max(a, b) < logaddexp(a, b) <= max(a, b) + log 2
    return Range(max(a.lo, b.lo), max(a.hi, b.hi) + math.log(2), True, False)


def _apply(f, x: float) -> float:
    try:
        return f(x)
    except OverflowError:
        return INF if x > 0 else -INF


def _increasing(r: Range, f) -> Range:
    return Range(_apply(f, r.lo), _apply(f, r.hi), r.lo_open, r.hi_open)


def _decreasing(r: Range, f) -> Range:
    return Range(_apply(f, r.hi), _apply(f, r.lo), r.hi_open, r.lo_open)


def _pow(base: Range, e: Range) -> Range:
    if base.positive:  # x ** y = exp(y * log x), whatever y
        return _increasing(_mul(e, _log(base)), math.exp)
    if e.lo == e.hi and e.lo >= 1 and e.lo.is_integer():  # integer powers
        c = int(e.lo)
        return _increasing(base if c % 2 else _abs(base), lambda x: x ** c)
    if e.lo == e.hi and e.lo > 0 and base.lo >= 0:  # a fractional power of a value >= 0
        return _increasing(base, lambda x: x ** e.lo)
    return TOP


def _log(r: Range) -> Range:
    return _increasing(_meet(r, POSITIVE), lambda x: math.log(x) if x > 0 else -INF)


def _softplus(x: float) -> float:
    return x if x > 40 else math.log1p(math.exp(x))


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


# Ops whose range follows from their operands' ranges alone.
_UNARY = {
    Op.NEG: _neg,
    Op.EXP: lambda r: _increasing(r, math.exp),
    Op.LOG: _log,
    Op.LOG1P: lambda r: _increasing(_meet(r, Range(-1.0, INF, True, True)),
                                    lambda x: math.log1p(x) if x > -1 else -INF),
    Op.EXPM1: lambda r: _increasing(r, math.expm1),
    Op.SIGMOID: lambda r: _increasing(r, lambda x: 1 / (1 + math.exp(-x)) if x > -700 else 0.0),
    Op.LOGSIGMOID: lambda r: _increasing(r, lambda x: -_softplus(-x)),
    Op.SOFTPLUS: lambda r: _increasing(r, _softplus),
    Op.TANH: lambda r: _increasing(r, math.tanh),
    Op.ELU: lambda r: _increasing(r, lambda x: x if x > 0 else math.expm1(x)),
    Op.RELU: lambda r: _max(r, ZERO),
    Op.ABS: _abs,
    Op.SIGN: lambda r: Range(_sign(r.lo), _sign(r.hi), False, False),
    Op.SQRT: lambda r: _increasing(_meet(r, NONNEGATIVE), math.sqrt),
    Op.RSQRT: lambda r: _decreasing(_meet(r, POSITIVE), lambda x: 1 / math.sqrt(x) if x > 0 else INF),
    Op.SIN: lambda r: UNIT,
    Op.COS: lambda r: UNIT,
}
_BINARY = {Op.ADD: _add, Op.SUB: lambda a, b: _add(a, _neg(b)), Op.MUL: _mul, Op.DIV: _div, Op.POW: _pow,
           Op.MAX: _max, Op.MIN: _min, Op.LOGADDEXP: _logaddexp, **{op: lambda a, b: MASK for op in COMPARE}}


# --------------------------------------------------------------------------- params

def _init_range(init, values: dict[str, float]) -> Range:
    """The range of a param's initial value, from its .rec initialiser."""
    if not isinstance(init, A.RandomInit):
        return _const_range(init.value, values)
    if init.dist != "uniform":
        return TOP  # normal: unbounded
    pos = [a for a in init.args if not isinstance(a, A.Keyword)]
    args = dict(zip(DISTRIBUTIONS[init.dist], pos))
    args.update({a.name: a.value for a in init.args if isinstance(a, A.Keyword)})
    return Range(_const_range(args["low"], values).lo, _const_range(args["high"], values).hi, False, False)


_AST_BINARY = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW}


def _const_range(e: A.Expr, values: dict[str, float]) -> Range:
    """An initialiser's constant expression (numbers, dims, hypers, math, arange) as a range,
    as runtime._const evaluates it, without torch."""
    if isinstance(e, A.Num):
        return _point(float(e.value))
    if isinstance(e, A.Name):
        return _point(float(values[e.id]))
    if isinstance(e, A.UnaryOp):
        r = _const_range(e.operand, values)
        return _neg(r) if e.op == "-" else r
    if isinstance(e, A.BinOp) and e.op in _AST_BINARY:
        return _BINARY[_AST_BINARY[e.op]](_const_range(e.left, values), _const_range(e.right, values))
    if isinstance(e, A.Call) and e.func == "arange":
        bounds = [round(_const_range(a, values).lo) for a in e.args]
        lo, hi = (0, bounds[0]) if len(bounds) == 1 else bounds
        return Range(float(lo), float(hi - 1), False, False)
    if isinstance(e, A.Call) and e.func in UNARY_OPS:
        return _UNARY[UNARY_OPS[e.func]](_const_range(e.args[0], values))
    return TOP


# --------------------------------------------------------------------------- the pass

class _Pass:
    """Ranges of nodes under one reading of the params: their initial values (at_init)
    or any value. Memoised by node id."""

    def __init__(self, ir: IRCell, at_init: bool):
        self.ir, self.at_init = ir, at_init
        self.memo: dict[int, Range] = {}
        self.factor_counts: dict[int, int] = {}  # see _factors
        self.logs: dict[int, Node | None] = {}  # log forms built on this pass's ranges

    def __call__(self, node: Node) -> Range:
        stack = [node]
        while stack:  # sources first, not below what is known already
            n = stack[-1]
            todo = [s for s in n.srcs if s.id not in self.memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if n.id not in self.memo:
                self.factor_counts[n.id] = _factor_count(n, self.factor_counts)
                self.memo[n.id] = self._eval(n)
        return self.memo[node.id]

    def _eval(self, n: Node) -> Range:
        srcs = [self.memo[s.id] for s in n.srcs]
        if n.op in _NODE_RULES:
            return _NODE_RULES[n.op](n, srcs, self)
        if n.op in _UNARY:
            return _UNARY[n.op](srcs[0])
        if n.op in _BINARY:
            return _BINARY[n.op](*srcs)
        return TOP  # inputs, states, sums over DAG edges

    def size(self, node: Node) -> int:
        return math.prod(self.ir.shape_of(node))


def _const(n: Node, s, p) -> Range:
    return _union(*map(_point, n.arg)) if isinstance(n.arg, tuple) else _point(n.arg)


def _param(n: Node, s, p: _Pass) -> Range:
    if not p.at_init:
        return TOP
    var = p.ir.checked.params[n.arg]
    if var.type.is_complex and not isinstance(var.decl.init, A.RandomInit):
        return TOP   # a complex value (its parts on the trailing axis): not a real expression's range
    return _init_range(var.decl.init, p.ir.hypers)


def _sub(n: Node, s, p) -> Range:
    x, m = n.srcs
    r = _add(s[0], _neg(s[1]))
    if x in m.srcs and m.op == Op.MAX:
        return _meet(r, Range(-INF, 0.0, True, False))
    if x in m.srcs and m.op == Op.LOGADDEXP:
        return _meet(r, Range(-INF, 0.0, True, True))
    return r


def _product(n: Node, s, p: _Pass) -> Range:
    """MUL, DIV, OUTER: interval arithmetic, a square is >= 0, a share of a sum is in [0, 1]."""
    if n.op == Op.DIV:
        r = _div(*s)
    else:
        r = _square(s[0]) if n.srcs[0] is n.srcs[1] else _mul(*s)
    return _meet(r, _share(n, p))


def _contraction(n: Node, s, p: _Pass) -> Range:
    """DOT, MATMUL: a sum of as many products as the contracted axis is long."""
    a, b = n.srcs
    term = _square(s[0]) if a is b else _mul(*s)
    return _mul(term, _point(p.ir.shape_of(a)[-1]))


def _sum(n: Node, s, p: _Pass) -> Range:
    return _mul(s[0], _point(p.size(n.srcs[0]) // p.size(n)))


def _logsumexp(n: Node, s, p: _Pass) -> Range:
    # max(x) <= logsumexp(x) <= max(x) + log(count)
    count = p.size(n.srcs[0]) // p.size(n)
    return Range(s[0].lo, s[0].hi + math.log(count), s[0].lo_open, s[0].hi_open)


_NODE_RULES = {
    Op.CONST: _const, Op.PARAM: _param, Op.EYE: lambda n, s, p: MASK,
    Op.SUB: _sub,
    Op.MUL: _product, Op.DIV: _product, Op.OUTER: _product,
    Op.DOT: _contraction, Op.MATMUL: _contraction,
    Op.SUM: _sum, Op.AMAX: lambda n, s, p: s[0], Op.LOGSUMEXP: _logsumexp,
    Op.WHERE: lambda n, s, p: _union(s[1], s[2]), Op.CONCAT: lambda n, s, p: _union(*s),
    **{op: lambda n, s, p: s[0] for op in VIEWS},
}


# --------------------------------------------------------------------------- shares of a sum

# A factor of a product: the node and where it sits, as the sides of the outer products
# it is under (OUTER's left operand runs along rows, its right one along columns). Two
# factors are the same value at every element only if node and place agree, or the node is
# a scalar.
Factor = tuple[Node, tuple[str, ...]]

# A product that would split into more factors than this stays whole, one factor: bounded
# work on any graph (products that reuse each other would unfold exponentially). The cut
# depends on the node only, so a node splits the same way wherever it is met, and common
# factors still cancel.
_MAX_FACTORS = 16
_DEPTH = 8  # likewise for the terms of a sum


def _splits(n: Node) -> bool:
    return n.op in (Op.MUL, Op.OUTER, Op.DIV) and n.srcs[0] is not n.srcs[1]


def _factor_count(n: Node, counts: dict[int, int]) -> int:
    """The number of factors _factors splits n into if n splits (at most 2 * _MAX_FACTORS)."""
    if not _splits(n):
        return 1
    return sum(c if c <= _MAX_FACTORS else 1 for c in (counts[s.id] for s in n.srcs))


def _factors(n: Node, p: _Pass, place: tuple[str, ...] = ()) -> tuple[list[Factor], list[Factor]]:
    """n as numerator / denominator factors through MUL, DIV and OUTER (x * x stays whole:
    a square is >= 0 whatever x is)."""
    if not _splits(n) or p.factor_counts[n.id] > _MAX_FACTORS:
        return [(n, place)], []
    rows, cols = (place + ("row",), place + ("col",)) if n.op == Op.OUTER else (place, place)
    n1, d1 = _factors(n.srcs[0], p, rows)
    n2, d2 = _factors(n.srcs[1], p, cols)
    return (n1 + d2, d1 + n2) if n.op == Op.DIV else (n1 + n2, d1 + d2)


def _terms(n: Node, depth: int = 0) -> list[Node]:
    if n.op != Op.ADD or depth >= _DEPTH:
        return [n]
    return _terms(n.srcs[0], depth + 1) + _terms(n.srcs[1], depth + 1)


def _share(n: Node, p: _Pass) -> Range:
    """N / (T + R) lies in [0, 1] when 0 <= N <= T and R >= 0 (open at 1 when R > 0, at 0
    when N > 0); TOP when n is not such a share."""
    num, den = _factors(n, p)
    if len(den) != 1 or den[0][0].op != Op.ADD or not all(p(f).nonnegative for f, _ in num):
        return TOP
    total, place = den[0]
    terms = _terms(total)
    for k, t in enumerate(terms):
        rest = terms[:k] + terms[k + 1:]
        if all(p(r).nonnegative for r in rest) and _dominated(num, _factors(t, p, place), p):
            return Range(0.0, 1.0, all(p(f).positive for f, _ in num), any(p(r).positive for r in rest))
    return TOP


def _dominated(num: list[Factor], term: tuple[list[Factor], list[Factor]], p: _Pass) -> bool:
    """prod(num) <= prod(term) for factors of num all >= 0: after cancelling common factors,
    each remaining factor of num is bounded by one of term (k*k <= dot(k, k), x <= sum(x)),
    and the unpaired ones are <= 1 in num, >= 1 in term."""
    tnum, tden = term
    if tden:
        return False
    left, right = list(num), list(tnum)
    for match in (_same, _bounded_by):
        for f in list(left):
            g = next((g for g in right if match(f, g)), None)
            if g is not None:
                left.remove(f)
                right.remove(g)
    return all(p(f).hi <= 1 for f, _ in left) and all(p(g).lo >= 1 for g, _ in right)


def _is_scalar(n: Node) -> bool:
    return all(d == ONE for d in n.shape)


def _same(f: Factor, g: Factor) -> bool:
    return f[0] is g[0] and (f[1] == g[1] or _is_scalar(f[0]))


def _bounded_by(f: Factor, g: Factor) -> bool:
    """f <= g at every element, for f >= 0 and g a scalar sum that has f's elements as terms."""
    x, y = f[0], g[0]
    if not _is_scalar(y):
        return False
    if y.op == Op.DOT and x.op == Op.MUL:  # k_j * k_j <= sum_i k_i * k_i
        return y.srcs[0] is y.srcs[1] is x.srcs[0] is x.srcs[1]
    return y.op == Op.SUM and y.srcs[0] is x


# --------------------------------------------------------------------------- public

def _proven(init: Range, sound: Range) -> Range:
    same = (init.lo, init.hi, init.lo_open, init.hi_open) == (sound.lo, sound.hi, sound.lo_open, sound.hi_open)
    return replace(init, proven=same)


def value_range(node: Node, ir: IRCell, at_init: bool = True) -> Range:
    """The range of node: at the params' initial values (proven when it holds for any
    value), or, with at_init=False, for any value of the params."""
    sound = _Pass(ir, at_init=False)(node)
    return _proven(_Pass(ir, at_init=True)(node), sound) if at_init else sound


def ranges(ir: IRCell) -> dict[int, Range]:
    """node id -> value_range(node, ir), for every node of the step."""
    sound, init = _Pass(ir, at_init=False), _Pass(ir, at_init=True)
    return {n.id: _proven(init(n), sound(n)) for n in ir.nodes()}


def log_form(a: Node, ir: IRCell) -> Node | None:
    """An IR node g with exp(g) == a, when a is proven positive (else None: a raw param is
    positive only at its initial value, which training may leave)."""
    p = _Pass(ir, at_init=False)
    for n in toposort([a]):  # sources first, so that the recursion below stays shallow
        _log_form(n, p)
    return p.logs[a.id]


def _log_form(a: Node, p: _Pass) -> Node | None:
    if a.id not in p.logs:
        p.logs[a.id] = _build_log_form(a, p)
    return p.logs[a.id]


def _build_log_form(a: Node, p: _Pass) -> Node | None:
    if not p(a).positive:
        return None
    rule = _LOG_RULES.get(a.op)
    g = rule(a, p) if rule is not None else None
    return g if g is not None else _ew(Op.LOG, a.span, a)


def _ew(op: Op, span, *srcs: Node) -> Node:
    """A new elementwise node, its shape broadcast from its sources'."""
    shape: tuple = ()
    for s in srcs:
        shape = broadcast(shape, s.shape)
    return Node(op, srcs, shape, span=span)


def _log_const(a: Node, p) -> Node:
    arg = tuple(map(math.log, a.arg)) if isinstance(a.arg, tuple) else math.log(a.arg)
    return Node(Op.CONST, (), a.shape, arg, span=a.span)


def _log_one_minus(a: Node, p) -> Node | None:
    one, x = a.srcs
    if not (one.op == Op.CONST and one.arg == 1.0):
        return None
    if x.op == Op.SIGMOID:  # 1 - sigmoid(u) = sigmoid(-u)
        return _ew(Op.LOGSIGMOID, a.span, _ew(Op.NEG, a.span, x.srcs[0]))
    return _ew(Op.LOG1P, a.span, _ew(Op.NEG, a.span, x))  # accurate where x is small


def _is_zero(n: Node) -> bool:
    return n.op == Op.CONST and n.arg == 0.0


def _log_sum(a: Node, p) -> Node | None:
    """0 + x: HGRN's `lower_bound + (1 - lower_bound) * sigmoid(fg)` at its default 0."""
    x, y = a.srcs
    other = y if _is_zero(x) else x if _is_zero(y) else None
    return _log_form(other, p) if other is not None and other.shape == a.shape else None


def _log_product(a: Node, p) -> Node | None:
    x, y = (_log_form(s, p) for s in a.srcs)
    if x is None or y is None:
        return None
    if _is_zero(y) and x.shape == a.shape:  # a factor or divisor 1
        return x
    if _is_zero(x) and y.shape == a.shape and a.op == Op.MUL:
        return y
    return _ew(Op.ADD if a.op == Op.MUL else Op.SUB, a.span, x, y)


def _log_pow(a: Node, p) -> Node | None:
    base = _log_form(a.srcs[0], p)
    return None if base is None else _ew(Op.MUL, a.span, a.srcs[1], base)


def _log_view(a: Node, p) -> Node | None:
    inner = _log_form(a.srcs[0], p)
    return None if inner is None else Node(a.op, (inner,), a.shape, a.arg, span=a.span)


_LOG_RULES = {
    Op.EXP: lambda a, p: a.srcs[0],
    Op.SIGMOID: lambda a, p: _ew(Op.LOGSIGMOID, a.span, a.srcs[0]),
    Op.CONST: _log_const,
    Op.SUB: _log_one_minus,
    Op.ADD: _log_sum,
    Op.MUL: _log_product, Op.DIV: _log_product,
    Op.POW: _log_pow,
    **{op: _log_view for op in VIEWS},
}


def _line(a: Node) -> str:
    """' (line N)' of the nearest node with a span (breadth-first from a), else ''."""
    queue, seen = deque([a]), {a.id}
    while queue:
        n = queue.popleft()
        if n.span is not None:
            return f" (line {n.span.line})"
        fresh = [s for s in n.srcs if s.id not in seen]
        seen.update(s.id for s in fresh)
        queue.extend(fresh)
    return ""


def _assuming(r: Range) -> str:
    return ", assuming " + " and ".join(r.assumes) if r.assumes else ""


def decay_range(a: Node, ir: IRCell) -> Range:
    """value_range of a decay, where a decay exp(g) (or a view of it, exp(g)[:, None]) of an
    input g follows flash-linear-attention's convention: g is a log gate the caller keeps
    <= 0. Only there: exp(w) inside RWKV-6's exp(-exp(w)) is a rate, not a gate."""
    r = value_range(a, ir)
    gate = a
    while gate.op in VIEWS:
        gate = gate.srcs[0]
    if gate.op != Op.EXP or gate.srcs[0].op != Op.INPUT:
        return r
    assumed = f"{gate.srcs[0].arg} <= 0 (a log gate given by the caller)"
    return replace(_meet(r, Range(0.0, 1.0, True, False)), proven=r.proven, assumes=(assumed,))


def transition_warning(a: Node, ir: IRCell, state: str) -> str | None:
    """A one-line warning when the decay `a` of `state` can exceed 1 in magnitude (at the
    params' initial values, for a decay that reads params), else None."""
    r = decay_range(a, ir)
    if r.within(-1.0, 1.0):
        return None
    return (f"{state} may grow without bound: its decay {node_text(a)}{_line(a)} ranges over {r}"
            f"{_assuming(r)}, so it can exceed 1 in magnitude")


def describe(a: Node, ir: IRCell) -> str:
    """The range of a decay as text, with what it relies on: e.g. `(0, 1)`, `(0, 1], assuming
    g <= 0 (...)`, `[0.9, 0.9] at initialisation; (-inf, inf) for any value of the params`."""
    r = decay_range(a, ir)
    text = str(r)
    if not r.proven:
        text += f"; {value_range(a, ir, at_init=False)} for any value of the params"
    return text + _assuming(r)
