"""AST -> .rec source. `parse(to_source(tree)) == tree` for every tree the parser makes.

Parentheses are printed only where precedence needs them, so printed cells read like
hand-written ones."""
from __future__ import annotations

from . import ast as A

# Binding strength, as in Python: higher binds tighter.
PRECEDENCE = {"compare": 1, "+": 2, "-": 2, "*": 3, "/": 3, "@": 3, "unary": 4, "**": 5, "postfix": 6}
INDENT = "    "


def to_source(node: A.Node) -> str:
    if isinstance(node, A.Module):
        return "\n\n".join(_cell(c) for c in node.cells) + "\n"
    if isinstance(node, A.Cell):
        return _cell(node) + "\n"
    if isinstance(node, A.Expr):
        return expr(node)
    return "\n".join(_item(node, ""))


def _cell(c: A.Cell) -> str:
    args = ", ".join(a.name if a.default is None else f"{a.name}={expr(a.default)}" for a in c.args)
    where = " where " + ", ".join(_constraint(k) for k in c.where) if c.where else ""
    lines = [f"cell {c.name}({args}){where}:"]
    if c.doc is not None:
        lines.extend(_docstring(c.doc))
    for item in c.items:
        lines.extend(_item(item, INDENT))
    return "\n".join(lines)


def _constraint(k: A.Constraint) -> str:
    parts = [expr(k.operands[0])]
    for op, e in zip(k.ops, k.operands[1:]):
        parts += [op, expr(e)]
    return " ".join(parts)


def _docstring(doc: str) -> list[str]:
    if "\n" not in doc and not doc.endswith('"'):
        return [INDENT + '"""' + doc + '"""']
    # On lines of their own, so that the parser's stripping of the common indentation (and of
    # the surrounding blank space) gives back exactly `doc`, and a closing quote of the text
    # does not run into the closing """.
    return [INDENT + '"""'] + [(INDENT + ln) if ln else ln for ln in doc.split("\n")] + [INDENT + '"""']


def _item(item: A.Node, ind: str) -> list[str]:
    if isinstance(item, A.Heads):
        return [f"{ind}heads {expr(item.count)}"]
    if isinstance(item, A.Over):
        return [f"{ind}over {item.kind}"]
    if isinstance(item, A.Decl):
        return [f"{ind}{item.kind:<6} " + ", ".join(_decl_var(v) for v in item.vars)]
    if isinstance(item, A.Assign):
        return [ind + ", ".join(_target(t) for t in item.targets) + " = " + expr(item.value)]
    if isinstance(item, A.Output):
        named = f"{item.name} = " if item.name is not None else ""
        return [f"{ind}output {named}{expr(item.value)}"]
    if isinstance(item, A.For):
        head = f"{ind}for {item.var} in {item.func}({', '.join(_arg(a) for a in item.args)}):"
        return [head] + [line for s in item.body for line in _item(s, ind + INDENT)]
    raise TypeError(f"cannot print {type(item).__name__}")


def _decl_var(v: A.DeclVar) -> str:
    out = f"{v.name}[{', '.join(expr(d) for d in v.shape)}]"
    if v.complex:
        out += " complex"
    if v.on_edge:
        out += " on edge"
    if isinstance(v.init, A.RandomInit):
        out += f" ~ {v.init.dist}({', '.join(_arg(a) for a in v.init.args)})"
    elif isinstance(v.init, A.ValueInit):
        out += f" = {expr(v.init.value)}"
    return out


def _target(t: A.Expr) -> str:
    return t.id + "'" if isinstance(t, A.Primed) else t.id


def _arg(a: A.Node) -> str:
    return f"{a.name}={expr(a.value)}" if isinstance(a, A.Keyword) else expr(a)


def _prec(e: A.Expr) -> int:
    if isinstance(e, A.BinOp):
        return PRECEDENCE[e.op]
    if isinstance(e, A.Compare):
        return PRECEDENCE["compare"]
    if isinstance(e, A.UnaryOp):
        return PRECEDENCE["unary"]
    return PRECEDENCE["postfix"]


def expr(e: A.Expr) -> str:
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Primed):
        return e.id + "'"
    if isinstance(e, (A.Num, A.Imag)):
        return e.text
    if isinstance(e, A.NoneLit):
        return "None"
    if isinstance(e, A.BinOp):
        p = PRECEDENCE[e.op]
        if e.op == "**":  # right-associative; the exponent is a unary-level factor
            return f"{_wrap(e.left, p + 1)} ** {_wrap(e.right, PRECEDENCE['unary'])}"
        return f"{_wrap(e.left, p)} {e.op} {_wrap(e.right, p + 1)}"
    if isinstance(e, A.Compare):
        p = PRECEDENCE["compare"]
        return f"{_wrap(e.left, p + 1)} {e.op} {_wrap(e.right, p + 1)}"
    if isinstance(e, A.UnaryOp):
        return e.op + _wrap(e.operand, PRECEDENCE["unary"])
    if isinstance(e, A.Call):
        return f"{e.func}({', '.join([expr(a) for a in e.args] + [_arg(k) for k in e.kwargs])})"
    if isinstance(e, A.Index):
        return f"{_wrap(e.value, PRECEDENCE['postfix'])}[{', '.join(_sub(s) for s in e.subs)}]"
    if isinstance(e, A.Attr):
        # `2.T` would lex as the number `2.` and the name T
        value = f"({expr(e.value)})" if isinstance(e.value, (A.Num, A.Imag)) else _wrap(e.value, PRECEDENCE['postfix'])
        return f"{value}.{e.attr}"
    if isinstance(e, A.ListExpr):
        return "[" + ", ".join(expr(i) for i in e.items) + "]"
    raise TypeError(f"cannot print {type(e).__name__}")


def _wrap(e: A.Expr, need: int) -> str:
    s = expr(e)
    return f"({s})" if _prec(e) < need else s


def _sub(s: A.Node) -> str:
    if isinstance(s, A.Slice):
        return (expr(s.lo) if s.lo else "") + ":" + (expr(s.hi) if s.hi else "")
    return expr(s)
