"""A grid2d cell (LANGUAGE.md §6) as ONE generated C call, forward and backward (torch.c_grid).

general_loop.py writes a sequential stage's step in C; a grid's step is the same step
with two previous states instead of one: `s.left`, the state of cell (x-1, y), and `s.up`,
the state of (x, y-1). Here the cells of each (batch) row run in raster order, t = x*Y + y,
in one C loop: left is row t - Y of the state output, up is row t - 1 (the initial state
off the grid), and the new state is written to row t. Every state of every cell is an
output of a grid layer anyway (the reference's contract), so the forward keeps nothing
else, and the work is O(X*Y) per row with no Python per cell or per diagonal; the batch
rows are split between the threads.

Backward (derived, reverse raster order): at cell t the step's forward values are
recomputed from the saved neighbour states, the incoming adjoint of the cell's new state
(its gradient as an output plus what cells t+1 and t+Y sent back) is propagated through the
step node by node (general_loop's adjoint rules), and the adjoints of `s.left` / `s.up` go
to cells t-Y / t-1, or to the initial state off the grid. The pending adjoints live in a ring
of Y cells per row: cell t's slot (t mod Y) holds what t+Y sent (assigned when t+Y ran) plus
what t+1 sent (added), and is reused for what t sends to t-Y.

What runs here: the step's state-reading part and whatever graph.py keeps in the step
(values larger per cell than the inputs they are made of, as k vᵀ); state-free values it
computes over the whole grid first with torch are read per cell like a sequence's inputs.
Outputs are readouts, computed per cell. Under create_graph=True the backward re-runs the
grid as a per-cell torch loop over the same IR (differentiable)."""
from __future__ import annotations

import ctypes
import threading
from typing import Sequence

import torch

from recdsl.ir import IRCell, Node, Op
from recdsl.torch_expr import compile_nodes

from .fused_loop import NotEligible, as_bool, build_library
from .general_loop import (ALIGN, MAX_SCRATCH, PRELUDE, SYMBOLS, _MATH32, _MATH64, _UNDEF, GeneralLoop, Val,
                           _Gen, _LoopFunction, _dtype, _numel, _pruned, _slots, nest)


# ---------------------------------------------------------------------- output buffers
# Every state of every cell is an output of a grid layer: pLSTM at 64 x 64, B = 4, K = V = 32
# writes 2 x 64 MiB per forward. Blocks that large are mmap'd fresh by malloc on every call
# and first-touching them page by page cost more than the loop itself (measured here: 64 MiB
# in ~40 ms of page faults against ~12 ms of loop per state), and that cost grew faster than
# the grid. So blocks of POOL_FROM bytes or more are recycled: a call takes a block of its
# shape that nothing outside this pool references any more (the caller dropped the previous
# call's outputs, and autograd its saved tensors), else allocates one. The pool holds at
# most POOL_KEEP blocks per shape, POOL_SHAPES shapes and POOL_BYTES in all (the least
# recently used go first); clear_pool() empties it.
POOL_FROM = 16 << 20
POOL_KEEP = 4
POOL_SHAPES = 8
POOL_BYTES = 2 << 30
_POOL: dict = {}
_LOCK = threading.Lock()


def clear_pool() -> None:
    """Forget the recycled output blocks (those still referenced stay their holders')."""
    _POOL.clear()


def _pool_bytes() -> int:
    return sum(b.nbytes for blocks in _POOL.values() for b in blocks)


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:   # a tensor no one else references (the probe's storage object counts); None: no pool
    _ALONE = _use_count(torch.empty(1))
except (AttributeError, RuntimeError):
    _ALONE = None


def buffer(shape, dtype, zero: bool = False) -> torch.Tensor:
    """torch.empty / torch.zeros for a grid's large outputs, from the pool where one is free."""
    shape = tuple(int(d) for d in shape)
    if _ALONE is not None and _numel(shape) * torch.empty((), dtype=dtype).element_size() >= POOL_FROM:
        with _LOCK:   # two threads must not take one free block
            t = _pooled(shape, dtype)
    else:
        t = torch.empty(shape, dtype=dtype)
    return t.zero_() if zero else t


def _pooled(shape: tuple, dtype) -> torch.Tensor:
    """A free block of this shape from the pool, or a new one it keeps (under _LOCK)."""
    key = (shape, dtype)
    blocks = _POOL.pop(key, [])
    _POOL[key] = blocks                      # most recently used last
    t = next((b for b in blocks if _use_count(b) == _ALONE), None)
    if t is None:
        t = torch.empty(shape, dtype=dtype)
        blocks.append(t)
        if len(blocks) > POOL_KEEP:
            blocks.pop(0)
        while len(_POOL) > POOL_SHAPES or (len(_POOL) > 1 and _pool_bytes() > POOL_BYTES):
            _POOL.pop(next(iter(_POOL)))
        while len(blocks) > 1 and _pool_bytes() > POOL_BYTES:
            blocks.pop(0)
    return t.view(shape)                     # a new tensor on the block: the pool sees it in use


class _GridGen(_Gen):
    """general_loop's generator with neighbour states: `s.left` is read from `sl{k}` and
    `s.up` from `su{k}`; their adjoints are `gl{k}` / `gu{k}`."""

    def leaf(self, n: Node) -> None:
        if n.op == Op.STATE and n.arg[0] in self.states:
            name, where = n.arg
            if where not in ("left", "up"):
                raise NotEligible(f"over grid2d a state is read as {name}.left or {name}.up")
            k = self.states.index(name)
            tag = "l" if where == "left" else "u"
            shape = self.shape(n)
            self.val[n.id] = Val.array(f"s{tag}{k}", shape)
            self.adj[n.id] = Val.array(f"g{tag}{k}", shape)
            self.state_leaves.append(n)
            return
        if n.op == Op.STATE:
            raise NotEligible(f"state {n.arg[0]} is not one of the grid's states")
        super().leaf(n)

    def source(self) -> tuple[str, dict]:
        back = self.backward()
        ns = len(self.states)
        self.sizes = [_numel(s) for s in self.state_shapes]
        self.seq_sizes = [_numel(self.shape(n)) for n in self.seqs]
        self.par_sizes = [_numel(self.shape(n)) for n in self.params]
        self.ro_sizes = [_numel(self.shape(n)) for n in self.readouts]
        ws = list(self.fwd_arrays)
        adj = list(self.adj_arrays) + [(f"g{t}{k}", self.sizes[k]) for t in "lu" for k in range(ns)]
        self.offs, total = {}, 0
        for name, size in ws + adj:
            self.offs[name] = total
            total += -(-max(size, 1) // ALIGN) * ALIGN
        self.adj_lo, self.total = self.offs[adj[0][0]], total
        if total > MAX_SCRATCH:
            raise NotEligible(f"the step's values need {total} elements of scratch per thread")
        nq, np_, nr = len(self.seqs), len(self.params), len(self.readouts)
        common = [("seq", nq), ("pp", np_), ("pt", np_), ("s0", ns)]
        self.fp = _slots(common + [("out", ns), ("ro", nr)])
        self.bp = _slots(common + [("saved", ns), ("gq", ns), ("gr", nr), ("gin", nq), ("gpar", np_), ("gs0", ns),
                                   ("ring", ns)])
        self.ss = _slots([("seq", 3 * nq), ("pp", np_)])
        text = self._forward_fn() + "\n\n" + self._backward_fn(back) + "\n"
        layout = {"ws": total, "sizes": self.sizes, "par_sizes": self.par_sizes}
        return PRELUDE + _MATH32 + _dtype(text, "f32", "float") + _UNDEF + _MATH64 + _dtype(text, "f64", "double"), \
            layout

    @staticmethod
    def _at(slot: int, size: int, t: str) -> str:
        """Row (b, t) of a contiguous [B, T, 1, size] tensor."""
        return f"(T_*)P[{slot}] + (b * T + {t}) * {size}"

    def _neighbours(self, slot: str, P: dict) -> list[str]:
        out = ["      const int64_t gx = t / NY, gy = t - gx * NY;"]
        for k, size in enumerate(self.sizes):
            s0 = f"(const T_*)P[{P['s0'] + k}] + r * {size}"
            out += [f"      const T_* restrict sl{k} = gx > 0 ? (const T_*){self._at(P[slot] + k, size, 't - NY')}"
                    f" : {s0};",
                    f"      const T_* restrict su{k} = gy > 0 ? (const T_*){self._at(P[slot] + k, size, 't - 1')}"
                    f" : {s0};"]
        return out

    def _forward_fn(self) -> str:
        ir, ns, fp = self.ir, len(self.states), self.fp

        def store(k):
            shape, u = self.state_shapes[k], ir.updates[self.states[k]]
            ou, new = Val.array(f"ou{k}", shape), self.val[u.id].lift(shape)
            return [f"      T_* restrict ou{k} = {self._at(fp['out'] + k, self.sizes[k], 't')};",
                    "      " + nest(shape, lambda i: f"{ou.at(i)} = {new.at(i)};") + self.note(u)]

        def readout(k):
            n = self.readouts[k]
            shape, ro = self.shape(n), Val.array(f"ro{k}", self.shape(n))
            value = self.val[n.id].lift(shape)
            return [f"      T_* restrict ro{k} = {self._at(fp['ro'] + k, self.ro_sizes[k], 't')};",
                    "      " + nest(shape, lambda i: f"{ro.at(i)} = {value.at(i)};") + self.note(n)]

        return _pruned(
            ["void loop_SFX(void* const* P, const int64_t* S, T_* ws, int64_t wsz, int64_t T, int64_t B, "
             "int64_t NH, int64_t nthreads, int64_t NY) {"]
            + self._row_setup()
            + ["    " + line for line in self.init]
            + ["    for (int64_t t = 0; t < T; t++) {"]
            + self._neighbours("out", fp)
            + self._step_inputs() + ["      " + line for line in self.fwd]
            + [line for k in range(len(self.readouts)) for line in readout(k)]
            + [line for k in range(ns) for line in store(k)]
            + ["    }", "  }", "}"])

    def _backward_fn(self, back: list[str]) -> str:
        ir, ns, bp, sizes = self.ir, len(self.states), self.bp, self.sizes

        def route(k):
            n = sizes[k]
            return [f"      if (gx > 0) memcpy(cr{k}, gl{k}, {n} * sizeof(T_));",
                    f"      else for (int64_t i = 0; i < {n}; i++) g0{k}[i] += gl{k}[i];",
                    f"      {{ T_* dst = gy > 0 ? rg{k} + (gy - 1) * {n} : g0{k};",
                    f"        for (int64_t i = 0; i < {n}; i++) dst[i] += gu{k}[i]; }}"]

        return _pruned(
            ["void back_SFX(void* const* P, const int64_t* S, T_* ws, int64_t wsz, int64_t T, int64_t B, "
             "int64_t NH, int64_t nthreads, int64_t NY) {"]
            + self._row_setup() + self._decls([(f"g{t}{k}", 0) for t in "lu" for k in range(ns)])
            + self._decls(self.adj_arrays)
            + [f"    T_* restrict gp{k} = (T_*)P[{bp['gpar'] + k}] + r * {self.par_sizes[k]};"
               for k in range(len(self.params))]
            + [f"    T_* rg{k} = (T_*)P[{bp['ring'] + k}] + r * NY * {sizes[k]};" for k in range(ns)]
            + [f"    T_* g0{k} = (T_*)P[{bp['gs0'] + k}] + r * {sizes[k]};" for k in range(ns)]
            + ["    " + line for line in self.init]
            + ["    for (int64_t t = T - 1; t >= 0; t--) {"]
            + self._neighbours("saved", bp)
            + self._step_inputs()
            + [f"      T_* restrict gi{k} = {self._at(bp['gin'] + k, self.seq_sizes[k], 't')};"
               for k in range(len(self.seqs))]
            + [f"      const T_* gq{k} = P[{bp['gq'] + k}] ? {self._at(bp['gq'] + k, sizes[k], 't')} : 0;"
               for k in range(ns)]
            + [f"      const T_* gr{k} = P[{bp['gr'] + k}] ? {self._at(bp['gr'] + k, self.ro_sizes[k], 't')} : 0;"
               for k in range(len(self.readouts))]
            + ["      " + line for line in self.fwd]
            + [f"      memset(w + {self.adj_lo}, 0, {self.total - self.adj_lo} * sizeof(T_));"]
            + [f"      T_* cr{k} = rg{k} + gy * {sizes[k]};" for k in range(ns)]
            + [line for k, s in enumerate(self.states) for line in self._seed(ir.updates[s], self.state_shapes[k],
                                                                               f"gq{k}", f"cr{k}")]
            + [line for k, n in enumerate(self.readouts) for line in self._seed(n, self.shape(n), f"gr{k}", None)]
            + ["      " + line for line in back]
            + [line for k in range(ns) for line in route(k)]
            + ["    }", "  }", "}"])


class GridLoop(GeneralLoop):
    """The runner of a grid cell's C loop: run(seq_values, params, init, B, X, Y, dtype)."""

    def __init__(self, ir: IRCell, states: list[str], core: list[Node], readouts: Sequence[Node] = ()):
        gen = _GridGen(ir, list(states), list(core), readouts)
        self.ir = ir
        self.states = list(states)
        self.readouts = list(readouts)
        self.params = gen.params
        self.seqs = gen.seqs
        self.state_leaves = gen.state_leaves
        self.transposed = gen.transposed_params
        self.shapes = gen.state_shapes
        self.source, self.layout = gen.source()
        self.keep = set(states)
        self._torch_step = None
        self._require_toolchain()

    def build(self) -> ctypes.CDLL:
        return build_library(self.source, "grid", SYMBOLS)

    def run(self, seq_values: list, P0: dict, S0: dict, B: int, NX: int, NY: int, dtype):
        """seq_values: per-cell values of self.seqs, [B, X*Y, *shape] (size-1 axes broadcast).
        Returns ({state: [B, X, Y, *shape]}, [readout i: [B, X, Y, *shape]])."""
        seqs = [self._prep_seq(x, n, 2, dtype) for x, n in zip(seq_values, self.seqs)]
        params = [P0[n.arg].to(dtype).contiguous() for n in self.params]
        s0 = [self._prep_state(S0[s], k, B, 1, False, dtype) for k, s in enumerate(self.states)]
        tensors = seqs + params + s0
        meta = (B, NX, NY, dtype)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outs = _LoopFunction.apply(self, meta, *tensors)
        else:
            outs = self._forward(seqs, params, s0, meta)
        grid = lambda o: o.reshape((B, NX, NY) + o.shape[3:])  # noqa: E731
        ns = len(self.states)
        return {s: grid(o) for s, o in zip(self.states, outs[:ns])}, [grid(o) for o in outs[ns:]]

    def _call(self, name, dtype, ptrs, strides, meta):
        B, NX, NY, _ = meta
        nthreads = max(1, min(torch.get_num_threads(), B))
        ws = torch.empty((nthreads, self.layout["ws"]), dtype=dtype)
        P = (ctypes.c_void_p * len(ptrs))(*[None if p is None else p.data_ptr() for p in ptrs])
        S = (ctypes.c_int64 * max(1, len(strides)))(*strides)
        c = ctypes.c_int64
        self._fn(name, dtype)(P, S, ctypes.c_void_p(ws.data_ptr()), c(self.layout["ws"]), c(NX * NY), c(B), c(1),
                              c(nthreads), c(NY))

    def _forward(self, seqs, params, s0, meta):
        B, NX, NY, dtype = meta
        T = NX * NY
        outs = [buffer((B, T, 1) + shape, dtype) for shape in self.shapes]
        reads = [buffer((B, T, 1) + self.ir.shape_of(n), dtype) for n in self.readouts]
        ptrs = seqs + params + self._params_t(params) + s0 + outs + reads
        self._call("loop", dtype, ptrs, self._strides(seqs, params), meta)
        return tuple(outs + reads)

    def _autograd_forward(self, seqs, params, s0, meta):
        outs = self._forward(seqs, params, s0, meta)
        return outs, outs[:len(self.states)]

    def _backward(self, seqs, params, s0, outs, g_states, g_reads, meta):
        B, NX, NY, dtype = meta
        T = NX * NY
        cont = lambda gs: [None if g is None else g.to(dtype).contiguous() for g in gs]  # noqa: E731
        gin = [buffer((B, T, 1) + tuple(x.shape[3:]), dtype, zero=True) for x in seqs]
        gpar = [torch.zeros((B, n), dtype=dtype) for n in self.layout["par_sizes"]]
        gs0 = [torch.zeros((B,) + shape, dtype=dtype) for shape in self.shapes]
        ring = [buffer((B, NY, n), dtype, zero=True) for n in self.layout["sizes"]]
        ptrs = seqs + params + self._params_t(params) + s0 + list(outs) + cont(g_states) + cont(g_reads) \
            + gin + gpar + gs0 + ring
        self._call("back", dtype, ptrs, self._strides(seqs, params), meta)
        g_seqs = [g.sum_to_size(x.shape) for g, x in zip(gin, seqs)]
        g_params = [g.sum(0).view(p.shape) for g, p in zip(gpar, params)]
        return g_seqs, g_params, [g.view(x.shape) for g, x in zip(gs0, s0)]

    def _torch_loop(self, tensors, meta):
        """The same grid as a per-cell torch loop over the IR (what create_graph=True
        differentiates); the outputs of _LoopFunction."""
        B, NX, NY, dtype = meta
        nq, np_ = len(self.seqs), len(self.params)
        seqs, params, s0 = tensors[:nq], tensors[nq:nq + np_], tensors[nq + np_:]
        if self._torch_step is None:
            roots = [self.ir.updates[s] for s in self.states] + self.readouts
            self._torch_step = compile_nodes(roots, self.state_leaves + self.params + self.seqs)
        P = [p[None] for p in params]
        shapes = self.shapes + [self.ir.shape_of(n) for n in self.readouts]
        ns = len(self.states)
        done: list[list] = []
        for t in range(NX * NY):
            x, y = divmod(t, NY)
            prev = []
            for n in self.state_leaves:
                k = self.states.index(n.arg[0])
                if n.arg[1] == "left":
                    prev.append(done[t - NY][k] if x > 0 else s0[k][:, 0])
                else:
                    prev.append(done[t - 1][k] if y > 0 else s0[k][:, 0])
            xs = [v[:, t if v.shape[1] > 1 else 0, 0] for v in seqs]
            new = self._torch_step(prev + as_bool(P, self.params) + as_bool(xs, self.seqs), 1, dtype, s0[0].device)
            done.append([torch.as_tensor(v, dtype=dtype).expand((B,) + shape) for v, shape in zip(new, shapes)])
        return tuple(torch.stack([c[i] for c in done], 1)[:, :, None] for i in range(ns + len(self.readouts)))
