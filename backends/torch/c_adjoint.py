"""The adjoint of each elementwise op in C: what a reverse-time C loop adds to each source's
adjoint, given the op's output adjoint `g`, its sources' values and its own value.

The rules are the torch backend's meaning of each op (torch's derivative formulas, ties
and kinks included: relu'(0) = 0, max splits a tie in half, softplus is linear above 20,
pow's exponent gradient is 0 where the base is 0), so a C backward returns the numbers
autograd through the per-step torch loop returns. Everything is an expression in C
macros the generated file defines per precision (EXP, LOG, ERF, ONE, T_, ...)."""
from __future__ import annotations

from recdsl.ir import COMPARE, Op

# op -> the source's adjoint term for a unary op, from (x: source, y: value, g: adjoint)
_UNARY = {
    Op.NEG: "(-{g})",
    Op.EXP: "({g} * {y})",
    Op.LOG: "({g} / {x})",
    Op.LOG1P: "({g} / (ONE + {x}))",
    Op.EXPM1: "({g} * ({y} + ONE))",
    Op.SIGMOID: "({g} * {y} * (ONE - {y}))",
    Op.TANH: "({g} * (ONE - {y} * {y}))",
    Op.ABS: "({x} > 0 ? {g} : ({x} < 0 ? -{g} : (T_)0))",
    Op.SQRT: "({g} / ((T_)2 * {y}))",
    Op.RSQRT: "((T_)-0.5 * {g} * {y} / {x})",
    Op.SIN: "({g} * COS({x}))",
    Op.COS: "(-{g} * SIN({x}))",
    Op.RELU: "({x} > 0 ? {g} : (T_)0)",
    Op.SILU: "({g} * SIGM({x}) * (ONE + {x} * (ONE - SIGM({x}))))",
    Op.LOGSIGMOID: "({g} * SIGM(-({x})))",
    Op.SOFTPLUS: "({x} > 20 ? {g} : {g} * SIGM({x}))",
    Op.ELU: "({x} > 0 ? {g} : {g} * ({y} + ONE))",
    Op.GELU: "({g} * ((T_)0.5 * (ONE + ERF({x} * (T_)0.70710678118654752))"
             " + {x} * EXP((T_)-0.5 * {x} * {x}) * (T_)0.39894228040143268))",
}

# op -> (first source's term, second source's term), from (a, b: sources, y: value, g)
_BINARY = {
    Op.ADD: ("{g}", "{g}"),
    Op.SUB: ("{g}", "(-{g})"),
    Op.MUL: ("({g} * {b})", "({g} * {a})"),
    Op.DIV: ("({g} / {b})", "(-{g} * {y} / {b})"),
    Op.POW: ("({b} == 0 ? (T_)0 : {g} * {b} * POW({a}, {b} - ONE))",
             "({a} == 0 && {b} >= 0 ? (T_)0 : {g} * {y} * LOG({a}))"),
    # torch.maximum / minimum: a tie sends half the gradient to each side
    Op.MAX: ("({a} > {b} ? {g} : ({a} == {b} ? (T_)0.5 * {g} : (T_)0))",
             "({b} > {a} ? {g} : ({a} == {b} ? (T_)0.5 * {g} : (T_)0))"),
    Op.MIN: ("({a} < {b} ? {g} : ({a} == {b} ? (T_)0.5 * {g} : (T_)0))",
             "({b} < {a} ? {g} : ({a} == {b} ? (T_)0.5 * {g} : (T_)0))"),
    Op.LOGADDEXP: ("({g} / (ONE + EXP({b} - {a})))", "({g} / (ONE + EXP({a} - {b})))"),
}



def source_terms(op: Op, srcs: list[str], y: str, g: str) -> list[str | None]:
    """Per source of an op with value y and adjoint g, the C term added to its adjoint (None:
    no gradient flows there -- comparisons, sign, a where's condition)."""
    if op in _UNARY:
        return [_UNARY[op].format(x=srcs[0], y=y, g=g)]
    if op in _BINARY:
        a, b = srcs
        return [t.format(a=a, b=b, y=y, g=g) for t in _BINARY[op]]
    if op in COMPARE or op == Op.SIGN:
        return [None] * len(srcs)
    if op == Op.WHERE:
        c = srcs[0]
        return [None, f"({c} ? {g} : (T_)0)", f"({c} ? (T_)0 : {g})"]
    if op == Op.INDEX:
        return [g]
    raise KeyError(op)
