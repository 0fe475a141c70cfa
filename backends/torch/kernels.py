"""The torch backend's kernel registry: which lowering forms it runs, and how.

One line per form; `recdsl.lowering.select` picks, per stage, the first candidate form
one of these accepts. Every kernel here is differentiable (autograd, or a derived
backward); reverse and cu_seqlens are the runtime's (it flips / splits around them)."""
from __future__ import annotations

from recdsl.lowering import (BlockScan, Caps, ChunkDelta, ChunkDiag, ChunkDPLR, ElementScan, HouseholderProducts,
                             Kernel, Registry, SequentialLoop, Vectorised)

CAPS = Caps(reverse="runtime", varlen="runtime", heads=True, grad=True, dtypes=("float32", "float64"))


def _loop_explain(form: SequentialLoop, ctx) -> str:
    """The loop runs as one generated C call when nothing needs a gradient (CPU, fp32/fp64)."""
    from .fused_loop import FusedLoop, NotEligible
    try:
        FusedLoop(ctx.ir, list(form.states), list(form.core))
    except NotEligible as why:
        return f"per-step loop of the core, backward a reverse loop of per-step VJPs (no C loop: {why})"
    return ("without gradients on CPU: the whole loop in one generated C call (OpenMP); "
            "else a per-step loop of the core, backward a reverse loop of per-step VJPs")


REGISTRY = Registry("torch", (
    Kernel(Vectorised, "torch.vectorised", "one torch op per value over B*T", "_stage_vectorised", CAPS),
    Kernel(ElementScan, "torch.element_scan", "C scan, derived backward (log-depth torch scan without a C compiler)",
           "_stage_element", CAPS),
    Kernel(BlockScan, "torch.block_scan", "C k x k block scan, derived backward", "_stage_block", CAPS),
    Kernel(ChunkDiag, "torch.chunk_diag", "chunkwise matmuls (MATH.md §3); without gradients on CPU a C kernel, "
           "state in cache", "_stage_chunk_diag", CAPS),
    Kernel(ChunkDelta, "torch.chunk_delta", "WY/UT chunkwise form (MATH.md §4); without gradients on CPU a C kernel",
           "_stage_chunk_delta", CAPS),
    Kernel(HouseholderProducts, "torch.delta_product", "the steps interleaved into one WY/UT delta rule over T*n "
           "steps", "_stage_chunk_delta_product", CAPS),
    Kernel(ChunkDPLR, "torch.chunk_dplr", "the DPLR product of each chunk in WY form (dplr.py), decays as "
           "relative factors with exponents <= 0; state passed between chunks", "_stage_dplr", CAPS),
    Kernel(SequentialLoop, "torch.loop", "a loop over the stage's recurrent core only (hoisted work precomputed)",
           "_stage_loop", CAPS, explain=_loop_explain),
))
