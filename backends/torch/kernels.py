"""The torch backend's kernel registry: which lowering forms it runs, and how.

One line per form; `recdsl.lowering.select` picks, per stage, the first candidate form
one of these accepts. Every kernel here is differentiable (autograd, or a derived
backward); reverse and cu_seqlens are the runtime's (it flips / splits around them)."""
from __future__ import annotations

import weakref

from recdsl.lowering import (BlockScan, Caps, ChunkDelta, ChunkDiag, ChunkDPLR, DenseSemiringScan, ElementScan,
                             HouseholderProducts, Kernel, LevelSync, Registry, SequentialLoop, Vectorised, Wavefront)

CAPS = Caps(reverse="runtime", varlen="runtime", heads=True, grad=True, dtypes=("float32", "float64"))


def compiled_loop(ir, states, core, readouts=()):
    """The generated C loop of a sequential stage: the lane loop (fused_loop.py: vector
    states, elementwise gates, the recurrent GEMMs batched over rows) where the stage fits
    it, else the general one (general_loop.py: per row, any op; with `readouts`, values it
    computes per step from the new states -- an output q @ M' -- so that a matrix state's
    sequence is never written). NotEligible says why neither runs it."""
    from .fused_loop import FusedLoop, NotEligible
    from .general_loop import GeneralLoop
    if readouts:
        return GeneralLoop(ir, list(states), list(core), readouts=list(readouts))
    key = (tuple(states), tuple(n.id for n in core))
    made = _made(ir)     # selection, its note and the emitter ask once per compile
    if key not in made:
        try:
            made[key] = FusedLoop(ir, list(states), list(core))
        except NotEligible:
            try:
                made[key] = GeneralLoop(ir, list(states), list(core))
            except NotEligible as why:
                made[key] = why
    if isinstance(made[key], NotEligible):
        raise made[key]
    return made[key]


_LOOPS: dict[int, tuple] = {}    # id(ir) -> (weak reference to ir, {stage key: loop or why not})


def _made(ir) -> dict:
    """The loops made for this IR (an IRCell compares by value, so it is keyed by identity
    and forgotten when it dies)."""
    ref, made = _LOOPS.get(id(ir), (None, None))
    if ref is None or ref() is not ir:
        made = {}
        _LOOPS[id(ir)] = (weakref.ref(ir, _forget), made)
    return made


def _forget(ref) -> None:
    """An IR died: drop its loops (unless its id already belongs to a newer IR)."""
    for key, (r, _) in list((_LOOPS or {}).items()):
        if r is ref:
            del _LOOPS[key]


def _c_loop_why_not(form: SequentialLoop, ctx) -> str | None:
    from .fused_loop import NotEligible
    try:
        compiled_loop(ctx.ir, form.states, form.core)
    except NotEligible as why:
        return f"no C loop: {why}"
    return None


def _c_grid_why_not(form, ctx) -> str | None:
    from .fused_loop import toolchain_missing
    from .graph import c_grid_why_not
    return toolchain_missing() or c_grid_why_not(ctx.ir)


def _c_loop_explain(form: SequentialLoop, ctx) -> str:
    from .fused_loop import FusedLoop
    kind = ("lane loop: recurrent GEMMs batched over rows, gates per lane"
            if isinstance(compiled_loop(ctx.ir, form.states, form.core), FusedLoop)
            else "general loop: per row, every value a small array")
    return (f"{kind}; forward one C call, backward its reverse-time adjoint in one more (weight gradients "
            "one GEMM over all steps); on a non-CPU tensor, or if its build fails (warned), the per-step torch loop "
            "runs and layer.ran says torch.loop")


def _dense_semiring_explain(form: DenseSemiringScan, ctx) -> str:
    if form.products:
        return (f"N = {form.n}: log-depth scan of the [N, N] semiring products M_t = A_t + b_t[None, :] in torch "
                "(no loop over T); backward derived: the transition posteriors (log) / the argmax (max-plus) "
                "through a reverse block scan")
    return ("the semiring matrix-vector loop in one C call (csrc/semiring.c), its adjoint (posteriors / argmax) "
            "in one more; on a non-CPU tensor or without a C compiler a per-step torch loop, and layer.ran says "
            "torch.loop")


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
    Kernel(DenseSemiringScan, "torch.dense_semiring", "h_t = h_{t-1} (x) (A_t + b_t): small N a parallel scan of "
           "semiring matrix products, else the C matrix-vector loop (semiring.py); derived backward",
           "_stage_dense_semiring", CAPS, explain=_dense_semiring_explain),
    Kernel(SequentialLoop, "torch.c_loop", "the stage's time loop as generated C (OpenMP), forward and backward "
           "(hoisted work precomputed)", "_stage_c_loop", CAPS, accepts=_c_loop_why_not, explain=_c_loop_explain),
    Kernel(Wavefront, "torch.c_grid", "grid2d as one generated C loop over the cells in raster order (left = "
           "the state row Y cells back, up = the row before), the state-free work over the whole grid first; "
           "derived reverse-raster backward (grid_loop.py); on a non-CPU tensor, or if its build fails (warned), "
           "the anti-diagonal wavefront, and layer.ran says torch.wavefront", "_stage_graph", CAPS,
           accepts=_c_grid_why_not),
    Kernel(Wavefront, "torch.wavefront", "grid2d by anti-diagonals: all cells x + y = d in one set of torch ops "
           "over B x the diagonal's cells, d = 0 .. X+Y-2, left/up from diagonal d-1 (graph.py); autograd backward",
           "_stage_graph", CAPS),
    Kernel(LevelSync, "torch.level_sync", "dag by topological levels: a level's nodes in one set of torch ops, "
           "sum_in an index_add over their in-edges, memory O(E) (graph.py); autograd backward", "_stage_graph", CAPS),
    Kernel(SequentialLoop, "torch.loop", "a per-step torch loop over the stage's recurrent core (hoisted work "
           "precomputed); backward a reverse loop of per-step VJPs", "_stage_loop", CAPS),
))
