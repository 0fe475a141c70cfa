"""Differential runs: one cell, random inputs and shapes, every backend against `reference`.

A `Case` is everything needed to replay a run exactly: the source, the dims, B, T, dtype,
whether gradients are taken (training path, autograd) or not (torch.no_grad(): the
backend's inference kernels), heads, reverse, a random initial state, packed sequences
(`cu_seqlens`: B = 1, inputs [1, sum(lengths), ...], one initial and one final state per
sequence, empty and one-step sequences included), and the seed of the data. `run_case`
builds the modules afresh (nothing is cached across cases), runs the reference once and
each other backend on the same data and the same parameters, and compares outputs, final
states and gradients (inputs, params, initial states) within dtype-aware tolerances.

A case is written to a .rec file with a `# fuzz-case:` comment line, so that
`recdsl fuzz --cells FILE` replays it exactly."""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import torch

import recdsl
from recdsl.errors import RecError

# Tolerances: |backend - reference| <= atol + rtol * max|reference|, per tensor.
TOLERANCES = {
    # dtype: (forward rtol, atol), (gradient rtol, atol)
    "float64": ((1e-8, 1e-10), (1e-8, 1e-10)),
    "float32": ((2e-4, 2e-5), (2e-3, 1e-4)),
}

# Inputs whose name suggests a log gate get negative values (for the user's own cells;
# generated cells are tame whatever the data).
LOG_GATE_NAMES = ("gk", "g", "gv", "w", "log_decay", "lf", "logf")

CASE_RE = re.compile(r"^# fuzz-case: (\{.*\})\s*$", re.M)


@dataclass
class Case:
    source: str
    dims: dict
    B: int = 2
    T: int = 5
    dtype: str = "float64"
    grad: bool = True
    heads: int | None = None
    reverse: bool = False
    init_state: bool = False
    seed: int = 0
    origin: str = "generated"       # "generated" or the path of the user's file
    cell: str | None = None         # which cell of a multi-cell file
    cu_seqlens: list | None = None  # packed sequences (B = 1): offsets 0 = c0 <= c1 <= ... <= cn = T

    def offsets(self) -> list[int] | None:
        """cu_seqlens fitted to T: the shrinker shortens T alone, so offsets past T are cut
        to T and the last one is T (the sequences at the end get shorter or empty)."""
        if self.cu_seqlens is None:
            return None
        cu = [0] + [min(max(int(c), 0), self.T) for c in self.cu_seqlens[1:-1]] + [self.T]
        for i in range(1, len(cu)):
            cu[i] = max(cu[i], cu[i - 1])
        return cu

    def n_sequences(self) -> int:
        """The batch of the states: B, or the number of packed sequences."""
        cu = self.offsets()
        return self.B if cu is None else len(cu) - 1

    def modes(self) -> list[str]:
        """The run modes of this case, for the report's distribution."""
        out = [m for m, on in (("reverse", self.reverse), ("heads", bool(self.heads)),
                               ("initial state", self.init_state), ("cu_seqlens", self.cu_seqlens is not None),
                               ("no_grad", not self.grad), ("float32", self.dtype == "float32"),
                               ("T > 64", self.T > 64)) if on]
        return out or ["plain"]

    def config(self) -> dict:
        d = asdict(self)
        for k in ("source", "origin"):
            d.pop(k)
        if self.cu_seqlens is None:
            d.pop("cu_seqlens")   # as files written before packed sequences
        else:
            d["cu_seqlens"] = self.offsets()
        return d

    def describe(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.dims.items())
        return (f"dims {dims or '-'} B={self.B} T={self.T} {self.dtype} {'grad' if self.grad else 'no_grad'}"
                + (f" heads={self.heads}" if self.heads else "") + (" reverse" if self.reverse else "")
                + (" initial-state" if self.init_state else "")
                + (f" cu_seqlens={self.offsets()}" if self.cu_seqlens is not None else "") + f" seed={self.seed}")

    def to_file(self) -> str:
        """The source with the case in a leading comment (still a valid .rec file)."""
        return f"# fuzz-case: {json.dumps(self.config(), sort_keys=True)}\n" + self.source

    @staticmethod
    def from_file(text: str, origin: str) -> "Case | None":
        m = CASE_RE.search(text)
        if not m:
            return None
        cfg = json.loads(m.group(1))
        return Case(source=text, origin=origin, **cfg)


@dataclass
class Mismatch:
    backend: str
    what: str          # "output y", "state h", "grad x", "grad p", "grad state h", "error", "nonfinite"
    err: float
    tol: float
    detail: str = ""
    where: str = ""    # errors: the innermost function outside torch that raised (element_scan, forward)

    def __str__(self) -> str:
        if self.what == "error":
            return f"{self.backend}: raised {self.detail}" + (f" (in {self.where})" if self.where else "")
        return f"{self.backend}: {self.what} differs by {self.err:.3g} (tolerance {self.tol:.3g}){self.detail}"


@dataclass
class Result:
    case: Case
    classes: list = field(default_factory=list)      # per stage: "class: lowering"
    runs: int = 0                                     # backend runs (reference excluded)
    declined: dict = field(default_factory=dict)      # backend -> why it cannot run the cell
    mismatches: list = field(default_factory=list)
    skipped: str | None = None                        # why the case was not compared (reference not finite)

    @property
    def ok(self) -> bool:
        return not self.mismatches


# ---------------------------------------------------------------------------- cases
def random_dims(spec, rng: random.Random) -> dict:
    """Small sizes (2-5) for the cell's dims without a default; defaults kept."""
    out = {}
    for name, var in spec.cell.dims.items():
        if var.default is None:
            out[name] = rng.randint(2, 5)
    return out


# How often each run mode is drawn (independently): every one in at least 10 % of the cases.
MODE_P = {"reverse": 0.2, "heads": 0.15, "init_state": 0.2, "cu_seqlens": 0.2}


def random_packing(T: int, rng: random.Random) -> list[int]:
    """cu_seqlens for T packed steps: 1 to 3 sequences of random lengths, often with an
    empty one and a one-step one among them, in random order."""
    lengths = []
    if rng.random() < 0.6:
        lengths.append(0)
    if rng.random() < 0.6 and T >= 2:
        lengths.append(1)
    rest = T - sum(lengths)
    cuts = sorted(rng.sample(range(1, rest), min(rng.randint(0, 2), rest - 1))) if rest > 1 else []
    lengths += [b - a for a, b in zip([0] + cuts, cuts + [rest])]
    if len(lengths) < 2:
        lengths.append(0)
    rng.shuffle(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def random_case(source: str, rng: random.Random, spec=None, origin: str = "generated",
                cell: str | None = None) -> Case:
    """A random configuration for a cell: mostly short sequences in float64 with gradients;
    sometimes T across chunk boundaries (64), float32, no_grad (inference kernels), and
    (each with the probability of MODE_P) heads, reverse, a random initial state, packed
    sequences (cu_seqlens, B = 1)."""
    if spec is None:
        spec = recdsl.load(source, cell) if cell else recdsl.load(source)
    r = rng.random()
    if r < 0.18:
        T = rng.choice([63, 64, 65, 66, 70, 97, 128, 129, 130])
    elif r < 0.25:
        T = rng.randint(10, 40)
    else:
        T = rng.randint(1, 9)
    grad = rng.random() < 0.75
    dtype = "float32" if rng.random() < 0.15 else "float64"
    heads = None
    if spec.cell.heads is None and rng.random() < MODE_P["heads"]:
        heads = 2
    B = rng.choice([1, 2, 2, 3])
    reverse = rng.random() < MODE_P["reverse"]
    init_state = rng.random() < MODE_P["init_state"]
    cu = None
    if rng.random() < MODE_P["cu_seqlens"]:
        T = max(T, 2)
        cu, B = random_packing(T, rng), 1
    return Case(source=source, dims=random_dims(spec, rng), B=B, T=T, dtype=dtype, grad=grad, heads=heads,
                reverse=reverse, init_state=init_state, seed=rng.randrange(2**31), origin=origin, cell=cell,
                cu_seqlens=cu)


# ---------------------------------------------------------------------------- running
def _dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


def _inputs(spec, layer, case: Case, gen: torch.Generator) -> dict:
    heads = (layer.heads,) if layer.heads else ()
    xs = {}
    for name, var in spec.cell.inputs.items():
        shape = (case.B, case.T) + heads + layer.ir.concrete(var.shape)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
        if case.origin != "generated" and name in LOG_GATE_NAMES:
            x = -x.abs()
        xs[name] = x.to(_dtype(case.dtype))
    return xs


def _outputs(o) -> tuple:
    return o if isinstance(o, tuple) else (o,)


def _finite(ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |b|) in float64; inf when the non-finite patterns differ."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        try:
            a = a.expand(b.shape)
        except RuntimeError:
            return float("inf"), 0.0
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not bool((fa == fb).all()):
        return float("inf"), 0.0
    if fb.any():
        d = float((a - b)[fb].abs().max())
        s = float(b[fb].abs().max())
    else:
        d = s = 0.0
    return d, s


class _Run:
    """One backend's outputs, final states and gradients on the case's data."""

    def __init__(self, layer, xs, st0, case: Case, weights: list, gen: torch.Generator):
        """weights: the cotangents of the outputs; empty: drawn here (from gen) and appended."""
        self.layer = layer
        cu = case.offsets()
        if case.grad:
            xs = {k: v.detach().clone().requires_grad_() for k, v in xs.items()}
            st = {k: v.detach().clone().requires_grad_() for k, v in st0.items()} if st0 is not None else None
            o, s = layer(**xs, state=st, reverse=case.reverse, cu_seqlens=cu)
            self.outs, self.states = _outputs(o), s
            if not weights:
                weights.extend(torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.dtype)
                               for a in self.outs)
            loss = sum((a * w).sum() for a, w in zip(self.outs, weights)) + sum(v.sum() for v in s.values())
            wrt = ([("input " + k, v) for k, v in xs.items()] + [("param " + k, p) for k, p in layer.named_parameters()]
                   + ([("initial state " + k, v) for k, v in st.items()] if st else []))
            wrt = [(n, t) for n, t in wrt if t.requires_grad]
            gs = torch.autograd.grad(loss, [t for _, t in wrt], allow_unused=True) if loss.requires_grad else \
                [None] * len(wrt)
            self.grads = {n: g for (n, _), g in zip(wrt, gs)}
        else:
            with torch.no_grad():
                o, s = layer(**xs, state=st0, reverse=case.reverse, cu_seqlens=cu)
            self.outs, self.states = _outputs(o), s
            self.grads = {}


def build(spec, backend: str, case: Case):
    return spec(backend=backend, heads=case.heads, **case.dims).to(_dtype(case.dtype))


def load_spec(case: Case):
    return recdsl.load(case.source, case.cell) if case.cell else recdsl.load(case.source)


def stage_classes(spec, case: Case) -> list[str]:
    """Per stage and backend, "class: backend -> selected form (kernel)": the distribution of
    what the matchers and registries chose, for the report."""
    from recdsl.pipeline import plan_cell
    plan = plan_cell(spec.lower(**case.dims), verify=False)
    out = []
    for s in plan.stages:
        for b in ("torch", "triton"):
            sel = plan.selections[b]
            if not sel.cannot:
                c = sel.choice(s.index)
                out.append(f"{s.cls}: {b} -> {type(c.form).__name__} ({c.kernel.name})")
    return out


def run_case(case: Case, backends: list[str], classes: bool = True) -> Result:
    """Run the reference and every backend that accepts the cell; compare.

    A RecError from loading the cell propagates (the caller decides whether that is the
    user's mistake or a generator bug)."""
    spec = load_spec(case)
    res = Result(case)
    if classes:
        res.classes = stage_classes(spec, case)
    dtype = _dtype(case.dtype)
    torch.manual_seed(case.seed)
    ref = build(spec, "reference", case)
    gen = torch.Generator().manual_seed(case.seed)
    xs = _inputs(spec, ref, case, gen)
    st0 = None
    if case.init_state:
        base = ref.initial_state(case.n_sequences(), dtype)
        st0 = {k: (v.detach() + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64).to(dtype))
               for k, v in base.items()}
    names = list(spec.cell.states)
    out_names = list(ref.ir.outputs)
    weights: list = []
    try:
        r = _Run(ref, xs, st0, case, weights, gen)
    except RecError as e:
        res.declined["reference"] = e.message
        return res
    except Exception as e:  # the oracle crashed on a cell the checker accepted: a bug too
        res.mismatches.append(Mismatch("reference", "error", float("inf"), 0.0, f"{type(e).__name__}: {e}",
                                       _raised_in(e)))
        return res
    if not _finite(list(r.outs) + list(r.states.values()) + list(r.grads.values())):
        res.skipped = "the reference is not finite on this data"
        return res
    fwd_tol, grad_tol = TOLERANCES[case.dtype]
    for b in backends:
        try:
            layer = build(spec, b, case)
        except RecError as e:
            res.declined[b] = e.message
            continue
        except Exception as e:  # building the module crashed: a backend bug
            res.runs += 1
            res.mismatches.append(Mismatch(b, "error", float("inf"), 0.0,
                                           f"{type(e).__name__} while building the module: {e}", _raised_in(e)))
            continue
        layer.load_state_dict(ref.state_dict())
        res.runs += 1
        try:
            other = _Run(layer, xs, st0, case, weights, gen)
        except RecError as e:
            res.declined[b] = e.message
            continue
        except Exception as e:  # a crash of the backend on a cell it accepted is a disagreement
            res.mismatches.append(Mismatch(b, "error", float("inf"), 0.0, f"{type(e).__name__}: {e}", _raised_in(e)))
            continue
        selected = [c.kernel.name for c in layer.selection.stages]
        if layer.ran and layer.ran != selected:   # what the plan says runs must be what ran
            res.mismatches.append(Mismatch(b, "selection", float("inf"), 0.0,
                                           f"ran {layer.ran}, the selection says {selected}"))
        pairs = ([(f"output {n}", x, y, fwd_tol) for n, x, y in zip(out_names, other.outs, r.outs)]
                 + [(f"state {n}", other.states[n], r.states[n], fwd_tol) for n in names])
        for n, g_ref in r.grads.items():
            g_other = other.grads.get(n)
            if g_ref is None and g_other is None:
                continue
            if g_ref is None:
                g_ref = torch.zeros_like(g_other)
            if g_other is None:
                g_other = torch.zeros_like(g_ref)
            pairs.append((f"grad {n}", g_other, g_ref, grad_tol))
        for what, x, y, (rtol, atol) in pairs:
            d, s = _err(x, y)
            tol = atol + rtol * s
            if not d <= tol:
                res.mismatches.append(Mismatch(b, what, d, tol))
    return res


def _raised_in(e: BaseException) -> str:
    """The innermost function outside torch itself that the exception went through."""
    import os
    import traceback
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(torch_dir)]
    return frames[-1].name if frames else ""


def signature(m: Mismatch) -> str:
    """What kind of disagreement: "mismatch" (numbers differ), or the exception raised: its
    type, where (`_raised_in`) and the start of its message with numbers masked
    ("RuntimeError in dplr_stage: The expanded size of the tensor (#) must match"), so that a
    shrink keeps to the same crash, not to any crash of the same type."""
    if m.what != "error":
        return "mismatch"
    kind, _, msg = m.detail.partition(":")
    msg = re.sub(r"\d+", "#", msg.strip())
    msg = msg[:48].rsplit(" ", 1)[0] if len(msg) > 48 else msg   # whole words
    return kind + (f" in {m.where}" if m.where else "") + (f": {msg}" if msg else "")


def disagrees(case: Case, backend: str, kinds: set | None = None) -> bool:
    """Whether `backend` disagrees with the reference on this case, in one of the ways of
    `kinds` (signatures; None: any). False if the cell no longer loads, the backend
    declines it, or the reference is not finite or fails."""
    try:
        res = run_case(case, [backend], classes=False)
    except Exception:
        return False
    return any(m.backend == backend and (kinds is None or signature(m) in kinds) for m in res.mismatches)


# ---------------------------------------------------------------------------- the fuzz loop
@dataclass
class Failure:
    case: Case
    backend: str
    mismatches: list
    shrunk: Case | None = None
    path: str | None = None          # the reproducer written to --out

    def summary(self) -> str:
        return "; ".join(str(m) for m in self.mismatches[:3]) + (" ..." if len(self.mismatches) > 3 else "")


@dataclass
class Report:
    seed: int
    backends: list
    cells: int = 0
    distinct: int = 0
    runs: int = 0
    skipped: int = 0
    failures: list = field(default_factory=list)
    histogram: dict = field(default_factory=dict)     # "class: lowering" -> stages seen
    declined: dict = field(default_factory=dict)      # backend -> cells it declined
    mutants: int = 0
    mutants_accepted: int = 0
    frontend_crashes: list = field(default_factory=list)   # (source, "Type: message", path)
    seconds: float = 0.0
    tags: dict = field(default_factory=dict)          # generator spelling tag -> generated cells using it
    modes: dict = field(default_factory=dict)         # run mode (Case.modes) -> cases run in it

    @property
    def disagreements(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.frontend_crashes

    def summary_line(self) -> str:
        return f"fuzz: {self.cells} cells, {self.runs} backend runs, {self.disagreements} disagreements"

    def class_lines(self, tags: bool = True) -> list[str]:
        """The classes and lowerings of the stages seen; then (tags) the modes and spelling
        tags (tag_lines)."""
        by_class: dict = {}
        for key, n in self.histogram.items():
            cls = key.split(":")[0]
            by_class[cls] = by_class.get(cls, 0) + n
        from recdsl.plan import CLASSES
        lines = ["classes (stages seen):"]
        for cls in CLASSES:
            lines.append(f"  {cls:<24} {by_class.get(cls, 0):>6}")
            for key in sorted(k for k in self.histogram if k.split(":")[0] == cls):
                lines.append(f"      {key.split(': ', 1)[1]:<52} {self.histogram[key]:>6}")
        return lines + (self.tag_lines() if tags else [])

    def tag_lines(self, width: int = 100) -> list[str]:
        """The run modes of the cases and the generator's spelling tags of the cells (how
        many used each), grouped by the tag's prefix; tags never drawn are listed as such."""
        lines = []
        if self.modes:
            lines.append("modes (cases): " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items())))
        if not self.tags:
            return lines
        from .generator import TAGS
        lines.append("spellings (generated cells using each):")
        groups: dict = {}
        for t in list(TAGS) + sorted(t for t in self.tags if t not in TAGS):
            head, _, rest = t.rpartition(".")
            groups.setdefault(head, []).append(f"{rest} {self.tags.get(t, 0)}")
        for head, items in groups.items():
            rows = [[]]
            for item in items:  # wrapped at `width`
                if rows[-1] and 16 + len(", ".join(rows[-1] + [item])) > width:
                    rows.append([])
                rows[-1].append(item)
            lines += [f"  {(head + ':') if i == 0 else '':<14}{', '.join(r)}" for i, r in enumerate(rows)]
        unseen = [t for t in TAGS if not self.tags.get(t)]
        if unseen:
            lines.append(f"  not drawn: {len(unseen)} of {len(TAGS)} ({', '.join(unseen[:8])}"
                         + (", ..." if len(unseen) > 8 else "") + ")")
        return lines


def available_backends() -> list[str]:
    from recdsl.runtime import BUILT
    return [b for b in BUILT if b != "reference"]


def default_backends() -> list[str]:
    """What a run compares when not told: every built backend that runs at speed here --
    triton only on a GPU (in Triton's interpreter a cell takes seconds; ask for it with
    --backends triton)."""
    import torch
    return [b for b in available_backends() if b != "triton" or torch.cuda.is_available()]


def check_backends(names: list[str] | None) -> list[str]:
    known = available_backends()
    if not names:
        return default_backends()
    bad = [n for n in names if n not in known]
    if bad:
        from recdsl.runtime import BACKENDS
        extra = " (reference is the oracle every backend is compared with)" if "reference" in bad else ""
        raise RecError(f"unknown or unbuilt backend '{bad[0]}'{extra}",
                       hint="built: " + ", ".join(known) + "; planned: "
                       + ", ".join(b for b in BACKENDS if b not in known and b not in ("auto", "reference")))
    return names


def _frontend(report: Report, source: str, rng: random.Random, n: int, out) -> None:
    """Mutants of `source`: accepted (run end to end on the fuzzed backends, mutants.py, and
    printed back to the same tree) or rejected with a RecError that renders."""
    from recdsl.parser import parse
    from recdsl.printer import to_source
    from .generator import mutate
    from .mutants import TIME_LIMIT_S, run_mutant, time_limit
    for _ in range(n):
        src = mutate(source, rng)
        report.mutants += 1
        try:
            with time_limit(TIME_LIMIT_S):
                if run_mutant(src, report.backends):
                    tree = parse(src, "mutant.rec")
                    if parse(to_source(tree)) != tree:
                        raise AssertionError("printing the accepted mutant back does not give the same tree")
                    report.mutants_accepted += 1
        except Exception as e:
            _crash(report, src, e, out)


def _crash(report: Report, src: str, e: Exception, out) -> None:
    from .mutants import record_crash
    record_crash(report.frontend_crashes, src, e, out)


def _unpacked(case: Case, backend: str, kinds: set | None) -> Case:
    """The case without cu_seqlens (one sequence of the same T) if the backend still
    disagrees on it: the shrinker then starts from the simpler run."""
    if case.cu_seqlens is None:
        return case
    plain = replace(case, cu_seqlens=None, B=1)
    return plain if disagrees(plain, backend, kinds) else case


def _record(report: Report, res: Result, shrink_budget: float, out, seed: int, do_shrink: bool) -> None:
    from .shrink import shrink
    by_backend: dict = {}
    for m in res.mismatches:
        by_backend.setdefault(m.backend, []).append(m)
    for b, ms in by_backend.items():
        fail = Failure(res.case, b, ms)
        if do_shrink and b != "reference":
            kinds = {signature(m) for m in ms}
            try:
                fail.shrunk = shrink(_unpacked(res.case, b, kinds), b, budget_s=shrink_budget, kinds=kinds)
                fail.shrunk = _unpacked(fail.shrunk, b, kinds)   # the shrinker keeps cu_seqlens as it is
            except Exception:  # shrinking is best effort; the original case still reproduces
                fail.shrunk = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            name = f"{b}-{len(report.failures) + 1}-seed{seed}"
            best = fail.shrunk or res.case
            (out / f"{name}.rec").write_text(best.to_file())
            if fail.shrunk is not None:
                (out / f"{name}.orig.rec").write_text(res.case.to_file())
            fail.path = str(out / f"{name}.rec")
            with open(out / "README", "a") as f:
                f.write(f"{name}.rec: {fail.summary()} [{best.describe()}]; replay: "
                        f"recdsl fuzz --cells {out / (name + '.rec')} --seed {seed} --backends {b}\n")
        report.failures.append(fail)


def fuzz(seconds: float = 60.0, seed: int = 0, backends: list[str] | None = None, files: list = (),
         out=None, max_cells: int | None = None, shrink: bool = True, shrink_budget: float = 60.0,
         frontend: bool = True, mutants_per_cell: int = 3, trials: int = 8,
         stop_when: Callable | None = None, progress: Callable | None = None) -> Report:
    """Generate cells (or take `files`) and run them on every backend against `reference`
    until `seconds` have passed (or `max_cells`, or stop_when(report) is true after a cell).
    progress(elapsed_s, report) is called after each cell."""
    from pathlib import Path

    from . import inject
    from .generator import generate_tagged
    backends = check_backends(list(backends) if backends else None)
    out = Path(out) if out is not None else None
    inject.from_env()
    report = Report(seed=seed, backends=backends)
    rng = random.Random(seed)
    t0 = time.monotonic()
    seen: set = set()

    def jobs() -> Iterator[tuple[Case, bool, list]]:
        """(case, generated?, the generator's spelling tags)"""
        if files:
            for f in files:
                text, name = _read_cell_file(f)
                fixed = Case.from_file(text, name)
                specs = recdsl.load_all(Path(name) if Path(name).exists() else text)
                if fixed is not None:
                    fixed.source = text
                    if fixed.cell is None and len(specs) > 1:
                        raise RecError(f"{name}: the fuzz-case line names no cell and the file has {len(specs)}")
                    yield fixed, False, []
                    continue
                for k in range(trials):
                    for s in specs:
                        yield random_case(text, rng, s, origin=name,
                                          cell=s.name if len(specs) > 1 else None), False, []
            return
        i = 0
        while True:
            cell_rng = random.Random(rng.randrange(2**63))
            src, tags = generate_tagged(cell_rng)
            try:
                spec = recdsl.load(src)
            except RecError as e:  # a bug of the generator
                raise RuntimeError(f"the fuzz generator made a cell the checker rejects:\n{src}\n{e}") from None
            yield random_case(src, cell_rng, spec), True, tags
            i += 1

    for case, generated, tags in jobs():
        if report.cells and (time.monotonic() - t0 >= seconds or (max_cells and report.cells >= max_cells)):
            break
        res = run_case(case, backends)
        report.cells += 1
        if case.source not in seen:
            seen.add(case.source)
            report.distinct += 1
        report.runs += res.runs
        for t in tags:
            report.tags[t] = report.tags.get(t, 0) + 1
        for m in case.modes():
            report.modes[m] = report.modes.get(m, 0) + 1
        for key in res.classes:
            report.histogram[key] = report.histogram.get(key, 0) + 1
        for b in res.declined:
            report.declined[b] = report.declined.get(b, 0) + 1
        if res.skipped:
            report.skipped += 1
        if res.mismatches:
            _record(report, res, shrink_budget, out, seed, shrink)
        if frontend and generated:
            _frontend(report, case.source, rng, mutants_per_cell, out)
        if progress is not None:
            progress(time.monotonic() - t0, report)
        if stop_when is not None and stop_when(report):
            break
    if frontend and files:
        for f in files:
            _frontend(report, _read_cell_file(f)[0], rng, 20, out)
    report.seconds = time.monotonic() - t0
    return report


def _read_cell_file(f) -> tuple[str, str]:
    from recdsl.spec import _resolve
    from pathlib import Path
    text, name = _resolve(Path(f) if Path(f).exists() else str(f))
    return text, name
