"""Every kernel the triton backend generates compiles ahead of time for sm_80 and sm_90
(no GPU: triton.compile for a GPUTarget, ptxas -v for registers and spills), with no
spills at the stdlib's default sizes. The fast suite compiles a few cells of each kernel
family; the `slow` suite all of them."""
from __future__ import annotations

import pytest

import recdsl
from recdsl.backends import triton as triton_backend
from recdsl.lowering import SequentialLoop
from recdsl.pipeline import emit_cell

from test_backend import SCAN_AND_SEQ

FAST = ["hgrn", "lstm", "block_diag_lrnn", "aaren"]


def _compile(name, arch):
    spec = recdsl.load(name)
    ir = spec.lower(**spec.analysis_dims())
    emitted = emit_cell(ir, "triton")
    text, compiled = triton_backend.compile_cell(emitted, arch)
    generated = [c for c in compiled if not c.name.startswith("chunk_diag_")]   # and the chunk kernels it calls
    assert len(generated) == 2 * len(emitted.emitter.kernels) and compiled
    for c in compiled:
        assert c.asm["ptx"] and c.asm["cubin"] and c.registers > 0, c.name
        assert f"sm_{arch}" in c.asm["ptx"], c.name
        assert c.spills == 0, f"{name}: {c.name} spills {c.spills} bytes on sm_{arch}"
    return compiled


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", FAST)
def test_kernels_compile_without_spills(name, arch):
    _compile(name, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", [n for n in SCAN_AND_SEQ if n not in FAST])
def test_every_stdlib_kernel_compiles_without_spills(name, arch):
    _compile(name, arch)


def test_inspect_ptx_prints_the_resource_summary():
    from click.testing import CliRunner

    from recdsl.cli import main
    res = CliRunner().invoke(main, ["inspect", "gru", "--stage", "ptx", "--arch", "sm_80"])
    assert res.exit_code == 0, res.output
    assert ".target sm_80" in res.output and "spills" in res.output and "stage0_h_fwd" in res.output
    res = CliRunner().invoke(main, ["inspect", "hgrn", "--stage", "triton"])
    assert res.exit_code == 0 and "@triton.jit" in res.output and "hgrn.rec:12" in res.output


@pytest.mark.parametrize("arch", [80, 90])
def test_sequential_kernel_with_tensor_core_tiles(arch):
    """H = 16: the step's GEMMs use tl.dot (every side >= 16); still no spills."""
    spec = recdsl.load("lstm")
    emitted = emit_cell(spec.lower(D=16, H=16), "triton")
    _, compiled = triton_backend.compile_cell(emitted, arch)
    assert "tl.dot(" in emitted.kernels
    assert all(c.spills == 0 for c in compiled), [(c.name, c.spills) for c in compiled]


def test_weights_too_big_to_hold_are_streamed_not_a_fallback():
    """Above HOLD_LIMIT the sequential kernel streams its weights (tests/triton/test_seq_streamed.py)."""
    emitted = emit_cell(recdsl.load("lstm").lower(D=32, H=32), "triton")
    choice = emitted.selection.choice(0)
    assert isinstance(choice.form, SequentialLoop) and choice.kernel.name == "triton.sequential"
    assert choice.kernel.borrowed is None and choice.passed == []
    assert emitted.emitter.kernels[0].streamed and emitted.emitter.kernels[0].weight_elements == 4096
