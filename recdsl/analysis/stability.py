"""Stability of long-range propagation over grids and DAGs: pLSTM's P-mode and D-mode
(Pöppel et al., 2025, arXiv:2506.11997; ../shared/MATH.md §6).

Over a grid or a DAG a state reaches a far node along every path between them, and the
end-to-end coefficient is the sum over paths of the product of the transitions on the
path. The number of paths grows exponentially with the distance, so transitions that
are each <= 1 in magnitude are not enough. Two ways keep it bounded:

    P-mode   the transitions leaving each in-edge sum to <= 1 in magnitude (a column sum
             of the transition matrix, a node state counted once per out-edge it is read
             on), or, dually, those entering each out-edge do (a row sum: every new value
             is a combination of its in-edges with weights summing to <= 1 in magnitude);
    D-mode   the line graph is a multitree (at most one path between two edges) and each
             |T| <= 1.

The pass finds, per stage, the states that propagate linearly (their updates are affine
in the neighbour reads of those states; coefficients may read other states, as the
forget gates of a 2-D LSTM read h), splits each update into transitions (target state,
source state, left | up | in, coefficient) and bounds each coefficient with the range
analysis (recdsl.analysis.ranges). Sums of transitions that are all >= 0 are added
symbolically first, so that `t` and `1 - t` sum to exactly 1. Over a grid the multitree
question is decided on the states' transition graph, each step moving +x (a `.left`
read) or +y (`.up`): the walks of up to n * n + 2n + 3 steps (n states) are counted. Over a DAG the
graph comes at call time: P-mode sums run over edges not known here, so D-mode is what
can be shown, on the condition that the graph given is a multitree (a tree, a path).

A transition that is an input as given (`t_rl`, a `pair` input) is normalised by the
caller (pLSTM's layers set `t` and `1 - t`): the result is then stable under that
assumption (`assumes`), as the range analysis assumes a log gate exp(g) of an input."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import sympy as sp

from ..errors import Span
from ..ir import IRCell, Node, Op, toposort
from .linear import AFFINE, StageAnalysis, const, mul
from .ranges import VIEWS, value_range
from .symbolic import NotElementwise, node_text, to_sympy

STEP = {"left": (1, 0), "up": (0, 1), "in": (1,)}
HINT = ("bound the transitions with sigmoid(...)/2 per in-edge (P-mode: those leaving an in-edge sum to <= 1), "
        "or use D-mode (each |T| <= 1 and no two paths between two edges: drop a cross transition, as pLSTM's "
        "t_dl = 0)")


@dataclass
class Transition:
    """target' = ... + coefficient * source.via + ...: one in-edge -> out-edge transition."""
    target: str
    source: str
    via: str                      # left | up | in
    text: str                     # the coefficient, as text
    bound: float                  # sup |coefficient| (inf: not bounded, or not known)
    proven: bool                  # the bound holds for every value of the params
    given: bool                   # the coefficient is an input as given: its normalisation is the caller's
    span: Span | None = None
    node: Node | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return str(self.span) if self.span is not None else "<generated>"

    @property
    def written(self) -> str:
        """The term as the .rec file writes it (one line), else the coefficient's text."""
        sp_ = self.span
        if sp_ is not None and sp_.source is not None and sp_.end_line == sp_.line:
            text = sp_.source.line(sp_.line)[sp_.col - 1:sp_.end_col - 1].strip()
            if text:
                return text
        return self.text

    @property
    def edge(self) -> str:
        return f"{self.target}' <- {self.source}.{self.via}"


@dataclass
class Stability:
    """What the stability pass found for a cell over a grid or a DAG."""
    stages: list[int]             # the (recurrent) stages whose states are checked
    states: list[str]             # the states that propagate linearly (the ones checked)
    stable: bool                  # False: a warning
    mode: str | None              # "P" | "D" | None
    proven: bool                  # for any value of the params and inputs (else at the params' initial
                                  # values, or under `assumes`)
    rule: str = ""                # how: "per in-edge", "per out-edge", "|T| <= 1 on a multitree"
    transitions: list[Transition] = field(default_factory=list)
    in_sums: dict[str, float] = field(default_factory=dict)    # in-edge -> bound of the sum leaving it
    out_sums: dict[str, float] = field(default_factory=dict)   # state -> bound of the sum entering it
    multitree: bool = False       # the states' transition graph has at most one path between two edges
    requires: str | None = None   # a condition on the graph given at call time (over dag)
    assumes: tuple[str, ...] = ()
    offending: Transition | None = None
    hint: str | None = None
    text: str = ""

    @property
    def summary(self) -> str:
        """The line `recdsl check` prints (an unstable cell's details are in its warning)."""
        return self.text if self.stable else \
            f"{', '.join(self.states)}: neither P-mode nor D-mode shown: long-range propagation may explode (warning below)"

    def warning(self) -> str | None:
        return None if self.stable else self.text + f"; hint: {self.hint}"


def stability(ir: IRCell, stages: dict[int, list[str]]) -> Stability | None:
    """The stability of the cell's propagation over a grid or a DAG, the recurrent stages
    (stage index -> its states) taken together: a transition from one stage into a later one is an edge
    of the same line graph. None over a sequence, or when no state propagates linearly."""
    if ir.over == "seq":
        return None
    carriers, an = _carriers(ir, [s for st in stages.values() for s in st])
    if not carriers:
        return None
    trans = _transitions(ir, carriers, an)
    if not trans:
        return None
    res = _judge(ir, [i for i, st in stages.items() if set(st) & set(carriers)], carriers, trans)
    if res.stable and not all(t.proven for t in trans):
        res.proven = False
        res.text += "; at the params' initial values (training may move them)"
    return res


# --------------------------------------------------------------------------- transitions

def _carriers(ir: IRCell, states: list[str]) -> tuple[list[str], StageAnalysis]:
    """The largest subset of the states whose updates are affine in the reads of that subset
    (a 2-D LSTM's c, whose forget gates read h; not h = o * tanh(c)). Up to 6 states every
    subset is tried, largest first; beyond, states are dropped one at a time, first those
    nonlinear in their own reads."""
    def affine(keep):
        an = StageAnalysis([n for n in ir.state_leaves() if n.arg[0] in keep])
        return an, [s for s in keep if an.degree(ir.updates[s]) <= AFFINE]

    if len(states) <= 6:
        for size in range(len(states), 0, -1):
            for keep in itertools.combinations(states, size):
                an, ok = affine(keep)
                if len(ok) == size:
                    return list(keep), an
        return [], StageAnalysis([])
    keep = list(states)
    while keep:
        an, ok = affine(keep)
        if ok == keep:
            return keep, an
        bad = [s for s in keep if s not in ok]
        keep.remove(next((s for s in bad if not affine([s])[1]), bad[0]))
    return [], StageAnalysis([])


class _Opaque(Exception):
    """A linear map that is not a sum of scaled reads (a matmul, a concat): no bound here."""

    def __init__(self, node: Node):
        self.node = node


def _terms(root: Node, an: StageAnalysis, memo: dict) -> list[tuple[tuple[str, str], Node | None, Span | None]]:
    """root as a sum of coefficient * neighbour read: (read key, coefficient (None: 1), span
    of the term). Sources first (no recursion: unrolled loops make long chains)."""
    for n in toposort([root]):
        if n.id not in memo:
            memo[n.id] = _term_step(n, an, memo)
    return memo[root.id]


def _term_step(n: Node, an: StageAnalysis, memo: dict):
    if an.is_free(n):
        return []
    if n.id in an.vars:
        return [(an.key(n), None, None)]
    if n.op in (Op.ADD, Op.SUB):
        a, b = memo[n.srcs[0].id], memo[n.srcs[1].id]
        if n.op == Op.SUB:
            b = [(key, mul(const(-1.0), c), sp_) for key, c, sp_ in b]
        return a + b
    if n.op == Op.NEG:
        return [(key, mul(const(-1.0), c), sp_) for key, c, sp_ in memo[n.srcs[0].id]]
    if n.op in (Op.MUL, Op.DIV) and (an.is_free(n.srcs[0]) or an.is_free(n.srcs[1])):
        x, f = n.srcs
        if n.op == Op.DIV:
            f = Node(Op.DIV, (const(1.0), f), f.shape)
        elif an.is_free(x):
            x, f = f, x
        return [(key, mul(c, f), n.span or sp_) for key, c, sp_ in memo[x.id]]
    if n.op == Op.WHERE and an.is_free(n.srcs[0]):   # where(m, x, y) = [m] x + [not m] y
        m = n.srcs[0]
        on, off = (Node(Op.WHERE, (m, const(a), const(b)), m.shape) for a, b in ((1.0, 0.0), (0.0, 1.0)))
        return [(key, mul(c, on), sp_ or n.span) for key, c, sp_ in memo[n.srcs[1].id]] + \
            [(key, mul(c, off), sp_ or n.span) for key, c, sp_ in memo[n.srcs[2].id]]
    if n.op == Op.SUM_IN or n.op in VIEWS:   # per in-edge the same coefficient; a view moves no magnitude
        return [(key, c, sp_ or n.span) for key, c, sp_ in memo[n.srcs[0].id]]
    raise _Opaque(n)


def _transitions(ir: IRCell, carriers: list[str], an: StageAnalysis) -> list[Transition]:
    out = []
    memo: dict = {}
    for s in carriers:
        update = ir.updates[s]
        try:
            terms = _terms(update, an, memo)
        except _Opaque as e:
            for key in sorted({an.key(x) for x in an.vars.values() if x.arg[0] in carriers and _reads(e.node, x)}):
                out.append(Transition(s, key[0], key[1], node_text(e.node), math.inf, True, False, e.node.span or
                                      update.span))
            continue
        grouped: dict[tuple[str, str], tuple[Node | None, Span | None]] = {}
        for key, c, span in terms:
            if key[1] == "prev":
                continue   # over a grid or a DAG a state is read through its neighbours
            old = grouped.get(key)
            coef = (c if c is not None else const(1.0)) if old is None else \
                Node(Op.ADD, (old[0], c if c is not None else const(1.0)), ())
            grouped[key] = (coef, (old[1] if old is not None else None) or span)
        for (src, via), (coef, span) in grouped.items():
            r = value_range(coef, ir)
            bound = max(abs(r.lo), abs(r.hi))
            base = coef
            while base.op in VIEWS:
                base = base.srcs[0]
            out.append(Transition(s, src, via, node_text(coef), bound, r.proven, base.op == Op.INPUT,
                                  span or update.span, coef))
    return out


def _reads(n: Node, leaf: Node) -> bool:
    stack, seen = [n], set()
    while stack:
        x = stack.pop()
        if x is leaf:
            return True
        if x.id not in seen:
            seen.add(x.id)
            stack.extend(x.srcs)
    return False


# --------------------------------------------------------------------------- P-mode sums

def _joint(ir: IRCell, parts: list[tuple[float, Transition]]) -> float:
    """sup of sum(w * |T|) over the parts (weight, transition): symbolically when every T is
    >= 0 (or every one <= 0) and the sum simplifies to a number, else the sum of the bounds."""
    parts = [(w, t) for w, t in parts if w and t.bound > 0]
    plain = sum(w * t.bound for w, t in parts)
    if len(parts) < 2 or math.isinf(plain) or any(t.node is None or not t.proven for _, t in parts):
        return plain
    rs = [value_range(t.node, ir) for _, t in parts]
    sign = 1.0 if all(r.lo >= 0 for r in rs) else -1.0 if all(r.hi <= 0 for r in rs) else 0.0
    if not sign:
        return plain
    try:
        total = sp.expand(sum(w * to_sympy(t.node, {}, expand_defs=True) for w, t in parts))
    except NotElementwise:
        return plain
    except Exception:   # sympy on an expression it cannot add up: the plain bound stands  # noqa: BLE001
        return plain
    if total.is_number and total.is_real:
        return min(plain, abs(float(total)))
    return plain


# --------------------------------------------------------------------------- D-mode structure

def _is_multitree(trans: list[Transition], carriers: list[str]) -> bool:
    """At most one path between any two edges of the line graph the transitions make: the
    walks from each state, counted by the state and the grid offset where they end, up to
    n * n + 2n + 3 steps for n states (each step moves one cell, so the offset gives the length)."""
    moves = [(t.source, STEP[t.via], t.target) for t in trans if t.bound > 0]
    if not moves:
        return True
    # two different cycles through a state give two walks of at most their lengths summed; cycles
    # of parallel moves, at their least common length: n * n covers both, for n states
    n = len(carriers)
    steps, dim = min(n * n + 2 * n + 3, 200), len(moves[0][1])
    for start in carriers:
        front = {(start, (0,) * dim): 1}
        for _ in range(steps):
            nxt: dict = {}
            for (state, pos), count in front.items():
                for src, step, dst in moves:
                    if src == state:
                        key = (dst, tuple(a + b for a, b in zip(pos, step)))
                        nxt[key] = nxt.get(key, 0) + count
            if any(c > 1 for c in nxt.values()):
                return False
            front = nxt
            if not front:
                break
    return True


# --------------------------------------------------------------------------- the verdict

def _fanout(ir: IRCell, s: str) -> float:
    """How many out-edges carry state s's new value: over a grid the directions it is read
    in; over a DAG 1 for an `on edge` state, else the out-degree (not known here)."""
    if ir.over == "dag":
        return 1.0 if ir.checked.states[s].decl.on_edge else math.inf
    return float(len({where for (name, where) in ir.neighbours if name == s}))


def _judge(ir: IRCell, stages: list[int], carriers: list[str], trans: list[Transition]) -> Stability:
    dag = ir.over == "dag"
    fan = {s: _fanout(ir, s) for s in carriers}
    in_edges = sorted({(t.source, t.via) for t in trans})
    in_sums, out_sums = {}, {}
    if not dag:   # over a DAG both sums run over edges known only at call time
        for src, via in in_edges:
            parts = [(fan[t.target], t) for t in trans if (t.source, t.via) == (src, via)]
            in_sums[f"{src}.{via}"] = _joint(ir, parts)
        for s in carriers:
            out_sums[s] = _joint(ir, [(1.0, t) for t in trans if t.target == s])
    proven = all(t.proven for t in trans)   # else the bounds hold at the params' initial values
    multitree = _is_multitree(trans, carriers)
    each = all(t.bound <= 1 for t in trans)
    res = Stability(stages, carriers, True, None, proven, transitions=trans, in_sums=in_sums, out_sums=out_sums,
                    multitree=multitree)
    names = ", ".join(carriers)
    if in_sums and all(v <= 1 for v in in_sums.values()):
        res.mode, res.rule = "P", "per in-edge"
        res.text = (f"{names}: P-mode, stable: the transitions leaving each in-edge sum to <= 1 in magnitude ("
                    + ", ".join(f"{e}: {_num(v)}" for e, v in in_sums.items()) + ")")
        return res
    if out_sums and all(v <= 1 for v in out_sums.values()):
        res.mode, res.rule = "P", "per out-edge"
        res.text = (f"{names}: P-mode, stable: the transitions entering each new value sum to <= 1 in magnitude ("
                    + ", ".join(f"{s}': {_num(v)}" for s, v in out_sums.items()) + ")")
        return res
    if multitree and each:
        res.mode, res.rule = "D", "|T| <= 1 on a multitree"
        if dag:
            res.requires = "the graph given at call time is a multitree (at most one path between two nodes: a tree, a path)"
            res.text = (f"{names}: D-mode, stable where {res.requires}: each |T| <= 1 ("
                        + ", ".join(f"{t.edge}: {_num(t.bound)}" for t in trans) + ")")
        else:
            res.text = (f"{names}: D-mode, stable: each |T| <= 1 and at most one path joins two edges ("
                        + ", ".join(f"{t.edge}: {_num(t.bound)}" for t in trans) + ")")
        return res
    unknown = [t for t in trans if t.bound > 1]
    if unknown and all(t.given for t in unknown):
        given = ", ".join(dict.fromkeys(t.text for t in unknown))
        res.proven = False
        if multitree:
            res.mode, res.rule = "D", "|T| <= 1 on a multitree"
            cond = "each |T| <= 1"
            if dag:
                res.requires = "the graph given at call time is a multitree (at most one path between two nodes: a tree, a path)"
                cond += ", on a multitree graph"
        else:
            res.mode, res.rule = "P", "per in-edge"
            cond = "the transitions leaving each in-edge sum to <= 1 in magnitude"
        res.assumes = (f"{given}: given by the caller, who normalises them ({cond})",)
        res.text = f"{names}: {res.mode}-mode, stable assuming {res.assumes[0]}"
        return res
    # a warning: name the transition that breaks the sums the most
    bad = _offending(trans, in_sums, out_sums, fan)
    res.stable, res.offending, res.hint = False, bad, HINT
    why = []
    if in_sums:
        e, v = max(in_sums.items(), key=lambda kv: kv[1])
        why.append(f"the transitions leaving {e} sum up to {_num(v)}")
    if dag:
        why.append("over a DAG the sums run over edges known only at call time")
    if not multitree:
        why.append("two paths can join the same edges (not a multitree)")
    elif not each:
        why.append(f"|{bad.text}| can exceed 1")
    res.text = (f"{bad.where}: long-range propagation of {names} may explode: transition `{bad.written}` "
                f"({bad.edge}, |T| up to {_num(bad.bound)}{'' if bad.proven else ' at initialisation'}); "
                + "; ".join(why))
    return res


def _offending(trans, in_sums, out_sums, fan) -> Transition:
    if in_sums:
        worst = max(in_sums, key=in_sums.get)
        cands = [t for t in trans if f"{t.source}.{t.via}" == worst]
    else:
        cands = trans
    return max(cands, key=lambda t: (t.bound * (1 if t.given else 2), -trans.index(t)))


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"
