"""The graph a cell `over dag` runs on, shared by every backend: the edge list's checks and
the canonical order of its line-graph pairs.

A DAG is given as `edges`, a LongTensor [E, 2] of (source, target) node ids; edge e is row
e. A `pair` input holds one value per (in-edge, out-edge) pair meeting at a node -- the
edges of the line graph, pLSTM's transitions -- laid out [B, NP, *shape] with the NP pairs in
the order `line_pairs(edges)` returns:

    pairs = line_pairs(edges)          # [NP, 2]: (in-edge a, out-edge b), target(a) = source(b)
    t = torch.rand(B, len(pairs))      # t[:, p] is the transition from edge pairs[p, 0] to pairs[p, 1]

sorted by the node they meet at, then by in-edge, then by out-edge; NP = sum over nodes of
in-degree x out-degree, so memory stays O(E + NP) (a path: NP = E - 1; a tree: NP = E minus
the root's in-edges) instead of a dense [E, E] table."""
from __future__ import annotations

import torch

from .errors import RecError

EDGES_HINT = "edges=LongTensor [E, 2] of (source, target) node ids, e.g. [[0, 1], [1, 2]]"


def as_edges(edges, num_nodes: int | None = None) -> torch.Tensor:
    """edges as a CPU LongTensor [E, 2], checked: integers, shape [E, 2], ids in
    0..num_nodes-1 and no self-loop (acyclicity is checked where the nodes are ordered:
    ordered_levels)."""
    if edges is None:
        raise RecError("this cell runs over a DAG: give its edges", hint=EDGES_HINT)
    if isinstance(edges, torch.Tensor):
        if edges.is_floating_point() or edges.is_complex() or edges.dtype == torch.bool:
            raise RecError(f"edges must hold integer node ids, got a {edges.dtype} tensor", hint=EDGES_HINT)
        t = edges.detach().to("cpu", torch.long)
    else:
        try:
            t = torch.as_tensor(edges)
        except (TypeError, ValueError, RuntimeError):
            raise RecError(f"edges must be a list of (source, target) pairs, got {edges!r}"[:200],
                           hint=EDGES_HINT) from None
        if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise RecError("edges must hold integer node ids", hint=EDGES_HINT)
        t = t.to(torch.long)
    if t.numel() == 0:
        t = t.reshape(0, 2)
    if t.dim() == 3 and t.shape[-1] == 2:
        raise RecError(f"edges has shape {list(t.shape)}: one graph per batch is not supported, the batch "
                       "shares one edge list [E, 2]",
                       hint="put the graphs side by side as one graph (renumber each one's nodes after the "
                            "previous one's) and batch them along N")
    if t.dim() != 2 or t.shape[1] != 2:
        raise RecError(f"edges must be [E, 2] (source, target), got shape {list(t.shape)}", hint=EDGES_HINT)
    if num_nodes is not None and t.shape[0]:
        u, v = t[:, 0], t[:, 1]
        bad = (u < 0) | (u >= num_nodes) | (v < 0) | (v >= num_nodes) | (u == v)
        if bool(bad.any()):
            e = int(bad.nonzero()[0])
            raise RecError(f"edge {e} = ({int(u[e])}, {int(v[e])}) is not between two distinct nodes of "
                           f"0..{num_nodes - 1}",
                           hint=f"the node inputs give N = {num_nodes} nodes (their axis 1)")
    return t.contiguous()


def line_pairs(edges) -> torch.Tensor:
    """The (in-edge, out-edge) pairs meeting at a node, LongTensor [NP, 2], sorted by the node,
    then the in-edge id, then the out-edge id: the order of a `pair` input's axis 1."""
    e = as_edges(edges)
    E = e.shape[0]
    if E == 0:
        return torch.zeros((0, 2), dtype=torch.long)
    n = int(e.max()) + 1
    e = as_edges(e, n)                                      # no negative id, no self-loop
    src, dst = e[:, 0], e[:, 1]
    in_order = torch.argsort(dst, stable=True)             # in-edges by node, then id
    out_order = torch.argsort(src, stable=True)            # out-edges by node, then id
    out_start = torch.zeros(n + 1, dtype=torch.long)
    out_start[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    node = dst[in_order]
    counts = out_start[node + 1] - out_start[node]          # each in-edge meets its node's out-edges
    first = torch.repeat_interleave(out_start[node], counts)
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.stack([torch.repeat_interleave(in_order, counts), out_order[first + offset]], 1)


def ordered_levels(num_nodes: int, edges: torch.Tensor) -> list[torch.Tensor]:
    """The nodes of each topological level (level 0: no in-edges) as index tensors, or a
    RecError naming a node on a cycle. edges: as_edges' [E, 2]."""
    E = edges.shape[0]
    src, dst = edges[:, 0], edges[:, 1]
    indeg = torch.zeros(num_nodes, dtype=torch.long).index_add_(0, dst, torch.ones(E, dtype=torch.long))
    order = torch.argsort(src, stable=True)      # out-edges grouped by source
    start = torch.zeros(num_nodes + 1, dtype=torch.long)
    start[1:] = torch.cumsum(torch.bincount(src, minlength=num_nodes), 0)
    out, frontier, done = [], (indeg == 0).nonzero()[:, 0], 0
    while frontier.numel():
        out.append(frontier)
        done += frontier.numel()
        counts = start[frontier + 1] - start[frontier]
        idx = torch.repeat_interleave(start[frontier], counts) + (
            torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))
        succ = dst[order[idx]]
        indeg.index_add_(0, succ, -torch.ones_like(succ))
        frontier = torch.unique(succ[indeg[succ] == 0])
    if done != num_nodes:
        raise cycle_error(indeg > 0, edges)
    return out


def cycle_error(stuck: torch.Tensor, edges: torch.Tensor) -> RecError:
    """The error for a graph whose topological sort stopped with the nodes `stuck` (a bool
    mask) unplaced: each of those has an unplaced predecessor, so walking predecessors from
    any of them must come back to a node already seen -- a node on a cycle."""
    src, dst = edges[:, 0], edges[:, 1]
    live = stuck[src] & stuck[dst]
    pred = torch.full((stuck.numel(),), -1, dtype=torch.long)
    pred[dst[live]] = src[live]
    node = int(stuck.nonzero()[0])
    seen = set()
    while node not in seen:
        seen.add(node)
        node = int(pred[node])
    path = [node]
    step = int(pred[node])
    while step != node and len(path) < 6:
        path.append(step)
        step = int(pred[step])
    shown = " <- ".join(str(v) for v in [node] + path[1:]) + (" ..." if step != node else f" <- {node}")
    return RecError(f"the edges contain a cycle through node {node} ({shown}): over dag the graph must be acyclic",
                    hint="remove or reverse one edge of the cycle")
