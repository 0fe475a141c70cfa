"""The Triton chunkwise delta-rule kernels (backends/triton/delta_kernels.py, registry
entries triton.chunk_delta and triton.delta_product): the stdlib cells whose state matches
ChunkDelta / HouseholderProducts select and run them on the triton backend, and agree with
the reference backend (outputs, final states, gradients of inputs, params and the initial
state) in Triton's interpreter; the kernels against the torch chunk form directly (gated
and not, V blocks, short last chunks, the GPU's chunk size, an unread output, strong
decays); reverse, cu_seqlens and heads indexed by the kernels themselves (the driver's
[B, T, H, .] tensors read in place) against a float64 step loop, half inputs summed in
float32, DeltaProduct's interleaved steps too (a token's steps last first under reverse);
a non-finite input runs torch's form; and the kernels compile for sm_80 / sm_90
without spills, packed and right to left too."""
from __future__ import annotations

import pytest
import torch
import triton

import recdsl
from helpers import assert_close, launch_counter, random_inputs, reference_errors
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


def _launch_counter(monkeypatch) -> dict:
    return launch_counter(delta_kernels, monkeypatch)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_reverse_and_cu_seqlens_through_the_layer(name, reverse, monkeypatch):
    """The kernels index reverse and cu_seqlens themselves (Caps "kernel": the selection is
    native, one launch of the state pass for all sequences), DeltaProduct's interleaved steps
    too. An empty and a one-step sequence among them, per-sequence initial states, heads."""
    spec, dims = _dims(name, 16, 16)
    selection = emit_cell(spec.lower(**dims), "triton").selection
    (stage,) = [c for c in selection.stages if isinstance(c.form, (ChunkDelta, HouseholderProducts))]
    assert stage.kernel.name == CELLS[name] and selection.native
    assert (stage.kernel.caps.reverse, stage.kernel.caps.varlen) == ("kernel", "kernel")
    assert_close(_compare(name, 16, 16, 2, 37, torch.float64, reverse=reverse), 1e-10)
    counts = _launch_counter(monkeypatch)
    cu = torch.tensor([0, 7, 7, 8, 40])
    for heads in (None, 2):
        counts.clear()
        assert_close(_compare(name, 16, 16, 1, 40, torch.float64, heads=heads, cu_seqlens=cu, reverse=reverse), 1e-10)
        assert counts["delta_fwd_states"] == counts["delta_bwd_dstates"] == 1, counts


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("reverse, cu", [(True, None), (False, [0, 7, 7, 8, 30]), (True, [0, 7, 7, 8, 30])],
                         ids=["reverse", "cu_seqlens", "reverse+cu_seqlens"])
def test_deltaproduct_steps_in_order_under_reverse_and_cu_seqlens(reverse, cu, heads, monkeypatch):
    """DeltaProduct with three Householder steps per token (NH = 3: a token's steps reversed
    for the kernels' right-to-left walk is more than a swap), reverse and cu_seqlens (an empty
    and a one-step sequence among them) handed to the kernels: one launch of each pass over
    T * 3 interleaved rows for all sequences, against the reference backend in float64."""
    spec = recdsl.load("deltaproduct")
    dims = spec.analysis_dims(K=16, V=16, NH=3)
    selection = emit_cell(spec.lower(**dims), "triton").selection
    assert selection.native and [c.kernel.name for c in selection.stages] == ["triton.delta_product"], selection
    counts = _launch_counter(monkeypatch)
    call = {"reverse": reverse} if cu is None else {"reverse": reverse, "cu_seqlens": torch.tensor(cu)}
    batch, steps = (1, 30) if cu is not None else (2, 13)
    assert_close(reference_errors(spec, dims, batch, steps, torch.float64, heads, kernel="triton.delta_product",
                                  **call), 1e-10)
    assert counts["delta_fwd_states"] == counts["delta_bwd_dstates"] == 1, counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deltaproduct_half_inputs_on_the_kernels(dtype):
    """bf16 / fp16 DeltaProduct packed right to left runs the kernels (they widen half inputs),
    its outputs in the inputs' dtype within their rounding of the float64 reference's on the
    same rounded inputs and parameters."""
    spec, dims = _dims("deltaproduct", 16, 16)
    layer = spec(backend="triton", **dims).to(dtype)
    reference = spec(backend="reference", **dims).double()
    reference.load_state_dict(layer.state_dict())
    xs = random_inputs(spec, layer, 1, 20, dtype)
    packed = {"reverse": True, "cu_seqlens": torch.tensor([0, 9, 9, 20])}
    o, _ = layer(**xs, **packed)
    exact, _ = reference(**{n: x.double() for n, x in xs.items()}, **packed)
    assert layer.ran == ["triton.delta_product"] and o.dtype == dtype, (layer.ran, o.dtype)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert float((o.double() - exact).abs().max()) <= tol * max(1.0, float(exact.abs().max()))


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



def test_a_non_finite_input_packed_right_to_left_runs_the_torch_form():
    """The same with reverse and cu_seqlens (the kernels' own, so the torch form runs per
    sequence and direction): a NaN at step 30 of the second sequence [9, 40) reaches its
    steps <= 30 only (those after it right to left), never the first sequence."""
    spec, dims = _dims("gated_deltanet", 16, 16)
    layer = spec(backend="triton", **dims).double()
    xs = random_inputs(spec, layer, 1, 40, torch.float64)
    xs["v"][0, 30] = float("nan")
    o, _ = layer(**xs, reverse=True, cu_seqlens=torch.tensor([0, 9, 40]))
    assert "torch.chunk_delta" in layer.ran and "triton.chunk_delta" not in layer.ran, layer.ran
    finite = torch.isfinite(o[0]).all(-1)
    assert bool(finite[:9].all()) and bool(finite[31:].all()) and not bool(finite[9:31].any()), finite


def test_a_non_finite_deltaproduct_input_packed_right_to_left_runs_the_torch_form():
    """DeltaProduct likewise: torch's form on the same interleaved rows (layer.ran says
    torch.delta_product), a NaN in a step of token 30 reaching tokens <= 30 of its sequence
    [9, 40) only."""
    spec, dims = _dims("deltaproduct", 16, 16)
    layer = spec(backend="triton", **dims).double()
    xs = random_inputs(spec, layer, 1, 40, torch.float64)
    xs["v"][0, 30, 1] = float("nan")
    o, _ = layer(**xs, reverse=True, cu_seqlens=torch.tensor([0, 9, 40]))
    assert layer.ran == ["torch.delta_product"], layer.ran
    finite = torch.isfinite(o[0]).all(-1)
    assert bool(finite[:9].all()) and bool(finite[31:].all()) and not bool(finite[9:31].any()), finite

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


# ------------------------------------------------------------------ reverse, cu_seqlens, heads, dtypes in the kernels
def _loop_oracle(q, k, v, beta, g, S0, reverse=False, cu_seqlens=None):
    """The delta rule step by step in float64, independent of every chunk form, on the
    kernels' [B, T, H, .] layout: per sequence of cu_seqlens (its own initial states,
    sequence-major, heads inner) and right to left for reverse."""
    B, T, H, _ = k.shape
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    outs, finals = [None] * T, []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        S = S0[i * B * H:(i + 1) * B * H].reshape(B, H, *S0.shape[1:])
        for t in (range(stop - 1, start - 1, -1) if reverse else range(start, stop)):
            kt, bt = k[:, t], beta[:, t, :, None, None]
            decay = 1.0 if g is None else g[:, t].clamp(min=scans.LOG_DECAY_FLOOR).exp()[:, :, None, None]
            S = decay * (S - bt * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, S)[:, :, None]) \
                + bt * kt[..., None] * v[:, t, :, None, :]
            outs[t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        finals.append(S.reshape(B * H, *S0.shape[1:]))
    return torch.stack(outs, 1), torch.cat(finals)


def _delta_inputs(B, T, H, K, V, sequences, dtype=torch.float64, gated=True, seed=0):
    """q, k (unit norm), v, beta, g (log decays) [B, T, H, .] in `dtype`, and float32 / 64
    initial states, one per sequence and row."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    k = rnd(B, T, H, K)
    k = k / k.norm(dim=-1, keepdim=True)
    xs = [rnd(B, T, H, K), k, rnd(B, T, H, V), torch.rand(B, T, H, generator=gen, dtype=torch.float64),
          -torch.rand(B, T, H, generator=gen, dtype=torch.float64) if gated else None]
    S0 = rnd(sequences * B * H, K, V).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [None if x is None else x.to(dtype) for x in xs] + [S0]


def _against_oracle(q, k, v, beta, g, S0, reverse=False, cu=None):
    """Relative max errors of delta_kernels.chunk_delta_heads (in its inputs' dtype) against
    the float64 loop oracle on the same (rounded) inputs: output and final state ("fwd"),
    every gradient ("grad"); and the dtypes the kernels returned (o, S_T, dq, dk, dv, dβ,
    dg, dS0)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, S0) if x is not None]
    exact = [x.detach().double().requires_grad_() for x in leaves]

    def split(xs):
        return xs if g is not None else xs[:4] + [None] + xs[4:]
    res, dtypes = [], []
    for f, xs in ((delta_kernels.chunk_delta_heads, leaves), (_loop_oracle, exact)):
        o, S = f(*split(xs), reverse, cu)
        w = torch.Generator().manual_seed(5)
        loss = 0
        for i, x in enumerate((o, S)):   # the same cotangents, rounded to the kernels' output dtypes
            weight = torch.randn(x.shape, generator=w, dtype=torch.float64)
            loss = loss + (x * weight.to(dtypes[0][i] if dtypes else x.dtype).to(x.dtype)).sum()
        grads = torch.autograd.grad(loss, xs)
        res.append([x.detach().double() for x in (o, S)] + [d.double() for d in grads])
        dtypes.append([x.dtype for x in (o, S, *grads)])
    err = [float((a - b).abs().max()) for a, b in zip(*res)]
    scale = [max(1.0, float(b.abs().max())) for b in res[1]]
    rel = [e / s for e, s in zip(err, scale)]
    return {"fwd": max(rel[:2]), "grad": max(rel[2:]), "dtypes": dtypes[0]}


LENGTHS_5_37_64 = torch.tensor([0, 5, 42, 106], dtype=torch.int32)


@pytest.mark.parametrize("gated, reverse, cu", [(True, True, None), (True, False, LENGTHS_5_37_64),
                                                (True, True, LENGTHS_5_37_64), (False, True, LENGTHS_5_37_64)],
                         ids=["reverse", "cu_seqlens", "reverse+cu_seqlens", "ungated-reverse+cu_seqlens"])
def test_reverse_and_cu_seqlens_in_the_kernels(gated, reverse, cu, monkeypatch):
    """Three sequences of 5, 37 and 64 steps packed along T, each with its own initial and
    final state, right to left too: one launch of every kernel for all of them (the state
    passes included), against the float64 step loop with every gradient."""
    counts = _launch_counter(monkeypatch)
    sequences = 1 if cu is None else len(cu) - 1
    xs = _delta_inputs(1, 106 if cu is not None else 45, 1, 16, 16, sequences, gated=gated)
    e = _against_oracle(*xs, reverse, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e
    assert sorted(counts) == sorted(delta_kernels.KERNEL_NAMES) and set(counts.values()) == {1}, counts


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 37, pytest.param(64, marks=pytest.mark.slow),
                               pytest.param(200, marks=pytest.mark.slow)])
def test_heads_and_sizes_not_a_power_of_two_with_cu_seqlens(T, reverse):
    """K = V = 60 (padded keys, two V blocks), two heads of the driver's [B, T, H, .] layout
    read in place, sequences of T // 3, 0 and T - T // 3 steps (T = 200: chunks of 32 in the
    interpreter, short last ones); the initial states sequence-major, heads inner, as the
    runtime orders them."""
    cu = torch.tensor([0, T // 3, T // 3, T], dtype=torch.int32)
    e = _against_oracle(*_delta_inputs(1, T, 2, 60, 60, 3), reverse, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e


def test_heads_without_cu_seqlens():
    """Two batch rows of two heads each, right to left: the row's head and batch both from
    the program's row (bh = b * H + head)."""
    e = _against_oracle(*_delta_inputs(2, 37, 2, 20, 24, 1), True, None)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    """bf16 / fp16 inputs: loads widen to fp32 and everything sums in fp32, so the errors
    against float64 on the same rounded inputs are the outputs' own rounding (bf16 keeps 8
    bits: 2^-8 relative), not T steps of half-precision sums; the output and gradients come
    back in the inputs' dtype, the final state and dS0 in S0's (float32)."""
    cu = torch.tensor([0, 9, 40], dtype=torch.int32)
    e = _against_oracle(*_delta_inputs(1, 40, 2, 16, 16, 2, dtype=dtype), True, cu)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert e["fwd"] <= tol and e["grad"] <= tol, e
    assert e["dtypes"] == [dtype, torch.float32] + [dtype] * 5 + [torch.float32], e["dtypes"]


def test_bf16_inputs_close_to_float32():
    """The same inputs in bf16 and in fp32 (the bf16 values widened): the kernels' results
    agree to bf16's rounding of the outputs."""
    xs = _delta_inputs(1, 50, 2, 32, 32, 1, dtype=torch.bfloat16)
    o16, S16 = delta_kernels.chunk_delta_heads(*xs)
    o32, S32 = delta_kernels.chunk_delta_heads(*(x.float() for x in xs))
    assert o16.dtype == torch.bfloat16 and o32.dtype == torch.float32
    scale = float(o32.abs().max())
    assert float((o16.float() - o32).abs().max()) <= 2 ** -7 * scale
    assert float((S16 - S32).abs().max()) <= 1e-5 * float(S32.abs().max())


def test_heads_are_read_in_place():
    """With heads, the kernels index [B, T, H, .] themselves: a forward of Gated DeltaNet
    copies none of its inputs into [B * H, T, .] rows and back (the torch ops outside the
    launches, counted as traffic.py counts them for the roofline: the non-finite check and
    the zero initial state's copy)."""
    from recdsl.backends.triton import traffic
    spec, dims = _dims("gated_deltanet", 16, 16)
    layer = spec(backend="triton", heads=2, **dims)
    xs = random_inputs(spec, layer, 2, 37, torch.float32)
    with torch.no_grad():
        layer(**xs)
        counted = traffic.count_traffic(lambda: layer(**xs), torch_ops=True)
    assert layer.ran == ["triton.chunk_delta"], layer.ran
    assert {x.kernel for x in counted.launch_log if not x.torch_op} >= {"delta_fwd_solve", "delta_fwd_output"}
    one_input = xs["q"].numel() * xs["q"].element_size()
    copies = [(x.kernel, x.store_bytes) for x in counted.launch_log
              if x.torch_op and x.kernel in ("aten.clone", "aten.copy_", "aten._to_copy", "aten.flip", "aten.cat")]
    assert all(written < one_input for _, written in copies), copies   # the initial state's only



def test_each_kernel_reads_its_tiles_once(monkeypatch):
    """At the GPU's chunk size (64), K = V = 64 in two V blocks: the kernels that use a tile
    for every V block (q, k) or both ways round (k, dR Xᵀ) read it once, and the triangular
    per-chunk matrices (T, dR Xᵀ) move their triangles only. Each kernel's bytes, counted as
    benchmarks/bench_roofline.py counts them, are those of its operands, once each (dO
    twice in delta_bwd_readout_grads: its two passes over the V blocks); four launches
    forward and six backward, one per kernel."""
    from recdsl.backends.triton import traffic
    monkeypatch.setattr(delta_kernels, "chunk_size", lambda device, K: 64)
    B, T, H, K, V, BT = 1, 128, 2, 64, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, H, V, generator=g)
    beta, decay = torch.rand(B, T, H, generator=g), -torch.rand(B, T, H, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, decay, torch.randn(B * H, K, V, generator=g))]

    def run():
        o, S = delta_kernels.chunk_delta_heads(*leaves)
        torch.autograd.grad((o * o).sum() + S.sum(), leaves)
    counted = traffic.count_traffic(run)
    steps, chunks, word = B * T * H, B * H * T // BT, 4
    key, value, state = steps * K * word, steps * V * word, chunks * K * V * word   # a [B, T, H, K] tensor, ..
    scalar = steps * word                                                            # b, β, g and their gradients
    triangle, strict = chunks * BT * (BT + 1) // 2 * word, chunks * BT * (BT - 1) // 2 * word
    expected = {
        "delta_fwd_solve": 2 * scalar + key + scalar + triangle,               # g, β, k -> b, T
        "delta_fwd_output": 2 * key + value + scalar + state + value,          # q, k, Vn, b, S -> o
        "delta_bwd_readout": 2 * key + scalar + value + state + value,         # q, k, b, dO -> Y, dVn's first term
        "delta_bwd_readout_grads": scalar + 2 * value + value + 2 * key + state + 2 * key + scalar,
        # b, dO twice, Vn, q, k, S -> dk, dq, db
        "delta_bwd_pairs": 3 * scalar + key + strict + 2 * scalar + scalar + scalar + 2 * key,
        # b, β, g, k, dR Xᵀ, dβ (read, written), db -> dg; dk (read, added to)
    }
    moved = {name: load + store for name, (load, store, _) in counted.per_kernel.items()}
    assert {name: moved.get(name) for name in expected} == expected
    assert {name: launches for name, (_, _, launches) in counted.per_kernel.items()} \
        == {name: 1 for name in delta_kernels.KERNEL_NAMES}
    assert len(delta_kernels.KERNEL_NAMES) == 4 + 6

def test_double_backward_with_reverse_and_cu_seqlens():
    """create_graph=True packed right to left: the torch twin runs per sequence and
    direction too, so second derivatives equal the float64 step loop's."""
    q, k, v, beta, g, S0 = _delta_inputs(1, 30, 2, 8, 8, 2)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    res = []
    for f in (delta_kernels.chunk_delta_heads, _loop_oracle):
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, g, S0)]
        o, S = f(*xs, True, cu)
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for a, b in zip(*res):
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max()))

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


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_packed_right_to_left_kernels_compile_without_spills(arch, size, tmp_path, monkeypatch):
    """VARLEN and REVERSE (the chunk table's loads, the backwards addressing) cost no spills."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = delta_kernels.compile_ahead(arch, K=size, V=size, varlen=True, reverse=True)
    assert len(compiled) == len(delta_kernels.AOT_VARIANTS)
    for c in compiled:
        assert c.registers > 0 and c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"
