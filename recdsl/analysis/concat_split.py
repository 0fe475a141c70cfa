"""split_concat: a matmul by a concat of state-free and state parts, as a sum of products.

Why. Cells written as `W @ concat(x, h)` (CfC, minimal RNNs, AL-RNN variants) multiply the
whole concat every step: the product reads the state h, so none of it can be hoisted, and
the x-part, which reads no state, is multiplied again at every step. Splitting the
contracted axis,

    W @ concat(a, b, ...)  ->  W[:, 0:A] @ a + W[:, A:A+B] @ b + ...
    concat(a, b, ...) @ W  ->  a @ W[0:A, :] + b @ W[A:A+B, :] + ...
    dot(w, concat(a, b))   ->  dot(w[0:A], a) + dot(w[A:A+B], b)

makes the products of the state-free parts values that read no state: `reassociate` then
groups them (with the biases) first, and the hoisting computes them for the whole sequence
at once (one matmul over B*T), so only `W[:, A:] @ h` stays in the per-step loop.

When. Only when it separates: the other operand (`W`) reads no state, and the concat has
at least one part that reads no state and one that does. Nested concats are looked
through; adjacent parts of the same kind stay together, as one concat (so
`concat(x, dt[None], h)` gives two products, not three). The state-free products come
first in the sum. `W @ concat(P, Q)` with matrices P, Q joins the columns of the result,
not the contracted axis, and is left alone.

Exactness. Each element of the product is the same sum of products of the same numbers,
split into partial sums: only the float summation order changes. Shapes are unchanged
(every product has the matmul's shape), and params with a leading heads axis are sliced
on their own axes (the backends index `[..., :, lo:hi]`).
"""
from __future__ import annotations

from ..ir import IRCell, Node, Op, arg_key
from .stages import state_reads


def split_concat_matmuls(ir: IRCell) -> tuple[IRCell, list[str]]:
    """Rewrite every matmul (and dot) of a state-free operand by a concat of state-free and
    state parts along the contracted axis into a sum of products of slices. Returns the
    rewritten cell (`ir` itself when nothing changed) and one line per split matmul."""
    reads = state_reads(ir)
    new: dict[int, Node] = {}
    memo: dict[tuple, Node] = {}
    done: list[str] = []

    def mk(op: Op, srcs: tuple, shape, arg, like: Node) -> Node:
        key = (op, tuple(s.id for s in srcs), arg_key(arg))
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = Node(op, srcs, tuple(shape), arg, like.span)
        return hit

    for n in ir.nodes():
        srcs = tuple(new.get(s.id, s) for s in n.srcs)
        node = n if srcs == n.srcs else Node(n.op, srcs, n.shape, n.arg, n.span, n.name, n.is_bool)
        site = _site(n, reads)
        if site is not None:
            node = _split(ir, n, site, reads, new, mk)
            done.append(_describe(n, node))
        new[n.id] = node
    if not done:
        return ir, []
    remap = lambda d: {k: new.get(v.id, v) for k, v in d.items()}  # noqa: E731
    out = IRCell(ir.checked, ir.dims, ir.hypers, ir.inputs, ir.params, ir.states, ir.neighbours,
                 remap(ir.updates), remap(ir.outputs), ir.edge_inputs, ir.over)
    return out, done


def _site(n: Node, reads) -> tuple[int, list[Node]] | None:
    """(which operand is the concat, its flattened parts) when n is a product worth splitting."""
    if n.op not in (Op.MATMUL, Op.DOT) or not reads[n.id]:
        return None
    a, b = n.srcs
    for k, (cat, other) in enumerate(((b, a), (a, b))):
        if cat.op != Op.CONCAT or reads[other.id]:
            continue
        # the concat's (last) axis must be the contracted one: the right operand's first axis
        # (so a vector), or the left operand's last axis (always)
        if k == 0 and cat.rank != 1:
            continue
        parts = _flatten(cat)
        kinds = [bool(reads[p.id]) for p in parts]
        if any(kinds) and not all(kinds):
            return (1 if k == 0 else 0), parts
    return None


def _flatten(cat: Node) -> list[Node]:
    """The parts of a concat, looking through nested concats (the same last axis), in order."""
    out, stack = [], [cat]
    while stack:
        x = stack.pop()
        if x.op == Op.CONCAT:
            stack.extend(reversed(x.srcs))
        else:
            out.append(x)
    return out


def _split(ir: IRCell, n: Node, site, reads, new, mk) -> Node:
    side, parts = site
    other = new.get(n.srcs[1 - side].id, n.srcs[1 - side])
    # runs of adjacent parts of the same kind (state-free or not), with their offsets
    runs: list[tuple[bool, list[Node]]] = []
    for p in parts:
        dep = bool(reads[p.id])
        if runs and runs[-1][0] == dep:
            runs[-1][1].append(p)
        else:
            runs.append((dep, [p]))
    terms: list[tuple[bool, Node]] = []
    lo = 0
    for dep, group in runs:
        group = [new.get(p.id, p) for p in group]
        width = group[0].shape[-1]
        for p in group[1:]:
            width = width + p.shape[-1]
        hi = lo + width.evaluate(ir.dims)
        if len(group) == 1:
            piece = group[0]
        else:
            piece = mk(Op.CONCAT, tuple(group), group[0].shape[:-1] + (width,), None, n)
        # slice the other operand along its contracted axis: its last (W @ concat) or first
        # (concat @ W) axis; a vector's only axis (dot, concat @ v)
        axis = other.rank - 1 if side == 1 else 0
        items = tuple(slice(lo, hi) if i == axis else slice(None) for i in range(other.rank))
        shape = tuple(width if i == axis else d for i, d in enumerate(other.shape))
        view = mk(Op.INDEX, (other,), shape, items, n)
        srcs = (view, piece) if side == 1 else (piece, view)
        terms.append((dep, mk(n.op, srcs, n.shape, None, n)))
        lo = hi
    terms = [t for t in terms if not t[0]] + [t for t in terms if t[0]]   # state-free products first
    acc = terms[0][1]
    for _, t in terms[1:]:
        acc = Node(Op.ADD, (acc, t), n.shape, None, n.span)
    acc.name = n.name
    return acc


def _describe(n: Node, out: Node) -> str:
    where = f" (line {n.span.line})" if n.span else ""
    terms, stack = [], [out]
    while stack:  # the sum's terms (products: every ADD here is the pass's own), left to right
        x = stack.pop()
        if x.op == Op.ADD:
            stack.extend(reversed(x.srcs))
        else:
            terms.append(x)
    return f"{_text(n)}{where} -> " + " + ".join(_text(t) for t in terms)


def _text(n: Node) -> str:
    from .symbolic import node_text
    a, b = (node_text(s) for s in n.srcs)
    return f"dot({a}, {b})" if n.op == Op.DOT else f"{a} @ {b}"


__all__ = ["split_concat_matmuls"]
