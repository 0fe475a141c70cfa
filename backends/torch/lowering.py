"""Plan -> the per-stage lowering of the `torch` backend: which kernel runs each stage and
the IR nodes it needs (decays, inputs, readouts), found by small pattern matches on the
coefficients the analysis derived. A stage that does not match the fast form of its
class falls back to a form that always works (an element scan with the state flattened,
or the sequential loop), and the reason is recorded."""
from __future__ import annotations

from dataclasses import dataclass, field

from recdsl import plan as P
from recdsl.analysis import log_decay
from recdsl.ir import IRCell, Node, Op
from recdsl.types import ONE


@dataclass
class StageLowering:
    kind: str                        # vectorised | element | block | chunk_diag | chunk_delta | loop
    stage: P.StagePlan
    describe: str
    nodes: dict = field(default_factory=dict)
    readouts: list = field(default_factory=list)   # (matmul node, q node, inclusive)


def _mk(op, srcs, shape, arg=None):
    return Node(op, tuple(srcs), tuple(shape), arg)


def factors(n: Node | None) -> list[Node]:
    """The factors of a product tree (MUL and NEG as a factor -1)."""
    if n is None:
        return []
    if n.op == Op.MUL:
        return factors(n.srcs[0]) + factors(n.srcs[1])
    if n.op == Op.NEG:
        return [Node(Op.CONST, (), (), -1.0)] + factors(n.srcs[0])
    return [n]


def product(fs: list[Node]) -> Node | None:
    out = None
    for f in fs:
        out = f if out is None else _mk(Op.MUL, [out, f], _bshape(out.shape, f.shape))
    return out


def _bshape(a, b):
    from recdsl.types import broadcast
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


def _readouts(ir: IRCell, state: str, core: set[int], users) -> list | None:
    """Every use of S (previous) and S' outside the update must be q @ S or q @ S' with q
    free of S: those are the fused readouts. None if some use is not."""
    prev, new = ir.states[state], ir.updates[state]
    out = []
    for node, inclusive in ((new, True), (prev, False)):
        for u in users.get(node.id, []):
            if u.id in core:
                continue
            if u.op == Op.MATMUL and u.srcs[1] is node and u.srcs[0].rank == 1 and u.srcs[0] is not node:
                out.append((u, u.srcs[0], inclusive))
            else:
                return None
    if any(k.id == new.id for k in ir.outputs.values()):
        return None  # the whole matrix state is an output
    return out


def stage_core(ir: IRCell, states: list[str], place: dict[int, int], k: int) -> list[Node]:
    """The nodes the stage's recurrence must compute every step: those that read the
    stage's states and lead to its updates."""
    from recdsl.ir import toposort
    roots = [ir.updates[s] for s in states]
    return [n for n in toposort(roots) if place[n.id] == k]


def lower_stage(ir: IRCell, sp: P.StagePlan, place: dict[int, int], users) -> StageLowering:
    k = sp.index
    core = {n.id for n in stage_core(ir, sp.states, place, k)}
    if sp.cls == P.HOISTED:
        return StageLowering("vectorised", sp, "no recurrence: computed for all steps at once")
    if sp.cls == P.DIAGONAL:
        s = sp.states[0]
        a, b = sp.nodes["a"], sp.nodes["b"]
        state = ir.states[s]
        if state.rank == 2 and "chunkwise" in sp.lowering:
            why = None
            g = sp.nodes.get("log_a")
            if a is None:
                g = None
            elif g is None:
                why = "its decay is not written as exp(.), sigmoid(.) or 1 - sigmoid(.)"
            elif not (g.rank == 0 or (g.rank == 2 and g.shape[1] == ONE)):
                why = "its decay varies along the value axis"
            parts = split_outer(b)
            if parts is None:
                why = why or "its input is not an outer product"
            reads = _readouts(ir, s, core, users)
            if reads is None:
                why = why or "the state is used other than through q @ S"
            if why is None:
                if g is not None and g.rank == 2:
                    g = _mk(Op.INDEX, [g], (g.shape[0],), (slice(None), 0))
                scal, u, w = parts
                if scal is not None:
                    u = _mk(Op.MUL, [scal, u], u.shape)
                return StageLowering("chunk_diag", sp, "chunkwise (intra-chunk matmuls, state passed between chunks)",
                                     {"k": u, "v": w, "g": g}, reads)
            return StageLowering("element", sp, f"element scan over the flattened state ({why})",
                                 _diag_nodes(sp, a, b))
        return StageLowering("element", sp, "element scan" + (" (decay in log space)" if sp.nodes.get("log_a")
                                                               is not None else ""), _diag_nodes(sp, a, b))
    if sp.cls == P.SEMIRING:
        kind = {"maxplus": "maxplus", "logsumexp": "lse"}[sp.nodes["kind"]]  # the scan kernels' names
        return StageLowering("element", sp, f"element scan ({sp.detail})",
                             {"kind": kind, "a": sp.nodes["a"], "b": sp.nodes["b"]})
    if sp.cls == P.BLOCK_DIAGONAL:
        return StageLowering("block", sp, f"block scan ({sp.detail})", dict(sp.nodes))
    if sp.cls == P.LOW_RANK:
        low = _delta_rule(ir, sp, core, users)
        if isinstance(low, StageLowering):
            return low
        prod = _delta_product(ir, sp, core, users)
        if prod is not None:
            return prod
        return StageLowering("loop", sp, f"sequential loop ({low})")
    return StageLowering("loop", sp, "sequential loop over the stage's step"
                         + (" (hoisted work precomputed)" if sp.cls in (P.NONLINEAR, P.DENSE) else ""))


def _diag_nodes(sp, a, b) -> dict:
    """A decay written exp(g) / sigmoid(u) / 1 - sigmoid(u) is scanned from its log: the
    exponential happens inside the scan, one pass over memory less."""
    g = sp.nodes.get("log_a")
    if a is not None and g is not None:
        return {"kind": "diagexp", "a": g, "b": b}
    return {"kind": "diag", "a": a, "b": b}


def _delta_rule(ir, sp, core, users):
    s = sp.states[0]
    terms = sp.nodes["terms"]
    if len(terms) != 1:
        return f"rank {sp.rank} with cross terms: the chunkwise form here handles one rank-1 update per step"
    t = terms[0]
    if t.u is not t.w:
        return "the rank-1 update is not symmetric (u != w)"
    decay = sp.nodes["decay"]
    if decay is not None and decay.rank != 0:
        return "the decay is not a scalar"
    g = None
    if decay is not None:
        g = log_decay(decay)
        if g is None:
            return "the decay is not written as exp(.) or sigmoid(.)"
    fs = factors(t.scale)
    if decay is not None:
        hit = [f for f in fs if f is decay]
        if not hit:
            return "the rank-1 term is not gated by the same decay"
        fs = [f for f in fs if f is not hit[0]]
    if any(f.rank != 0 for f in fs):
        return "the update strength is not a scalar"
    beta = product(fs + [Node(Op.CONST, (), (), -1.0)])
    parts = split_outer(sp.nodes["b"])
    if parts is None or parts[1] is not t.u:
        return "the written value is not outer(k, v) with the same k"
    scal, _, v = parts
    if scal is not None:
        fs_b = factors(scal)
        if not (len(fs_b) == 1 and any(f is fs_b[0] for f in factors(beta))):
            v = _mk(Op.MUL, [v, _mk(Op.DIV, [scal, beta], ())], v.shape)
    reads = _readouts(ir, s, core, users)
    if reads is None or any(not inc for _, _, inc in reads):
        return "the state is used other than through q @ S'"
    if len(reads) != 1:
        return f"the state is read out {len(reads)} times; the chunkwise form here fuses exactly one readout"
    return StageLowering("chunk_delta", sp, "chunkwise delta rule (WY/UT form)",
                         {"k": t.u, "v": v, "beta": beta, "g": g}, reads)


def _signed_terms(n: Node, sign: float = 1.0, out=None) -> list:
    """n as a signed sum of terms (ADD / SUB / NEG looked through)."""
    out = [] if out is None else out
    if n.op == Op.ADD:
        _signed_terms(n.srcs[0], sign, out)
        _signed_terms(n.srcs[1], sign, out)
    elif n.op == Op.SUB:
        _signed_terms(n.srcs[0], sign, out)
        _signed_terms(n.srcs[1], -sign, out)
    elif n.op == Op.NEG:
        _signed_terms(n.srcs[0], -sign, out)
    else:
        out.append((sign, n))
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
    steps, done = [], {(1.0, state.id)}
    todo = list(groups.values())
    while todo:
        nxt = [g for g in todo if g["erase"][1] is state or
               {(sg, t.id) for sg, t in _signed_terms(g["erase"][1])} == done]
        if len(nxt) != 1:
            return None
        g = nxt[0]
        todo.remove(g)
        steps.append({"k": g["k"], "v": g["v"][1], "beta": g["beta"]})
        done |= {(-1.0, g["erase"][0].id), (1.0, g["v"][0].id)}
    return steps


def _delta_product(ir: IRCell, sp: P.StagePlan, core: set[int], users):
    """DeltaProduct: S' is n delta-rule steps applied in turn (Householder products). They
    run as one delta rule over a sequence n times as long (the steps interleaved), read
    out after the last step of each token -- the chunkwise WY/UT form again."""
    s = sp.states[0]
    steps = _householder_steps(ir, s)
    if steps is None or len(steps) < 2:
        return None
    reads = _readouts(ir, s, core, users)
    if reads is None or len(reads) != 1 or not reads[0][2]:
        return None
    return StageLowering("chunk_delta_product", sp,
                         f"chunkwise delta rule (WY/UT form) over the {len(steps)} Householder steps of each token "
                         "interleaved", {"steps": steps}, reads)
