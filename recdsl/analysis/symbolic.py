"""sympy for the analysis: readable coefficient formulas, a symbolic proof that the
extracted coefficients reproduce the update, and proofs that each class's combine
operator is associative. Plus numeric spot checks in float64 on random values.

Non-elementwise sub-expressions that read no state (W @ x, outer(k, v), x[0]) become
opaque symbols named by their source-like text, so the formulas stay small."""
from __future__ import annotations

import weakref
from functools import lru_cache

import sympy as sp

from ..ir import Node, Op, toposort

_DISPLAY_FUNCS = {Op.SIGMOID: "sigmoid", Op.LOGSIGMOID: "logsigmoid", Op.SOFTPLUS: "softplus", Op.GELU: "gelu",
                  Op.ELU: "elu", Op.SIGN: "sign", Op.SILU: "silu", Op.RELU: "relu", Op.LOG1P: "log1p",
                  Op.EXPM1: "expm1", Op.RSQRT: "rsqrt", Op.LOGADDEXP: "logaddexp"}


class NotElementwise(Exception):
    """The expression cannot be written elementwise in sympy (the message says why)."""


# sympy recurses over its trees (printing, expansion, even the assumptions queried while an
# expression is built): a few hundred levels overflow Python's stack. Expressions deeper or
# bigger than this (an unrolled loop) are not converted: `show` prints them as text and the
# symbolic checks say they were skipped (the float64 spot checks still run).
MAX_SYMPY_DEPTH = 40
MAX_SYMPY_NODES = 400


MAX_TEXT = 160  # characters of an opaque symbol's text; longer ones are cut (and made unique)


def node_text(n: Node) -> str:
    """Source-like text of a (small) node, for opaque symbols. Built sources first (no
    recursion: unrolled loops make long chains) and remembered per node; a text longer than
    MAX_TEXT is cut and given the node's id, so that two different values never share a
    symbol."""
    memo = _TEXTS
    if n in memo:
        return memo[n]
    stack = [(n, False)]
    while stack:
        x, done = stack.pop()
        if x in memo:
            continue
        own = _own_text(x)
        if own is not None:
            memo[x] = own
            continue
        if not done:
            stack.append((x, True))
            stack.extend((s, False) for s in x.srcs if s not in memo)
            continue
        text = _compose(x, [memo[s] for s in x.srcs])
        memo[x] = text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT - 12]}...#{x.id}"
    return memo[n]


# node -> its text; nodes do not change once the analysis reads them, and entries go with them
_TEXTS: "weakref.WeakKeyDictionary[Node, str]" = weakref.WeakKeyDictionary()


def _own_text(n: Node) -> str | None:
    """The text of a node that does not depend on its sources' (leaves, named values)."""
    if n.op in (Op.INPUT, Op.PARAM):
        return n.arg
    if n.op == Op.STATE:
        return n.arg[0] if n.arg[1] == "prev" else f"{n.arg[0]}.{n.arg[1]}"
    if n.op == Op.CONST:
        return f"{n.arg:g}" if not isinstance(n.arg, tuple) else "arange"
    if n.name and (n.op != Op.INDEX or _is_part(n)):
        return n.name
    return n.label


def _is_part(n: Node) -> bool:
    """n is a part of a complex value (recdsl.ir: a param's `z.re`, a local's `w.im`): a
    name with a dot, which no real value of the .rec text has."""
    return bool(n.name) and "." in n.name and not n.name.endswith("'")


def _complex_form(n: Node) -> str | None:
    """How a plan shows a part of a complex value: its name (`Lambda_bar.re`) or the text it
    came from (`exp(L * dt).re`), rather than the real arithmetic it expands to."""
    if n.op in (Op.STATE, Op.PARAM, Op.INPUT, Op.CONST):
        return None
    return n.name if _is_part(n) else n.label


def _compose(n: Node, s: list[str]) -> str:
    if n.op == Op.MATMUL:
        return f"({s[0]} @ {s[1]})"
    if n.op == Op.OUTER:
        return f"outer({s[0]}, {s[1]})"
    if n.op == Op.DOT:
        return f"dot({s[0]}, {s[1]})"
    if n.op == Op.INDEX:
        from ..ir import fmt_arg
        return f"{s[0]}{fmt_arg(n)}"
    if n.op == Op.TRANSPOSE:
        return f"{s[0]}.T"
    if n.op in _INFIX:
        return f"({s[0]} {_INFIX[n.op]} {s[1]})"
    if n.op == Op.NEG:
        return f"-{s[0]}"
    return f"{n.op.name.lower()}({', '.join(s)})"


_INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**"}


def _const(v: float):
    if float(v).is_integer():
        return sp.Integer(int(v))
    r = sp.Rational(repr(float(v)))
    return r if r.q <= 10 ** 6 else sp.Float(v)


def to_sympy(root: Node, variables: dict[int, sp.Symbol], expand_defs: bool,
             depends=lambda n: False):
    """The elementwise expression of root. `variables` maps node ids to symbols (the
    states); `depends(n)` says whether n reads a state (such nodes must be elementwise)."""
    memo: dict[int, sp.Expr] = {}
    order = toposort([root])
    _check_size(order, variables)
    for n in order:
        if n.id in variables:
            memo[n.id] = variables[n.id]
            continue
        if not expand_defs and _complex_form(n):
            # shown by its complex form (`Lambda_bar.re`), not by the real expansion of the
            # complex arithmetic it came from (which runs to hundreds of characters)
            memo[n.id] = sp.Symbol(_complex_form(n), real=True)
            continue
        op = n.op
        if op == Op.EXPAND:
            memo[n.id] = memo[n.srcs[0].id]  # a broadcast: elementwise it is the same value
            continue
        if n.srcs and op == Op.INDEX and all(i is None or (isinstance(i, slice) and i.start is None and i.stop is None)
                                             for i in n.arg):
            memo[n.id] = memo[n.srcs[0].id]  # a broadcast view: elementwise it is the same value
            continue
        elementwise = op in _SYMPY_UNARY or op in _SYMPY_BINARY or op == Op.CONST and not n.shape
        if not elementwise:
            if depends(n):
                raise NotElementwise(f"{node_text(n)} is not elementwise")
            memo[n.id] = sp.Symbol(node_text(n), real=True)
            continue
        if op == Op.CONST:
            memo[n.id] = _const(n.arg)
            continue
        args = [memo[s.id] for s in n.srcs]
        if not expand_defs and op in _DISPLAY_FUNCS:
            memo[n.id] = sp.Function(_DISPLAY_FUNCS[op])(*args)
        elif op in _SYMPY_UNARY:
            memo[n.id] = _SYMPY_UNARY[op](args[0])
        else:
            memo[n.id] = _SYMPY_BINARY[op](*args)
    return memo[root.id]


def _check_size(order: list[Node], variables) -> None:
    """NotElementwise when the sympy tree of the last node of `order` would be too deep or big."""
    depth: dict[int, int] = {}
    count = 0
    for n in order:
        if n.id in variables or not n.srcs:
            depth[n.id] = 0
            continue
        d = max(depth[s.id] for s in n.srcs)
        if n.op in _SYMPY_UNARY or n.op in _SYMPY_BINARY:
            d += 1
            count += 1
        depth[n.id] = d
        if d > MAX_SYMPY_DEPTH or count > MAX_SYMPY_NODES:
            raise NotElementwise(f"the expression is too large for sympy: more than "
                                 f"{MAX_SYMPY_DEPTH if d > MAX_SYMPY_DEPTH else MAX_SYMPY_NODES} "
                                 f"{'levels' if d > MAX_SYMPY_DEPTH else 'operations'}")


_SYMPY_UNARY = {
    Op.NEG: lambda x: -x, Op.EXP: sp.exp, Op.LOG: sp.log, Op.LOG1P: lambda x: sp.log(1 + x),
    Op.EXPM1: lambda x: sp.exp(x) - 1, Op.SIGMOID: lambda x: 1 / (1 + sp.exp(-x)),
    Op.LOGSIGMOID: lambda x: -sp.log(1 + sp.exp(-x)), Op.TANH: sp.tanh,
    Op.SOFTPLUS: lambda x: sp.log(1 + sp.exp(x)), Op.RELU: lambda x: sp.Max(x, 0),
    Op.SILU: lambda x: x / (1 + sp.exp(-x)), Op.GELU: sp.Function("gelu"), Op.ELU: sp.Function("elu"),
    Op.ABS: sp.Abs, Op.SIGN: sp.sign, Op.SQRT: sp.sqrt, Op.RSQRT: lambda x: 1 / sp.sqrt(x),
    Op.SIN: sp.sin, Op.COS: sp.cos,
}
_SYMPY_BINARY = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b, Op.POW: lambda a, b: a ** b, Op.MAX: sp.Max, Op.MIN: sp.Min,
    Op.LOGADDEXP: lambda a, b: sp.log(sp.exp(a) + sp.exp(b)),
}


def show(node: Node | None, default: str = "0") -> str:
    if node is None:
        return default
    try:
        return str(to_sympy(node, {}, expand_defs=False))
    except (NotElementwise, RecursionError):  # too large for sympy: the source-like text
        return node_text(node)


def is_zero(expr) -> bool:
    """expr == 0, proven by sympy (False when not proven, or when sympy gave up)."""
    try:
        e = sp.expand(expr)
        if e == 0:
            return True
        return sp.simplify(e) == 0
    except Exception:  # pragma: no cover - sympy gave up (RecursionError included)
        return False


# --------------------------------------------------------------------------- associativity

@lru_cache(maxsize=None)
def combine_is_associative(kind: str, k: int = 2) -> bool:
    """Prove, with sympy, that the combine operator of a class is associative (and, for the
    affine classes, that it composes the step maps: combine(e1, e2) = e2 after e1)."""
    if kind in ("diagonal", "lowrank", "dense", "block"):
        n = 1 if kind == "diagonal" else k
        As = [sp.Matrix(n, n, lambda i, j, t=t: sp.Symbol(f"A{t}_{i}{j}")) for t in range(3)]
        bs = [sp.Matrix(n, 1, lambda i, j, t=t: sp.Symbol(f"b{t}_{i}")) for t in range(3)]
        h = sp.Matrix(n, 1, lambda i, j: sp.Symbol(f"h{i}"))

        def comb(e1, e2):
            (A1, b1), (A2, b2) = e1, e2
            return (A2 * A1, A2 * b1 + b2)
        e = list(zip(As, bs))
        left, right = comb(comb(e[0], e[1]), e[2]), comb(e[0], comb(e[1], e[2]))
        A12, b12 = comb(e[0], e[1])
        composed = As[1] * (As[0] * h + bs[0]) + bs[1]
        return all(is_zero(x) for x in list(left[0] - right[0]) + list(left[1] - right[1])
                   + list(composed - (A12 * h + b12)))
    if kind == "maxplus":
        a = sp.symbols("a0:3", real=True)
        b = sp.symbols("b0:3", real=True)
        h = sp.Symbol("h", real=True)

        def comb(e1, e2):
            return (e1[0] + e2[0], sp.Max(e1[1] + e2[0], e2[1]))
        e = list(zip(a, b))
        left, right = comb(comb(e[0], e[1]), e[2]), comb(e[0], comb(e[1], e[2]))
        step = lambda x, t: sp.Max(x + a[t], b[t])  # noqa: E731
        c12 = comb(e[0], e[1])
        return (is_zero(left[0] - right[0]) and _distribute_max(left[1]) == _distribute_max(right[1])
                and _distribute_max(step(step(h, 0), 1)) == _distribute_max(sp.Max(h + c12[0], c12[1])))
    if kind == "logsumexp":
        a = sp.symbols("a0:3", real=True)
        b = sp.symbols("b0:3", real=True)
        h = sp.Symbol("h", real=True)
        lae = lambda x, y: sp.log(sp.exp(x) + sp.exp(y))  # noqa: E731

        def comb(e1, e2):
            return (e1[0] + e2[0], lae(e1[1] + e2[0], e2[1]))
        e = list(zip(a, b))
        left, right = comb(comb(e[0], e[1]), e[2]), comb(e[0], comb(e[1], e[2]))
        c12 = comb(e[0], e[1])
        composed = lae(lae(h + a[0], b[0]) + a[1], b[1])
        same = lambda x, y: is_zero(sp.expand(sp.exp(x), power_exp=True) - sp.expand(sp.exp(y), power_exp=True))  # noqa
        return is_zero(left[0] - right[0]) and same(left[1], right[1]) and same(composed, lae(h + c12[0], c12[1]))
    if kind in ("dense-maxplus", "dense-logsumexp"):
        return _dense_semiring_associative(kind.split("-")[1], k)
    raise ValueError(kind)


def _dense_semiring_associative(kind: str, k: int) -> bool:
    """The dense semiring step h'[i] = (+)_j (h[j] (x) A[j, i]) (x) b[i], (+) = max or
    logsumexp, (x) = +, on k x k symbols: (1) it is the semiring matrix-vector product with
    M = A + b[None, :] (b folds into the matrix); (2) the combine M1 (x) M2 (semiring matrix
    product, earlier on the left) is associative; (3) it composes steps:
    step(step(h, M1), M2) == step(h, M1 (x) M2)."""
    def mat(name):
        return sp.Matrix(k, k, lambda i, j: sp.Symbol(f"{name}_{i}{j}", real=True))
    M = [mat(f"M{t}") for t in range(3)]
    A = mat("A")
    b = [sp.Symbol(f"b_{i}", real=True) for i in range(k)]
    h = [sp.Symbol(f"h_{i}", real=True) for i in range(k)]
    if kind == "maxplus":
        plus = lambda xs: sp.Max(*xs)   # noqa: E731
        same = lambda x, y: _distribute_max(x) == _distribute_max(y)   # noqa: E731
    else:
        plus = lambda xs: sp.log(sum(sp.exp(x) for x in xs))   # noqa: E731

        def same(x, y):
            return is_zero(sp.expand(sp.exp(x), power_exp=True) - sp.expand(sp.exp(y), power_exp=True))

    def mul(X, Y):
        return sp.Matrix(k, k, lambda j, i: plus([X[j, l] + Y[l, i] for l in range(k)]))

    def step(v, X):
        return [plus([v[j] + X[j, i] for j in range(k)]) for i in range(k)]
    folded = sp.Matrix(k, k, lambda j, i: A[j, i] + b[i])
    written = [plus([h[j] + A[j, i] for j in range(k)]) + b[i] for i in range(k)]
    if not all(same(x, y) for x, y in zip(written, step(h, folded))):
        return False
    left, right = mul(mul(M[0], M[1]), M[2]), mul(M[0], mul(M[1], M[2]))
    if not all(same(left[j, i], right[j, i]) for j in range(k) for i in range(k)):
        return False
    return all(same(x, y) for x, y in zip(step(step(h, M[0]), M[1]), step(h, mul(M[0], M[1]))))


def _distribute_max(e):
    """Push additions into Max (Max(x, y) + z -> Max(x + z, y + z)) until none is left."""
    while True:
        new = e.replace(lambda x: x.is_Add and any(isinstance(t, sp.Max) for t in x.args),
                        lambda x: _push(x))
        if new == e:
            return sp.Max(*sorted(new.args, key=str)) if isinstance(new, sp.Max) else new
        e = new


def _push(add):
    mx = next(t for t in add.args if isinstance(t, sp.Max))
    rest = add - mx
    return sp.Max(*[arg + rest for arg in mx.args])


# --------------------------------------------------------------------------- numeric

def random_leaves(leaves: list[Node], shape_of, batch: int = 3, seed: int = 0) -> list:
    """Positive random values in [0.1, 1) (logs and square roots stay defined), with one
    batch axis, float64."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in leaves:
        shape = (batch,) + tuple(shape_of(n))
        out.append(torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.1)
    return out


def lift(t, rank: int):
    """A value with one batch axis lifted to `rank` node axes (new axes after the batch)."""
    import torch
    if not isinstance(t, torch.Tensor):
        return t
    while t.dim() < 1 + rank:
        t = t.unsqueeze(1)
    return t


def max_err(a, b) -> float:
    import torch
    a, b = torch.broadcast_tensors(a.to(torch.float64), b.to(torch.float64))
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.any()):
        return 0.0 if bool((a == b).all()) else float("inf")
    if bool((torch.isfinite(a) != torch.isfinite(b)).any()):
        return float("inf")
    return float((a[finite] - b[finite]).abs().max())
