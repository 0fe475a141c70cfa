"""The Triton sequential kernel with a matrix state too big for one program (more than
MATRIX_LIMIT padded elements per batch row): when the step acts on the state column by
column (or row by row) -- each column of S' reads only that column of S and values that
hold no column index -- the kernel runs one program per (row block, head, block of
columns), the column-free values recomputed in every program (SeqKernel.split); the
backward sums the column-free leaves' gradients over the programs (one copy each).

Each cell runs on the triton backend (Triton's interpreter, CPU tensors) and on the
reference in float64: outputs, final states and the gradients of inputs, params and the
initial state agree (plain, with heads, reversed with cu_seqlens); the selection is
`triton.sequential`, never the torch loop. A step that mixes the columns (the stdlib Yaad's
norm over the error, MatrixTanh's transpose) keeps the torch loop. The split kernels
compile for sm_80 / sm_90 without spills (slow)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl
from helpers import grad_inputs, outputs_and_grads, paired_layers, random_initial_state
from recdsl.backends.triton.seq_kernels import MATRIX_LIMIT, NotEligible, split_plan
from recdsl.lowering import SequentialLoop
from recdsl.pipeline import emit_cell

# Yaad with an elementwise Huber clip (the stdlib's clips by the error's norm: columns mixed),
# a per-column bias param and per-step scalar gates
YAAD_COLUMNS = """
cell YaadColumns(K, V):
    input q[K], k[K], v[V], ga[], gl[], gd[]
    param b[V] ~ normal(0, 0.1)
    state M[K, V] = 0
    kn = l2norm(k)
    e = kn @ M - v + b
    dl = softplus(gd)
    g = where(abs(e) <= dl, e, dl * sign(e))
    M' = sigmoid(ga) * M - sigmoid(gl) * outer(kn, g)
    output o = l2norm(q) @ M'
"""

# TTT-like by rows: row i of M' reads row i of M (M @ v contracts the columns), a per-row
# param read in the step
ROW_MEMORY = """
cell RowMemory(K, V):
    input k[K], v[V], lr[]
    param w[K] ~ uniform(0.5, 1.5)
    state M[K, V] = 0
    r = tanh(M @ v) * w - k
    M' = M - sigmoid(lr) * outer(r, v)
    output o = M' @ v
"""

MATRIX_TANH = """
cell MatrixTanh(K):
    input k[K], q[K]
    state S[K, K] = 0
    y = tanh(S @ k)
    S' = tanh(0.9 * S.T + outer(y, k))
    output o = S' @ q
"""

CELLS = {   # name: (source, dims, split axis, programs per row block)
    "yaad_columns": (YAAD_COLUMNS, {"K": 96, "V": 96}, 1, 3),
    "yaad_columns_128": (YAAD_COLUMNS, {"K": 128, "V": 128}, 1, 4),
    "row_memory": (ROW_MEMORY, {"K": 80, "V": 64}, 0, 5),
}


def _kernel(src, dims):
    emitted = emit_cell(recdsl.load(src).lower(**dims), "triton")
    loops = [c for c in emitted.selection.stages if isinstance(c.form, SequentialLoop)]
    return emitted, loops


def _compare(name, B=2, T=3, heads=None, cu=None, **call):
    src, dims, _, _ = CELLS[name]
    spec = recdsl.load(src)
    ref, tri = paired_layers(spec, "triton", dims, heads)
    xs = grad_inputs(spec, ref, B, T)
    state = random_initial_state(spec, ref, B if cu is None else len(cu) - 1)
    if cu is not None:
        call["cu_seqlens"] = torch.tensor(cu)
    o_ref, s_ref, g_ref = outputs_and_grads(ref, xs, state, **call)
    o_tri, s_tri, g_tri = outputs_and_grads(tri, xs, state, **call)
    assert [a is None for a in g_ref] == [a is None for a in g_tri]
    assert tri.ran == ["triton.sequential"], tri.ran
    err = lambda a, b: float((a.detach() - b.detach()).abs().max()) / max(1.0, float(a.detach().abs().max()))  # noqa
    return (max(err(a, b) for a, b in zip(o_ref, o_tri)), max(err(s_ref[k], s_tri[k]) for k in s_ref),
            max(err(a, b) for a, b in zip(g_ref, g_tri) if a is not None))


@pytest.mark.parametrize("name", CELLS)
def test_selection_is_the_sequential_kernel_split_across_programs(name):
    src, dims, axis, blocks = CELLS[name]
    emitted, loops = _kernel(src, dims)
    assert [c.kernel.name for c in loops] == ["triton.sequential"], [[p.reason for p in c.passed] for c in loops]
    kern, = emitted.emitter.kernels
    state = kern.ir.states[kern.states[0]]
    assert kern.split.axis == axis and kern.programs_per_rows == blocks
    assert kern.split.size * blocks == kern.ir.shape_of(state)[axis]
    assert kern.dims(state)[axis] == kern.split.size   # the program holds its block only
    padded = 1
    for d in kern.dims(state):
        padded *= 1 << (d - 1).bit_length()
    assert padded <= MATRIX_LIMIT
    assert [c.note for c in loops] == [kern.mode()]


def test_a_state_that_fits_is_not_split():
    emitted, loops = _kernel(YAAD_COLUMNS, {"K": 32, "V": 32})
    kern, = emitted.emitter.kernels
    assert [c.kernel.name for c in loops] == ["triton.sequential"] and kern.split is None
    assert kern.programs_per_rows == 1 and "split0" not in emitted.kernels


@pytest.mark.parametrize("name", ["yaad_columns", "row_memory"])
def test_cell_matches_reference_with_gradients(name):
    out, state, grad = _compare(name)
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)


def test_heads():
    out, state, grad = _compare("yaad_columns_128", B=2, T=2, heads=2)
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)


@pytest.mark.parametrize("name", ["yaad_columns", "row_memory"])
def test_reverse_and_cu_seqlens(name):
    """Per-sequence initial and final states, an empty and a one-step sequence, right to left."""
    out, state, grad = _compare(name, B=1, T=6, cu=[0, 3, 3, 4, 6], reverse=True)
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)


@pytest.mark.parametrize("src, dims", [("yaad", {"K": 128, "V": 128}), (MATRIX_TANH, {"K": 96})])
def test_a_step_that_mixes_columns_keeps_the_torch_loop(src, dims):
    """The stdlib Yaad clips by norm(e) (a sum over the columns); MatrixTanh transposes S."""
    ir = recdsl.load(src).lower(**dims)
    loops = [c for c in emit_cell(ir, "triton").selection.stages if isinstance(c.form, SequentialLoop)]
    assert [c.kernel.name for c in loops] == ["torch.loop"]
    with pytest.raises(NotEligible):
        split_plan(ir, list(ir.states), {n.id for n in loops[0].form.core})


@pytest.mark.parametrize("name", ["yaad_columns", "row_memory"])
def test_kernels_compute_nothing_unread(name):
    path = Path(__file__).resolve().parents[1] / "pipeline" / "test_no_dead_code.py"
    spec = importlib.util.spec_from_file_location("_dead_code_checker", path)
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    src, dims, _, _ = CELLS[name]
    assert checker.dead_python(_kernel(src, dims)[0].kernels) == []


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_split_kernels_compile_for_a_gpu_without_spills(arch):
    """triton.compile for sm_80 / sm_90 and ptxas (no GPU), forward and backward: what only a
    GPU compiler rejects is caught here, and each program's block fits its registers."""
    from recdsl.backends import triton as triton_backend
    for src, dims, _, _ in CELLS.values():
        _, compiled = triton_backend.compile_cell(emit_cell(recdsl.load(src).lower(**dims), "triton"), arch)
        assert len(compiled) == 2 and all(c.spills == 0 for c in compiled), \
            [(c.name, c.registers, c.spills) for c in compiled]
