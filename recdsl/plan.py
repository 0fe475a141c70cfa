"""The Plan: what the analysis found and how each stage is to be run.

A Plan is plain data (stages, classes, coefficients, readouts, per-backend lowering or
the reason a backend cannot run a stage) with a text rendering for `recdsl check` and
`recdsl inspect --stage plan`."""
from __future__ import annotations

from dataclasses import dataclass, field

# The classes of LANGUAGE.md §4 (and the DAG ones of §6).
HOISTED = "hoisted"
DIAGONAL = "diagonal affine"
SEMIRING = "semiring affine"
BLOCK_DIAGONAL = "block-diagonal affine"
LOW_RANK = "identity + low rank"
DENSE = "dense affine"
NONLINEAR = "nonlinear"
DAG_LINEAR = "linear over a DAG"
CLASSES = (HOISTED, DIAGONAL, SEMIRING, BLOCK_DIAGONAL, LOW_RANK, DENSE, NONLINEAR, DAG_LINEAR)


@dataclass
class StagePlan:
    index: int
    states: list[str]
    cls: str
    detail: str                       # e.g. "scalar decay", "max-plus", "rank 2, gated (scalar)"
    reason: str                       # why this class, in words
    line: int | None = None           # the .rec line of the first update
    coefficients: dict[str, str] = field(default_factory=dict)   # a, b, log a, ... (sympy text)
    checks: list[str] = field(default_factory=list)              # what was verified, and how
    jacobian: str | None = None       # nonlinear stages: diagonal | block-diagonal (k=2) | dense
    jacobian_reason: str | None = None
    block: int | None = None          # block size (block-diagonal)
    rank: int | None = None           # low-rank stages
    decay: str | None = None          # scalar | vector | elementwise | identity
    decay_range: str | None = None    # the value range found for the decay (linear stages)
    transition: str | None = None     # semiring stages: "elementwise" (m' = max(m + a, b)) | "dense" (HMM, Viterbi)
    nodes: dict = field(default_factory=dict, repr=False)       # the coefficients as IR nodes, for backends


@dataclass
class OutputPlan:
    name: str
    kind: str                         # "linear readout" | "epilogue" | "hoisted"
    stages: list[int]
    detail: str = ""


@dataclass
class Plan:
    cell: str
    dims: dict[str, int]
    over: str
    stages: list[StagePlan]
    outputs: list[OutputPlan]
    hoisted: list[str]                # descriptions of what is computed for all steps at once
    seconds: float = 0.0
    ir: object = field(default=None, repr=False)   # the (rewritten) IR the plan describes
    warnings: list[str] = field(default_factory=list)   # e.g. a state that may grow without bound
    verified: bool = False            # the sympy / float64 checks ran (stage.checks)
    stability: object = None          # grids and DAGs: recdsl.analysis.stability.Stability (pLSTM's P-/D-mode)
    candidates: list = field(default_factory=list, repr=False)   # per stage: lowering forms, best first
    selections: dict = field(default_factory=dict)  # backend -> recdsl.lowering.Selection (what runs)

    @property
    def backends(self) -> dict[str, str | None]:
        """backend -> None if it runs the cell, else why not."""
        return {b: sel.cannot for b, sel in self.selections.items()}

    def stage_of(self, state: str) -> StagePlan:
        for s in self.stages:
            if state in s.states:
                return s
        raise KeyError(state)

    def form(self, k: int):
        """Stage k's best candidate form (backend-neutral; what runs is `selections`)."""
        from .lowering import Form
        return next(c for c in self.candidates[k] if isinstance(c, Form))

    def selected(self, backend: str, k: int):
        """The form backend runs for stage k."""
        return self.selections[backend].choice(k).form

    def classes(self) -> dict[str, str]:
        """state -> class, the short form tests and tools compare against."""
        return {st: s.cls for s in self.stages for st in s.states}

    def __str__(self) -> str:
        return render(self)


def render(plan: Plan, verbose: bool = True) -> str:
    """The plan as text: per stage its class, then per backend the selected form and
    kernel and every candidate passed over, with the reason (`recdsl check` is the
    non-verbose form; `inspect --stage plan` adds coefficients and checks)."""
    dims = ", ".join(f"{k}={v}" for k, v in plan.dims.items())
    lines = [f"plan {plan.cell}  ({dims})" + (f"  over {plan.over}" if plan.over != "seq" else "")]
    if plan.hoisted:
        lines.append("  hoisted (all steps at once): " + "; ".join(plan.hoisted))
    for s in plan.stages:
        where = f" (line {s.line})" if s.line else ""
        lines.append(f"  stage {s.index}: {', '.join(s.states)}{where}: {s.cls}" + (f", {s.detail}" if s.detail else ""))
        if s.decay_range:
            lines.append(f"      decay range: {s.decay_range}")
        if verbose:
            lines.append(f"      why: {s.reason}")
            for k, v in s.coefficients.items():
                lines.append(f"      {k} = {v}")
            if s.jacobian:
                lines.append(f"      jacobian: {s.jacobian}" + (f" ({s.jacobian_reason})" if s.jacobian_reason else ""))
            if s.transition:
                lines.append(f"      transition: {s.transition}")
            for c in s.checks:
                lines.append(f"      checked: {c}")
        lines += _render_choices(plan, s.index, verbose)
    for o in plan.outputs:
        stages = ", ".join(str(i) for i in o.stages)
        lines.append(f"  output {o.name}: {o.kind}" + (f" of stage {stages}" if o.stages else "")
                     + (f" ({o.detail})" if o.detail else ""))
    for b, sel in plan.selections.items():
        if sel.cannot:
            lines.append(f"  backend {b}: cannot run it: {sel.cannot}")
        else:
            lines.append(f"  backend {b}: runs this cell" + ("; reverse and cu_seqlens in its kernels"
                                                            if sel.native and not sel.oracle else ""))
    if plan.stability is not None:
        lines.append(f"  stability: {plan.stability.summary}")
    for w in plan.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def _render_choices(plan: Plan, k: int, verbose: bool) -> list[str]:
    out = []
    for b, sel in plan.selections.items():
        if sel.cannot:
            continue
        c = sel.stages[k]
        out.append(f"      {b}: {c.summary()}")
        if verbose and (c.note or c.kernel.does):
            out.append(f"          {c.note or c.kernel.does}")
        if not sel.oracle:
            out += [f"          passed over: {p.summary()}" for p in c.passed]
    return out
