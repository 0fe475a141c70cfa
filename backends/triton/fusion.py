"""Fused regions: the elementwise IR a kernel computes in registers.

A stage kernel's coefficients (a decay, an input, a gate) are elementwise functions of a
few *leaves*: inputs, params, matmul results, values of earlier stages. `Region(roots)`
collects that cone; the leaves are loaded once per tile (already broadcast to the tile by
their strides), and `forward_lines` / `backward_lines` emit the region's math and its
reverse-mode derivative as Triton statements, each annotated with its .rec line."""
from __future__ import annotations

from recdsl.ir import Node, Op, toposort
from recdsl.torch_expr import SourceNotes

from . import texpr


class Region:
    def __init__(self, roots: list[Node | None], stop: set[int] = frozenset()):
        """roots: the values the kernel needs; stop: node ids that are leaves regardless
        (e.g. the stage's own states, which the kernel holds itself)."""
        self.roots = [r for r in roots if r is not None]
        self.leaves: list[Node] = []
        self.nodes: list[Node] = []        # fused nodes, sources first
        self.stops_hit: set[int] = set()   # the stop nodes the roots reach
        seen: set[int] = set()
        stack = [(r, False) for r in reversed(self.roots)]
        while stack:  # depth first from the roots, stopping at leaves (sources first)
            n, done = stack.pop()
            if done:
                self.nodes.append(n)
                continue
            if n.id in stop:
                self.stops_hit.add(n.id)
                continue
            if n.id in seen or texpr.literal(n) is not None:
                continue
            seen.add(n.id)
            if self.is_fused(n):
                stack.append((n, True))
                stack.extend((s, False) for s in reversed(n.srcs))
            else:
                self.leaves.append(n)

    @staticmethod
    def is_fused(n: Node) -> bool:
        return texpr.fusable(n)

    # names in generated code
    @staticmethod
    def value(n: Node, suffix: str = "") -> str:
        return f"v{n.id}{suffix}"

    def name_fn(self, leaf_names: dict[int, str], suffix: str = ""):
        def name(n: Node) -> str:
            lit = texpr.literal(n)
            if lit is not None:
                return lit
            if n.id in leaf_names:
                return leaf_names[n.id]
            return self.value(n, suffix)
        return name

    def cone(self, roots: list[Node]) -> list[Node]:
        """The fused nodes the given roots need (sources first)."""
        need = {n.id for n in toposort([r for r in roots if r is not None])}
        return [n for n in self.nodes if n.id in need]

    def leaves_of(self, roots: list[Node]) -> list[Node]:
        need = {n.id for n in toposort([r for r in roots if r is not None])}
        return [x for x in self.leaves if x.id in need]

    def forward_lines(self, roots, leaf_names, notes: SourceNotes, suffix: str = "") -> list[str]:
        name = self.name_fn(leaf_names, suffix)
        out = []
        for n in self.cone(roots):
            out.append(annotate(f"{self.value(n, suffix)} = {texpr.expr(n, name)}", notes(n)))
        return out

    def backward_lines(self, seeds: dict[int, str], leaf_names, notes: SourceNotes,
                       grad_names: dict[int, str]) -> list[str]:
        """Reverse mode over the region: `seeds` maps root node ids to the names of their
        adjoints; the adjoint of each leaf (or stop node) in grad_names is assigned to
        grad_names[id] (0.0 if it gets none)."""
        name = self.name_fn(leaf_names)
        roots = [n for n in self.nodes + self.leaves if n.id in seeds]
        order = self.cone(roots)
        adj: dict[int, list[str]] = {k: [v] for k, v in seeds.items()}
        out = []
        for n in reversed(order):
            parts = adj.pop(n.id, None)
            if not parts:
                continue
            g = f"g{n.id}"
            out.append(annotate(f"{g} = {' + '.join(parts)}", notes(n, with_text=False)))
            for src, contrib in zip(n.srcs, texpr.vjp(n, g, name, self.value(n))):
                if contrib is not None:
                    adj.setdefault(src.id, []).append(contrib)
        for nid, gname in grad_names.items():
            parts = adj.get(nid)
            out.append(f"{gname} = {' + '.join(parts) if parts else '0.0'}")
        return out


def annotate(line: str, note: str) -> str:
    return f"{line:<60}  # {note}" if note else line
