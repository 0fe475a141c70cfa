"""The triton backend's kernel registry: its own kernels, then the torch kernels it runs
for the forms it has no Triton kernel for yet -- each fallback an explicit entry, with
the torch kernel's capabilities (reverse and cu_seqlens by the runtime), so a cell with
one of them is flipped / split by the runtime instead of handing the direction and the
sequence boundaries to code that ignores them."""
from __future__ import annotations

from recdsl.lowering import (BlockScan, Caps, ChunkDelta, ChunkDiag, ChunkDPLR, ElementScan, HouseholderProducts,
                             Kernel, Registry, SequentialLoop, Vectorised)

from ..torch import kernels as torch_kernels

# The scan and sequential kernels index time themselves (REVERSE / VARLEN constexprs).
OWN = Caps(reverse="kernel", varlen="kernel", heads=True, grad=True, dtypes=("float32", "float64"))
# The diagonal-decay chunk kernels too, and they widen bf16 / fp16 inputs to fp32 themselves.
CHUNK_DIAG_CAPS = Caps(reverse="kernel", varlen="kernel", heads=True, grad=True,
                       dtypes=("float32", "float64", "bfloat16", "float16"))
# A stage with no recurrence is torch ops in the driver, as on the torch backend: its final
# state is the value at the last step, which only the runtime knows per direction and sequence.
STEPWISE = torch_kernels.CAPS


CHUNKWISE = (ChunkDiag, ChunkDelta, HouseholderProducts, ChunkDPLR)


def _dense_semiring_fits(form, ctx) -> str | None:
    """The Triton kernel is the sequential semiring loop; the parallel scan of [N, N] semiring
    matrix products (small N) has none: the stage's next candidate runs. Where the generated
    sequential kernel can hold the transition in registers, that one runs."""
    if form.products:
        return "the parallel scan of semiring matrix products has no Triton kernel (the loop variant has)"
    from .seq_kernels import MATRIX_LIMIT
    loop = next((c for c in ctx.plan.candidates[form.stage] if isinstance(c, SequentialLoop)), None)
    if form.n * form.n <= MATRIX_LIMIT and loop is not None and _seq_kernel_fits(loop, ctx) is None:
        return (f"the generated sequential kernel holds the [{form.n}, {form.n}] transition in registers "
                "(this kernel streams it from memory every step: for larger N)")
    return None


def _seq_kernel_fits(form: SequentialLoop, ctx) -> str | None:
    """The sequential kernel holds the stage's states in registers, and its recurrent
    weights too up to a budget (streamed from global memory per step above it). A linear
    stage with a chunkwise form keeps that form (chunk_kernels.py, or torch's for the forms
    without a Triton kernel yet): a time loop with one program per row and head leaves
    most of a GPU idle and trains far slower than chunks of matmuls."""
    from recdsl.torch_expr import SourceNotes

    from .seq_kernels import NotEligible, SeqKernel
    if ctx.ir.over != "seq":   # a grid runs triton.wavefront (else torch.wavefront), a DAG torch.level_sync
        return f"over {ctx.ir.over}: the sequential kernel runs sequences"
    if any(isinstance(c, CHUNKWISE) for c in ctx.plan.candidates[form.stage]):   # matched once, by lower()
        return "a linear stage with a chunkwise form: that form runs (a time loop would leave the GPU idle)"
    try:
        SeqKernel(ctx.ir, ctx.plan.stages[form.stage], list(form.core), SourceNotes(ctx.ir))
    except NotEligible as why:
        return str(why)
    return None


def _seq_kernel_mode(form: SequentialLoop, ctx) -> str:
    """The plan's line for a stage the sequential kernel runs: its weights held in registers
    or streamed from global memory per step (SeqKernel.mode)."""
    from recdsl.torch_expr import SourceNotes

    from .seq_kernels import SeqKernel
    return SeqKernel(ctx.ir, ctx.plan.stages[form.stage], list(form.core), SourceNotes(ctx.ir)).mode()


def _wavefront_fits(form, ctx) -> str | None:
    """The generated wavefront kernel takes a grid cell whose step seq_kernels' generator
    expresses (grid_kernels.py); else the borrowed torch.wavefront runs, the reason in the plan."""
    from .grid_kernels import wavefront_why_not
    return wavefront_why_not(ctx.ir)


def _wavefront_mode(form, ctx) -> str:
    from recdsl.torch_expr import SourceNotes

    from .grid_kernels import GridKernel
    return GridKernel(ctx.ir, SourceNotes(ctx.ir)).mode()


def _borrowed(form: type, name: str | None = None, emit: str | None = None) -> Kernel:
    """The torch kernel of `form` (the one called `name`, else its first), run by the
    triton backend's driver."""
    k = next(k for k in torch_kernels.REGISTRY.kernels if k.form is form and name in (None, k.name))
    return Kernel(form, k.name, k.does, emit or k.emit, k.caps, borrowed="torch", accepts=k.accepts,
                  explain=k.explain)


REGISTRY = Registry("triton", (
    Kernel(Vectorised, "triton.driver_ops", "torch ops over B*T in the driver (GEMMs on cuBLAS); elementwise gate "
           "math goes into the kernels that read it", "_stage_vectorised", STEPWISE),
    Kernel(ElementScan, "triton.scan", "generated scan kernel: chunks of T with tl.associative_scan and a carry, "
           "gates in its prologue, outputs and readouts in its epilogue; derived backward kernel", "_stage_element",
           OWN),
    Kernel(BlockScan, "triton.block_scan", "generated k x k block scan kernel, derived backward", "_stage_block", OWN),
    Kernel(SequentialLoop, "triton.sequential", "generated sequential kernel: time loop on chip, states and "
           "recurrent weights in registers; backward a reverse-time loop of the step's VJP", "_stage_loop", OWN,
           accepts=_seq_kernel_fits, explain=_seq_kernel_mode),
    _borrowed(SequentialLoop, "torch.loop", emit="_torch_loop"),   # a device's tensors: not the C loop
    Kernel(ChunkDiag, "triton.chunk_diag", "Triton chunkwise kernels (chunk_kernels.py, MATH.md §3): the state "
           "before every chunk by a pass over chunks, outputs by tl.dot with exponents <= 0 (per-key decay exact on "
           "the diagonal sub-blocks; a decay of unknown sign as log|d| with its running sign on queries, keys and the final "
           "state); backward the reverse chunk pass and per-chunk dq, dk, dv, dg kernels; a call "
           "with a non-finite input runs torch's chunk form (causal under NaN; layer.ran says so)",
           "_triton_chunk_diag", CHUNK_DIAG_CAPS),   # reverse/varlen: the kernels'
    _borrowed(ChunkDiag),   # kept: the fallback should the entry above ever decline
    Kernel(ChunkDelta, "triton.chunk_delta", "Triton chunkwise delta-rule kernels (delta_kernels.py, MATH.md §4 "
           "WY/UT): per chunk (I + A)⁻¹ by forward substitution, W and U; the state before every chunk and the new "
           "values by a pass over chunks; outputs by tl.dot with exponents <= 0; backward the reverse chunk pass and "
           "per-chunk adjoint kernels (dq, dk, dv, dβ, dg); a call with a non-finite input runs torch's chunk form "
           "(layer.ran says so)",
           "_triton_chunk_delta", CHUNK_DIAG_CAPS),   # reverse/varlen: the kernels'; half inputs widened
    Kernel(HouseholderProducts, "triton.delta_product", "the steps interleaved into one delta rule over T*n steps on "
           "the Triton chunkwise delta-rule kernels (delta_kernels.py), a token's steps last first under reverse, read after "
           "each token's last applied step; cu_seqlens as the kernels' offsets times n (one launch for all sequences)",
           "_triton_delta_product", CHUNK_DIAG_CAPS),   # reverse/varlen: the kernels'; half inputs widened
    _borrowed(ChunkDelta),
    _borrowed(HouseholderProducts),
    Kernel(ChunkDPLR, "triton.chunk_dplr", "Triton chunkwise DPLR kernels (chunk_dplr_kernels.py, the WY/UT form of "
           "dplr.py): per chunk Γ, the four decayed scores (per-key decay exact on the diagonal sub-blocks), "
           "(I - A_ba)⁻¹ by forward substitution, W and Ũ; U and the state before every chunk by a pass over chunks; "
           "outputs by tl.dot with exponents <= 0; backward the reverse chunk pass (dU, the state adjoints before "
           "every chunk, dS0) and per-chunk kernels for dv, the scores' cotangents, dq / db by rows, dk / da by key "
           "rows, dg by a reverse cumulative sum; a call with a non-finite input runs torch's chunk form (layer.ran "
           "says so)",
           "_triton_chunk_dplr", CHUNK_DIAG_CAPS),   # reverse/varlen: the kernels'; half inputs widened
    Kernel(ChunkDPLR, "triton.dplr_recurrent", "Triton fused-recurrent kernels (dplr_kernels.py), not the chunkwise "
           "WY form: one program per (row, V block), state [K, BV] in registers, time loop in the kernel; backward a "
           "reverse-time loop recomputing states from checkpoints stored every 16 steps (adjoint Λ_{t-1} = "
           "(diag(e^{g_t}) + a_t b_tᵀ)ᵀ Λ_t + q_{t-1} do_{t-1}ᵀ), gradients of q, k, v, a, b, g and the initial state",
           "_triton_dplr", torch_kernels.CAPS),   # reverse/varlen: the runtime's
    _borrowed(ChunkDPLR),   # kept: the fallback should the entry above decline
    Kernel(torch_kernels.DenseSemiringScan, "triton.dense_semiring", "Triton semiring matrix-vector loop "
           "(semiring_kernels.py): one program per row walks time, the transition streamed in tiles of source states "
           "with an online (+) (any N); backward the reverse loop of the posterior / argmax weights",
           "_triton_dense_semiring", torch_kernels.CAPS, accepts=_dense_semiring_fits),   # reverse/varlen: the runtime's
    _borrowed(torch_kernels.DenseSemiringScan),
    Kernel(torch_kernels.Wavefront, "triton.wavefront", "generated wavefront kernel (grid_kernels.py): one program "
           "per batch row walks the anti-diagonals d = 0 .. X+Y-2, a diagonal's cells as tile rows, left / up states "
           "from the state grid written at d-1 (a barrier per diagonal); the state-free work and the outputs torch "
           "ops over the whole grid; backward the reverse sweep of the step's VJP", "_triton_wavefront", STEPWISE,
           accepts=_wavefront_fits, explain=_wavefront_mode),
    _borrowed(torch_kernels.Wavefront, "torch.wavefront"), _borrowed(torch_kernels.LevelSync),   # grids and DAGs: torch's graph.py
))
