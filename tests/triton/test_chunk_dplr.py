"""The Triton kernels of the diagonal-plus-low-rank delta rule (the ChunkDPLR form):
backends/triton/chunk_dplr_kernels.py (registry entry triton.chunk_dplr: the chunkwise WY/UT
form, forward and backward) and dplr_kernels.py (triton.dplr_recurrent: the fused recurrence,
the next candidate). KDA, RWKV-7 and the unseen tests/analysis/cells/kda.rec select the
chunkwise kernels and agree with the reference backend (outputs, final states, gradients of
every input, parameter and the initial state) in Triton's interpreter, reverse and
cu_seqlens handed to the kernels (caps "kernel": one launch for all sequences, heads read in
place); both kernel sets against torch's forms directly (chunk_dplr, the per-step
naive_dplr: V blocks, chunks and checkpoint segments, unread outputs, strong decays, bf16);
the chunkwise kernels against a float64 step loop on the driver's [B, T, H, .] layout,
packed (an empty and a one-step sequence among them) and right to left, half inputs summed
in float32; a non-finite input runs torch's form per sequence and direction; and the kernels
compile for sm_80 / sm_90 without spills, packed and right to left too."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import triton

import recdsl
from helpers import assert_close, launch_counter, random_inputs, reference_errors
from recdsl.backends.torch import dplr
from recdsl.backends.triton import chunk_dplr_kernels, dplr_kernels
from recdsl.backends.triton.kernels import REGISTRY
from recdsl.lowering import ChunkDPLR
from recdsl.pipeline import emit_cell

UNSEEN_KDA = Path(__file__).resolve().parents[1] / "analysis" / "cells" / "kda.rec"
CELLS = ["kda", "rwkv7", "unseen_kda"]
KERNEL = "triton.chunk_dplr"
RECURRENT = "triton.dplr_recurrent"


def _dims(name, K, V, heads=1):
    """The cell at K x V; RWKV-7 declares its heads (NH): one unless `heads` says otherwise."""
    spec = recdsl.load(UNSEEN_KDA if name == "unseen_kda" else name)
    return spec, spec.analysis_dims(K=K, V=V, **({"NH": heads} if name == "rwkv7" else {}))


@pytest.mark.parametrize("name", CELLS)
def test_cells_select_and_run_the_chunkwise_dplr_kernels(name):
    spec, dims = _dims(name, 16, 16)
    sel = emit_cell(spec.lower(**dims), "triton").selection
    stages = [c for c in sel.stages if isinstance(c.form, ChunkDPLR)]
    assert stages and all(c.kernel.name == KERNEL and c.kernel.borrowed is None for c in stages), sel
    layer = spec(backend="triton", **dims).double()
    layer(**random_inputs(spec, layer, 1, 5, torch.float64))
    assert KERNEL in layer.ran and RECURRENT not in layer.ran, layer.ran


def test_the_recurrent_kernels_are_the_next_candidate():
    names = [k.name for k in REGISTRY.kernels if k.form is ChunkDPLR]
    assert names[:3] == [KERNEL, RECURRENT, "torch.chunk_dplr"], names


_compare = functools.partial(reference_errors, kernel=KERNEL)


# The interpreter's chunk is 32 steps (chunk_dplr_kernels.chunk_size): T = 37 two chunks, the
# last short; 64 two full ones; 200 seven; each with two sub-blocks of 16 (the factored pairs).
# T = 1: one chunk of 16 (a short sequence's chunk is T rounded up to a power of two, >= 16).
@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("T", [1, 37, 64, pytest.param(200, marks=pytest.mark.slow)])
def test_cells_match_reference_fp64(name, T):
    spec, dims = _dims(name, 16, 16)
    assert_close(_compare(spec, dims, 1, T, torch.float64))


@pytest.mark.parametrize("name,K,V", [("kda", 60, 60), ("rwkv7", 16, 60), ("unseen_kda", 60, 16),
                                      pytest.param("rwkv7", 60, 60, marks=pytest.mark.slow)])
def test_sizes_not_a_power_of_two(name, K, V):
    """K, V = 60: padded key tiles, two V blocks."""
    spec, dims = _dims(name, K, V)
    assert_close(_compare(spec, dims, 1, 37, torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("K,V", [(16, 60), (60, 16)])
def test_long_sequences_not_a_power_of_two(name, K, V):
    spec, dims = _dims(name, K, V)
    assert_close(_compare(spec, dims, 1, 200, torch.float64))


@pytest.mark.parametrize("name", ["kda", pytest.param("rwkv7", marks=pytest.mark.slow)])
def test_heads(name):
    spec, dims = _dims(name, 16, 16, heads=2)
    assert_close(_compare(spec, dims, 2, 12, torch.float64, heads=2))


def _launch_counter(monkeypatch) -> dict:
    return launch_counter(chunk_dplr_kernels, monkeypatch)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["kda", "rwkv7"])
def test_reverse_and_cu_seqlens_in_the_kernels_through_the_layer(name, reverse, monkeypatch):
    """The kernels index reverse and cu_seqlens themselves (Caps "kernel": the selection is
    native, the runtime neither flips nor splits, and the state passes launch once for all
    sequences): two heads, K = V = 60 (padded keys, two V blocks), an empty and a one-step
    sequence among them, per-sequence initial states, against the reference in float64."""
    spec, dims = _dims(name, 60, 60, heads=2)
    selection = emit_cell(spec.lower(**dims), "triton").selection
    (stage,) = [c for c in selection.stages if isinstance(c.form, ChunkDPLR)]
    assert stage.kernel.name == KERNEL and selection.native, selection
    assert (stage.kernel.caps.reverse, stage.kernel.caps.varlen) == ("kernel", "kernel")
    assert {"bfloat16", "float16"} <= set(stage.kernel.caps.dtypes)
    counts = _launch_counter(monkeypatch)
    cu = torch.tensor([0, 7, 7, 8, 40])
    assert_close(_compare(spec, dims, 1, 40, torch.float64, heads=2, cu_seqlens=cu, reverse=reverse))
    assert counts["chunk_dplr_fwd_states"] == counts["chunk_dplr_bwd_dstates"] == 1, counts


def test_reverse_through_the_layer_with_batch_rows():
    """Right to left over two batch rows, no cu_seqlens: each row its own sequence."""
    spec, dims = _dims("kda", 16, 16)
    assert_close(_compare(spec, dims, 2, 37, torch.float64, reverse=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_through_the_layer(dtype):
    """A bf16 / fp16 KDA layer packed right to left runs the kernels on its half tensors (Caps
    dtypes: they widen in the loads), its outputs in the inputs' dtype within their rounding
    of the float64 reference's on the same rounded inputs and parameters."""
    spec, dims = _dims("kda", 16, 16)
    layer = spec(backend="triton", **dims).to(dtype)
    reference = spec(backend="reference", **dims).double()
    reference.load_state_dict(layer.state_dict())
    xs = random_inputs(spec, layer, 1, 20, dtype)
    packed = {"reverse": True, "cu_seqlens": torch.tensor([0, 9, 9, 20])}
    o, _ = layer(**xs, **packed)
    exact, _ = reference(**{n: x.double() for n, x in xs.items()}, **packed)
    assert layer.ran == [KERNEL] and o.dtype == dtype, (layer.ran, o.dtype)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert float((o.double() - exact).abs().max()) <= tol * max(1.0, float(exact.abs().max()))


def test_heads_are_read_in_place():
    """With heads, the kernels index [B, T, H, .] themselves and floor the log decays in their
    loads: a forward of KDA copies none of its inputs into [B * H, T, .] rows (nor a clamped
    g) -- the torch ops outside the launches, counted as traffic.py counts them for the
    roofline, write less than one input."""
    from recdsl.backends.triton import traffic
    spec, dims = _dims("kda", 16, 16)
    layer = spec(backend="triton", heads=2, **dims)
    xs = random_inputs(spec, layer, 2, 37, torch.float32)
    with torch.no_grad():
        layer(**xs)
        counted = traffic.count_traffic(lambda: layer(**xs), torch_ops=True)
    assert layer.ran == [KERNEL], layer.ran
    assert {x.kernel for x in counted.launch_log if not x.torch_op} >= {"chunk_dplr_fwd_scores", "chunk_dplr_fwd_output"}
    one_input = xs["q"].numel() * xs["q"].element_size()
    copies = [(x.kernel, x.store_bytes) for x in counted.launch_log
              if x.torch_op and x.kernel in ("aten.clone", "aten.copy_", "aten._to_copy", "aten.flip", "aten.cat",
                                             "aten.clamp", "aten.clamp_min", "aten.transpose", "aten.contiguous")]
    assert all(written < one_input for _, written in copies), copies


def test_a_non_finite_input_packed_right_to_left_runs_the_torch_chunk_form():
    """reverse and cu_seqlens are the kernels', so the torch form runs per sequence and
    direction: a NaN at step 30 of the second sequence [9, 40) reaches its steps <= 30 only
    (those after it right to left), never the first sequence."""
    spec, dims = _dims("kda", 16, 16)
    layer = spec(backend="triton", **dims).double()
    xs = random_inputs(spec, layer, 1, 40, torch.float64)
    xs["v"][0, 30] = float("nan")       # a value the state keeps (a NaN query would reach its own step only)
    out = layer(**xs, reverse=True, cu_seqlens=torch.tensor([0, 9, 40]))[0]
    assert layer.ran == ["torch.chunk_dplr"], layer.ran
    assert bool(torch.isfinite(out[:, :9]).all()) and bool(torch.isfinite(out[:, 31:]).all())
    assert not bool(torch.isfinite(out[:, 9:31]).any())


def test_a_non_finite_input_runs_the_torch_chunk_form():
    """chunk_dplr_kernels.dplr_stage hands a call with a NaN input to torch's chunk form (the
    kernels' tile products would carry it into earlier steps of its chunk): layer.ran says so."""
    spec, dims = _dims("kda", 16, 16)
    layer = spec(backend="triton", **dims).double()
    xs = random_inputs(spec, layer, 1, 40, torch.float64)
    name = next(iter(xs))
    xs[name][0, 35] = float("nan")
    out = layer(**xs)[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert layer.ran == ["torch.chunk_dplr"], layer.ran
    assert bool(torch.isfinite(out[:, :35]).all())


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


def _against(kernels, oracle, inputs, read_out=True, read_state=True):
    """Outputs, final state and every gradient of `kernels` and of `oracle`: the max abs
    difference, its scale, and whether the kernels' are finite."""
    res = []
    for f in (kernels, oracle):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, S = f(*xs)
        w = torch.Generator().manual_seed(5)
        loss = (o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum() if read_out else 0
        if read_state:
            loss = loss + (S * torch.randn(S.shape, generator=w, dtype=S.dtype)).sum()
        res.append([o.detach(), S.detach(), *torch.autograd.grad(loss, xs, materialize_grads=True)])
    diff = max(float((x - y).abs().max()) for x, y in zip(*res))
    scale = max(float(y.abs().max()) for y in res[1])
    return diff, scale, all(bool(torch.isfinite(x).all()) for x in res[0])


_chunked = functools.partial(_against, chunk_dplr_kernels.chunk_dplr, dplr.chunk_dplr)
_recurrent = functools.partial(_against, dplr_kernels.fused_recurrent_dplr, dplr.naive_dplr)


def test_chunk_size():
    """64 on a GPU up to K = 64, 32 above; 32 in the interpreter; a short T's power of two (>= 16)."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [chunk_dplr_kernels.chunk_size(gpu, K) for K in (16, 64, 128)] == [64, 64, 32]
    assert [chunk_dplr_kernels.chunk_size(cpu, 64, T) for T in (1, 12, 17, 37)] == [16, 16, 32, 32]
    assert chunk_dplr_kernels.chunk_size(gpu, 64, 40) == 64


@pytest.mark.parametrize("BH,T,K,V", [(1, 37, 20, 40), (2, 64, 16, 16), (1, 1, 16, 16), (1, 12, 16, 24),
                                      (1, 70, 60, 60)])
def test_chunk_kernels_match_torchs_chunk_form(BH, T, K, V):
    """Chunks of 32 (the last short or full), two sub-blocks each, or one chunk of 16 (T = 1,
    12); V = 40, 60 in two V blocks; K = 20, 60 padded."""
    diff, scale, finite = _chunked(_inputs(BH, T, K, V))
    assert finite and diff <= 1e-12 * scale, (diff, scale)


@pytest.mark.parametrize("read_out,read_state", [(True, False), (False, True)])
def test_chunk_kernels_an_unread_output_or_state_gets_no_cotangent(read_out, read_state):
    diff, scale, finite = _chunked(_inputs(1, 40, 16, 16), read_out=read_out, read_state=read_state)
    assert finite and diff <= 1e-12 * scale, (diff, scale)


def test_chunk_kernels_strong_decay_stays_finite():
    """Log decays down to -20 per step (the pair exponents over a chunk reach -600), one below
    the floor of -80 (clamped, gradient zero as clamp's): every exponent is <= 0."""
    q, k, v, a, b, g, S0 = _inputs(2, 45, 16, 16, decay=20.0)
    g[0, 3, :4] = -100.0
    g[1, 20:] = -20.0
    diff, scale, finite = _chunked((q, k, v, a, b, g, S0))
    assert finite and diff <= 1e-12 * scale, (diff, scale)


def test_chunk_kernels_bf16_inputs_accumulate_in_fp32():
    """bf16 inputs are widened to fp32: the results are the fp32 kernels' on the same rounded
    inputs, returned in the inputs' dtypes."""
    inputs = [x.to(torch.bfloat16) for x in _inputs(1, 40, 16, 16)]
    o, S = chunk_dplr_kernels.chunk_dplr(*inputs)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.bfloat16
    o64, S64 = dplr.chunk_dplr(*(x.double() for x in inputs))
    scale = float(o64.abs().max())
    assert float((o.double() - o64).abs().max()) <= 2 ** -7 * scale


def test_chunk_kernels_double_backward_differentiates_the_torch_form():
    """create_graph=True: the backward is autograd's derivative of dplr.chunk_dplr."""
    inputs = _inputs(1, 40, 16, 16)
    res = []
    for f in (chunk_dplr_kernels.chunk_dplr, dplr.chunk_dplr):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, S = f(*xs)
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for x, y in zip(*res):
        assert float((x - y).abs().max()) <= 1e-9 * max(1.0, float(y.abs().max()))


# ------------------------------------------------------------------ reverse, cu_seqlens, heads, dtypes in the kernels
def _loop_oracle(q, k, v, a, b, g, S0, reverse=False, cu_seqlens=None):
    """The DPLR rule step by step, independent of every chunk form, on the kernels' [B, T,
    H, .] layout: per sequence of cu_seqlens (its own initial states, sequence-major, heads
    inner) and right to left for reverse."""
    B, T, H, K = k.shape
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    outs, finals = [None] * T, []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        S = S0[i * B * H:(i + 1) * B * H].reshape(B, H, *S0.shape[1:])
        for t in (range(stop - 1, start - 1, -1) if reverse else range(start, stop)):
            read = torch.einsum("bhk,bhkv->bhv", b[:, t], S)               # b_tᵀ S
            S = g[:, t].clamp(min=dplr.LOG_DECAY_FLOOR).exp()[..., None] * S \
                + a[:, t, :, :, None] * read[:, :, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs[t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        finals.append(S.reshape(B * H, *S0.shape[1:]))
    return torch.stack(outs, 1), torch.cat(finals)


def _heads_inputs(B, T, H, K, V, sequences, dtype=torch.float64, seed=0):
    """q, k, v, a, b, g [B, T, H, .] in `dtype` as the stdlib cells make them (a = -β κ,
    b = κ, g a per-key log decay), and float32 / 64 initial states, one per sequence and row."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    kappa = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    beta = torch.rand(B, T, H, 1, generator=gen, dtype=torch.float64)
    g = -2.0 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    xs = [rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V), -beta * kappa, kappa, g]
    S0 = rnd(sequences * B * H, K, V).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [x.to(dtype) for x in xs] + [S0]


def _against_loop(xs, reverse=False, cu=None):
    """Relative max errors of chunk_dplr_kernels.chunk_dplr_heads (in its inputs' dtype)
    against the float64 loop oracle on the same (rounded) inputs: output and final state
    ("fwd"), every gradient ("grad"); and the dtypes the kernels returned (o, S_T, dq, dk,
    dv, da, db, dg, dS0)."""
    leaves = [x.clone().requires_grad_() for x in xs]
    exact = [x.detach().double().requires_grad_() for x in leaves]
    res, dtypes = [], []
    for f, ins in ((chunk_dplr_kernels.chunk_dplr_heads, leaves), (_loop_oracle, exact)):
        o, S = f(*ins, reverse, cu)
        w = torch.Generator().manual_seed(5)
        loss = 0
        for i, x in enumerate((o, S)):   # the same cotangents, rounded to the kernels' output dtypes
            weight = torch.randn(x.shape, generator=w, dtype=torch.float64)
            loss = loss + (x * weight.to(dtypes[0][i] if dtypes else x.dtype).to(x.dtype)).sum()
        grads = torch.autograd.grad(loss, ins)
        res.append([x.detach().double() for x in (o, S)] + [d.double() for d in grads])
        dtypes.append([x.dtype for x in (o, S, *grads)])
    err = [float((x - y).abs().max()) for x, y in zip(*res)]
    scale = [max(1.0, float(y.abs().max())) for y in res[1]]
    rel = [e / s for e, s in zip(err, scale)]
    return {"fwd": max(rel[:2]), "grad": max(rel[2:]), "dtypes": dtypes[0]}


# five sequences packed along T: 5, 0, 1, 37 and 32 steps (an empty and a one-step one; in the
# interpreter's chunks of 32: a short chunk, two chunks the second short, one full chunk)
PACKED = torch.tensor([0, 5, 5, 6, 43, 75], dtype=torch.int32)


@pytest.mark.parametrize("reverse, cu", [(True, None), (False, PACKED), (True, PACKED)],
                         ids=["reverse", "cu_seqlens", "reverse+cu_seqlens"])
def test_chunk_kernels_reverse_and_cu_seqlens_against_the_step_loop(reverse, cu, monkeypatch):
    """Every kernel launches once for all sequences (the scores' cotangents twice, by
    design), each sequence with its own initial and final state, right to left too; every
    gradient against the float64 step loop."""
    counts = _launch_counter(monkeypatch)
    sequences = 1 if cu is None else len(cu) - 1
    e = _against_loop(_heads_inputs(1, 75 if cu is not None else 45, 1, 16, 16, sequences), reverse, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e
    expected = {name: 2 if name == "chunk_dplr_bwd_dscores" else 1 for name in chunk_dplr_kernels.KERNEL_NAMES}
    assert counts == expected, counts


@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_kernels_heads_and_sizes_not_a_power_of_two_with_cu_seqlens(reverse):
    """K = V = 60 (padded keys, two V blocks), two heads of the driver's [B, T, H, .] layout
    read in place, sequences of 12, 0 and 25 steps; the initial states sequence-major,
    heads inner, as the runtime orders them."""
    cu = torch.tensor([0, 12, 12, 37], dtype=torch.int32)
    e = _against_loop(_heads_inputs(1, 37, 2, 60, 60, 3), reverse, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e


def test_chunk_kernels_heads_without_cu_seqlens():
    """Two batch rows of two heads each, right to left: the row's head and batch both from
    the program's row (bh = b * H + head)."""
    e = _against_loop(_heads_inputs(2, 37, 2, 20, 24, 1), True, None)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_kernels_half_inputs_accumulate_in_float32(dtype):
    """bf16 / fp16 inputs, packed and right to left: loads widen to fp32 and everything sums
    in fp32, so the errors against float64 on the same rounded inputs are the outputs' own
    rounding, not T steps of half-precision sums; the output and gradients come back in the
    inputs' dtype, the final state and dS0 in S0's (float32)."""
    cu = torch.tensor([0, 9, 40], dtype=torch.int32)
    e = _against_loop(_heads_inputs(1, 40, 2, 16, 16, 2, dtype=dtype), True, cu)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert e["fwd"] <= tol and e["grad"] <= tol, e
    assert e["dtypes"] == [dtype, torch.float32] + [dtype] * 6 + [torch.float32], e["dtypes"]


def test_chunk_kernels_double_backward_with_reverse_and_cu_seqlens():
    """create_graph=True packed right to left: the backward differentiates the torch twin
    (by_torch, per sequence and flipped), which matches the step loop's second derivatives."""
    cu = torch.tensor([0, 9, 9, 30], dtype=torch.int32)
    inputs = _heads_inputs(1, 30, 2, 16, 16, 3)
    res = []
    for f in (chunk_dplr_kernels.chunk_dplr_heads, _loop_oracle):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, S = f(*xs, True, cu)
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for x, y in zip(*res):
        assert float((x - y).abs().max()) <= 1e-9 * max(1.0, float(y.abs().max()))


def test_recurrent_kernels_match_the_per_step_oracle():
    """T = 37: three checkpoint segments, a short last one; V = 40 in two V blocks; K = 20 padded."""
    diff, scale, finite = _recurrent(_inputs(1, 37, 20, 40))
    assert finite and diff <= 1e-12 * scale, (diff, scale)


@pytest.mark.parametrize("read_out,read_state", [(True, False), (False, True)])
def test_recurrent_kernels_an_unread_output_or_state_gets_no_cotangent(read_out, read_state):
    diff, scale, finite = _recurrent(_inputs(1, 18, 16, 16), read_out=read_out, read_state=read_state)
    assert finite and diff <= 1e-12 * scale, (diff, scale)


def test_recurrent_kernels_strong_decay_stays_finite():
    q, k, v, a, b, g, S0 = _inputs(1, 20, 16, 16, decay=20.0)
    g[0, 3, :4] = -100.0
    diff, scale, finite = _recurrent((q, k, v, a, b, g, S0))
    assert finite and diff <= 1e-12 * scale, (diff, scale)


# ------------------------------------------------------------------ ahead of time
STDLIB_COMPILES = isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("module", [chunk_dplr_kernels, dplr_kernels], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, size, module, tmp_path, monkeypatch):
    """K = V = 64 and 128 float32, as a GPU launches them (each module's LAUNCH and chunk size)."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = module.compile_ahead(arch, K=size, V=size)
    assert len(compiled) == len(module.AOT_VARIANTS)
    for c in compiled:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_packed_right_to_left_chunk_kernels_compile_without_spills(arch, size, tmp_path, monkeypatch):
    """VARLEN and REVERSE (the chunk table's loads, the backwards addressing) cost no spills."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = chunk_dplr_kernels.compile_ahead(arch, K=size, V=size, varlen=True, reverse=True)
    assert len(compiled) == len(chunk_dplr_kernels.AOT_VARIANTS)
    for c in compiled:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
def test_compile_cell_compiles_the_chunk_dplr_kernels_of_kda(tmp_path, monkeypatch):
    """`recdsl inspect --stage ptx` (compile_cell) compiles the kernels of the stage that runs them."""
    from recdsl.backends import triton as triton_backend
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    spec, dims = _dims("kda", 16, 16)
    _, compiled = triton_backend.compile_cell(emit_cell(spec.lower(**dims), "triton"), 90)
    names = [c.name for c in compiled if c.name.startswith("chunk_dplr_")]
    assert sorted(names) == sorted(name for name, _ in chunk_dplr_kernels.AOT_VARIANTS)
    assert all(c.spills == 0 for c in compiled), [(c.name, c.spills) for c in compiled]
