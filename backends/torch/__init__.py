"""The `torch` backend: vectorised torch for CPU (and a GPU fallback).

Hoisted work runs once over the whole sequence (input projections become one matmul over
B*T); each stage runs the kernel of its class: C scans (diagonal, semiring, block) with a
torch fallback, chunkwise forms for matrix states with diagonal decay and for the delta
rule, and a tight loop over only the recurrent core for dense and nonlinear stages.
`emit(ir, plan)` gives the generated source (`recdsl inspect --stage torch`)."""
from __future__ import annotations

from recdsl.ir import IRCell

from .kernels import REGISTRY  # noqa: F401  (the forms this backend runs, and how)

NAME = "torch"


def supports(ir: IRCell) -> str | None:
    if ir.over not in ("seq", "grid2d", "dag"):
        return f"the torch backend runs sequences, grids and DAGs, not `over {ir.over}`"
    return None   # grids and DAGs: graph.py (torch.wavefront / torch.level_sync)


def emit(plan, selection):
    """(source text, emitter) for the cell, as the selection says each stage runs."""
    if plan.ir.over != "seq":   # grids and DAGs: no generated sequence code, graph.py runs them
        from .graph import GraphProgram
        gp = GraphProgram(plan, selection)
        return gp.source, gp
    from .codegen import Emitter
    em = Emitter(plan.ir, plan, selection)
    return em.program(), em


class Program:
    """The compiled forward of one cell: run(inputs, initial, params, heads, dtype, device)."""

    def __init__(self, plan, selection):
        import torch
        import torch.nn.functional as F

        from . import fused_loop, scans, seq_rt
        self.source, em = emit(plan, selection)
        self.ran: list[str] = []      # the kernel of each stage, as the last forward executed them
        ns = {"torch": torch, "F": F, "seq_rt": seq_rt, "scans": scans, "fused_loops": em.fused,
              "fused_loop": fused_loop, "ran": self.ran}
        exec(compile(self.source, f"<recdsl torch {plan.ir.name}>", "exec"), ns)
        self.fn = ns["forward"]
        # layer.step(): one C call per token where the cell is one lane loop, else (no
        # attribute) the runtime runs the reference's step
        loop = fused_loop.FusedStep.eligible(plan.ir, em.fused, len(plan.stages))
        if loop is not None:
            from ..reference import build_step
            self.step = fused_loop.FusedStep(plan.ir, loop, build_step(plan.ir)[0])

    def run(self, xs, st, params, heads, dtype, device):
        prefix_rank = 2 if heads else 1
        step_params = {n: p[None] for n, p in params.items()}         # [1, (heads,) ...]: a step's layout
        seq_params = {n: p[None, None] for n, p in params.items()}    # [1, 1, (heads,) ...]: the sequence's
        self.ran.clear()
        return self.fn(xs, st, params, step_params, seq_params, prefix_rank, dtype, device)


def build(ir: IRCell, plan, selection) -> Program:
    if ir.over != "seq":
        from .graph import GraphProgram
        return GraphProgram(plan, selection)
    return Program(plan, selection)
