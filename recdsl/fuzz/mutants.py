"""Mutants end to end: a mutated source (generator.mutate) is accepted or rejected with a
RecError by the front end, and an accepted one then plans, builds and runs a short forward
and backward on reference and the fuzzed backends -- or stops there with a RecError. Any
other exception, or a mutant that runs past its time limit, is a crash, written to --out
with its replay command.

`recdsl fuzz --mutants N` runs N mutants of the stdlib; the generated-cell fuzz runs the
mutants of each generated cell the same way."""
from __future__ import annotations

import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import recdsl
from recdsl.errors import RecError

from .generator import mutate

TIME_LIMIT_S = 30.0   # a mutant that plans, builds and runs T=3 for longer is counted as a hang


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise Hang after `seconds` (main thread only: elsewhere, no limit can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_):
        raise Hang(f"still running after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_mutant(src: str, backends: list[str]) -> bool:
    """Check, plan, build and run `src` on reference and `backends`. True if it ran; False if
    it was rejected with a RecError (which must render); anything else propagates."""
    try:
        for spec in recdsl.load_all(src):
            spec.plan()
            for backend in ["reference", *backends]:
                _run_briefly(spec, backend)
        return True
    except RecError as e:
        str(e)
        return False


def _run_briefly(spec, backend: str) -> None:
    layer = spec(backend=backend, **spec.analysis_dims())
    if layer.ir.over != "seq":
        return
    heads = (layer.heads,) if layer.heads else ()
    gen = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(1, 3, *heads, *layer.ir.concrete(v.shape), generator=gen).requires_grad_()
          for n, v in spec.cell.inputs.items()}
    out, _ = layer(**xs)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(o.float().sum() for o in outs)
    if total.requires_grad:
        total.backward()


@dataclass
class MutantReport:
    mutants: int = 0
    ran: int = 0
    rejected: int = 0
    crashes: list = field(default_factory=list)   # (source, "Type: message", path)
    seconds: float = 0.0

    @property
    def hangs(self) -> int:
        return sum(what.startswith("Hang") for _, what, _ in self.crashes)

    def summary_line(self) -> str:
        return (f"mutants: {self.mutants}, {self.ran} ran, {self.rejected} rejected with a RecError, "
                f"{len(self.crashes) - self.hangs} internal errors, {self.hangs} hangs")


def try_mutant(report, src: str, backends: list[str], out) -> None:
    """Run one mutant into `report` (a MutantReport, or the fuzz Report's frontend fields)."""
    try:
        with time_limit(TIME_LIMIT_S):
            ran = run_mutant(src, backends)
    except Exception as e:   # noqa: BLE001 -- every other exception is the finding
        record_crash(report.crashes, src, e, out)
        return
    report.ran += ran
    report.rejected += not ran


def record_crash(crashes: list, src: str, e: BaseException, out) -> None:
    path = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"mutant-{len(crashes) + 1}.rec"
        path.write_text(src)
        with open(out / "README", "a") as f:
            f.write(f"{path.name}: {type(e).__name__}: {e}; replay: recdsl fuzz --cells {path} --trials 1\n")
    crashes.append((src, f"{type(e).__name__}: {e}", str(path) if path else None))


def stdlib_mutants(n: int, seed: int = 0, backends: list[str] = ("torch",), sources: list[str] | None = None,
                   out=None, progress=None) -> MutantReport:
    """`n` mutants of the stdlib cells (or of `sources`), each run end to end."""
    from recdsl.spec import stdlib_files
    sources = sources or [p.read_text() for p in stdlib_files().values()]
    rng = random.Random(seed)
    report = MutantReport()
    t0 = time.monotonic()
    for i in range(n):
        report.mutants += 1
        try_mutant(report, mutate(rng.choice(sources), rng), list(backends), out)
        if progress is not None:
            progress(i + 1, report)
    report.seconds = time.monotonic() - t0
    return report
