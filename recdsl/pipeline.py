"""The compile pipeline, as named stages that everything calls:

    ast      the checked cell (parse + check: recdsl.load)
    ir       one step as a graph, for concrete dims
    plan     the analysis: stages, classes, coefficients, value ranges (passes traced)
    select   per backend, the form and kernel of every stage (recdsl.lowering)
    emit     the chosen backend's generated code
    build    the runnable program

`recdsl.load(...)(...)` (the module), `recdsl check`, `recdsl inspect --stage` and the
fuzzer all go through `compile_cell`; `layer.plan` is the plan it produced, and the
program runs exactly the selection recorded in it. `Compiled.stages()` is the dict of
every stage's result, to dump."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RecError
from .ir import IRCell

BUILT = ("reference", "torch", "triton")
# Built, but selected only when asked for (a module, `emit_cell`): the newton backend solves
# to a tolerance, so it is not in every plan, the fuzzer's backends or the parity matrix.
OPT_IN = ("newton",)


def backend_module(name: str):
    if name == "reference":
        from .backends import reference
        return reference
    if name == "torch":
        from .backends import torch as torch_backend
        return torch_backend
    if name == "triton":
        from .backends import triton as triton_backend
        return triton_backend
    if name == "newton":
        from .backends import newton as newton_backend
        return newton_backend
    raise RecError(f"no backend {name}", hint="built: " + ", ".join(BUILT))


@dataclass
class Compiled:
    ir: IRCell
    plan: object                          # recdsl.plan.Plan, with .selections for every built backend
    trace: dict = field(default_factory=dict)   # the analysis passes, as text
    backend: str | None = None
    program: object = None

    @property
    def selection(self):
        return self.plan.selections[self.backend]

    def stages(self) -> dict:
        """Every stage's result by name (what `recdsl inspect --stage` prints one of)."""
        out = {"ast": self.ir.checked.ast, "ir": self.ir, "passes": self.trace, "plan": self.plan,
               "select": self.plan.selections}
        if self.program is not None:
            out["emit"] = self.program.source
            out["build"] = self.program
        return out


def plan_cell(ir: IRCell, verify: bool = True, trace: dict | None = None, also: tuple = ()):
    """Rewrite, analyse, then select for every built backend: the Plan with its selections.
    The rewrites run before the analysis's own passes (reassociate first) and the plan keeps
    the rewritten cell (`plan.ir`, what the compiled backends run; the reference runs `ir`
    as written):

        split_concat  W @ concat(x, h) -> W[:, 0:D] @ x + W[:, D:] @ h, so that the x-part
                      hoists (recdsl.analysis.concat_split)"""
    from .analysis import analyze
    from .analysis.concat_split import split_concat_matmuls
    from .lowering import Selection, lower, select
    trace = trace if trace is not None else {}
    ir, split = split_concat_matmuls(ir)
    trace["split_concat"] = (f"{len(split)} matmul(s) by a concat split so that their state-free parts hoist"
                             + "".join(f"\n{line}" for line in split))
    plan = analyze(ir, trace, verify=verify)
    ctx, plan.candidates = lower(plan)
    for name in BUILT + tuple(b for b in also if b in OPT_IN):   # `also`: opt-in backends to select for too
        mod = backend_module(name)
        why = mod.supports(ir)
        plan.selections[name] = Selection(name, [], cannot=why) if why else select(mod.REGISTRY, plan.candidates, ctx)
    trace["select"] = "\n".join(f"{b}: " + (sel.cannot and f"cannot: {sel.cannot}" or
                                            "; ".join(f"stage {c.stage}: {c.summary()}" for c in sel.stages))
                                for b, sel in plan.selections.items())
    return plan


def _selected(ir: IRCell, backend: str, verify: bool, trace: dict):
    """The plan and `backend`'s selection; a located error if the backend cannot run the cell."""
    plan = plan_cell(ir, verify, trace, also=(backend,))
    sel = plan.selections[backend]
    if sel.cannot:
        raise RecError(sel.cannot, ir.checked.span)
    return plan, sel


def compile_cell(ir: IRCell, backend: str, verify: bool = False, trace: dict | None = None) -> Compiled:
    """ir -> plan -> select -> emit -> build, for one backend."""
    trace = trace if trace is not None else {}
    plan, sel = _selected(ir, backend, verify, trace)
    return Compiled(ir, plan, trace, backend, backend_module(backend).build(ir, plan, sel))


@dataclass
class Emitted:
    """The emit stage's result for one backend (what `recdsl inspect --stage torch|triton` prints)."""
    plan: object
    selection: object
    source: str                           # the generated forward / driver
    kernels: str | None = None            # the Triton kernel module (triton)
    emitter: object = None


def emit_cell(ir: IRCell, backend: str) -> Emitted:
    """ir -> plan -> select -> emit, for one backend (no build)."""
    plan, sel = _selected(ir, backend, False, {})
    if backend == "reference":
        return Emitted(plan, sel, backend_module("reference").emit_step(ir))
    out = backend_module(backend).emit(plan, sel)
    if backend == "triton":
        kernels, driver, em = out
        return Emitted(plan, sel, driver, kernels, em)
    source, em = out
    return Emitted(plan, sel, source, None, em)
