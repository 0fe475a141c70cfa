"""The Triton kernels of the diagonal-plus-low-rank delta rule (backends/triton/dplr_kernels.py,
registry entry triton.dplr_recurrent: a fused recurrence, forward and reverse-time backward
from checkpoints): KDA and RWKV-7 select and run them on the triton backend and agree with
the reference backend (outputs, final states, gradients of every input, parameter and the
initial state) in Triton's interpreter; the kernels against the per-step torch oracle
dplr.naive_dplr directly (V blocks, checkpoint segments, unread outputs, strong decays);
and the kernels compile for sm_80 / sm_90 without spills."""
from __future__ import annotations

import functools

import pytest
import torch
import triton

import recdsl
from helpers import assert_close, random_inputs, reference_errors
from recdsl.backends.torch import dplr
from recdsl.backends.triton import dplr_kernels
from recdsl.lowering import ChunkDPLR
from recdsl.pipeline import emit_cell

CELLS = ["kda", "rwkv7"]
KERNEL = "triton.dplr_recurrent"


def _dims(name, K, V, heads=1):
    """The cell at K x V; RWKV-7 declares its heads (NH): one unless `heads` says otherwise."""
    spec = recdsl.load(name)
    return spec, spec.analysis_dims(K=K, V=V, **({"NH": heads} if name == "rwkv7" else {}))


@pytest.mark.parametrize("name", CELLS)
def test_cells_select_and_run_the_triton_dplr_kernels(name):
    spec, dims = _dims(name, 16, 16)
    sel = emit_cell(spec.lower(**dims), "triton").selection
    stages = [c for c in sel.stages if isinstance(c.form, ChunkDPLR)]
    assert stages and all(c.kernel.name == KERNEL and c.kernel.borrowed is None for c in stages), sel
    layer = spec(backend="triton", **dims).double()
    layer(**random_inputs(spec, layer, 1, 5, torch.float64))
    assert KERNEL in layer.ran


_compare = functools.partial(reference_errors, kernel=KERNEL)


# Triton's interpreter runs the time loops step by step (a few seconds per 40 steps of one
# row): the longer shapes are `slow`.
@pytest.mark.parametrize("name,T", [("kda", 1), ("kda", 37), ("kda", 64), ("rwkv7", 1), ("rwkv7", 37),
                                    pytest.param("rwkv7", 64, marks=pytest.mark.slow)])
def test_cells_match_reference_fp64(name, T):
    """T = 37, 64: three and four checkpoint segments of the backward (the last one short at 37)."""
    spec, dims = _dims(name, 16, 16)
    assert_close(_compare(spec, dims, 1, T, torch.float64))


@pytest.mark.parametrize("name,K,V", [("kda", 60, 60), pytest.param("rwkv7", 16, 60, marks=pytest.mark.slow),
                                      pytest.param("rwkv7", 60, 16, marks=pytest.mark.slow)])
def test_sizes_not_a_power_of_two(name, K, V):
    """K, V = 60: padded key tiles, two V blocks (the key-side gradients summed over them)."""
    spec, dims = _dims(name, K, V)
    assert_close(_compare(spec, dims, 1, 20, torch.float64))


@pytest.mark.parametrize("name", ["kda", pytest.param("rwkv7", marks=pytest.mark.slow)])
def test_heads(name):
    spec, dims = _dims(name, 16, 16, heads=2)
    assert_close(_compare(spec, dims, 2, 12, torch.float64, heads=2))


@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_and_cu_seqlens_by_the_runtime(reverse):
    """The runtime flips / splits around the kernels (Caps: reverse and varlen "runtime"):
    an empty and a one-step sequence among them, per-sequence initial states."""
    spec, dims = _dims("kda", 16, 16)
    assert_close(_compare(spec, dims, 1, 20, torch.float64, reverse=reverse))
    cu = torch.tensor([0, 7, 7, 8, 24])
    assert_close(_compare(spec, dims, 1, 24, torch.float64, cu_seqlens=cu, reverse=reverse))


@pytest.mark.slow
def test_float32_within_fla_style_tolerance():
    spec, dims = _dims("kda", 16, 16)
    e = _compare(spec, dims, 2, 37, torch.float32)
    assert e["out"] <= 2e-5 * e["scale"] and e["state"] <= 2e-5 * e["scale"] and e["grad"] <= 2e-4 * e["scale"], e


# ------------------------------------------------------------------ the kernels themselves
def _inputs(BH, T, K, V, decay=2.0, seed=0):
    """q, k, v, a, b, g, S0 as the stdlib cells make them: a = -β κ, b = κ for a unit key κ
    (a contraction, as KDA / RWKV-7), g a per-key log decay in [-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    kappa = torch.nn.functional.normalize(rnd(BH, T, K), dim=-1)
    beta = torch.rand(BH, T, 1, generator=gen, dtype=torch.float64)
    g = -decay * torch.rand(BH, T, K, generator=gen, dtype=torch.float64)
    return rnd(BH, T, K), rnd(BH, T, K), rnd(BH, T, V), -beta * kappa, kappa, g, rnd(BH, K, V)


def _against_naive(q, k, v, a, b, g, S0, read_out=True, read_state=True):
    """Outputs, final state and every gradient of the Triton kernels and of naive_dplr: the
    max abs difference, its scale, and whether the Triton ones are finite."""
    res = []
    for f in (dplr_kernels.fused_recurrent_dplr, dplr.naive_dplr):
        xs = [x.clone().requires_grad_() for x in (q, k, v, a, b, g, S0)]
        o, S = f(*xs)
        w = torch.Generator().manual_seed(5)
        loss = (o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum() if read_out else 0
        if read_state:
            loss = loss + (S * torch.randn(S.shape, generator=w, dtype=S.dtype)).sum()
        res.append([o.detach(), S.detach(), *torch.autograd.grad(loss, xs, materialize_grads=True)])
    diff = max(float((x - y).abs().max()) for x, y in zip(*res))
    scale = max(float(y.abs().max()) for y in res[1])
    return diff, scale, all(bool(torch.isfinite(x).all()) for x in res[0])


def test_kernels_match_the_per_step_oracle():
    """T = 37: three checkpoint segments, a short last one; V = 40 in two V blocks; K = 20 padded."""
    diff, scale, finite = _against_naive(*_inputs(1, 37, 20, 40))
    assert finite and diff <= 1e-12 * scale, (diff, scale)


@pytest.mark.parametrize("read_out,read_state", [(True, False), (False, True)])
def test_an_unread_output_or_state_gets_no_cotangent(read_out, read_state):
    diff, scale, finite = _against_naive(*_inputs(1, 18, 16, 16), read_out=read_out, read_state=read_state)
    assert finite and diff <= 1e-12 * scale, (diff, scale)


def test_strong_decay_stays_finite():
    """Log decays down to -20 per step, one below the floor of -80 (clamped, gradient zero as
    clamp's): every exponent the kernels take is one step's g <= 0."""
    q, k, v, a, b, g, S0 = _inputs(1, 20, 16, 16, decay=20.0)
    g[0, 3, :4] = -100.0
    diff, scale, finite = _against_naive(q, k, v, a, b, g, S0)
    assert finite and diff <= 1e-12 * scale, (diff, scale)


def test_double_backward_differentiates_the_torch_form():
    """create_graph=True: the backward is autograd's derivative of dplr.chunk_dplr."""
    inputs = _inputs(1, 12, 16, 16)
    res = []
    for f in (dplr_kernels.fused_recurrent_dplr, dplr.chunk_dplr):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, S = f(*xs)
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for x, y in zip(*res):
        assert float((x - y).abs().max()) <= 1e-9 * max(1.0, float(y.abs().max()))


# ------------------------------------------------------------------ ahead of time
STDLIB_COMPILES = isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, size, tmp_path, monkeypatch):
    """K = V = 64 and 128 float32, as a GPU launches them (dplr_kernels.LAUNCH's warps)."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = dplr_kernels.compile_ahead(arch, K=size, V=size)
    assert len(compiled) == len(dplr_kernels.AOT_VARIANTS)
    for c in compiled:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
def test_compile_cell_compiles_the_dplr_kernels_of_kda(tmp_path, monkeypatch):
    """`recdsl inspect --stage ptx` (compile_cell) compiles the kernels of the stage that runs them."""
    from recdsl.backends import triton as triton_backend
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    spec, dims = _dims("kda", 16, 16)
    _, compiled = triton_backend.compile_cell(emit_cell(spec.lower(**dims), "triton"), 90)
    assert sorted(c.name for c in compiled) == sorted(name for name, _ in dplr_kernels.AOT_VARIANTS)
    assert all(c.spills == 0 for c in compiled)
