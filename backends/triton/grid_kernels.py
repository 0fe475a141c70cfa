"""The generated Triton wavefront kernel of a cell `over grid2d` (form Wavefront, kernel
triton.wavefront): any update the step generator can express, nonlinear too.

Cell (x, y) computes its new states from its inputs and the new states of its left (x-1, y)
and up (x, y-1) neighbours (the initial state off the grid, LANGUAGE.md §6). The cells with
x + y = d depend only on diagonal d-1, so

    for d = 0 .. X+Y-2:   S[x, d-x] = step(inputs[x, d-x], S[x-1, d-x], S[x, d-x-1])   for all x on d

One persistent program per (batch row, head) walks the diagonals; a diagonal's cells are the
rows of the tiles ([cells, features]; in chunks of BLOCK_B cells on a long diagonal), its
neighbours' states are loaded from the state grid in global memory the program wrote at
diagonal d-1, and a `tl.debug_barrier()` ends every diagonal so that those writes (by any of
the program's threads) are visible to the next one. No launch per diagonal, no barrier
between programs: programs share nothing but the weights.

The step is the sequential kernel's (seq_kernels.SeqKernel, generated from the IR: GEMMs
with param weights held in registers or streamed, elementwise math, reductions, products with
matrix states) with two differences, made by overriding its hooks: a program's rows are the
cells of a diagonal, and a state read (`h.left`, `h.up`) is a leaf loaded from the neighbour's
cell of the state grid (or the initial state), not a register carried across the loop. The
state-free values the step reads (inputs, input projections W @ x, gates of inputs only) are
computed by torch over the whole grid first, as torch.wavefront does; the outputs too, after
the kernel, from the state grid and its left / up shifts (so the kernel writes states only).

On a GPU a tile is `gpu_rows` cells (16, tl.dot's smallest side; 8 when the weights are
streamed: see STREAMED_ROWS for the spill measurements), a longer diagonal runs in chunks of
that many; in the interpreter a tile holds the longest diagonal. The linear grid scans (pLSTM
P-mode, D-mode) run this same kernel: a dedicated intra-tile dense form is not built.

Backward (derived): the reverse sweep d = X+Y-2 .. 0. The adjoint of cell (x, y)'s new
states is the incoming gradient of the state grid plus what its right neighbour (x+1, y) gave
its `.left` read and its lower neighbour (x, y+1) its `.up` read, both written at diagonal
d+1 into the per-cell gradient buffers of those reads; the step is recomputed from the saved
state grid and its VJP (texpr / SeqKernel rules) gives the adjoints of the neighbours' reads
(written per cell), of the leaves (per cell) and of the params (accumulated per program,
summed in torch). The initial states' gradients are the reads that fell off the grid: the
left reads of column x = 0 and the up reads of row y = 0, summed in torch."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from recdsl.errors import RecError
from recdsl.ir import IRCell, Node, Op, toposort
from recdsl.torch_expr import compile_nodes

from ..torch.double_backward import unsupported, wants_graph
from .fusion import kernel_name
from .fusion import pow2 as _pow2
from .seq_kernels import NotEligible, SeqKernel

__all__ = ["GridKernel", "GridProgram", "NotEligible", "grid_core", "wavefront_why_not"]

MAX_INTERPRETED_ROWS = 64   # cells per tile in Triton's interpreter (each tile op one numpy call)
# Streamed weights on a GPU: cells per tile, warps, and the backward's K-tile rows. ptxas at MDLSTM
# D = H = 32 (10240 weight elements), spill bytes forward / backward on sm_90 (sm_80): 16 cells x 8 warps
# 56 / 448 (8 / 568); 4 x 8: 0 / 200 (0 / 120); 8 x 8: 0 / 12 (0 / 0), and with 16-row K-tiles 0 / 0
# (64 / 0). So 8 cells, 8 warps, whole K-tiles forward and 16-row ones backward: none on either. (16 warps
# would need more than an SM's 64 K registers at ~220 a thread.)
STREAMED_ROWS = 8
STREAMED_WARPS = 8
STREAMED_BACKWARD_KTILE = 16


def grid_core(ir: IRCell) -> list[Node]:
    """The nodes the kernel computes per cell: those that read a state (directly or not) and
    lead to an update; everything else the step reads is a leaf (torch, over the whole grid)."""
    roots = list(ir.updates.values())
    dyn: dict[int, bool] = {}
    out = []
    for n in toposort(roots):
        dyn[n.id] = n.op == Op.STATE or any(dyn[s.id] for s in n.srcs)
        if dyn[n.id] and n.op != Op.STATE:
            out.append(n)
    return out


class GridKernel(SeqKernel):
    """The wavefront kernels (forward and backward) of a grid cell: SeqKernel's step with
    cells as rows and neighbour state reads as leaves (see the module doc)."""

    def __init__(self, ir: IRCell, notes):
        if ir.over != "grid2d":
            raise NotEligible(f"over {ir.over}: the wavefront kernel runs grids")
        for n in toposort(list(ir.updates.values())):
            if n.op == Op.STATE and n.arg[1] not in ("left", "up"):
                raise NotEligible(f"state {n.arg[0]} read as .{n.arg[1]} (a grid reads .left / .up)")
        super().__init__(ir, SimpleNamespace(states=list(ir.updates), index=0), grid_core(ir), notes)
        self.name = kernel_name(ir.name, 0, self.states) + "_grid"
        if getattr(self, "split", None):   # the programs' first axis is the batch row here, never a column block
            raise NotEligible("a matrix state split across programs (too big for one): not built for grids")
        self.reads = [(i, x) for i, x in enumerate(self.leaves) if x.op == Op.STATE]   # neighbour reads
        self.cell_leaves = [(i, x) for i, x in enumerate(self.leaves) if x.op != Op.STATE]
        if self.streamed:   # the grid's own measured choice (STREAMED_ROWS), not the sequential kernels'
            self.gpu_rows, self.gpu_warps = min(self._gpu_rows()[0], STREAMED_ROWS), STREAMED_WARPS

    # ------------------------------------------------------------------ hooks of SeqKernel
    def _enter(self, n: Node, w):
        if n.op == Op.STATE:   # a neighbour's state: loaded from the state grid, a leaf of the step
            return self._leaf(n, w)
        return super()._enter(n, w)

    def vname(self, n: Node, w) -> str:
        if n.op == Op.STATE:   # two reads of one state (left, up) are two values, never the carried h{k}
            k = self._num.setdefault(n.id, len(self._num))
            return f"v{k}" if w == self._norm(n, self._full(n)) else f"v{k}_{w.off}_{w.len}".replace("-", "m")
        return super().vname(n, w)

    def mode(self) -> str:
        held = ("weights streamed from global memory per diagonal" if self.streamed
                else f"recurrent weights ({self.weight_elements} elements) in registers" if self.tiles
                else "no recurrent weight")
        return ("generated wavefront kernel: one program per batch row (and head) walks the anti-diagonals, "
                f"a diagonal's cells as tile rows, neighbours' states from the state grid; {held}; backward the "
                "reverse sweep of the step's VJP")

    def _program_rows(self) -> list[str]:
        return ["    pid = tl.program_id(0)  # the batch row",
                "    hd = tl.program_id(1).to(tl.int64)",
                "    bb = pid.to(tl.int64)",
                "    cells = tl.arange(0, BLOCK_B)"]

    def _cell(self, cx: str, cy: str) -> str:
        """The flat index of cell (cx, cy) of this program's row in a [B, X, Y, NH] grid."""
        return f"((bb * X + {cx}) * Y + {cy}) * NH + hd"

    def _state_ptr(self, k: int, base: str, t: str | None) -> tuple[str, str]:
        """State k's tile at the diagonal's cells in the grid buffer `base`, or (t None) the
        initial state [B, NH, n] broadcast to every cell."""
        st = self.ir.states[self.states[k]]
        w = self._full(st)
        rows, idx, lanes = self._rows_of(st), self._elements(st, w), self.valid(st, w)
        lanes = f" & {lanes}" if lanes else ""
        if t is None:
            return f"{base} + (bb * NH + hd) * {self.slen(k)} + {idx} + 0 * cx{rows}", f"act{rows}{lanes}"
        return f"{base} + ({self._cell('cx', 'cy')}){rows} * {self.slen(k)} + {idx}", f"act{rows}{lanes}"

    def _leaf_value(self, i: int, x: Node, w, t: str) -> str:
        """A state read is a neighbour's (`.left` / `.up`); other leaves load as in SeqKernel."""
        return self._neighbour_load(x, w) if x.op == Op.STATE else super()._leaf_value(i, x, w, t)

    def _leaf_ptr(self, i: int, x: Node, w, t: str) -> str:
        """Leaf i at the diagonal's cells (strides: batch, x, y, head, element)."""
        rows = self._rows_of(x)
        return (f"l{i} + bb * l{i}_sb + cx{rows} * l{i}_sx + cy{rows} * l{i}_sy + hd * l{i}_sh + "
                f"{self._elements(x, w)} * l{i}_sn")

    def _neighbour_load(self, x: Node, w) -> str:
        """A `.left` / `.up` read: the neighbour's new state (written at diagonal d-1), or the
        initial state where the neighbour is off the grid."""
        name, where = x.arg
        k = self.states.index(name)
        rows = self._rows_of(x)
        nx, ny, inside = ("cx - 1", "cy", "cx > 0") if where == "left" else ("cx", "cy - 1", "cy > 0")
        idx, mask = self._elements(x, w), self.running(x, w)
        on_grid = (f"tl.load(hseq{k} + ({self._cell(nx, ny)}){rows} * {self.slen(k)} + {idx}, "
                   f"mask={mask} & ({inside}){rows}, other=0.0)")
        initial = f"tl.load(hinit{k} + (bb * NH + hd) * {self.slen(k)} + {idx} + 0 * cx{rows}, mask={mask}, other=0.0)"
        return f"tl.where(({inside}){rows}, {on_grid}, {initial}).to(ACC)"

    def _leaf_grad(self, L, n, w, g):
        if n.op == Op.PARAM:
            return super()._leaf_grad(L, n, w, g)
        i = self.leaves.index(n)
        rows = self._rows_of(n)
        ptr = f"dl{i} + ({self._cell('cx', 'cy')}){rows} * {self._count(n)} + {self._elements(n, w)}"
        L.append(f"        tl.store({ptr}, {g} + tl.zeros([{self._tile_text(n, w)}], dtype=ACC), "
                 f"mask={self.running(n, w)})")

    # ------------------------------------------------------------------ arguments
    def arg_names(self, backward: bool) -> list[str]:
        args = []
        for i, _ in self.cell_leaves:
            args += [f"l{i}", f"l{i}_sb", f"l{i}_sx", f"l{i}_sy", f"l{i}_sh", f"l{i}_sn"]
        for j in range(len(self.params_all())):
            args += [f"p{j}", f"p{j}_sh", f"p{j}_sr", f"p{j}_sc"]
        for k in range(len(self.states)):
            args += [f"hinit{k}", f"hseq{k}"] + ([f"dhseq{k}"] if backward else [])
        if backward:
            args += [f"dl{i}" for i in range(len(self.leaves))] + [f"dp{j}" for j in range(len(self.params_all()))]
        return args + ["B", "X", "Y", "NH"]

    def constexprs(self, backward: bool, acc) -> dict:
        out = {"ACC": acc, "BLOCK_B": self.gpu_rows}
        if backward:
            out["HAS_DSEQ"] = True
        return out

    # ------------------------------------------------------------------ the kernels
    def _diagonal(self, d: str) -> list[str]:
        """The lines opening the loop over a diagonal's cells in chunks of BLOCK_B (8 spaces
        in: the chunk loop's body is indented by 12)."""
        return [f"        lo = tl.maximum({d} - Y + 1, 0)  # the first x on the diagonal",
                f"        hi = tl.minimum({d}, X - 1)  # the last",
                # not software-pipelined: a prefetch of the next chunk's neighbour loads would not matter,
                # but one across diagonals would read states before they are written
                "        for c0 in tl.range(lo, hi + 1, BLOCK_B, num_stages=1):",
                "            cx = (c0 + cells).to(tl.int64)",
                f"            cy = {d} - cx",
                "            act = cx <= hi  # the rows that are cells of the diagonal"]

    def _zero_line(self, d: str) -> str:
        """Streamed weights: a zero the compiler cannot prove, so the K-tiles' addresses are
        computed per diagonal (SeqKernel._zero's reason)."""
        return f"zero = {d} // (X + Y)  # 0"

    @staticmethod
    def _indent(lines: list[str]) -> list[str]:
        """SeqKernel's step lines (8 spaces: its time loop) inside the chunk loop (12)."""
        return ["    " + x for x in lines]

    def forward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_fwd({', '.join(self.arg_names(False))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr):",
             f"    # {', '.join(self.states)} over the grid: one program per batch row walks the anti-diagonals; "
             + ("weights streamed from global memory" if self.streamed else "weights held in registers")]
        self._chunked, self._split_note, self._pin = {}, {}, " + zero" if self.streamed else ""
        at = self._setup(L)
        L += ["    for d in tl.range(0, X + Y - 1, num_stages=1):"] + self._diagonal("d")
        body: list[str] = [self._zero_line("d")] if self.streamed else []
        body = ["        " + x for x in body]
        self._leaf_loads(body, "d")
        self._step(body)
        for k, s in enumerate(self.states):
            new = self.ir.updates[s]
            ptr, mask = self._state_ptr(k, f"hseq{k}", "cell")
            body.append(f"        tl.store({ptr}, {self._as_tile(new, k)}, mask={mask})")
        L += self._indent(body)
        L.append("        tl.debug_barrier()  # diagonal d is in memory before d + 1 reads it")
        return "\n".join(self._with_lanes(L, at)) + "\n"

    def _as_tile(self, new: Node, k: int) -> str:
        """The new state's value at the state's full tile (a leaf or a scalar broadcast)."""
        st = self.ir.states[self.states[k]]
        name = self.vname(new, self._norm(new, self._full(new)))
        return f"{name} + tl.zeros([{self._tile_text(st, self._full(st))}], dtype=ACC)"

    def backward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_bwd({', '.join(self.arg_names(True))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr, HAS_DSEQ: tl.constexpr):",
             f"    # adjoint of {', '.join(self.states)} over the grid: the reverse sweep over the anti-diagonals "
             "(states saved, the step recomputed)"]
        self._chunked, self._split_note, self._pin = {}, {}, ""   # as SeqKernel.backward (see its _zero)
        whole = self.ktile
        self.ktile = {k: min(rows, STREAMED_BACKWARD_KTILE) for k, rows in whole.items()}   # (see STREAMED_ROWS)
        try:
            return self._backward(L)
        finally:
            self.ktile = whole

    def _backward(self, L: list[str]) -> str:
        reads: set = set()
        adjoint = self._adjoint(reads)
        need = self._needed(reads)
        at = self._setup(L, need)
        for p in self.params:
            for w in self.param_wins[p.id]:
                L.append(f"    acc_{self.vname(p, w)} = tl.zeros([{self._tile_text(p, w).replace('BLOCK_B', '1')}], "
                         "dtype=ACC)")
        for ti, t in enumerate(self.tiles if not self.streamed else []):
            L.append(f"    dw{ti} = tl.zeros([{_pow2(t.K)}, {t.win.width}], dtype=ACC)")
        L += ["    for r in tl.range(0, X + Y - 1, num_stages=1):",
              "        d = X + Y - 2 - r"] + self._diagonal("d")
        body: list[str] = [self._zero_line("d")] if self.streamed else []
        body = ["        " + x for x in body]
        body += self._gathered_adjoints()
        self._leaf_loads(body, "d", need)
        self._step(body, need)
        body += adjoint
        if self.streamed:   # this chunk's weight gradients are in memory before the next chunk adds to them
            body.append("        tl.debug_barrier()")
        L += self._indent(body)
        L.append("        tl.debug_barrier()  # diagonal d's adjoints are in memory before d - 1 reads them")
        for j, p in enumerate(self.params):   # param partials: [B, NH, *shape], this program's slice
            for w in self.param_wins[p.id]:
                lanes = self.valid(p, w)
                L.append(f"    tl.store(dp{j} + (pid * NH + hd) * {self._count(p)} + {self._elements(p, w)}, "
                         f"acc_{self.vname(p, w)}" + (f", mask={lanes})" if lanes else ")"))
        for ti, t in enumerate(self.tiles if not self.streamed else []):
            L.append(f"    tl.store({self._grad_ptr(ti)}, dw{ti}, mask={t.mask()})")
        return "\n".join(self._with_lanes(L, at)) + "\n"

    def _gathered_adjoints(self) -> list[str]:
        """lam{k}: the adjoint of the cells' new state k from the cells that read it at
        diagonal d+1: the right neighbour's `.left` read and the lower neighbour's `.up`."""
        L = []
        for k, s in enumerate(self.states):
            st = self.ir.states[s]
            w = self._full(st)
            rows, idx, lanes = self._rows_of(st), self._elements(st, w), self.valid(st, w)
            lanes = f" & {lanes}" if lanes else ""
            terms = []
            for i, x in self.reads:
                if x.arg[0] != s:
                    continue
                right, below = ("cx + 1", "cy", "cx + 1 < X"), ("cx", "cy + 1", "cy + 1 < Y")
                nx, ny, inside = right if x.arg[1] == "left" else below   # the cell whose read it was
                terms.append(f"tl.load(dl{i} + ({self._cell(nx, ny)}){rows} * {self._count(x)} + {idx}, "
                             f"mask=(act & ({inside})){rows}{lanes}, other=0.0).to(ACC)")
            zero = f"tl.zeros([{self._tile_text(st, w)}], dtype=ACC)"
            L.append(f"        lam{k} = " + " + ".join([zero] + terms)
                     + f"  # {s}'s adjoint from the cells that read it")
        return L

    def combines(self) -> list[str]:
        return []


def wavefront_why_not(ir: IRCell) -> str | None:
    """Why the wavefront kernel cannot run this grid cell (the registry's check), or None."""
    from recdsl.torch_expr import SourceNotes
    try:
        GridKernel(ir, SourceNotes(ir))
    except NotEligible as e:
        return f"no wavefront kernel: {e}"
    return None


# ---------------------------------------------------------------------- running it
def _cells(v: torch.Tensor, lead: tuple, shape: tuple) -> torch.Tensor:
    """A value per cell (flat [n, (heads,) *shape]; a param-only one broadcast, with fewer
    axes or leading ones) at its full shape lead + shape."""
    v = torch.as_tensor(v)
    full = tuple(lead) + tuple(shape)
    if v.dim() < len(full):
        v = v.reshape((1,) * (len(full) - v.dim()) + tuple(v.shape))
    return v.expand(full)


class _WavefrontFn(torch.autograd.Function):
    """Inputs: the initial states [B, NH, n], the per-cell leaves [B, X, Y, NH, n] (views),
    the params ([NH, *shape] with heads). Output: the state grids [B, X, Y, NH, n]."""

    @staticmethod
    def forward(ctx, prog, dims, K, nleaf, *tensors):
        B, NX, NY, NH, heads = dims
        kern = prog.kernel
        h0, views, params = tensors[:K], tensors[K:K + nleaf], tensors[K + nleaf:]
        dev, dt = h0[0].device, h0[0].dtype
        hseq = [torch.empty((B, NX, NY, NH, kern.slen(k)), dtype=dt, device=dev) for k in range(K)]
        state_args = []
        for h, s in zip(h0, hseq):
            state_args += [h, s]
        prog.fwd(dev)[(B, NH)](*_cell_args(views), *_param_args(params, heads), *state_args, B, NX, NY, NH,
                               ACC=_acc(dt), BLOCK_B=prog.rows(NX, NY, dev), **prog.gpu_opts(dev))
        ctx.prog, ctx.dims, ctx.K, ctx.nleaf = prog, dims, K, nleaf
        ctx.save_for_backward(*h0, *hseq, *views, *params)
        return tuple(hseq)

    @staticmethod
    def backward(ctx, *dseq):
        prog, (B, NX, NY, NH, heads), K, nleaf = ctx.prog, ctx.dims, ctx.K, ctx.nleaf
        kern = prog.kernel
        saved = ctx.saved_tensors
        h0, hseq, views, params = saved[:K], saved[K:2 * K], saved[2 * K:2 * K + nleaf], saved[2 * K + nleaf:]
        if wants_graph([*h0, *views, *params], dseq):   # the kernel's gradients carry no graph: say so
            raise unsupported("the triton wavefront kernel", ", ".join(kern.states),
                              "run the grid cell on the torch backend (autograd through torch ops)")
        dev, dt = h0[0].device, h0[0].dtype
        has_dseq = any(g is not None for g in dseq)
        dseq = [(g if g is not None else torch.zeros_like(s)).contiguous() for g, s in zip(dseq, hseq)]
        # every leaf's gradient per cell, a neighbour read's too (lanes no window reads stay 0)
        dleaf = [torch.zeros((B, NX, NY, NH, kern._count(x)), dtype=dt, device=dev) for x in kern.leaves]
        dpart = [torch.zeros((B, NH) + tuple(p.shape[1:] if heads else p.shape), dtype=dt, device=dev)
                 for p in params]
        state_args = []
        for k in range(K):
            state_args += [h0[k], hseq[k], dseq[k]]
        prog.bwd(dev)[(B, NH)](*_cell_args(views), *_param_args(params, heads), *state_args, *dleaf, *dpart,
                               B, NX, NY, NH, ACC=_acc(dt), BLOCK_B=prog.rows(NX, NY, dev), HAS_DSEQ=has_dseq,
                               **prog.gpu_opts(dev))
        dh0 = [torch.zeros_like(h) for h in h0]
        for i, x in kern.reads:   # the reads that fell off the grid: the initial state's adjoint
            k = kern.states.index(x.arg[0])
            edge = dleaf[i][:, 0] if x.arg[1] == "left" else dleaf[i][:, :, 0]
            dh0[k] = dh0[k] + edge.sum(1)
        dviews = [dleaf[i] for i, _ in kern.cell_leaves]
        dparams = [d.sum(0) if heads else d.sum(0)[0] for d in dpart]
        return (None, None, None, None) + tuple(dh0) + tuple(dviews) + tuple(dparams)


def _acc(dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _cell_args(views) -> list:
    args = []
    for v in views:
        args += [v, v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4)]
    return args


def _param_args(params, heads: bool) -> list:
    from .launch import _param_args as seq_param_args   # the sequential kernels' layout (p, sh, sr, sc)
    return seq_param_args(params, heads)


class GridProgram:
    """A grid cell on the triton backend (kernel triton.wavefront): run_graph(xs, params,
    init, edges, dtype, heads) -> (outputs, states), both [B, X, Y, (heads,) ...], as
    backends/torch/graph.py's GraphProgram (which the runtime calls the same way)."""

    def __init__(self, plan, selection):
        from recdsl.torch_expr import SourceNotes

        from .launch import Kernels
        from .texpr import PREAMBLE
        self.ir: IRCell = plan.ir
        self.selection = selection
        self.kernel = GridKernel(self.ir, SourceNotes(self.ir))   # eligible: the registry asked
        self.kernels = [self.kernel]
        self.fused: list = []
        self.native = False
        self.ran: list[str] = []
        head = (f"# {self.ir.name}: the wavefront kernel of a grid cell (backends/triton/grid_kernels.py)\n"
                "import triton\nimport triton.language as tl\n")
        self.kernels_source = "\n\n".join([head, PREAMBLE, self.kernel.forward(), self.kernel.backward()])
        self.module = Kernels(self.kernels_source, f"recdsl-triton-grid-{self.ir.name}")
        self.source = (f"# {self.ir.name} over grid2d: triton.wavefront (backends/triton/grid_kernels.py), "
                       f"kernels {self.kernel.name}_fwd / _bwd\n"
                       + "".join(f"# stage {c.stage}: {c.summary()}\n" for c in selection.stages))
        ir, kern = self.ir, self.kernel
        self.statics = [n for n in toposort(list(ir.updates.values()) + list(ir.outputs.values()))
                        if n.op in (Op.INPUT, Op.PARAM)]
        self.leaf_fn = compile_nodes([x for _, x in kern.cell_leaves], self.statics) if kern.cell_leaves else None
        # the outputs over the whole grid, from the inputs, the state grid and its left / up shifts
        shifted = [n for n in toposort(list(ir.outputs.values())) if n.op == Op.STATE]
        self.out_leaves = self.statics + shifted + list(ir.updates.values())
        self.out_fn = compile_nodes(list(ir.outputs.values()), self.out_leaves) if ir.outputs else None

    def fwd(self, device):
        return self.module.ns(device)[f"{self.kernel.name}_fwd"]

    def bwd(self, device):
        return self.module.ns(device)[f"{self.kernel.name}_bwd"]

    def rows(self, NX: int, NY: int, device) -> int:
        """Cells per tile: on a GPU the kernel's (16: tl.dot's smallest side), in the
        interpreter the longest diagonal (one chunk per diagonal)."""
        if device.type == "cuda":
            return self.kernel.gpu_rows
        return min(MAX_INTERPRETED_ROWS, _pow2(min(NX, NY)))

    def gpu_opts(self, device) -> dict:
        from .launch import MAXNREG
        return {"maxnreg": MAXNREG, "num_warps": self.kernel.gpu_warps} if device.type == "cuda" else {}

    def run(self, *args, **kw):
        raise RecError(f"a cell over {self.ir.over} runs through forward(...) on grids")

    def run_graph(self, xs: dict, params: dict, init: dict, edges, dtype, heads: int = 0):
        self.ran[:] = [c.kernel.name for c in self.selection.stages]
        ir, kern = self.ir, self.kernel
        first_input = next(iter(xs.values()))
        B, NX, NY = first_input.shape[:3]
        NH = heads or 1
        lead = (B * NX * NY,) + ((heads,) if heads else ())
        batch_axes = len(lead)
        device = first_input.device
        P = {name: p[None] for name, p in params.items()}
        flat = {name: x.reshape(lead + tuple(x.shape[len(lead) + 2:])) for name, x in xs.items()}
        statics = [flat[x.arg] if x.op == Op.INPUT else P[x.arg] for x in self.statics]
        views = []
        if self.leaf_fn is not None:
            for v, (_, x) in zip(self.leaf_fn(statics, batch_axes, dtype, device), kern.cell_leaves):
                v = torch.as_tensor(v, device=device)
                v = v if v.is_floating_point() else v.to(dtype)
                views.append(_cells(v, lead, ir.shape_of(x)).reshape(B, NX, NY, NH, kern._count(x)))
        h0 = [_cells(init[s], (B,) + lead[1:], ir.shape_of(ir.states[s])).to(dtype).reshape(B, NH, kern.slen(k))
              .contiguous() for k, s in enumerate(kern.states)]
        weights = [params[p.arg].to(dtype) for p in kern.params_all()]
        grids = _WavefrontFn.apply(self, (B, NX, NY, NH, bool(heads)), len(h0), len(views), *h0, *views, *weights)
        states = {s: g.reshape((B, NX, NY) + lead[1:] + tuple(ir.shape_of(ir.states[s])))
                  for s, g in zip(kern.states, grids)}
        return self._outputs(flat, P, init, states, lead, dtype, device), states

    def _outputs(self, flat, P, init, states, lead, dtype, device) -> dict:
        """The outputs over the whole grid: a `.left` read is the state grid shifted by one
        cell along x (the initial state in column 0), `.up` along y."""
        if self.out_fn is None:
            return {}
        ir = self.ir
        B, NX, NY = next(iter(states.values())).shape[:3]
        vals = []
        for x in self.out_leaves:
            if x.op == Op.INPUT:
                vals.append(flat[x.arg])
            elif x.op == Op.PARAM:
                vals.append(P[x.arg])
            elif x.op == Op.STATE:
                vals.append(_shifted(states[x.arg[0]], init[x.arg[0]], x.arg[1]).reshape(lead + ir.shape_of(x)))
            else:   # an update: the state grid itself
                s = next(s for s, u in ir.updates.items() if u is x)
                vals.append(states[s].reshape(lead + ir.shape_of(x)))
        got = self.out_fn(vals, len(lead), dtype, device)
        return {o: _cells(v, lead, ir.shape_of(node)).reshape((B, NX, NY) + lead[1:] + tuple(ir.shape_of(node)))
                for (o, node), v in zip(ir.outputs.items(), got)}


def _shifted(grid: torch.Tensor, init: torch.Tensor, where: str) -> torch.Tensor:
    """Every cell's `.left` (where = "left") or `.up` neighbour's state: the grid moved one
    cell along x (or y), the initial state where the neighbour is off the grid."""
    B, NX, NY = grid.shape[:3]
    rest = tuple(grid.shape[3:])
    first = _cells(init, (B,), rest).to(grid.dtype)
    if where == "left":
        return torch.cat([first[:, None, None].expand((B, 1, NY) + rest), grid[:, :-1]], 1)
    return torch.cat([first[:, None, None].expand((B, NX, 1) + rest), grid[:, :, :-1]], 2)
