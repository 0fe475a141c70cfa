"""The generated Triton wavefront kernel for cells `over grid2d` (grid_kernels.py, kernel
triton.wavefront), run in Triton's interpreter on CPU tensors: the stdlib grid cells
(MDLSTM, pLSTM P-mode and D-mode) and a headed 2-D RNN select it and agree with the
reference in float64 -- outputs, the state of every cell, and the gradients of inputs and
params; an unseen 2-D RNN with a learned boundary state agrees with an independent
raster-order loop in torch, the boundary state's gradient included; a long diagonal runs
in chunks of cells (as on a GPU); a step the generator refuses runs the borrowed
torch.wavefront with the reason in the plan; the kernels compile for sm_80 / sm_90
without spills at the stdlib's analysis sizes."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.backends import triton as triton_backend
from recdsl.backends.triton import grid_kernels
from recdsl.pipeline import emit_cell

DT = torch.float64

# h' reads both neighbours through their own weights, the input through a third; the
# boundary (initial) state is a learned param; the output reads a neighbour too
TANH2D = """cell Tanh2D(D, H):
    over grid2d
    input x[D]
    param W[H, H] ~ normal(0, 1/sqrt(H))
    param U[H, H] ~ normal(0, 1/sqrt(H))
    param V[H, D] ~ normal(0, 1/sqrt(D))
    param h0[H] ~ normal(0, 0.5)
    state h[H] = h0
    h' = tanh(W @ h.left + U @ h.up + V @ x)
    output y = sum(h' * h.left)
"""

HEADS2D = """cell Heads2D(D, NH):
    heads NH
    over grid2d
    input x[D], g[]
    param W[D, D] ~ normal(0, 1/sqrt(D))
    param a[D] ~ uniform(0.2, 0.8)
    state h[D] = 0
    h' = tanh(W @ h.left + a * h.up * sigmoid(g) + x)
    output y = h' * 2.0
"""

# S.left @ S.up: a product of two matrix values per cell, which the step generator does not express
REFUSED = """cell MatProd2D(K):
    over grid2d
    input a[K, K]
    state S[K, K] = 0
    S' = tanh(S.left @ S.up + a)
    output y = sum(S', axis=1)
"""


def _layers(spec, heads=None, **dims):
    ref = spec(backend="reference", heads=heads, **dims).double()
    tri = spec(backend="triton", heads=heads, **dims).double()
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _inputs(layer, B, X, Y, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    return {n: 0.5 * torch.randn((B, X, Y) + heads + tuple(layer.ir.concrete(v.shape)), generator=g, dtype=DT)
            for n, v in layer.spec.cell.inputs.items()}


def _run(layer, inputs):
    """(outputs and states, gradients of inputs and params) for one random projection of them."""
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
    y, st = layer(**xs)
    vals = list((y,) if isinstance(y, torch.Tensor) else y) + [st[s] for s in sorted(st)]
    g = torch.Generator().manual_seed(7)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=DT)).sum() for v in vals)
    params = [p for _, p in sorted(layer.named_parameters())]
    grads = torch.autograd.grad(loss, list(xs.values()) + params)
    return vals, grads


def _close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-11), (a - b).abs().max()


def _selects_the_wavefront(layer):
    stages = layer.plan.selections["triton"].stages
    assert stages and {c.kernel.name for c in stages} == {"triton.wavefront"}
    assert all(c.kernel.borrowed is None for c in stages)
    assert set(layer.ran) == {"triton.wavefront"}, layer.ran


@pytest.mark.parametrize("name, dims, X, Y, rows", [
    ("mdlstm2d", {"D": 3, "H": 4}, 5, 4, None),
    ("plstm2d", {"K": 3, "V": 4}, 8, 8, None),
    ("plstm2d_dmode", {"K": 2, "V": 3}, 13, 7, 4),   # diagonals of 7 cells in chunks of 4 (as a GPU's 16)
])
def test_stdlib_grid_cells_run_the_wavefront_kernel(name, dims, X, Y, rows, monkeypatch):
    if rows:
        monkeypatch.setattr(grid_kernels, "MAX_INTERPRETED_ROWS", rows)
    ref, tri = _layers(recdsl.load(name), **dims)
    inputs = _inputs(ref, 2, X, Y)
    want = _run(ref, inputs)
    got = _run(tri, inputs)
    _selects_the_wavefront(tri)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_streamed_weights_at_mdlstm_h32():
    """H = 32: 10240 recurrent weight elements, over what a program holds: streamed per diagonal."""
    ref, tri = _layers(recdsl.load("mdlstm2d"), D=4, H=32)
    assert tri._program.kernel.streamed
    inputs = _inputs(ref, 1, 3, 4, seed=5)
    want = _run(ref, inputs)
    got = _run(tri, inputs)
    _selects_the_wavefront(tri)
    _close(got[0], want[0])
    _close(got[1], want[1])


def _raster_loop(x, W, U, V, h0):
    """Tanh2D by its definition: cells in raster order, left = (x-1, y), up = (x, y-1), h0 off the grid."""
    B, NX, NY, _ = x.shape
    h, ys = {}, {}
    start = h0.expand(B, -1)
    for i in range(NX):
        for j in range(NY):
            left = h[i - 1, j] if i > 0 else start
            up = h[i, j - 1] if j > 0 else start
            h[i, j] = torch.tanh(left @ W.T + up @ U.T + x[:, i, j] @ V.T)
            ys[i, j] = (h[i, j] * left).sum(-1)
    grid = lambda d: torch.stack([torch.stack([d[i, j] for j in range(NY)], 1) for i in range(NX)], 1)  # noqa: E731
    return grid(ys), grid(h)


def test_an_unseen_2d_rnn_matches_a_raster_loop():
    ref, tri = _layers(recdsl.load(TANH2D), D=3, H=5)
    x = _inputs(ref, 3, 6, 5, seed=1)["x"]
    xr = x.clone().requires_grad_(True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in tri.named_parameters()}
    y, h = _raster_loop(xr, params["W"], params["U"], params["V"], params["h0"])
    g = torch.Generator().manual_seed(3)
    wy, wh = torch.randn(y.shape, generator=g, dtype=DT), torch.randn(h.shape, generator=g, dtype=DT)
    want = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), [xr] + list(params.values()))
    xt = x.clone().requires_grad_(True)
    yt, st = tri(x=xt)
    _selects_the_wavefront(tri)
    _close([yt, st["h"]], [y, h])
    got = torch.autograd.grad((yt * wy).sum() + (st["h"] * wh).sum(), [xt] + [p for _, p in tri.named_parameters()])
    _close(got, want)
    assert got[-1].abs().sum() > 0    # h0: the boundary state's gradient (every edge cell reads it)


def test_heads_run_one_program_per_row_and_head():
    ref, tri = _layers(recdsl.load(HEADS2D), heads=2, D=3)
    inputs = _inputs(ref, 2, 4, 5, seed=2)
    want = _run(ref, inputs)
    got = _run(tri, inputs)
    _selects_the_wavefront(tri)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_a_step_the_generator_refuses_runs_torch_wavefront_with_the_reason():
    ref, tri = _layers(recdsl.load(REFUSED), K=2)
    choice = tri.plan.selections["triton"].stages[0]
    assert choice.kernel.name == "torch.wavefront" and choice.kernel.borrowed == "torch"
    declined = {p.kernel: p.reason for p in choice.passed}
    assert "a matmul of two matrices" in declined["triton.wavefront"]
    inputs = _inputs(ref, 2, 3, 4, seed=4)
    _close(_run(tri, inputs)[0], _run(ref, inputs)[0])
    assert set(tri.ran) == {"torch.wavefront"}


COMPILES = [("mdlstm2d", 90), ("plstm2d_dmode", 80)]   # a fresh compile takes ~5-20 s each: the other two slow


@pytest.mark.parametrize("name, arch", COMPILES + [
    pytest.param(name, 170 - arch, marks=pytest.mark.slow) for name, arch in COMPILES])
def test_the_wavefront_kernels_compile_without_spills(name, arch):
    spec = recdsl.load(name)
    emitted = emit_cell(spec.lower(**spec.analysis_dims()), "triton")
    assert {c.kernel.name for c in emitted.selection.stages} == {"triton.wavefront"}
    _, compiled = triton_backend.compile_cell(emitted, arch)
    assert [c.name.rsplit("_", 1)[1] for c in compiled] == ["fwd", "bwd"]
    for c in compiled:
        assert c.asm["cubin"] and f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{name}: {c.name} spills {c.spills} bytes on sm_{arch}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_streamed_wavefront_kernels_compile_without_spills(arch):
    """MDLSTM at D = H = 32 (weights streamed): 8 cells a tile, 8 warps (grid_kernels.STREAMED_ROWS)."""
    emitted = emit_cell(recdsl.load("mdlstm2d").lower(D=32, H=32), "triton")
    assert emitted.emitter.kernel.streamed
    _, compiled = triton_backend.compile_cell(emitted, arch)
    assert [c.spills for c in compiled] == [0, 0], [(c.name, c.registers, c.spills) for c in compiled]
