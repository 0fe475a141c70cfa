"""Fused regions: the elementwise IR a kernel computes in registers.

A stage kernel's coefficients (a decay, an input, a gate) are elementwise functions of a
few *leaves*: inputs, params, matmul results, values of earlier stages. `Region(roots)`
collects that cone; the leaves are loaded once per tile (already broadcast to the tile by
their strides), and `forward_lines` / `backward_lines` emit the region's math and its
reverse-mode derivative as Triton statements, each annotated with its .rec line.

Broadcast views (`x[:, None]`, `k[None, :]`: an INDEX of only new axes and full slices)
are not computed: the region looks through them, and the leaves under one are read
through the same view (`Ref.view`, applied by the driver as a torch view, free), so
`exp(softplus(dt)[:, None] * A)` and `k[:, None] * v[None, :]` run in the kernel and the
outer product is never materialised. A value is a `Ref` = (node, view); with no view its
id is the node's id."""
from __future__ import annotations

from recdsl.ir import Node, Op
from recdsl.torch_expr import SourceNotes
from recdsl.types import ONE

from . import texpr


def kernel_name(cell: str, stage: int, states) -> str:
    """A stage's kernel name: cell, stage and states, as an identifier (a complex state's
    parts are named `h.re` / `h.im`; the dot becomes `_`, and the stage number keeps two
    stages apart whatever their states are called)."""
    return f"{cell.lower()}_stage{stage}_" + "_".join(s.replace(".", "_") for s in states)


def pow2(n: int) -> int:
    """The smallest power of two >= n (Triton tile sizes)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def is_view(n: Node) -> bool:
    """An INDEX that only inserts axes or keeps whole ones: a broadcast view of its source."""
    return n.op == Op.INDEX and all(i is None or (isinstance(i, slice) and i == slice(None)) for i in n.arg)


class Ref:
    """A node as read through a chain of broadcast views (outermost first)."""
    __slots__ = ("node", "view", "id")

    def __init__(self, node: Node, view: tuple = ()):
        self.node, self.view = node, view
        self.id = node.id if not view else (node.id, view)

    def __getattr__(self, name):   # span, is_bool, op, shape, rank, name, ...
        return getattr(self.node, name)

    def view_text(self, text: str) -> str:
        """A torch expression of the driver applying the view to the leaf's value `text`."""
        from recdsl.torch_expr import index_text
        rank = self.node.rank
        for src_rank, arg in reversed(self.view):
            if src_rank > rank:
                text = f"seq_rt.lift({text}, {rank}, {src_rank})"
            text += index_text(tuple(None if i is None else slice(None) for i in arg))
            rank = len(arg)
        return text


_OUTER: dict[int, Node] = {}


def _outer_as_product(n: Node) -> Node:
    """outer(u, w) as u[:, None] * w[None, :] (one node per outer, so ids are stable)."""
    if n.id not in _OUTER:
        u, w = n.srcs
        cu = Node(Op.INDEX, (u,), (u.shape[0], ONE), (slice(None), None), span=n.span)
        rw = Node(Op.INDEX, (w,), (ONE, w.shape[0]), (None, slice(None)), span=n.span)
        _OUTER[n.id] = Node(Op.MUL, (cu, rw), n.shape, span=n.span, name=n.name)
    return _OUTER[n.id]


def resolve(n: Node, view: tuple = ()) -> Ref:
    """The value n stands for under `view`: broadcast views are looked through, and an
    outer product is the product of two of them."""
    if n.op == Op.OUTER and n.srcs[0].rank == 1 and n.srcs[1].rank == 1:
        n = _outer_as_product(n)
    while is_view(n):   # (slices are unhashable before Python 3.12: ':' stands for slice(None))
        view = view + ((n.srcs[0].rank, tuple(None if i is None else ":" for i in n.arg)),)
        n = n.srcs[0]
    return Ref(n, view)


class Region:
    def __init__(self, roots: list[Node | None], stop: set = frozenset(), numbering: dict | None = None,
                 opaque: set = frozenset()):
        """roots: the values the kernel needs; stop: ids of values the kernel has already
        (e.g. its own new states), which the region reads but does not compute; numbering:
        value -> its number in generated names, shared by the regions of one kernel (names
        then do not depend on node ids, which depend on what the process built before);
        opaque: ids read as leaves even if elementwise (another stage's recurrent values:
        recomputing h' = f(h) here would read h shifted in time)."""
        self.roots = [r for r in roots if r is not None]
        self.leaves: list[Ref] = []
        self.nodes: list[Ref] = []         # fused values, sources first
        self.stops_hit: set = set()        # the stop values the roots reach
        self.ok = True                     # False if a stop value is read through a view
        self._num = numbering if numbering is not None else {}
        seen: set = set()
        stack = [(resolve(r), False) for r in reversed(self.roots)]
        while stack:  # depth first from the roots, stopping at leaves (sources first)
            ref, done = stack.pop()
            if done:
                self.nodes.append(ref)
                continue
            n = ref.node
            if n.id in stop:
                self.stops_hit.add(n.id)
                self.ok = self.ok and not ref.view
                continue
            if ref.id in seen or texpr.literal(n) is not None:
                continue
            seen.add(ref.id)
            if texpr.fusable(n) and n.id not in opaque:
                stack.append((ref, True))
                stack.extend((resolve(s, ref.view), False) for s in reversed(n.srcs))
            else:
                self.leaves.append(ref)

    # names in generated code
    def value(self, ref: Ref, suffix: str = "") -> str:
        return f"v{self._num.setdefault(ref.id, len(self._num))}{suffix}"

    def name_fn(self, leaf_names: dict, suffix: str = ""):
        """Node -> its name (as read with no view); leaf_names: ref id -> name."""
        def name(n: Node, view: tuple = ()) -> str:
            lit = texpr.literal(n)
            if lit is not None:
                return lit
            ref = resolve(n, view)
            if ref.id in leaf_names:
                return leaf_names[ref.id]
            return self.value(ref, suffix)
        return name

    def cone(self, roots: list) -> list[Ref]:
        """The fused values the given roots need (sources first)."""
        need: set = set()
        stack = [resolve(r) if isinstance(r, Node) else r for r in roots if r is not None]
        while stack:
            ref = stack.pop()
            if ref.id in need:
                continue
            need.add(ref.id)
            if texpr.fusable(ref.node):
                stack.extend(resolve(s, ref.view) for s in ref.node.srcs)
        return [r for r in self.nodes if r.id in need]

    def leaves_of(self, roots: list) -> list[Ref]:
        need = self.reads_of(roots)
        return [x for x in self.leaves if x.id in need]

    def reads_of(self, roots: list) -> set:
        """Ids of the values from outside the region (leaves, stop values) that the lines of
        the roots' cone read, and of roots that are such values themselves."""
        cone = self.cone(roots)
        inside = {r.id for r in cone}
        out = {resolve(s, r.view).id for r in cone for s in r.node.srcs if texpr.literal(s) is None}
        out |= {(resolve(r) if isinstance(r, Node) else r).id for r in roots if r is not None}
        return out - inside

    def forward_lines(self, roots, leaf_names, notes: SourceNotes, suffix: str = "") -> list[str]:
        name = self.name_fn(leaf_names, suffix)
        out = []
        for ref in self.cone(roots):
            rhs = texpr.expr(ref.node, lambda s, v=ref.view: name(s, v))
            out.append(annotate(f"{self.value(ref, suffix)} = {rhs}", notes(ref.node)))
        return out

    def backward_lines(self, seeds: dict, leaf_names, notes: SourceNotes, grad_names: dict,
                       reads: set | None = None) -> list[str]:
        """Reverse mode over the region: `seeds` maps root ids to the names of their
        adjoints; the adjoint of each leaf (or stop value) in grad_names is assigned to
        grad_names[id] (0.0 if it gets none). The ids of the forward values (region values,
        leaves, stop values) the lines read are added to `reads`: the forward lines a
        backward kernel needs are their cone."""
        reads = set() if reads is None else reads
        name = self.name_fn(leaf_names)
        roots = [r for r in self.nodes + self.leaves if r.id in seeds]
        order = self.cone(roots)
        adj: dict = {k: [v] for k, v in seeds.items()}
        out = []
        for ref in reversed(order):
            parts = adj.pop(ref.id, None)
            if not parts:
                continue
            g = "g" + self.value(ref)[1:]
            pre, total = sum_text(parts, g)
            out += pre
            out.append(annotate(f"{g} = {total}", notes(ref.node, with_text=False)))
            nm = lambda s, v=ref.view: name(s, v)  # noqa: E731
            contribs, read, reads_out = vjp_reading(ref.node, g, nm, self.value(ref))
            reads |= {resolve(s, ref.view).id for s in read if texpr.literal(s) is None}
            if reads_out:
                reads.add(ref.id)
            for src, contrib in zip(ref.node.srcs, contribs):
                if contrib is not None:
                    adj.setdefault(resolve(src, ref.view).id, []).append(contrib)
        for rid, gname in grad_names.items():
            parts = adj.get(rid)
            pre, total = sum_text(parts, gname) if parts else ([], "0.0")
            out += pre
            out.append(f"{gname} = {total}")
        return out


def vjp_reading(n: Node, g: str, name, out: str) -> tuple[list[str | None], list[Node], bool]:
    """texpr.vjp, and what its rules read: (per source its adjoint contribution, the
    sources whose values the contributions read, whether they read n's own value). A
    backward kernel recomputes a forward value only if its adjoint reads it, and
    texpr.vjp names every source whether its rule reads it or not (d(a + b) reads neither
    a nor b): so the rule is applied to placeholder names, and the placeholders it wrote
    are the values it reads; the real names then replace them."""
    marks = {}
    for s in n.srcs:
        marks.setdefault(s.id, (s, f"\x00{len(marks)}\x00"))
    out_mark = "\x00out\x00"
    contribs = texpr.vjp(n, g, lambda s: marks[s.id][1], out_mark)
    read = [(s, m) for s, m in marks.values() if any(c is not None and m in c for c in contribs)]
    reads_out = any(c is not None and out_mark in c for c in contribs)
    real = [(m, name(s)) for s, m in read] + [(out_mark, out)]

    def named(c):
        for m, text in real:
            c = c.replace(m, text)
        return c
    return [None if c is None else named(c) for c in contribs], [s for s, _ in read], reads_out


# Terms per line of a generated sum: a sum of thousands of terms (the adjoint of a value that
# an unrolled loop reads at every pass) in one expression is as deep, and Python's compiler
# recurses along it ("maximum recursion depth exceeded during compilation").
MAX_TERMS = 64


def sum_text(parts: list[str], acc: str) -> tuple[list[str], str]:
    """(lines, expression) adding `parts` left to right (as one expression would) with at
    most MAX_TERMS terms per expression: the lines accumulate all but the last terms into
    `acc`, which the expression then reads. ([], the plain sum) for a short sum."""
    if len(parts) <= MAX_TERMS:
        return [], " + ".join(parts)
    lines = []
    for i in range(0, len(parts) - MAX_TERMS, MAX_TERMS):
        chunk = parts[i:i + MAX_TERMS]
        lines.append(f"{acc} = " + " + ".join(([acc] if i else []) + chunk))
    rest = len(parts) - (len(parts) - 1) % MAX_TERMS - 1   # where the last (non-empty) chunk starts
    return lines, " + ".join([acc] + parts[rest:])


def annotate(line: str, note: str) -> str:
    return f"{line:<60}  # {note}" if note else line
