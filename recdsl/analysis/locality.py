"""Which elements of a matrix state a nonlinear update mixes: the Jacobian's block
structure by columns or by rows.

The elementwise test (linear.py's `mixing`) calls every matrix-state update that contracts
the state dense. Many are local along one axis: Yaad's M' = a M - lr outer(k, clamp(k @ M - v))
reads only column j of M for column j of M' (`k @ M` contracts the rows, `outer` puts
the column index back where it was), so dM'/dM is block-diagonal, V blocks of K x K: what a
Newton solver or a column-parallel kernel can use.

Per value, `carried` says where the state's index along `axis` went: the value's axis that
carries it (a negative position, counted from the right as broadcasting aligns), FREE (the
value reads no state of the stage) or MIXED (one element reads several indices along
`axis`). An update is local along `axis` when it carries the index at the state's own
position. Comparisons, sign and a `where`'s condition are piecewise constant: the
Jacobian (almost everywhere) has no path through them, so what they read does not count.
Anything not understood is MIXED: the answer can only err towards "dense"."""
from __future__ import annotations

from ..ir import COMPARE, ELEMENTWISE, IRCell, Node, Op, toposort

FREE, MIXED = "free", "mixed"
REDUCTIONS = {Op.SUM, Op.AMAX, Op.LOGSUMEXP}
ZERO_DERIVATIVE = COMPARE | {Op.SIGN}


def local_axis(ir: IRCell, states: list[str], updates: dict[str, Node]) -> int | None:
    """1 (columns) or 0 (rows) when every update of the stage's matrix states (one shape)
    keeps that axis local, else None."""
    shapes = {tuple(ir.states[s].shape) for s in states}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    leaves = {ir.states[s].id for s in states}
    for axis in (1, 0):
        memo: dict[int, object] = {}
        if all(carried(u, leaves, axis, memo) == axis - 2 for u in updates.values()):
            return axis
    return None


def carried(n: Node, leaves: set[int], axis: int, memo: dict) -> object:
    """Where n carries the states' index along `axis` (see the module docstring)."""
    for x in toposort([n]):
        if x.id not in memo:
            memo[x.id] = _rule(x, [memo[s.id] for s in x.srcs], leaves, axis)
    return memo[n.id]


def _rule(n: Node, srcs: list, leaves: set[int], axis: int) -> object:
    if n.id in leaves:
        return axis - 2
    if n.op in ZERO_DERIVATIVE:   # piecewise constant: no path of the Jacobian runs through it
        return FREE
    if n.op == Op.WHERE:          # likewise its condition; the branches are what it passes on
        srcs = [FREE] + srcs[1:]
    if all(s == FREE for s in srcs):
        return FREE
    if MIXED in srcs:
        return MIXED
    if n.op in ELEMENTWISE or n.op == Op.EXPAND:   # aligned from the right: positions stay
        return _agree([s for s in srcs if s != FREE])
    if n.op == Op.MATMUL:
        return _matmul(n, srcs)
    if n.op == Op.OUTER:   # a [K], b [V] -> [K, V]
        return _agree([p for p, s in zip((-2, -1), srcs) if s != FREE])
    if n.op == Op.TRANSPOSE and n.rank == 2:
        return -1 - (srcs[0] + 2)    # -2 <-> -1
    if n.op in REDUCTIONS:
        return _reduced(n, srcs[0])
    if n.op == Op.INDEX:
        return _indexed(n, srcs[0])
    return MIXED   # DOT, CONCAT, RESHAPE, ...: contract or move the axis


def _agree(positions: list) -> object:
    return positions[0] if len(set(positions)) == 1 else MIXED


def _matmul(n: Node, srcs: list) -> object:
    """a @ b contracts a's last axis with b's first: an index carried there is mixed; a's
    other axes lead the result, b's second axis ends it."""
    a, b = n.srcs
    out = []
    if srcs[0] != FREE:
        i = a.rank + srcs[0]
        if i == a.rank - 1:
            return MIXED
        out.append(i - n.rank)
    if srcs[1] != FREE:
        if b.rank + srcs[1] == 0:
            return MIXED
        out.append(-1)
    return _agree(out)


def _reduced(n: Node, pos: int) -> object:
    axis, keepdim = n.arg
    src = n.srcs[0]
    if axis is None:
        return MIXED
    ax, i = axis % src.rank, src.rank + pos
    if i == ax:
        return MIXED
    return pos if keepdim or i > ax else pos + 1   # axes before the reduced one move right by one


def _indexed(n: Node, pos: int) -> object:
    """x[...] with ints (drop an axis), slices (keep; the carried axis only whole) and None
    (a new axis)."""
    src = n.srcs[0]
    target = src.rank + pos
    items = list(n.arg) + [slice(None)] * (src.rank - sum(1 for a in n.arg if a is not None))
    out_axis = src_axis = 0
    for item in items:
        if item is None:
            out_axis += 1
            continue
        if src_axis == target:   # kept only whole: a shifted or partial slice moves the index
            whole = isinstance(item, slice) and item.start in (None, 0) and item.step in (None, 1) \
                and n.shape[out_axis] == src.shape[src_axis]
            return out_axis - n.rank if whole else MIXED
        out_axis += 0 if isinstance(item, int) else 1
        src_axis += 1
    return MIXED   # pragma: no cover - the target axis is always among the items
