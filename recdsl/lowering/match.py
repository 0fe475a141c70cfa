"""Matchers: a classified stage -> its candidate lowering forms, in preference order.

Each candidate is a form (forms.py) holding the nodes its kernel reads, or a Rejection
saying which construct of the update (and its line) keeps the form from applying. Every
sequence stage has the sequential loop, which runs anything: its last candidate, except
that a nonlinear stage's parallel Newton form (or its rejection) follows it. The
matchers read the Plan (classes, coefficients derived by the analysis) and the IR; they
know no backend: which candidate runs is `select`'s decision, per backend."""
from __future__ import annotations

from recdsl.plan import BLOCK_DIAGONAL, DIAGONAL, HOISTED, LOW_RANK, NONLINEAR, Plan, SEMIRING, StagePlan
from recdsl.ir import IRCell, Node, Op, toposort
from recdsl.types import ONE, broadcast

from .forms import (BlockScan, ChunkDelta, ChunkDiag, ChunkDPLR, DenseSemiringScan, ElementScan, HouseholderProducts,
                    LevelSync, NewtonSolve, Readout, Rejection, SequentialLoop, Vectorised, Wavefront)

# The largest state a dense semiring stage scans in parallel as [N, N] matrix products (N^3
# work a step against the matrix-vector loop's N^2, for log T depth instead of T).
DENSE_SEMIRING_PRODUCTS_MAX = 16


def _mk(op, srcs, shape, arg=None):
    return Node(op, tuple(srcs), tuple(shape), arg)


def factors(n: Node | None) -> list[Node]:
    """The factors of a product tree (MUL and NEG as a factor -1), left to right; walked
    with a stack, not recursion (unrolled loops make long products)."""
    out: list[Node] = []
    stack = [n] if n is not None else []
    while stack:
        x = stack.pop()
        if x.op == Op.MUL:
            stack += (x.srcs[1], x.srcs[0])
        elif x.op == Op.NEG:
            out.append(Node(Op.CONST, (), (), -1.0))
            stack.append(x.srcs[0])
        else:
            out.append(x)
    return out


def product(fs: list[Node]) -> Node | None:
    out = None
    for f in fs:
        out = f if out is None else _mk(Op.MUL, [out, f], _bshape(out.shape, f.shape))
    return out


def _bshape(a, b):
    return broadcast(a, b) or a


def split_outer(b: Node | None):
    """b == s * outer(u, w) with s scalar: (s | None, u, w); else None. Also accepts the
    broadcast form u[:, None] * w[None, :] and [K,1] / [1,V] factors folded into u / w."""
    if b is None:
        return None
    fs = factors(b)
    outer = [f for f in fs if f.op == Op.OUTER]
    cols = [f for f in fs if f.op == Op.INDEX and f.rank == 2 and f.arg == (slice(None), None)]
    rows = [f for f in fs if f.op == Op.INDEX and f.rank == 2 and f.arg == (None, slice(None))]
    if len(outer) == 1:
        u, w = outer[0].srcs
        rest = [f for f in fs if f is not outer[0]]
    elif len(cols) == 1 and len(rows) == 1:
        u, w = cols[0].srcs[0], rows[0].srcs[0]
        rest = [f for f in fs if f is not cols[0] and f is not rows[0]]
    else:
        return None
    scalars = []
    for f in rest:
        if f.rank == 0 or all(d == ONE for d in f.shape):
            scalars.append(f if f.rank == 0 else _mk(Op.INDEX, [f], (), tuple(0 for _ in f.shape)))
        elif f.rank == 2 and f.shape[1] == ONE:
            col = _mk(Op.INDEX, [f], (f.shape[0],), (slice(None), 0))
            u = _mk(Op.MUL, [u, col], u.shape)
        elif f.rank == 2 and f.shape[0] == ONE:
            row = _mk(Op.INDEX, [f], (f.shape[1],), (0, slice(None)))
            w = _mk(Op.MUL, [w, row], w.shape)
        else:
            return None
    return product(scalars), u, w


def consumers(ir: IRCell) -> dict[int, list[Node]]:
    out: dict[int, list[Node]] = {}
    for n in ir.nodes():
        for s in n.srcs:
            out.setdefault(s.id, []).append(n)
    return out


def stage_core(ir: IRCell, states: list[str], place: dict[int, int], k: int) -> list[Node]:
    """The nodes the stage's recurrence must compute every step: those that read the
    stage's states and lead to its updates."""
    roots = [ir.updates[s] for s in states]
    return [n for n in toposort(roots) if place[n.id] == k]


class Context:
    """What the matchers and `select` of one cell share, computed once: the IR, which
    states each node reads, where it runs, who reads it, and each stage's recurrent core."""

    def __init__(self, ir: IRCell, plan: Plan):
        from recdsl.analysis.stages import placement, state_reads
        self.ir, self.plan = ir, plan
        self.reads = state_reads(ir)
        self.place = placement(ir, [s.states for s in plan.stages])
        self.users = consumers(ir)
        self.cores = [stage_core(ir, sp.states, self.place, sp.index) for sp in plan.stages]
        self.shifts = self._shifts()

    def _shifts(self) -> bool:
        """Some value outside a stage's recurrent core reads the stage's previous state, or a
        value of its core computed from it (mLSTM's gates read m + lf, shared with m's
        update): a shift along time, which must know the direction and the boundaries."""
        outputs = {n.id for n in self.ir.outputs.values()}
        for sp, core in zip(self.plan.stages, self.cores):
            inside = {n.id for n in core}
            updates = {self.ir.updates[s].id for s in sp.states}
            prev = [self.ir.states[s] for s in sp.states]
            for n in prev + [n for n in core if n.id not in updates]:
                if n.id in outputs or any(u.id not in inside for u in self.users.get(n.id, [])):
                    return True
        return False

    def free(self, n: Node, state: str) -> bool:
        """n reads neither the previous nor the new value of `state`, and is known when the
        stage of `state` runs (it reads no state of a later stage: a query built from a later
        stage's states cannot be fused into this stage's kernel)."""
        stage = self.place[self.ir.updates[state].id]
        return state not in self.reads[n.id] and self.place[n.id] <= stage

    def readouts(self, state: str, core: set[int]) -> list | None:
        """Every use of S (previous) and S' outside the update must be a readout with q free
        of S: q @ S, S @ q (transposed), or q @ (S + Y) with Y free of S (a readout plus the
        extra term q @ Y). The list of Readouts; None if some use is none of these."""
        prev, new = self.ir.states[state], self.ir.updates[state]
        if any(k.id == new.id for k in self.ir.outputs.values()):
            return None  # the whole matrix state is an output
        out = []
        for node, inclusive in ((new, True), (prev, False)):
            for u in self.users.get(node.id, []):
                if u.id in core:
                    continue
                found = self._readout(u, node, inclusive, state)
                if found is None:
                    return None
                out += found
        return out

    def _readout(self, u: Node, node: Node, inclusive: bool, state: str) -> list | None:
        if u.op == Op.MATMUL and u.srcs[1] is node and u.srcs[0].rank == 1 and self.free(u.srcs[0], state):
            return [Readout(u, u.srcs[0], inclusive)]
        if u.op == Op.MATMUL and u.srcs[0] is node and u.srcs[1].rank == 1 and self.free(u.srcs[1], state):
            return [Readout(u, u.srcs[1], inclusive, transposed=True)]
        if u.op == Op.ADD and node in u.srcs:
            other = u.srcs[1] if u.srcs[0] is node else u.srcs[0]
            reads = self.users.get(u.id, [])
            if self.free(other, state) and reads and all(
                    r.op == Op.MATMUL and r.srcs[1] is u and r.srcs[0].rank == 1 and self.free(r.srcs[0], state)
                    for r in reads):
                return [Readout(r, r.srcs[0], inclusive, extra=_vector_times(r.srcs[0], other, r.shape))
                        for r in reads]
        return None


def _vector_times(q: Node, y: Node, shape) -> Node:
    """q @ y, a readout's state-free extra term: for y = s * outer(u, w) (RWKV-6's bonus
    u[:, None] * outer(k, v)) the per-step scalar s (q · u) times w, so that no backend forms
    the [K, V] outer product of every step only to reduce it again; else the matmul."""
    split = split_outer(y)
    if split is None:
        return _mk(Op.MATMUL, [q, y], shape)
    s, u, w = split
    total = _mk(Op.DOT, [q, u], ())
    if s is not None:
        total = _mk(Op.MUL, [total, s], ())
    return _mk(Op.MUL, [total, w], shape)


def candidates(ctx: Context, sp: StagePlan) -> list:
    """The stage's candidate forms (and rejections), best first."""
    key = (sp.index, tuple(sp.states))
    if ctx.ir.over in ("grid2d", "dag"):   # the whole cell in one sweep (a grid / DAG kernel), else cell by cell
        sweep = Wavefront(*key) if ctx.ir.over == "grid2d" else LevelSync(*key)
        return [sweep, SequentialLoop(*key, core=tuple(ctx.cores[sp.index]))]
    if sp.cls == HOISTED:
        return [Vectorised(*key)]
    loop = SequentialLoop(*key, core=tuple(ctx.cores[sp.index]))
    core = {n.id for n in loop.core}
    if sp.cls == DIAGONAL:
        return _diagonal(ctx, sp, core) + [loop]
    if sp.cls == SEMIRING and sp.transition == "dense":
        return _dense_semiring(sp) + [loop]
    if sp.cls == SEMIRING:
        semiring = {"maxplus": "max-plus", "logsumexp": "log-sum-exp"}[sp.nodes["kind"]]
        return [ElementScan(*key, semiring=semiring, a=sp.nodes["a"], b=sp.nodes["b"]), loop]
    if sp.cls == BLOCK_DIAGONAL:
        return [BlockScan(*key, A=dict(sp.nodes["A"]), b=dict(sp.nodes["b"])), loop]
    if sp.cls == LOW_RANK:
        return [_delta_rule(ctx, sp, core), _delta_product(ctx, sp, core), _dplr(ctx, sp, core), loop]
    if sp.cls == NONLINEAR:
        # After the loop: a Newton solve is an iterative approximation (to a tolerance), run
        # only by a backend whose own kernel takes it (select tries a backend's own kernels
        # on every candidate before its fallbacks, so `newton` picks it over its borrowed loop,
        # and the exact backends never reach it).
        return [loop, _newton(sp, loop)]
    return [loop]


def _newton(sp: StagePlan, loop: SequentialLoop):
    """Parallel Newton (MATH.md §5) where the analysis proved the Jacobian w.r.t. the
    stage's states diagonal or k x k per element; a rejection naming why otherwise."""
    jac = sp.jacobian or "unknown"
    if jac == "diagonal" or jac.startswith("block-diagonal (k="):
        return NewtonSolve(sp.index, tuple(sp.states), core=loop.core, block=len(sp.states))
    why = f"{jac} Jacobian" + (f": {sp.jacobian_reason}" if sp.jacobian_reason else "")
    return Rejection(NewtonSolve.title, why + "; a diagonal or per-element block Jacobian is needed (quasi-Newton "
                     "with a dense Jacobian's diagonal is not implemented)", sp.line)


def _dense_semiring(sp: StagePlan) -> list:
    """The parallel scan of semiring matrix products for a small state, then the sequential
    semiring matrix-vector loop."""
    from dataclasses import replace
    semiring = {"maxplus": "max-plus", "logsumexp": "log-sum-exp"}[sp.nodes["kind"]]
    n = sp.nodes["n"]
    loop = DenseSemiringScan(sp.index, tuple(sp.states), semiring=semiring, A=sp.nodes["A"], b=sp.nodes["b"], n=n,
                             products=False)
    if n <= DENSE_SEMIRING_PRODUCTS_MAX:
        return [replace(loop, products=True), loop]
    return [Rejection(f"{DenseSemiringScan.title}, parallel scan of semiring matrix products",
                      f"N = {n} > {DENSE_SEMIRING_PRODUCTS_MAX}: the [N, N] products cost N times the work of "
                      "the matrix-vector loop", sp.line), loop]


def _line(n: Node | None) -> int | None:
    """The .rec line of n: its own, else the nearest computed source's (a declaration's last)."""
    order = list(reversed(toposort([n]))) if n is not None else []
    for x in sorted(order, key=lambda x: x.op in (Op.INPUT, Op.PARAM, Op.CONST)):
        if x.span is not None:
            return x.span.line
    return None


def _diagonal(ctx: Context, sp: StagePlan, core: set[int]) -> list:
    from recdsl.analysis import has_outer
    s = sp.states[0]
    a, b, log_a = sp.nodes["a"], sp.nodes["b"], sp.nodes.get("log_a")
    key = (sp.index, tuple(sp.states))
    matrix = ctx.ir.states[s].rank == 2
    out = []
    if matrix and has_outer(b):
        out.append(_chunk_diag(ctx, sp, core, a, b, log_a))
    out.append(ElementScan(*key, semiring="affine", a=a, b=b, log_a=log_a if a is not None else None,
                           flattened=matrix))
    return out


def _chunk_diag(ctx: Context, sp: StagePlan, core: set[int], a, b, log_a):
    """S' = d S + outer(k, v) with d a scalar or per-key decay, read only through q @ S."""
    title, s = ChunkDiag.title, sp.states[0]
    if a is not None and a.rank not in (0, 2):
        return Rejection(title, f"the decay {_text(a)} is not a scalar or per-axis decay", _line(a))
    parts = split_outer(b)
    if parts is None:
        return Rejection(title, f"the input {_text(b)} is not an outer product", _line(b))
    reads = ctx.readouts(s, core)
    if reads is None:
        return Rejection(title, f"{s} is used other than through q @ {s}, {s} @ q or q @ ({s} + y)", sp.line)
    flipped = {r.transposed for r in reads}
    if len(flipped) > 1:
        return Rejection(title, f"{s} is read out along both axes", sp.line)
    transposed = flipped == {True}
    scal, k, v = parts
    if transposed:   # run on the transposed state: the outer product's sides and the decay's axis swap
        k, v = v, k
    if scal is not None:
        k = _mk(Op.MUL, [scal, k], k.shape)
    key_axis = 1 if transposed else 0
    if a is not None and a.rank == 2 and a.shape[1 - key_axis] != ONE:
        return Rejection(title, f"the decay {_text(a)} varies along the value axis", _line(a))
    g = log_a if a is not None else None
    return ChunkDiag(sp.index, tuple(sp.states), k=k, v=v, decay=_per_key(a, key_axis), log_decay=_per_key(g, key_axis),
                     signed=a is not None and g is None, readouts=tuple(reads), transposed=transposed)


def _per_key(n: Node | None, key_axis: int) -> Node | None:
    """A [K, 1] (or, transposed, [1, K]) decay as the [K] vector the kernels take."""
    if n is None or n.rank != 2:
        return n
    index = (slice(None), 0) if key_axis == 0 else (0, slice(None))
    return _mk(Op.INDEX, [n], (n.shape[key_axis],), index)


def _text(n: Node | None) -> str:
    from recdsl.analysis.symbolic import node_text
    return node_text(n) if n is not None else "1"


def _log_form(a: Node | None, ir: IRCell) -> Node | None:
    """log a, when a is proven positive (whatever its spelling), else None."""
    from recdsl.analysis.ranges import log_form
    return None if a is None else log_form(a, ir)


def _rank_one(ctx: Context, sp: StagePlan, title: str):
    """(term, decay, log decay) of a stage with one rank-1 term and a decay proven positive,
    else the Rejection."""
    terms = sp.nodes["terms"]
    if len(terms) != 1:
        return Rejection(title, f"rank {sp.rank}: the form handles one rank-1 update per step", sp.line)
    decay = sp.nodes["decay"]
    g = _log_form(decay, ctx.ir)
    if decay is not None and g is None:
        return Rejection(title, f"the decay {_text(decay)} is not proven positive", _line(decay))
    return terms[0], decay, g


def _delta_rule(ctx: Context, sp: StagePlan, core: set[int]):
    """S' = exp(g) (I - beta k k^T) S + beta k v^T (g scalar or absent), read out as q @ S'."""
    title, s = ChunkDelta.title, sp.states[0]
    found = _rank_one(ctx, sp, title)
    if isinstance(found, Rejection):
        return found
    t, decay, g = found
    if t.u is not t.w:
        return Rejection(title, f"the rank-1 update outer({_text(t.u)}, {_text(t.w)} @ {s}) is not symmetric "
                         "(u != w)", _line(t.w))
    if decay is not None and decay.rank != 0:
        return Rejection(title, f"the decay {_text(decay)} is not a scalar", _line(decay))
    fs = factors(t.scale)
    for d in factors(decay):   # the erase term carries the decay's factors (a product of gates too)
        hit = next((f for f in fs if f is d), None)
        if hit is None:
            return Rejection(title, "the rank-1 term is not gated by the same decay", _line(t.scale))
        fs.remove(hit)
    if any(f.rank != 0 for f in fs):
        return Rejection(title, "the update strength is not a scalar", _line(t.scale))
    beta = product(fs + [Node(Op.CONST, (), (), -1.0)])
    parts = split_outer(sp.nodes["b"])
    if parts is None or parts[1] is not t.u:
        return Rejection(title, "the written value is not outer(k, v) with the same k", _line(sp.nodes["b"]))
    scal, _, v = parts
    if scal is not None:
        fs_b = factors(scal)
        if not (len(fs_b) == 1 and any(f is fs_b[0] for f in factors(beta))):
            v = _mk(Op.MUL, [v, _mk(Op.DIV, [scal, beta], ())], v.shape)
    reads = _one_inclusive_readout(ctx, s, core, title, sp.line)
    if isinstance(reads, Rejection):
        return reads
    return ChunkDelta(sp.index, tuple(sp.states), k=t.u, v=v, beta=beta, log_decay=g, readouts=reads)


def _one_inclusive_readout(ctx: Context, s: str, core: set[int], title: str, line):
    reads = ctx.readouts(s, core)
    if reads is None or any(not r.inclusive for r in reads):
        return Rejection(title, f"{s} is used other than through q @ {s}'", line)
    if len(reads) != 1 or reads[0].transposed or reads[0].extra is not None:
        return Rejection(title, f"{s} is read out other than once as q @ {s}'", line)
    return tuple(reads)


def _dplr(ctx: Context, sp: StagePlan, core: set[int]):
    """S' = diag(d) S + outer(a, b @ S) + outer(k, v), d per key (or scalar), proven positive."""
    title, s = ChunkDPLR.title, sp.states[0]
    found = _rank_one(ctx, sp, title)
    if isinstance(found, Rejection):
        return found
    t, _, g = found
    if g is None:
        g = Node(Op.CONST, (), (), 0.0)
    elif g.rank == 2:
        g = _mk(Op.INDEX, [g], (g.shape[0],), (slice(None), 0))
    left = t.u
    if t.scale is not None:
        scale = t.scale if t.scale.rank == 0 else _mk(Op.INDEX, [t.scale], (t.scale.shape[0],), (slice(None), 0))
        left = _mk(Op.MUL, [scale, left], left.shape)
    parts = split_outer(sp.nodes["b"])
    if parts is None:
        return Rejection(title, f"the written value {_text(sp.nodes['b'])} is not an outer product",
                         _line(sp.nodes["b"]))
    scal, k, v = parts
    if scal is not None:
        k = _mk(Op.MUL, [scal, k], k.shape)
    reads = _one_inclusive_readout(ctx, s, core, title, sp.line)
    if isinstance(reads, Rejection):
        return reads
    return ChunkDPLR(sp.index, tuple(sp.states), k=k, v=v, a=left, b=t.w, log_decay=g, readouts=reads)


def _signed_terms(n: Node) -> list:
    """n as a signed sum of terms (ADD / SUB / NEG looked through), left to right; walked
    with a stack, not recursion (n Householder steps are a sum about 2n deep)."""
    out = []
    stack = [(n, 1.0)]
    while stack:
        x, sign = stack.pop()
        if x.op == Op.ADD:
            stack += ((x.srcs[1], sign), (x.srcs[0], sign))
        elif x.op == Op.SUB:
            stack += ((x.srcs[1], -sign), (x.srcs[0], sign))
        elif x.op == Op.NEG:
            stack.append((x.srcs[0], -sign))
        else:
            out.append((sign, x))
    return out


def _scaled_outer(n: Node):
    """n == beta * outer(u, w) with beta a scalar: (beta, u, w), else None."""
    if n.op != Op.MUL:
        return None
    a, b = n.srcs
    for beta, o in ((a, b), (b, a)):
        if beta.rank == 0 and o.op == Op.OUTER:
            return beta, o.srcs[0], o.srcs[1]
    return None


def _householder_steps(ir: IRCell, s: str):
    """S' as n delta-rule steps applied in turn, S_j = S_{j-1} - beta_j outer(k_j, k_j @ S_{j-1})
    + beta_j outer(k_j, v_j): the list of {k, v, beta} in order, or None. Works on the
    update's signed terms (the analysis may have flattened the steps' sums into one): each
    step is an erase term reading the sum of S and the earlier steps' terms, and a write
    term with the same beta and k."""
    state = ir.states[s]
    terms = _signed_terms(ir.updates[s])
    if sum(1 for sg, t in terms if t is state and sg == 1.0) != 1:
        return None
    groups: dict = {}
    for sg, t in terms:
        if t is state:
            continue
        so = _scaled_outer(t)
        if so is None:
            return None
        beta, k, w = so
        key = (beta.id, k.id)
        g = groups.setdefault(key, {"k": k, "beta": beta, "erase": None, "v": None})
        if sg == -1.0 and w.op == Op.MATMUL and w.srcs[0] is k and g["erase"] is None:
            g["erase"] = (t, w.srcs[1])
        elif sg == 1.0 and g["v"] is None:
            g["v"] = (t, w)
        else:
            return None
    if any(g["erase"] is None or g["v"] is None for g in groups.values()):
        return None
    # What each erase term reads, as a set of signed terms, computed once (not per round:
    # that made the matching cubic in the number of steps).
    todo = list(groups.values())
    for g in todo:
        src = g["erase"][1]
        g["reads"] = {(1.0, state.id)} if src is state else {(sg, t.id) for sg, t in _signed_terms(src)}
    steps, done = [], {(1.0, state.id)}
    while todo:
        nxt = [g for g in todo if g["reads"] == done]
        if len(nxt) != 1:
            return None
        g = nxt[0]
        todo.remove(g)
        steps.append({"k": g["k"], "v": g["v"][1], "beta": g["beta"]})
        done |= {(-1.0, g["erase"][0].id), (1.0, g["v"][0].id)}
    return steps


def _delta_product(ctx: Context, sp: StagePlan, core: set[int]):
    """DeltaProduct: S' is n delta-rule steps applied in turn (Householder products). They
    run as one delta rule over a sequence n times as long (the steps interleaved), read
    out after the last step of each token -- the chunkwise WY/UT form again."""
    title, s = HouseholderProducts.title, sp.states[0]
    steps = _householder_steps(ctx.ir, s)
    if steps is None or len(steps) < 2:
        return Rejection(title, f"{s}' is not two or more delta-rule steps applied in turn", sp.line)
    reads = _one_inclusive_readout(ctx, s, core, title, sp.line)
    if isinstance(reads, Rejection):
        return reads
    return HouseholderProducts(sp.index, tuple(sp.states), steps=tuple(steps), readouts=reads)
