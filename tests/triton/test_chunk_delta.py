"""The Triton chunkwise delta-rule kernels (backends/triton/delta_kernels.py, registry
entries triton.chunk_delta and triton.delta_product): the stdlib cells whose state matches
ChunkDelta / HouseholderProducts select and run them on the triton backend, and agree with
the reference backend (outputs, final states, gradients of inputs, params and the initial
state) in Triton's interpreter; the kernels against the torch chunk form directly (gated
and not, V blocks, short last chunks, the GPU's chunk size, an unread output, strong
decays); a non-finite input runs torch's form; and the kernels compile for sm_80 / sm_90
without spills."""
from __future__ import annotations

import pytest
import torch
import triton

import recdsl
from helpers import assert_close, random_inputs, reference_errors
from recdsl.backends.torch import scans
from recdsl.backends.triton import delta_kernels
from recdsl.lowering import ChunkDelta, HouseholderProducts
from recdsl.pipeline import emit_cell

# Every stdlib cell with a ChunkDelta or HouseholderProducts stage, and the kernel it selects
# (the other delta cells pick ChunkDPLR, element scans or the sequential kernel: `recdsl check`).
CELLS = {"deltanet": "triton.chunk_delta", "gated_deltanet": "triton.chunk_delta",
         "deltaproduct": "triton.delta_product"}


def _dims(name, K, V):
    spec = recdsl.load(name)
    return spec, spec.analysis_dims(K=K, V=V)


@pytest.mark.parametrize("name", CELLS)
def test_cells_select_and_run_the_triton_delta_kernels(name):
    spec, dims = _dims(name, 16, 16)
    sel = emit_cell(spec.lower(**dims), "triton").selection
    stages = [c for c in sel.stages if isinstance(c.form, (ChunkDelta, HouseholderProducts))]
    assert stages and all(c.kernel.name == CELLS[name] and c.kernel.borrowed is None for c in stages), sel
    layer = spec(backend="triton", **dims).double()
    layer(**random_inputs(spec, layer, 1, 5, torch.float64))
    assert layer.ran.count(CELLS[name]) == len(stages), layer.ran


def _compare(name, K, V, B, T, dtype, heads=None, seed=0, **call):
    return reference_errors(*_dims(name, K, V), B, T, dtype, heads, seed, kernel=CELLS[name], **call)


@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("name", CELLS)
def test_cells_match_reference_fp64(name, T):
    assert_close(_compare(name, 16, 16, 2, T, torch.float64), 1e-10)


@pytest.mark.parametrize("name", CELLS)
def test_sizes_not_a_power_of_two(name):
    """K = V = 60: padded key tiles and two V blocks."""
    assert_close(_compare(name, 60, 60, 2, 37, torch.float64), 1e-10)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_float32_within_fla_style_tolerance(name):
    e = _compare(name, 16, 16, 2, 37, torch.float32)
    assert e["out"] <= 2e-5 * e["scale"] and e["state"] <= 2e-5 * e["scale"] and e["grad"] <= 2e-4 * e["scale"], e


@pytest.mark.parametrize("name", CELLS)
def test_heads(name):
    assert_close(_compare(name, 16, 16, 2, 37, torch.float64, heads=2), 1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_reverse_and_cu_seqlens_by_the_runtime(name, reverse):
    """The runtime flips / splits around the kernels (Caps: reverse and varlen "runtime"):
    an empty and a one-step sequence among them, per-sequence initial states."""
    assert_close(_compare(name, 16, 16, 2, 37, torch.float64, reverse=reverse), 1e-10)
    cu = torch.tensor([0, 7, 7, 8, 40])
    assert_close(_compare(name, 16, 16, 1, 40, torch.float64, cu_seqlens=cu, reverse=reverse), 1e-10)


@pytest.mark.slow
def test_a_long_sequence():
    """T = 200: seven chunks, a short last one."""
    assert_close(_compare("gated_deltanet", 16, 16, 1, 200, torch.float64), 1e-10)


def test_a_non_finite_input_runs_the_torch_form():
    """The tile products would carry a later step's NaN back to the earlier steps of its
    chunk: torch's form runs (causal), and layer.ran says so."""
    spec, dims = _dims("gated_deltanet", 16, 16)
    layer = spec(backend="triton", **dims).double()
    xs = random_inputs(spec, layer, 1, 20, torch.float64)
    xs["v"][0, 15] = float("nan")
    o, _ = layer(**xs)
    assert "torch.chunk_delta" in layer.ran, layer.ran
    assert "triton.chunk_delta" not in layer.ran
    assert bool(torch.isfinite(o[0, :15]).all()) and not bool(torch.isfinite(o[0, 15:]).any())


# ------------------------------------------------------------------ the kernels themselves
def _inputs(BH, T, K, V, gated, dtype=torch.float64, decay=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    q, k, v, S0 = rnd(BH, T, K), rnd(BH, T, K), rnd(BH, T, V), rnd(BH, K, V)
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.rand(BH, T, generator=g, dtype=torch.float64).to(dtype)
    gl = -decay * torch.rand(BH, T, generator=g, dtype=torch.float64).to(dtype) if gated else None
    return q, k, v, beta, gl, S0


def _against_torch(q, k, v, beta, gl, S0, read_output=True):
    """Output, final state and every gradient of delta_kernels.chunk_delta and of the torch
    form: max abs difference, and whether the Triton ones are finite."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, S0) + (() if gl is None else (gl,))]
    res = []
    for f in (delta_kernels.chunk_delta, scans.chunk_delta):
        o, S = f(*leaves[:4], leaves[5] if gl is not None else None, leaves[4])
        w = torch.Generator().manual_seed(5)
        loss = (S * torch.randn(S.shape, generator=w, dtype=S.dtype)).sum()
        if read_output:
            loss = loss + (o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum()
        res.append([o, S, *torch.autograd.grad(loss, leaves, allow_unused=True)])
    assert all((a is None) == (b is None) for a, b in zip(*res))
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(*res) if a is not None and b is not None)
    return diff, all(bool(torch.isfinite(x).all()) for x in res[0] if x is not None)


@pytest.mark.parametrize("gated", [True, False])
def test_kernels_match_the_torch_form(gated):
    """T = 45 over two chunks of 32 with a short last one, K = 20, V = 40 in two V blocks."""
    diff, finite = _against_torch(*_inputs(2, 45, 20, 40, gated))
    assert finite and diff <= 1e-10, diff


def test_the_gpu_chunk_size_in_the_interpreter(monkeypatch):
    """BT = 64 as on a GPU, T = 100: a short last chunk."""
    monkeypatch.setattr(delta_kernels, "chunk_size", lambda device, K: 64)
    diff, finite = _against_torch(*_inputs(1, 100, 16, 16, True))
    assert finite and diff <= 1e-10, diff


def test_only_the_final_state_read():
    """An unread output: q gets no gradient (None, as the torch form's)."""
    diff, finite = _against_torch(*_inputs(2, 40, 16, 16, True), read_output=False)
    assert finite and diff <= 1e-10, diff


def test_strong_decay_stays_finite():
    """Log decays down to -100 per step (below the floor of -80): every exponent the kernels
    take is <= 0, so nothing overflows, and the floor's gradient is clamp's."""
    q, k, v, beta, g, S0 = _inputs(2, 45, 16, 16, True, decay=60.0)
    g[0, 3] = -100.0
    diff, finite = _against_torch(q, k, v, beta, g - 30.0, S0)
    assert finite and diff <= 1e-10, diff


def test_double_backward_differentiates_the_torch_twin():
    """create_graph=True: the backward is autograd's derivative of the torch form."""
    q, k, v, beta, g, S0 = _inputs(1, 20, 16, 16, True)
    res = []
    for f in (delta_kernels.chunk_delta, scans.chunk_delta):
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, g, S0)]
        o, S = f(*xs)
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for a, b in zip(*res):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())


# ------------------------------------------------------------------ ahead of time
STDLIB_COMPILES = isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, size, tmp_path, monkeypatch):
    """K = V = 64 and 128 float32, as a GPU launches them (BT 64, delta_kernels.LAUNCH's warps)."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = delta_kernels.compile_ahead(arch, K=size, V=size)
    assert len(compiled) == len(delta_kernels.AOT_VARIANTS)
    for c in compiled:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("name", ["gated_deltanet", "deltaproduct"])
def test_compile_cell_includes_the_delta_kernels(name, tmp_path, monkeypatch):
    """`recdsl inspect --stage ptx` (compile_cell) compiles the kernels a cell's stage calls."""
    from recdsl.backends import triton as triton_backend
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    spec, dims = _dims(name, 64, 64)
    _, compiled = triton_backend.compile_cell(emit_cell(spec.lower(**dims), "triton"), 90)
    names = [c.name for c in compiled]
    assert sorted({n for n in names if n.startswith("delta_")}) == sorted({n for n, _ in delta_kernels.AOT_VARIANTS})
    assert all(c.spills == 0 for c in compiled), [(c.name, c.spills) for c in compiled]
