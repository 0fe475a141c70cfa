"""Matrix-state cells the kernels were not written for (tests/analysis/cells: retention with a
fixed and a learned decay, SSD, linear attention with its normaliser, RWKV-6 with its bonus,
DeltaNet, KDA) on the triton backend, against the reference backend in Triton's interpreter.

The grid is the structure, not a hand list: every cell at T in {1, 37, 200} as it is, and
under each of {reverse, cu_seqlens, heads} at T in {37, 64} (so at all four lengths), the state's sides (K, V) rotating
over {16, 60}^2 so every cell meets every size; always from a random initial state (whose
gradient is compared too), float64 to 1e-10 of the outputs' scale; float32 and bfloat16
inputs at fla-style tolerances. Each case asserts first that its chunkwise stage is planned on one of
the backend's own Triton kernels (never a borrowed torch form) and that this kernel ran. The
short sequences run in the fast suite, T = 64 and 200 under `slow`."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import recdsl
from helpers import assert_close, reference_errors
from recdsl.pipeline import emit_cell

CELLS_DIR = Path(__file__).resolve().parents[1] / "analysis" / "cells"
# cell -> the dims naming its state's two sides (the key and the value side of the kernels)
CELLS = {"retnet": ("K", "V"), "retnet_multiscale": ("K", "V"), "ssd": ("P", "N"),
         "linear_attention": ("K", "V"), "rwkv6": ("K", "V"), "deltanet": ("K", "V"), "kda": ("K", "V")}
SIDES = (16, 60)
FAST_T, SLOW_T = (1, 37), (64, 200)
VARIANTS = {"plain": {}, "reverse": {"reverse": True}, "cu_seqlens": {"cu_seqlens": True},
            "heads": {"heads": 2}}


def _spec_dims(name: str, K: int, V: int):
    spec = recdsl.load(CELLS_DIR / f"{name}.rec")
    k_name, v_name = CELLS[name]
    return spec, spec.analysis_dims(**{k_name: K, v_name: V})


def _own_chunk_kernel(spec, dims) -> str:
    """The Triton kernel of the cell's matrix-state stage; asserts it is the backend's own
    (not a borrowed torch form)."""
    ir = spec.lower(**dims)
    stages = [c for c in emit_cell(ir, "triton").selection.stages if len(ir.shape_of(ir.states[c.form.states[0]])) == 2]
    assert stages and all(c.kernel.borrowed is None for c in stages), stages
    return stages[0].kernel.name


def _packed(T: int) -> torch.Tensor:
    """cu_seqlens over T steps: an empty and a one-step sequence among the sequences."""
    cut = T // 5
    return torch.tensor([0, cut, cut, min(cut + 1, T), T])


def _errors(name, K, V, T, variant, dtype=torch.float64):
    spec, dims = _spec_dims(name, K, V)
    call = dict(VARIANTS[variant])
    heads = call.pop("heads", None)
    if heads and "NH" in dims:           # a cell declaring `heads NH`: the count is its dim
        dims, heads = dims | {"NH": heads}, None
    if call.pop("cu_seqlens", None):
        call["cu_seqlens"] = _packed(T)
    B = 1 if "cu_seqlens" in call else 2
    return reference_errors(spec, dims, B, T, dtype, heads, kernel=_own_chunk_kernel(spec, dims), **call)


def _case(name, T, variant, slow=False):
    """One case of the grid; the state's sides rotate over SIDES x SIDES with the case, so
    that every cell meets every size across its lengths and variants."""
    K, V = SIZES[(list(CELLS).index(name) + T + list(VARIANTS).index(variant)) % len(SIZES)]
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(name, K, V, T, variant, id=f"{name}-K{K}-V{V}-T{T}-{variant}", marks=marks)


SIZES = list(itertools.product(SIDES, SIDES))
# Every cell at every length: plain at 1, 37 and 200, each variant at 37 and 64 (64: a whole chunk).
GRID = ([_case(n, T, "plain", slow=T in SLOW_T) for n in CELLS for T in (1, 37, 200)]
        + [_case(n, T, v, slow=T in SLOW_T) for n in CELLS for T in (37, 64) for v in VARIANTS if v != "plain"])


@pytest.mark.parametrize("name, K, V, T, variant", GRID)
def test_matches_reference_fp64(name, K, V, T, variant):
    assert_close(_errors(name, K, V, T, variant), 1e-10)


@pytest.mark.parametrize("name", CELLS)
def test_float32_within_fla_style_tolerance(name):
    e = _errors(name, 60, 16, 37, "plain", torch.float32)
    assert e["out"] <= 2e-5 * e["scale"] and e["state"] <= 2e-5 * e["scale"] and e["grad"] <= 2e-4 * e["scale"], e


@pytest.mark.parametrize("name", CELLS)
def test_bfloat16_inputs_stay_close(name):
    """bf16 inputs and parameters (8 bits of mantissa) with fp32 accumulation, against the
    reference run in bf16 too: within a few bf16 ulps of the outputs' scale (2^-8 = 0.4 %)."""
    e = _errors(name, 16, 16, 37, "plain", torch.bfloat16)
    assert e["out"] <= 2e-2 * e["scale"] and e["state"] <= 2e-2 * e["scale"] and e["grad"] <= 5e-2 * e["scale"], e
