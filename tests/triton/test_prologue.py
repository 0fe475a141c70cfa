"""The chunkwise stages' operand prologue (backends/triton/prologue.py): the operand math of a
ChunkDiag / ChunkDelta / DPLR / DeltaProduct stage (l2norm(q) * K**-0.5, l2norm(k),
logsigmoid(x) / 16, beta * -1.0 * -1.0) is one generated kernel forward and one backward,
derived from the IR; the stage's kernels read its outputs.

Gated DeltaNet, linear attention and a cell written here (GLA-like, q and k l2-normalised, a log gate
with a param) select it: the driver launches it and hands its outputs to the chunk stage,
the kernel module holds both kernels with every math line annotated with its .rec line,
and the layer matches the reference backend in float64 (outputs, states, gradients of
every input, param and the initial state), with heads too. The kernel on its own: its
outputs against torch's ops, gradcheck and gradgradcheck (the second derivative runs its
torch twin), bf16 inputs widened. What it cannot take stays torch ops and the driver says
so. Its kernels compile for sm_80 / sm_90 with no spills."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import assert_close, reference_errors
from recdsl.backends import triton as triton_backend
from recdsl.backends.triton import launch
from recdsl.backends.triton.prologue import PrologueKernel
from recdsl.pipeline import emit_cell

NORM_GLA = '''
cell NormGLA(K, V):
    input q[K], k[K], v[V], x[K]
    param w[K] ~ normal(0, 1)
    state S[K, V] = 0
    gk = logsigmoid(x + w) / 16
    S' = exp(gk)[:, None] * S + outer(l2norm(k), v)
    output o = (l2norm(q) * K**-0.5) @ S'
'''

# cell -> (its chunk kernel, the roles of the operands the prologue writes, its leaves in the driver)
CELLS = {
    "gated_deltanet": ("triton.chunk_delta", ["q", "k", "beta"], "[inputs['q'], inputs['k'], inputs['beta']]"),
    "linear_attention": ("triton.chunk_diag", ["q", "k"], "[inputs['q'], inputs['k']]"),
    NORM_GLA: ("triton.chunk_diag", ["q", "k", "g"], "[inputs['q'], inputs['k'], inputs['x'], seq_params['w']]"),
}
IDS = {"gated_deltanet": "gated_deltanet", "linear_attention": "linear_attention", NORM_GLA: "norm_gla"}


def _emitted(cell, K=12, V=5):
    spec = recdsl.load(cell)
    dims = spec.analysis_dims(K=K, V=V)
    return spec, dims, emit_cell(spec.lower(**dims), "triton")


def _prologue(emitted, part: str = "prologue") -> PrologueKernel:
    kernels = [k for k in emitted.emitter.kernels if isinstance(k, PrologueKernel) and k.part == part]
    assert len(kernels) == 1, emitted.emitter.kernels
    return kernels[0]


@pytest.mark.parametrize("cell", CELLS, ids=IDS.get)
def test_the_chunk_stage_reads_the_prologue_outputs(cell):
    chunk, roles, leaves = CELLS[cell]
    _, _, emitted = _emitted(cell)
    kern = _prologue(emitted)
    cell_name = emitted.plan.ir.name.lower()
    assert kern.name == f"{cell_name}_stage0_prologue"
    assert [kern.roles[o.id] for o in kern.outputs] == roles
    driver = emitted.source.splitlines()
    launch_line, = [ln for ln in driver if "launch.prologue(" in ln and "_prologue_fwd" in ln]
    assert f"launch.prologue(stage_kernels[0], {leaves}, first_input, seq_prefix_rank)" in launch_line
    outs = launch_line.split("=")[0].strip()
    stage_line, = [ln for ln in driver if ln.strip().startswith("reads")]
    assert all(f"{outs}[{i}]" in stage_line for i in range(len(roles)))   # the chunk stage reads every output
    body = "\n".join(driver[driver.index(launch_line):])
    for op in ("torch.rsqrt", "torch.sum", "F.logsigmoid", "[..., :, None]"):
        assert op not in body, op          # the operand math left the driver
    assert chunk in emitted.source          # ... and the chunk stage still runs its kernels


@pytest.mark.parametrize("cell", CELLS, ids=IDS.get)
def test_kernel_module_holds_both_kernels_annotated(cell):
    _, _, emitted = _emitted(cell)
    kern = _prologue(emitted)
    text = emitted.kernels
    assert f"def {kern.name}_fwd(" in text and f"def {kern.name}_bwd(" in text
    start = text.index(f"def {kern.name}_fwd(")
    end = text.find("@triton.jit", text.index(f"def {kern.name}_bwd("))      # a later stage's kernels
    lines = text[start:end if end >= 0 else len(text)].splitlines()
    math = [ln.strip() for ln in lines if ln.strip().startswith(("v", "g", "x", "do", "tl.store("))]
    assert math and all(".rec:" in ln or "<string>:" in ln for ln in math), [ln for ln in math if ".rec:" not in ln]


def test_gated_deltanet_l2norm_is_one_step_total():
    """l2norm(x): one row total forward; backward the same two recomputed, the two adjoint
    totals of the broadcast rsqrt (rbar = sum_j ybar_j x_j) and two broadcasts of sbar."""
    _, _, emitted = _emitted("gated_deltanet")
    fwd, bwd = emitted.kernels.split("_prologue_fwd(")[1].split("_prologue_bwd(")
    assert fwd.count("tl.sum(") == 2
    assert bwd.count("tl.sum(") == 4 and bwd.count("tl.broadcast_to(") == 2


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("cell", CELLS, ids=IDS.get)
def test_matches_reference_fp64(cell, heads):
    chunk = CELLS[cell][0]
    spec, dims, emitted = _emitted(cell)
    name = _prologue(emitted).name
    launch.RECORD = []
    try:
        errs = reference_errors(spec, dims, 2, 37, torch.float64, heads=heads, kernel=chunk)
        launched = [k for k, _ in launch.RECORD]
    finally:
        launch.RECORD = None
    assert launched.count(f"{name}_fwd") == 1, launched
    assert_close(errs, 1e-10)


@pytest.mark.parametrize("variant", [{"reverse": True}, {"cu_seqlens": torch.tensor([0, 5, 5, 6, 19])}])
def test_reverse_and_packed_sequences(variant):
    spec, dims, _ = _emitted("gated_deltanet")
    B = 1 if "cu_seqlens" in variant else 2
    assert_close(reference_errors(spec, dims, B, 19, torch.float64, kernel="triton.chunk_delta", **variant), 1e-10)


def _stage(emitted):
    kern = _prologue(emitted)
    return launch.Stage(kern, launch.Kernels(emitted.kernels, "test-prologue"))


def _gdn_operands(q, k, beta, K):
    def l2norm(x):
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    return [l2norm(q) * K ** -0.5, l2norm(k), beta * -1.0 * -1.0]


def _gdn_inputs(dtype, heads=3, K=12, B=2, T=7):
    g = torch.Generator().manual_seed(1)
    shape = (B, T, heads, K)
    q, k = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    beta = torch.rand((B, T, heads), generator=g, dtype=torch.float64).to(dtype)
    return q, k, beta


def test_kernel_against_torch_ops_and_gradcheck():
    """The kernel alone on [B, T, H, K] inputs: torch's operand values, and autograd's
    gradients and second derivatives (the twin) by finite differences."""
    _, _, emitted = _emitted("gated_deltanet")
    stage = _stage(emitted)
    q, k, beta = (x.requires_grad_() for x in _gdn_inputs(torch.float64))
    outs = launch.prologue(stage, [q, k, beta], q, 3)
    for got, want in zip(outs, _gdn_operands(q, k, beta, 12)):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)

    def fn(*xs):
        return tuple(launch.prologue(stage, list(xs), xs[0], 3))
    small = [x.detach()[:, :3].clone().requires_grad_() for x in (q, k, beta)]
    assert torch.autograd.gradcheck(fn, small)
    assert torch.autograd.gradgradcheck(fn, small)


def test_bfloat16_inputs_are_widened():
    _, _, emitted = _emitted("gated_deltanet")
    stage = _stage(emitted)
    q, k, beta = _gdn_inputs(torch.bfloat16)
    outs = launch.prologue(stage, [q, k, beta], q, 3)
    want = _gdn_operands(q.double(), k.double(), beta.double(), 12)
    for got, ref in zip(outs, want):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), ref, rtol=8e-3, atol=1e-3)   # one bf16 rounding of fp32 math


@pytest.mark.parametrize("cell, remark", [
    ("lightning_attention", "operand prologue: operand g (lightning_attention.rec:8) is constant over time: torch ops "
     "on its own shape"),
    ("gsa", "operand prologue: amax at gsa.rec:9 (not elementwise, nor a step's total): torch ops, read as a leaf"),
    ("lru", "outputs epilogue: 1 op to fuse: the outputs stay torch ops"),
])
def test_what_stays_torch_ops_is_said(cell, remark):
    spec = recdsl.load(cell)
    emitted = emit_cell(spec.lower(**spec.analysis_dims()), "triton")
    assert f"# {remark}" in emitted.source
    has_kernel = any(isinstance(k, PrologueKernel) for k in emitted.emitter.kernels)
    assert has_kernel == (cell == "gsa")   # gsa's softmax around the amax still runs in the kernel


@pytest.mark.parametrize("cell", ["gla", "linear_attention_nonorm"])
def test_a_constant_query_scale_is_the_chunk_kernels(cell):
    """q * c with c a constant: no prologue kernel and no torch op for it; the chunk kernels
    take c (chunk_kernels' SCALE), and the driver says nothing is left to torch ops."""
    spec = recdsl.load(cell)
    emitted = emit_cell(spec.lower(**spec.analysis_dims()), "triton")
    assert not any(isinstance(k, PrologueKernel) for k in emitted.emitter.kernels)
    call, = [ln for ln in emitted.source.splitlines() if "chunk_diag_stage([" in ln]
    assert "(inputs['q'], True, " in call and "operand prologue" not in emitted.source


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("cell", ["gated_deltanet", NORM_GLA], ids=IDS.get)
def test_prologue_compiles_without_spills(cell, arch, monkeypatch):
    """At K = V = 128 (the widest tiles fla runs); compile_cell's generated kernels only (the
    fixed chunk kernel sets are compiled by their own tests)."""
    monkeypatch.setattr(triton_backend, "_chunk_kernels", lambda emitted, arch: [])
    _, _, emitted = _emitted(cell, K=128, V=128)
    name = _prologue(emitted).name
    _, compiled = triton_backend.compile_cell(emitted, arch)
    ours = [c for c in compiled if c.name in (f"{name}_fwd", f"{name}_bwd")]
    assert len(ours) == 2
    for c in ours:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


# ------------------------------------------------------------------ the outputs' epilogue
# cell -> (its chunk kernel, the leaves of its outputs' epilogue in the driver: the stages' values)
EPILOGUES = {"mlstm": ("triton.chunk_diag", 4), "linear_attention": ("triton.chunk_diag", 3)}


@pytest.mark.parametrize("cell", EPILOGUES)
def test_outputs_after_the_stages_are_one_kernel(cell):
    """mLSTM's h = (q @ C') / max(|q · n'|, e^{-m'}) and linear attention's normalised output:
    one generated kernel over the stages' values (the dot a step total in it), the return
    line reads its outputs, and no torch op of that math is left in the driver."""
    _, _, emitted = _emitted(cell)
    kern = _prologue(emitted, "epilogue")
    assert [o.id for o in kern.outputs] == [n.id for n in emitted.plan.ir.outputs.values()]
    assert len(kern.leaves) == EPILOGUES[cell][1]
    tail = emitted.source[emitted.source.index("# --- outputs"):]
    launch_line, = [ln for ln in tail.splitlines() if "launch.prologue(" in ln]
    outs = launch_line.split("=")[0].strip()
    assert f"{{'{next(iter(emitted.plan.ir.outputs))}': {outs}[0]}}" in tail
    for op in ("torch.abs", "torch.maximum", ".sum(-1)", " / "):
        assert op not in tail, op


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("cell", EPILOGUES)
def test_epilogue_matches_reference_fp64(cell, heads):
    spec, dims, emitted = _emitted(cell)
    name = _prologue(emitted, "epilogue").name
    launch.RECORD = []
    try:
        errs = reference_errors(spec, dims, 2, 37, torch.float64, heads=heads, kernel=EPILOGUES[cell][0])
        launched = [k for k, _ in launch.RECORD]
    finally:
        launch.RECORD = None
    assert launched.count(f"{name}_fwd") == 1, launched
    assert_close(errs, 1e-10)


@pytest.mark.parametrize("arch", [80, 90])
def test_epilogue_compiles_without_spills(arch, monkeypatch):
    monkeypatch.setattr(triton_backend, "_chunk_kernels", lambda emitted, arch: [])
    _, _, emitted = _emitted("mlstm", K=128, V=128)
    name = _prologue(emitted, "epilogue").name
    _, compiled = triton_backend.compile_cell(emitted, arch)
    ours = [c for c in compiled if c.name in (f"{name}_fwd", f"{name}_bwd")]
    assert len(ours) == 2 and all(c.spills == 0 for c in ours), [(c.name, c.registers, c.spills) for c in ours]
