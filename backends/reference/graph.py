"""The reference backend over grids and DAGs (LANGUAGE.md §6): plain loops over cells or
nodes in dependency order, each evaluating the IR with the torch meaning of every op.

grid2d: inputs [B, X, Y, (heads,) *shape]; cell (x, y) reads `s.left` = the state at
(x-1, y) and `s.up` = the state at (x, y-1), or the initial value off the grid. Returns
outputs [B, X, Y, ...] and the state of every cell, [B, X, Y, ...]. (forward(flip=...) scans
from another corner by flipping the grid around this scan: recdsl/runtime.py.)

dag: forward(edges=LongTensor [E, 2] of (source, target) node pairs) with node inputs
[B, N, (heads,) ...], `edge` inputs [B, E, ...] and `pair` inputs [B, NP, ...], one value per
(in-edge, out-edge) pair meeting at a node in the order of recdsl.graph.line_pairs(edges)
(by node, then in-edge, then out-edge). Nodes run in topological order. Inside sum_in(...) a node state is the
predecessor's, an `on edge` state and edge inputs are the in-edge's, pair inputs the
(in-edge, out-edge) pair's; an `on edge` state's update runs once per out-edge (edge
inputs outside sum_in are the out-edge's); a node with no in-edges sees sum_in = 0.
Returns node outputs [B, N, ...] and states: node states [B, N, ...], edge states [B, E, ...]."""
from __future__ import annotations

import torch

from recdsl.errors import RecError
from recdsl.graph import as_edges, line_pairs, ordered_levels
from recdsl.ir import IRCell, Node, Op, toposort
from recdsl.torch_expr import compile_nodes


class _Eval:
    """Evaluates IR nodes one op at a time; each op compiled once from the shared emitter."""

    def __init__(self, ir: IRCell):
        self.ir = ir
        self.fns: dict[int, object] = {}

    def op(self, n: Node, args: list, dtype, device, batch_axes: int = 1):
        fn = self.fns.get(n.id)
        if fn is None:
            fn = self.fns[n.id] = compile_nodes([n], list(n.srcs))
        return fn(args, batch_axes, dtype, device)[0]


def run_grid(ir: IRCell, xs: dict, params: dict, init: dict, dtype, heads: bool):
    """With heads, values are [B, heads, ...] per cell and params [1, heads, ...]: two batch axes."""
    ev = _Eval(ir)
    batch_axes = 2 if heads else 1
    first_input = next(iter(xs.values()))
    B, NX, NY = first_input.shape[:3]
    device = first_input.device
    P = {n: p[None] for n, p in params.items()}
    grid: dict[tuple, dict] = {}
    outs = {o: [[None] * NY for _ in range(NX)] for o in ir.outputs}
    order = toposort(list(ir.updates.values()) + list(ir.outputs.values()))
    for x in range(NX):
        for y in range(NY):
            vals: dict[int, torch.Tensor] = {}
            for n in order:
                if n.op == Op.INPUT:
                    vals[n.id] = xs[n.arg][:, x, y]
                elif n.op == Op.PARAM:
                    vals[n.id] = P[n.arg]
                elif n.op == Op.STATE:
                    name, where = n.arg
                    src = (x - 1, y) if where == "left" else (x, y - 1) if where == "up" else None
                    if src is None:
                        raise RecError(f"over grid2d a state is read as {name}.left or {name}.up")
                    vals[n.id] = grid[src][name] if src in grid else init[name]
                elif n.op == Op.CONST and not n.shape:
                    vals[n.id] = torch.tensor(n.arg, dtype=dtype, device=device)
                else:
                    vals[n.id] = ev.op(n, [vals[s.id] for s in n.srcs], dtype, device, batch_axes)
            grid[(x, y)] = {s: vals[u.id] for s, u in ir.updates.items()}
            for o, n in ir.outputs.items():
                outs[o][x][y] = vals[n.id]
    def stack(cells):
        shape = torch.broadcast_shapes(*(c.shape for row in cells for c in row))
        return torch.stack([torch.stack([c.expand(shape) for c in row], 1) for row in cells], 1)
    out = {o: stack(v) for o, v in outs.items()}
    states = {s: stack([[grid[(x, y)][s] for y in range(NY)] for x in range(NX)]) for s in ir.updates}
    return out, states


def run_dag(ir: IRCell, xs: dict, params: dict, init: dict, edges: torch.Tensor, dtype, heads: int = 0, pairs=None):
    ev = _Eval(ir)
    batch_axes = 2 if heads else 1
    head_shape = (heads,) if heads else ()
    cell = ir.checked
    node_inputs = [n for n in cell.inputs]
    if not node_inputs:
        raise RecError(f"cell {cell.name} runs over a DAG but has no node input to give the node count")
    first_input = xs[node_inputs[0]]
    B, N = first_input.shape[:2]
    device = first_input.device
    edge_tensor = as_edges(edges, N)
    order = [int(v) for level in ordered_levels(N, edge_tensor) for v in level]
    pairs = line_pairs(edge_tensor) if pairs is None else pairs   # the runtime's, when it has them
    pair_of = {(int(a), int(b)): p for p, (a, b) in enumerate(pairs.tolist())}
    edges = edge_tensor.tolist()
    E = len(edges)
    ins = [[] for _ in range(N)]
    outs_e = [[] for _ in range(N)]
    for e, (u, v) in enumerate(edges):
        ins[v].append(e)
        outs_e[u].append(e)
    P = {n: p[None] for n, p in params.items()}
    on_edge = {s for s, var in cell.states.items() if var.decl.on_edge}
    node_state: dict[int, dict] = {}
    edge_state: dict[int, dict] = {}
    node_out: dict[int, dict] = {}
    pair_names = set(cell.pairs)
    edge_names = set(cell.edges)

    def reads(n: Node, node: int, in_edge: int | None) -> list:
        """(source, in-edge) pairs n's value is computed from (none for a leaf)."""
        if n.op in (Op.INPUT, Op.PARAM, Op.STATE) or (n.op == Op.CONST and not n.shape):
            return []
        if n.op == Op.SUM_IN:
            return [(n.srcs[0], e) for e in ins[node]]
        return [(s, in_edge) for s in n.srcs]

    def value(n: Node, node: int, out_edge: int | None, in_edge: int | None, memo: dict):
        """n's value at this node (its sources' values in memo already)."""
        if n.op == Op.INPUT:
            if n.arg in edge_names:
                e = in_edge if in_edge is not None else out_edge
                return xs[n.arg][:, e]
            if n.arg in pair_names:
                return xs[n.arg][:, pair_of[(in_edge, out_edge)]]
            return xs[n.arg][:, node]
        if n.op == Op.PARAM:
            return P[n.arg]
        if n.op == Op.STATE:
            name = n.arg[0]
            if name in on_edge:
                return edge_state[in_edge][name]
            return node_state[edges[in_edge][0]][name]
        if n.op == Op.CONST and not n.shape:
            return torch.tensor(n.arg, dtype=dtype, device=device)
        if n.op == Op.SUM_IN:
            acc = None
            for e in ins[node]:
                part = memo[(n.srcs[0].id, e)]
                acc = part if acc is None else acc + part
            if acc is None:
                shape = (B,) + head_shape + ir.shape_of(n)
                acc = torch.zeros(shape, dtype=dtype, device=device)
            return acc
        return ev.op(n, [memo[(s.id, in_edge)] for s in n.srcs], dtype, device, batch_axes)

    def evaluate(root: Node, node: int, out_edge: int | None, in_edge: int | None, memo: dict):
        """root's value at `node` (memo: (node id, in-edge) -> value), with an explicit
        stack: an unrolled loop makes chains thousands of nodes deep."""
        todo = [(root, in_edge, False)]
        while todo:
            n, ie, ready = todo.pop()
            key = (n.id, ie)
            if key in memo:
                continue
            if ready:
                memo[key] = value(n, node, out_edge, ie, memo)
                continue
            todo.append((n, ie, True))
            todo.extend((s, se, False) for s, se in reversed(reads(n, node, ie)))
        return memo[(root.id, in_edge)]

    for v in order:
        memo: dict = {}
        node_state[v] = {s: evaluate(u, v, None, None, memo) for s, u in ir.updates.items() if s not in on_edge}
        node_out[v] = {o: evaluate(n, v, None, None, memo) for o, n in ir.outputs.items()}
        for o in outs_e[v]:
            m2: dict = {}
            edge_state[o] = {s: evaluate(u, v, o, None, m2) for s, u in ir.updates.items() if s in on_edge}

    def stack(vals, shape_of):
        shape = torch.broadcast_shapes(*(x.shape for x in vals)) if vals else None
        return torch.stack([x.expand(shape) for x in vals], 1) if vals else None
    out = {o: stack([node_out[v][o] for v in range(N)], None) for o in ir.outputs}
    states = {s: stack([node_state[v][s] for v in range(N)], None) for s in ir.updates if s not in on_edge}
    states.update({s: stack([edge_state[e][s] for e in range(E)], None) for s in on_edge})
    return out, states

