"""The triton backend against the reference, in Triton's interpreter (CPU tensors):
outputs, final states and gradients (inputs and params), float64 and float32, on the
scan-class and nonlinear LANGUAGE.md examples, the stdlib cells of those classes and the
unseen cells of tests/analysis/cells; odd T, T below and above a block, several batch
and head counts, reverse and cu_seqlens. Every stage asserted to run a Triton kernel
where the class has one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recdsl
from helpers import compare_backends, language_examples, random_inputs
from recdsl.lowering import ChunkDelta, ChunkDiag, ChunkDPLR, HouseholderProducts
from recdsl.pipeline import emit_cell

SCAN_AND_SEQ = ["hgrn", "mamba", "mega_ema", "mingru", "minlstm", "qrnn", "rglru", "s4d", "sru", "lru", "gateloop",
                "block_diag_lrnn", "plstm1d", "aaren", "elman", "elman_relu", "gru", "indrnn", "lem", "lstm",
                "lstm_peephole", "mgu", "paragru", "paralstm", "slstm", "hgrn2", "retnet", "rwkv6", "mamba2"]
UNSEEN = ["aaren", "elman", "gru", "hgrn", "hgrn_core", "indrnn", "linear_rnn", "minlstm", "qrnn", "qrnn2", "rglru",
          "slstm_no_recurrence"]
CELLS_DIR = Path(__file__).resolve().parents[1] / "analysis" / "cells"
FP64_TOL: dict[str, float] = {}


def _selection(spec, dims=None):
    return emit_cell(spec.lower(**spec.analysis_dims(**(dims or {}))), "triton").selection


def _check(spec, dims, tol, **kw):
    e = compare_backends(spec, dims, "triton", **kw)
    scale = max(1.0, e["scale"])
    assert e["out"] <= tol * scale and e["state"] <= tol * scale and e["grad"] <= tol * scale * 10, e


@pytest.mark.parametrize("name", SCAN_AND_SEQ)
def test_stdlib_cell_matches_reference_fp64(name):
    spec = recdsl.load(name)
    _check(spec, spec.analysis_dims(), FP64_TOL.get(name, 1e-10), B=2, T=23, dtype=torch.float64)


@pytest.mark.parametrize("name", SCAN_AND_SEQ)
def test_scan_and_sequential_stages_run_triton_kernels(name):
    sel = _selection(recdsl.load(name))
    assert any(c.kernel.borrowed is None for c in sel.stages), sel
    for c in sel.stages:   # a torch stage of these cells is only a matrix-state chunkwise form (Triton: issue 15)
        assert c.kernel.borrowed is None or isinstance(c.form, (ChunkDiag, ChunkDelta, HouseholderProducts,
                                                                ChunkDPLR)), c


@pytest.mark.parametrize("name", UNSEEN)
def test_unseen_cells_match_reference(name):
    spec = recdsl.load(CELLS_DIR / f"{name}.rec")
    _check(spec, spec.analysis_dims(), 1e-10, B=3, T=37, dtype=torch.float64)


LANG = {n: src for n, src in language_examples().items()}


@pytest.mark.parametrize("name", sorted(LANG))
def test_language_examples(name):
    spec = recdsl.load(LANG[name])
    if spec.cell.over != "seq":   # grids: the wavefront kernel (test_grid_kernels.py); DAGs: torch's level_sync
        layer = spec(backend="triton", **spec.analysis_dims())
        stages = layer.plan.selections["triton"].stages
        if spec.cell.over == "grid2d":
            assert all(c.kernel.name == "triton.wavefront" and c.kernel.borrowed is None for c in stages)
        else:
            assert all(c.kernel.borrowed == "torch" for c in stages)
        return
    _check(spec, spec.analysis_dims(), FP64_TOL.get(name.lower(), 1e-10), B=2, T=19, dtype=torch.float64)


@pytest.mark.parametrize("name", ["hgrn", "lstm", "aaren", "lru", "mamba", "slstm"])
def test_float32_within_fla_style_tolerance(name):
    spec = recdsl.load(name)
    e = compare_backends(spec, spec.analysis_dims(), "triton", B=2, T=37, dtype=torch.float32)
    scale = max(1.0, e["scale"])
    assert e["out"] <= 2e-5 * scale and e["state"] <= 2e-5 * scale and e["grad"] <= 2e-4 * scale, e


@pytest.mark.parametrize("T", [1, 3, 65])
@pytest.mark.parametrize("name", ["hgrn", "lstm", "block_diag_lrnn"])
def test_lengths_around_the_block(name, T):
    spec = recdsl.load(name)
    _check(spec, spec.analysis_dims(), 1e-10, B=2, T=T, dtype=torch.float64)


@pytest.mark.parametrize("B,heads", [(1, None), (5, None), (3, 2), (1, 3)])
@pytest.mark.parametrize("name", ["hgrn", "gru", "aaren"])
def test_batch_and_heads(name, B, heads):
    spec = recdsl.load(name)
    _check(spec, spec.analysis_dims(), 1e-10, B=B, T=21, dtype=torch.float64, heads=heads)


@pytest.mark.parametrize("name", ["hgrn", "lstm", "mamba", "lru", "aaren"])
@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_and_cu_seqlens(name, reverse):
    """Natively in the kernels (hgrn, lstm, mamba, lru: `native`) or by the runtime's flip and
    split (aaren: a stage reads another's previous state): outputs, per-sequence final states
    from per-sequence initial states, and gradients, with an empty and a one-step sequence."""
    spec = recdsl.load(name)
    _check(spec, spec.analysis_dims(), 1e-10, B=2, T=17, dtype=torch.float64, reverse=reverse)
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims).double()
    tri = spec(backend="triton", **dims).double()
    tri.load_state_dict(ref.state_dict())
    assert tri._program.native == (name != "aaren")
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, 1, 20, torch.float64).items()}
    cu = torch.tensor([0, 7, 7, 8, 20])
    _, s_shape = ref(**{k: v[:, :1] for k, v in xs.items()})
    g = torch.Generator().manual_seed(3)
    st = {k: torch.randn((4,) + v.shape[1:], generator=g, dtype=torch.float64) for k, v in s_shape.items()}
    (o1, s1), (o2, s2) = ref(**xs, state=st, cu_seqlens=cu, reverse=reverse), \
        tri(**xs, state=st, cu_seqlens=cu, reverse=reverse)
    o1, o2 = (o1 if isinstance(o1, tuple) else (o1,)), (o2 if isinstance(o2, tuple) else (o2,))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(o1, o2))
    assert all(torch.allclose(s1[k], s2[k], atol=1e-10) for k in s1)
    w = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in o1]
    l1 = sum((a * c).sum() for a, c in zip(o1, w)) + sum(v.sum() for v in s1.values())
    l2 = sum((a * c).sum() for a, c in zip(o2, w)) + sum(v.sum() for v in s2.values())
    g1 = torch.autograd.grad(l1, list(xs.values()), allow_unused=True)
    g2 = torch.autograd.grad(l2, list(xs.values()), allow_unused=True)
    assert all(a is None or torch.allclose(a, b, atol=1e-9) for a, b in zip(g1, g2))


def test_bf16_inputs_accumulate_in_fp32():
    spec = recdsl.load("hgrn")
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims)
    tri = spec(backend="triton", **dims)
    tri.load_state_dict(ref.state_dict())
    xs = random_inputs(spec, ref, 2, 40, torch.bfloat16)
    o1, _ = ref(**xs)
    o2, s2 = tri(**xs)
    assert o2.dtype == torch.bfloat16 and s2["h"].dtype == torch.float32
    assert (o1.float() - o2.float()).abs().max() <= 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hgrn", "lstm", "lru"])
def test_long_odd_sequence(name):
    spec = recdsl.load(name)
    _check(spec, spec.analysis_dims(), 1e-9, B=2, T=1000, dtype=torch.float64)


@pytest.mark.parametrize("name,dims", [("lstm", dict(D=16, H=16)), ("gru", dict(D=16, H=16)),
                                       ("lstm", dict(D=32, H=32))])
def test_larger_hidden_sizes(name, dims):
    """tl.dot tiles in the step (H = 16) and the torch fallback for weights that do not fit (H = 32)."""
    spec = recdsl.load(name)
    _check(spec, dims, 1e-10, B=3, T=9, dtype=torch.float64)


TWO_STAGES = """
cell Two(D):
    input x[D]
    state h[D] = 0
    state s[D] = 0
    h' = tanh(x + h * 0.5)
    s' = 0.9 * s + h
    output y = s' + h'
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_stage_reading_a_sequential_stages_previous_state(backend):
    """A loop stage's state sequence bound lazily and read shifted by a later scan (torch
    raised a KeyError), and a constant decay (0.9) kept in float64 in the scan kernel."""
    e = compare_backends(recdsl.load(TWO_STAGES), {"D": 3}, backend, B=2, T=19, dtype=torch.float64)
    assert max(e["out"], e["state"], e["grad"]) <= 1e-12, e
