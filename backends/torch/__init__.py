"""The `torch` backend: vectorised torch for CPU (and a GPU fallback).

Hoisted work runs once over the whole sequence (input projections become one matmul over
B*T); each stage runs the kernel of its class: C scans (diagonal, semiring, block) with a
torch fallback, chunkwise forms for matrix states with diagonal decay and for the delta
rule, and a tight loop over only the recurrent core for dense and nonlinear stages.
`emit(ir, plan)` gives the generated source (`recdsl inspect --stage torch`)."""
from __future__ import annotations

from recdsl.ir import IRCell

NAME = "torch"


def supports(ir: IRCell) -> str | None:
    if ir.over != "seq":
        return (f"the torch backend runs sequences; `over {ir.over}` "
                f"(line {ir.checked.ast.span.line}) arrives with the grid/DAG backend")
    return None


def emit(ir: IRCell, plan=None):
    """(source text, per-stage lowerings) for the cell."""
    from recdsl.analysis import analyze

    from .codegen import Emitter
    plan = plan or analyze(ir, verify=False)
    em = Emitter(plan.ir, plan)
    src = em.program()
    return src, em.lowerings, em.fused


class Program:
    """The compiled forward of one cell: run(X, S0, params, heads, dtype, device)."""

    def __init__(self, ir: IRCell, plan=None):
        import torch
        import torch.nn.functional as F

        from . import fused_loop, scans, seq_rt
        self.source, self.lowerings, fused = emit(ir, plan)
        ns = {"torch": torch, "F": F, "rt": seq_rt, "K": scans, "FL": fused, "FUSED": fused_loop}
        exec(compile(self.source, f"<recdsl torch {ir.name}>", "exec"), ns)
        self.fn = ns["forward"]

    def run(self, xs, st, params, heads, dtype, device):
        nb = 2 if heads else 1
        P1 = {n: p[None] for n, p in params.items()}
        P2 = {n: p[None, None] for n, p in params.items()}
        return self.fn(xs, st, params, P1, P2, nb, dtype, device)


def build(ir: IRCell, plan=None) -> Program:
    return Program(ir, plan)
