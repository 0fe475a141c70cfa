"""Shared helpers of the analysis tests: load a cell of tests/analysis/cells, build a
float64 reference layer with seeded parameters, draw inputs, compare tensors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl

CELLS = Path(__file__).resolve().parent / "cells"
TOL = 1e-6


def cell_path(name: str) -> Path:
    return CELLS / f"{name}.rec"


def load(name: str):
    """A cell of tests/analysis/cells by file stem, else a stdlib name, else source text."""
    p = cell_path(name)
    return recdsl.load(p if p.exists() else name)


def make(name: str, seed: int = 0, **dims):
    """A float64 reference layer with parameters drawn from the .rec initialisers under `seed`."""
    torch.manual_seed(seed)
    layer = load(name)(backend="reference", **dims).double()
    torch.manual_seed(seed)
    layer.reset_parameters()
    return layer


def randn(*shape, scale=1.0, gen=None):
    return torch.randn(*shape, dtype=torch.float64, generator=gen) * scale


def inputs_for(layer, B: int, T: int, seed: int = 0, scale: float = 0.5, dtype=torch.float64) -> dict:
    """Random inputs of every declared input: [B, T, (heads,) *shape]."""
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    return {n: (torch.randn((B, T) + heads + layer.ir.concrete(v.shape), dtype=torch.float64, generator=g)
                * scale).to(dtype)
            for n, v in layer.spec.cell.inputs.items()}


def random_state(layer, B: int, seed: int = 1, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, dtype=torch.float64, generator=g) * scale
            for k, v in layer.initial_state(B, torch.float64).items()}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def close(got, want, tol: float = TOL, what: str = ""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.0e}"


def fla_naive(module: str, func: str):
    """A pure-torch oracle of flash-linear-attention (fla-core): its naive kernel, loaded from
    its own file (fast, and without the package's triton imports); skips when fla-core is
    not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed")
    path = Path(list(spec.submodule_search_locations)[0], "ops", *module.split(".")).with_suffix(".py")
    if not path.exists():
        pytest.skip(f"this fla-core has no fla/ops/{module.replace('.', '/')}.py")
    s = importlib.util.spec_from_file_location(f"_fla_naive_{module.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(s)
    try:
        s.loader.exec_module(mod)
    except ImportError as e:  # pragma: no cover - e.g. einops missing
        pytest.skip(f"fla-core's {module} needs {e.name}")
    return getattr(mod, func)
