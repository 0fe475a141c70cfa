"""The chunkwise forms' training step is linear in T (issue 12, part 11), asserted on work,
not time: every aten op the forward and the backward run is counted by the elements it
writes, at T and 4T; no op may grow faster than T (a 4.5x margin on 4x).

The bug this guards: the loop over chunks indexed whole tensors per chunk (U[:, n]); the
backward of each index is a zero-filled gradient of the whole tensor, so N chunks cost N
full-size fills (O(T^2)): DeltaNet's training step went 0.06 s -> 1.85 s -> 11.2 s for
T = 2048 -> 8192 -> 32768. (benchmarks/bench_scaling.py times it.)"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import recdsl
import recdsl.lowering as L
from helpers import as_tuple, random_inputs

T0 = 512                      # 8 chunks of 64 (16 of the DPLR form's 32); 4 * T0: 32 (64)
GROWTH = 4.5                  # the most any op's work may grow for 4x the steps
# one cell per chunkwise form and variant: vector / signed / transposed decay, gated and not,
# Householder products, DPLR with a vector and a scalar-per-head decay
CELLS = {"gla": L.ChunkDiag, "retnet": L.ChunkDiag, "mamba2": L.ChunkDiag, "mlstm": L.ChunkDiag,
         "deltanet": L.ChunkDelta, "gated_deltanet": L.ChunkDelta, "deltaproduct": L.HouseholderProducts,
         "kda": L.ChunkDPLR, "rwkv7": L.ChunkDPLR}


class _Work(TorchDispatchMode):
    """Elements written per aten op (views included: they are cheap, and linear anyway)."""

    def __init__(self):
        super().__init__()
        self.elems = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.elems[str(func)] += sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def _work(spec, layer, T: int) -> Counter:
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, layer, 1, T, torch.float32).items()}
    with _Work() as w:
        outs, state = layer(**xs)
        loss = sum(o.square().sum() for o in as_tuple(outs)) + sum(s.sum() for s in state.values())
        loss.backward()
    return w.elems


@pytest.mark.parametrize("name", sorted(CELLS))
def test_training_work_grows_linearly_in_T(name):
    spec = recdsl.load(name)
    layer = spec(backend="torch", **spec.analysis_dims())
    assert any(isinstance(c.form, CELLS[name]) for c in layer.selection.stages)
    small, big = _work(spec, layer, T0), _work(spec, layer, 4 * T0)
    assert any(k.startswith("torch.chunk") or k == "torch.delta_product" for k in layer.ran), layer.ran
    growth = {op: big[op] / max(small[op], 1) for op in big if big[op] > 1000}
    worst = max(growth, key=growth.get)
    assert growth[worst] <= GROWTH, f"{name}: {worst} writes {growth[worst]:.1f}x the elements for 4x the steps"
    assert sum(big.values()) <= GROWTH * sum(small.values())
