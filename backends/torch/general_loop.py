"""Any nonlinear sequential stage as ONE generated C call, forward and backward.

fused_loop.py runs "lane" stages (vector states of one length, elementwise gates). This
module runs the others the torch backend would loop over step by step (seq_rt.run_loop,
dispatch-bound at small sizes): matrix states, several states of different shapes,
matmuls and outer products of computed values, reductions, softmax / logsumexp over small
axes, concat, index, reshape, transpose.

How the C is laid out. Each (batch, head) row is independent, so one OpenMP loop splits
the rows and each row runs its whole time loop. Per step every core node is computed into
a small array of its full shape (sizes are compile-time constants from `ir.shape_of`) with
plain nested C loops the compiler vectorises. Structural nodes (index, slices, None axes,
transpose, expand, a reshape of contiguous data) cost nothing: a value is a strided view
`base[off + i0*s0 + i1*s1 ...]` (stride 0 on broadcast axes), resolved at generation time.
Broadcasting of node shapes is numpy's (axes aligned on the right), as in TorchExpr.

Backward (autograd): a second generated function walks time in reverse per row. At step t
it recomputes the step's forward values from the saved previous states (the forward keeps
every state sequence when gradients are wanted), then propagates adjoints node by node in
reverse topological order. A view's adjoint is the same view of its source's adjoint, so
an index or broadcast needs no code: consumers accumulate straight into the source's
adjoint (a broadcast axis accumulates over it). Parameter gradients accumulate per row
inside the kernel and are summed after; seq-input gradients are written per step; the
adjoint of the initial states comes back. Every derivative is torch's (the reference
backend runs autograd over TorchExpr): max/min split ties, amax spreads over ties, relu
and abs have zero slope at 0, pow follows torch's masks. Under create_graph=True the
backward re-runs the stage as a torch loop over the same IR (double_backward.py).

Readouts (optional): values computed per step from the loop's values, such as an output
`o = q @ M'`, can be passed as `readouts=`; run returns their sequences, so a matrix state
whose sequence only that output read need not be written at all (for Yaad at K = V = 64,
B = 4, T = 1024 that sequence is 64 MiB, and first-touching fresh memory costs 7x the loop).

Speed. W @ x for a param W reads a transposed copy of W (passed in by run) down its
columns: vector multiply-adds into a local accumulator array, which nothing can alias, so
it stays in registers (dot products of rows, with their horizontal sums, are 4x slower,
and GCC re-checks the overlap of block-scope restrict arrays at every outer iteration).
Every other sum runs along the contiguous axis of its destination, or into a register
with an OpenMP simd reduction.

Rejected (NotEligible, with the op): sum_in and neighbour states (grids and DAGs), a
matmul of rank-3 values, concat of values whose leading axes differ, and whatever a C
toolchain cannot build here (fused_loop.toolchain_missing)."""
from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from recdsl.ir import COMPARE, IRCell, Node, Op, toposort
from recdsl.torch_expr import SourceNotes, compile_nodes

from .c_adjoint import source_terms
from .double_backward import recompute_vjp, wants_graph
from .fused_loop import C_BINARY, C_UNARY, CompiledLoop, NotEligible, as_bool, build_library

# torch.maximum / minimum propagate NaN; C's `a > b ? a : b` would drop it (fused_loop's
# table; it does not matter to lanes of finite gates, but here the result is torch's).
C_BIN = {**C_BINARY,
         Op.MAX: "(({0}) > ({1}) || ({0}) != ({0}) ? ({0}) : ({1}))",
         Op.MIN: "(({0}) < ({1}) || ({0}) != ({0}) ? ({0}) : ({1}))"}

NO_GRADIENT = COMPARE | {Op.SIGN}      # piecewise constant: no adjoint flows through them
VIEWS = {Op.INDEX, Op.TRANSPOSE, Op.EXPAND}
MAX_SCRATCH = 1 << 26                  # elements of per-thread workspace (512 MiB in fp64)
ALIGN = 8                              # workspace arrays start on 64-byte boundaries
LOCAL_MAX = 512                        # longest vector summed in a local (register) array


def _literal(v: float) -> str:
    v = float(v)
    if v != v:
        return "(T_)NAN"
    if abs(v) == math.inf:
        return "(T_)INFINITY" if v > 0 else "(-(T_)INFINITY)"
    return f"(T_){v!r}"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _row_major(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Val:
    """Where the elements of a value live in the generated C: element (i0, i1, ...) is
    base[off + i0*strides[0] + ...]; a constant scalar (broadcast to any shape) is `lit`."""
    shape: tuple[int, ...]
    base: str | None = None
    off: int = 0
    strides: tuple[int, ...] = ()
    lit: str | None = None

    @staticmethod
    def array(base: str, shape: Sequence[int]) -> "Val":
        return Val(tuple(shape), base, 0, _row_major(shape))

    def lift(self, shape: Sequence[int]) -> "Val":
        """This value broadcast to `shape` (numpy: node axes aligned on the right)."""
        shape = tuple(shape)
        if self.lit is not None:
            return replace(self, shape=shape)
        k = len(shape) - len(self.shape)
        strides = [0] * k + [0 if d == 1 else s for d, s in zip(self.shape, self.strides)]
        return Val(shape, self.base, self.off, tuple(strides))

    def at(self, idx: Sequence[str]) -> str:
        """C expression of the element at the index expressions idx (one per axis)."""
        if self.lit is not None:
            return self.lit
        terms = [i if s == 1 else f"{i} * {s}" for i, s, d in zip(idx, self.strides, self.shape) if s and d > 1]
        if self.off or not terms:
            terms.append(str(self.off))
        return f"{self.base}[{' + '.join(terms)}]"

    def contiguous(self) -> bool:
        return self.lit is None and all(s == r for s, r, d in zip(self.strides, _row_major(self.shape), self.shape)
                                        if d > 1)


def _index_view(v: Val, items) -> Val:
    """v[..., items] (ints drop an axis, slices narrow one, None inserts one of size 1)."""
    shape, strides, off, axis = [], [], v.off, 0
    for it in items:
        if it is None:
            shape.append(1)
            strides.append(0)
            continue
        n, s = v.shape[axis], (v.strides[axis] if v.lit is None else 0)
        if isinstance(it, slice):
            lo, hi, step = it.indices(n)
            shape.append(len(range(lo, hi, step)))
            strides.append(s * step)
            off += lo * s
        else:
            off += (int(it) % n) * s
        axis += 1
    shape += v.shape[axis:]
    strides += list(v.strides[axis:]) if v.lit is None else [0] * (len(v.shape) - axis)
    if v.lit is not None:
        return Val(tuple(shape), lit=v.lit)
    return Val(tuple(shape), v.base, off, tuple(strides))


def _transpose_view(v: Val) -> Val:
    if v.lit is not None:
        return Val(v.shape[:-2] + (v.shape[-1], v.shape[-2]), lit=v.lit)
    return Val(v.shape[:-2] + (v.shape[-1], v.shape[-2]), v.base, v.off,
               v.strides[:-2] + (v.strides[-1], v.strides[-2]))


def nest(shape: Sequence[int], body: Callable[[list[str]], str]) -> str:
    """One line: loops over `shape` (axes of size 1 are index 0, no loop) around body(idx)."""
    idx = [f"i{k}" if d > 1 else "0" for k, d in enumerate(shape)]
    head = "".join(f"for (int64_t {i} = 0; {i} < {d}; {i}++) " for i, d in zip(idx, shape) if d > 1)
    return head + body(idx)


def accumulate(shape: Sequence[int], dst: Val, rhs: Callable[[list[str]], str],
               inner: int | None = None) -> list[str]:
    """dst(idx) += rhs(idx) over the index space `shape` (dst has stride 0 on the axes it
    sums over). The innermost loop is `inner`, else the axis along which dst is contiguous
    (vector multiply-adds into dst), else the last. When dst does not move along the
    innermost loop (a sum over it), that loop sums into a register with an OpenMP simd
    reduction: a chain of adds through memory does not vectorise."""
    loops = [k for k, d in enumerate(shape) if d > 1]
    idx = [f"i{k}" if d > 1 else "0" for k, d in enumerate(shape)]
    if not loops:
        return [f"{dst.at(idx)} += {rhs(idx)};"]
    if inner is None or inner not in loops:
        unit = [k for k in loops if dst.strides[k] == 1]
        inner = unit[-1] if unit else loops[-1]
    outer = "".join(f"for (int64_t i{k} = 0; i{k} < {shape[k]}; i{k}++) " for k in loops if k != inner)
    head = f"for (int64_t i{inner} = 0; i{inner} < {shape[inner]}; i{inner}++) "
    if dst.strides[inner] != 0 and outer and all(dst.strides[k] == 0 for k in loops if k != inner) \
            and shape[inner] <= LOCAL_MAX:
        # a vector summed over the outer loops (W @ x down the columns): into a local array,
        # which nothing can alias, so it stays in registers (GCC does not trust the arrays'
        # block-scope restrict and re-checks overlap at every outer step: 5x slower)
        tmp = Val((shape[inner],), "acc", 0, (1,))
        at = [f"i{inner}" if k == inner else "0" for k in range(len(shape))]
        return ["{",
                f"  T_ acc[{shape[inner]}] = {{0}};",
                f"  {outer}{head}{tmp.at([f'i{inner}'])} += {rhs(idx)};",
                f"  {head}{dst.at(at)} += {tmp.at([f'i{inner}'])};",
                "}"]
    if dst.strides[inner] != 0:
        return [f"{outer}{head}{dst.at(idx)} += {rhs(idx)};"]
    return [f"{outer}{{",
            "  T_ acc = 0;",
            "  #pragma omp simd reduction(+:acc)",
            f"  {head}acc += {rhs(idx)};",
            f"  {dst.at(idx)} += acc;",
            "}"]


def _summed(v: Val, axes: Sequence[int], space: Sequence[int]) -> Val:
    """v addressed by the index space `space`, in which v's own axes are `axes` (stride 0
    along the others: the axes summed over)."""
    strides = [0] * len(space)
    for k, ax in enumerate(axes):
        strides[ax] = v.strides[k] if v.shape[k] > 1 else 0
    return Val(tuple(space), v.base, v.off, tuple(strides), v.lit)


class _Gen:
    """The C text of one stage: forward step lines, backward lines, the workspace layout."""

    def __init__(self, ir: IRCell, states: list[str], core: list[Node], readouts: Sequence[Node] = ()):
        self.ir, self.states, self.readouts = ir, states, list(readouts)
        self.notes = SourceNotes(ir)   # every node line names the .rec line it came from
        self.count = 0
        self.val: dict[int, Val] = {}          # node id -> its value in the C step
        self.adj: dict[int, Val | None] = {}   # node id -> its adjoint (None: no gradient reaches it)
        self.fwd_arrays: list[tuple[str, int]] = []
        self.adj_arrays: list[tuple[str, int]] = []
        self.consts: list[str] = []            # static const arrays (arange constants)
        self.init: list[str] = []              # per row, before the time loop (eye)
        self.fwd: list[str] = []               # per step
        self.back_ops: list[Node] = []         # computed nodes with an adjoint, in forward order
        self.params: list[Node] = []
        self.seqs: list[Node] = []
        self.state_leaves: list[Node] = []
        self.transposed_params: set[int] = set()   # params read as W @ x: run passes W transposed too
        self.state_shapes = [ir.shape_of(ir.states[s]) for s in states]
        if any(n.op == Op.SUM_IN for n in core):   # before its neighbour-state leaves, the more telling reason
            raise NotEligible("sum_in: a sum over a DAG's in-edges")
        core_ids = {n.id for n in core}
        for n in core:
            if n.op in (Op.STATE, Op.PARAM, Op.INPUT, Op.CONST, Op.EYE):
                self.leaf(n)
                continue
            for s in n.srcs:
                if s.id not in core_ids and s.id not in self.val:
                    self.outside(s)
            self.node(n)
        for s in states:
            if ir.updates[s].id not in self.val:
                raise NotEligible(f"the update of state {s} is not computed in the loop")
        self.readout_nodes(core_ids)

    def outside(self, n: Node) -> None:
        """A value the step reads from outside the loop. A view of a param (`W[:, H:]`, what
        the analysis makes of `W @ concat(x, h)`) is a view in the loop, free, of the param
        as stored; anything else is a leaf (a param, or a whole-sequence input read per
        step)."""
        chain, root = [], n
        while root.op in VIEWS and len(root.srcs) == 1:
            chain.append(root)
            root = root.srcs[0]
        if not chain or root.op != Op.PARAM:
            self.leaf(n)
            return
        if root.id not in self.val:
            self.leaf(root)
        for v in reversed(chain):
            if v.id not in self.val:
                self.node(v)

    def readout_nodes(self, core_ids: set[int]) -> None:
        """The readouts, and the values they read beyond the core: computed per step where
        they read the loop's values (the core, this stage's previous states), else read as
        whole-sequence leaves like the core's own inputs."""
        inner: set[int] = set()
        order = toposort(self.readouts)

        def in_loop(s: Node) -> bool:
            return s.id in core_ids or s.id in inner or (s.op == Op.STATE and s.arg[0] in self.states)
        for n in order:
            if n.id not in self.val and any(in_loop(s) for s in n.srcs):
                inner.add(n.id)
        for n in order:
            if n.id in inner:
                for s in n.srcs:
                    if s.id not in self.val:
                        self.leaf(s)
                self.node(n)
        for n in self.readouts:
            if n.id not in self.val:
                self.leaf(n)

    # ------------------------------------------------------------------ helpers
    def shape(self, n: Node) -> tuple[int, ...]:
        return self.ir.shape_of(n)

    def fresh(self, size: int | None, adjoint: bool = False) -> str:
        """A new array name (numbered: no user name reaches the C), in the forward's or the
        adjoints' workspace (size None: not in the workspace)."""
        name = f"{'g' if adjoint else 'v'}{self.count}"
        self.count += 1
        if size is not None:
            (self.adj_arrays if adjoint else self.fwd_arrays).append((name, size))
        return name

    def note(self, n: Node) -> str:
        where = self.notes(n, with_text=False)
        return f"  /* {where} */" if where else ""

    def emit(self, out: list[str], n: Node, lines: list[str]) -> None:
        out.extend(f"{line}{self.note(n)}" for line in lines)

    # ------------------------------------------------------------------ leaves
    def leaf(self, n: Node) -> None:
        shape = self.shape(n)
        if n.op == Op.STATE:
            name, where = n.arg
            if where != "prev":
                raise NotEligible(f"state {name}.{where}: a neighbour's state (grids and DAGs)")
            if name in self.states:
                k = self.states.index(name)
                self.val[n.id] = Val.array(f"sp{k}", shape)
                self.adj[n.id] = Val.array(f"gs{k}", shape)
                self.state_leaves.append(n)
                return
        if n.op == Op.CONST and not n.shape:
            self.val[n.id] = Val((), lit=_literal(n.arg))
            self.adj[n.id] = None
        elif n.op == Op.CONST:
            name = self.fresh(None)   # static data
            self.consts.append(f"static const T_ {name}[{_numel(shape)}] = "
                               f"{{{', '.join(_literal(v) for v in n.arg)}}};{self.note(n)}")
            self.val[n.id] = Val.array(name, shape)
            self.adj[n.id] = None
        elif n.op == Op.EYE:
            name = self.fresh(_numel(shape))
            self.val[n.id] = Val.array(name, shape)
            self.adj[n.id] = None
            self.emit(self.init, n, [nest(shape, lambda i: f"{name}[{i[0]} * {shape[1]} + {i[1]}] = "
                                                           f"(T_)({i[0]} == {i[1]});")])
        elif n.op == Op.PARAM:
            k = len(self.params)
            self.params.append(n)
            self.val[n.id] = Val.array(f"pp{k}", shape)
            self.adj[n.id] = Val.array(f"gp{k}", shape)
        else:   # inputs, hoisted values, states of earlier stages: whole sequences read per step
            k = len(self.seqs)
            self.seqs.append(n)
            self.val[n.id] = Val.array(f"in{k}", shape)
            self.adj[n.id] = Val.array(f"gi{k}", shape)

    # ------------------------------------------------------------------ forward
    def node(self, n: Node) -> None:
        op = n.op
        srcs = [self.val[s.id] for s in n.srcs]
        shape = self.shape(n)
        if op in VIEWS or (op == Op.RESHAPE and (srcs[0].contiguous() or srcs[0].lit is not None)):
            self.view(n, srcs[0], shape)
            return
        if op not in C_UNARY and op not in C_BIN and op not in (
                Op.WHERE, Op.MATMUL, Op.OUTER, Op.DOT, Op.SUM, Op.AMAX, Op.LOGSUMEXP, Op.CONCAT, Op.RESHAPE):
            raise NotEligible(f"{op.name.lower()} has no C form in the general loop")
        if op == Op.MATMUL and (n.srcs[0].rank, n.srcs[1].rank) not in ((2, 1), (1, 2), (2, 2)):
            raise NotEligible(f"matmul of a rank-{n.srcs[0].rank} by a rank-{n.srcs[1].rank} value")
        if op == Op.CONCAT and any(s.rank != n.rank or self.shape(s)[:-1] != shape[:-1] for s in n.srcs):
            raise NotEligible("concat of values whose shapes differ before the last axis")
        out = Val.array(self.fresh(_numel(shape)), shape)
        self.val[n.id] = out
        self.emit(self.fwd, n, getattr(self, "_f_" + self.family(op))(n, out, srcs))
        inputs = n.srcs[1:] if op == Op.WHERE else n.srcs
        active = op not in NO_GRADIENT and any(self.adj[s.id] is not None for s in inputs)
        self.adj[n.id] = Val.array(self.fresh(_numel(shape), adjoint=True), shape) if active else None
        if active:
            self.back_ops.append(n)

    @staticmethod
    def family(op: Op) -> str:
        return "elementwise" if op in C_UNARY or op in C_BIN or op == Op.WHERE else op.name.lower()

    def view(self, n: Node, src: Val, shape: tuple[int, ...]) -> None:
        """An index / transpose / expand / reshape: the source's elements, re-addressed."""
        def apply(v: Val) -> Val:
            if n.op == Op.INDEX:
                return _index_view(v, n.arg)
            if n.op == Op.TRANSPOSE:
                return _transpose_view(v)
            if n.op == Op.EXPAND:
                return v.lift(shape)
            return Val(shape, lit=v.lit) if v.lit is not None else Val(shape, v.base, v.off, _row_major(shape))
        got = apply(src)
        if got.shape != shape:
            raise NotEligible(f"{n.op.name.lower()} gives shape {list(got.shape)}, expected {list(shape)}")
        self.val[n.id] = got
        g = self.adj[n.srcs[0].id]
        self.adj[n.id] = None if g is None else apply(g)

    def _f_elementwise(self, n, out, srcs):
        xs = [s.lift(out.shape) for s in srcs]

        def value(i):
            a = [x.at(i) for x in xs]
            if n.op == Op.WHERE:
                return f"({a[0]} ? {a[1]} : {a[2]})"
            return (C_UNARY if n.op in C_UNARY else C_BIN)[n.op].format(*a)
        return [nest(out.shape, lambda i: f"{out.at(i)} = {value(i)};")]

    def _f_matmul(self, n, out, srcs):
        """As index spaces: [M, K] @ [K] over (m, k); [K] @ [K, N] over (k, n); [M, K] @ [K, N]
        over (m, n, k). The innermost loop runs along the contiguous axis of the matrix read:
        down the columns of a param (its transposed copy) for W @ x, vector multiply-adds
        with no horizontal sums, 4x faster than dot products of rows at 64 x 64."""
        a, b = srcs
        zero = f"for (int64_t i = 0; i < {_numel(out.shape)}; i++) {out.base}[i] = 0;"
        if len(a.shape) == 2 and len(b.shape) == 1:
            a = self.transposed(n.srcs[0]) or a
            space = a.shape
            o = _summed(out, (0,), space)
            return [zero] + accumulate(space, o, lambda i: f"{a.at(i)} * {b.at(i[1:])}",
                                       inner=0 if a.strides[0] == 1 else 1)
        if len(a.shape) == 1:
            space = b.shape
            o = _summed(out, (1,), space)
            return [zero] + accumulate(space, o, lambda i: f"{a.at(i[:1])} * {b.at(i)}",
                                       inner=1 if b.strides[1] == 1 else 0)
        space = (a.shape[0], b.shape[1], a.shape[1])
        o = _summed(out, (0, 1), space)
        return [zero] + accumulate(space, o, lambda i: f"{a.at([i[0], i[2]])} * {b.at([i[2], i[1]])}",
                                   inner=1 if b.strides[1] == 1 else 2)

    def transposed(self, w: Node) -> Val | None:
        """The transposed copy [H, L] of a matrix param [L, H] read as W @ x (passed in by run)."""
        if w.op != Op.PARAM or w.rank != 2:
            return None
        k = self.params.index(w)
        self.transposed_params.add(k)
        L, H = self.shape(w)
        return Val((L, H), f"pt{k}", 0, (1, L))

    def _f_outer(self, n, out, srcs):
        a, b = srcs
        return [nest(out.shape, lambda i: f"{out.at(i)} = {a.at(i[:1])} * {b.at(i[1:])};")]

    def _f_dot(self, n, out, srcs):
        K = max(srcs[0].shape[0], srcs[1].shape[0])
        a, b = (s.lift((K,)) for s in srcs)
        return ["{",
                "  T_ acc = 0;",
                "  #pragma omp simd reduction(+:acc)",
                f"  for (int64_t i0 = 0; i0 < {K}; i0++) acc += {a.at(['i0'])} * {b.at(['i0'])};",
                f"  {out.base}[0] = acc;",
                "}"]

    def reduced(self, n: Node, out: Val, src: Val) -> Val:
        """The output of a reduction addressed by the source's index (stride 0 on reduced axes)."""
        axis, keep = n.arg
        r = len(src.shape)
        axes = set(range(r)) if axis is None else {axis}
        kept = [d for k, d in enumerate(src.shape) if k not in axes]
        it = iter(_row_major(kept))
        strides = tuple(0 if k in axes else next(it) for k in range(r))
        return Val(src.shape, out.base, out.off, strides)

    def _f_sum(self, n, out, srcs):
        x = srcs[0]
        o = self.reduced(n, out, x)
        return [f"for (int64_t i = 0; i < {_numel(out.shape)}; i++) {out.base}[i] = 0;"] + \
            accumulate(x.shape, o, x.at)

    def _amax_lines(self, o: Val, x: Val, size: int) -> list[str]:
        return [f"for (int64_t i = 0; i < {size}; i++) {o.base}[i] = -(T_)INFINITY;",
                nest(x.shape, lambda i: f"{{ T_ e = {x.at(i)}; if (e > {o.at(i)} || e != e) {o.at(i)} = e; }}")]

    def _f_amax(self, n, out, srcs):
        return self._amax_lines(self.reduced(n, out, srcs[0]), srcs[0], _numel(out.shape))

    def _f_logsumexp(self, n, out, srcs):
        """torch.logsumexp: m = amax (an infinite m counts as 0), log(sum(exp(x - m))) + m."""
        x, size = srcs[0], _numel(out.shape)
        m = Val.array(self.fresh(size), out.shape)
        mo, o = self.reduced(n, m, x), self.reduced(n, out, x)
        return self._amax_lines(mo, x, size) + [
            f"for (int64_t i = 0; i < {size}; i++) {{ if (isinf({m.base}[i])) {m.base}[i] = 0; {out.base}[i] = 0; }}",
            *accumulate(x.shape, o, lambda i: f"EXP({x.at(i)} - {mo.at(i)})"),
            f"for (int64_t i = 0; i < {size}; i++) {out.base}[i] = LOG({out.base}[i]) + {m.base}[i];"]

    def parts(self, n: Node, out: Val) -> list[tuple[Val, Val]]:
        """(part, the slice of out it fills) per source of a concat."""
        got, off = [], 0
        for s in n.srcs:
            shape = self.shape(s)
            got.append((self.val[s.id].lift(shape), Val(shape, out.base, off, out.strides)))
            off += shape[-1]
        return got

    def _f_concat(self, n, out, srcs):
        return [nest(p.shape, lambda i, p=p, dst=dst: f"{dst.at(i)} = {p.at(i)};") for p, dst in self.parts(n, out)]

    def _f_reshape(self, n, out, srcs):
        """A reshape of strided data: copied in row-major order of the source."""
        x = srcs[0]
        o = Val(x.shape, out.base, 0, _row_major(x.shape))
        return [nest(x.shape, lambda i: f"{o.at(i)} = {x.at(i)};")]

    # ------------------------------------------------------------------ backward
    def backward(self) -> list[str]:
        lines: list[str] = []
        for n in reversed(self.back_ops):
            g = self.adj[n.id]
            srcs = [self.val[s.id] for s in n.srcs]
            gs = [self.adj[s.id] for s in n.srcs]
            self.emit(lines, n, getattr(self, "_b_" + self.family(n.op))(n, self.val[n.id], g, srcs, gs))
        return lines

    def _b_elementwise(self, n, y, g, srcs, gs):
        """Per source, torch's derivative term (c_adjoint.py) added to its adjoint; a
        broadcast source accumulates over the axes it was broadcast along."""
        xs = [s.lift(y.shape) for s in srcs]
        terms = lambda i: source_terms(n.op, [x.at(i) for x in xs], y.at(i), g.at(i))  # noqa: E731
        lines = []
        for k, gk in enumerate(gs):
            if gk is None or terms(["0"] * len(y.shape))[k] is None:   # a where's condition
                continue
            lines += accumulate(y.shape, gk.lift(y.shape), lambda i, k=k: terms(i)[k])
        return lines

    def _b_matmul(self, n, y, g, srcs, gs):
        """The adjoints over the forward's index spaces; each sums along the contiguous axis
        of what it reads, or multiply-adds along its own contiguous axis."""
        (a, b), (ga, gb) = srcs, gs
        lines = []
        if len(a.shape) == 2 and len(b.shape) == 1:     # y[m] = sum_k a[m,k] b[k]
            space = a.shape
            if ga is not None:
                lines += accumulate(space, ga, lambda i: f"{g.at(i[:1])} * {b.at(i[1:])}")
            if gb is not None:
                lines += accumulate(space, _summed(gb, (1,), space), lambda i: f"{g.at(i[:1])} * {a.at(i)}",
                                    inner=1 if a.strides[1] == 1 else 0)
        elif len(a.shape) == 1:                         # y[n] = sum_k a[k] b[k,n]
            space = b.shape
            if ga is not None:
                lines += accumulate(space, _summed(ga, (0,), space), lambda i: f"{g.at(i[1:])} * {b.at(i)}",
                                    inner=1 if b.strides[1] == 1 else 0)
            if gb is not None:
                lines += accumulate(space, gb, lambda i: f"{a.at(i[:1])} * {g.at(i[1:])}")
        else:                                           # y[m,n] = sum_k a[m,k] b[k,n], space (m, n, k)
            space = (a.shape[0], b.shape[1], a.shape[1])
            if ga is not None:
                lines += accumulate(space, _summed(ga, (0, 2), space),
                                    lambda i: f"{g.at(i[:2])} * {b.at([i[2], i[1]])}",
                                    inner=1 if b.strides[1] == 1 else 2)
            if gb is not None:
                lines += accumulate(space, _summed(gb, (2, 1), space),
                                    lambda i: f"{a.at([i[0], i[2]])} * {g.at(i[:2])}")
        return lines

    def _b_outer(self, n, y, g, srcs, gs):
        (a, b), (ga, gb) = srcs, gs
        lines = []
        if ga is not None:   # ga[m] += sum_n g[m, n] b[n]
            lines += accumulate(y.shape, Val(y.shape, ga.base, ga.off, (ga.strides[0], 0)),
                                lambda i: f"{g.at(i)} * {b.at(i[1:])}")
        if gb is not None:   # gb[n] += sum_m g[m, n] a[m]
            lines += accumulate(y.shape, Val(y.shape, gb.base, gb.off, (0, gb.strides[0])),
                                lambda i: f"{g.at(i)} * {a.at(i[:1])}")
        return lines

    def _b_dot(self, n, y, g, srcs, gs):
        K = max(s.shape[0] for s in srcs)
        a, b = (s.lift((K,)) for s in srcs)
        lines = []
        for gk, other in ((gs[0], b), (gs[1], a)):
            if gk is not None:
                gk = gk.lift((K,))
                lines.append(f"for (int64_t i0 = 0; i0 < {K}; i0++) {gk.at(['i0'])} += {g.base}[0] * "
                             f"{other.at(['i0'])};")
        return lines

    def _b_sum(self, n, y, g, srcs, gs):
        x, gx = srcs[0], gs[0]
        go = self.reduced(n, g, x)
        return accumulate(x.shape, gx, go.at)

    def _b_amax(self, n, y, g, srcs, gs):
        """torch: the adjoint is shared evenly by the elements equal to the max."""
        x, gx = srcs[0], gs[0]
        size = _numel(y.shape)
        cnt = Val.array(self.fresh(size), y.shape)
        co, yo, go = self.reduced(n, cnt, x), self.reduced(n, y, x), self.reduced(n, g, x)
        return [f"for (int64_t i = 0; i < {size}; i++) {cnt.base}[i] = 0;",
                *accumulate(x.shape, co, lambda i: f"(T_)({x.at(i)} == {yo.at(i)})"),
                *accumulate(x.shape, gx, lambda i: f"({x.at(i)} == {yo.at(i)} ? {go.at(i)} / {co.at(i)} : 0)")]

    def _b_logsumexp(self, n, y, g, srcs, gs):
        x, gx = srcs[0], gs[0]
        yo, go = self.reduced(n, y, x), self.reduced(n, g, x)
        return accumulate(x.shape, gx, lambda i: f"{go.at(i)} * EXP({x.at(i)} - {yo.at(i)})")

    def _b_concat(self, n, y, g, srcs, gs):
        lines = []
        for (p, dst), gp in zip(self.parts(n, g), gs):
            if gp is not None:
                gp = gp.lift(p.shape)
                lines += accumulate(p.shape, gp, dst.at)
        return lines

    def _b_reshape(self, n, y, g, srcs, gs):
        x, gx = srcs[0], gs[0]
        go = Val(x.shape, g.base, 0, _row_major(x.shape))
        return accumulate(x.shape, gx, go.at)

    # ------------------------------------------------------------------ the C functions
    def source(self) -> tuple[str, dict]:
        """The C text (both dtypes) and the layout of its arguments."""
        back = self.backward()   # allocates the backward's scratch arrays too
        ns = len(self.states)
        self.sizes = [_numel(s) for s in self.state_shapes]
        self.seq_sizes = [_numel(self.shape(n)) for n in self.seqs]
        self.par_sizes = [_numel(self.shape(n)) for n in self.params]
        self.ro_sizes = [_numel(self.shape(n)) for n in self.readouts]
        # workspace: forward arrays, state buffers (current, next, carried adjoint), then the
        # adjoints, zeroed at every step of the backward
        ws = list(self.fwd_arrays) + [(f"{kind}{k}", self.sizes[k]) for kind in ("cu", "nx", "cr") for k in range(ns)]
        adj = list(self.adj_arrays) + [(f"gs{k}", self.sizes[k]) for k in range(ns)]
        self.offs, total = {}, 0
        for name, size in ws + adj:
            self.offs[name] = total
            total += -(-max(size, 1) // ALIGN) * ALIGN
        self.adj_lo, self.total = self.offs[adj[0][0]], total
        if total > MAX_SCRATCH:
            raise NotEligible(f"the step's values need {total} elements of scratch per thread")
        nq, np_, nr = len(self.seqs), len(self.params), len(self.readouts)
        # argument slots: P (pointers) and S (strides: the seqs' (b, t, head), the params'
        # head stride, the forward's state outputs' (b, t, head))
        common = [("seq", nq), ("pp", np_), ("pt", np_), ("s0", ns)]   # the same slots in both functions
        self.fp = _slots(common + [("out", ns), ("fin", ns), ("ro", nr)])
        self.bp = _slots(common + [("saved", ns), ("gq", ns), ("gr", nr), ("gin", nq), ("gpar", np_), ("gs0", ns)])
        self.ss = _slots([("seq", 3 * nq), ("pp", np_), ("out", 3 * ns)])
        text = self._forward_fn() + "\n\n" + self._backward_fn(back) + "\n"
        layout = {"ws": total, "sizes": self.sizes, "par_sizes": self.par_sizes}
        return PRELUDE + _MATH32 + _dtype(text, "f32", "float") + _UNDEF + _MATH64 + _dtype(text, "f64", "double"), \
            layout

    def _row_setup(self) -> list[str]:
        """Per row: its workspace, arrays, constants and params."""
        return (["  #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)",
                 "  for (int64_t r = 0; r < B * NH; r++) {",
                 "    const int64_t b = r / NH, hd = r % NH;",
                 "    T_* restrict w = ws + (int64_t)omp_get_thread_num() * wsz;"]
                + ["    " + c for c in self.consts] + self._decls(self.fwd_arrays)
                + [f"    const T_* restrict {kind}{k} = (const T_*)P[{self.fp[kind] + k}] + hd * S[{self.ss['pp'] + k}];"
                   for kind, ks in (("pp", range(len(self.params))), ("pt", sorted(self.transposed_params)))
                   for k in ks])

    def _decls(self, names) -> list[str]:
        return [f"    T_* restrict {nm} = w + {self.offs[nm]};" for nm, _ in names]

    def _step_inputs(self) -> list[str]:
        """Per step: the row of each whole-sequence value (strides 0 on broadcast axes)."""
        s = self.ss["seq"]
        return [f"      const T_* restrict in{k} = (const T_*)P[{k}] + b * S[{s + 3 * k}] + t * S[{s + 3 * k + 1}]"
                f" + hd * S[{s + 3 * k + 2}];" for k in range(len(self.seqs))]

    @staticmethod
    def _rowptr(slot: int, size: int) -> str:
        """Row (b, t, head) of a contiguous [B, T, NH, size] tensor."""
        return f"(T_*)P[{slot}] + ((b * T + t) * NH + hd) * {size}"

    def _forward_fn(self) -> str:
        ir, ns, fp, o = self.ir, len(self.states), self.fp, self.ss["out"]

        def store(k):   # the new state: the next step's previous one, and its row of the output
            shape, u = self.state_shapes[k], ir.updates[self.states[k]]
            nx, ou = Val.array(f"nx{k}", shape), Val.array(f"ou{k}", shape)
            new = self.val[u.id]
            return "      " + nest(shape, lambda i: f"{{ {nx.at(i)} = {new.at(i)}; {ou.at(i)} = {nx.at(i)}; }}") \
                + self.note(u)

        def readout(k):
            n = self.readouts[k]
            shape, ro = self.shape(n), Val.array(f"ro{k}", self.shape(n))
            value = self.val[n.id].lift(shape)
            return [f"      T_* restrict ro{k} = {self._rowptr(fp['ro'] + k, self.ro_sizes[k])};",
                    "      " + nest(shape, lambda i: f"{ro.at(i)} = {value.at(i)};") + self.note(n)]

        return _pruned(
            ["void loop_SFX(void* const* P, const int64_t* S, T_* ws, int64_t wsz, int64_t T, int64_t B, "
             "int64_t NH, int64_t nthreads) {"]
            + self._row_setup()
            + [f"    T_* {b}{k} = w + {self.offs[f'{kind}{k}']};"
               for k in range(ns) for b, kind in (("c", "cu"), ("n", "nx"))]
            + [f"    memcpy(c{k}, (const T_*)P[{fp['s0'] + k}] + r * {self.sizes[k]}, {self.sizes[k]} * sizeof(T_));"
               for k in range(ns)]
            + ["    " + line for line in self.init]
            + ["    for (int64_t t = 0; t < T; t++) {"]
            + [f"      const T_* restrict sp{k} = c{k};" for k in range(ns)]
            + [f"      T_* restrict nx{k} = n{k};" for k in range(ns)]
            + self._step_inputs() + ["      " + line for line in self.fwd]
            + [line for k in range(len(self.readouts)) for line in readout(k)]
            + [f"      T_* restrict ou{k} = (T_*)P[{fp['out'] + k}] + b * S[{o + 3 * k}] + t * S[{o + 3 * k + 1}]"
               f" + hd * S[{o + 3 * k + 2}];" for k in range(ns)]
            + [store(k) for k in range(ns)]
            + [f"      {{ T_* tmp = c{k}; c{k} = n{k}; n{k} = tmp; }}" for k in range(ns)]
            + ["    }"]
            + [f"    memcpy((T_*)P[{fp['fin'] + k}] + r * {self.sizes[k]}, c{k}, {self.sizes[k]} * sizeof(T_));"
               for k in range(ns)]
            + ["  }", "}"])

    def _seed(self, n: Node, shape, gsrc: str, carry: str | None) -> list[str]:
        """Add the step's incoming adjoint of n (the carry from step t + 1 of a state, and
        the gradient of its sequence at t, if any) to n's adjoint."""
        gu = self.adj[n.id]
        if gu is None:
            return []
        gu, note = gu.lift(shape), self.note(n)
        gq, cr = Val.array(gsrc, shape), (Val.array(carry, shape) if carry else None)
        both = accumulate(shape, gu, lambda i: f"{cr.at(i)} + {gq.at(i)}" if cr else gq.at(i))
        lines = [f"      if ({gsrc}) {{{note}"] + [f"        {line}{note}" for line in both]
        if cr is not None:
            lines += [f"      }} else {{{note}"] + [f"        {line}{note}" for line in accumulate(shape, gu, cr.at)]
        return lines + [f"      }}{note}"]

    def _backward_fn(self, back: list[str]) -> str:
        ir, ns, bp = self.ir, len(self.states), self.bp
        sizes = self.sizes
        return _pruned(
            ["void back_SFX(void* const* P, const int64_t* S, T_* ws, int64_t wsz, int64_t T, int64_t B, "
             "int64_t NH, int64_t nthreads) {"]
            + self._row_setup() + self._decls(self.adj_arrays)
            + [f"    T_* restrict gp{k} = (T_*)P[{bp['gpar'] + k}] + r * {self.par_sizes[k]};"
               for k in range(len(self.params))]
            + [f"    T_* restrict {kind}{k} = w + {self.offs[f'{kind}{k}']};"
               for k in range(ns) for kind in ("cr", "gs")]
            + [f"    memset(cr{k}, 0, {sizes[k]} * sizeof(T_));" for k in range(ns)]
            + ["    " + line for line in self.init]
            + ["    for (int64_t t = T - 1; t >= 0; t--) {"]
            + [f"      const T_* restrict sp{k} = t > 0 ? (const T_*)P[{bp['saved'] + k}]"
               f" + ((b * T + t - 1) * NH + hd) * {sizes[k]} : (const T_*)P[{bp['s0'] + k}] + r * {sizes[k]};"
               for k in range(ns)]
            + self._step_inputs()
            + [f"      T_* restrict gi{k} = {self._rowptr(bp['gin'] + k, self.seq_sizes[k])};"
               for k in range(len(self.seqs))]
            + [f"      const T_* gq{k} = P[{bp['gq'] + k}] ? {self._rowptr(bp['gq'] + k, sizes[k])} : 0;"
               for k in range(ns)]
            + [f"      const T_* gr{k} = P[{bp['gr'] + k}] ? {self._rowptr(bp['gr'] + k, self.ro_sizes[k])} : 0;"
               for k in range(len(self.readouts))]
            + ["      " + line for line in self.fwd]
            + [f"      memset(w + {self.adj_lo}, 0, {self.total - self.adj_lo} * sizeof(T_));"]
            + [line for k, s in enumerate(self.states) for line in self._seed(ir.updates[s], self.state_shapes[k],
                                                                               f"gq{k}", f"cr{k}")]
            + [line for k, n in enumerate(self.readouts) for line in self._seed(n, self.shape(n), f"gr{k}", None)]
            + ["      " + line for line in back]
            + [f"      memcpy(cr{k}, gs{k}, {sizes[k]} * sizeof(T_));" for k in range(ns)]
            + ["    }"]
            + [f"    memcpy((T_*)P[{bp['gs0'] + k}] + r * {sizes[k]}, cr{k}, {sizes[k]} * sizeof(T_));"
               for k in range(ns)]
            + ["  }", "}"])


_DECL = re.compile(r"^\s*(?:const )?T_\* (?:restrict )?(\w+) = [^;]*;$")


def _pruned(lines: list[str]) -> str:
    """The function's text without the pointer declarations nothing reads (a param read
    only transposed, a sequence whose adjoint no value reaches), to a fixpoint."""
    code = [re.sub(r"/\*.*?\*/", "", line).rstrip() for line in lines]
    while True:
        decls = {k: m.group(1) for k, line in enumerate(code) if line and (m := _DECL.match(line))}
        text = "\n".join(line for line in code if line)
        dead = {k for k, name in decls.items() if len(re.findall(rf"\b{name}\b", text)) == 1}
        if not dead:
            return "\n".join(line for line, c in zip(lines, code) if c)
        code = ["" if k in dead else line for k, line in enumerate(code)]


def _slots(groups: list[tuple[str, int]]) -> dict[str, int]:
    """The first index of each group of consecutive argument slots."""
    out, k = {}, 0
    for name, count in groups:
        out[name] = k
        k += count
    return out


def _dtype(text: str, sfx: str, ctype: str) -> str:
    return text.replace("SFX", sfx).replace("T_", ctype)


# The math of both dtypes. float: vmath.h's vexpf / vtanhf vectorise across a loop (libm's
# expf is a scalar call); double: libm. LAE is torch.logaddexp (equal infinities: themselves).
PRELUDE = r"""#include "vmath.h"
#include <omp.h>
static inline float LAE_f(float a, float b) { float m = a > b ? a : b;
  return isinf(a) && a == b ? a : m + log1pf(expf(-(a > b ? a - b : b - a))); }
static inline double LAE_d(double a, double b) { double m = a > b ? a : b;
  return isinf(a) && a == b ? a : m + log1p(exp(-(a > b ? a - b : b - a))); }
"""
_NAMES = ("EXP", "LOG", "LOG1P", "EXPM1", "TANH", "FABS", "SQRT", "SIN", "COS", "POW", "ERF", "ONE", "LAE")
_MATH32 = "".join(f"#define {m} {f}\n" for m, f in zip(_NAMES, (
    "vexpf", "logf", "log1pf", "expm1f", "vtanhf", "fabsf", "sqrtf", "sinf", "cosf", "powf", "erff", "1.0f",
    "LAE_f")))
_MATH64 = "".join(f"#define {m} {f}\n" for m, f in zip(_NAMES, (
    "exp", "log", "log1p", "expm1", "tanh", "fabs", "sqrt", "sin", "cos", "pow", "erf", "1.0", "LAE_d")))
# fused_loop's tables may also write SIGM(x) for a sigmoid
_MATH32 += "#define SIGM vsigmoidf\n"
_MATH64 += "#define SIGM(x) (ONE / (ONE + EXP(-(x))))\n"
_UNDEF = "".join(f"#undef {m}\n" for m in _NAMES + ("SIGM",))
SYMBOLS = ("loop_f32", "loop_f64", "back_f32", "back_f64")


def _compile(src: str) -> ctypes.CDLL:
    """The stage's library from the kernel cache, or built now with fused_loop's flags."""
    return build_library(src, "gloop", SYMBOLS)


class GeneralLoop(CompiledLoop):
    """The runner the generated forward calls for a loop stage: the interface of
    fused_loop.FusedLoop, plus optional readouts: values computed per step from the loop's
    values (an output `q @ M'`), returned as sequences keyed by their position, so that a
    state sequence nobody else reads need not be written (keep it out of `keep`)."""

    def __init__(self, ir: IRCell, states: list[str], core: list[Node], readouts: Sequence[Node] = ()):
        gen = _Gen(ir, list(states), list(core), readouts)
        self.ir = ir
        self.states = list(states)
        self.readouts = list(readouts)
        self.params = gen.params       # PARAM leaves the loop reads
        self.seqs = gen.seqs           # other leaves: whole-sequence values read per step
        self.seq_args, self.folds = self.seqs, {}   # as FusedLoop's: what the forward passes; no folded projection
        self.state_leaves = gen.state_leaves
        self.transposed = gen.transposed_params   # indices of the params the C also reads transposed
        self.shapes = gen.state_shapes
        self.source, self.layout = gen.source()
        self.keep = set(states)        # states whose whole sequence the forward reads (codegen narrows it)
        self._torch_step = None
        self._require_toolchain()

    def build(self) -> ctypes.CDLL:
        return _compile(self.source)

    # ------------------------------------------------------------------ running
    def run(self, seq_values: list, P0: dict, S0: dict, first_input, ns: int, dtype):
        """seq_values: whole-sequence tensors of self.seqs (prefix [B, T, (heads)], size-1
        axes broadcast). Returns ({state: sequence [B, T, (heads), *shape]} for the states in
        self.keep, and {i: sequence of readouts[i]}; {state: final
        [B, (heads), *shape]}). Differentiable in every tensor (a reverse-time C backward)."""
        return self._run(seq_values, P0, S0, first_input, ns, dtype, torch_loop=False)

    def run_torch(self, seq_values: list, P0: dict, S0: dict, first_input, ns: int, dtype):
        """`run` as a per-step torch loop over the same IR (autograd's derivatives): for what
        the C cannot run (tensors on a GPU)."""
        return self._run(seq_values, P0, S0, first_input, ns, dtype, torch_loop=True)

    def _run(self, seq_values, P0, S0, first_input, ns, dtype, torch_loop: bool):
        heads = ns == 3
        B, T = int(first_input.shape[0]), int(first_input.shape[1])
        NH = int(first_input.shape[2]) if heads else 1
        seqs = [self._prep_seq(x, n, ns, dtype) for x, n in zip(seq_values, self.seqs)]
        params = [P0[n.arg].to(dtype).contiguous() for n in self.params]
        s0 = [self._prep_state(S0[s], k, B, NH, heads, dtype) for k, s in enumerate(self.states)]
        tensors = seqs + params + s0
        meta = (B, T, NH, dtype)
        ns_ = len(self.states)
        if torch_loop:
            outs = self._torch_loop(tensors, meta)
            states, reads, finals = outs[:ns_], outs[ns_:], [o[:, T - 1] for o in outs[:ns_]]
        elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outs = _LoopFunction.apply(self, meta, *tensors)
            states, reads, finals = outs[:ns_], outs[ns_:], [o[:, T - 1] for o in outs[:ns_]]
        else:
            states, reads, finals = self._forward(seqs, params, s0, meta, self.keep)
        squeeze = (lambda x: x) if heads else (lambda x: x[:, :, 0])  # noqa: E731
        seq_out: dict = {s: squeeze(o) for s, o in zip(self.states, states) if s in self.keep}
        seq_out.update({i: squeeze(o) for i, o in enumerate(reads)})
        return seq_out, {s: (f if heads else f[:, 0]) for s, f in zip(self.states, finals)}

    def _prep_seq(self, x, node: Node, ns: int, dtype) -> torch.Tensor:
        """x as [B|1, T|1, NH|1, *shape] with the node axes contiguous (differentiable ops:
        autograd takes the gradient back to x's own shape)."""
        shape = self.ir.shape_of(node)
        x = torch.as_tensor(x).to(dtype)
        if x.dim() < ns + len(shape):   # a constant-only value has no prefix axes
            x = x.reshape((1,) * (ns + len(shape) - x.dim()) + tuple(x.shape))
        if ns == 2:
            x = x.unsqueeze(2)
        x = x.expand(tuple(x.shape[:3]) + shape)
        if not Val(shape, "x", 0, tuple(x.stride()[3:])).contiguous():
            x = x.contiguous()
        return x

    def _prep_state(self, s, k: int, B: int, NH: int, heads: bool, dtype) -> torch.Tensor:
        shape = self.shapes[k]
        s = s.to(dtype).expand((B,) + ((NH,) if heads else ()) + shape)
        return (s if heads else s.unsqueeze(1)).contiguous()

    @staticmethod
    def _seq_strides(x: torch.Tensor) -> list[int]:
        return [st if n > 1 else 0 for n, st in zip(x.shape[:3], x.stride()[:3])]

    @staticmethod
    def _head_stride(p: torch.Tensor, node: Node) -> int:
        """Elements between two heads' slices of a param; 0 for one shared by the heads."""
        return p[0].numel() if p.dim() == node.rank + 1 and p.shape[0] > 1 else 0

    def _params_t(self, params) -> list:
        """The transposed copies [(heads,) H, L] of the params read as W @ x (None elsewhere)."""
        return [p.detach().transpose(-1, -2).contiguous() if k in self.transposed else None
                for k, p in enumerate(params)]

    def _strides(self, seqs, params) -> list[int]:
        return [v for x in seqs for v in self._seq_strides(x)] + \
            [self._head_stride(p, n) for p, n in zip(params, self.params)]

    def _call(self, name, dtype, ptrs, strides, T, B, NH):
        """One C call; the rows (batch x heads) are split between the threads."""
        nthreads = max(1, min(torch.get_num_threads(), B * NH))
        ws = torch.empty((nthreads, self.layout["ws"]), dtype=dtype)
        P = (ctypes.c_void_p * len(ptrs))(*[None if p is None else p.data_ptr() for p in ptrs])
        S = (ctypes.c_int64 * max(1, len(strides)))(*strides)
        c = ctypes.c_int64
        self._fn(name, dtype)(P, S, ctypes.c_void_p(ws.data_ptr()), c(self.layout["ws"]), c(T), c(B), c(NH),
                              c(nthreads))

    def _forward(self, seqs, params, s0, meta, keep):
        """The forward C call. States outside `keep` write their rows to one scratch block
        (time stride 0). Returns (state sequences [B, T, NH, *shape], readout sequences,
        finals [B, NH, *shape])."""
        B, T, NH, dtype = meta
        outs = [torch.empty((B, T if s in keep else 1, NH) + shape, dtype=dtype)
                for s, shape in zip(self.states, self.shapes)]
        fins = [torch.empty((B, NH) + shape, dtype=dtype) for shape in self.shapes]
        reads = [torch.empty((B, T, NH) + self.ir.shape_of(n), dtype=dtype) for n in self.readouts]
        strides = self._strides(seqs, params)
        for o, s in zip(outs, self.states):
            strides += [o.stride(0), o.stride(1) if s in keep else 0, o.stride(2)]
        ptrs = seqs + params + self._params_t(params) + s0 + outs + fins + reads
        self._call("loop", dtype, ptrs, strides, T, B, NH)
        return outs, reads, fins

    def _backward(self, seqs, params, s0, outs, g_states, g_reads, meta):
        """The reverse-time C call: gradients of (seqs, params, initial states)."""
        B, T, NH, dtype = meta
        cont = lambda gs: [None if g is None else g.to(dtype).contiguous() for g in gs]  # noqa: E731
        gin = [torch.zeros((B, T, NH) + tuple(x.shape[3:]), dtype=dtype) for x in seqs]
        gpar = [torch.zeros((B * NH, n), dtype=dtype) for n in self.layout["par_sizes"]]
        gs0 = [torch.empty((B * NH,) + shape, dtype=dtype) for shape in self.shapes]
        ptrs = seqs + params + self._params_t(params) + s0 + list(outs) + cont(g_states) + cont(g_reads) \
            + gin + gpar + gs0
        self._call("back", dtype, ptrs, self._strides(seqs, params), T, B, NH)
        g_seqs = [g.sum_to_size(x.shape) for g, x in zip(gin, seqs)]
        g_params = []
        for g, p, n in zip(gpar, params, self.params):
            g = g.view(B, NH, -1).sum(0)   # the rows' accumulators
            g_params.append(g.view(p.shape) if self._head_stride(p, n) else g.sum(0).view(p.shape))
        return g_seqs, g_params, [g.view(x.shape) for g, x in zip(gs0, s0)]

    def _autograd_forward(self, seqs, params, s0, meta):
        """For _LoopFunction: (what the call returns, the state sequences its backward reads)."""
        outs, reads, _ = self._forward(seqs, params, s0, meta, set(self.states))
        return tuple(outs) + tuple(reads), outs

    def _torch_loop(self, tensors, meta):
        """The same stage as a differentiable per-step torch loop over the IR (TorchExpr, the
        reference's semantics): what create_graph=True differentiates. Returns the outputs
        of _LoopFunction: state sequences, then readout sequences, [B, T, NH, *shape]."""
        B, T, NH, dtype = meta
        nq, np_ = len(self.seqs), len(self.params)
        seqs, params, s0 = tensors[:nq], tensors[nq:nq + np_], tensors[nq + np_:]
        if self._torch_step is None:
            roots = [self.ir.updates[s] for s in self.states] + self.readouts
            self._torch_step = compile_nodes(roots, self.state_leaves + self.params + self.seqs)
        # prefix [B, NH] everywhere: per-head params [NH, *shape] gain one axis, shared ones two
        P = [p[None] if p.dim() == n.rank + 1 else p[None, None] for p, n in zip(params, self.params)]
        shapes = self.shapes + [self.ir.shape_of(n) for n in self.readouts]
        st, acc = list(s0), [[] for _ in shapes]
        for t in range(T):
            prev = [st[self.states.index(n.arg[0])] for n in self.state_leaves]
            xs = [x[:, t if x.shape[1] > 1 else 0] for x in seqs]
            new = self._torch_step(prev + as_bool(P, self.params) + as_bool(xs, self.seqs), 2, dtype, s0[0].device)
            new = [torch.as_tensor(v, dtype=dtype).expand((B, NH) + shape) for v, shape in zip(new, shapes)]
            st = new[:len(self.states)]
            for a, v in zip(acc, new):
                a.append(v)
        return tuple(torch.stack(a, 1) for a in acc)


class _LoopFunction(torch.autograd.Function):
    """The stage with its reverse-time C backward. Inputs: the prepared seqs, params and
    initial states; outputs: every state's sequence, then every readout's [B, T, NH, *shape]."""

    @staticmethod
    def forward(ctx, loop: GeneralLoop, meta, *tensors):
        nq, np_ = len(loop.seqs), len(loop.params)
        seqs, params, s0 = list(tensors[:nq]), list(tensors[nq:nq + np_]), list(tensors[nq + np_:])
        returned, states = loop._autograd_forward(seqs, params, s0, meta)
        ctx.loop, ctx.meta = loop, meta
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, *states)
        return returned

    @staticmethod
    def backward(ctx, *grads):
        loop, meta = ctx.loop, ctx.meta
        nq, np_, ns = len(loop.seqs), len(loop.params), len(loop.states)
        saved = ctx.saved_tensors
        tensors, outs = list(saved[:nq + np_ + ns]), saved[nq + np_ + ns:]
        needs = ctx.needs_input_grad[2:]
        if wants_graph(tensors, grads):
            # create_graph=True: re-run the stage differentiably so the gradient has a graph
            got = recompute_vjp(lambda *xs: loop._torch_loop(list(xs), meta), tensors, needs, grads)
            return (None, None) + tuple(got)
        if all(g is None for g in grads):
            return (None, None) + (None,) * len(tensors)
        g_seqs, g_params, g_s0 = loop._backward(tensors[:nq], tensors[nq:nq + np_], tensors[nq + np_:], outs,
                                                grads[:ns], grads[ns:], meta)
        return (None, None) + tuple(g if need else None for g, need in zip(g_seqs + g_params + g_s0, needs))
