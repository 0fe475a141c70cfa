"""The parity matrix, generated from the structure: every stdlib sequence cell x every
backend whose selection accepts it x {plain, reverse, cu_seqlens, heads, initial state},
outputs, final states and gradients (inputs, params, initial states) against `reference` in float64;
and, for every stage, the kernel the selection names is the one the forward executed.

The torch column runs in the fast suite; the triton column (Triton's interpreter, seconds
a cell) is `slow`."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import as_tuple, random_inputs
from recdsl.spec import stdlib_files

CELLS = [n for n in stdlib_files() if recdsl.load(n).cell.over == "seq"]
MODES = ("plain", "reverse", "cu_seqlens", "heads", "initial state")
CU = [0, 3, 3, 4, 11]     # an empty and a one-step sequence among them
TOL = 1e-9


def _params():
    for name in CELLS:
        for backend in ("torch", "triton"):
            for mode in MODES:
                marks = [pytest.mark.slow] if backend == "triton" else []
                yield pytest.param(name, backend, mode, marks=marks, id=f"{name}-{backend}-{mode}")


def _run(layer, xs, mode, state):
    kw = {"reverse": True} if mode == "reverse" else {"cu_seqlens": CU} if mode == "cu_seqlens" else {}
    return layer(**xs, state=state, **kw)


@pytest.mark.parametrize("name, backend, mode", list(_params()))
def test_backend_matches_reference(name, backend, mode):
    spec = recdsl.load(name)
    dims = spec.analysis_dims()
    heads = 2 if mode == "heads" and spec.cell.heads is None else None
    torch.manual_seed(0)
    ref = spec(backend="reference", heads=heads, **dims).double()
    other = spec(backend=backend, heads=heads, **dims).double()
    other.load_state_dict(ref.state_dict())
    B, T = (1, CU[-1]) if mode == "cu_seqlens" else (2, 9)
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, torch.float64).items()}
    state = None
    if mode == "initial state":
        gen = torch.Generator().manual_seed(1)
        state = {k: (0.5 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).requires_grad_()
                 for k, v in ref.initial_state(B, torch.float64).items()}
    o1, s1 = _run(ref, xs, mode, state)
    o2, s2 = _run(other, xs, mode, state)
    o1, o2 = as_tuple(o1), as_tuple(o2)
    scale = max(1.0, max(float(a.detach().abs().max()) for a in o1))
    for a, b in zip(o1, o2):
        assert float((a - b).detach().abs().max()) <= TOL * scale, (name, mode, "output")
    for k in s1:
        assert float((s1[k] - s2[k]).detach().abs().max()) <= TOL * scale, (name, mode, "state", k)
    w = [torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) for a in o1]
    leaves = list(xs.values()) + (list(state.values()) if state else [])   # initial states' gradients too
    g1 = _grads(ref, o1, s1, w, leaves)
    g2 = _grads(other, o2, s2, w, leaves)
    for a, b in zip(g1, g2):
        if a is not None and b is not None:
            assert float((a - b).abs().max()) <= 10 * TOL * scale, (name, mode, "gradient")
    if mode == "plain":   # what the plan says runs each stage is what ran
        assert other.ran == [c.kernel.name for c in other.selection.stages]
        assert other.plan.selections[backend] is other.selection


def _grads(layer, outs, states, w, leaves):
    loss = sum((a * c).sum() for a, c in zip(outs, w)) + sum(v.sum() for v in states.values())
    return torch.autograd.grad(loss, leaves + list(layer.parameters()), allow_unused=True)
