"""Sequential kernels for nonlinear and dense stages: the time loop runs inside the kernel.

One program per (block of BLOCK_B batch rows, head). The states live in registers for the
whole sequence: a vector state as a [BLOCK_B, n] tile, a scalar as [BLOCK_B, 1], a matrix
state S[K, V] as [BLOCK_B, K, V] (a matrix state's kernel runs fewer rows per program on a
GPU: `gpu_rows`). The recurrent weights are loaded once, before the loop, and held in
registers (per head, as FlashRNN does) -- up to HOLD_LIMIT elements per head. Above it the
same kernel *streams* them (`streamed`; the plan's line for the stage says which mode runs,
`mode()`): no weight is held across the loop; every step loads each weight tile again from
global memory (on a GPU the weights of all programs stay in L2: one copy per head), in
K-tiles of at most STREAM_CHUNK elements, and accumulates x @ W over them. The GEMM input x
is split into the same K-tiles in registers (Triton cannot slice a register tile: halves by
reshape + permute + tl.split, `_split_lines`); all the products of one x run K-tile by
K-tile together (`_gemm_group`: one K-tile of x live at a time); each K-tile's address is
a scalar corner plus offsets shared by all K-tiles of its shape, in the forward with a
per-step zero the compiler cannot prove (else it hoists every tile's pointers out of the
loop and holds them; the backward spills less with them hoisted: `_zero`); the time loop
is not software-pipelined (the pipeliner would prefetch the next steps' tiles into shared
memory). Why streaming, not FlashRNN's split of the hidden units
across programs: that split needs a grid-wide barrier every step, which Triton does not
have (a spin barrier on a global counter would deadlock in Triton's interpreter, which runs
the programs one after another, and on a GPU whenever the programs do not all fit at once);
one program per (row block, head) reading its weights from L2 needs none. The hoisted
projections are read per step.

A matrix state above MATRIX_LIMIT (padded elements per batch row) is split across programs
when its step acts on it column by column (`split_plan`): every value holding the state's
column index keeps it on one axis, and nothing contracts, reduces or moves that axis --
then column j of S' reads column j of S and column-free values only (the block-diagonal
Jacobian by columns of recdsl/analysis/locality.py, checked on the values: a comparison or
a where's condition reading all columns, as the stdlib Yaad's norm(e), mixes them too).
The grid's first axis then holds (row block, column block): each program keeps its block
of columns of S, and of every value along them (`dims`), loads and stores them at their
global columns (split0 + lanes), and recomputes the column-free values (k, gates: cheap).
No program reads another's columns, so no barrier is needed, forward or backward. The
backward's adjoints split the same way; a column-free value's adjoint is a sum over the
column blocks: each program writes its part (a column-free leaf: one copy per block,
`leaf_copies`; a param: the per-program partials), summed by the launcher. The same by rows
when the step acts row by row. A step that mixes its columns and rows keeps the torch
loop, with the node that mixes them in the reason.

Each step is the stage's recurrent core, generated from the IR.

Every value of the step is a tile with the batch rows first: [BLOCK_B, 1] for a scalar
(broadcast against vectors by Triton's rules), [BLOCK_B, lanes] for a vector, [BLOCK_B, R,
C] for a matrix; a lower-rank operand of an elementwise op is lifted as numpy broadcasts it
(a vector v against a matrix reads v[:, None, :]).

Triton cannot slice a register tile, so every vector is computed at the *window* (offset,
length) of its last axis that its users read: `z[0:H]` of `z = W @ h + u` becomes
`W[0:H] @ h + u[0:H]` -- the LSTM's four gate GEMMs are four [H, H] weight tiles, never a
4H vector. A value is a vnode = (node, window). Lane j of a vnode holds element off + j;
an offset may be negative, and lanes outside the value are don't-care (masked wherever
they could reach a valid lane). This makes concat free: the concat's parts are computed
at the concat's lanes (`concat(a, b)` at lanes [0, A + B) reads b at offset -A) and picked
lane by lane with tl.where; a matmul by a concat is the sum of the products of the parts
(`W @ concat(x, h)` = `W[:, :D] @ x + W[:, D:] @ h`). Only a value that is computed whole
(a state, a product with a matrix state) and read at other lanes is moved, by a
select-and-sum over a [lanes, lanes] compare (exact: every output sums one term).

Backward (derived): a reverse-time loop. The states are saved by the forward (it writes
the sequences anyway); each step's intermediates are recomputed from h_{t-1}, then the
step's reverse mode (texpr.vjp for elementwise ops, the transposed weight tile for
GEMMs, the rules below for the rest) gives the adjoint of h_{t-1} (the carry), of each
leaf at t (written per element) and of the params (accumulated in registers over the loop,
written once per program and summed in torch: deterministic, no atomics). With streamed
weights the weight gradients are not accumulated in registers either: each step, per
K-tile, the program adds x_tile^T @ g to its own slice of the [programs, NH, *shape]
partials in global memory (read, add, store; L2-resident on a GPU) and reloads the weight
K-tile for the input's adjoint g @ W_tile^T (the K-tiles joined back by tl.join); a
debug_barrier ends the step so the next step's read sees every thread's store. Registers
stay bounded by one K-tile. (The alternative -- writing the GEMM outputs' adjoints [T, B,
L] per GEMM and forming dW as one matmul after the kernel -- moves less data on a large
GPU but needs scratch buffers the launcher does not allocate yet.)

Registers on a GPU (ahead-of-time compiles, no GPU): a kernel streaming its weights runs 4
batch rows per program (STREAM_ROWS) in 8 warps, its products as multiply-and-sum (tl.dot
needs 16 rows, and its fp32 FMA operands are held whole along K per thread: 0.3-4 KB of
spills), K-tiles of 2048 elements; the forward pins the tiles' addresses per step (`_zero`),
the backward lets them be hoisted. The LSTM at D = H = 64 then spills nothing on sm_80 and
sm_90, forward (151 / 128 registers) or backward (255); the GRU at H = 48 and the deep
transition neither; the Elman RNN at H = 80 (956 bytes) and the sLSTM (288) still spill
in the backward on sm_90. More programs (4 rows each) read the weights from L2 each step:
no GPU here to measure what that costs against 16 rows."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from recdsl.ir import ELEMENTWISE, Node, Op, toposort
from recdsl.torch_expr import SourceNotes

from . import texpr
from .fusion import annotate, is_view, kernel_name, sum_text, vjp_reading
from .fusion import pow2 as _pow2

HOLD_LIMIT = 2048         # weight elements (padded) per head held in registers across the loop: above it
                          # the backward spills on sm_80/sm_90 (LSTM H = 32: 4096 spill-free forward only),
                          # so the weights are streamed from global memory every step instead
STREAM_WARPS = 8          # warps of a kernel streaming its weights (LSTM H = 64, 4 rows: 4 warps spill ~2 KB
                          # backward on sm_90, 16 warps would need 241 x 512 registers, over an SM's 64 K)
STREAM_ROWS = 4           # batch rows per program of a kernel streaming its weights, on a GPU: its products are
                          # multiply-and-sum, not tl.dot (whose fp32 FMA operands, 16 rows at least, are held
                          # whole along K per thread: LSTM H = 64 spilled 0.3-0.8 KB forward, 3.4-4 KB backward)
STREAM_CHUNK = 2048       # weight elements (padded) of one streamed K-tile (LSTM H = 64, 4 rows: 1024 spills
                          # 176 bytes backward on sm_90, 2048 none; 4096 spills again)
DOT_MIN = 16              # tl.dot needs every side >= 16 on a GPU; below, multiply and sum
GPU_ROWS = 16             # batch rows per program on a GPU: tl.dot's smallest tile
MATRIX_LIMIT = 4096       # padded elements of a matrix value per batch row (64 x 64): above, a state is split
                          # by columns (rows) across programs when its step allows (split_plan), else no kernel
ROW_BUDGET = 1024         # padded matrix elements per program on a GPU: a matrix state's kernel runs fewer rows
WIDE_TILE = 2048          # from this many matrix elements per program, 8 warps: at 64 x 64 with 4 warps the
                          # backward spills (Yaad, TTT-Linear: none with 8; 16 would need 512 x 200+ registers)
REDUCTIONS = {Op.SUM, Op.AMAX, Op.LOGSUMEXP}
NEG_INF = 'float("-inf")'


class NotEligible(Exception):
    pass


# ---------------------------------------------------------------------- matrix states split across programs
class _Axes:
    """Union-find over (node id, axis): the axes of the step's values that hold the same
    index (an elementwise op's aligned axes, a product's kept axes, a transpose's swapped
    ones), and the axes that mix their index (contracted, reduced, picked, moved): `bad`."""

    def __init__(self):
        self.parent: dict = {}
        self.bad: dict = {}          # (node id, axis) -> the node that mixes it

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def unite(self, a, b):
        self.parent[self.find(a)] = self.find(b)

    def mix(self, a, why: Node):
        self.bad.setdefault(a, why)


def _align(ir, n: Node, axes: _Axes):
    """Record how n's axes relate to its sources' (sizes as the IR gives them)."""
    shape = ir.shape_of(n)
    srcs = n.srcs
    if not srcs:   # a leaf: a state, a constant
        return
    if n.op in ELEMENTWISE or n.op == Op.EXPAND:   # aligned from the right, as numpy broadcasts
        for s in srcs:
            ss = ir.shape_of(s)
            for i, d in enumerate(ss):
                j = len(shape) - len(ss) + i
                if d == shape[j]:
                    axes.unite((s.id, i), (n.id, j))
        return
    if n.op == Op.MATMUL:   # a's last axis meets b's first: contracted
        a, b = srcs
        axes.unite((a.id, a.rank - 1), (b.id, 0))
        axes.mix((a.id, a.rank - 1), n)
        if a.rank == 2:
            axes.unite((a.id, 0), (n.id, 0))
        if b.rank == 2:
            axes.unite((b.id, 1), (n.id, n.rank - 1))
        return
    if n.op == Op.OUTER and all(s.rank == 1 for s in srcs):
        axes.unite((srcs[0].id, 0), (n.id, 0))
        axes.unite((srcs[1].id, 0), (n.id, 1))
        return
    if n.op == Op.TRANSPOSE and n.rank == 2:
        axes.unite((srcs[0].id, 0), (n.id, 1))
        axes.unite((srcs[0].id, 1), (n.id, 0))
        return
    if n.op in REDUCTIONS:
        s = srcs[0]
        axis, keep = n.arg
        reduced = range(s.rank) if axis is None else [axis % s.rank]
        out = 0
        for i in range(s.rank):
            if i in reduced:
                axes.mix((s.id, i), n)
                out += 1 if keep else 0
            else:
                axes.unite((s.id, i), (n.id, out))
                out += 1
        return
    if n.op == Op.INDEX:
        _align_index(ir, n, axes)
        return
    for i in range(n.rank):   # concat, reshape, dot, ...: every axis moved or contracted
        axes.mix((n.id, i), n)
    for s in srcs:
        for i in range(s.rank):
            axes.mix((s.id, i), n)


def _align_index(ir, n: Node, axes: _Axes):
    """x[...]: a whole slice keeps its axis, None adds one; an int or a partial slice picks
    or moves the elements of its axis (mixed)."""
    s = n.srcs[0]
    items = list(n.arg) + [slice(None)] * (s.rank - sum(1 for a in n.arg if a is not None))
    out = src = 0
    for item in items:
        if item is None:
            out += 1
            continue
        whole = isinstance(item, slice) and item.step in (None, 1) and (item.start or 0) == 0 \
            and ir.shape_of(n)[out] == ir.shape_of(s)[src]
        if whole:
            axes.unite((s.id, src), (n.id, out))
        else:
            axes.mix((s.id, src), n)
            if not isinstance(item, int):
                axes.mix((n.id, out), n)
        out += 0 if isinstance(item, int) else 1
        src += 1


@dataclass(frozen=True)
class Split:
    """The step runs on a block of the states' columns (axis 1) or rows (axis 0) per
    program: `blocks` programs per (row block, head), each `size` lanes of the `length`
    the split axis has; `axes`: node id -> its axis holding the split index (the values
    without one are column-free: every program computes them whole)."""
    axis: int
    length: int
    size: int
    blocks: int
    axes: dict

    @property
    def along(self) -> str:
        return "column" if self.axis == 1 else "row"


def _why(n: Node) -> str:
    where = f" (line {n.span.line})" if getattr(n, "span", None) else ""
    return f"{n.op.name.lower()}{where}"


def split_plan(ir, states: list[str], core_ids: set) -> Split | None:
    """How a step whose matrix state does not fit one program (MATRIX_LIMIT) splits across
    programs: by columns when every value that holds a state's column index keeps it on
    one axis and nothing contracts, reduces or moves that axis (then each column of S'
    reads only that column of S and column-free values: the block-diagonal Jacobian by
    columns of recdsl/analysis/locality.py, here on the values themselves -- a comparison
    or a where's condition counts, since the kernel computes them); else by rows; None when
    nothing needs splitting. Raises NotEligible when it would be needed and is not possible."""
    mats = [ir.states[s] for s in states if ir.states[s].rank == 2]
    biggest = max((_pow2(ir.shape_of(m)[0]) * _pow2(ir.shape_of(m)[1]) for m in mats), default=0)
    if biggest <= MATRIX_LIMIT:
        return None
    axes = _Axes()
    nodes = toposort([ir.updates[s] for s in states])
    for n in nodes:
        if n.id in core_ids:
            _align(ir, n, axes)
    for s in states:   # S' replaces S: the same index on the same axes
        for i in range(ir.states[s].rank):
            axes.unite((ir.states[s].id, i), (ir.updates[s].id, i))
    reasons = []
    for axis in (1, 0):
        plan = _split_along(ir, states, nodes, axes, mats[0], axis)
        if isinstance(plan, Split):
            return plan
        reasons.append(plan)
    raise NotEligible(f"a matrix state of {biggest} elements (padded) per batch row does not fit one program's "
                      f"registers (<= {MATRIX_LIMIT}), and its step is not separable by columns ({reasons[0]}) "
                      f"nor by rows ({reasons[1]})")


def _split_along(ir, states, nodes, axes: _Axes, first: Node, axis: int):
    """The Split by `axis` of the first matrix state, or why not (a string)."""
    root = axes.find((first.id, axis))
    held: dict = {}
    for n in nodes:
        mine = [i for i in range(n.rank) if (n.id, i) in axes.parent and axes.find((n.id, i)) == root]
        if len(mine) > 1:
            return f"{_why(n)} holds the index on two axes"
        if mine and n.op == Op.EYE:
            return "an identity matrix along the split axis"
        if mine:
            held[n.id] = mine[0]
    for (nid, i), why in axes.bad.items():
        if axes.find((nid, i)) == root:
            return f"{_why(why)} mixes them"
    for s in states:
        if ir.states[s].id not in held:
            return f"the state {s} does not hold the index"
    length = ir.shape_of(first)[axis]
    others = max(_pow2(d) for n in nodes if n.id in held
                 for d in [1] + [x for i, x in enumerate(ir.shape_of(n)) if i != held[n.id]])
    size = 1
    while length % (2 * size) == 0 and others * 2 * size <= MATRIX_LIMIT:
        size *= 2
    if size < 2:
        return f"{length} does not split into blocks of a power of two that fit"
    return Split(axis, length, size, length // size, held)


def _noted(line: str, note: str) -> str:
    """The line with its .rec note, unless it has its comment (which starts with the note)."""
    return line if "  # " in line else annotate(line, note)


def _plus(offset: int, lanes: str) -> str:
    """offset + lanes as index text (the lanes alone at offset 0)."""
    return f"{offset} + {lanes}" if offset else lanes


@dataclass(frozen=True)
class Win:
    """Lanes [0, len) of a tile hold elements [off, off + len) of the value's last axis."""
    off: int
    len: int            # 0: a scalar (one lane, broadcast against vectors)

    @property
    def width(self) -> int:
        return 1 if self.len <= 1 else _pow2(self.len)

    def covers(self, size: int) -> tuple[int, int]:
        """The elements [lo, hi) of a value of `size` elements this window holds."""
        return max(self.off, 0), min(self.off + max(self.len, 1), size)


@dataclass
class Step:
    """How the step computes one vnode: `kind` names the rule (forward line and its VJP),
    `reads` the vnodes (node, window) the line reads, `data` what the rule needs beyond."""
    kind: str
    reads: list
    data: object = None


@dataclass(frozen=True)
class WeightTile:
    """A [K, L] tile of a param matrix, held in registers: tile[k, j] = A[k0 + k, off + j]
    of the product x @ A (A is the weight, or its transpose for W @ x), A[a, b] being
    P[r + a, c + b] (P[r + b, c + a] when `swap`) of the param P as stored."""
    param: Node
    swap: bool
    r: int
    c: int
    k0: int
    K: int              # contraction length (the x part's elements)
    win: Win            # the output lanes
    N: int              # output elements (lanes past them are masked)
    note: str = field(default="", compare=False)   # the .rec line of the first product that reads it

    def coords(self) -> tuple[str, str]:
        """(row, column) of P for tile element [k, j], as index texts over the tile."""
        along_k = _plus((self.c if self.swap else self.r) + self.k0, f"cols{_pow2(self.K)}[:, None]")
        along_j = _plus((self.r if self.swap else self.c) + self.win.off, f"cols{self.win.width}[None, :]")
        return (along_j, along_k) if self.swap else (along_k, along_j)

    def mask(self) -> str:
        lo = max(0, -self.win.off)
        hi = min(self.win.len, self.N - self.win.off)
        j = f"cols{self.win.width}[None, :]"
        cond = f"(cols{_pow2(self.K)}[:, None] < {self.K}) & ({j} < {hi})"
        return cond + (f" & ({j} >= {lo})" if lo else "")

    def corner(self, lo: int) -> tuple[int, int]:
        """(row, column) of P of the K-tile's element [0, 0] (K-tile from row lo)."""
        along_k = (self.c if self.swap else self.r) + self.k0 + lo
        along_j = (self.r if self.swap else self.c) + self.win.off
        return (along_j, along_k) if self.swap else (along_k, along_j)

    def grid(self, rows: int) -> tuple[str, str]:
        """(row, column) of P for K-tile element [k, j] relative to its corner."""
        along_k, along_j = f"cols{rows}[:, None]", f"cols{self.win.width}[None, :]"
        return (along_j, along_k) if self.swap else (along_k, along_j)

    def chunk_mask(self, lo: int, rows: int) -> str | None:
        """The K-tile's valid elements; None when all are (no mask to hold)."""
        lo_j = max(0, -self.win.off)
        hi_j = min(self.win.len, self.N - self.win.off)
        j = f"cols{self.win.width}[None, :]"
        conds = [f"({_plus(lo, f'cols{rows}[:, None]')} < {self.K})"] if lo + rows > self.K else []
        conds += [f"({j} < {hi_j})"] if hi_j < self.win.width else []
        conds += [f"({j} >= {lo_j})"] if lo_j else []
        return " & ".join(conds) or None

    def what(self, lo: int = 0, rows: int | None = None) -> str:
        """The part of the weight as the .rec writes it, e.g. (W_hh^T)[0:32, 48:64]."""
        a, b = self.k0 + lo, self.k0 + min(lo + (rows or _pow2(self.K)), self.K)
        return f"({self.param.arg}{'^T' if self.swap else ''})[{a}:{b}, {self.win.off}:{self.win.off + self.win.len}]"

    def extent(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The rectangle of P (rows, columns) the tile's valid elements cover."""
        lo, hi = self.win.covers(self.N)
        along_k, along_j = (self.k0, self.k0 + self.K), (lo, hi)
        if self.swap:
            return (self.r + along_j[0], self.r + along_j[1]), (self.c + along_k[0], self.c + along_k[1])
        return (self.r + along_k[0], self.r + along_k[1]), (self.c + along_j[0], self.c + along_j[1])


@dataclass
class _Adjoint:
    """What the reverse mode of one step collects: per vnode, its adjoint's terms."""
    parts: dict = field(default_factory=dict)

    def add(self, key, term: str):
        self.parts.setdefault(key, []).append(term)


class SeqKernel:
    def __init__(self, ir, sp, core: list[Node], notes: SourceNotes):
        self.ir, self.notes = ir, notes
        self.states = list(sp.states)
        self.name = kernel_name(ir.name, sp.index, self.states)
        self.core_ids = {n.id for n in core}
        self._num: dict[int, int] = {}
        self.order: list[tuple[Node, Win]] = []     # vnodes, sources first
        self.seen: set = set()
        self.how: dict = {}                         # key of a computed vnode -> its Step
        self.leaves: list[Node] = []                # per-step sequence values
        self.leaf_wins: dict[int, list[Win]] = {}
        self.params: list[Node] = []                # params read elementwise
        self.param_wins: dict[int, list[Win]] = {}
        self.tiles: list[WeightTile] = []           # the weight tiles of the step's GEMMs
        self._tile_index: dict = {}
        # a matrix state too big for one program: a block of its columns (or rows) per program
        self.split = split_plan(ir, self.states, self.core_ids)
        for s in self.states:
            st = ir.states[s]
            if st.rank > 2:
                raise NotEligible(f"state {s} has rank {st.rank}")
            self._visit(ir.updates[s], self._full(ir.updates[s]))
        self._check_reads()
        self.gpu_rows, self.gpu_warps = self._gpu_rows()
        # the weights: held in registers across the loop, or streamed from memory every step
        self.weight_elements = sum(_pow2(t.K) * t.win.width for t in self.tiles)
        self.streamed = self.weight_elements > HOLD_LIMIT
        self.ktile = self._k_tiles() if self.streamed else {}
        if self.streamed:   # few rows, 8 warps: the per-step K-tile products fit the registers (module doc)
            self.gpu_rows = min(self.gpu_rows, STREAM_ROWS)
            self.gpu_warps = max(self.gpu_warps, STREAM_WARPS)
        self._chunked: dict = {}                    # key of a GEMM input split into K-tiles -> (node, window)
        self._pin = ""                              # " + zero": the streamed addresses computed per step (_zero)
        self._split_note: dict = {}                 # their .rec line (the first product that reads them)

    def mode(self) -> str:
        """What the kernel does, in the mode it runs (the plan's line for the stage)."""
        if not self.tiles:
            held = "states in registers (no recurrent weight)"
        elif self.streamed:
            held = (f"states in registers; recurrent weights ({self.weight_elements} elements per head, over the "
                    f"{HOLD_LIMIT} held in registers) streamed from global memory per step in K-tiles of "
                    f"<= {STREAM_CHUNK} elements (L2-resident on a GPU)")
        else:
            held = f"states and recurrent weights ({self.weight_elements} elements per head) in registers"
        if self.split:
            sp = self.split
            held += (f"; the matrix state split by {sp.along}s across programs ({sp.blocks} blocks of {sp.size} "
                     f"{sp.along}s of {sp.length}: the step acts {sp.along} by {sp.along}), {sp.along}-free values "
                     "recomputed per program")
        back = ("; backward a reverse-time loop of the step's VJP"
                + (", weight gradients added per step to the program's slice in global memory" if self.streamed
                   else ""))
        return "generated sequential kernel: time loop on chip, " + held + back

    def _k_tiles(self) -> dict:
        """Rows per K-tile for each streamed GEMM input (key of x -> rows): a power of two,
        at least 16 (tl.dot's smallest side) where x has that many, tiles of at most
        STREAM_CHUNK elements otherwise; one split of x serves every product reading it."""
        widest: dict = {}
        for key, step in self.how.items():
            if step.kind == "gemm":
                for ti, (x, xw) in step.data:
                    k = self.key(x, xw)
                    widest[k] = max(widest.get(k, 1), self.tiles[ti].win.width)
        out = {}
        for k, width in widest.items():
            KP = k[1].width   # (node id, window): x's lanes
            rows = max(1, STREAM_CHUNK // width)
            rows = 1 << (rows.bit_length() - 1)   # a power of two
            out[k] = min(KP, max(rows, min(DOT_MIN, KP)))
        return out

    # ------------------------------------------------------------------ shapes and windows
    def dims(self, n: Node) -> tuple[int, ...]:
        """The value's shape in the program: a split axis holds the program's block."""
        shape = self.ir.shape_of(n)
        if self.split and n.id in self.split.axes:
            axis = self.split.axes[n.id]
            return shape[:axis] + (self.split.size,) + shape[axis + 1:]
        return shape

    def _index(self, n: Node, axis: int, lanes: str) -> str:
        """Element indices along the value's axis from tile lanes: offset by the program's
        first column (row) when the axis is split."""
        if self.split and self.split.axes.get(n.id) == axis:
            return f"(split0 + {lanes})"
        return lanes

    @property
    def programs_per_rows(self) -> int:
        """Programs per block of batch rows and head (the launcher's grid): one per block
        of a split state's columns (rows)."""
        return self.split.blocks if self.split else 1

    def leaf_copies(self, i: int) -> int:
        """How many partial gradients of leaf i the backward writes per element (the
        launcher sums them): one per program of a split state when the leaf is column-free
        (each program gives the part through its columns), else one."""
        return self.split.blocks if self.split and self.leaves[i].id not in self.split.axes else 1

    def _full(self, n: Node) -> Win:
        if n.rank == 0:
            return Win(0, 0)
        if n.rank <= 2:
            return Win(0, self.dims(n)[-1])
        raise NotEligible(f"a value of rank {n.rank} in the step")

    def _norm(self, n: Node, w: Win) -> Win:
        """The window a value is kept at: a scalar or one-element vector is one lane
        (broadcast to any lanes), a matrix whole."""
        if n.rank == 0:
            return Win(0, 0)
        if n.rank == 2:
            return self._full(n)
        return Win(0, 1) if self.dims(n)[0] == 1 else w

    def _at(self, n: Node, w: Win) -> tuple[Node, Win]:
        return n, self._norm(n, w)

    def key(self, n: Node, w: Win):
        return (n.id, w)

    def _ew_win(self, n: Node, w: Win, s: Node) -> Win:
        """The window of source s that the elementwise (or broadcasting) n at w reads."""
        if s.rank == 1 and n.rank == 1 and self.dims(s) == self.dims(n):
            return w
        return self._norm(s, self._full(s))

    def tile(self, n: Node, w: Win) -> list[int]:
        """The vnode's tile shape after the batch rows."""
        if n.rank == 2:
            R, C = self.dims(n)
            return [_pow2(R), _pow2(C)]
        return [w.width]

    def _tile_text(self, n: Node, w: Win) -> str:
        return ", ".join(["BLOCK_B"] + [str(d) for d in self.tile(n, w)])

    def _rows_of(self, n: Node) -> str:
        return "[:, None, None]" if n.rank == 2 else "[:, None]"

    def _lanes(self, n: Node, w: Win) -> str:
        """The mask of the vnode's valid lanes (no batch axis), rank >= 1."""
        if n.rank == 2:
            R, C = self.dims(n)
            return f"((cols{_pow2(R)} < {R})[:, None] & (cols{_pow2(C)} < {C})[None, :])"
        lo, hi = w.covers(self.dims(n)[0])
        lo, hi = lo - w.off, hi - w.off
        W = w.width
        return f"((cols{W} >= {lo}) & (cols{W} < {hi}))" if lo > 0 else f"(cols{W} < {hi})"

    def valid(self, n: Node, w: Win) -> str | None:
        """The valid lanes as a mask over the tile (batch axis broadcast); None for a scalar."""
        if n.rank == 0:
            return None
        return self._lanes(n, w) + ("[None, :, :]" if n.rank == 2 else "[None, :]")

    def running(self, n: Node, w: Win) -> str:
        """Rows still running and valid lanes: where an adjoint may be nonzero."""
        lanes = self.valid(n, w)
        return f"act{self._rows_of(n)}" + (f" & {lanes}" if lanes else "")

    def _axis_mask(self, n: Node, axis: int) -> str:
        """Valid rows (axis 1) or columns (axis 2) of a matrix tile."""
        return self._along(self.dims(n)[axis - 1], axis)

    @staticmethod
    def _along(size: int, axis: int) -> str:
        """The lanes [0, size) of a matrix tile's rows (axis 1) or columns (axis 2)."""
        return f"(cols{_pow2(size)} < {size})" + ("[None, :, None]" if axis == 1 else "[None, None, :]")

    def _elements(self, n: Node, w: Win) -> str:
        """Element indices (row-major within the value) of the tile's lanes."""
        if n.rank == 0:
            return "cols1[None, :]"
        if n.rank == 1:
            lanes = self._index(n, 0, f"cols{w.width}")
            return f"({w.off} + {lanes})[None, :]" if w.off else f"{lanes}[None, :]"
        R, C = self.dims(n)
        rows, cols = self._index(n, 0, f"cols{_pow2(R)}"), self._index(n, 1, f"cols{_pow2(C)}")
        return f"({rows}[:, None] * {self.ir.shape_of(n)[1]} + {cols}[None, :])[None, :, :]"

    @staticmethod
    def _lift(text: str, rank: int, to: int) -> str:
        """A tile of a value of `rank` as an operand of an op of rank `to` (numpy broadcasting)."""
        if to == 2 and rank == 0:
            return f"{text}[:, :, None]"
        if to == 2 and rank == 1:
            return f"{text}[:, None, :]"
        return text

    # ------------------------------------------------------------------ analysis
    def _visit(self, n: Node, w: Win):
        """Record the vnode (n, w) and what it reads, sources first, in self.order (depth
        first, sources in order), with an explicit stack: an unrolled loop makes chains
        thousands of nodes deep."""
        stack: list = [(n, self._norm(n, w), False)]
        while stack:
            x, xw, done = stack.pop()
            if done:
                self.order.append((x, xw))
                continue
            if texpr.literal(x) is not None or self.key(x, xw) in self.seen:
                continue
            self.seen.add(self.key(x, xw))
            step = self._enter(x, xw)
            if step is None:
                continue
            self.how[self.key(x, xw)] = step
            stack.append((x, xw, True))
            stack.extend((s, sw, False) for s, sw in reversed(step.reads))

    def _enter(self, n: Node, w: Win) -> Step | None:
        """First visit of (n, w): how it is computed, or None when it is not (a state at its
        own lanes, a leaf: recorded here)."""
        if n.op == Op.STATE and n.arg[0] in self.states:
            full = self._full(n)
            return None if w == full else Step("move", [(n, full)])
        if n.id not in self.core_ids:
            return self._leaf(n, w)
        whole = self._computed_whole(n)
        if whole is not None and w != whole:
            return Step("move", [(n, whole)])
        return self._plan(n, w)

    def _leaf(self, n: Node, w: Win) -> Step | None:
        """A value the step reads: a param, a per-step sequence value, or a constant."""
        if n.op == Op.EYE:
            return Step("eye", [])
        if n.op == Op.CONST:   # a vector constant: an arange (or one value) computed from the lanes
            vals = n.arg if isinstance(n.arg, tuple) else (float(n.arg),)
            steps = {round(b - a, 12) for a, b in zip(vals, vals[1:])}
            if n.rank != 1 or len(steps) > 1:
                raise NotEligible("a constant vector that is not an arange")
            return Step("arange", [], (vals[0], steps.pop() if steps else 0.0))
        if n.rank > 2:
            raise NotEligible(f"a value of rank {n.rank} read in the step")
        bucket, wins = (self.params, self.param_wins) if n.op == Op.PARAM else (self.leaves, self.leaf_wins)
        if n.id not in wins:
            bucket.append(n)
        wins.setdefault(n.id, []).append(w)
        self.order.append((n, w))
        return None

    def _computed_whole(self, n: Node) -> Win | None:
        """The window of a vector the step can only compute whole (a product with a matrix
        value, a reduction of one); None if any lanes can be computed."""
        if n.rank != 1 or self.dims(n)[0] == 1:
            return None
        if n.op == Op.MATMUL and self._weight_product(n) is None:
            return self._full(n)
        if n.op in REDUCTIONS and n.srcs[0].rank == 2:
            return self._full(n)
        return None

    def _plan(self, n: Node, w: Win) -> Step:
        op = n.op
        if texpr.fusable(n):
            wins = {s.id: self._ew_win(n, w, s) for s in n.srcs}
            return Step("elementwise", [(s, wins[s.id]) for s in n.srcs if texpr.literal(s) is None], wins)
        if op == Op.INDEX:
            return self._plan_index(n, w)
        if op == Op.EXPAND:
            s = n.srcs[0]
            sw = self._ew_win(n, w, s)
            return Step("expand", [] if texpr.literal(s) is not None else [(s, sw)], sw)
        if op == Op.CONCAT:
            return self._plan_concat(n, w)
        if op == Op.MATMUL:
            return self._plan_matmul(n, w)
        if op == Op.OUTER and all(s.rank == 1 for s in n.srcs):
            return Step("outer", [self._at(s, self._full(s)) for s in n.srcs])
        if op == Op.DOT:
            return Step("dot", [self._at(s, self._full(s)) for s in n.srcs])
        if op in REDUCTIONS:
            return self._plan_reduce(n)
        if op == Op.TRANSPOSE and n.rank == 2:
            return Step("transpose", [self._at(n.srcs[0], self._full(n.srcs[0]))])
        raise NotEligible(f"{op.name.lower()} in the step")

    def _plan_index(self, n: Node, w: Win) -> Step:
        s = n.srcs[0]
        if is_view(n) and n.rank <= 2:   # new axes and whole ones: a broadcast view
            if s.rank == n.rank:
                return Step("alias", [self._at(s, w if n.rank == 1 else self._full(s))])
            return Step("view", [self._at(s, self._full(s))])
        if s.rank == 1 and len(n.arg) == 1:
            i = n.arg[0]
            if isinstance(i, int):
                return Step("alias", [(s, self._norm(s, Win(i, 1)))])
            if isinstance(i, slice) and i.step in (None, 1) and (i.start or 0) >= 0:
                return Step("alias", [(s, self._norm(s, Win(w.off + (i.start or 0), w.len)))])
            raise NotEligible("a strided slice in the step")
        raise NotEligible("an index into a matrix in the step")

    def _plan_concat(self, n: Node, w: Win) -> Step:
        """The concat at lanes w reads each part that overlaps them at the same lanes."""
        if n.rank != 1:
            raise NotEligible("a concat of matrices in the step")
        parts, off = [], 0
        lo, hi = w.covers(self.dims(n)[0])
        for s in n.srcs:
            size = self.dims(s)[0]
            if off < hi and lo < off + size:
                parts.append((s, self._norm(s, Win(w.off - off, w.len)), off, size))
            off += size
        return Step("concat", [(s, sw) for s, sw, _, _ in parts if texpr.literal(s) is None], parts)

    def _plan_reduce(self, n: Node) -> Step:
        s = n.srcs[0]
        axis, keep = n.arg
        if s.rank not in (1, 2):
            raise NotEligible(f"a reduction of a rank-{s.rank} value in the step")
        axes = [1] if s.rank == 1 else ([2, 1] if axis is None else [axis + 1])
        return Step("reduce", [self._at(s, self._full(s))], (axes, bool(keep)))

    # ------------------------------------------------------------------ matmuls
    def _plan_matmul(self, n: Node, w: Win) -> Step:
        found = self._weight_product(n)
        if found is not None and self.split and n.id in self.split.axes:
            raise NotEligible(f"a product with the weight {found[0].arg} along the split {self.split.along}s")
        if found is not None:
            param, swap, r, c, x = found
            terms = []
            for part, k0 in self._concat_parts(x):
                tile = self._weight_tile(WeightTile(param, swap, r, c, k0, self.dims(part)[0] if part.rank else 1,
                                                    w, self.dims(n)[0], self.notes(n, with_text=False)))
                terms.append((tile, self._at(part, self._full(part))))
            return Step("gemm", [x for _, x in terms], terms)
        a, b = n.srcs
        if n.rank == 1 and a.rank == 1 and b.rank == 2:
            return Step("vecmat", [self._at(a, self._full(a)), self._at(b, self._full(b))])
        if n.rank == 1 and a.rank == 2 and b.rank == 1:
            return Step("matvec", [self._at(a, self._full(a)), self._at(b, self._full(b))])
        raise NotEligible("a matmul of two matrices in the step")

    def _weight_product(self, n: Node):
        """(param, swap, r, c, x) when n is W @ x or x @ W with W a param (or a slice or a
        transpose of one: `W_bb[:, D:]` once concat_split has split W_bb @ concat(x, h)): the
        weight is then read from the param itself as A = W^T (W @ x) or W (x @ W); None if
        the matrix is a value of the step."""
        if n.op != Op.MATMUL or n.rank != 1:
            return None
        a, b = n.srcs
        if a.rank == 2 and b.rank == 1:
            m, x, transposed = a, b, True
        elif a.rank == 1 and b.rank == 2:
            m, x, transposed = b, a, False
        else:
            return None
        view = self._param_view(m)
        if view is None:
            return None
        param, swap, r, c = view
        return param, swap != transposed, r, c, x

    def _param_view(self, m: Node):
        """(param, swap, r, c) with m[a, b] = P[r + a, c + b] (P[r + b, c + a] if swap) when
        m is a param seen through slices and transposes the step does not compute."""
        chain = []
        while m.id not in self.core_ids and m.op in (Op.INDEX, Op.TRANSPOSE) and m.rank == 2:
            if m.op == Op.INDEX and not (m.srcs[0].rank == 2 and all(
                    isinstance(i, slice) and i.step in (None, 1) and (i.start or 0) >= 0 for i in m.arg)):
                return None
            chain.append(m)
            m = m.srcs[0]
        if m.op != Op.PARAM or m.rank != 2 or m.id in self.core_ids:
            return None
        swap, r, c = False, 0, 0
        for x in reversed(chain):   # from the param up to the operand
            if x.op == Op.TRANSPOSE:
                swap = not swap
            else:
                lo0, lo1 = x.arg[0].start or 0, x.arg[1].start or 0
                r, c = (r + lo1, c + lo0) if swap else (r + lo0, c + lo1)
        return m, swap, r, c

    def _concat_parts(self, x: Node) -> list[tuple[Node, int]]:
        """The parts of a concat the step computes, with their offsets (nested ones looked
        through); [(x, 0)] for any other vector."""
        if x.op != Op.CONCAT or x.id not in self.core_ids:
            return [(x, 0)]
        out, off = [], 0
        for s in x.srcs:
            out += [(p, off + o) for p, o in self._concat_parts(s)]
            off += self.dims(s)[0]
        return out

    def _weight_tile(self, t: WeightTile) -> int:
        k = (t.param.id, t.swap, t.r, t.c, t.k0, t.K, t.win, t.N)
        if k not in self._tile_index:
            self._tile_index[k] = len(self.tiles)
            self.tiles.append(t)
        return self._tile_index[k]

    # ------------------------------------------------------------------ checks
    def _check_reads(self):
        for x in self.leaves + self.params:   # each element's gradient is written by one window
            wins = (self.param_wins if x.op == Op.PARAM else self.leaf_wins)[x.id]
            spans = sorted({w.covers(self.dims(x)[-1] if x.rank else 1) for w in wins})
            if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                raise NotEligible("a value is read at overlapping slices")
        weights = {t.param.id for t in self.tiles}
        both = [p.arg for p in self.params if p.id in weights]
        if both:
            raise NotEligible(f"the param {both[0]} is read both elementwise and as a matmul weight")
        for i, a in enumerate(self.tiles):
            for b in self.tiles[i + 1:]:
                if a.param is b.param and all(x[0] < y[1] and y[0] < x[1] for x, y in zip(a.extent(), b.extent())):
                    raise NotEligible(f"two products read overlapping parts of the weight {a.param.arg}")

    def _gpu_rows(self) -> tuple[int, int]:
        """(batch rows, warps) per program on a GPU: 16 rows and 4 warps, fewer rows when the
        step holds matrices, more warps when they are large."""
        biggest = max((_pow2(self.dims(n)[0]) * _pow2(self.dims(n)[1]) for n, _ in self.order if n.rank == 2),
                      default=0)
        for s in self.states:
            st = self.ir.states[s]
            if st.rank == 2:
                biggest = max(biggest, _pow2(self.dims(st)[0]) * _pow2(self.dims(st)[1]))
        if biggest > MATRIX_LIMIT:
            raise NotEligible(f"a matrix of {biggest} elements (padded) per batch row does not fit one program's "
                              f"registers (<= {MATRIX_LIMIT}); only a state's columns (rows) split across programs")
        rows = GPU_ROWS
        while rows > 1 and rows * biggest > ROW_BUDGET:
            rows //= 2
        return rows, 8 if rows * biggest >= WIDE_TILE else 4

    # ------------------------------------------------------------------ names
    def vname(self, n: Node, w: Win) -> str:
        lit = texpr.literal(n)
        if lit is not None:
            return lit
        if n.op == Op.STATE and n.arg[0] in self.states and w == self._full(n):
            return f"h{self.states.index(n.arg[0])}"
        k = self._num.setdefault(n.id, len(self._num))   # numbered in order: names do not depend on ids
        if w == self._norm(n, self._full(n)):
            return f"v{k}"
        return f"v{k}_{w.off}_{w.len}".replace("-", "m")

    def _operand(self, n: Node, w: Win, s: Node, sw: Win) -> str:
        """Source s of n as n's line reads it (lifted to n's rank)."""
        text = self.vname(s, sw)
        return text if texpr.literal(s) is not None else self._lift(text, s.rank, n.rank)

    def params_all(self) -> list[Node]:
        out = list(self.params)
        for t in self.tiles:
            if t.param not in out:
                out.append(t.param)
        return out

    def arg_names(self, backward: bool) -> list[str]:
        args = []
        for i in range(len(self.leaves)):
            args += [f"l{i}", f"l{i}_sb", f"l{i}_st", f"l{i}_sh", f"l{i}_sn"]
        for j in range(len(self.params_all())):
            args += [f"p{j}", f"p{j}_sh", f"p{j}_sr", f"p{j}_sc"]
        for k in range(len(self.states)):
            args += [f"hinit{k}", f"hseq{k}"] + ([f"dhseq{k}", f"dhfin{k}", f"dh0{k}"] if backward else [f"hfin{k}"])
        if backward:
            args += [f"dl{i}" for i in range(len(self.leaves))] + [f"dp{j}" for j in range(len(self.params_all()))]
        return args + ["B", "T", "NH", "TL", "cu"]

    def slen(self, k: int) -> int:
        return self._size(self.ir.states[self.states[k]])

    def _size(self, n: Node) -> int:
        """The value's elements in memory (all of them: a split program stores its block)."""
        out = 1
        for d in self.ir.shape_of(n):
            out *= d
        return out

    def _count(self, n: Node) -> int:
        out = 1
        for d in self.dims(n):
            out *= d
        return out

    # ------------------------------------------------------------------ shared code
    @staticmethod
    def _with_lanes(lines: list[str], at: int) -> list[str]:
        """The kernel's lines with `colsN = tl.arange(0, N)` inserted at `at`, for every N
        the lines read (only those: an unread range would be dead code)."""
        widths = sorted({int(m) for m in re.findall(r"\bcols(\d+)\b", "\n".join(lines))})
        return lines[:at] + [f"    cols{w} = tl.arange(0, {w})" for w in widths] + lines[at:]

    def _setup(self, L: list[str], need: set | None = None) -> int:
        """The kernel's prologue: program ids, rows, the params held in registers (the
        elementwise params' windows in `need` only, when given). Returns where the lane
        ranges go."""
        L += self._program_rows()
        at = len(L)
        for j, p in enumerate(self.params):   # elementwise params: loaded once
            for w in self.param_wins[p.id]:
                if need is not None and self.key(p, w) not in need:
                    continue
                lanes = self.valid(p, w)
                masked = f", mask={lanes}, other=0.0" if lanes else ""
                L.append(annotate(f"    {self.vname(p, w)} = tl.load(p{j} + hd * p{j}_sh + {self._param_index(p, w, j)}"
                                  f"{masked}).to(ACC)", self.notes(p, with_text=False)))
        if not self.streamed:
            for ti in range(len(self.tiles)):   # the recurrent weights: loaded once, held in registers
                L.append("    " + self._weight_load(ti))
        else:
            L += self._grids()
        return at

    def _program_rows(self) -> list[str]:
        """The prologue's first lines: the program's ids and its rows (batch rows and their
        sequences here; a grid kernel's are the cells of a diagonal, grid_kernels.py)."""
        return ["    pid = tl.program_id(0)",
                "    hd = tl.program_id(1).to(tl.int64)",
                *self._split_rows(),
                "    bm = rb < B",
                "    if VARLEN:  # row rb is sequence rb of cu_seqlens, packed along T of a batch of one",
                "        bos = tl.load(cu + rb, mask=bm, other=0).to(tl.int64)",
                "        Tn = tl.load(cu + rb + 1, mask=bm, other=0).to(tl.int64) - bos",
                "        bb = rb.to(tl.int64) * 0",
                "    else:",
                "        bos = rb.to(tl.int64) * 0",
                "        Tn = bos + T",
                "        bb = rb.to(tl.int64)"]

    def _split_rows(self) -> list[str]:
        """The program's batch rows, and its block of a split state's columns (rows)."""
        if not self.split:
            return ["    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)"]
        sp = self.split
        return [f"    split0 = pid % {sp.blocks} * {sp.size}  # the first of this program's {sp.size} {sp.along}s "
                f"of the states ({sp.length}, {sp.blocks} programs)",
                f"    rb = pid // {sp.blocks} * BLOCK_B + tl.arange(0, BLOCK_B)"]

    def _param_index(self, p: Node, w: Win, j: int) -> str:
        if p.rank == 2:
            R, C = self.dims(p)
            rows, cols = self._index(p, 0, f"cols{_pow2(R)}"), self._index(p, 1, f"cols{_pow2(C)}")
            return f"({rows}[:, None] * p{j}_sr + {cols}[None, :] * p{j}_sc)[None, :, :]"
        if p.rank == 1:
            return f"{self._elements(p, w)} * p{j}_sr"
        return "cols1[None, :]"

    def _weight_load(self, ti: int, lo: int = 0, rows: int | None = None) -> str:
        """The load of weight tile ti (held), or of its K-tile of `rows` rows from row `lo`
        (streamed: loaded in the step, where it is used)."""
        t = self.tiles[ti]
        p = self.params_all().index(t.param)
        shape = f"[{rows or _pow2(t.K)}, {t.win.width}]"
        if rows:   # streamed: the K-tile's corner (per step) + the offsets of a K-tile (see _zero)
            r0, c0 = t.corner(lo)
            corner = " + ".join([f"hd * p{p}_sh"] + [f"{v} * p{p}_{s}" for v, s in ((r0, "sr"), (c0, "sc")) if v])
            mask = t.chunk_mask(lo, rows)
            mask = f", mask={mask}, other=0.0" if mask else ""
            return (f"{self._chunk_name(ti, lo, rows)} = tl.load(p{p} + ({corner}{self._pin}) + "
                    f"{self._grid_name(ti, rows)}{mask}).to(ACC)  # {t.note}: {t.what(lo, rows)} as {shape} streamed "
                    "(x @ tile)")
        row, col = t.coords()
        return (f"w{ti} = tl.load(p{p} + hd * p{p}_sh + ({row}) * p{p}_sr + ({col}) * "
                f"p{p}_sc, mask={t.mask()}, other=0.0).to(ACC)  # {t.note}: {t.what()} as "
                f"{shape} (x @ tile)")

    def _grid_key(self, ti: int, rows: int) -> tuple:
        t = self.tiles[ti]
        return (self.params_all().index(t.param), t.swap, rows, t.win.width)

    def _grid_name(self, ti: int, rows: int) -> str:
        j, swap, rows, width = self._grid_key(ti, rows)
        return f"p{j}_{'t' if swap else ''}k{rows}x{width}"

    def _grids(self) -> list[str]:
        """Before the loop: the element offsets of each shape of streamed K-tile, relative to
        its corner: every K-tile of that shape adds its corner (a scalar) to them."""
        out, seen = [], set()
        for key, step in self.how.items():
            if step.kind != "gemm":
                continue
            for ti, (x, xw) in step.data:
                rows = self.ktile[self.key(x, xw)]
                name = self._grid_name(ti, rows)
                if name in seen:
                    continue
                seen.add(name)
                t, j = self.tiles[ti], self._grid_key(ti, rows)[0]
                row, col = t.grid(rows)
                out.append(f"    {name} = {row} * p{j}_sr + {col} * p{j}_sc  # offsets in a [{rows}, {t.win.width}] "
                           f"K-tile of {t.param.arg}{'^T' if t.swap else ''}")
        return out

    @staticmethod
    def _zero(var: str) -> str:
        """A zero the compiler cannot prove (var < TL in the loop): added to each K-tile's
        corner, it keeps the streamed tiles' addresses computed per step -- loop-invariant,
        they would be hoisted and held across the loop, a pointer per element. The forward
        only (`_pin`): LSTM H = 64 on sm_80/sm_90 runs 128-151 registers with it, 237-242
        without; its backward spills 56 bytes on sm_80 with it, none without (255)."""
        return f"        zero = {var} // TL  # 0 (the weights' addresses are computed per step, not held)"

    @staticmethod
    def _chunk_name(ti: int, lo: int, rows: int | None) -> str:
        """Weight tile ti (held), or its K-tile of rows [lo, lo + rows) (streamed)."""
        return f"w{ti}_k{lo}_{lo + rows}" if rows else f"w{ti}"

    # ------------------------------------------------------------------ streamed weights: K-tiles
    def _k_starts(self, ti: int, x: Node, xw: Win) -> list[int]:
        """The first rows of the K-tiles of streamed tile ti (read by x) that hold weights."""
        rows = self.ktile[self.key(x, xw)]
        return [lo for lo in range(0, _pow2(self.tiles[ti].K), rows) if lo < self.tiles[ti].K]

    def _x_chunk(self, x: Node, xw: Win, lo: int) -> str:
        """Lanes [lo, lo + rows) of the GEMM input x, rows not running and invalid lanes zero
        (x whole, masked, when it is one K-tile)."""
        rows, name = self.ktile[self.key(x, xw)], self.vname(x, xw)
        if rows >= xw.width:
            return f"tl.where({self.running(x, xw)}, {name}, 0.0)"
        return f"{name}_k{lo}_{lo + rows}"

    def _chunk_input(self, x: Node, xw: Win, n: Node):
        """x is read in K-tiles (by the product n): its split goes after its value."""
        key = self.key(x, xw)
        if self.ktile[key] < xw.width:
            self._chunked.setdefault(key, (x, xw))
            self._split_note.setdefault(key, self.notes(n, with_text=False))

    def _split_lines(self, key) -> list[str]:
        """x split into its K-tiles by halving (Triton cannot slice a register tile: a
        reshape to [rows, 2, half], a permute and tl.split give the two halves); a half
        past x's elements is not kept."""
        x, xw = self._chunked[key]
        name, rows, K = self.vname(x, xw), self.ktile[key], self.dims(x)[0]
        lines, todo = [], [(f"tl.where({self.running(x, xw)}, {name}, 0.0)", 0, xw.width)]
        while todo:
            src, lo, size = todo.pop(0)
            half, names = size // 2, []
            for a in (lo, lo + half):
                names.append("_" if a >= K else f"{name}_k{a}_{a + half}")
                if a < K and half > rows:
                    todo.append((names[-1], a, half))
            lines.append(f"{names[0]}, {names[1]} = tl.split(tl.permute(tl.reshape({src}, [BLOCK_B, 2, {half}]), "
                         "(0, 2, 1)))")
        note = self._split_note[key]
        lines[0] += f"  # {note}: {name} in K-tiles of {rows} lanes (the streamed weights' rows)"
        return ["        " + x if i == 0 else "        " + annotate(x, note) for i, x in enumerate(lines)]

    def _join(self, parts: list[str], rows: int) -> str:
        """The K-tiles (in order, each [BLOCK_B, rows]) as one [BLOCK_B, rows * len] tile."""
        while len(parts) > 1:
            parts = [f"tl.reshape(tl.permute(tl.join({a}, {b}), (0, 2, 1)), [BLOCK_B, {2 * rows}])"
                     for a, b in zip(parts[::2], parts[1::2])]
            rows *= 2
        return parts[0]

    def _state_ptr(self, k: int, base: str, t: str | None) -> tuple[str, str]:
        """Pointers and mask of state k's tile: per row at memory step t (rows not running
        at this step masked), or of the [B, NH, n] initial/final state."""
        st = self.ir.states[self.states[k]]
        w = self._full(st)
        n = self.slen(k)
        rows, idx, lanes = self._rows_of(st), self._elements(st, w), self.valid(st, w)
        lanes = f" & {lanes}" if lanes else ""
        if t is None:
            return f"{base} + (rb{rows} * NH + hd) * {n} + {idx}", f"bm{rows}{lanes}"
        return f"{base} + ((bb{rows} * T + {t}{rows}) * NH + hd) * {n} + {idx}", f"act{rows}{lanes}"

    def _leaf_loads(self, L: list[str], t: str, need: set | None = None):
        for i, x in enumerate(self.leaves):
            for w in self.leaf_wins[x.id]:
                if need is not None and self.key(x, w) not in need:
                    continue
                val = self._leaf_value(i, x, w, t)
                L.append(annotate(f"        {self.vname(x, w)} = {val}", self.notes(x, with_text=False)))

    def _leaf_value(self, i: int, x: Node, w, t: str) -> str:
        """Leaf i's tile at window w of this step, loaded in the accumulation dtype."""
        val = f"tl.load({self._leaf_ptr(i, x, w, t)}, mask={self.running(x, w)}, other=0.0)"
        return f"{val} != 0" if x.is_bool else f"{val}.to(ACC)"

    def _leaf_ptr(self, i: int, x: Node, w, t: str) -> str:
        """Leaf i's addresses at step t (its strides: batch, time, head, element)."""
        rows = self._rows_of(x)
        return f"l{i} + bb{rows} * l{i}_sb + {t}{rows} * l{i}_st + hd * l{i}_sh + {self._elements(x, w)} * l{i}_sn"

    def _step(self, L: list[str], need: set | None = None):
        """The step's values in order (leaves are loaded already); only those in `need`,
        when given (the backward recomputes what its adjoint reads)."""
        body: list[str] = []
        groups, done = self._gemm_groups(need), set()
        for n, w in self.order:
            key = self.key(n, w)
            if key not in self.how or (need is not None and key not in need) or key in done:
                continue
            if key in groups:   # every streamed product of x, K-tile by K-tile
                body += self._gemm_group(groups[key])
                done |= {self.key(m, mw) for m, mw in groups[key]}
                body += [self.key(m, mw) for m, mw in groups[key]]   # where their splits go
                continue
            name = self.vname(n, w)
            pre, rhs = self._forward(n, w, self.how[key], name)
            body += [_noted(f"        {x}", self.notes(n, with_text=False)) for x in pre]
            body.append(annotate(f"        {name} = {rhs}", self.notes(n)))
            body.append(key)   # where a split of the value goes
        # the streamed products' inputs in K-tiles: a state's or a leaf's first, a computed one after it
        for k in range(len(self.states)):
            if self._state_key(k) in self._chunked:
                L += self._split_lines(self._state_key(k))
        for n, w in self.order:
            if self.key(n, w) in self._chunked and self.key(n, w) not in self.how:
                L += self._split_lines(self.key(n, w))
        for x in body:
            if isinstance(x, str):
                L.append(x)
            elif x in self._chunked:
                L += self._split_lines(x)

    # ------------------------------------------------------------------ forward rules
    def _forward(self, n: Node, w: Win, st: Step, name: str) -> tuple[list[str], str]:
        """(lines before, expression) of the vnode's value."""
        kind = st.kind
        if kind == "elementwise":
            return [], texpr.expr(n, lambda s: self._operand(n, w, s, st.data[s.id]))
        if kind == "alias":
            return [], self.vname(*st.reads[0])
        if kind == "view":
            return [], self._view(n, st.reads[0][0], self.vname(*st.reads[0]))
        if kind == "expand":
            src = self._operand(n, w, n.srcs[0], st.data)
            return [], f"{src} + tl.zeros([{self._tile_text(n, w)}], dtype=ACC)"
        if kind == "concat":
            return [], self._concat(n, w, st.data)
        if kind == "move":
            src, sw = st.reads[0]
            return [], (f"tl.sum(tl.where({self._move_mask(sw, w)}[None, :, :], {self.vname(src, sw)}[:, :, None], "
                        "0.0), 1)")
        if kind == "gemm" and self.streamed:
            return self._gemm_streamed(n, st, name)
        if kind == "gemm":
            return [], " + ".join(self._gemm_term(ti, x, xw) for ti, (x, xw) in st.data)
        if kind in ("vecmat", "matvec", "outer", "dot"):
            return [], self._product(kind, n, st)
        if kind == "reduce":
            return self._reduce(n, st, name)
        if kind == "transpose":
            return [], f"tl.permute({self.vname(*st.reads[0])}, (0, 2, 1))"
        if kind == "eye":
            R, C = self.dims(n)
            return [], f"tl.where(cols{_pow2(R)}[:, None] == cols{_pow2(C)}[None, :], 1.0, 0.0)[None, :, :].to(ACC)"
        if kind == "arange":
            start, step = st.data
            return [], f"({start!r} + {step!r} * {self._elements(n, w)}).to(ACC)"
        raise NotEligible(kind)  # pragma: no cover - _plan builds only the kinds above

    def _view(self, n: Node, s: Node, text: str) -> str:
        """A broadcast view (new axes of size one) of a lower-rank tile."""
        if n.rank == 1:
            return text                                   # a scalar as a one-element vector: the same tile
        if s.rank == 0 or n.arg[1] is None:
            return f"{text}[:, :, None]"                  # [K, 1] (or [1, 1])
        return f"{text}[:, None, :]"                      # [1, V]

    def _concat(self, n: Node, w: Win, parts) -> str:
        """The parts, each computed at the concat's lanes, picked lane by lane."""
        lane = f"({w.off} + cols{w.width})" if w.off else f"cols{w.width}"
        text = self.vname(parts[-1][0], parts[-1][1])
        for s, sw, off, size in reversed(parts[:-1]):
            text = f"tl.where(({lane} < {off + size})[None, :], {self.vname(s, sw)}, {text})"
        return text

    def _move_mask(self, src: Win, dst: Win) -> str:
        """[src lanes, dst lanes]: True where both hold the same element."""
        a = f"({src.off} + cols{src.width})" if src.off else f"cols{src.width}"
        b = f"({dst.off} + cols{dst.width})" if dst.off else f"cols{dst.width}"
        return f"({a}[:, None] == {b}[None, :])"

    def _gemm_groups(self, need: set | None) -> dict:
        """Streamed products of one input x (W_i @ x, one term each): key of the first in the
        order -> all of them, computed together where the first is (they read only x)."""
        if not self.streamed:
            return {}
        by_x: dict = {}
        for n, w in self.order:
            key = self.key(n, w)
            st = self.how.get(key)
            if st is None or st.kind != "gemm" or len(st.data) != 1 or (need is not None and key not in need):
                continue
            by_x.setdefault(self.key(*st.data[0][1]), []).append((n, w))
        return {self.key(*members[0]): members for members in by_x.values()}

    def _gemm_group(self, members: list) -> list[str]:
        """The products of x, K-tile by K-tile: each K-tile of x is read by all of them while
        it is live (product by product, every K-tile of x would be live across them all)."""
        _, (x, xw) = self.how[self.key(*members[0])].data[0]
        rows = self.ktile[self.key(x, xw)]
        starts = self._k_starts(self.how[self.key(*members[0])].data[0][0], x, xw)
        lines = []
        for i, lo in enumerate(starts):
            for n, w in members:
                (ti, _), = self.how[self.key(n, w)].data
                self._chunk_input(x, xw, n)
                name, note = self.vname(n, w), self.notes(n, with_text=False)
                lines.append(_noted("        " + self._weight_load(ti, lo, rows), note))
                term = self._matmul(self._x_chunk(x, xw, lo), self._chunk_name(ti, lo, rows), rows,
                                    self.tiles[ti].win.width)
                last = i == len(starts) - 1
                lines.append(annotate(f"        {name} = " + (f"{name} + " if i else "") + term,
                                      self.notes(n) if last else note))
        return lines

    def _gemm_streamed(self, n: Node, st: Step, name: str) -> tuple[list[str], str]:
        """x @ W accumulated over the K-tiles of the weight, each loaded where it is used."""
        pieces = [(ti, x, xw, lo) for ti, (x, xw) in st.data for lo in self._k_starts(ti, x, xw)]
        pre, rhs = [], ""
        for i, (ti, x, xw, lo) in enumerate(pieces):
            rows = self.ktile[self.key(x, xw)]
            self._chunk_input(x, xw, n)
            pre.append(self._weight_load(ti, lo, rows))
            term = self._matmul(self._x_chunk(x, xw, lo), self._chunk_name(ti, lo, rows), rows,
                                self.tiles[ti].win.width)
            rhs = (f"{name} + " if i else "") + term
            if i < len(pieces) - 1:
                pre.append(f"{name} = {rhs}")
        return pre, rhs

    def _gemm_term(self, ti: int, x: Node, xw: Win) -> str:
        t = self.tiles[ti]
        xin = self.vname(x, xw)
        lanes = self.valid(x, xw)
        if lanes:
            xin = f"tl.where({lanes}, {xin}, 0.0)"
        return self._matmul(xin, f"w{ti}", _pow2(t.K), t.win.width)

    def _matmul(self, x: str, w: str, K: int, N: int) -> str:
        if min(K, N) >= DOT_MIN and self.gpu_rows >= DOT_MIN:
            return f"tl.dot({x}, {w}, input_precision=\"ieee\")"
        return f"tl.sum({x}[:, :, None] * {w}[None, :, :], 1)"

    def _product(self, kind: str, n: Node, st: Step) -> str:
        (a, aw), (b, bw) = st.reads
        x, y = self.vname(a, aw), self.vname(b, bw)
        if kind == "vecmat":   # x[K] @ M[K, V]: sum over M's rows
            return f"tl.sum(tl.where({self._axis_mask(b, 1)}, {x}[:, :, None] * {y}, 0.0), 1)"
        if kind == "matvec":   # M[K, V] @ x[V]: sum over M's columns
            return f"tl.sum(tl.where({self._axis_mask(a, 2)}, {x} * {y}[:, None, :], 0.0), 2)"
        if kind == "outer":
            return f"{x}[:, :, None] * {y}[:, None, :]"
        return f"tl.sum(tl.where({self.valid(a, aw)}, {x} * {y}, 0.0), 1, keep_dims=True)"   # dot

    @staticmethod
    def _chain(fn: str, text: str, axes: list[int], keep: bool, to_scalar: bool) -> str:
        """fn (tl.sum / tl.max) over the tile axes (descending); the last keeps its axis
        when the result is a scalar ([BLOCK_B, 1])."""
        for i, a in enumerate(axes):
            kd = keep or (to_scalar and i == len(axes) - 1)
            text = f"{fn}({text}, {a}{', keep_dims=True' if kd else ''})"
        return text

    def _reduce(self, n: Node, st: Step, name: str) -> tuple[list[str], str]:
        (s, sw), = st.reads
        axes, keep = st.data
        x, lanes, scalar = self.vname(s, sw), self.valid(s, sw), n.rank == 0
        if n.op == Op.SUM:
            return [], self._chain("tl.sum", f"tl.where({lanes}, {x}, 0.0)", axes, keep, scalar)
        if n.op == Op.AMAX:
            return [], self._chain("tl.max", f"tl.where({lanes}, {x}, {NEG_INF})", axes, keep, scalar)
        # logsumexp: shifted by the max (0 where every element is -inf: the result stays -inf)
        top = f"{name}_max"
        pre = [f"{top} = " + self._chain("tl.max", f"tl.where({lanes}, {x}, {NEG_INF})", axes, True, False),
               f"{top} = tl.where({top} == {NEG_INF}, 0.0, {top})"]
        total = self._chain("tl.sum", f"tl.where({lanes}, tl.exp({x} - {top}), 0.0)", axes, keep, scalar)
        shift = top if keep or s.rank == 1 else self._chain("tl.sum", top, axes, keep, scalar)   # drop the kept axes
        return pre, f"{shift} + tl.log({total})"

    # ------------------------------------------------------------------ forward
    def forward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_fwd({', '.join(self.arg_names(False))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, "
             + ", ".join(f"STORE{k}: tl.constexpr" for k in range(len(self.states))) + "):",
             f"    # stage {', '.join(self.states)}: the time loop on chip; "
             + ("weights streamed from global memory per step" if self.streamed else "weights held in registers")]
        self._chunked, self._split_note, self._pin = {}, {}, " + zero" if self.streamed else ""
        at = self._setup(L)
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"hinit{k}", None)
            L.append(f"    h{k} = tl.load({ptr}, mask={mask}, other=0.0).to(ACC)")
        L += ["    for t in " + self._time_range() + ":",
              "        act = bm & (t < Tn)  # the rows still running (cu_seqlens: sequences differ in length)",
              "        tm = bos + t  # the step in memory"] + ([self._zero("t")] if self.streamed else []) + [
              "        if REVERSE:",
              "            tm = bos + Tn - 1 - t"]
        self._leaf_loads(L, "tm")
        self._step(L)
        for k, s in enumerate(self.states):
            new = self.ir.updates[s]
            nm = self.vname(new, self._norm(new, self._full(new)))
            ptr, mask = self._state_ptr(k, f"hseq{k}", "tm")
            L.append(f"        n{k} = tl.where({mask}, {nm}, h{k})")
            L.append(f"        if STORE{k}:  # the sequence is read (by the driver or a gradient)")
            L.append(f"            tl.store({ptr}, n{k}, mask={mask})")
        for k in range(len(self.states)):
            L.append(f"        h{k} = n{k}")
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"hfin{k}", None)
            L.append(f"    tl.store({ptr}, h{k}, mask={mask})")
        return "\n".join(self._with_lanes(L, at)) + "\n"

    # ------------------------------------------------------------------ backward
    def backward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_bwd({', '.join(self.arg_names(True))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr, HAS_DSEQ: tl.constexpr, VARLEN: tl.constexpr,"
             " REVERSE: tl.constexpr):",
             f"    # adjoint of stage {', '.join(self.states)}: reverse-time loop of the step's VJP (states saved, "
             "the step recomputed)"]
        self._chunked, self._split_note, self._pin = {}, {}, ""   # addresses hoisted (see _zero)
        # the step's reverse mode first: the forward values it reads are all the step recomputes
        reads: set = set()
        adjoint = self._adjoint(reads)
        need = self._needed(reads)
        at = self._setup(L, need)
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"dhfin{k}", None)
            L.append(f"    lam{k} = tl.load({ptr}, mask={mask}, other=0.0).to(ACC)")
        for p in self.params:
            for w in self.param_wins[p.id]:
                L.append(f"    acc_{self.vname(p, w)} = tl.zeros([{self._tile_text(p, w).replace('BLOCK_B', '1')}], "
                         "dtype=ACC)")
        for ti, t in enumerate(self.tiles if not self.streamed else []):
            L.append(f"    dw{ti} = tl.zeros([{_pow2(t.K)}, {t.win.width}], dtype=ACC)")
        L += ["    for r in " + self._time_range() + ":",
              "        t = TL - 1 - r"] + [
              "        act = bm & (t < Tn)",
              "        tm = bos + t"]
        h_read = [k for k in range(len(self.states)) if self._state_key(k) in need]
        if h_read:   # h_{t-1} at step t - 1 in memory
            L += ["        tp = bos + tl.maximum(t - 1, 0)"]
        L += ["        if REVERSE:",
              "            tm = bos + Tn - 1 - t"]
        if h_read:
            L += ["            tp = bos + Tn - 1 - tl.maximum(t - 1, 0)"]
        for k in h_read:  # h_{t-1}: the saved sequence, or the initial state
            p1, mask = self._state_ptr(k, f"hseq{k}", "tp")
            p0, _ = self._state_ptr(k, f"hinit{k}", None)
            L.append(f"        h{k} = tl.where(t > 0, tl.load({p1}, mask={mask}, other=0.0), "
                     f"tl.load({p0}, mask={mask}, other=0.0)).to(ACC)")
        self._leaf_loads(L, "tm", need)
        self._step(L, need)
        L += adjoint
        if self.streamed:   # this step's weight gradients are in memory before the next step adds to them
            L.append("        tl.debug_barrier()")
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"dh0{k}", None)
            L.append(f"    tl.store({ptr}, lam{k}, mask={mask})")
        # param partials: [programs, NH, *shape], this program's slice
        for j, p in enumerate(self.params):
            for w in self.param_wins[p.id]:
                idx = self._elements(p, w)
                lanes = self.valid(p, w)
                L.append(f"    tl.store(dp{j} + (pid * NH + hd) * {self._size(p)} + {idx}, "
                         f"acc_{self.vname(p, w)}" + (f", mask={lanes})" if lanes else ")"))
        for ti, t in enumerate(self.tiles if not self.streamed else []):   # streamed: added per step
            L.append(f"    tl.store({self._grad_ptr(ti)}, dw{ti}, mask={t.mask()})")
        return "\n".join(self._with_lanes(L, at)) + "\n"

    def _time_range(self) -> str:
        """The time loop's range: with streamed weights, not software-pipelined (the pipeliner
        would prefetch every K-tile of the next steps into shared memory: the weights held
        again, in shared memory and registers)."""
        return "tl.range(0, TL, num_stages=1)" if self.streamed else "range(0, TL)"

    def _state_key(self, k: int):
        st = self.ir.states[self.states[k]]
        return self.key(st, self._full(st))

    def _adjoint(self, reads: set) -> list[str]:
        """The lines of one step's reverse mode (inside the time loop, after the recomputed
        step): the new states' adjoints seeded, each vnode's adjoint from its readers', the
        leaves' gradients stored or accumulated, the carried adjoints of h_{t-1}. Adds to
        `reads` the keys of the forward vnodes the lines read."""
        L: list[str] = []
        adj = _Adjoint()
        for k, s in enumerate(self.states):
            new = self.ir.updates[s]
            ptr, mask = self._state_ptr(k, f"dhseq{k}", "tm")
            L += ["        if HAS_DSEQ:",
                  f"            lam{k} += tl.load({ptr}, mask={mask}, other=0.0).to(ACC)"]
            adj.add(self.key(new, self._norm(new, self._full(new))), f"lam{k}")
        for n, w in reversed(self.order):
            parts = adj.parts.pop(self.key(n, w), None)
            step = self.how.get(self.key(n, w))
            if not parts or (step is not None and not self._passes_adjoint(n, step)):
                continue
            g = "g" + self.vname(n, w)[1:]
            pre, total = sum_text(parts, g)   # (a value read thousands of times: lines of at most 64 terms)
            L += ["        " + x for x in pre]
            L.append(annotate(f"        {g} = tl.where({self.running(n, w)}, {total}, 0.0)",
                              self.notes(n, with_text=False)))
            if step is None:
                self._leaf_grad(L, n, w, g)
                continue
            lines, contribs = self._vjp(n, w, step, g, reads)
            L += [_noted(f"        {x}", self.notes(n, with_text=False)) for x in lines]
            for (src, sw), term in contribs:
                if term is not None and texpr.literal(src) is None and src.op not in (Op.CONST, Op.EYE):
                    adj.add(self.key(src, sw), term)
        for k, s in enumerate(self.states):
            st = self.ir.states[s]
            parts = adj.parts.pop(self.key(st, self._full(st)), None)
            _, mask = self._state_ptr(k, "x", "t")
            pre, total = sum_text(parts, f"lamsum{k}") if parts else ([], "0.0")
            L += ["        " + x for x in pre]
            L.append(f"        lam{k} = tl.where({mask}, {total}, lam{k})"
                     f" + tl.zeros([{self._tile_text(st, self._full(st))}], dtype=ACC)  # rows not running keep theirs")
        return L

    @staticmethod
    def _passes_adjoint(n: Node, step: Step) -> bool:
        """Whether the vnode's reverse rule gives any source an adjoint (sign, comparisons and
        constants give none: their adjoint would be computed for nothing)."""
        if step.kind in ("eye", "arange"):
            return False
        if step.kind != "elementwise":
            return True
        terms = texpr.vjp(n, "g", lambda s: "x", "out")
        return any(t is not None and texpr.literal(s) is None and s.op not in (Op.CONST, Op.EYE)
                   for s, t in zip(n.srcs, terms))

    def _needed(self, reads: set) -> set:
        """The keys of the vnodes the backward loads or recomputes: those its adjoint reads
        and, sources first in self.order, everything they are computed from."""
        need = set(reads)
        for n, w in reversed(self.order):
            key = self.key(n, w)
            if key in self.how and key in need:
                need |= {self.key(s, sw) for s, sw in self.how[key].reads}
        return need

    def _leaf_grad(self, L, n, w, g):
        if n.op == Op.PARAM:
            L.append(f"        acc_{self.vname(n, w)} += tl.sum({g}, 0, keep_dims=True)")
            return
        i = self.leaves.index(n)
        rows = self._rows_of(n)
        row = f"(bb{rows} * T + tm{rows}) * NH + hd"
        if self.leaf_copies(i) > 1:   # a column-free leaf: this program's part, in its own copy
            row = f"({row}) * {self.leaf_copies(i)} + pid % {self.leaf_copies(i)}"
        ptr = f"dl{i} + ({row}) * {self._size(n)} + {self._elements(n, w)}"
        L.append(f"        tl.store({ptr}, {g} + tl.zeros([{self._tile_text(n, w)}], dtype=ACC), "
                 f"mask={self.running(n, w)})")

    # ------------------------------------------------------------------ reverse rules
    def _vjp(self, n: Node, w: Win, st: Step, g: str, reads: set):
        """(lines, [((src, window), contribution)]) of a computed vnode whose adjoint is g:
        each contribution has its source's tile shape. Adds to `reads` the keys of the
        forward vnodes they read."""
        kind = st.kind
        if kind == "elementwise":
            wins = st.data
            contribs, read, reads_out = vjp_reading(n, g, lambda s: self._operand(n, w, s, wins[s.id]),
                                                    self.vname(n, w))
            reads |= {self.key(s, wins[s.id]) for s in read if texpr.literal(s) is None}
            if reads_out:
                reads.add(self.key(n, w))
            return [], [((s, wins[s.id]), None if c is None else self._unbroadcast(c, n, w, s))
                        for s, c in zip(n.srcs, contribs)]
        if kind == "alias":
            return [], [(st.reads[0], g)]
        if kind == "view":
            (s, sw), = st.reads
            axis = 1 if n.rank == 2 and s.rank == 1 and n.arg[0] is None else 2
            return [], [((s, sw), g if n.rank == 1 else f"tl.sum({g}, {axis})")]
        if kind == "expand":
            s = n.srcs[0]
            return [], [] if texpr.literal(s) is not None else [((s, st.data), self._unbroadcast(g, n, w, s))]
        if kind == "concat":
            return [], self._concat_vjp(n, w, st.data, g)
        if kind == "move":
            (s, sw), = st.reads
            return [], [((s, sw), f"tl.sum(tl.where({self._move_mask(sw, w)}[None, :, :], {g}[:, None, :], 0.0), 2)")]
        if kind == "gemm" and self.streamed:
            return self._gemm_vjp_streamed(n, st, g, reads)
        if kind == "gemm":
            return self._gemm_vjp(st, g, reads)
        if kind in ("vecmat", "matvec", "outer", "dot"):
            return [], self._product_vjp(kind, st, g, reads)
        if kind == "reduce":
            return [], self._reduce_vjp(n, w, st, g, reads)
        if kind == "transpose":
            return [], [(st.reads[0], f"tl.permute({g}, (0, 2, 1))")]
        return [], []   # constants

    def _unbroadcast(self, c: str, n: Node, w: Win, s: Node) -> str:
        """A contribution over n's tile summed down to source s's tile (the axes numpy
        broadcast s along); the lanes of n that are not valid are left out of the sums."""
        if s.rank == 2 or n.rank == 0:
            if s.rank == 2:
                axes = [a + 1 for a in (1, 0) if self.dims(s)[a] == 1 and self.dims(n)[a] > 1]
                if axes:
                    c = self._chain("tl.sum", f"tl.where({self.valid(n, w)}, {c}, 0.0)", axes, True, False)
            return c
        lanes = self.valid(n, w)
        if n.rank == 2:
            c = f"tl.sum(tl.where({lanes}, {c}, 0.0), 1)"   # [BLOCK_B, C]: summed over the rows
            if s.rank == 0:
                return f"tl.sum({c}, 1, keep_dims=True)"
            return f"tl.sum({c}, 1, keep_dims=True)" if self.dims(s)[0] == 1 < self.dims(n)[1] else c
        if s.rank == 0 or self.dims(s)[0] == 1 < self.dims(n)[0]:
            return f"tl.sum(tl.where({lanes}, {c}, 0.0), 1, keep_dims=True)"
        return c

    def _concat_vjp(self, n: Node, w: Win, parts, g: str):
        if len(parts) == 1:
            s, sw, _, _ = parts[0]
            return [((s, sw), self._unbroadcast(g, n, w, s))]
        lane = f"({w.off} + cols{w.width})" if w.off else f"cols{w.width}"
        out = []
        for s, sw, off, size in parts:
            term = f"tl.where((({lane} >= {off}) & ({lane} < {off + size}))[None, :], {g}, 0.0)"
            out.append(((s, sw), self._unbroadcast(term, n, w, s)))
        return out

    def _grad_ptr(self, ti: int, lo: int = 0, rows: int | None = None) -> str:
        """Pointers to this program's partial gradient of weight tile ti (its K-tile from row
        lo when streamed): [programs, NH, *shape], summed over the programs in torch."""
        t = self.tiles[ti]
        j = self.params_all().index(t.param)
        R, C = self.dims(t.param)
        if rows:   # streamed: as the weight's K-tile, a corner per step and the offsets in a K-tile
            r0, c0 = t.corner(lo)
            row, col = t.grid(rows)
            return f"dp{j} + ((pid * NH + hd) * {R * C} + {r0 * C + c0}{self._pin}) + ({row} * {C} + {col})"
        row, col = t.coords()
        return f"dp{j} + (pid * NH + hd) * {R * C} + ({row}) * {C} + ({col})"

    def _gemm_vjp_streamed(self, n: Node, st: Step, g: str, reads: set):
        """Per K-tile of the weight, loaded again: its gradient added to the program's slice
        in memory (read, add, store: registers stay bounded), and the input's adjoint
        g @ tile^T, the K-tiles joined back into x's lanes."""
        lines, out = [], []
        for ti, (x, xw) in st.data:
            t, key = self.tiles[ti], self.key(x, xw)
            rows = self.ktile[key]
            reads.add(key)
            self._chunk_input(x, xw, n)
            parts = []
            for lo in range(0, xw.width, rows):
                if lo >= t.K:
                    parts.append(f"tl.zeros([BLOCK_B, {rows}], dtype=ACC)")
                    continue
                w, xc = self._chunk_name(ti, lo, rows), self._x_chunk(x, xw, lo)
                lines.append(self._weight_load(ti, lo, rows))
                mask = t.chunk_mask(lo, rows)
                if min(rows, t.win.width) >= DOT_MIN and self.gpu_rows >= DOT_MIN:
                    dw = f"tl.dot(tl.trans({xc}), {g}, input_precision=\"ieee\")"
                else:
                    dw = f"tl.sum({xc}[:, :, None] * {g}[:, None, :], 0)"
                lines.append(f"{w}_grad = {self._grad_ptr(ti, lo, rows)}  # this program's gradient of {w}")
                masked = f", mask={mask}" if mask else ""
                lines.append(f"tl.store({w}_grad, tl.load({w}_grad{masked}) + {dw}{masked})")
                parts.append(f"{g}_dx{ti}_k{lo}_{lo + rows}")
                lines.append(f"{parts[-1]} = tl.sum({g}[:, None, :] * {w}[None, :, :], 2)")
            if len(parts) == 1:
                out.append(((x, xw), parts[0]))
                continue
            lines.append(f"{g}_dx{ti} = {self._join(parts, rows)}")
            out.append(((x, xw), f"{g}_dx{ti}"))
        return lines, out

    def _gemm_vjp(self, st: Step, g: str, reads: set):
        lines, out = [], []
        for ti, (x, xw) in st.data:
            t = self.tiles[ti]
            lanes = self.valid(x, xw)
            xin = f"tl.where(act[:, None]{' & ' + lanes if lanes else ''}, {self.vname(x, xw)}, 0.0)"
            reads.add(self.key(x, xw))
            KP, LP = _pow2(t.K), t.win.width
            if min(KP, LP) >= DOT_MIN and self.gpu_rows >= DOT_MIN:
                lines.append(f"dw{ti} += tl.dot(tl.trans({xin}), {g}, input_precision=\"ieee\")")
            else:
                lines.append(f"dw{ti} += tl.sum({xin}[:, :, None] * {g}[:, None, :], 0)")
            # g @ W^T always as a product-sum: tl.dot here (with or without tl.trans) crashes
            # LLVM's SLP vectorizer in Triton 3.9 for sm_90 (seen at H = 16 and 32)
            out.append(((x, xw), f"tl.sum({g}[:, None, :] * w{ti}[None, :, :], 2)"))
        return lines, out

    def _product_vjp(self, kind: str, st: Step, g: str, reads: set):
        (a, aw), (b, bw) = st.reads
        x, y = self.vname(a, aw), self.vname(b, bw)
        reads |= {self.key(a, aw), self.key(b, bw)}
        if kind == "vecmat":   # o = x @ M: dx = M @ g, dM = outer(x, g)
            return [((a, aw), f"tl.sum(tl.where({self._axis_mask(b, 2)}, {g}[:, None, :] * {y}, 0.0), 2)"),
                    ((b, bw), f"{x}[:, :, None] * {g}[:, None, :]")]
        if kind == "matvec":   # o = M @ x: dM = outer(g, x), dx = g @ M
            return [((a, aw), f"{g}[:, :, None] * {y}[:, None, :]"),
                    ((b, bw), f"tl.sum(tl.where({self._axis_mask(a, 1)}, {x} * {g}[:, :, None], 0.0), 1)")]
        if kind == "outer":   # o = outer(a, b): da = o_adj @ b, db = a @ o_adj
            ka, kb = self._count(a), self._count(b)
            return [((a, aw), f"tl.sum(tl.where({self._along(kb, 2)}, {g} * {y}[:, None, :], 0.0), 2)"),
                    ((b, bw), f"tl.sum(tl.where({self._along(ka, 1)}, {g} * {x}[:, :, None], 0.0), 1)")]
        return [((a, aw), f"({g} * {y})"), ((b, bw), f"({g} * {x})")]   # dot

    def _back(self, text: str, s: Node, axes: list[int], keep: bool) -> str:
        """A reduction's result (or adjoint) with the reduced axes back, size one."""
        if keep or s.rank == 1:
            return text
        if len(axes) == 2:
            return f"{text}[:, :, None]"
        return f"{text}[:, None, :]" if axes[0] == 1 else f"{text}[:, :, None]"

    def _reduce_vjp(self, n: Node, w: Win, st: Step, g: str, reads: set):
        (s, sw), = st.reads
        axes, keep = st.data
        gb = self._back(g, s, axes, keep)
        if n.op == Op.SUM:
            return [((s, sw), gb)]
        x, out = self.vname(s, sw), self._back(self.vname(n, w), s, axes, keep)
        reads |= {self.key(s, sw), self.key(n, w)}
        if n.op == Op.AMAX:   # ties share the adjoint equally (as torch's amax)
            ties = self._chain("tl.sum", f"tl.where({self.valid(s, sw)} & ({x} == {out}), 1.0, 0.0)", axes, True, False)
            return [((s, sw), f"tl.where({x} == {out}, {gb}, 0.0) / {ties}")]
        # logsumexp: the softmax; an element at -inf (all of them: a state no path reaches) gets none
        return [((s, sw), f"tl.where({x} == {NEG_INF}, 0.0, {gb} * tl.exp({x} - {out}))")]

    def combines(self) -> list[str]:
        return []

    def constexprs(self, backward: bool, acc) -> dict:
        out = {"ACC": acc, "BLOCK_B": self.gpu_rows, "VARLEN": False, "REVERSE": False}   # as launch on a GPU
        if backward:
            out["HAS_DSEQ"] = True
        else:
            out.update({f"STORE{k}": True for k in range(len(self.states))})
        return out
