"""The torch backend over grids and DAGs (LANGUAGE.md §6), vectorised; layouts and meaning
as the reference's (backends/reference/graph.py), which is its oracle.

grid2d (form Wavefront, kernel torch.wavefront). On CPU in fp32/fp64 with a C compiler the
whole grid is one generated C loop over the cells in raster order with a derived backward
(grid_loop.py; layer.ran says torch.c_grid): its per-cell leaves -- inputs and the
state-free values worth computing once -- are computed here over the whole grid first.
Otherwise (tensors off the CPU, no toolchain, an op the C loop has no form for): the cells
(x, y) with x + y = d depend only on diagonal d-1 (left = (x-1, y), up = (x, y-1)), so the
step runs once per anti-diagonal, d = 0 .. X+Y-2, over B x the diagonal's cells as one
batch, no Python loop over cells. The state-free part of the step runs over the whole grid
before the loop (one split into per-diagonal views: one backward node, not one per
diagonal); per diagonal only the state-reading rest runs, on rows ordered (cell, b) so that
a diagonal's inputs, and its left / up neighbours in diagonal d-1's states (kept with a
guard cell, the initial state, at each end), are contiguous slices: no gather per diagonal.

dag (form LevelSync, kernel torch.level_sync): nodes levelled topologically (level 0: no
in-edges); each level's nodes run at once. A value is evaluated in one of four contexts,
each a flat batch B x its size: the level's nodes (N), their in-edges (I: inside sum_in of
a node value), their out-edges (O: an `on edge` state's update), and (in-edge, out-edge)
pairs meeting at a node (IO: inside sum_in of an `on edge` update). sum_in reduces I -> N
(or IO -> O) with index_add. States are written into [B, N, ...] / [B, E, ...] buffers as
levels finish and read by index: memory O(N + E) (plus the IO pairs when a pair or edge
state is read inside sum_in of an edge update). Backward: autograd through these ops.
A `pair` input is [B, NP, ...] in recdsl.graph.line_pairs' order (by node, in-edge,
out-edge): the IO context of a level is the pairs at its nodes, read by pair id; nothing
is [E, E].

Heads ([B, ..., heads, *shape] inputs, [heads, *shape] params): values carry the heads axis
after the flat batch axis, two batch axes for the generated ops. The C grid loop runs one
head at a time (its params are per call); the wavefront and the DAG run all heads at once."""
from __future__ import annotations

import torch

from recdsl.errors import RecError
from recdsl.graph import as_edges, line_pairs, ordered_levels
from recdsl.ir import IRCell, Node, Op, toposort
from recdsl.torch_expr import compile_nodes

from .fused_loop import NotEligible
from .grid_loop import GridLoop

GRAPH_KERNELS = ("torch.c_grid", "torch.wavefront", "torch.level_sync")


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
            self.roots = list(self.ir.updates.values()) + list(self.ir.outputs.values())
            self.seq_fn = None
            self._grid_plan()

    def run(self, *args, **kw):
        raise RecError(f"a cell over {self.ir.over} runs through forward(...) on grids / DAGs")

    def run_graph(self, xs: dict, params: dict, init: dict, edges, dtype, heads: int = 0, pairs=None):
        self.ran.clear()
        self.ran.extend(c.kernel.name for c in self.selection.stages)
        if self.ir.over == "grid2d":
            return self._grid(xs, params, init, dtype, heads)
        return run_dag(self.ir, xs, params, init, edges, dtype, heads, pairs)

    # ------------------------------------------------------------------ grid2d
    def _grid_plan(self):
        """The wavefront's two parts (grid_split) as torch functions, and the C loop where
        the selection runs it."""
        ir = self.ir
        order, pre_nodes, core = grid_split(ir)
        pre = {n.id for n in pre_nodes}
        self.pre_nodes = pre_nodes
        static_leaves = [n for n in order if n.op in (Op.INPUT, Op.PARAM)]
        self.pre_fn = compile_nodes(self.pre_nodes, static_leaves) if self.pre_nodes else None
        self.pre_leaves = static_leaves
        self.step_leaves = self.pre_nodes + [n for n in order if n.op in (Op.PARAM, Op.STATE) and n.id not in pre]
        self.step = compile_nodes(self.roots, self.step_leaves)
        self.grid_loop, self.grid_loop_why = None, "the selection runs the wavefront"
        if self.kernel == "torch.c_grid":       # the registry checked it can (c_grid_why_not)
            self.grid_loop, self.grid_loop_why = GridLoop(ir, list(ir.updates), core, list(ir.outputs.values())), None

    def _grid(self, xs, params, init, dtype, heads: int = 0):
        loop = self.grid_loop
        if loop is not None and loop.usable(dtype, *xs.values(), *params.values(), *init.values()):
            if heads:
                return self._grid_c_per_head(xs, params, init, dtype, heads)
            return self._grid_c(xs, params, init, dtype)
        # not a CPU float tensor, or the C did not build (warned): recorded, never silent
        self.ran[:] = ["torch.wavefront" if k == "torch.c_grid" else k for k in self.ran]
        return self._grid_wavefront(xs, params, init, dtype, heads)

    def _grid_c_per_head(self, xs, params, init, dtype, heads: int):
        """The C loop once per head (inputs [B, X, Y, heads, ...], params [heads, ...], states
        [B, heads, ...]), results stacked back on the heads axis."""
        runs = [self._grid_c({n: x[:, :, :, h] for n, x in xs.items()},
                             {n: p[h] for n, p in params.items()},
                             {s: v[:, h].contiguous() for s, v in init.items()}, dtype)
                for h in range(heads)]
        outs = {o: torch.stack([r[0][o] for r in runs], 3) for o in self.ir.outputs}
        states = {s: torch.stack([r[1][s] for r in runs], 3) for s in runs[0][1]}
        return outs, states

    def _grid_c(self, xs, params, init, dtype):
        """The C raster loop: its per-cell leaves (inputs, state-free values) computed over
        the whole grid at once, row-major [B, X*Y, ...], then one C call."""
        ir, loop = self.ir, self.grid_loop
        first_input = next(iter(xs.values()))
        B, NX, NY = first_input.shape[:3]
        n_cells = B * NX * NY
        flat = {n: x.reshape((n_cells,) + x.shape[3:]) for n, x in xs.items()}
        P = {n: p[None] for n, p in params.items()}
        if self.seq_fn is None:
            self.seq_leaves = [n for n in toposort(loop.seqs) if n.op in (Op.INPUT, Op.PARAM)]
            self.seq_fn = compile_nodes(loop.seqs, self.seq_leaves)
        vals = [flat[n.arg] if n.op == Op.INPUT else P[n.arg] for n in self.seq_leaves]
        seqs = []
        for v, n in zip(self.seq_fn(vals, 1, dtype, first_input.device), loop.seqs):
            shape = ir.shape_of(n)
            v = torch.as_tensor(v, dtype=dtype)
            if v.dim() > len(shape):   # per cell (or a param's leading 1)
                v = _full(v, (n_cells,) + shape).reshape((B, NX * NY) + shape)
            seqs.append(v)
        states, reads = loop.run(seqs, params, init, B, NX, NY, dtype)
        return dict(zip(ir.outputs, reads)), states

    def _grid_wavefront(self, xs, params, init, dtype, heads: int = 0):
        ir = self.ir
        batch_axes = 2 if heads else 1
        head_shape = (heads,) if heads else ()
        first_input = next(iter(xs.values()))
        B, NX, NY = first_input.shape[:3]
        device = first_input.device
        P = {n: p[None] for n, p in params.items()}
        upd = list(ir.updates)
        nd = NX + NY - 1
        lo = [max(0, d - NY + 1) for d in range(nd)]
        Ls = [min(d, NX - 1) - lo[d] + 1 for d in range(nd)]
        maps = _grid_maps(NX, NY, B, device)
        # 1. everything that reads no state, over the whole grid at once, in diagonal order
        #    (rows: cell of diagonal 0, 1, ... by x, then b), split into one view per diagonal
        flat_in = {n: x.reshape((B * NX * NY,) + x.shape[3:]).index_select(0, maps.to_diag)
                   for n, x in xs.items()}
        pre_parts: list[list[torch.Tensor]] = []
        if self.pre_fn is not None:
            vals = [flat_in[n.arg] if n.op == Op.INPUT else P[n.arg] for n in self.pre_leaves]
            got = self.pre_fn(vals, batch_axes, dtype, device)
            rows = [L * B for L in Ls]
            for v, n in zip(got, self.pre_nodes):
                v = _full(v, (B * NX * NY,) + head_shape + ir.shape_of(n))
                pre_parts.append(torch.split(v, rows, 0))   # one SplitBackward for all diagonals
        # 2. the recurrent rest, one anti-diagonal at a time; a diagonal's states are kept
        #    with a guard cell (the initial state) at each end, so that the left and up
        #    neighbours of diagonal d are two contiguous slices of diagonal d-1's
        shapes = {s: head_shape + ir.shape_of(ir.updates[s]) for s in upd}
        guard = {s: _full(init[s], (B,) + shapes[s]) for s in upd}
        grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in list(xs.values()) + list(params.values()) + list(init.values())))
        starts = [0]
        for L in Ls:
            starts.append(starts[-1] + (L + 2) * B)
        if not grad:   # one buffer per state, written in place (guards filled once)
            bufs = {}
            for s in upd:
                buf = torch.empty((starts[-1],) + shapes[s], dtype=dtype, device=device)
                g = guard[s].to(dtype)
                for d in range(nd):
                    buf[starts[d]:starts[d] + B] = g
                    buf[starts[d + 1] - B:starts[d + 1]] = g
                bufs[s] = buf
        padded_parts: dict[str, list] = {s: [] for s in upd}
        out_parts: list[list] = [[] for _ in ir.outputs]
        prev = {s: torch.cat([guard[s], guard[s]], 0) for s in upd}   # diagonal -1: two guards
        for d in range(nd):
            L = Ls[d]
            off = (lo[d] - (lo[d - 1] if d else 0)) * B      # the left neighbour of the first cell
            vals = []
            k = 0
            for n in self.step_leaves:
                if n.op == Op.PARAM:
                    vals.append(P[n.arg])
                elif n.op == Op.STATE:
                    name, where = n.arg
                    if where not in ("left", "up"):
                        raise RecError(f"over grid2d a state is read as {name}.left or {name}.up")
                    a = off + (0 if where == "left" else B)
                    vals.append(prev[name][a:a + L * B])
                else:
                    vals.append(pre_parts[k][d])
                    k += 1
            got = self.step(vals, batch_axes, dtype, device)
            for s, v in zip(upd, got):
                v = _full(v, (L * B,) + shapes[s])
                if grad:
                    prev[s] = torch.cat([guard[s], v, guard[s]], 0)
                    padded_parts[s].append(prev[s])
                else:
                    region = bufs[s][starts[d]:starts[d + 1]]
                    region[B:B + L * B] = v
                    prev[s] = region
            for i, (o, v) in enumerate(zip(ir.outputs, got[len(upd):])):
                out_parts[i].append(_full(v, (L * B,) + head_shape + ir.shape_of(ir.outputs[o])))
        # 3. diagonal order -> row-major [B, X, Y, ...]
        states = {}
        for s in upd:
            whole = torch.cat(padded_parts[s], 0) if grad else bufs[s]
            states[s] = whole.index_select(0, maps.from_padded).reshape((B, NX, NY) + shapes[s])
        outs = {}
        for o, parts in zip(ir.outputs, out_parts):
            whole = torch.cat(parts, 0)
            outs[o] = whole.index_select(0, maps.from_diag).reshape((B, NX, NY) + whole.shape[1:])
        return outs, states


class _GridMaps:
    pass


_MAPS: dict = {}


def _grid_maps(NX: int, NY: int, B: int, device) -> _GridMaps:
    """Row maps between row-major [B, X, Y] and diagonal order (cell of diagonal 0, 1, ...
    by x, then b), with and without a guard cell at each end of every diagonal."""
    key = (NX, NY, B, str(device))
    got = _MAPS.get(key)
    if got is not None:
        return got
    x = torch.arange(NX)[:, None].expand(NX, NY)
    y = torch.arange(NY)[None, :].expand(NX, NY)
    d = (x + y).reshape(-1)
    xf = x.reshape(-1)
    order = torch.argsort(d * NX + xf)                # row-major cell index, in diagonal order
    pos = torch.empty_like(order)
    pos[order] = torch.arange(NX * NY)                # row-major cell -> its place in diagonal order
    b = torch.arange(B)
    m = _GridMaps()
    m.to_diag = (b[None, :] * (NX * NY) + order[:, None]).reshape(-1).to(device)     # diag row -> input row
    m.from_diag = (pos[None, :] * B + b[:, None]).reshape(-1).to(device)             # output row -> diag row
    ppos = pos + 2 * d + 1                            # the guards before this cell: 2 per diagonal before, 1 of its own
    m.from_padded = (ppos[None, :] * B + b[:, None]).reshape(-1).to(device)
    if len(_MAPS) > 64:
        _MAPS.clear()
    _MAPS[key] = m
    return m


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _full(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """v (a value of a batch, possibly broadcast: leading 1s, or fewer axes) at its full shape."""
    if v.dim() < len(shape):
        v = v.reshape((1,) * (len(shape) - v.dim()) + tuple(v.shape))
    return v.expand(shape)


# ---------------------------------------------------------------------- dag
class _Ctx:
    """A context of evaluation: per flat position, the node it is at, its in-edge, out-edge
    and (in the IO context) its line pair's id."""

    def __init__(self, node, ein=None, eout=None, pair=None):
        self.node, self.ein, self.eout, self.pair = node, ein, eout, pair
        self.size = node.numel()



def grid_split(ir: IRCell) -> tuple[list[Node], list[Node], list[Node]]:
    """(the step's nodes in order, what reads no state, the C loop's core) of a grid cell.

    The step splits into what reads no state (per cell: evaluated over the whole grid at
    once, before the wavefront or the C loop) and the recurrent rest. A state-free node
    that depends on an input is precomputed when a state-reading node (or a root) uses it,
    unless it is larger per cell than the inputs it is made of (an outer product k vᵀ):
    those stay in the step, made from their smaller sources, so that the grid-wide buffers
    hold no more than the inputs do. The core: the updates' nodes short of the precomputed
    ones (the outputs are the C loop's readouts)."""
    roots = list(ir.updates.values()) + list(ir.outputs.values())
    order = toposort(roots)
    dyn: dict[int, bool] = {}
    cell: dict[int, bool] = {}      # depends on an input (has a value per cell)
    for n in order:
        dyn[n.id] = n.op == Op.STATE or any(dyn[s.id] for s in n.srcs)
        cell[n.id] = n.op == Op.INPUT or (not dyn[n.id] and any(cell[s.id] for s in n.srcs))
    size = lambda n: _numel(ir.shape_of(n))  # noqa: E731

    def input_size(n, seen):
        if n.id in seen:
            return 0
        seen.add(n.id)
        if n.op == Op.INPUT:
            return size(n)
        return sum(input_size(s, seen) for s in n.srcs)

    pre: dict[int, Node] = {}
    visited: set[int] = set()

    def choose(n):
        if n.id in visited or not cell[n.id] or dyn[n.id]:
            return
        visited.add(n.id)
        if n.op != Op.INPUT and size(n) > max(input_size(n, set()), 1):
            for s in n.srcs:
                choose(s)
        else:
            pre[n.id] = n

    for n in order:
        if dyn[n.id]:
            for s in n.srcs:
                choose(s)
    for r in roots:
        choose(r)
    core, seen, stack = [], set(pre), [ir.updates[s] for s in ir.updates]
    while stack:
        n = stack.pop()
        if n.id in seen:
            continue
        seen.add(n.id)
        core.append(n)
        stack.extend(n.srcs)
    core_ids = {n.id for n in core}
    return order, list(pre.values()), [n for n in order if n.id in core_ids]


def c_grid_why_not(ir: IRCell) -> str | None:
    """Why the grid's C loop (grid_loop.py) cannot run this cell, or None (the registry's check)."""
    _, _, core = grid_split(ir)
    try:
        GridLoop(ir, list(ir.updates), core, list(ir.outputs.values()))
    except NotEligible as e:
        return f"no C grid loop: {e}"
    return None

def run_dag(ir: IRCell, xs: dict, params: dict, init: dict, edges, dtype, heads: int = 0, pairs=None):
    """`pairs`: line_pairs(edges) when the caller has it already (the runtime, for pair inputs)."""
    cell = ir.checked
    batch_axes = 2 if heads else 1
    head_shape = (heads,) if heads else ()
    node_inputs = list(cell.inputs)
    if not node_inputs:
        raise RecError(f"cell {cell.name} runs over a DAG but has no node input to give the node count")
    first_input = xs[node_inputs[0]]
    B, N = first_input.shape[:2]
    device = first_input.device
    edges = as_edges(edges, N)
    E = edges.shape[0]
    lv = ordered_levels(N, edges)
    src, dst = edges[:, 0], edges[:, 1]
    on_edge = {s for s, var in cell.states.items() if var.decl.on_edge}
    edge_names, pair_names = set(cell.edges), set(cell.pairs)
    P = {n: p[None] for n, p in params.items()}
    fns: dict[int, object] = {}
    node_upd = {s: u for s, u in ir.updates.items() if s not in on_edge}
    edge_upd = {s: u for s, u in ir.updates.items() if s in on_edge}
    shape_of = lambda n: head_shape + ir.shape_of(n)  # noqa: E731   a value's shape per batch row
    if edge_upd:   # the line graph's pairs, and each pair's node: a level's IO context is its nodes' pairs
        if pairs is None:
            pairs = line_pairs(edges) if E else torch.zeros((0, 2), dtype=torch.long)
        pair_node = dst[pairs[:, 0]]
    # state buffers (written in place per level; reads are index_select, which keeps no values)
    def buffer(s, n):
        b = _full(init[s], (B,) + shape_of(ir.updates[s]))
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
                return flat(xs[n.arg][:, dev(c.pair)])
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
                shape = shape_of(n)
                part = _full(part, (B * inner.size,) + shape).reshape((B, inner.size) + shape)
                acc = torch.zeros((B, c.size) + shape, dtype=part.dtype, device=device)
                memo[key] = flat(acc.index_add(1, dev(seg), part))
                continue
            fn = fns.get(n.id)
            if fn is None:
                fn = fns[n.id] = compile_nodes([n], list(n.srcs))
            memo[key] = fn([memo[(s.id, inside)] for s in n.srcs], batch_axes, dtype, device)[0]
        return memo[(root.id, False)]

    # each level's in-edges, out-edges and pairs, found once by sorting on the level (O(E log E)
    # in all, not a pass over every edge per level)
    level_of = torch.empty(N, dtype=torch.long)
    for i, nodes in enumerate(lv):
        level_of[nodes] = i

    def by_level(level_keys):
        order = torch.argsort(level_keys, stable=True)
        return torch.split(order, torch.bincount(level_keys, minlength=len(lv)).tolist())
    in_edges_of = by_level(level_of[dst])
    if edge_upd:
        out_edges_of, pairs_of = by_level(level_of[src]), by_level(level_of[pair_node])
    out_parts: dict[str, list] = {o: [] for o in ir.outputs}
    out_nodes: list[torch.Tensor] = []
    pos = torch.empty(N, dtype=torch.long)
    for level, nodes in enumerate(lv):
        L = nodes.numel()
        pos[nodes] = torch.arange(L)
        ein = in_edges_of[level]
        ctxN = _Ctx(nodes)
        ctxI = _Ctx(dst[ein], ein=ein)
        memo: dict = {}
        new = {s: evaluate(u, ctxN, ctxI, pos[dst[ein]], memo) for s, u in node_upd.items()}
        outs = {o: evaluate(n, ctxN, ctxI, pos[dst[ein]], memo) for o, n in ir.outputs.items()}
        if edge_upd:
            eout = out_edges_of[level]
            if eout.numel():
                # the pairs (in-edge e, out-edge o) meeting at this level's nodes
                opos = torch.empty(E, dtype=torch.long)
                opos[eout] = torch.arange(eout.numel())
                here = pairs_of[level]
                pe, po = pairs[here, 0], pairs[here, 1]
                ctxO = _Ctx(src[eout], eout=eout)
                ctxIO = _Ctx(src[po], ein=pe, eout=po, pair=here)
                m2: dict = {}
                for s, u in edge_upd.items():
                    v = evaluate(u, ctxO, ctxIO, opos[po], m2)
                    shape = shape_of(u)
                    v = _full(v, (B * eout.numel(),) + shape).reshape((B, eout.numel()) + shape)
                    ebuf[s].index_copy_(1, dev(eout), v)
        for s, v in new.items():
            shape = shape_of(node_upd[s])
            nbuf[s].index_copy_(1, dev(nodes), _full(v, (B * L,) + shape).reshape((B, L) + shape))
        for o, v in outs.items():
            shape = shape_of(ir.outputs[o])
            out_parts[o].append(_full(v, (B * L,) + shape).reshape((B, L) + shape))
        out_nodes.append(nodes)
    order = torch.cat(out_nodes)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N)
    del obuf
    outs = {o: torch.cat(parts, 1)[:, dev(inv)] for o, parts in out_parts.items()}
    states = {**{s: nbuf[s] for s in node_upd}, **{s: ebuf[s] for s in edge_upd}}
    return outs, states

