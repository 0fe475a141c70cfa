"""Deliberately injected backend bugs, for testing the fuzzer itself (test-only).

Nothing here runs unless asked: `inject("chunk-carry")` (or RECDSL_FUZZ_INJECT=chunk-carry
in the environment of `recdsl fuzz`) swaps the torch backend's chunkwise scan for a copy
with an off-by-one in the carry between chunks (chunk n is carried with the decay of
chunk n-1). It only shows on sequences longer than one chunk (T > 64), on the training
path of matrix states with a decay. `restore()` undoes it."""
from __future__ import annotations

import inspect
import os

ENV = "RECDSL_FUZZ_INJECT"
_saved: dict = {}

BUGS = {
    # name: (module, function, original text, buggy text)
    "chunk-carry": ("chunk_diag", "S = decay_c[:, n] * S + U[:, n]", "S = decay_c[:, max(n - 1, 0)] * S + U[:, n]"),
}


def buggy(name: str):
    """The buggy copy of the function that bug `name` replaces."""
    from recdsl.backends.torch import scans
    func, old, new = BUGS[name]
    src = inspect.getsource(getattr(scans, func))
    if old not in src:
        raise RuntimeError(f"cannot inject {name}: `{old}` is no longer in scans.{func}")
    ns = dict(vars(scans))
    exec(compile(src.replace(old, new), f"<injected {name}>", "exec"), ns)
    return ns[func]


def inject(name: str) -> None:
    from recdsl.backends.torch import scans
    func = BUGS[name][0]
    _saved.setdefault(func, getattr(scans, func))
    setattr(scans, func, buggy(name))


def restore() -> None:
    from recdsl.backends.torch import scans
    for func, f in _saved.items():
        setattr(scans, func, f)
    _saved.clear()


def from_env() -> str | None:
    """Inject the bug named by RECDSL_FUZZ_INJECT, if any; return its name."""
    name = os.environ.get(ENV)
    if name:
        if name not in BUGS:
            from recdsl.errors import RecError
            raise RecError(f"{ENV}={name}: no such injected bug", hint="known: " + ", ".join(BUGS))
        inject(name)
    return name
