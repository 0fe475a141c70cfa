"""Count the global-memory bytes interpreted Triton kernels move.

Triton 3.9's interpreter (triton/runtime/interpreter.py) funnels every memory access
through a few methods of `InterpreterBuilder`, a single module-level instance shared by
all kernels:

* create_masked_load / create_masked_store: the plain, masked, descriptor (TMA),
  descriptor gather/scatter, atomic_load and atomic_store paths all end here;
* create_atomic_rmw / create_atomic_cas: read-modify-write, counted as a load plus a store.

and every launch through `GridExecutor.__call__`, which loops over the grid calling the
rewritten kernel once per program. We wrap those methods on the classes (the builder is
reached through `self`, so a class attribute wins) for the duration of `count_traffic`.

Bytes are counted per access over the *distinct* addresses of its active (mask-true)
lanes: lanes of one load that read one address (a leaf broadcast over a channel axis by
a zero stride) are one memory transaction on a GPU, where the coalescer merges them. A
second access to the same address is counted again (no cache is modelled), so the count
is exact for kernels that read each element in one access and an upper bound otherwise.
`distinct=False` counts every lane (the requested traffic).

Compute, per launch (`Traffic.launch_log`), through `InterpreterBuilder.create_dot` and
`set_grid_idx` (called once before each program of a grid):

* dot FLOPs: a tl.dot of [M, K] by [K, N] tiles is 2·M·N·K multiply-adds, per call per
  program (a masked-off tile is still multiplied: the tensor core does not skip it);
* the longest serial chain, `chain`: the most tl.dot calls one program executes. A program
  runs on one SM and its dots run in program order (in the chunkwise kernels each chunk's
  dot waits on the state the previous one produced), so `chain` counts the steps no number
  of SMs shortens; `program_flops` is the dot FLOPs of that busiest program.

Elementwise arithmetic (exp, the masks: CUDA-core work that overlaps the loads) is not
counted, so a kernel heavy in it is estimated too fast.

`roofline(traffic, gpu)` turns the counts into a time estimate (see its docstring);
`counting(torch_ops=True)` also counts the torch operators run outside the kernels (the
glue: copies, casts, cumsums), each as one launch moving its operands' and results' bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter as _interp

from .launch import distinct_bytes


@dataclasses.dataclass
class Traffic:
    load_bytes: int = 0
    store_bytes: int = 0
    launches: int = 0         # grids (and torch operators, when counted)
    # kernel name -> (load_bytes, store_bytes, launches); the torch operators under TORCH_OPS
    per_kernel: dict = dataclasses.field(default_factory=dict)
    dot_flops: int = 0
    dots: int = 0
    # one Launch per grid (and one per torch operator when counting them), in order
    launch_log: list = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def chain(self) -> int:
        """The most tl.dot calls one program of any launch executed (module docstring)."""
        return max((x.chain for x in self.launch_log), default=0)

    def kernel_compute(self, kernel: str) -> tuple[int, int, int]:
        """(dot FLOPs, tl.dot calls, longest chain) of every launch of `kernel`."""
        runs = [x for x in self.launch_log if x.kernel == kernel]
        return (sum(x.dot_flops for x in runs), sum(x.dots for x in runs), max((x.chain for x in runs), default=0))

    def _add(self, kernel: str, load: int = 0, store: int = 0, launches: int = 0) -> None:
        self.load_bytes += load
        self.store_bytes += store
        self.launches += launches
        lo, st, n = self.per_kernel.get(kernel, (0, 0, 0))
        self.per_kernel[kernel] = (lo + load, st + store, n + launches)


@dataclasses.dataclass
class Launch:
    """One grid launch (or, with `torch_op`, one torch operator outside the kernels)."""
    kernel: str
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    dot_flops: int = 0
    dots: int = 0
    chain: int = 0            # the most tl.dot calls one program executed
    program_flops: int = 0    # the dot FLOPs of that program
    torch_op: bool = False

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes


def _dot_flops(a, b) -> int:
    """2·M·N·K for [.., M, K] @ [.., K, N] tiles (a leading batch axis multiplies)."""
    a_shape, b_shape = np.shape(a.data), np.shape(b.data)
    return 2 * math.prod(a_shape) * b_shape[-1]


def _bytes(ptrs, mask) -> int:
    """Bytes moved by an access through pointer handle `ptrs` under `mask` (None: all lanes)."""
    bits = ptrs.get_element_ty().primitive_bitwidth
    size = max(1, bits // 8)  # int1 is stored as a byte
    shape = np.shape(ptrs.data)
    addr = np.asarray(ptrs.data)
    if mask is not None:
        # a mask may be broadcast against the pointers (e.g. a scalar mask)
        addr = np.broadcast_to(addr, shape)[np.broadcast_to(mask.data, shape)]
    if DISTINCT:
        return int(np.unique(addr).size) * size
    return int(np.size(addr)) * size


DISTINCT = True   # count distinct addresses per access (see the module docstring)


_UNLAUNCHED = "<outside a launch>"  # device functions called directly, not via kernel[grid]


@contextlib.contextmanager
def counting(torch_ops: bool = False) -> Traffic:
    """Context manager form: `with counting() as t: ...` fills `t` while the block runs.
    `torch_ops`: also count the torch operators called outside a launch (see `_TorchOps`)."""
    t = Traffic()
    current = [_UNLAUNCHED]  # name of the kernel whose grid is executing
    launch = [None]          # its Launch record
    program = [0, 0]         # tl.dot calls and their FLOPs in the program now running
    B, G = _interp.InterpreterBuilder, _interp.GridExecutor
    orig = {(B, n): B.__dict__[n] for n in
            ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
             "create_dot", "set_grid_idx")}
    orig[(G, "__call__")] = G.__dict__["__call__"]

    def add(load: int = 0, store: int = 0) -> None:
        t._add(current[0], load=load, store=store)
        if launch[0] is not None:
            launch[0].load_bytes += load
            launch[0].store_bytes += store

    # Each wrapper calls whatever was there before (maybe another counter's wrapper), so
    # nested count_traffic calls both see the traffic.
    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        add(load=_bytes(ptrs, mask))
        return orig[(B, "create_masked_load")](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        add(store=_bytes(ptrs, mask))
        return orig[(B, "create_masked_store")](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        n = _bytes(ptr, mask)
        add(load=n, store=n)
        return orig[(B, "create_atomic_rmw")](self, rmwOp, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        n = _bytes(ptr, None)  # a CAS reads every lane and (at most) writes it back
        add(load=n, store=n)
        return orig[(B, "create_atomic_cas")](self, ptr, cmp, val, sem, scope)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        flops = _dot_flops(a, b)
        t.dot_flops += flops
        t.dots += 1
        program[0] += 1
        program[1] += flops
        if launch[0] is not None:
            x = launch[0]
            x.dot_flops += flops
            x.dots += 1
            if program[0] > x.chain:
                x.chain, x.program_flops = program[0], program[1]
        return orig[(B, "create_dot")](self, a, b, d, input_precision, max_num_imprecise_acc)

    def grid_idx(self, x, y, z):  # a new program starts
        program[0] = program[1] = 0
        if launch[0] is not None:
            launch[0].programs += 1
        return orig[(B, "set_grid_idx")](self, x, y, z)

    def grid_call(self, *args, **kwargs):
        outer, outer_launch = current[0], launch[0]
        current[0] = self.fn.__name__
        launch[0] = Launch(current[0])
        t.launch_log.append(launch[0])
        t._add(current[0], launches=1)
        try:
            return orig[(G, "__call__")](self, *args, **kwargs)
        finally:
            current[0], launch[0] = outer, outer_launch

    patches = {(B, "create_masked_load"): masked_load, (B, "create_masked_store"): masked_store,
               (B, "create_atomic_rmw"): atomic_rmw, (B, "create_atomic_cas"): atomic_cas,
               (B, "create_dot"): dot, (B, "set_grid_idx"): grid_idx,
               (G, "__call__"): grid_call}
    ops = _TorchOps(t, lambda: current[0] == _UNLAUNCHED) if torch_ops else contextlib.nullcontext()
    try:
        for (cls, name), fn in patches.items():
            setattr(cls, name, fn)
        with ops:
            yield t
    finally:
        for (cls, name), fn in orig.items():
            setattr(cls, name, fn)


TORCH_OPS = "torch ops"  # the per_kernel / launch_log name of the operators outside kernels


class _TorchOps(TorchDispatchMode):
    """Counts the torch operators a run calls outside a kernel launch: on a GPU each is (at
    least) one kernel launch that reads its tensor operands and writes its results. Views,
    metadata and allocation operators move nothing and launch nothing; an in-place operator's
    output aliases an operand and is counted once as written. The interpreter's own copies
    (inside a launch: host staging of the arguments) are not counted."""

    FREE = {"view", "_unsafe_view", "as_strided", "expand", "permute", "transpose", "t", "unsqueeze",
            "squeeze", "select", "slice", "alias", "detach", "empty", "empty_like", "empty_strided",
            "new_empty", "new_empty_strided", "set_", "unbind", "split", "split_with_sizes", "chunk",
            "_reshape_alias", "reshape", "lift_fresh", "is_same_size", "size", "stride", "sym_size",
            "_to_copy_meta", "resolve_conj", "resolve_neg", "view_as_real", "view_as_complex", "diagonal",
            "narrow", "movedim", "unflatten", "flatten", "contiguous_meta", "_local_scalar_dense",
            "zeros_like_meta", "result_type", "is_nonzero", "item"}

    def __init__(self, traffic: Traffic, outside_launch):
        super().__init__()
        self.traffic, self.outside_launch = traffic, outside_launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        launched = any(True for _ in _tensors(out))   # an op with no tensor result (a dtype, a bool) runs on the host
        if self.outside_launch() and launched and name not in self.FREE and not name.endswith("_meta"):
            read = sum(_tensor_bytes(x) for x in _tensors((args, kwargs)))
            written = sum(_tensor_bytes(x) for x in _tensors(out))
            if name.endswith("_") or "out" in (kwargs or {}):
                read -= written  # the result is an operand written in place
            self.traffic._add(TORCH_OPS, load=max(read, 0), store=written, launches=1)
            self.traffic.launch_log.append(Launch(f"aten.{name}", 1, max(read, 0), written, torch_op=True))
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def _tensor_bytes(x: torch.Tensor) -> int:
    if x.dim() == 0:
        return 0  # a scalar operand rides in the launch's arguments
    return distinct_bytes(x)


def count_traffic(run, torch_ops: bool = False) -> Traffic:
    """Call `run()` -- which launches interpreted Triton kernels on CPU tensors -- and
    return the bytes its loads/stores moved, the number of launches and the dot FLOPs;
    `torch_ops`: the torch operators outside the kernels too."""
    with counting(torch_ops) as t:
        run()
    return t


def analytic_minimum(tensors_in: list[torch.Tensor], tensors_out: list[torch.Tensor]) -> int:
    """Bytes a perfect kernel moves: every input read once, every output written once."""
    return sum(x.numel() * x.element_size() for x in [*tensors_in, *tensors_out])


@dataclasses.dataclass(frozen=True)
class GPU:
    """The peak figures a roofline needs. NVIDIA's H100 / H200 datasheets (SXM): HBM3 3.35
    TB/s, HBM3e 4.8 TB/s; TF32 tensor core 989 TFLOP/s *with sparsity*, so 494.5 dense (the
    same chip for both: 132 SMs). A float32 tl.dot runs in TF32 (the default precision),
    as fla's kernels. `launch_s`: the host-side cost of one kernel launch, ~3 µs (not a
    datasheet figure: the usual measured PyTorch/Triton launch overhead)."""
    name: str
    bandwidth: float          # bytes / s
    dot_rate: float           # dense TF32 tensor-core FLOP / s
    sms: int
    launch_s: float = 3e-6


H100 = GPU("H100 SXM", 3.35e12, 494.5e12, 132)
H200 = GPU("H200 SXM", 4.8e12, 494.5e12, 132)


@dataclasses.dataclass
class Estimate:
    seconds: float
    memory_s: float     # Σ per launch of bytes / bandwidth
    compute_s: float    # Σ per launch of dot FLOPs / tensor-core rate
    serial_s: float     # Σ per launch of the busiest program's dot FLOPs / one SM's rate
    launch_s: float     # launches · per-launch cost

    @property
    def us(self) -> float:
        return self.seconds * 1e6


def launch_seconds(x: Launch, gpu: GPU) -> tuple[float, float, float]:
    """(memory, compute, serial) times of one launch: the launch takes the longest of them."""
    memory = x.total_bytes / gpu.bandwidth
    compute = x.dot_flops / gpu.dot_rate
    serial = x.program_flops / (gpu.dot_rate / gpu.sms)
    return memory, compute, serial


def roofline(t: Traffic, gpu: GPU, torch_ops: bool = True) -> Estimate:
    """time ≈ Σ_launches max(bytes / BW, dot FLOPs / rate, serial) + launches · launch cost.

    The serial term: a program runs on one SM, whose tensor cores are 1/sms of the chip's,
    so a launch lasts at least its busiest program's dot FLOPs at one SM's rate -- the
    longest chain of dots, which more SMs cannot shorten (it is what limits a chunkwise
    state pass with few rows). Memory latency and elementwise work are not modelled, and
    launches do not overlap: an estimate, not a bound, for comparing kernels on one shape.
    `torch_ops=False`: the Triton launches only (without the counted torch operators)."""
    memory = compute = serial = total = 0.0
    runs = [x for x in t.launch_log if torch_ops or not x.torch_op]
    for x in runs:
        m, c, s = launch_seconds(x, gpu)
        memory, compute, serial, total = memory + m, compute + c, serial + s, total + max(m, c, s)
    launches = len(runs) * gpu.launch_s
    return Estimate(total + launches, memory, compute, serial, launches)
