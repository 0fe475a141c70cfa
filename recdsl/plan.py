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
    lowering: str                     # the best lowering for this class
    line: int | None = None           # the .rec line of the first update
    coefficients: dict[str, str] = field(default_factory=dict)   # a, b, log a, ... (sympy text)
    checks: list[str] = field(default_factory=list)              # what was verified, and how
    jacobian: str | None = None       # nonlinear stages: diagonal | block-diagonal (k=2) | dense
    jacobian_reason: str | None = None
    block: int | None = None          # block size (block-diagonal)
    rank: int | None = None           # low-rank stages
    decay: str | None = None          # scalar | vector | elementwise | identity
    backends: dict[str, str] = field(default_factory=dict)      # backend -> lowering or "cannot: why"
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
    backends: dict[str, str | None]   # backend -> None if it runs the whole cell, else why not
    seconds: float = 0.0
    ir: object = field(default=None, repr=False)   # the (rewritten) IR the plan describes

    def stage_of(self, state: str) -> StagePlan:
        for s in self.stages:
            if state in s.states:
                return s
        raise KeyError(state)

    def classes(self) -> dict[str, str]:
        """state -> class, the short form tests and tools compare against."""
        return {st: s.cls for s in self.stages for st in s.states}

    def __str__(self) -> str:
        return render(self)


def render(plan: Plan, verbose: bool = True) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in plan.dims.items())
    lines = [f"plan {plan.cell}  ({dims})" + (f"  over {plan.over}" if plan.over != "seq" else "")]
    if plan.hoisted:
        lines.append("  hoisted (all steps at once): " + "; ".join(plan.hoisted))
    for s in plan.stages:
        where = f" (line {s.line})" if s.line else ""
        head = f"  stage {s.index}: {', '.join(s.states)}{where}: {s.cls}"
        if s.detail:
            head += f", {s.detail}"
        lines.append(head + f" -> {s.lowering}")
        if verbose:
            lines.append(f"      why: {s.reason}")
            for k, v in s.coefficients.items():
                lines.append(f"      {k} = {v}")
            if s.jacobian:
                lines.append(f"      jacobian: {s.jacobian}" + (f" ({s.jacobian_reason})" if s.jacobian_reason else ""))
            for c in s.checks:
                lines.append(f"      checked: {c}")
            for b, how in s.backends.items():
                lines.append(f"      {b}: {how}")
    for o in plan.outputs:
        stages = ", ".join(str(i) for i in o.stages)
        lines.append(f"  output {o.name}: {o.kind}" + (f" of stage {stages}" if o.stages else "")
                     + (f" ({o.detail})" if o.detail else ""))
    for b, why in plan.backends.items():
        lines.append(f"  backend {b}: " + ("runs this cell" if why is None else f"cannot run it: {why}"))
    return "\n".join(lines)
