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
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from triton.runtime import interpreter as _interp


@dataclasses.dataclass
class Traffic:
    load_bytes: int = 0
    store_bytes: int = 0
    launches: int = 0
    # kernel name -> (load_bytes, store_bytes, launches)
    per_kernel: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    def _add(self, kernel: str, load: int = 0, store: int = 0, launches: int = 0) -> None:
        self.load_bytes += load
        self.store_bytes += store
        self.launches += launches
        lo, st, n = self.per_kernel.get(kernel, (0, 0, 0))
        self.per_kernel[kernel] = (lo + load, st + store, n + launches)


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
def counting() -> Traffic:
    """Context manager form: `with counting() as t: ...` fills `t` while the block runs."""
    t = Traffic()
    current = [_UNLAUNCHED]  # name of the kernel whose grid is executing
    B, G = _interp.InterpreterBuilder, _interp.GridExecutor
    orig = {(B, n): B.__dict__[n] for n in
            ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    orig[(G, "__call__")] = G.__dict__["__call__"]

    # Each wrapper calls whatever was there before (maybe another counter's wrapper), so
    # nested count_traffic calls both see the traffic.
    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        t._add(current[0], load=_bytes(ptrs, mask))
        return orig[(B, "create_masked_load")](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        t._add(current[0], store=_bytes(ptrs, mask))
        return orig[(B, "create_masked_store")](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        n = _bytes(ptr, mask)
        t._add(current[0], load=n, store=n)
        return orig[(B, "create_atomic_rmw")](self, rmwOp, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        n = _bytes(ptr, None)  # a CAS reads every lane and (at most) writes it back
        t._add(current[0], load=n, store=n)
        return orig[(B, "create_atomic_cas")](self, ptr, cmp, val, sem, scope)

    def grid_call(self, *args, **kwargs):
        outer = current[0]
        current[0] = self.fn.__name__
        t._add(current[0], launches=1)
        try:
            return orig[(G, "__call__")](self, *args, **kwargs)
        finally:
            current[0] = outer

    patches = {(B, "create_masked_load"): masked_load, (B, "create_masked_store"): masked_store,
               (B, "create_atomic_rmw"): atomic_rmw, (B, "create_atomic_cas"): atomic_cas,
               (G, "__call__"): grid_call}
    try:
        for (cls, name), fn in patches.items():
            setattr(cls, name, fn)
        yield t
    finally:
        for (cls, name), fn in orig.items():
            setattr(cls, name, fn)


def count_traffic(run) -> Traffic:
    """Call `run()` -- which launches interpreted Triton kernels on CPU tensors -- and
    return the bytes its loads/stores moved and the number of launches."""
    with counting() as t:
        run()
    return t


def analytic_minimum(tensors_in: list[torch.Tensor], tensors_out: list[torch.Tensor]) -> int:
    """Bytes a perfect kernel moves: every input read once, every output written once."""
    return sum(x.numel() * x.element_size() for x in [*tensors_in, *tensors_out])
