"""The builtin functions of the .rec language: one table, read by the checker (shape
rules), the docs (`recdsl builtins`) and later by the IR lowering.

`rule` names the shape rule in recdsl/checker.py:
    unary     same shape as the argument
    bcast     numpy broadcasting of all arguments
    where     bcast, first argument a mask
    reduce    drops `axis` (default -1, the last; axis=None reduces everything)
    lastaxis  same shape, works along the last axis (rank >= 1)
    special   a rule of its own (checker method `_call_<name>`)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    name: str
    nargs: tuple[int, int]          # (min, max) positional arguments; max -1 = any
    rule: str
    kwargs: tuple[str, ...] = ()
    doc: str = ""


def _table(*rows: Builtin) -> dict[str, Builtin]:
    return {b.name: b for b in rows}


UNARY_MATH = ("exp log log1p expm1 sigmoid logsigmoid tanh softplus relu silu gelu elu abs sign "
              "sqrt rsqrt sin cos").split()

BUILTINS = _table(
    *(Builtin(n, (1, 1), "unary", doc="elementwise") for n in UNARY_MATH),
    Builtin("max", (2, 2), "bcast", doc="elementwise maximum of two values (amax reduces)"),
    Builtin("min", (2, 2), "bcast", doc="elementwise minimum of two values"),
    Builtin("logaddexp", (2, 2), "bcast", doc="log(exp(a) + exp(b)), stable"),
    Builtin("clamp", (3, 3), "bcast", doc="clamp(x, lo, hi)"),
    Builtin("where", (3, 3), "where", doc="where(mask, a, b)"),
    Builtin("sum", (1, 1), "reduce", ("axis",), doc="sum over axis (default the last)"),
    Builtin("mean", (1, 1), "reduce", ("axis",), doc="mean over axis (default the last)"),
    Builtin("amax", (1, 1), "reduce", ("axis",), doc="maximum over axis (default the last)"),
    Builtin("logsumexp", (1, 1), "reduce", ("axis",), doc="log-sum-exp over axis, stable"),
    Builtin("norm", (1, 1), "reduce", ("axis",), doc="Euclidean norm over axis (default the last)"),
    Builtin("l2norm", (1, 1), "lastaxis", doc="x / norm(x) along the last axis (eps 1e-6)"),
    Builtin("rmsnorm", (1, 1), "lastaxis", doc="x / sqrt(mean(x*x) + 1e-6) along the last axis"),
    Builtin("layernorm", (1, 1), "lastaxis", doc="(x - mean) / std along the last axis, no affine (extension)"),
    Builtin("softmax", (1, 1), "lastaxis", doc="softmax along the last axis (extension)"),
    Builtin("outer", (2, 2), "special", doc="[m], [n] -> [m, n]"),
    Builtin("dot", (2, 2), "special", doc="[n], [n] -> []"),
    Builtin("eye", (1, 1), "special", doc="identity matrix [n, n]"),
    Builtin("diag", (1, 1), "special", doc="[n] -> diagonal matrix [n, n]"),
    Builtin("split", (2, 2), "special", doc="split(x, n): n equal parts of the last axis"),
    Builtin("concat", (1, -1), "special", doc="concatenate along the last axis"),
    Builtin("reshape", (2, 2), "special", doc="reshape(x, [d1, d2, ...])"),
    Builtin("arange", (1, 2), "special", doc="arange(n) or arange(a, b): a constant vector"),
    Builtin("sum_in", (1, 1), "special", doc="sum over the node's incoming edges (over dag)"),
)

# Initialisers of `param NAME[...] ~ dist(...)`.
DISTRIBUTIONS = {"normal": ("mean", "std"), "uniform": ("low", "high")}

OVER_KINDS = ("seq", "grid2d", "dag")
NEIGHBOURS = {"grid2d": ("left", "up"), "seq": ("prev",)}

# Words the language gives a meaning to; they cannot name a value.
LANGUAGE_KEYWORDS = {"cell", "input", "param", "state", "edge", "pair", "output", "heads", "over",
                     "for", "in", "on", "None", "range"}
