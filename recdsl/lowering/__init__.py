"""Lowering: from a classified stage to the kernel that runs it, decided once.

    forms.py    typed lowering forms (element scan, block scan, chunkwise diagonal decay,
                chunkwise delta rule, Householder products, DPLR, sequential loop, ...)
    match.py    matchers: a stage of the Plan -> candidate forms best first, or rejections
                naming the construct and its line
    select.py   kernel registries (one per backend, typed capabilities) and `select`

`lower(plan)` gives every stage's candidates; `select(registry, candidates, ctx)` the
Selection a backend runs; `check`, `inspect`, `layer.plan` and the fuzzer read it, the
emitters dispatch on it. Nothing here imports a backend."""
from __future__ import annotations

from .forms import (BlockScan, ChunkDelta, ChunkDiag, ChunkDPLR, DenseSemiringScan, ElementScan, Form,
                    HouseholderProducts, LevelSync, NewtonSolve, Readout, Rejection, SequentialLoop, Vectorised, Wavefront)
from .match import Context, candidates
from .select import Caps, Choice, Kernel, NoKernel, Passed, Registry, Selection, select


def lower(plan) -> tuple[Context, list[list]]:
    """The matchers' context and every stage's candidates, best first."""
    ctx = Context(plan.ir, plan)
    return ctx, [candidates(ctx, sp) for sp in plan.stages]


__all__ = ["BlockScan", "ChunkDelta", "ChunkDiag", "ChunkDPLR", "DenseSemiringScan", "ElementScan", "Form",
           "HouseholderProducts", "LevelSync", "NewtonSolve", "Readout", "Rejection", "SequentialLoop", "Vectorised", "Wavefront", "Context", "candidates", "Caps",
           "Choice", "Kernel", "NoKernel", "Passed", "Registry", "Selection", "select", "lower"]
