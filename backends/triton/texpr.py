"""The Triton meaning of the IR's elementwise ops, and their derivatives.

Inside a kernel every value of a fused region is a tile of one shape (the leaves are
loaded already broadcast), so an elementwise node is one expression over its sources'
names. `vjp(node, g, names)` gives, per source, the expression of its adjoint
contribution: the backward kernels are derived from the same IR by these rules, never
written per cell. Helpers (`_sigmoid`, `_log1p`, ...) are `@triton.jit` functions of the
generated module's preamble (PREAMBLE), written for accuracy in fp32."""
from __future__ import annotations

from recdsl.ir import COMPARE, Node, Op
from recdsl.torch_expr import const_text

PREAMBLE = '''\
@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflow for large |x|
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1p(x):
    # log(1 + x) keeping the digits of small x (the series where 1 + x rounds)
    u = 1.0 + x
    return tl.where(tl.abs(x) < 1e-4, x - 0.5 * x * x, tl.log(u) - ((u - 1.0) - x) / u)


@triton.jit
def _expm1(x):
    return tl.where(tl.abs(x) < 1e-5, x + 0.5 * x * x, tl.exp(x) - 1.0)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1), evaluated on |x| so that nothing overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    m = tl.where(m == float("-inf"), 0.0, m)  # both -inf: stay -inf, not nan
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _pow(a, b):
    # a ** b for a > 0, and integer b for any a (the cases cells write: x**2, x**0.5)
    r = tl.exp(b * tl.log(tl.abs(a)))
    odd = (tl.abs(b) % 2.0) == 1.0
    return tl.where(a < 0, tl.where(odd, -r, r), tl.where(a == 0, tl.where(b == 0, 1.0, 0.0), r))
'''

UNARY = {
    Op.NEG: "(-{0})", Op.EXP: "tl.exp({0})", Op.LOG: "tl.log({0})", Op.LOG1P: "_log1p({0})",
    Op.EXPM1: "_expm1({0})", Op.SIGMOID: "_sigmoid({0})", Op.LOGSIGMOID: "_logsigmoid({0})",
    Op.TANH: "_tanh({0})", Op.SOFTPLUS: "_softplus({0})", Op.RELU: "tl.maximum({0}, 0.0)",
    Op.SILU: "({0} * _sigmoid({0}))", Op.GELU: "_gelu({0})",
    Op.ELU: "tl.where({0} > 0, {0}, _expm1(tl.minimum({0}, 0.0)))", Op.ABS: "tl.abs({0})",
    Op.SIGN: "_sign({0})", Op.SQRT: "tl.sqrt({0})", Op.RSQRT: "(1.0 / tl.sqrt({0}))",
    Op.SIN: "tl.sin({0})", Op.COS: "tl.cos({0})",
}
BINARY = {
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.DIV: "({0} / {1})",
    Op.POW: "_pow({0}, {1})", Op.MAX: "tl.maximum({0}, {1})", Op.MIN: "tl.minimum({0}, {1})",
    Op.LOGADDEXP: "_logaddexp({0}, {1})",
    Op.LT: "({0} < {1})", Op.LE: "({0} <= {1})", Op.GT: "({0} > {1})", Op.GE: "({0} >= {1})",
    Op.EQ: "({0} == {1})", Op.NE: "({0} != {1})",
}
FUSABLE = set(UNARY) | set(BINARY) | {Op.WHERE}


def fusable(n: Node) -> bool:
    return n.op in FUSABLE


def literal(n: Node) -> str | None:
    """A scalar constant as a Triton literal, else None."""
    if n.op == Op.CONST and not n.shape:
        return const_text(n)
    return None


def expr(n: Node, name) -> str:
    """The expression of an elementwise node; `name(src)` names a source's value."""
    args = [name(s) for s in n.srcs]
    if n.op in UNARY:
        return UNARY[n.op].format(*args)
    if n.op in BINARY:
        text = BINARY[n.op].format(*args)
        return text
    if n.op == Op.WHERE:
        return f"tl.where({args[0]}, {args[1]}, {args[2]})"
    raise NotImplementedError(n.op)


def vjp(n: Node, g: str, name, out: str) -> list[str | None]:
    """Per source of n, the expression of its adjoint contribution given the adjoint `g` of
    n (None where the source gets none: comparisons, masks, constants). `out` names n's
    value (rules reuse it: d exp = exp)."""
    s = [name(x) for x in n.srcs]
    op = n.op
    if op in COMPARE or op == Op.SIGN:
        return [None] * len(n.srcs)
    rules = {
        Op.NEG: lambda: [f"(-{g})"],
        Op.EXP: lambda: [f"({g} * {out})"],
        Op.LOG: lambda: [f"({g} / {s[0]})"],
        Op.LOG1P: lambda: [f"({g} / (1.0 + {s[0]}))"],
        Op.EXPM1: lambda: [f"({g} * ({out} + 1.0))"],
        Op.SIGMOID: lambda: [f"({g} * {out} * (1.0 - {out}))"],
        Op.LOGSIGMOID: lambda: [f"({g} * _sigmoid(-{s[0]}))"],
        Op.TANH: lambda: [f"({g} * (1.0 - {out} * {out}))"],
        Op.SOFTPLUS: lambda: [f"({g} * _sigmoid({s[0]}))"],
        Op.RELU: lambda: [f"tl.where({s[0]} > 0, {g}, 0.0)"],
        Op.SILU: lambda: [f"({g} * _sigmoid({s[0]}) * (1.0 + {s[0]} * (1.0 - _sigmoid({s[0]}))))"],
        Op.GELU: lambda: [f"({g} * (0.5 * (1.0 + tl.erf({s[0]} * 0.7071067811865476)) + {s[0]} * "
                          f"tl.exp(-0.5 * {s[0]} * {s[0]}) * 0.3989422804014327))"],
        Op.ELU: lambda: [f"tl.where({s[0]} > 0, {g}, {g} * ({out} + 1.0))"],
        Op.ABS: lambda: [f"({g} * _sign({s[0]}))"],
        Op.SQRT: lambda: [f"({g} * 0.5 / {out})"],
        Op.RSQRT: lambda: [f"({g} * -0.5 * {out} * {out} * {out})"],
        Op.SIN: lambda: [f"({g} * tl.cos({s[0]}))"],
        Op.COS: lambda: [f"(-{g} * tl.sin({s[0]}))"],
        Op.ADD: lambda: [g, g],
        Op.SUB: lambda: [g, f"(-{g})"],
        Op.MUL: lambda: [f"({g} * {s[1]})", f"({g} * {s[0]})"],
        Op.DIV: lambda: [f"({g} / {s[1]})", f"(-{g} * {out} / {s[1]})"],
        Op.POW: lambda: [f"({g} * {s[1]} * _pow({s[0]}, {s[1]} - 1.0))", f"({g} * {out} * tl.log({s[0]}))"],
        # ties go to the first argument (torch splits them; ties have measure zero in practice)
        Op.MAX: lambda: [f"tl.where({s[0]} >= {s[1]}, {g}, 0.0)", f"tl.where({s[0]} >= {s[1]}, 0.0, {g})"],
        Op.MIN: lambda: [f"tl.where({s[0]} <= {s[1]}, {g}, 0.0)", f"tl.where({s[0]} <= {s[1]}, 0.0, {g})"],
        Op.LOGADDEXP: lambda: [f"({g} * tl.exp({s[0]} - {out}))", f"({g} * tl.exp({s[1]} - {out}))"],
        Op.WHERE: lambda: [None, f"tl.where({s[0]}, {g}, 0.0)", f"tl.where({s[0]}, 0.0, {g})"],
    }
    res = rules[op]()
    # a constant source needs no adjoint; neither does a boolean one
    return [None if (x.op == Op.CONST or x.is_bool) else r for x, r in zip(n.srcs, res)]
