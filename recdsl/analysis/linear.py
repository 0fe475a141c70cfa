"""Abstract interpretation of the IR with respect to one stage's states.

Three small domains, each a function from IR node to an abstract value, memoised:

- `degree`: 0 (free of the stage's states), 1 (affine in them), 2 (nonlinear).
- `affine_form`: for degree-1 nodes, the value as a sum of *terms* plus a free offset.
  A term says how the node depends on one state:
      diag      scale ⊙ s                     (elementwise decay; scale free, broadcastable)
      contract  scale ⊙ (w @ s)               (a vector read out of a matrix state)
      lowrank   scale ⊙ outer(u, w @ s)       (rank-1 left update, as in the delta rule)
      dense     any other linear map          (with the construct that made it so)
  Composition rules follow the algebra: w @ (a ⊙ S) with scalar a is a contraction,
  outer(u, scale ⊙ w@S) is a rank-1 update, sums concatenate terms, free factors scale.
- `mixing`: for nonlinear stages, whether output element i depends only on element i of
  the states (ELEM: diagonal / block-diagonal Jacobian) or on others (DENSE).
Scales and offsets are IR nodes built on the fly (never executed by the analysis itself).

Every domain is computed bottom-up over a topological order (sources first), never by
recursion: an unrolled `for` makes chains thousands of nodes long."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import BINARY, COMPARE, ELEMENTWISE, UNARY, Node, Op, toposort
from ..types import ONE, broadcast

FREE, AFFINE, NONLINEAR = 0, 1, 2


def _mk(op: Op, srcs, shape=None, arg=None, span=None) -> Node:
    if shape is None:
        shape = srcs[0].shape
        for s in srcs[1:]:
            shape = broadcast(shape, s.shape) or shape
    return Node(op, tuple(srcs), tuple(shape), arg, span)


def const(v: float) -> Node:
    return Node(Op.CONST, (), (), float(v))


def mul(a: Node | None, b: Node | None) -> Node | None:
    """a * b where None means 1."""
    if a is None:
        return b
    if b is None:
        return a
    return _mk(Op.MUL, [a, b])


def add(a: Node | None, b: Node | None) -> Node | None:
    """a + b where None means 0."""
    if a is None or (a.op == Op.CONST and a.arg == 0.0 and not a.shape and b is not None and b.rank == 0):
        return b
    if b is None:
        return a
    return _mk(Op.ADD, [a, b])


def neg(a: Node | None) -> Node:
    return const(-1.0) if a is None else _mk(Op.NEG, [a])


@dataclass
class Term:
    kind: str                 # diag | contract | lowrank | dense
    state: tuple[str, str]    # (state name, prev | left | up | in)
    scale: Node | None = None
    u: Node | None = None
    w: Node | None = None
    why: str = ""             # for dense: the construct, e.g. "W_hh @ h (line 12)"

    def scaled(self, f: Node | None) -> "Term":
        return Term(self.kind, self.state, mul(self.scale, f), self.u, self.w, self.why)


@dataclass
class Affine:
    terms: list[Term] = field(default_factory=list)
    offset: Node | None = None
    offset_known: bool = True


def _where(n: Node) -> str:
    return f"line {n.span.line}" if n.span is not None else "generated"


def _describe(n: Node) -> str:
    src = ""
    if n.span is not None and n.span.source is not None:
        line = n.span.source.line(n.span.line)
        if n.span.end_line == n.span.line:
            src = line[n.span.col - 1:n.span.end_col - 1].strip()
    return f"{src or n.op.name.lower()} ({_where(n)})"


class StageAnalysis:
    """Abstract interpretation for one stage: its state leaves are the variables."""

    def __init__(self, state_leaves: list[Node], stop: dict[int, Node] | None = None):
        # stop: nodes treated as variables too (the new values of a stage, for readouts)
        self.vars = {n.id: n for n in state_leaves}
        self.stop = stop or {}
        self._deg: dict[int, int] = {}
        self._form: dict[int, Affine] = {}
        self._mix: dict[int, str] = {}

    def key(self, n: Node) -> tuple[str, str]:
        if n.id in self.stop:
            return (self.stop[n.id].name or f"%{n.id}", "new")
        return tuple(n.arg) if isinstance(n.arg, tuple) else (str(n.arg), "prev")

    def _is_var(self, n: Node) -> bool:
        return n.id in self.vars or n.id in self.stop

    # ------------------------------------------------------------------ degree
    def degree(self, n: Node) -> int:
        if n.id not in self._deg:
            for x in _todo(n, self._deg, self._is_var):
                self._deg[x.id] = self._degree(x)
        return self._deg[n.id]

    def _degree(self, n: Node) -> int:
        """n's degree from its sources' (already known)."""
        if n.id in self.vars or n.id in self.stop:
            d = AFFINE
        elif not n.srcs:
            d = FREE
        else:
            ds = [self._deg[s.id] for s in n.srcs]
            op = n.op
            if max(ds) == FREE:
                d = FREE
            elif op in (Op.ADD, Op.SUB, Op.NEG, Op.SUM, Op.INDEX, Op.TRANSPOSE, Op.RESHAPE, Op.CONCAT, Op.SUM_IN,
                        Op.EXPAND):
                d = max(ds)
            elif op in (Op.MUL, Op.MATMUL, Op.OUTER, Op.DOT):
                d = min(NONLINEAR, ds[0] + ds[1])
            elif op == Op.DIV:
                d = ds[0] if ds[1] == FREE else NONLINEAR
            elif op == Op.WHERE:
                d = NONLINEAR if ds[0] != FREE else max(ds[1], ds[2])
            else:
                d = NONLINEAR
        return d

    def is_free(self, n: Node) -> bool:
        return self.degree(n) == FREE

    # ------------------------------------------------------------------ affine form
    def form(self, n: Node) -> Affine:
        """The affine form of a node of degree <= 1."""
        if n.id not in self._form:
            if self.degree(n) == NONLINEAR:
                raise ValueError("affine_form of a nonlinear node")
            # sources first: _form_uncached finds theirs memoised
            for x in _todo(n, self._form, lambda x: self._is_var(x) or self.is_free(x)):
                self._form[x.id] = self._form_uncached(x)
        return self._form[n.id]

    def _form_uncached(self, n: Node) -> Affine:
        deg = self.degree(n)
        if deg == FREE:
            return Affine([], n)
        if deg == NONLINEAR:
            raise ValueError("affine_form of a nonlinear node")
        if n.id in self.vars or n.id in self.stop:
            return Affine([Term("diag", self.key(n))])
        op, s = n.op, n.srcs
        if op in (Op.ADD, Op.SUB):
            a, b = self.form(s[0]), self.form(s[1])
            if op == Op.SUB:
                b = Affine([t.scaled(const(-1.0)) for t in b.terms],
                           None if b.offset is None else _mk(Op.NEG, [b.offset]), b.offset_known)
            terms = _bounded([self._broadcast_term(t, n) for t in a.terms + b.terms])
            return Affine(terms, add(a.offset, b.offset), a.offset_known and b.offset_known)
        if op == Op.NEG:
            a = self.form(s[0])
            return Affine([t.scaled(const(-1.0)) for t in a.terms],
                          None if a.offset is None else _mk(Op.NEG, [a.offset]), a.offset_known)
        if op in (Op.MUL, Op.DIV):
            x, f = (s[0], s[1]) if self.degree(s[0]) == AFFINE else (s[1], s[0])
            if op == Op.DIV:
                f = _mk(Op.DIV, [const(1.0), s[1]])
            a = self.form(x)
            terms = [self._broadcast_term(t.scaled(f), n) for t in a.terms]
            off = None if a.offset is None else _mk(Op.MUL, [a.offset, f])
            return Affine(terms, off, a.offset_known)
        if op == Op.WHERE:  # where(m, x, y) = m * x + (1 - m) * y for a state-free mask m
            on = _mk(Op.WHERE, [s[0], const(1.0), const(0.0)], s[0].shape)
            off = _mk(Op.WHERE, [s[0], const(0.0), const(1.0)], s[0].shape)
            fx, fy = self.form(s[1]), self.form(s[2])
            terms = _bounded([self._broadcast_term(t.scaled(on), n) for t in fx.terms] +
                             [self._broadcast_term(t.scaled(off), n) for t in fy.terms])
            offset = None
            if fx.offset is not None or fy.offset is not None:
                offset = _mk(Op.WHERE, [s[0], fx.offset or const(0.0), fy.offset or const(0.0)], n.shape)
            return Affine(terms, offset, fx.offset_known and fy.offset_known)
        if op == Op.MATMUL and self.is_free(s[0]) and s[0].rank == 1 and s[1].rank == 2:
            a = self.form(s[1])
            terms = [self._contract(t, s[0], n) for t in a.terms]
            off = None if a.offset is None else _mk(Op.MATMUL, [s[0], a.offset], n.shape)
            return Affine(terms, off, a.offset_known)
        if op == Op.OUTER and self.is_free(s[0]):
            a = self.form(s[1])
            terms = [self._outer(t, s[0], n) for t in a.terms]
            off = None if a.offset is None else _mk(Op.OUTER, [s[0], a.offset], n.shape)
            return Affine(terms, off, a.offset_known)
        # Any other linear construct: the map is not one of the structured kinds.
        terms = []
        for src in s:
            if self.degree(src) == AFFINE:
                terms += [Term("dense", t.state, why=_describe(n)) for t in self.form(src).terms]
        return Affine(_bounded(terms), None, False)

    def _broadcast_term(self, t: Term, n: Node) -> Term:
        """A diag term whose state is broadcast to a bigger shape is no longer diagonal."""
        if t.kind == "diag" and self._state_shape(t) != n.shape:
            return Term("dense", t.state, why=f"{t.state[0]} broadcast to a larger shape ({_where(n)})")
        return t

    def _state_shape(self, t: Term):
        for v in list(self.vars.values()) + list(self.stop.values()):
            if self.key(v) == t.state:
                return v.shape
        return None

    def _contract(self, t: Term, w: Node, n: Node) -> Term:
        """w @ term. A scale that is a scalar passes through; a key-side column scale c
        ([K, 1]) folds into the contraction: w @ (c * S) = (w * c[:, 0]) @ S."""
        scalar = t.scale is None or t.scale.rank == 0
        col = t.scale is not None and t.scale.rank == 2 and t.scale.shape[1] == ONE
        if t.kind == "diag" and scalar:
            return Term("contract", t.state, t.scale, w=w)
        if t.kind == "diag" and col:
            return Term("contract", t.state, None, w=_mk(Op.MUL, [w, _column(t.scale)], w.shape))
        if t.kind == "lowrank" and (scalar or col):
            wc = w if scalar else _mk(Op.MUL, [w, _column(t.scale)], w.shape)
            coef = _mk(Op.DOT, [wc, t.u], ())
            return Term("contract", t.state, coef if col else mul(t.scale, coef), w=t.w)
        return Term("dense", t.state, why=_describe(n))

    def _outer(self, t: Term, u: Node, n: Node) -> Term:
        if t.kind == "contract" and (t.scale is None or t.scale.rank == 0):
            return Term("lowrank", t.state, t.scale, u=u, w=t.w)
        return Term("dense", t.state, why=_describe(n))

    # ------------------------------------------------------------------ semiring
    def semiring(self, n: Node, state_key) -> tuple[str | None, Node | None, Node | None] | None:
        """n == max(s + a, b) (max-plus) or logaddexp(s + a, b): (kind, a, b); a None means
        the state does not appear (a = -inf), b None means no free branch (b = -inf)."""
        memo: dict = {}
        for x in toposort([n]):  # sources first
            memo[x.id] = self._semiring(x, state_key, memo)
        return memo[n.id]

    def _semiring(self, n: Node, state_key, memo: dict):
        if self.is_free(n):
            return (None, None, n)
        if n.id in self.vars and self.key(n) == state_key:
            return (None, const(0.0), None)
        op, s = n.op, n.srcs
        state_shape = next(v.shape for v in self.vars.values() if self.key(v) == state_key)
        if op in (Op.ADD, Op.SUB) and n.shape == state_shape:
            x, f = (s[0], s[1]) if not self.is_free(s[0]) else (s[1], s[0])
            if not self.is_free(f) or (op == Op.SUB and x is s[1]):
                return None
            r = memo[x.id]
            if r is None:
                return None
            kind, a, b = r
            g = f if op == Op.ADD else _mk(Op.NEG, [f])
            return (kind, None if a is None else add(a, g), None if b is None else add(b, g))
        if op in (Op.MAX, Op.LOGADDEXP) and n.shape == state_shape:
            kind = "maxplus" if op == Op.MAX else "logsumexp"
            r1, r2 = memo[s[0].id], memo[s[1].id]
            if r1 is None or r2 is None or (r1[0] not in (None, kind)) or (r2[0] not in (None, kind)):
                return None
            a = _join(op, r1[1], r2[1])
            b = _join(op, r1[2], r2[2])
            return (kind, a, b)
        return None

    # ------------------------------------------------------------------ dense semiring
    def dense_semiring(self, n: Node, state_key) -> tuple[str, Node, Node | None, bool] | None:
        """n == reduce_j(s[j] + A[j, i]) + b[i] for a vector state s, reduce = logsumexp
        (log semiring) or amax (tropical, max-plus) over the axis of j, A and b free of s:
        (kind, A, b, transposed), A in (from j, to i) layout, b None when absent; else None.

        Spellings: reduce(s[:, None] + A, axis=0) (A[j, i]) or, transposed,
        reduce(s[None, :] + A, axis=1) / reduce(s + A, axis=1) (A[i, j]); free terms may sit
        inside the reduction (they join A, broadcast to [N, N]) or outside it (they are b)."""
        state = next((v for v in self.vars.values() if self.key(v) == state_key), None)
        if state is None or state.rank != 1:
            return None
        outer = self._sum_terms(n)
        moving = [(sg, t) for sg, t in outer if not self.is_free(t)]
        if len(moving) != 1 or moving[0][0] < 0:
            return None
        red = moving[0][1]
        if red.op not in (Op.LOGSUMEXP, Op.AMAX) or red.arg[0] is None or red.arg[1] or red.shape != state.shape:
            return None
        m = red.srcs[0]
        size = state.shape[0]
        if m.rank != 2 or tuple(m.shape) != (size, size):
            return None
        axis = red.arg[0] % 2
        inner = self._sum_terms(m)
        moving = [(sg, t) for sg, t in inner if not self.is_free(t)]
        if len(moving) != 1 or moving[0][0] < 0:
            return None
        x = moving[0][1]
        column, row = (slice(None), None), (None, slice(None))
        if x is state or (x.op == Op.EXPAND and x.srcs[0] is state):
            along = 1          # numpy broadcasting of [N] against [N, N]: s[None, :]
        elif x.op == Op.INDEX and x.srcs[0] is state and x.arg in (column, row):
            along = 0 if x.arg == column else 1
        else:
            return None
        if along != axis:      # reduce(s[:, None] + A, axis=1) is s[i] + reduce_j A[i, j]: elementwise
            return None
        A = None
        for sg, t in inner:
            if t is not x:
                A = add(A, t if sg > 0 else _mk(Op.NEG, [t]))
        A = _as_matrix(A if A is not None else const(0.0))
        if axis == 1 and A.rank == 2:   # A[i, j] as written: the transition from j to i is its transpose
            A = A.srcs[0] if A.op == Op.TRANSPOSE else _mk(Op.TRANSPOSE, [A], (A.shape[1], A.shape[0]))
        b = None
        for sg, t in outer:
            if t is not red:
                b = add(b, t if sg > 0 else _mk(Op.NEG, [t]))
        kind = "logsumexp" if red.op == Op.LOGSUMEXP else "maxplus"
        return kind, A, b, axis == 1

    def _sum_terms(self, n: Node) -> list[tuple[float, Node]]:
        """n as a signed sum: ADD / SUB / NEG looked through where they read the stage's
        states (a state-free sum is one term); walked with a stack, not recursion."""
        out, stack = [], [(n, 1.0)]
        while stack:
            x, sign = stack.pop()
            if x.op in (Op.ADD, Op.SUB) and not self.is_free(x):
                stack += ((x.srcs[1], -sign if x.op == Op.SUB else sign), (x.srcs[0], sign))
            elif x.op == Op.NEG and not self.is_free(x):
                stack.append((x.srcs[0], -sign))
            else:
                out.append((sign, x))
        return out

    # ------------------------------------------------------------------ mixing (Jacobian)
    def mixing(self, n: Node) -> str:
        """NONE, ELEM (element i depends on element i of the states only) or DENSE."""
        if n.id not in self._mix:
            for x in _todo(n, self._mix, lambda x: self._is_var(x) or self.is_free(x) or x.op not in ELEMENTWISE):
                self._mix[x.id] = self._mixing(x)
        return self._mix[n.id]

    def _mixing(self, n: Node) -> str:
        if n.id in self.vars:
            m = "ELEM"
        elif self.is_free(n) or n.op in COMPARE or n.op == Op.SIGN:
            m = "NONE"   # piecewise constant: no Jacobian path runs through a comparison or sign
        elif n.op in ELEMENTWISE:
            ms = [self._mix[s.id] for s in n.srcs]
            if n.op == Op.WHERE:    # nor through the condition: the branches are what it passes on
                ms[0] = "NONE"
            if "DENSE" in ms:
                m = "DENSE"
            elif any(mm == "ELEM" and s.shape != n.shape for mm, s in zip(ms, n.srcs)):
                m = "DENSE"  # a state-dependent value broadcast over other elements
            else:
                m = "ELEM" if "ELEM" in ms else "NONE"
        else:
            m = "DENSE"
        return m

    def first_dense(self, n: Node) -> Node | None:
        """The first construct (in dependency order) that mixes state elements."""
        from ..ir import toposort
        for x in toposort([n]):
            if self.mixing(x) == "DENSE" and all(self.mixing(s) != "DENSE" for s in x.srcs):
                return x
        return None


# An affine form keeps one term per way a state reaches the value; where a state is read
# through several paths (an unrolled loop reads its accumulator twice a pass: DeltaProduct's
# `acc - beta * outer(k, k @ acc)`) their number doubles with every pass. Past MAX_TERMS,
# terms of the same kind, state and left vector merge (scalar scales fold into w); past
# MAX_TERMS_HARD what is left becomes one dense term per state (always sound).
MAX_TERMS = 16
MAX_TERMS_HARD = 1024


def _bounded(terms: list[Term]) -> list[Term]:
    if len(terms) <= MAX_TERMS:
        return terms
    out: list[Term] = []
    at: dict = {}
    for i, t in enumerate(terms):
        scalar = t.scale is None or t.scale.rank == 0
        if t.kind == "dense":
            key = ("dense", t.state)
        elif t.kind == "diag":
            key = ("diag", t.state)
        elif t.kind in ("contract", "lowrank") and scalar:
            key = (t.kind, t.state, t.u.id if t.u is not None else None, t.w.shape)
        else:
            key = ("keep", i)
        if key in at:
            out[at[key]] = _merge(out[at[key]], t)
        else:
            at[key] = len(out)
            out.append(t)
    if len(out) > MAX_TERMS_HARD:
        why = f"an affine form of more than {MAX_TERMS_HARD} terms"
        states = list(dict.fromkeys(t.state for t in out))
        return [Term("dense", st, why=why) for st in states]
    return out


def _merge(a: Term, b: Term) -> Term:
    """One term for a + b (same kind, state and, for rank-1 terms, left vector)."""
    if a.kind == "dense":
        return a
    if a.kind == "diag":
        return Term("diag", a.state, add(a.scale or const(1.0), b.scale or const(1.0)))

    def w(t: Term) -> Node:
        return t.w if t.scale is None else _mk(Op.MUL, [t.w, t.scale], t.w.shape)
    return Term(a.kind, a.state, None, u=a.u, w=_mk(Op.ADD, [w(a), w(b)], a.w.shape))


def _todo(n: Node, memo: dict, leaf=lambda x: False) -> list[Node]:
    """n and what it depends on that memo lacks, sources first (a stack, not recursion);
    the sources of a node for which leaf(node) holds are not needed."""
    order: list[Node] = []
    seen: set[int] = set()
    stack = [(n, False)]
    while stack:
        x, done = stack.pop()
        if done:
            order.append(x)
            continue
        if x.id in seen or x.id in memo:
            continue
        seen.add(x.id)
        stack.append((x, True))
        if not leaf(x):
            stack.extend((s, False) for s in reversed(x.srcs) if s.id not in memo and s.id not in seen)
    return order


def _column(c: Node) -> Node:
    """c[:, 0] of a [K, 1] node."""
    return Node(Op.INDEX, (c,), (c.shape[0],), (slice(None), 0))


def _as_matrix(a: Node) -> Node:
    """A state-free term of a [N, N] sum with fewer axes, as numpy broadcasts it: a scalar
    stays one, a vector [N] is a row [1, N]."""
    return _mk(Op.INDEX, [a], (ONE, a.shape[0]), (None, slice(None))) if a.rank == 1 else a


def _join(op: Op, a: Node | None, b: Node | None) -> Node | None:
    if a is None:
        return b
    if b is None:
        return a
    return _mk(op, [a, b])


__all__ = ["StageAnalysis", "Affine", "Term", "FREE", "AFFINE", "NONLINEAR", "UNARY", "BINARY", "COMPARE", "ONE"]
