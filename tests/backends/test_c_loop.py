"""The torch backend's C loops (torch.c_loop) under autograd: the generated reverse-time
adjoint against `reference` in float64, for every stdlib stage the selection gives them,
with the gradients users' losses produce (a plain sum: stride-0 gradients; only the final
state; an output nobody reads), and for lane-loop shapes the stdlib does not have
(overlapping slices, a per-step scalar input, a scalar param, a slice left unread)."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import ROOT, as_tuple, paired_layers, random_inputs
from recdsl.backends.torch.fused_loop import FusedLoop, toolchain_missing
from recdsl.backends.torch.kernels import compiled_loop
from recdsl.lowering import SequentialLoop
from recdsl.spec import stdlib_files

pytestmark = pytest.mark.skipif(toolchain_missing() is not None, reason=str(toolchain_missing()))


def _c_loop_cells():
    out = []
    for name in stdlib_files():
        spec = recdsl.load(name)
        if spec.cell.over == "seq" and any(c.kernel.name == "torch.c_loop" for c in
                                           spec(backend="torch", **spec.analysis_dims()).selection.stages):
            out.append(name)
    return out


CELLS = _c_loop_cells()

LANE_SHAPES = """
cell LaneShapes(D, H):
    input x[D], dt[]
    param W[2*H, D] ~ normal(0, 0.5)
    param U[3*H, H] ~ normal(0, 0.5)
    param a[] = 0.7
    state h[H] = 0
    z = W @ x
    u = U @ h
    gate = sigmoid(z[H:2*H] + a * h)
    h' = gate * tanh(z[0:H] + u[0:H] + u[1:H+1]) + (1 - gate) * (dt * h) * u[H:2*H]
    output h'
"""


def _pair(src, dims, heads=None):
    spec = recdsl.load(src)
    return (spec, *paired_layers(spec, "torch", dims, heads))


def _grads(layer, xs, loss_of):
    out, st = layer(**xs)
    return torch.autograd.grad(loss_of(as_tuple(out), st), list(xs.values()) + list(layer.parameters()),
                               allow_unused=True)


LOSSES = {
    "sum": lambda outs, st: sum(o.sum() for o in outs),                       # stride-0 gradients
    "final state only": lambda outs, st: sum((v ** 2).sum() for v in st.values()),
    "squared mean": lambda outs, st: sum(o.pow(2).mean() for o in outs) + sum(v.sum() for v in st.values()),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", CELLS)
def test_c_loop_gradients_match_reference(name, loss):
    spec, ref, fast = _pair(name, recdsl.load(name).analysis_dims())
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, 3, 7, torch.float64).items()}
    g1, g2 = _grads(ref, xs, LOSSES[loss]), _grads(fast, xs, LOSSES[loss])
    assert fast.ran == [c.kernel.name for c in fast.selection.stages] and "torch.c_loop" in fast.ran
    for a, b, x in zip(g1, g2, list(xs.values()) + list(ref.parameters())):
        a, b = (torch.zeros_like(x) if g is None else g for g in (a, b))   # an unread input: None or zeros
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max())), (name, loss)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("heads", [None, 2])
def test_lane_loop_reductions_overlaps_and_unread_slices(heads, overlap):
    """A scalar per-step input and a scalar param (their adjoints are sums over the lanes),
    a leaf read at overlapping offsets (no simd, accumulated), a slice of a GEMM output
    never read (its adjoint rows are zero-filled, not left as they were)."""
    src = LANE_SHAPES if overlap else LANE_SHAPES.replace("u[1:H+1]", "u[2*H:3*H]")
    spec, ref, fast = _pair(src, dict(D=3, H=4), heads)
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, 2, 6, torch.float64).items()}
    for loss in LOSSES.values():
        g1, g2 = _grads(ref, xs, loss), _grads(fast, xs, loss)
        for a, b in zip(g1, g2):
            assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))
    assert fast.ran == [c.kernel.name for c in fast.selection.stages] and "torch.c_loop" in fast.ran
    stage = next(c for c in fast.selection.stages if isinstance(c.form, SequentialLoop))
    loop = compiled_loop(fast.compiled.plan.ir, stage.form.states, stage.form.core)
    assert isinstance(loop, FusedLoop)
    assert "red_seq_" in loop.source and "red_param_" in loop.source
    assert ("no simd" in loop.source) == overlap and ("reduction(+:" in loop.source) == (not overlap)


def test_c_loop_float32_training_matches_reference():
    spec, ref, fast = _pair("lstm", dict(D=8, H=16))
    ref, fast = ref.float(), fast.float()
    xs = {k: v.float().requires_grad_() for k, v in random_inputs(spec, ref, 4, 33, torch.float64).items()}
    g1, g2 = _grads(ref, xs, LOSSES["squared mean"]), _grads(fast, xs, LOSSES["squared mean"])
    for a, b in zip(g1, g2):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("src", ["titans", "ttt_linear", str(ROOT / "benchmarks" / "cells" / "yaad.rec")])
def test_matrix_state_outputs_are_computed_in_the_loop(src):
    """An output that reads a matrix state's new value (q @ M') is computed by the general
    loop per step, so the [B, T, K, V] state sequence is never written; what runs (C, or
    the torch loop over the same IR for what C cannot run) matches the reference."""
    spec, ref, fast = _pair(src, recdsl.load(src).analysis_dims())
    loops = fast.compiled.program.fn.__globals__["fused_loops"]
    xs = random_inputs(spec, ref, 2, 5, torch.float64)
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(**xs), fast(**xs)
    assert [loop.readouts != [] for loop in loops] == [True] and loops[0].keep == set()
    for a, b in zip(as_tuple(o1), as_tuple(o2)):
        assert torch.allclose(a, b, atol=1e-12)
    outs, finals = loops[0].run_torch(*_loop_args(fast, xs))
    c_outs, c_finals = loops[0].run(*_loop_args(fast, xs))
    assert torch.allclose(outs[0], c_outs[0], atol=1e-12)


def _loop_args(layer, xs):
    """The arguments the generated forward passes to the loop, captured from one call."""
    got = []
    loop = layer.compiled.program.fn.__globals__["fused_loops"][0]
    run = loop.run

    def spy(*args):
        got.append(args)
        return run(*args)
    loop.run = spy
    try:
        with torch.no_grad():
            layer(**xs)
    finally:
        del loop.run
    return got[0]


MASKED = {
    "general loop": "h' = tanh(W @ where(arange(H) >= 1, relu(h), h) + x)",     # a matmul of a computed value
    "lane loop": "h' = where(arange(H) >= 1, tanh(W @ h + x), 0.5 * h)",
}


@pytest.mark.parametrize("kind", sorted(MASKED))
def test_a_hoisted_boolean_mask_survives_double_backward(kind):
    """A mask that reads no state is hoisted and reaches the C loop as 0/1 in the compute
    dtype; the torch twin that create_graph=True differentiates gets it back as bool."""
    src = f"cell Masked(H):\n    input x[H]\n    param W[H, H] ~ normal(0, 0.3)\n    state h[H] = 0\n" \
          f"    {MASKED[kind]}\n    output h'\n"
    spec, ref, fast = _pair(src, dict(H=4))
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: fast(x=x)[0]   # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x,)) and fast.ran == ["torch.c_loop"]
    stage = next(c for c in fast.selection.stages if isinstance(c.form, SequentialLoop))
    loop = compiled_loop(fast.compiled.plan.ir, stage.form.states, stage.form.core)
    assert isinstance(loop, FusedLoop) == (kind == "lane loop")


def test_lstm_input_gradient_is_stored_once_and_its_transpose_shared(monkeypatch):
    """The LSTM's gates read W_ih @ x and W_hh @ h only through their sum, so the hoisted
    projection's gradient IS the GEMM output's adjoint: the kernel stores it once and the
    two weight gradients (dW_hh here, dW_ih in the projection's backward) share one
    transpose, kept for that backward pass only. float32 at a size oneDNN takes."""
    from recdsl.backends.torch import gemm
    spec, ref, fast = _pair("lstm", dict(D=128, H=128))
    fast = fast.float()
    stage = next(c for c in fast.selection.stages if isinstance(c.form, SequentialLoop))
    assert compiled_loop(fast.compiled.plan.ir, stage.form.states, stage.form.core).aliases == {0: 0}
    seen = []
    transposed = gemm._transposed
    monkeypatch.setattr(gemm, "_transposed", lambda a, share: seen.append(
        (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a._version) in gemm._PASS) or transposed(a, share))
    x = torch.randn(8, 40, 128, dtype=torch.float64)
    g1 = _grads(ref, {"x": x.clone().requires_grad_()}, LOSSES["squared mean"])
    g2 = _grads(fast, {"x": x.float().requires_grad_()}, LOSSES["squared mean"])
    assert seen.count(True) == 1 and not gemm._PASS
    for a, b in zip(g1, g2):
        assert float((a - b.double()).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max()))
