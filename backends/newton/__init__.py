"""The `newton` backend: nonlinear stages with a diagonal or per-element block Jacobian
solved for all steps at once by Newton's method (DEER / ParaRNN, MATH.md §5); every other
stage runs the torch backend's kernel, borrowed explicitly (kernels.py).

`layer.newton_options` (solve.NewtonOptions: max_iters, tol, damping) says how it solves;
`layer.last_solve` reports each Newton stage's iterations and final residual. A solve that
diverges raises a RecError naming the cell, the stage and the iteration."""
from __future__ import annotations

from recdsl.ir import IRCell

from .kernels import REGISTRY  # noqa: F401  (the forms this backend runs, and how)

NAME = "newton"


def supports(ir: IRCell) -> str | None:
    if ir.over != "seq":
        return f"the newton backend runs sequences, not `over {ir.over}`"
    return None


def emit(plan, selection):
    """(source text, emitter) for the cell, as the selection says each stage runs."""
    from .codegen import NewtonEmitter
    em = NewtonEmitter(plan.ir, plan, selection)
    return em.program(), em


class Program:
    """The compiled forward of one cell: run(inputs, initial, params, heads, dtype, device)."""

    def __init__(self, plan, selection):
        import torch
        import torch.nn.functional as F

        from ..torch import fused_loop, scans, seq_rt
        from . import solve
        self.source, em = emit(plan, selection)
        self.ran: list[str] = []
        self.options = solve.NewtonOptions()
        self.last_solve: list = []    # solve.SolveReport per Newton stage, of the last forward
        stages = [solve.Stage(plan.ir.name, s["stage"], s["states"], self) for s in em.newton_stages]
        ns = {"torch": torch, "F": F, "seq_rt": seq_rt, "scans": scans, "fused_loops": em.fused,
              "fused_loop": fused_loop, "ran": self.ran, "newton": solve, "newton_stages": stages}
        import linecache
        import zlib
        fname = f"<recdsl newton {plan.ir.name} {zlib.crc32(self.source.encode()):08x}>"   # tracebacks show the line
        linecache.cache[fname] = (len(self.source), None, self.source.splitlines(True), fname)
        exec(compile(self.source, fname, "exec"), ns)
        self.fn = ns["forward"]

    def run(self, xs, st, params, heads, dtype, device):
        prefix_rank = 2 if heads else 1
        step_params = {n: p[None] for n, p in params.items()}         # [1, (heads,) ...]: a step's layout
        seq_params = {n: p[None, None] for n, p in params.items()}    # [1, 1, (heads,) ...]: the sequence's
        self.ran.clear()
        self.last_solve.clear()
        return self.fn(xs, st, params, step_params, seq_params, prefix_rank, dtype, device)


def build(ir: IRCell, plan, selection) -> Program:
    return Program(plan, selection)
