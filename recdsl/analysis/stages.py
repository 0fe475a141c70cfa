"""Passes on the step graph: reassociation, the state dependency graph and its stages,
and where every node can be computed (hoisted, inside a stage's recurrence, or between
stages)."""
from __future__ import annotations

import networkx as nx

from ..ir import IRCell, Node, Op, toposort
from ..types import broadcast


def state_reads(ir: IRCell) -> dict[int, frozenset[str]]:
    """node id -> names of the states whose previous (or neighbour) value it reads."""
    out: dict[int, frozenset[str]] = {}
    for n in ir.nodes():
        if n.op == Op.STATE:
            out[n.id] = frozenset([n.arg[0]])
        else:
            acc: frozenset[str] = frozenset()
            for s in n.srcs:
                acc |= out[s.id]
            out[n.id] = acc
    return out


def dependency_graph(ir: IRCell) -> nx.DiGraph:
    """Edge s -> t when t's update reads s (directly, through locals or through s')."""
    reads = state_reads(ir)
    g = nx.DiGraph()
    g.add_nodes_from(ir.states)
    for t, upd in ir.updates.items():
        for s in reads[upd.id]:
            g.add_edge(s, t)
    return g


def stages(ir: IRCell, g: nx.DiGraph) -> list[list[str]]:
    """Strongly connected components in topological order (ties: declaration order)."""
    order = {s: i for i, s in enumerate(ir.states)}
    comps = list(nx.strongly_connected_components(g))
    cg = nx.condensation(g, comps)
    key = {i: min(order[s] for s in comps[i]) for i in cg.nodes}
    topo = nx.lexicographical_topological_sort(cg, key=lambda i: key[i])
    return [sorted(comps[i], key=order.get) for i in topo]


def placement(ir: IRCell, stage_list: list[list[str]]) -> dict[int, int]:
    """node id -> -1 if hoisted (reads no state), else the index of the last stage whose
    states it reads (it can run once that stage's sequence is known)."""
    stage_of = {s: k for k, st in enumerate(stage_list) for s in st}
    reads = state_reads(ir)
    return {nid: max((stage_of[s] for s in r), default=-1) for nid, r in reads.items()}


def reassociate(ir: IRCell) -> tuple[IRCell, int]:
    """Rewrite sums so that the terms that read no state are added first:
    `W_ih@x + b_ih + W_hh@h + b_hh` -> `(W_ih@x + b_ih + b_hh) + W_hh@h`, so the hoisted
    part is one expression. Returns the rewritten cell and the number of sums changed."""
    reads = state_reads(ir)
    new: dict[int, Node] = {}
    changed = 0
    consumers: dict[int, int] = {}
    for n in ir.nodes():
        for s in n.srcs:
            consumers[s.id] = consumers.get(s.id, 0) + 1

    def flatten(root: Node, out: list):
        # Look through the sums below the root whose values nothing else uses (left to right,
        # with a stack: a sum can be thousands of terms long).
        stack = [(root, 1.0, True)]
        while stack:
            n, sign, is_root = stack.pop()
            if n.op in (Op.ADD, Op.SUB) and (is_root or (consumers.get(n.id, 0) <= 1 and n.name is None)):
                stack.append((n.srcs[1], sign if n.op == Op.ADD else -sign, False))
                stack.append((n.srcs[0], sign, False))
            else:
                out.append((sign, n))

    for n in ir.nodes():
        srcs = tuple(new.get(s.id, s) for s in n.srcs)
        node = n if srcs == n.srcs else Node(n.op, srcs, n.shape, n.arg, n.span, n.name, n.is_bool)
        if n.op in (Op.ADD, Op.SUB) and reads[n.id]:
            terms: list = []
            flatten(node, terms)
            terms = [(sg, new.get(t.id, t)) for sg, t in terms]
            reads_of = lambda t: reads.get(t.id, frozenset()) or _reads_new(t, reads)  # noqa: E731
            free = [(sg, t) for sg, t in terms if not reads_of(t)]
            dep = [(sg, t) for sg, t in terms if reads_of(t)]
            order = [i for i, (sg, t) in enumerate(terms) if not reads_of(t)]
            split = len(free) > 1 and order != list(range(len(free)))
            if split:
                changed += 1
                node = _rebuild(free + dep, n)
        new[n.id] = node
    if not changed:
        return ir, 0
    remap = lambda d: {k: new.get(v.id, v) for k, v in d.items()}  # noqa: E731
    out = IRCell(ir.checked, ir.dims, ir.hypers, ir.inputs, ir.params, ir.states, ir.neighbours,
                 remap(ir.updates), remap(ir.outputs), ir.edge_inputs, ir.over)
    return out, changed


def _reads_new(n: Node, reads) -> frozenset:
    """State reads of a node made by this pass (not in the original table); memoised into
    `reads`, sources first (no recursion)."""
    if n.id in reads:
        return reads[n.id]
    stack = [(n, False)]
    while stack:
        x, done = stack.pop()
        if x.id in reads:
            continue
        if x.op == Op.STATE:
            reads[x.id] = frozenset([x.arg[0]])
        elif done:
            acc: frozenset = frozenset()
            for s in x.srcs:
                acc |= reads[s.id]
            reads[x.id] = acc
        else:
            stack.append((x, True))
            stack.extend((s, False) for s in x.srcs if s.id not in reads)
    return reads[n.id]


def _rebuild(terms: list, like: Node) -> Node:
    sign, acc = terms[0]
    if sign < 0:
        acc = Node(Op.NEG, (acc,), acc.shape, None, acc.span)
    for sg, t in terms[1:]:
        op = Op.ADD if sg > 0 else Op.SUB
        acc = Node(op, (acc, t), broadcast(acc.shape, t.shape), None, like.span)
    acc.name = like.name
    return acc


def frontier(ir: IRCell, place: dict[int, int]) -> list[Node]:
    """Hoisted nodes used by non-hoisted ones: what is computed for all steps at once."""
    out, seen = [], set()
    for n in ir.nodes():
        if place[n.id] >= 0:
            for s in n.srcs:
                if place[s.id] == -1 and s.op not in (Op.CONST, Op.PARAM, Op.EYE, Op.INPUT) and s.id not in seen:
                    seen.add(s.id)
                    out.append(s)
    roots = list(ir.updates.values()) + list(ir.outputs.values())
    for r in roots:
        if place[r.id] == -1 and r.id not in seen and r.op not in (Op.CONST, Op.PARAM):
            seen.add(r.id)
            out.append(r)
    return out


__all__ = ["state_reads", "dependency_graph", "stages", "placement", "reassociate", "frontier", "toposort"]
