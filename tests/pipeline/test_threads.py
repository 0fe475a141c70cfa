"""Layers are built and run from several threads at once -- with an empty kernel cache, so
the C builds race too, and on triton with the interpreter's process-wide language swap --
and each gives the reference's numbers and runs the kernels its selection names."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import recdsl
from helpers import as_tuple, random_inputs
from recdsl.backends.torch import kcache

CELLS = ["lstm", "gla", "mamba", "deltanet", "mingru", "lru", "slstm", "retnet"]


def _build_and_run(name: str, backend: str) -> float:
    spec = recdsl.load(name)
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims).double()
    layer = spec(backend=backend, **dims).double()
    layer.load_state_dict(ref.state_dict())
    xs = random_inputs(spec, ref, 2, 7, torch.float64)
    with torch.no_grad():   # the fused C loop's mode too
        a, b = as_tuple(ref(**xs)[0]), as_tuple(layer(**xs)[0])
    assert layer.ran == [c.kernel.name for c in layer.selection.stages]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_layers_in_eight_threads(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("RECDSL_CACHE", str(tmp_path / "cache"))
    kcache.reset()
    try:
        with ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(lambda n: (n, _build_and_run(n, backend)), CELLS * 2))
    finally:
        kcache.reset()
    assert all(err < 1e-12 for _, err in errors), errors
