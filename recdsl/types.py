"""Symbolic dimensions and the static type of an expression.

A `Dim` is a polynomial with integer coefficients over the cell's dimension names
(`4*H`, `N + 1`, `K*V`). Two dims are equal when their polynomials are; distinct
names are distinct sizes (K and V may coincide at instantiation, but a cell that relies
on it is rejected, as it would break for other sizes). Small and exact: no sympy on the
parse/check path, which must stay fast."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


class Dim:
    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[str, ...], Fraction] | None = None):
        self.terms = {m: Fraction(c) for m, c in (terms or {}).items() if c != 0}

    @staticmethod
    def const(n: int | Fraction) -> "Dim":
        return Dim({(): Fraction(n)})

    @staticmethod
    def sym(name: str) -> "Dim":
        return Dim({(name,): Fraction(1)})

    # --- arithmetic ---
    def __add__(self, other: "Dim") -> "Dim":
        out = dict(self.terms)
        for m, c in other.terms.items():
            out[m] = out.get(m, 0) + c
        return Dim(out)

    def __neg__(self) -> "Dim":
        return Dim({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other)

    def __mul__(self, other: "Dim") -> "Dim":
        out: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return Dim(out)

    def divide(self, n: int) -> "Dim | None":
        """self / n when every coefficient is divisible by n, else None."""
        if any((c / n).denominator != 1 for c in self.terms.values()):
            return None
        return Dim({m: c / n for m, c in self.terms.items()})

    # --- queries ---
    @property
    def constant(self) -> int | None:
        """The value if the dim has no names in it."""
        if not self.terms:
            return 0
        if list(self.terms) == [()]:
            c = self.terms[()]
            return int(c) if c.denominator == 1 else None
        return None

    @property
    def sign(self) -> int | None:
        """1 / -1 when the dim is positive / negative for every size of its names (all sizes
        are >= 1), 0 when it is zero, None when that depends on the sizes."""
        if not self.terms:
            return 0
        coeffs = list(self.terms.values())
        if all(c >= 0 for c in coeffs):
            return 1
        if all(c <= 0 for c in coeffs):
            return -1
        return None

    @property
    def names(self) -> set[str]:
        return {n for m in self.terms for n in m}

    def evaluate(self, values: dict[str, int]) -> int:
        total = Fraction(0)
        for m, c in self.terms.items():
            prod = Fraction(c)
            for n in m:
                prod *= values[n]
            total += prod
        if total.denominator != 1:
            raise ValueError(f"{self} is not an integer for {values}")
        return int(total)

    def __eq__(self, other) -> bool:
        if isinstance(other, int):
            other = Dim.const(other)
        return isinstance(other, Dim) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(frozenset(self.terms.items()))

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda mc: (-len(mc[0]), mc[0])):
            mono = "*".join(m)
            if not m:
                s = str(c)
            elif c == 1:
                s = mono
            elif c == -1:
                s = "-" + mono
            else:
                s = f"{c}*{mono}"
            parts.append(s)
        out = parts[0]
        for p in parts[1:]:
            out += f" - {p[1:]}" if p.startswith("-") else f" + {p}"
        return out

    __repr__ = __str__


ONE = Dim.const(1)


@dataclass(frozen=True)
class Type:
    """The static type of a value: a shape of Dims, whether it is a mask (bool), and, over a
    DAG, whether it varies per out-edge (an edge input read outside sum_in, a pair input)."""
    shape: tuple[Dim, ...] = ()
    is_bool: bool = False
    per_edge: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        s = "[" + ", ".join(str(d) for d in self.shape) + "]"
        return s + " bool" if self.is_bool else s


SCALAR = Type(())


@dataclass(frozen=True)
class TupleType:
    """What split(...) returns: only good for unpacking."""
    items: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.items) + ")"


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def broadcast(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...] | None:
    """numpy broadcasting of two symbolic shapes, or None if they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else ONE
        y = b[-i] if i <= len(b) else ONE
        if x == y or y == ONE:
            out.append(x)
        elif x == ONE:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))
