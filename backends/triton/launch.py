"""What the triton backend's generated forward calls: launches of the generated kernels,
wrapped in `torch.autograd.Function`s whose backward launches the derived backward kernel.

Tensors arrive as the torch backend's whole-sequence values ([B, T, (heads,) *shape],
size-1 axes where a value does not vary); each leaf is expanded (a view, stride 0 where it
broadcasts) to the stage's [B, T, channels] and read in place by its strides. Gradients
come back per element of that view; autograd's expand backward sums them to the leaf's
own shape. Under create_graph=True (a second derivative) a Function's backward is instead
autograd's derivative of the stage's torch twin (twin.py, double_backward.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch.double_backward import recompute_vjp, wants_graph
from ..torch.seq_rt import lift
from .fusion import pow2
from .twin import scan_twin, seq_twin


class Kernels:
    """A generated module's kernels, built on first use per kind: interpreted (CPU tensors,
    Triton's interpreter) or compiled (CUDA tensors). See jit.py for why both can live in
    one process."""

    def __init__(self, source: str, tag: str):
        self.source, self.tag = source, tag
        self._ns: dict[bool, dict] = {}

    def ns(self, device) -> dict:
        interpret = device.type != "cuda"
        if interpret not in self._ns:
            from .jit import module_from_source
            self._ns[interpret] = module_from_source(self.source, self.tag, interpret)
        return self._ns[interpret]


def launcher(ns: dict, device, options):
    """kernel name, grid -> the launch of a kernel of a fixed set (chunk, delta, DPLR,
    semiring kernels), with options(name) (num_warps, num_stages) on a GPU; the
    interpreter takes none."""
    def launch(name, grid):
        kernel = ns[name][grid]
        if device.type != "cuda":
            return kernel
        chosen = options(name)
        return lambda *args, **kw: kernel(*args, **chosen, **kw)
    return launch


RECORD: list | None = None   # set to a list to record (kernel, minimum bytes) per forward launch


def distinct_bytes(x: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view addresses."""
    n = 1
    for size, stride in zip(x.shape, x.stride()):
        if stride != 0:
            n *= size
    return n * x.element_size()


def _record(name: str, reads: list, writes: list):
    if RECORD is not None:
        RECORD.append((name, sum(distinct_bytes(x) for x in reads) + sum(distinct_bytes(x) for x in writes)))




class Blocks:
    """Tile sizes: a planner choice. On a GPU (4 warps, MAXNREG) 32 steps x 32 channels
    forward and 16 x 32 backward; half that for block scans: no spills on sm_80/sm_90 for
    the stdlib (tests/triton compile every kernel). MAXNREG: without it ptxas caps some of
    these kernels at 80 or 128 registers and spills a few bytes. In the interpreter,
    where each tile op is one numpy call, longer chunks cost less."""
    @staticmethod
    def gpu(k: int, backward: bool) -> tuple[int, int]:
        if k > 1:   # k x k blocks: k^2 + k tiles per scan element
            return (8, 32) if backward else (16, 32)
        return (16, 32) if backward else (32, 32)   # the adjoint keeps ~2x the tiles live

    @staticmethod
    def scan(C: int, T: int, device, backward: bool = False, k: int = 1) -> tuple[int, int]:
        if device.type == "cuda":
            return Blocks.gpu(k, backward)
        return min(64, pow2(T)), min(64, pow2(C))


MAXNREG = 255


def _gpu_opts(device) -> dict:
    return {"maxnreg": MAXNREG} if device.type == "cuda" else {}


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def channels3(chan: tuple) -> tuple[int, int, int]:
    """The channel axes (heads, *state shape) as the kernels' three C0 x C1 x C2: padded with
    ones in front, the last two merged while there are more than three."""
    chan = tuple(chan)
    while len(chan) > 3:
        chan = chan[:-2] + (chan[-2] * chan[-1],)
    return (1,) * (3 - len(chan)) + chan


_NO_CU: dict = {}   # device -> the dummy `cu` (never read: VARLEN is off), allocated once


def _cu_arg(cu, device):
    """cu_seqlens as the kernels' `cu` pointer (a dummy when there is none)."""
    if cu is not None:
        return cu
    if device not in _NO_CU:
        _NO_CU[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _NO_CU[device]


def _leaf_args(leaves):
    args = []
    for x in leaves:
        args += [x, x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)]
    return args


class Stage:
    """Runtime handle of one generated stage (ScanKernel or SeqKernel): its kernels."""

    def __init__(self, kernel, module: Kernels):
        self.name, self.kernel, self.module = kernel.name, kernel, module

    def fwd(self, device):
        return self.module.ns(device)[f"{self.name}_fwd"]

    def bwd(self, device):
        return self.module.ns(device)[f"{self.name}_bwd"]


def _full_view(x, ns: int, rank: int, B: int, T: int, chan: tuple, c3: tuple, dt):
    """A whole-sequence value as a [B, T, *c3] view of `chan` (broadcast by strides; merged
    axes copy only when the strides do not allow a view)."""
    if not torch.is_tensor(x):
        x = torch.tensor(float(x), dtype=dt)
    if x.dtype == torch.bool:
        x = x.to(dt)
    x = lift(x, x.dim() - ns, rank) if x.dim() - ns < rank else x
    while x.dim() < 2 + len(chan):
        x = x[None]
    return x.expand((B, T) + chan).reshape((B, T) + c3)


def scan(stage: Stage, leaves: list, rleaves: list, h0s: list, first_input: torch.Tensor, ns: int, shape: tuple,
         store: bool = True, rev: bool = False, cu=None):
    """Run one scan stage: ([state sequences], [final states], [epilogue outputs],
    [readout-granularity outputs]). The state sequences are written only if `store` (the
    driver reads them) or a gradient will need them. `rev`: right to left; `cu`
    (cu_seqlens, int32): sequences packed along T of a batch of one, one initial and final
    state each -- both handled by the kernels' indexing, no copies."""
    B, T = first_input.shape[:2]
    chan = tuple(first_input.shape[2:ns]) + tuple(shape)
    c3 = channels3(chan)
    dt = h0s[0].dtype
    full = [_full_view(x, ns, len(shape), B, T, chan, c3, dt) for x in leaves]
    spec = stage.kernel.spec
    rchan = chan[:-1] if spec.rax == 2 else chan[:-2] + chan[-1:]   # the readouts reduce chan[-1] or chan[-2]
    rview = (c3[0], c3[1], 1) if spec.rax == 2 else (c3[0], 1, c3[2])
    red = [_full_view(x, ns, len(shape) - 1, B, T, rchan, rview, dt) for x in rleaves]
    NB = B if cu is None else cu.numel() - 1   # initial states: one per batch row, or per sequence
    h0 = torch.stack([h.to(dt).expand((NB,) + chan).reshape(NB, -1) for h in h0s], -1)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [h0, *full, *red])
    stored = bool(store or grad)
    res = _ScanFn.apply(stage, c3, stored, len(full), (bool(rev), cu, B, T), h0, *full, *red)
    seq, fin, outs = res[0], res[1], res[2:]
    k, n_out = spec.k, len(spec.outputs)
    seqs = [seq[..., i].reshape((B, T) + chan) if stored else None for i in range(k)]
    fins = [fin[..., i].reshape((NB,) + chan) for i in range(k)]
    return (seqs, fins, [o.reshape((B, T) + chan) for o in outs[:n_out]],
            [o.reshape((B, T) + rchan) for o in outs[n_out:]])


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, c3, store, nleaf, run, h0_in, *leaves):
        rev, cu, B, T = run
        NB, C, k = h0_in.shape
        _, C1, C2 = c3
        spec = stage.kernel.spec
        dev, dt = h0_in.device, h0_in.dtype
        h0 = h0_in.contiguous()
        hseq = torch.empty((B, T, C, k) if store else (1, 1, 1, k), dtype=dt, device=dev)
        hfin = torch.empty((NB, C, k), dtype=dt, device=dev)
        Cr = _red(spec, C1, C2)
        outs = [torch.empty((B, T, C), dtype=dt, device=dev) for _ in spec.outputs] + \
            [torch.empty((B, T, C // Cr), dtype=dt, device=dev) for _ in spec.reduced]
        grid, const = _scan_grid(stage, NB, T, C, Cr, dev, False, rev, cu)
        _record(stage.name + "_fwd", [h0, *leaves], ([hseq] if store else []) + [hfin, *outs])
        stage.fwd(dev)[grid](*_leaf_args(leaves), h0, hseq, hfin, *outs, T, C, C1, C2, const.pop("cu"),
                             ACC=_acc(dt), STORE_SEQ=store, **const, **_gpu_opts(dev))
        ctx.stage, ctx.dims, ctx.nleaf, ctx.run = stage, (B, T, C, C1, C2), nleaf, run
        ctx.c3, ctx.store = c3, store
        ctx.save_for_backward(h0_in, hseq, *leaves)   # the input itself: a second derivative reaches its history
        return (hseq, hfin, *outs)

    @staticmethod
    def backward(ctx, dhseq, dhfin, *douts):
        stage = ctx.stage
        B, T, C, C1, C2 = ctx.dims
        h0, hseq, *leaves = ctx.saved_tensors
        full, red = leaves[:ctx.nleaf], leaves[ctx.nleaf:]
        if wants_graph([h0, *leaves], [dhseq, dhfin, *douts]):
            # create_graph=True: the derived backward kernel returns numbers, not a graph; the
            # stage's torch twin (same IR, torch ops) gives autograd's derivative instead
            twin = scan_twin(stage.kernel)
            fn = lambda h, *ls: twin(h, ls[:ctx.nleaf], ls[ctx.nleaf:], ctx.c3, ctx.store, ctx.run)  # noqa: E731
            return (None,) * 5 + tuple(recompute_vjp(fn, [h0, *leaves], ctx.needs_input_grad[5:],
                                                     [dhseq, dhfin, *douts]))
        h0 = h0.contiguous()
        dev, dt = h0.device, h0.dtype
        grads = [torch.empty((B, T, C), dtype=dt, device=dev) for _ in full]
        Cr = _red(stage.kernel.spec, C1, C2)
        rgrads = [torch.empty((B, T, C // Cr), dtype=dt, device=dev) for _ in red]
        dh0 = torch.empty_like(h0)
        has_dseq = dhseq is not None
        dhseq = dhseq.contiguous() if has_dseq else hseq
        dhfin = dhfin.contiguous() if dhfin is not None else torch.zeros_like(h0)
        n_out = len(stage.kernel.spec.outputs)
        douts = [(g.contiguous() if g is not None else
                  torch.zeros((B, T, C) if i < n_out else (B, T, C // Cr), dtype=dt, device=dev))
                 for i, g in enumerate(douts)]
        rev, cu, _, _ = ctx.run
        grid, const = _scan_grid(stage, h0.shape[0], T, C, Cr, dev, True, rev, cu)
        stage.bwd(dev)[grid](*_leaf_args(leaves), *grads, *rgrads, h0, hseq, dhseq, dhfin, dh0, *douts,
                             T, C, C1, C2, const.pop("cu"), ACC=_acc(dt), HAS_DSEQ=has_dseq, **const, **_gpu_opts(dev))
        return (None, None, None, None, None, dh0) + tuple(g.view(x.shape) for g, x in zip(grads + rgrads, leaves))


def _red(spec, C1: int, C2: int) -> int:
    """The size of the axis the readouts reduce."""
    return C2 if spec.rax == 2 else C1


def _scan_grid(stage, NB, T, C, Cr, device, backward, rev, cu):
    """(grid, launch options): programs over (channel blocks, batch rows or sequences)."""
    kern = stage.kernel
    BT, BC = Blocks.scan(C, T, device, backward=backward, k=kern.spec.k)
    opts = {"BLOCK_T": BT, "BLOCK_C": BC, "VARLEN": cu is not None, "REVERSE": rev, "cu": _cu_arg(cu, device)}
    if kern.readout_mode:   # whole rows of the readout axis per program
        NP = kern.np
        opts["BLOCK_C"] = BC = max(BC, NP)
        opts["NP"] = NP
        return (triton.cdiv(C // Cr, BC // NP), NB), opts
    return (triton.cdiv(C, BC), NB), opts


# --------------------------------------------------------------------------- sequential stages

def seq(stage: Stage, leaves: list, h0s: list, P0: dict, first_input: torch.Tensor, ns: int, rev: bool = False, cu=None,
        store=None):
    """Run one sequential stage: ([state sequences], [final states]); `rev` and `cu`
    (cu_seqlens) as for scan(); store[k]: the driver reads state k's sequence (else it is
    written only when a gradient needs it; None: all)."""
    kern = stage.kernel
    B, T = first_input.shape[:2]
    NB = B if cu is None else cu.numel() - 1
    NH = first_input.shape[2] if ns == 3 else 1
    dt = h0s[0].dtype
    views = []
    for x, node in zip(leaves, kern.leaves):   # -> [B, T, NH, n] (a matrix's elements row-major)
        shape = tuple(kern.ir.shape_of(node))
        if x.dtype == torch.bool:
            x = x.to(dt)
        if ns == 2:
            x = x[:, :, None]
        x = x.expand((B, T, NH) + shape)
        views.append(x.reshape(B, T, NH, -1) if len(shape) != 1 else x)
    params = [P0[p.arg] for p in kern.params_all()]
    h0 = [h.to(dt).expand((NB,) + ((NH,) if ns == 3 else ()) + tuple(kern.ir.shape_of(kern.ir.states[s])))
          .reshape(NB, NH, kern.slen(k)).contiguous() for k, (h, s) in enumerate(zip(h0s, kern.states))]
    TL = T if cu is None else int((cu[1:] - cu[:-1]).max())
    run = (bool(rev), _cu_arg(cu, first_input.device), TL, cu is not None)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*h0, *views, *params])
    stores = tuple(True for _ in h0) if store is None or grad else tuple(bool(x) for x in store)
    outs = _SeqFn.apply(stage, (B, T, NH, ns == 3, stores), len(h0), len(views), run, *h0, *views, *params)
    K = len(h0)
    seqs, fins = outs[:K], outs[K:]
    shape = lambda k: ((NH,) if ns == 3 else ()) + tuple(kern.ir.shape_of(kern.ir.states[kern.states[k]]))  # noqa
    return ([s.reshape((B, T) + shape(k)) if stores[k] else None for k, s in enumerate(seqs)],
            [f.reshape((NB,) + shape(k)) for k, f in enumerate(fins)])


def _param_args(params, heads: bool):
    args = []
    for p in params:
        sh = p.stride(0) if heads else 0
        dims = p.shape[1:] if heads else p.shape
        st = p.stride()[1:] if heads else p.stride()
        sr = st[0] if len(dims) >= 1 else 0
        sc = st[1] if len(dims) >= 2 else 0
        args += [p, sh, sr, sc]
    return args


def _seq_leaf_args(views):
    args = []
    for x in views:
        args += [x, x.stride(0), x.stride(1), x.stride(2), x.stride(3)]
    return args


def _seq_gpu_opts(device, stage) -> dict:
    """A sequential kernel holding large matrix tiles runs 8 warps (SeqKernel.gpu_warps)."""
    return {**_gpu_opts(device), "num_warps": stage.kernel.gpu_warps} if device.type == "cuda" else {}


def _split_programs(kernel) -> int:
    """Programs per block of batch rows and head: one per block of a matrix state's columns
    (rows) when it is split across programs (SeqKernel.split), else one."""
    return getattr(kernel, "programs_per_rows", 1)


def _block_b(B: int, device, kernel) -> int:
    if device.type == "cuda":
        return kernel.gpu_rows   # 16 (tl.dot's smallest tile); fewer when the step holds matrices
    return min(64, pow2(B))


class _SeqFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, dims, K, nleaf, run, *tensors):
        B, T, NH, heads, stores = dims
        rev, cu, TL, varlen = run
        h0, views, params = tensors[:K], tensors[K:K + nleaf], tensors[K + nleaf:]
        dev, dt = h0[0].device, h0[0].dtype
        hseq = [torch.empty((B, T, NH, h.shape[-1]) if st else (1, 1, 1, 1), dtype=dt, device=dev)
                for h, st in zip(h0, stores)]
        NB = h0[0].shape[0]
        hfin = [torch.empty_like(h) for h in h0]
        state_args = []
        for h, s, f in zip(h0, hseq, hfin):
            state_args += [h, s, f]
        BB = _block_b(NB, dev, stage.kernel)
        grid = (triton.cdiv(NB, BB) * _split_programs(stage.kernel), NH)
        _record(stage.name + "_fwd", [*h0, *views, *params], [*(s for s, st in zip(hseq, stores) if st), *hfin])
        stage.fwd(dev)[grid](*_seq_leaf_args(views), *_param_args(params, heads), *state_args, NB, T, NH, TL, cu,
                             ACC=_acc(dt), BLOCK_B=BB, VARLEN=varlen, REVERSE=rev, **_seq_gpu_opts(dev, stage),
                             **{f"STORE{k}": st for k, st in enumerate(stores)})
        ctx.stage, ctx.dims, ctx.K, ctx.nleaf, ctx.run = stage, dims, K, nleaf, run
        ctx.save_for_backward(*h0, *hseq, *views, *params)
        return tuple(hseq) + tuple(hfin)

    @staticmethod
    def backward(ctx, *grads):
        stage, (_, T, NH, heads, _), K, nleaf = ctx.stage, ctx.dims, ctx.K, ctx.nleaf
        saved = ctx.saved_tensors
        h0, hseq, views, params = saved[:K], saved[K:2 * K], saved[2 * K:2 * K + nleaf], saved[2 * K + nleaf:]
        if wants_graph([*h0, *views, *params], grads):
            # create_graph=True: autograd's derivative of the stage's torch twin (see _ScanFn)
            twin = seq_twin(stage.kernel)
            fn = lambda *xs: twin(xs[:K], xs[K:K + nleaf], xs[K + nleaf:], ctx.dims, ctx.run)  # noqa: E731
            return (None,) * 5 + tuple(recompute_vjp(fn, [*h0, *views, *params], ctx.needs_input_grad[5:], grads))
        dseq, dfin = grads[:K], grads[K:]
        dev, dt = h0[0].device, h0[0].dtype
        has_dseq = any(g is not None for g in dseq)
        dseq = [(g if g is not None else torch.zeros_like(s)).contiguous() for g, s in zip(dseq, hseq)]
        dfin = [(g if g is not None else torch.zeros_like(h)).contiguous() for g, h in zip(dfin, h0)]
        dh0 = [torch.empty_like(h) for h in h0]
        rev, cu, TL, varlen = ctx.run
        NB = h0[0].shape[0]
        BB = _block_b(NB, dev, stage.kernel)
        nprog = triton.cdiv(NB, BB) * _split_programs(stage.kernel)
        copies = [getattr(stage.kernel, "leaf_copies", lambda i: 1)(i) for i in range(len(views))]
        dleaf = [torch.zeros(v.shape[:3] + ((c,) if c > 1 else ()) + v.shape[3:], dtype=dt, device=dev)
                 for v, c in zip(views, copies)]   # lanes no window reads stay 0; copies: one part per program
        dpart = [torch.zeros((nprog, NH) + (tuple(p.shape[1:]) if heads else tuple(p.shape)), dtype=dt, device=dev)
                 for p in params]
        state_args = []
        for k in range(K):
            state_args += [h0[k], hseq[k], dseq[k], dfin[k], dh0[k]]
        stage.bwd(dev)[(nprog, NH)](*_seq_leaf_args(views), *_param_args(params, heads), *state_args,
                                    *dleaf, *dpart, NB, T, NH, TL, cu, ACC=_acc(dt), BLOCK_B=BB, HAS_DSEQ=has_dseq,
                                    VARLEN=varlen, REVERSE=rev, **_seq_gpu_opts(dev, stage))
        dparams = [d.sum(0) if heads else d.sum(0)[0] for d in dpart]
        dleaf = [d.sum(3) if c > 1 else d for d, c in zip(dleaf, copies)]
        return (None, None, None, None, None) + tuple(dh0) + tuple(dleaf) + tuple(dparams)


# --------------------------------------------------------------------------- chunk stages' operands

def prologue(stage: Stage, leaves: list, first_input: torch.Tensor, ns: int) -> list:
    """Run a chunkwise stage's generated operand kernel (prologue.py): its outputs, each
    [B, T, (heads,) *shape] contiguous (the driver's layout). Each leaf is read through its
    [B, T, NH, n] view (expanded where it broadcasts: a param, a per-head value)."""
    kern = stage.kernel
    prefix = tuple(first_input.shape[:ns])
    B, T = prefix[:2]
    NH = prefix[2] if ns == 3 else 1
    views = [_row_view(x, shape, first_input, ns, (B, T, NH)) for x, shape in zip(leaves, kern.leaf_shapes)]
    return list(_PrologueFn.apply(stage, (B, T, NH, prefix), *views))


def _row_view(x, shape: tuple, first_input: torch.Tensor, ns: int, rows: tuple) -> torch.Tensor:
    """A whole-sequence leaf as a [B, T, NH, n] view (n: its elements per step)."""
    from ..torch.seq_rt import full_seq
    if not torch.is_tensor(x):
        x = torch.tensor(float(x), dtype=first_input.dtype, device=first_input.device)
    if x.dtype == torch.bool:
        x = x.to(first_input.dtype)
    x = full_seq(x, first_input, ns, len(shape))
    x = x.expand(tuple(first_input.shape[:ns]) + shape)
    n = 1
    for size in shape:
        n *= size
    return x.reshape(rows + (n,))


def _prologue_rows(kern, rows: int, device, backward: bool) -> int:
    """Rows per program: the GPU's (PrologueKernel.gpu_rows); in the interpreter, where each
    tile op is one numpy call, as many as ~16K tile elements hold."""
    if device.type == "cuda":
        return kern.gpu_rows(backward)
    return min(pow2(rows), max(16, 16384 // kern.max_lanes))


class _PrologueFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, dims, *views):
        B, T, NH, prefix = dims
        kern = stage.kernel
        dev = views[0].device
        dt = views[0].dtype
        for v in views[1:]:   # the operands' dtype: as torch's ops on the leaves would give
            dt = torch.promote_types(dt, v.dtype)
        outs = [torch.empty(prefix + shape, dtype=dt, device=dev) for shape in kern.out_shapes]
        rows = B * T * NH
        BR = _prologue_rows(kern, rows, dev, False)
        _record(stage.name + "_fwd", list(views), outs)
        stage.fwd(dev)[(triton.cdiv(rows, BR),)](*_row_args(views), *outs, B, T, NH, ACC=_acc(dt), BLOCK_R=BR,
                                                  **_gpu_opts(dev))
        ctx.stage, ctx.dims, ctx.dt = stage, dims, dt
        ctx.save_for_backward(*views)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        stage, (B, T, NH, _) = ctx.stage, ctx.dims
        kern = stage.kernel
        views = ctx.saved_tensors
        if wants_graph(views, douts):
            # create_graph=True: autograd's derivative of the same math in torch ops (see _ScanFn)
            fn = lambda *xs: tuple(kern.torch_values(list(xs), ctx.dt))   # noqa: E731
            grads = [None if g is None else g.reshape(B, T, NH, -1) for g in douts]
            return (None, None) + tuple(recompute_vjp(fn, list(views), ctx.needs_input_grad[2:], grads))
        dev = views[0].device
        prefix = ctx.dims[3]
        douts = [(g.contiguous() if g is not None else torch.zeros(prefix + shape, dtype=ctx.dt, device=dev))
                 for g, shape in zip(douts, kern.out_shapes)]
        grads = [torch.empty(v.shape, dtype=v.dtype, device=dev) for v in views]
        rows = B * T * NH
        BR = _prologue_rows(kern, rows, dev, True)
        stage.bwd(dev)[(triton.cdiv(rows, BR),)](*_row_args(views), *douts, *grads, B, T, NH, ACC=_acc(ctx.dt),
                                                  BLOCK_R=BR, **_gpu_opts(dev))
        return (None, None) + tuple(grads)


def _row_args(views) -> list:
    args = []
    for x in views:
        args += [x, x.stride(0), x.stride(1), x.stride(2), x.stride(3)]
    return args
