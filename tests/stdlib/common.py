"""Shared helpers of the stdlib tests: load a stdlib cell, build float64 layers with the
.rec initialisers, compare reference and torch backends, and compare against oracles
(implementations recdsl did not write). Every measured error is recorded in RECORD so that
tests/stdlib/make_table.py can print the max errors of docs/STDLIB.md."""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.lowering import Form
from recdsl.spec import stdlib_files

B, T = 2, 8
RECORD: dict[str, dict[str, float]] = {}    # cell -> {"backends": err, "oracle": err}
ORACLE: dict[str, str] = {}                  # cell -> the oracle's name


def record(cell: str, kind: str, err: float) -> None:
    d = RECORD.setdefault(cell, {})
    d[kind] = max(d.get(kind, 0.0), err)


def require(module: str):
    """Import an oracle package; a missing one is an error (not a skip): `make` installs
    them through the `oracles` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - only on a broken set-up
        raise AssertionError(f"oracle package {module!r} is missing ({e}); run `make setup` "
                             "(pip install -e '.[oracles]')") from e


def fla_naive(module: str, func: str):
    """A pure-torch naive kernel of flash-linear-attention (fla-core), loaded from its own
    file (fast, without the package's triton imports). Fails if fla-core is missing."""
    spec = importlib.util.find_spec("fla")
    assert spec is not None and spec.submodule_search_locations, \
        "oracle package fla-core is missing; run `make setup` (pip install -e '.[oracles]')"
    path = Path(list(spec.submodule_search_locations)[0], "ops", *module.split(".")).with_suffix(".py")
    assert path.exists(), f"this fla-core has no fla/ops/{module.replace('.', '/')}.py"
    s = importlib.util.spec_from_file_location(f"_fla_naive_{module.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return getattr(mod, func)


def rn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def make(name: str, seed: int = 0, backend: str = "reference", heads=None, **dims):
    """A float64 layer of stdlib cell `name`, parameters drawn from its initialisers."""
    torch.manual_seed(seed)
    layer = recdsl.load(name)(backend=backend, heads=heads, **dims).double()
    torch.manual_seed(seed)
    layer.reset_parameters()
    return layer


def P(layer, name):
    return getattr(layer, name).detach()


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def close(got, want, tol: float = 1e-9, what: str = "", cell: str | None = None, kind: str = "oracle"):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if cell:
        record(cell, kind, err)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.0e}"


def family_cells(family: str) -> list[str]:
    return sorted(n for n, p in stdlib_files().items() if p.parent.name == family)


# ---------------------------------------------------------------------------- the generic checks

def check_loads(name: str, expected: dict[str, str]):
    """(1) loads, checks, cites its paper, the analysis' own verifications pass, and the
    classes are `expected`."""
    spec = recdsl.load(name)
    assert spec.cell.over == "seq"
    doc = spec.doc or ""
    assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: the docstring cites no year"
    assert "arXiv:" in doc or "Journal" in doc or "JMLR" in doc or "Cognitive Science" in doc \
        or "Neural Computation" in doc, f"{name}: the docstring cites no paper id"
    plan = spec.plan()
    for s in plan.stages:
        assert s.reason and isinstance(plan.form(s.index), Form)
        for c in s.checks:
            assert "FAILED" not in c and "NOT" not in c, c
    assert plan.classes() == expected
    assert plan.backends.get("reference") is None and plan.backends.get("torch") is None
    return plan


def random_inputs(layer, Bn=B, Tn=T, seed=0, scale=0.5, logs=()):
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    xs = {}
    for n, v in layer.spec.cell.inputs.items():
        x = torch.randn((Bn, Tn) + heads + layer.ir.concrete(v.shape), dtype=torch.float64, generator=g) * scale
        xs[n] = -x.abs() if n in logs else x
    return xs


def check_backends(name: str, dims=None, heads=None, logs=("g", "gk", "w"), tol=1e-10, Tn=13):
    """(2) backend="torch" agrees with backend="reference" in float64: outputs and final
    states, from the zero and from a random initial state, with autograd on and under
    torch.no_grad(); input gradients too. The tolerance is relative to the outputs' size
    when they exceed 1 (online learners such as TTT grow with random inputs)."""
    spec = recdsl.load(name)
    dims = dims or spec.analysis_dims()
    ref = make(name, backend="reference", heads=heads, **dims)
    fast = recdsl.load(name)(backend="torch", heads=heads, **dims).double()
    fast.load_state_dict(ref.state_dict())
    xs = random_inputs(ref, Tn=Tn, logs=logs)
    _, st0 = ref(**xs)
    st0 = {k: v * 0.5 + 0.1 for k, v in st0.items()}
    worst, scale = 0.0, 1.0
    for state in (None, st0):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                xg = {k: v.clone().requires_grad_(grad) for k, v in xs.items()}
                o1, s1 = ref(**xg, state=state)
                o2, s2 = fast(**xg, state=state)
                o1, o2 = as_tuple(o1), as_tuple(o2)
                assert len(o1) == len(o2) and set(s1) == set(s2)
                for a, b in zip(o1, o2):
                    worst = max(worst, float((a - b).detach().abs().max()))
                    scale = max(scale, float(a.detach().abs().max()))
                    assert torch.isfinite(b).all()
                for k in s1:
                    worst = max(worst, float((s1[k] - s2[k]).detach().abs().max()))
                if grad:
                    l1 = sum((a * a).sum() for a in o1) + sum(v.sum() for v in s1.values())
                    l2 = sum((a * a).sum() for a in o2) + sum(v.sum() for v in s2.values())
                    g1 = torch.autograd.grad(l1, list(xg.values()), allow_unused=True)
                    g2 = torch.autograd.grad(l2, list(xg.values()), allow_unused=True)
                    for a, b in zip(g1, g2):
                        if a is not None and b is not None:
                            worst = max(worst, float((a - b).abs().max()) / 100)  # grads: 1e-8 budget
    record(name, "backends", worst)
    assert worst <= tol * scale, f"{name}: torch vs reference max error {worst:.3e} (outputs up to {scale:.1e})"


def run_both(name: str, heads=None, **dims):
    """The reference layer (for the oracle) and a torch layer with the same parameters."""
    ref = make(name, backend="reference", heads=heads, **dims)
    fast = recdsl.load(name)(backend="torch", heads=heads, **dims).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def against(name, fn, want_out, want_states: dict, *layers, tol=1e-9, **inputs):
    """Every layer (reference and torch) on `inputs` against the oracle's outputs/states;
    fn(out, states) -> (out, states) adapts recdsl's result to the oracle's layout."""
    for layer in layers:
        out, st = layer(**inputs)
        out, st = fn(out, st)
        close(out, want_out, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in want_states.items():
            close(st[k], v, tol, f"{name} state {k} ({layer.backend_name})", name)
