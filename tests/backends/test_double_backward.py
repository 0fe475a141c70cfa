"""Second derivatives through every backend (issue 12): gradient penalties, MAML and
Hessian-vector products differentiate a gradient, so each custom autograd Function's
backward must itself be differentiable when create_graph=True.

Per stdlib sequence cell, in float64 with tiny sizes (every dim 2):
  - gradcheck and gradgradcheck of the layer's outputs and final states as a function of
    its inputs and params. torch: in the fast suite the first cell (stdlib order) of each
    kernel the selection names (and each element-scan kind), every other cell `slow`;
    triton (`slow`, Triton's interpreter): the representatives of its kernels. torch's fast_mode (random
    projections of the Jacobians); RECDSL_FULL_GRADCHECK=1 checks the full ones.
  - the second-order gradients of a gradient penalty, d/d(inputs, states, params) of
    |d sum(o^2 + s^2) / d(inputs, states)|^2, against the reference backend, in plain,
    reverse, cu_seqlens, heads and initial-state modes: the representatives in every mode,
    every other cell plain (and, on triton, with cu_seqlens too). torch in the fast suite;
    triton `slow`.
  - gradgradcheck of each C scan kind and the C block scan directly.
Every layer test asserts that the kernels the selection names are the ones that ran."""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.func import functional_call

import recdsl
from helpers import as_tuple, random_inputs
from recdsl.pipeline import emit_cell
from recdsl.spec import stdlib_files

CELLS = [n for n in stdlib_files() if recdsl.load(n).cell.over == "seq"]
B, T = 2, 4
TOL = 1e-9
FULL_CHECK = bool(os.environ.get("RECDSL_FULL_GRADCHECK"))   # full Jacobians instead of torch's fast_mode


def _dims(spec) -> dict:
    return {k: 2 for k in spec.analysis_dims()}


@functools.lru_cache(maxsize=None)
def _kernels(name: str, backend: str) -> tuple[str, ...]:
    """What runs each stage: the kernel name, and the scan kind of an element scan (the C
    library has one kernel per kind)."""
    spec = recdsl.load(name)
    sel = emit_cell(spec.lower(**_dims(spec)), backend).selection
    return tuple(c.kernel.name + (f"[{c.form.kind}]" if hasattr(c.form, "kind") else "") for c in sel.stages)


def _representatives(backend: str) -> set[str]:
    """The first cell (stdlib order) for each kernel (and scan kind) the selection uses."""
    seen, reps = set(), set()
    for name in CELLS:
        new = set(_kernels(name, backend)) - seen
        if new:
            reps.add(name)
            seen |= new
    return reps


def _layers(name, backend, heads=None):
    spec = recdsl.load(name)
    torch.manual_seed(0)
    ref = spec(backend="reference", heads=heads, **_dims(spec)).double()
    other = spec(backend=backend, heads=heads, **_dims(spec)).double()
    other.load_state_dict(ref.state_dict())
    return spec, ref, other


def _assert_ran(layer):
    assert layer.ran == [c.kernel.name for c in layer.selection.stages], (layer.ran, layer.selection)


# --------------------------------------------------------------------------- gradcheck / gradgradcheck

def _check_params():
    reps = _representatives("torch")
    for name in CELLS:
        marks = [] if name in reps else [pytest.mark.slow]
        yield pytest.param(name, "torch", marks=marks, id=f"{name}-torch")
    for name in sorted(_representatives("triton")):   # the interpreter takes seconds a cell
        yield pytest.param(name, "triton", marks=[pytest.mark.slow], id=f"{name}-triton")


@pytest.mark.parametrize("name, backend", list(_check_params()))
def test_gradgradcheck(name, backend):
    spec, ref, layer = _layers(name, backend)
    xs = random_inputs(spec, ref, 1, 3, torch.float64)
    pnames = [n for n, _ in layer.named_parameters()]
    leaves = [x.clone().requires_grad_() for x in xs.values()] + \
        [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    n_in = len(xs)

    def f(*ts):
        outs, st = functional_call(layer, dict(zip(pnames, ts[n_in:])), args=(), kwargs=dict(zip(xs, ts[:n_in])))
        return as_tuple(outs) + tuple(st[k] for k in sorted(st))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=not FULL_CHECK)
    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=not FULL_CHECK)
    _assert_ran(layer)


# --------------------------------------------------------------------------- against the reference

MODES = ("plain", "reverse", "cu_seqlens", "heads", "initial state")
CU = [0, 1, 1, 4, 6]     # an empty and a one-step sequence among them


def _penalty_grads(layer, xs, mode, state):
    kw = {"reverse": True} if mode == "reverse" else {"cu_seqlens": CU} if mode == "cu_seqlens" else {}
    leaves = list(xs.values()) + (list(state.values()) if state else [])
    outs, st = layer(**xs, state=state, **kw)
    loss = sum(o.pow(2).sum() for o in as_tuple(outs)) + sum(v.pow(2).sum() for v in st.values())
    g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    penalty = sum(x.pow(2).sum() for x in g if x is not None)
    return torch.autograd.grad(penalty, leaves + list(layer.parameters()), allow_unused=True)


def _ref_params():
    for backend in ("torch", "triton"):
        reps = _representatives(backend)
        for name in CELLS:
            for mode in MODES if name in reps else ("plain",) if backend == "torch" else ("plain", "cu_seqlens"):
                fast = backend == "torch"
                marks = [] if fast else [pytest.mark.slow]
                yield pytest.param(name, backend, mode, marks=marks, id=f"{name}-{backend}-{mode}")


@pytest.mark.parametrize("name, backend, mode", list(_ref_params()))
def test_second_order_matches_reference(name, backend, mode):
    spec = recdsl.load(name)
    heads = 2 if mode == "heads" and spec.cell.heads is None else None
    spec, ref, layer = _layers(name, backend, heads)
    b, t = (1, CU[-1]) if mode == "cu_seqlens" else (B, T)
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, b, t, torch.float64).items()}
    state = None
    if mode == "initial state":   # the initial states are leaves too
        gen = torch.Generator().manual_seed(1)
        state = {k: (0.5 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).requires_grad_()
                 for k, v in ref.initial_state(b, torch.float64).items()}
    g_ref = _penalty_grads(ref, xs, mode, state)
    g = _penalty_grads(layer, xs, mode, state)
    scale = max([1.0] + [float(a.abs().max()) for a in g_ref if a is not None])
    for i, (a, c) in enumerate(zip(g_ref, g)):
        assert (a is None) == (c is None), (name, mode, i, "reached" if c is None else "spurious")
        if a is not None:
            assert float((a - c).abs().max()) <= TOL * scale, (name, mode, i, float((a - c).abs().max()), scale)
    if mode == "plain":
        _assert_ran(layer)


# --------------------------------------------------------------------------- the C scans themselves

@pytest.mark.parametrize("kind", ["diag", "diagexp", "maxplus", "lse"])
def test_c_element_scan_double_backward(kind):
    """Every kind of the C library's element scan (lse: no stdlib cell selects it), with a
    broadcast decay (the Function gets a copy it must not differentiate instead)."""
    from recdsl.backends.torch import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip(f"no C library: {cpu_kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    a = (-torch.rand(1, 5, 1, generator=g, dtype=torch.float64) if kind in ("diagexp", "maxplus", "lse")
         else torch.rand(1, 5, 1, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()

    def f(a, x, h0):
        return cpu_kernels.element_scan(kind, a.expand(2, 5, 3), x, h0)
    assert torch.autograd.gradcheck(f, (a, x, h0), fast_mode=not FULL_CHECK)
    assert torch.autograd.gradgradcheck(f, (a, x, h0), fast_mode=not FULL_CHECK)


def test_c_block_scan_double_backward():
    from recdsl.backends.torch import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip(f"no C library: {cpu_kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    A = (0.5 * torch.randn(1, 4, 3, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 4, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, 2, generator=g, dtype=torch.float64).requires_grad_()

    def f(A, x, h0):
        return cpu_kernels.block_scan(A.expand(2, 4, 3, 2, 2), x, h0)
    assert torch.autograd.gradcheck(f, (A, x, h0), fast_mode=not FULL_CHECK)
    assert torch.autograd.gradgradcheck(f, (A, x, h0), fast_mode=not FULL_CHECK)
