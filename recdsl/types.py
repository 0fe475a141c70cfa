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
    __slots__ = ("terms", "_hash")

    def __init__(self, terms: dict[tuple[str, ...], Fraction] | None = None):
        self.terms = {m: Fraction(c) for m, c in (terms or {}).items() if c != 0}
        self._hash = None       # terms never change after construction: hashed once (shape memo keys)

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

    @property
    def degree(self) -> int:
        return max((len(m) for m in self.terms), default=0)

    def substitute(self, mapping: dict[str, "Dim"]) -> "Dim":
        """The polynomial with each name in mapping replaced by its Dim."""
        out = Dim()
        for m, c in self.terms.items():
            prod = Dim.const(c)
            for n in m:
                prod = prod * mapping.get(n, Dim.sym(n))
            out = out + prod
        return out

    def split_signs(self) -> tuple["Dim", "Dim"]:
        """(A, B) with self == A - B, A the terms with positive and B those with negative
        coefficients (negated): `M - P - 1` -> (M, P + 1)."""
        pos = Dim({m: c for m, c in self.terms.items() if c > 0})
        neg = Dim({m: -c for m, c in self.terms.items() if c < 0})
        return pos, neg

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

    def __reduce__(self):
        return (Dim, (self.terms,))     # not the cached hash: str hashes differ between processes

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self.terms.items()))
        return self._hash

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
    DAG, whether it varies per out-edge (an edge input read outside sum_in, a pair input);
    is_complex: a complex value (lowered to a pair of real values, docs/LANGUAGE.md)."""
    shape: tuple[Dim, ...] = ()
    is_bool: bool = False
    per_edge: bool = False
    is_complex: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        s = "[" + ", ".join(str(d) for d in self.shape) + "]"
        return s + " bool" if self.is_bool else s + " complex" if self.is_complex else s


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


# --------------------------------------------------------------------------- facts about dims

class DimFacts:
    """What is known about the sizes of a cell's dimensions: each is an integer at least its
    lower bound (1, or 0 for a dimension the cell's `where` clause allows to be 0), and every
    polynomial of `facts` is >= 0 (the `where` clause, each comparison as `g >= 0`, a strict
    one as `g - 1 >= 0`, an equality as two).

    `nonneg(p)` proves p >= 0 for every such size, soundly but not completely: p's
    coefficients are all >= 0 once every name is written as its lower bound plus a
    non-negative variable, or p is such a polynomial plus a non-negative combination of the
    facts (and, for a polynomial of degree 2 or more, of their pairwise products and their
    products with the names), found by an exact simplex. Small and exact (Fractions): the
    check path stays fast."""

    def __init__(self, lower: dict[str, int] | None = None, facts: list[Dim] | None = None):
        self.lower = dict(lower or {})
        self.facts = [f for f in (facts or []) if f.terms]
        self._memo: dict = {}

    def low(self, name: str) -> int:
        return self.lower.get(name, 1)

    def _shift(self, p: Dim) -> Dim:
        return p.substitute({n: Dim.sym(n) + Dim.const(self.low(n)) for n in p.names if self.low(n)})

    def nonneg(self, p: Dim) -> bool:
        """p >= 0 for every size the facts allow."""
        key = frozenset(p.terms.items())
        if key not in self._memo:
            self._memo[key] = self._prove(p)
        return self._memo[key]

    def positive(self, p: Dim) -> bool:
        return self.nonneg(p - ONE)

    def negative(self, p: Dim) -> bool:
        return self.nonneg(-p - ONE)

    def le(self, a: Dim, b: Dim) -> bool:
        return self.nonneg(b - a)

    def lt(self, a: Dim, b: Dim) -> bool:
        return self.nonneg(b - a - ONE)

    def _prove(self, p: Dim) -> bool:
        sp = self._shift(p)
        if all(c >= 0 for c in sp.terms.values()):
            return True
        if not self.facts:
            return False
        gens = [self._shift(f) for f in self.facts]
        if p.degree >= 2:
            names = sorted(p.names.union(*(f.names for f in self.facts)))
            base = list(gens)
            gens += [a * b for i, a in enumerate(base) for b in base[i:]]
            gens += [g * Dim.sym(n) for g in base for n in names]
        return _cone_contains(sp, gens)


def _cone_contains(p: Dim, gens: list[Dim]) -> bool:
    """Is there lam >= 0 with every coefficient of p - sum(lam_j gens_j) >= 0? (An LP, as
    A lam + s = b with lam, s >= 0: one row per monomial; phase one of the simplex.)"""
    monos = sorted(set(p.terms).union(*(g.terms for g in gens)), key=lambda m: (len(m), m))
    A = [[g.terms.get(m, Fraction(0)) for g in gens] for m in monos]
    b = [p.terms.get(m, Fraction(0)) for m in monos]
    rows = len(monos)
    # slack columns: one per row
    full = [A[i] + [Fraction(1) if k == i else Fraction(0) for k in range(rows)] for i in range(rows)]
    return _feasible(full, b)


def _feasible(A: list[list[Fraction]], b: list[Fraction], max_pivots: int = 500) -> bool:
    """Whether A x = b has a solution x >= 0 (phase one of the simplex, exact, Bland's rule)."""
    m = len(A)
    if m == 0:
        return True
    n = len(A[0])
    tab = []
    for i in range(m):
        row, bi = list(A[i]), b[i]
        if bi < 0:
            row, bi = [-x for x in row], -bi
        tab.append(row + [Fraction(int(k == i)) for k in range(m)] + [bi])
    basis = [n + i for i in range(m)]
    total = n + m
    # the sum of the artificials, w = w0 + sum d_j x_j over the non-artificial columns; obj[-1] = -w0
    obj = [Fraction(0)] * (total + 1)
    for row in tab:
        for j in range(total + 1):
            if not n <= j < total:
                obj[j] -= row[j]
    for _ in range(max_pivots):
        enter = next((j for j in range(total) if obj[j] < 0), None)
        if enter is None:
            break
        best = None
        for i in range(m):
            if tab[i][enter] > 0:
                r = tab[i][-1] / tab[i][enter]
                if best is None or r < best[0] or (r == best[0] and basis[i] < basis[best[1]]):
                    best = (r, i)
        if best is None:  # pragma: no cover - phase one is bounded below by 0
            break
        r = best[1]
        piv = tab[r][enter]
        tab[r] = [x / piv for x in tab[r]]
        for i in range(m):
            if i != r and tab[i][enter] != 0:
                f = tab[i][enter]
                tab[i] = [x - f * y for x, y in zip(tab[i], tab[r])]
        f = obj[enter]
        obj = [x - f * y for x, y in zip(obj, tab[r])]
        basis[r] = enter
    else:
        return False
    return obj[-1] == 0


def needed(p: Dim) -> str:
    """`p >= 0` written as a comparison a user would put in a `where` clause:
    M - P -> "P <= M", M - P - 1 -> "P < M", P - 1 -> "P >= 1"."""
    a, b = p.split_signs()
    if not b.terms:
        return f"{a} >= 0"
    if not a.terms:
        return f"{b} <= 0"
    if b.constant is not None:
        return f"{a} >= {b}"
    if a.constant is not None:
        return f"{b} <= {a}"
    c = b.terms.get((), Fraction(0))
    if c >= 1 and c.denominator == 1:
        return f"{b - ONE} < {a}"
    return f"{b} <= {a}"
