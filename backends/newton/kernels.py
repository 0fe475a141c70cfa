"""The newton backend's kernel registry: its own kernel, the parallel Newton solve of a
nonlinear stage whose Jacobian the analysis proved diagonal or k x k per element, then
the torch kernels it runs for every other form -- each an explicit entry (`borrowed`), so
the plan says exactly what runs per stage: linear and hoisted stages keep torch's scans,
chunkwise forms and vectorised ops; a nonlinear stage with a dense Jacobian (LSTM, GRU)
runs torch's C loop, and its plan lists the Newton form as passed over with the reason."""
from __future__ import annotations

from recdsl.lowering import Kernel, NewtonSolve, Registry

from ..torch import kernels as torch_kernels

# reverse and cu_seqlens by the runtime (it flips / splits around the solve), as on torch
CAPS = torch_kernels.CAPS


def _newton_fits(form: NewtonSolve, ctx) -> str | None:
    """The forward-mode pass (codegen.py) needs a derivative rule for every op of the step."""
    from .codegen import unsupported
    bad = unsupported(form.core)
    if bad is not None:
        where = f" (line {bad.span.line})" if bad.span else ""
        return f"{bad.op.name.lower()}{where}: the forward-mode pass has no derivative rule for it"
    return None


def _newton_explain(form: NewtonSolve, ctx) -> str:
    scan = "torch.element_scan (C)" if form.block == 1 else f"torch.block_scan (C, {form.block}x{form.block})"
    return (f"Newton over all steps at once: per iteration the step and its Jacobian (forward mode, derived from "
            f"the IR) over B*T, the linearised recurrence by {scan}; damped, stopped on the max residual "
            "(layer.newton_options, layer.last_solve); backward one reverse scan + one vectorised VJP")


def _borrowed(form: type, name: str | None = None) -> Kernel:
    """The torch kernel of `form` (the one called `name`, else its first), run by the
    newton backend's forward (the torch emitter's method of the same name)."""
    k = next(k for k in torch_kernels.REGISTRY.kernels if k.form is form and name in (None, k.name))
    return Kernel(form, k.name, k.does, k.emit, k.caps, borrowed="torch", accepts=k.accepts, explain=k.explain)


REGISTRY = Registry("newton", (
    Kernel(NewtonSolve, "newton.solve", "parallel Newton (DEER / ParaRNN): the step and its diagonal / block "
           "Jacobian over all steps, the linearised recurrence by the C scans, damping, early stop",
           "_stage_newton", CAPS, accepts=_newton_fits, explain=_newton_explain),
    *(_borrowed(k.form, k.name) for k in torch_kernels.REGISTRY.kernels
      if k.form not in (torch_kernels.Wavefront, torch_kernels.LevelSync)),
))
