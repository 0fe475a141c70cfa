"""A chunkwise stage's operand math as one generated Triton kernel, forward and backward.

The chunkwise matrix-state stages (ChunkDiag, ChunkDelta, ChunkDPLR, HouseholderProducts)
run fixed Triton kernel sets that take their operands q, k, v, g, beta, ... as tensors.
Those operands are usually small functions of the inputs -- l2norm(q) * K**-0.5,
l2norm(k), logsigmoid(x) / 16, beta * -1.0 * -1.0 -- and computed by the driver every IR
node is one torch operator (a launch and a pass over memory), autograd's backward about
twice as many. Here a stage's operands are one kernel forward and one backward, derived
from the IR (never written per cell); the stage's kernels read its outputs as before.

Rows and tiles. An operand is a per-step value, [B, T, (H), *shape] in the driver; the
kernel's rows are the B*T*H steps, BLOCK_R of them per program, and a value of n elements
per step is a [BLOCK_R, pow2(n)] tile ([BLOCK_R, 1] for n = 1, broadcast like any size-1
axis). The kernel computes the operands' cone over *leaves* (inputs, params, matmul
results, values the driver has already):

    elementwise ops (texpr.py)   y = f(a, b)      each source of y's shape or of 1 element
    a step's total               s = sum_j x_j    tl.sum(where(lane < n, x, 0), 1)[:, None]
    unit reshapes                x[:, None], x[:, 0] on a size-1 axis: the same elements in
                                 the same order, so the same tile (no code)

and writes each operand contiguous in the driver's layout. A leaf is read through its own
strides from its broadcast view [B, T, H, n] (a param, a per-head value: stride 0).

Backward (reverse mode; the forward is recomputed in registers from the leaves, nothing
else is saved): with ybar the adjoint of y,

    elementwise   abar += texpr.vjp(y)  summed over the row when a has 1 element and y n > 1
                                        (the adjoint of a broadcast)
    step total    xbar += sbar          broadcast along the row

and each leaf's adjoint is written per element of its view; autograd's expand backward sums
it to the leaf's own shape. For l2norm, s = sum_j x_j^2, r = rsqrt(s + eps), y = x r:
rbar = sum_j ybar_j x_j, sbar = -r^3 rbar / 2, xbar = ybar r + 2 x sbar.

Padded lanes (pow2(n) > n) and rows past B*T*H load 1.0 (finite under log, rsqrt, /);
the lanes are left out of every step total and adjoint total (so that a row past the end
divides by a finite total too), and both out of every store."""
from __future__ import annotations

import math
import re

from recdsl.ir import Node, Op, toposort
from recdsl.torch_expr import SourceNotes

from . import texpr
from .fusion import annotate, kernel_name, pow2, sum_text

# A stage's operand math runs in the kernel when it removes at least this many IR ops from
# the driver (one op is one torch operator forward: the kernel would only replace it).
MIN_OPS = 2

# Leaves whose values are the driver's anyway (nothing a kernel could compute instead).
NATURAL_LEAVES = {Op.INPUT, Op.PARAM, Op.STATE, Op.MATMUL, Op.CONST}


def chunk_operands(form) -> list[tuple[str, Node]]:
    """(role, node) of each tensor a chunkwise form's kernels take: the readout vectors q
    (every readout of a ChunkDiag; the first of the others, which read one), then k, v,
    beta, a, b and the log decay g (k, v, beta per step of HouseholderProducts)."""
    from recdsl.lowering.forms import ChunkDiag
    readouts = form.readouts if isinstance(form, ChunkDiag) else form.readouts[:1]
    roles = [("q", r.q) for r in readouts]
    for i, step in enumerate(getattr(form, "steps", ())):
        roles += [(f"{what}{i}", step[what]) for what in ("k", "v", "beta")]
    for attr, role in (("k", "k"), ("v", "v"), ("beta", "beta"), ("a", "a"), ("b", "b"), ("log_decay", "g")):
        n = getattr(form, attr, None)
        if isinstance(n, Node):
            roles.append((role, n))
    return roles


def unit_reshape(n: Node, sizes) -> bool:
    """n is an INDEX that only inserts axes (None), keeps whole ones (:) or drops an axis of
    size 1 (an integer): the same elements in the same order. sizes: its source's shape."""
    if n.op != Op.INDEX or not isinstance(n.arg, tuple):
        return False
    axis = 0
    for item in n.arg:
        if item is None:
            continue
        if isinstance(item, slice) and item == slice(None):
            axis += 1
        elif isinstance(item, int) and not isinstance(item, bool) and axis < len(sizes) and sizes[axis] == 1:
            axis += 1
        else:
            return False
    return axis <= len(sizes)


class PrologueKernel:
    """Generates the forward and backward kernels of one chunkwise stage's operands.

    outputs: the operands the kernel writes (the driver binds them to its results);
    aliases: (operand, leaf) pairs where the operand is its leaf's elements (unit reshapes
    only), read in place with no kernel; remarks: what stays torch ops, and why."""

    def __init__(self, ir, stage: int, operands: list[tuple[str, Node]], bound: set, opaque: set,
                 notes: SourceNotes, anchor: Node | None = None, part: str = "prologue"):
        """operands: (role, node) (chunk_operands); bound: ids of the values the driver has
        (leaves); opaque: ids read as leaves even if elementwise (recurrent values); anchor:
        the stage's update, whose .rec line annotates the lines of nodes the lowering made
        (beta * -1.0) with no line of their own. part: "prologue" (a stage's operands) or
        "epilogue" (the cell's outputs after its last stage, `stage` then the stage count)."""
        self.ir, self._notes, self.anchor, self.part = ir, notes, anchor, part
        self.name = kernel_name(ir.name, stage, [part])
        self.bound, self.opaque = bound, opaque
        self.outputs: list[Node] = []
        self.aliases: list[tuple[Node, Node]] = []
        self.remarks: list[str] = []
        self.nodes: list[Node] = []      # the fused values, sources first (unit reshapes included)
        self.leaves: list[Node] = []
        self.roles: dict[int, str] = {}
        for role, n in operands:
            self.roles.setdefault(n.id, role)
        self._select(list({n.id: n for _, n in operands}.values()))
        self.ops = sum(n.op != Op.INDEX for n in self.nodes)   # reshapes are views: no torch op to save
        if self.outputs and self.ops < MIN_OPS:
            self._remark(f"{self.ops} op to fuse: the {'operands' if self.part == 'prologue' else 'outputs'} stay torch ops")
            self.outputs, self.nodes, self.leaves = [], [], []
        self._foreign_leaves()
        self.value_names = {}
        for n in self.nodes:
            if n.op != Op.INDEX:
                self.value_names[n.id] = f"v{len(self.value_names)}"
        self.leaf_names = {x.id: f"x{i}" for i, x in enumerate(self.leaves)}

    def notes(self, n: Node, with_text: bool = True) -> str:
        """n's .rec line (the stage's update's line for a node with none)."""
        return self._notes(n, with_text) or self._notes(self.anchor, with_text=False)

    def _what(self, n: Node) -> str:
        where = self._notes(n, with_text=False)
        return f"{self.roles[n.id]} ({where})" if where else self.roles[n.id]

    # ------------------------------------------------------------------ what the kernel computes
    def width(self, n: Node) -> int:
        """Elements per step."""
        return math.prod(self.ir.shape_of(n))

    def inside(self, n: Node) -> bool:
        """n is computed by the kernel (else it is a leaf, or a literal)."""
        if n.id in self.bound or n.id in self.opaque or texpr.literal(n) is not None:
            return False
        shape = self.ir.shape_of(n)
        if texpr.fusable(n):   # each source of n's shape or of one element: tiles broadcast as the IR does
            return all(texpr.literal(s) is not None or self.ir.shape_of(s) == shape or self.width(s) == 1
                       for s in n.srcs)
        if n.op == Op.SUM:     # over all of a step's elements only (a row of the tile)
            return self.width(n) == 1 and not n.srcs[0].is_bool
        if n.op == Op.DOT:     # dot(a, b) of two vectors: the row total of a * b
            a, b = n.srcs
            return self.ir.shape_of(a) == self.ir.shape_of(b) and not (a.is_bool or b.is_bool)
        return n.op == Op.INDEX and unit_reshape(n, self.ir.shape_of(n.srcs[0]))

    def base(self, n: Node) -> Node:
        """n through the unit reshapes the kernel computes: the value whose tile n is."""
        while n.op == Op.INDEX and self.inside(n):
            n = n.srcs[0]
        return n

    def _cone(self, root: Node) -> tuple[list[Node], list[Node]]:
        """(the fused nodes root needs, sources first; its leaves)."""
        nodes, leaves, seen = [], [], set()
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                nodes.append(n)
                continue
            if n.id in seen or texpr.literal(n) is not None:
                continue
            seen.add(n.id)
            if self.inside(n):
                stack.append((n, True))
                stack.extend((s, False) for s in reversed(n.srcs))
            else:
                leaves.append(n)
        return nodes, leaves

    def _select(self, operands: list[Node]):
        have_nodes, have_leaves = set(), set()
        for op in operands:
            if not self.inside(op):
                continue   # a leaf itself: the stage reads it as it is
            nodes, leaves = self._cone(op)
            where = self._what(op)
            base = self.base(op)
            if not self.inside(base) and self.ir.shape_of(base) == self.ir.shape_of(op):
                self.aliases.append((op, base))   # x[:, None][:, 0]: x itself
                continue
            if op.is_bool:
                self._remark(f"a boolean operand {where}: torch ops")
                continue
            if not any(x.op in (Op.INPUT, Op.STATE) for x in toposort(leaves)):
                self._remark(f"operand {where} is constant over time: torch ops on its own shape")
                continue
            self.outputs.append(op)
            for n in nodes:
                if n.id not in have_nodes:
                    have_nodes.add(n.id)
                    self.nodes.append(n)
            for x in leaves:
                if x.id not in have_leaves:
                    have_leaves.add(x.id)
                    self.leaves.append(x)

    def _remark(self, text: str):
        if text not in self.remarks:
            self.remarks.append(text)

    def _foreign_leaves(self):
        """Leaves the driver computes only for this kernel (an op the kernel does not take):
        said in the driver."""
        for x in self.leaves:
            if x.op not in NATURAL_LEAVES and x.id not in self.bound and x.id not in self.opaque:
                self._remark(f"{x.op.name.lower()} at {self.notes(x, with_text=False)} "
                             "(not elementwise, nor a step's total): torch ops, read as a leaf")

    # ------------------------------------------------------------------ names
    def value_of(self, n: Node) -> str:
        lit = texpr.literal(n)
        if lit is not None:
            return lit
        n = self.base(n)
        return self.leaf_names.get(n.id) or self.value_names[n.id]

    def lanes(self, n: Node) -> int:
        return pow2(self.width(n))

    @property
    def max_lanes(self) -> int:
        return max([self.lanes(n) for n in self.leaves + self.nodes + self.outputs] + [1])

    def _widths(self) -> list[int]:
        return sorted({self.width(n) for n in self.leaves + self.nodes + self.outputs} - {1})

    # ------------------------------------------------------------------ the launch interface
    def arg_names(self, backward: bool) -> list[str]:
        leaves = [a for i in range(len(self.leaves)) for a in (f"l{i}", f"l{i}_sb", f"l{i}_st", f"l{i}_sh", f"l{i}_sc")]
        if backward:
            return leaves + [f"do{i}" for i in range(len(self.outputs))] + \
                [f"dl{i}" for i in range(len(self.leaves))] + ["B", "T", "NH"]
        return leaves + [f"o{i}" for i in range(len(self.outputs))] + ["B", "T", "NH"]

    def gpu_rows(self, backward: bool) -> int:
        """Rows per program on a GPU: about 1024 tile elements (8 a thread of 4 warps; at
        K = 128 ptxas gives the forward 140-170 registers with 2048, a quarter of that with
        1024, and no spills either way)."""
        return max(1, min(64, 1024 // self.max_lanes))

    def constexprs(self, backward: bool, acc) -> dict:
        return {"ACC": acc, "BLOCK_R": self.gpu_rows(backward)}

    def combines(self) -> list[str]:
        return []

    @property
    def out_shapes(self) -> list[tuple]:
        return [tuple(self.ir.shape_of(o)) for o in self.outputs]

    @property
    def leaf_shapes(self) -> list[tuple]:
        return [tuple(self.ir.shape_of(x)) for x in self.leaves]

    # ------------------------------------------------------------------ kernel text
    def _signature(self, backward: bool) -> list[str]:
        suffix = "_bwd" if backward else "_fwd"
        what = ", ".join(self._what(o) for o in self.outputs)
        what = (f"the operands {what} of a chunkwise stage's kernels" if self.part == "prologue"
                else f"the outputs {what}, after the stages")
        return ["@triton.jit",
                f"def {self.name}{suffix}({', '.join(self.arg_names(backward))},",
                "        ACC: tl.constexpr, BLOCK_R: tl.constexpr):",
                f"    # {what}: rows = the B*T*NH steps, a value of n elements a [BLOCK_R, pow2(n)] tile"]

    def _mask(self, width: int) -> str:
        return f"mask{width}"

    def _offsets(self, width: int) -> str:
        """A contiguous [rows, width] tensor's offsets of the tile."""
        return "r[:, None]" if width == 1 else f"r[:, None] * {width} + lanes{width}[None, :]"

    def _head(self) -> list[str]:
        lines = ["    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # the rows: steps (b, t, h)",
                 "    rmask = r < B * T * NH",
                 "    h = r % NH",
                 "    t = (r // NH) % T",
                 "    b = r // (NH * T)",
                 "    mask1 = rmask[:, None]"]
        for w in self._widths():
            lines += [f"    lanes{w} = tl.arange(0, {pow2(w)})",
                      f"    cols{w} = (lanes{w} < {w})[None, :]  # a step total's lanes, in every row",
                      f"    mask{w} = rmask[:, None] & cols{w}"]
        for i, x in enumerate(self.leaves):
            w = self.width(x)
            ptr = f"l{i} + (b * l{i}_sb + t * l{i}_st + h * l{i}_sh)[:, None]"
            if w > 1:
                ptr += f" + lanes{w}[None, :] * l{i}_sc"
            load = f"tl.load({ptr}, mask={self._mask(w)}, other=1.0)"
            value = f"{load} != 0" if x.is_bool else f"{load}.to(ACC)"
            lines.append(annotate(f"    x{i} = {value}", self.notes(x, with_text=False)))
        return lines

    def _forward_lines(self) -> list[str]:
        lines = []
        for n in self.nodes:
            if n.op == Op.INDEX:
                continue   # a unit reshape: the source's tile
            if n.op in (Op.SUM, Op.DOT):
                src = n.srcs[0]
                w = self.width(src)
                row = self.value_of(src) if n.op == Op.SUM else f"{self.value_of(src)} * {self.value_of(n.srcs[1])}"
                rhs = row if w == 1 else f"tl.sum(tl.where(cols{w}, {row}, 0.0), axis=1)[:, None]"
            else:
                rhs = texpr.expr(n, self.value_of)
            lines.append(annotate(f"    {self.value_names[n.id]} = {rhs}", self.notes(n)))
        return lines

    def forward(self) -> str:
        stores = [annotate(f"    tl.store(o{i} + {self._offsets(self.width(o))}, {self.value_of(o)}, "
                           f"mask={self._mask(self.width(o))})", self.notes(o, with_text=False))
                  for i, o in enumerate(self.outputs)]
        return "\n".join(self._signature(False) + _live(self._head() + self._forward_lines(), stores) + stores) + "\n"

    def _contributions(self, n: Node, g: str) -> list[tuple[Node, str]]:
        """(source, its adjoint contribution) of the fused node n with adjoint g."""
        if n.op in (Op.SUM, Op.DOT):
            w = self.width(n.srcs[0])
            wide = g if w == 1 else f"tl.broadcast_to({g}, (BLOCK_R, {pow2(w)}))"
            if n.op == Op.SUM:
                return [(n.srcs[0], wide)]
            a, b = n.srcs   # d(a · b) = b da + a db
            return [(s, f"{wide} * {self.value_of(other)}") for s, other in ((a, b), (b, a))
                    if texpr.literal(s) is None]
        out = []
        wide = self.width(n)
        for s, c in zip(n.srcs, texpr.vjp(n, g, self.value_of, self.value_of(n))):
            if c is None or texpr.literal(s) is not None:
                continue
            if self.width(s) == 1 and wide > 1:   # the adjoint of a broadcast: the row's total
                c = f"tl.sum(tl.where(cols{wide}, {c}, 0.0), axis=1)[:, None]"
            out.append((s, c))
        return out

    def backward(self) -> str:
        head = self._head() + self._forward_lines()
        lines: list[str] = []
        adj: dict = {}
        for i, o in enumerate(self.outputs):
            w = self.width(o)
            lines.append(annotate(f"    do{i}_t = tl.load(do{i} + {self._offsets(w)}, mask={self._mask(w)}, "
                                  "other=0.0).to(ACC)", self.notes(o, with_text=False)))
            adj.setdefault(self.base(o).id, []).append(f"do{i}_t")
        for n in reversed(self.nodes):
            parts = adj.pop(n.id, None)
            if not parts or n.op == Op.INDEX:
                continue
            g = "g" + self.value_names[n.id][1:]
            pre, total = sum_text(parts, g)
            lines += ["    " + p for p in pre]
            lines.append(annotate(f"    {g} = {total}", self.notes(n, with_text=False)))
            for s, c in self._contributions(n, g):
                adj.setdefault(self.base(s).id, []).append(c)
        for i, x in enumerate(self.leaves):
            w = self.width(x)
            parts = adj.get(x.id)
            pre, total = sum_text(parts, f"gx{i}") if parts else ([], f"tl.zeros((BLOCK_R, {pow2(w)}), ACC)")
            lines += ["    " + p for p in pre]
            lines.append(annotate(f"    gx{i} = {total}", self.notes(x, with_text=False)))
            lines.append(annotate(f"    tl.store(dl{i} + {self._offsets(w)}, gx{i}, mask={self._mask(w)})",
                                  self.notes(x, with_text=False)))
        return "\n".join(self._signature(True) + _live(head, lines) + lines) + "\n"

    # ------------------------------------------------------------------ torch twin
    def torch_values(self, views: list, dt) -> list:
        """The outputs from the leaves' [B, T, NH, n] views in differentiable torch ops (the
        kernels' twin, for a second derivative: launch._PrologueFn), each [B, T, NH, n]."""
        import torch

        from .twin import _apply
        vals = {x.id: v for x, v in zip(self.leaves, views)}
        dev = views[0].device

        def value(n):
            if texpr.literal(n) is not None:
                return torch.tensor(float(n.arg), dtype=dt, device=dev)
            return vals[self.base(n).id]
        for n in self.nodes:
            if n.op == Op.INDEX:
                continue
            if n.op == Op.SUM:
                vals[n.id] = value(n.srcs[0]).sum(-1, keepdim=True)
            elif n.op == Op.DOT:
                vals[n.id] = (value(n.srcs[0]) * value(n.srcs[1])).sum(-1, keepdim=True)
            else:
                vals[n.id] = _apply(n, [value(s) for s in n.srcs], dt)
        B, T, NH = views[0].shape[:3]
        return [value(o).expand(B, T, NH, self.width(o)) for o in self.outputs]


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _live(lines: list[str], tail: list[str]) -> list[str]:
    """The assignments of `lines` that `tail` reads, directly or through each other, in order:
    the backward recomputes only the forward values its adjoints use (a linear op's value,
    a leaf whose adjoint does not read it, the head index a leaf-free kernel does not need
    are left out), and a kernel never computes a value nobody reads."""
    used = {m for ln in tail for m in _NAME.findall(ln.split("#")[0])}
    kept = []
    for ln in reversed(lines):
        code = ln.split("#")[0]
        target, eq, rhs = code.partition(" = ")
        if eq and target.strip().isidentifier():
            if target.strip() not in used:
                continue
            used.update(_NAME.findall(rhs))
        kept.append(ln)
    return kept[::-1]
