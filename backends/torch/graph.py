"""The torch backend over grids and DAGs (LANGUAGE.md §6), vectorised; layouts and meaning
as the reference's (backends/reference/graph.py), which is its oracle.

grid2d (form Wavefront, kernel torch.wavefront): the cells (x, y) with x + y = d depend
only on diagonal d-1 (left = (x-1, y), up = (x, y-1)), so the step runs once per
anti-diagonal, d = 0 .. X+Y-2, over B x the diagonal's cells as one batch: one call of the
step compiled from the IR (the shared emitter), no Python loop over cells.

dag (form LevelSync, kernel torch.level_sync): nodes levelled topologically (level 0: no
in-edges); each level's nodes run at once. A value is evaluated in one of four contexts,
each a flat batch B x its size: the level's nodes (N), their in-edges (I: inside sum_in of
a node value), their out-edges (O: an `on edge` state's update), and (in-edge, out-edge)
pairs meeting at a node (IO: inside sum_in of an `on edge` update). sum_in reduces I -> N
(or IO -> O) with index_add. States are written into [B, N, ...] / [B, E, ...] buffers as
levels finish and read by index: memory O(N + E) (plus the IO pairs when a pair or edge
state is read inside sum_in of an edge update). Backward: autograd through these ops."""
from __future__ import annotations

import torch

from recdsl.errors import RecError
from recdsl.ir import IRCell, Node, Op, toposort
from recdsl.torch_expr import compile_nodes

GRAPH_KERNELS = ("torch.wavefront", "torch.level_sync")


class GraphProgram:
    """The compiled forward of a grid / DAG cell: run_graph(xs, params, init, edges, dtype)."""

    def __init__(self, plan, selection):
        self.ir: IRCell = plan.ir
        self.selection = selection
        names = {c.kernel.name for c in selection.stages}
        if not names or not names <= set(GRAPH_KERNELS):
            raise RecError(f"the torch backend runs `over {self.ir.over}` only with its graph kernels, "
                           f"selected: {', '.join(sorted(names)) or 'none'}")
        self.kernel = names.pop()
        self.ran: list[str] = []
        self.source = (f"# {self.ir.name} over {self.ir.over}: {self.kernel} (backends/torch/graph.py)\n"
                       + "".join(f"# stage {c.stage}: {c.summary()}\n" for c in selection.stages))
        self.native = False
        self.fused: list = []      # as an emitter: no C loop
        self.kernels: list = []    # as the triton emitter (which borrows these kernels): no Triton kernel
        if self.ir.over == "grid2d":
            order = toposort(list(self.ir.updates.values()) + list(self.ir.outputs.values()))
            self.leaves = [n for n in order if n.op in (Op.INPUT, Op.PARAM, Op.STATE)]
            self.roots = list(self.ir.updates.values()) + list(self.ir.outputs.values())
            self.step = compile_nodes(self.roots, self.leaves)

    def run(self, *args, **kw):
        raise RecError(f"a cell over {self.ir.over} runs through forward(...) on grids / DAGs")

    def run_graph(self, xs: dict, params: dict, init: dict, edges, dtype):
        self.ran.clear()
        self.ran.extend(c.kernel.name for c in self.selection.stages)
        if self.ir.over == "grid2d":
            return self._grid(xs, params, init, dtype)
        return run_dag(self.ir, xs, params, init, edges, dtype)

    # ------------------------------------------------------------------ grid2d
    def _grid(self, xs, params, init, dtype):
        ir = self.ir
        X0 = next(iter(xs.values()))
        B, NX, NY = X0.shape[:3]
        device = X0.device
        P = {n: p[None] for n, p in params.items()}
        upd = list(ir.updates)
        prev: dict[str, torch.Tensor] = {}      # state -> [B, NX + 1, ...]: diagonal d-1 by x + 1 (init elsewhere)
        per_diag: list[list[torch.Tensor]] = []
        cells_x = []
        for d in range(NX + NY - 1):
            lo, hi = max(0, d - NY + 1), min(d, NX - 1)
            xi = torch.arange(lo, hi + 1, device=device)
            yi = d - xi
            L = hi - lo + 1
            vals = []
            for n in self.leaves:
                if n.op == Op.INPUT:
                    v = xs[n.arg][:, xi, yi]
                    vals.append(v.reshape((B * L,) + v.shape[2:]))
                elif n.op == Op.PARAM:
                    vals.append(P[n.arg])
                else:
                    name, where = n.arg
                    if where not in ("left", "up"):
                        raise RecError(f"over grid2d a state is read as {name}.left or {name}.up")
                    if d == 0:
                        vals.append(init[name])
                        continue
                    v = prev[name][:, xi if where == "left" else xi + 1]   # left: x-1 (+1 offset); up: x
                    vals.append(v.reshape((B * L,) + v.shape[2:]))
            got = self.step(vals, 1, dtype, device)
            full = [_full(v, (B * L,) + ir.shape_of(r)).reshape((B, L) + ir.shape_of(r)) for v, r in zip(got, self.roots)]
            per_diag.append(full)
            cells_x.append(xi)
            for s, v in zip(upd, full[:len(upd)]):
                base = _full(init[s], (B,) + ir.shape_of(ir.updates[s]))[:, None]
                pieces = [base.expand((B, lo + 1) + v.shape[2:]), v, base.expand((B, NX - hi) + v.shape[2:])]
                prev[s] = torch.cat(pieces, 1)[:, :NX + 1]
        # diagonal order -> row-major [B, X, Y]
        x_all = torch.cat(cells_x)
        d_all = torch.cat([torch.full_like(x, d) for d, x in enumerate(cells_x)])
        perm = torch.empty_like(x_all)
        perm[x_all * NY + (d_all - x_all)] = torch.arange(x_all.numel(), device=device)
        outs = [torch.cat([f[i] for f in per_diag], 1)[:, perm] for i in range(len(self.roots))]
        outs = [o.reshape((B, NX, NY) + o.shape[2:]) for o in outs]
        states = dict(zip(upd, outs[:len(upd)]))
        return dict(zip(ir.outputs, outs[len(upd):])), states


def _full(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """v (a value of a batch, possibly broadcast: leading 1s, or fewer axes) at its full shape."""
    if v.dim() < len(shape):
        v = v.reshape((1,) * (len(shape) - v.dim()) + tuple(v.shape))
    return v.expand(shape)


# ---------------------------------------------------------------------- dag
def levels(N: int, edges: torch.Tensor) -> list[torch.Tensor]:
    """The nodes of each topological level (level 0: no in-edges), as index tensors."""
    E = edges.shape[0]
    if E:
        u, v = edges[:, 0], edges[:, 1]
        if bool(((u < 0) | (u >= N) | (v < 0) | (v >= N) | (u == v)).any()):
            e = int(((u < 0) | (u >= N) | (v < 0) | (v >= N) | (u == v)).nonzero()[0])
            raise RecError(f"edge {e} = ({int(u[e])}, {int(v[e])}) is not between two distinct nodes of 0..{N - 1}")
    indeg = torch.zeros(N, dtype=torch.long).index_add_(0, edges[:, 1], torch.ones(E, dtype=torch.long))
    order = torch.argsort(edges[:, 0], stable=True)      # out-edges grouped by source
    start = torch.zeros(N + 1, dtype=torch.long)
    start[1:] = torch.cumsum(torch.bincount(edges[:, 0], minlength=N), 0)
    out, frontier, done = [], (indeg == 0).nonzero()[:, 0], 0
    while frontier.numel():
        out.append(frontier)
        done += frontier.numel()
        counts = start[frontier + 1] - start[frontier]
        idx = torch.repeat_interleave(start[frontier], counts) + (
            torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))
        succ = edges[order[idx], 1]
        indeg.index_add_(0, succ, -torch.ones_like(succ))
        frontier = torch.unique(succ[indeg[succ] == 0])
    if done != N:
        raise RecError("the edges contain a cycle: over dag the graph must be acyclic")
    return out


class _Ctx:
    """A context of evaluation: per flat position, the node it is at, its in-edge, out-edge."""

    def __init__(self, node, ein=None, eout=None):
        self.node, self.ein, self.eout = node, ein, eout
        self.size = node.numel()


def run_dag(ir: IRCell, xs: dict, params: dict, init: dict, edges, dtype):
    cell = ir.checked
    node_inputs = list(cell.inputs)
    if not node_inputs:
        raise RecError(f"cell {cell.name} runs over a DAG but has no node input to give the node count")
    X0 = xs[node_inputs[0]]
    B, N = X0.shape[:2]
    device = X0.device
    edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2).cpu()
    E = edges.shape[0]
    lv = levels(N, edges)
    src, dst = edges[:, 0], edges[:, 1]
    on_edge = {s for s, var in cell.states.items() if var.decl.on_edge}
    edge_names, pair_names = set(cell.edges), set(cell.pairs)
    P = {n: p[None] for n, p in params.items()}
    fns: dict[int, object] = {}
    node_upd = {s: u for s, u in ir.updates.items() if s not in on_edge}
    edge_upd = {s: u for s, u in ir.updates.items() if s in on_edge}
    # state buffers (written in place per level; reads are index_select, which keeps no values)
    def buffer(s, n):
        b = _full(init[s], (B,) + ir.shape_of(ir.updates[s]))
        return b[:, None].expand((B, n) + b.shape[1:]).clone()
    nbuf = {s: buffer(s, N) for s in node_upd}
    ebuf = {s: buffer(s, E) for s in edge_upd}
    obuf = {o: None for o in ir.outputs}
    dev = lambda t: t.to(device)  # noqa: E731

    def flat(v):
        return v.reshape((-1,) + v.shape[2:])

    def leaf(n: Node, c: _Ctx):
        if n.op == Op.INPUT:
            if n.arg in edge_names:
                return flat(xs[n.arg][:, dev(c.ein if c.ein is not None else c.eout)])
            if n.arg in pair_names:
                return flat(xs[n.arg][:, dev(c.ein), dev(c.eout)])
            return flat(xs[n.arg][:, dev(c.node)])
        if n.op == Op.PARAM:
            return P[n.arg]
        if n.op == Op.STATE:
            name = n.arg[0]
            if name in on_edge:
                return flat(ebuf[name].index_select(1, dev(c.ein)))
            return flat(nbuf[name].index_select(1, dev(src[c.ein])))
        return torch.tensor(n.arg, dtype=dtype, device=device)

    def evaluate(root: Node, c: _Ctx, inner: _Ctx, seg: torch.Tensor, memo: dict):
        """root's value in context c; sum_in(...) evaluates its argument in `inner` and sums
        it into c's positions `seg` (inner position -> c position)."""
        todo = [(root, False, False)]
        while todo:
            n, inside, ready = todo.pop()
            key = (n.id, inside)
            if key in memo:
                continue
            here = inner if inside else c
            if n.op in (Op.INPUT, Op.PARAM, Op.STATE) or (n.op == Op.CONST and not n.shape):
                memo[key] = leaf(n, here)
                continue
            if not ready:
                todo.append((n, inside, True))
                todo.extend((s, inside or n.op == Op.SUM_IN, False) for s in reversed(n.srcs))
                continue
            if n.op == Op.SUM_IN:
                part = memo[(n.srcs[0].id, True)]
                shape = ir.shape_of(n)
                part = _full(part, (B * inner.size,) + shape).reshape((B, inner.size) + shape)
                acc = torch.zeros((B, c.size) + shape, dtype=part.dtype, device=device)
                memo[key] = flat(acc.index_add(1, dev(seg), part))
                continue
            fn = fns.get(n.id)
            if fn is None:
                fn = fns[n.id] = compile_nodes([n], list(n.srcs))
            memo[key] = fn([memo[(s.id, inside)] for s in n.srcs], 1, dtype, device)[0]
        return memo[(root.id, False)]

    out_parts: dict[str, list] = {o: [] for o in ir.outputs}
    out_nodes: list[torch.Tensor] = []
    pos = torch.empty(N, dtype=torch.long)
    for nodes in lv:
        L = nodes.numel()
        pos[nodes] = torch.arange(L)
        in_level = torch.zeros(N, dtype=torch.bool)
        in_level[nodes] = True
        ein = in_level[dst].nonzero()[:, 0]
        ctxN = _Ctx(nodes)
        ctxI = _Ctx(dst[ein], ein=ein)
        memo: dict = {}
        new = {s: evaluate(u, ctxN, ctxI, pos[dst[ein]], memo) for s, u in node_upd.items()}
        outs = {o: evaluate(n, ctxN, ctxI, pos[dst[ein]], memo) for o, n in ir.outputs.items()}
        if edge_upd:
            eout = in_level[src].nonzero()[:, 0]
            if eout.numel():
                # pairs (in-edge e, out-edge o) with dst(e) = src(o): grouped by node
                opos = torch.empty(E, dtype=torch.long)
                opos[eout] = torch.arange(eout.numel())
                pe, po = _pairs(ein, dst[ein], eout, src[eout])
                ctxO = _Ctx(src[eout], eout=eout)
                ctxIO = _Ctx(src[po], ein=pe, eout=po)
                m2: dict = {}
                for s, u in edge_upd.items():
                    v = evaluate(u, ctxO, ctxIO, opos[po], m2)
                    shape = ir.shape_of(u)
                    v = _full(v, (B * eout.numel(),) + shape).reshape((B, eout.numel()) + shape)
                    ebuf[s].index_copy_(1, dev(eout), v)
        for s, v in new.items():
            shape = ir.shape_of(node_upd[s])
            nbuf[s].index_copy_(1, dev(nodes), _full(v, (B * L,) + shape).reshape((B, L) + shape))
        for o, v in outs.items():
            shape = ir.shape_of(ir.outputs[o])
            out_parts[o].append(_full(v, (B * L,) + shape).reshape((B, L) + shape))
        out_nodes.append(nodes)
    order = torch.cat(out_nodes)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N)
    del obuf
    outs = {o: torch.cat(parts, 1)[:, dev(inv)] for o, parts in out_parts.items()}
    states = {**{s: nbuf[s] for s in node_upd}, **{s: ebuf[s] for s in edge_upd}}
    return outs, states


def _pairs(ein, ein_node, eout, eout_node):
    """All (in-edge, out-edge) pairs meeting at a node: the in-edges ein at ein_node and the
    out-edges eout at eout_node, joined on the node (sorted-merge, no dense [E, E])."""
    oi = torch.argsort(eout_node, stable=True)
    on = eout_node[oi]
    first = torch.searchsorted(on, ein_node)
    last = torch.searchsorted(on, ein_node, right=True)
    counts = last - first
    rep_in = torch.repeat_interleave(ein, counts)
    off = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rep_out = eout[oi[torch.repeat_interleave(first, counts) + off]]
    return rep_in, rep_out
