"""Long chains within the unroll limit (issue 12): the backends and the matchers walk them
without recursion.

A `for` loop may unroll into RECDSL_MAX_UNROLL (4096) operations, i.e. a chain thousands of
IR nodes deep. Every walk over the IR that recursed once per node (the fused C loop's
expression builder, the sequential Triton kernel's visit, the DAG reference's evaluation,
the DeltaProduct matcher's sums) now keeps an explicit stack, and generated sums of thousands
of terms (the adjoint of a value every pass reads) are split into lines that Python's and
Triton's compilers do not recurse along. Here each cell is planned, built and run (forward
and gradients) with the stack cut to 400 frames, on chains of a thousand nodes or more, and
matched against the reference. (plan_cell selects for every built backend, so even a
reference module ran the torch and triton selections.) The triton column runs in Triton's
interpreter and is `slow`."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import recdsl
from recdsl.lowering import HouseholderProducts
from recdsl.pipeline import BUILT, emit_cell

LIMIT = 400   # frames: Python and the pipeline need far fewer; a walk per node needs one per node
TOL = 1e-10   # float64, relative to the outputs' scale

# name -> (dims, declarations, accumulator, loop body, the rest); every pass unrolls into 2-3 nodes
CELLS = {
    "nonlinear": ("D=3", "input x[D]\n    param g[D] = 0.5\n    state h[D] = 0", "acc = h",
                  "acc = tanh(acc * g + x)", "h' = acc\n    output y = h'"),
    "diagonal": ("D=3", "input x[D]\n    state h[D] = 0", "acc = h",
                 "acc = acc * 0.5 + x", "h' = acc\n    output y = h' * 2"),
    "matrix": ("K=3, V=2", "input q[K], k[K], v[V]\n    state S[K, V] = 0", "acc = S",
               "acc = acc * 0.5 + outer(k, v)", "S' = acc\n    output o = q @ S'"),
    "dense": ("D=3", "input x[D]\n    param W[D, D] ~ normal(0, 0.5)\n    state h[D] = 0", "acc = h",
              "acc = tanh(W @ acc + x)", "h' = acc\n    output y = h'"),
}
PASSES = {"nonlinear": 400, "diagonal": 600, "matrix": 600, "dense": 400}   # about 1200 nodes each
SLOW_PASSES = 1300   # triton: x (k, v) read 1300 times, its adjoint a sum of 1300 terms


def source(kind: str, passes: int) -> str:
    dims, decls, init, body, rest = CELLS[kind]
    return (f"cell Long{kind.capitalize()}({dims}):\n    {decls}\n    {init}\n"
            f"    for j in range({passes}):\n        {body}\n    {rest}\n")


@contextlib.contextmanager
def small_stack(limit: int = LIMIT):
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def run(spec, backend: str, like=None, seed: int = 0):
    """(layer, outputs, final states, gradients of inputs and params) for B=1, T=3, float64."""
    layer = spec(backend=backend).double()
    if like is not None:
        layer.load_state_dict(like.state_dict())
    g = torch.Generator().manual_seed(seed)
    xs = {n: (torch.randn((1, 3) + layer.ir.concrete(v.shape), generator=g, dtype=torch.float64) * 0.5)
          .requires_grad_() for n, v in spec.cell.inputs.items()}
    out, state = layer(**xs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in out) \
        + sum(s.sum() for s in state.values())
    wrt = list(xs.values()) + list(layer.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return layer, [o.detach() for o in out], {k: v.detach() for k, v in state.items()}, grads


def check_against_reference(kind: str, passes: int, backend: str):
    spec = recdsl.load(source(kind, passes))
    short = recdsl.load(source(kind, 2))
    for b in ("reference", backend):   # lazy imports (sympy, triton's interpreter) at a normal depth
        run(short, b)
    with small_stack():
        ref, o1, s1, g1 = run(spec, "reference")
        layer, o2, s2, g2 = run(spec, backend, like=ref)
    scale = max(1.0, max(float(o.abs().max()) for o in o1))
    assert all(float((a - b).abs().max()) <= TOL * scale for a, b in zip(o1, o2))
    assert all(float((s1[k] - s2[k]).abs().max()) <= TOL * scale for k in s1)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).abs().max()) <= TOL * max(1.0, float(a.abs().max()))
    return layer


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_long_chain_plans_for_every_backend_on_a_small_stack(kind):
    spec = recdsl.load(source(kind, PASSES[kind]))
    ir = spec.lower()
    assert len(ir.nodes()) >= 1000
    recdsl.load(source(kind, 2)).plan()   # lazy imports (sympy, triton) at a normal depth
    with small_stack():
        plan = spec.plan()
    assert set(plan.selections) == set(BUILT) and not any(s.cannot for s in plan.selections.values())


@pytest.mark.parametrize("kind", ["nonlinear", "diagonal", "matrix"])
def test_long_chain_matches_reference_on_torch(kind):
    layer = check_against_reference(kind, PASSES[kind], "torch")
    if kind == "nonlinear":   # the per-step loop, and its C loop where a toolchain works
        from recdsl.backends.torch.fused_loop import toolchain_missing
        assert layer.ran == ["torch.loop" if toolchain_missing() else "torch.c_loop"]
        if toolchain_missing() is None:
            fused = emit_cell(layer.ir, "torch").emitter.fused
            assert fused and fused[0].source.count("double v") >= 3 * PASSES[kind]   # a line per value


def test_long_nonlinear_chain_runs_the_fused_c_loop():
    from recdsl.backends.torch.fused_loop import toolchain_missing
    if toolchain_missing() is not None:
        pytest.skip(toolchain_missing())
    spec = recdsl.load(source("nonlinear", PASSES["nonlinear"]))
    ref, loop = spec(backend="reference").double(), spec(backend="torch").double()
    loop.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (y1, s1), (y2, s2) = ref(x=x), loop(x=x)
    assert torch.allclose(y1, y2, rtol=0, atol=1e-12) and torch.allclose(s1["h"], s2["h"], rtol=0, atol=1e-12)


def test_long_chain_over_a_dag_runs_on_the_reference():
    def tree(n):
        return recdsl.load("cell LongTree(D=3):\n    over dag\n    input x[D]\n    state h[D] = 0\n"
                           f"    acc = sum_in(h)\n    for j in range({n}):\n        acc = tanh(acc * 0.5 + x)\n"
                           "    h' = acc\n    output y = h'\n")(backend="reference").double()
    n = 400
    x = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    edges = torch.tensor([[0, 1], [0, 2], [1, 2]])
    tree(2)(x=x, edges=edges)
    layer = tree(n)
    with small_stack():
        y, state = layer(x=x, edges=edges)
    h = []
    for v, ins in ((0, []), (1, [0]), (2, [0, 1])):
        acc = sum((h[u] for u in ins), torch.zeros(1, 3, dtype=torch.float64))
        for _ in range(n):
            acc = torch.tanh(acc * 0.5 + x[:, v])
        h.append(acc)
    want = torch.stack(h, 1)
    assert torch.allclose(y, want, rtol=0, atol=1e-12) and torch.allclose(state["h"], want, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nonlinear", "diagonal", "matrix"])
def test_long_chain_matches_reference_on_triton(kind):
    pytest.importorskip("triton")
    layer = check_against_reference(kind, SLOW_PASSES, "triton")
    assert layer.ran == ["triton.sequential" if kind == "nonlinear" else "triton.scan"]


# ---------------------------------------------------------------------------- DeltaProduct

def _forms(plan) -> dict:
    return {b: [type(c.form) for c in sel.stages] for b, sel in plan.selections.items()}


@pytest.mark.parametrize("nh", [64, 200])   # 200: the matcher's sums are 400 deep, as deep as the stack
def test_deltaproduct_with_many_steps_selects_as_with_two(nh):
    spec = recdsl.load("deltaproduct")
    small = spec.plan(K=4, V=4, NH=2)
    with small_stack():
        big = spec.plan(K=4, V=4, NH=nh)
    assert _forms(big) == _forms(small)
    for backend in ("torch", "triton"):
        form = big.selections[backend].stages[0].form
        assert isinstance(form, HouseholderProducts) and len(form.steps) == nh
    steps = big.selections["torch"].stages[0].form.steps   # in order: step j reads k[j] and beta[j]
    assert [s["k"].srcs[0].arg for s in steps] == [(j, slice(None)) for j in range(nh)]
    assert [s["beta"].arg for s in steps] == [(j,) for j in range(nh)]
