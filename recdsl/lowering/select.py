"""Kernel registries and the `select` pass: per stage and backend, which form runs on
which kernel -- decided once, here, and read by everything after it.

A backend declares a Registry: one Kernel per form it implements, with typed
capabilities, in the order it prefers them. A kernel borrowed from another backend (a
fallback) is an entry like any other, with its own capabilities and `borrowed` naming
the backend whose code runs, so it is never inherited silently. `select` walks a stage's
candidates best first and takes the first one some kernel of the registry accepts; every
candidate passed over is kept with the reason."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .forms import Form, Rejection


@dataclass(frozen=True)
class Caps:
    """What a kernel can do. reverse / varlen: "kernel" when the kernel indexes time
    backwards / per packed sequence itself; "runtime" when the runtime must flip the
    sequence / split it into one call per sequence around it."""
    reverse: str = "runtime"
    varlen: str = "runtime"
    heads: bool = True
    grad: bool = True
    dtypes: tuple[str, ...] = ("float32", "float64")   # compute dtypes (bf16/fp16 inputs compute in fp32)

    @property
    def native(self) -> bool:
        return self.reverse == "kernel" and self.varlen == "kernel"


@dataclass(frozen=True)
class Kernel:
    form: type                          # the Form subclass it runs
    name: str                           # e.g. "torch.chunk_diag"
    does: str                           # one line: how it runs the form
    emit: str                           # the method of the backend's emitter that emits it
    caps: Caps = Caps()
    borrowed: str | None = None         # the backend whose code this fallback runs
    accepts: Callable | None = field(default=None, compare=False)   # (form, ctx) -> None | why not
    explain: Callable | None = field(default=None, compare=False)   # (form, ctx) -> what runs in which mode

    def why_not(self, form: Form, ctx) -> str | None:
        return self.accepts(form, ctx) if self.accepts is not None else None


@dataclass(frozen=True)
class Registry:
    backend: str
    kernels: tuple[Kernel, ...]
    oracle: bool = False                # runs every stage as written (the reference): no rejections to show

    def for_form(self, form: Form) -> list[Kernel]:
        return [k for k in self.kernels if k.form is type(form)]


@dataclass(frozen=True)
class Passed:
    """A candidate select passed over, and why."""
    title: str
    reason: str
    form: object = field(default=None, compare=False, repr=False)
    kernel: str | None = None           # the kernel that declined it (None: no kernel for the form)

    def summary(self) -> str:
        return f"{self.title}: {self.reason}"


@dataclass
class Choice:
    stage: int
    states: tuple[str, ...]
    form: Form
    kernel: Kernel
    passed: list[Passed] = field(default_factory=list)
    note: str = ""                       # what the kernel said about this form (variants by mode)

    def summary(self) -> str:
        by = f" (fallback: {self.kernel.borrowed} code)" if self.kernel.borrowed else ""
        return f"{self.form.summary()} -> {self.kernel.name}{by}"


@dataclass
class Selection:
    backend: str
    stages: list[Choice]
    cannot: str | None = None            # why the backend runs no stage of this cell
    native: bool = False                 # reverse and cu_seqlens go to the kernels (no flip, no split)
    oracle: bool = False                 # the reference: runs every stage as written

    def choice(self, stage: int) -> Choice:
        return self.stages[stage]


class NoKernel(Exception):
    """No candidate of a stage is accepted by the backend (a registry without a loop kernel)."""


def select(registry: Registry, candidates: list[list], ctx) -> Selection:
    """Per stage (its candidates best first), the first form a kernel of `registry` accepts.
    Native reverse / cu_seqlens: every kernel takes them and no value is shifted in time."""
    stages = [_select_stage(registry, cands, ctx) for cands in candidates]
    native = all(c.kernel.caps.native for c in stages) and not ctx.shifts
    return Selection(registry.backend, stages, native=native, oracle=registry.oracle)


def _select_stage(registry: Registry, cands: list, ctx) -> Choice:
    """The backend's own kernels first (every candidate in order), then its fallbacks."""
    passed: list[Passed] = []
    for borrowed in (False, True):
        for cand in cands:
            if isinstance(cand, Rejection):
                if not borrowed:
                    passed.append(Passed(cand.title, cand.reason + (f" (line {cand.line})" if cand.line else "")))
                continue
            kernels = [k for k in registry.for_form(cand) if (k.borrowed is not None) == borrowed]
            if not kernels and not borrowed:
                fallback = any(k.borrowed for k in registry.for_form(cand))
                passed.append(Passed(cand.summary(), f"no {registry.backend} kernel for this form"
                                     + (" (a fallback runs it if nothing else does)" if fallback else ""), cand))
            for kernel in kernels:
                why = kernel.why_not(cand, ctx)
                if why is None:
                    note = kernel.explain(cand, ctx) if kernel.explain is not None else ""
                    # the fallback that runs a form is not a reason to list the form as passed over
                    kept = [p for p in passed if p.form is not cand or p.kernel is not None]
                    return Choice(cand.stage, cand.states, cand, kernel, kept, note)
                passed.append(Passed(f"{cand.summary()} [{kernel.name}]", why, cand, kernel.name))
    raise NoKernel(f"{registry.backend}: no kernel runs any candidate of stage {cands[-1].stage}")
