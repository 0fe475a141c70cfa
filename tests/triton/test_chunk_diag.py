"""The Triton chunkwise kernels of the diagonal-decay form (backends/triton/chunk_kernels.py,
registry entry triton.chunk_diag): the stdlib cells whose matrix state matches ChunkDiag
select and run them on the triton backend, and agree with the reference backend (outputs,
final states, gradients of inputs, params and the initial state) in Triton's interpreter;
the kernels against the torch chunk form directly (several readouts, strong decays, V
blocks, unread outputs); and the kernels compile for sm_80 / sm_90 without spills."""
from __future__ import annotations

import functools

import pytest
import torch
import triton

import recdsl
from helpers import assert_close, launch_counter, random_inputs, reference_errors
from recdsl.backends.torch import scans
from recdsl.backends.triton import chunk_kernels
from recdsl.lowering import ChunkDiag
from recdsl.pipeline import emit_cell

# Every stdlib cell with a ChunkDiag stage of a log decay (a decay of unknown sign keeps the torch form).
CELLS = ["gla", "gsa", "hgrn2", "lightnet", "lightning_attention", "linear_attention", "linear_attention_nonorm",
         "mamba2", "mlstm", "rwkv6"]
# Their key / value sizes at the interpreter's shapes (K and V are the state's sides).
SIZES = {"mamba2": ("N", "P")}
KERNEL = "triton.chunk_diag"


def _dims(name, K, V):
    spec = recdsl.load(name)
    k_name, v_name = SIZES.get(name, ("K", "V"))
    return spec, spec.analysis_dims(**{k_name: K, v_name: V})


def _chunk_stages(selection):
    return [c for c in selection.stages if isinstance(c.form, ChunkDiag)]


@pytest.mark.parametrize("name", CELLS)
def test_cells_select_and_run_the_triton_chunk_kernels(name):
    spec, dims = _dims(name, 16, 16)
    sel = emit_cell(spec.lower(**dims), "triton").selection
    stages = _chunk_stages(sel)
    assert stages and all(c.kernel.name == KERNEL and c.kernel.borrowed is None for c in stages), sel
    layer = spec(backend="triton", **dims).double()
    layer(**random_inputs(spec, layer, 1, 5, torch.float64))
    assert KERNEL in layer.ran


SIGNED = {"scalar": """
cell SignedScalar(K, V):
    input q[K], k[K], v[V], d[]
    state S[K, V] = 0
    S' = tanh(d) * S + outer(k, v)
    output o = q @ S'
""", "per_key": """
cell SignedPerKey(K, V):
    input q[K], k[K], v[V], d[K]
    state S[K, V] = 0
    S' = tanh(d)[:, None] * S + outer(k, v)
    output o = q @ S
    output p = q @ S'
"""}


@pytest.mark.parametrize("call", [{}, {"reverse": True}, {"cu_seqlens": torch.tensor([0, 5, 5, 6, 37])},
                                  {"cu_seqlens": torch.tensor([0, 5, 5, 6, 37]), "reverse": True}],
                         ids=["plain", "reverse", "cu_seqlens", "cu_seqlens-reverse"])
@pytest.mark.parametrize("kind", SIGNED)
def test_a_decay_of_unknown_sign_runs_the_kernels(kind, call):
    """tanh(d) may be negative: log|d| on the kernels, the running sign (per sequence, in the
    recurrence's order) on queries, keys and each sequence's final state; both readouts
    (S_{t-1} and S_t); many sign flips (tanh of a standard normal is negative half the time)."""
    spec = recdsl.load(SIGNED[kind])
    dims = {"K": 16, "V": 16}
    (choice,) = emit_cell(spec.lower(**dims), "triton").selection.stages
    assert isinstance(choice.form, ChunkDiag) and choice.form.signed and choice.kernel.name == KERNEL
    B = 1 if "cu_seqlens" in call else 2
    assert_close(_compare(spec, dims, B, 37, torch.float64, **call), 1e-10)


_compare = functools.partial(reference_errors, kernel=KERNEL)


@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("name", CELLS)
def test_cells_match_reference_fp64(name, T):
    spec, dims = _dims(name, 16, 16)
    assert_close(_compare(spec, dims, 2, T, torch.float64), 1e-10)


@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv6"])
def test_sizes_not_a_power_of_two(name):
    """K = V = 60: padded key tiles and two V blocks."""
    spec, dims = _dims(name, 60, 60)
    assert_close(_compare(spec, dims, 2, 37, torch.float64), 1e-10)


@pytest.mark.parametrize("name", ["gla", "lightning_attention", "mamba2"])
def test_float32_within_fla_style_tolerance(name):
    spec, dims = _dims(name, 16, 16)
    e = _compare(spec, dims, 2, 37, torch.float32)
    assert e["out"] <= 2e-5 * e["scale"] and e["state"] <= 2e-5 * e["scale"] and e["grad"] <= 2e-4 * e["scale"], e


@pytest.mark.parametrize("name", ["gla", "hgrn2"])
def test_heads(name):
    spec, dims = _dims(name, 16, 16)
    assert_close(_compare(spec, dims, 2, 37, torch.float64, heads=2), 1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv6"])
def test_reverse_and_cu_seqlens_through_the_layer(name, reverse, monkeypatch):
    """The kernels index reverse and cu_seqlens themselves (Caps "kernel": the selection is
    native, one launch of the state pass for all sequences); rwkv6's token shift keeps the
    runtime's flip / split around them. An empty and a one-step sequence among them,
    per-sequence initial states."""
    spec, dims = _dims(name, 16, 16)
    native = emit_cell(spec.lower(**dims), "triton").selection.native
    assert native == (name != "rwkv6")
    assert_close(_compare(spec, dims, 2, 37, torch.float64, reverse=reverse), 1e-10)
    counts = _launch_counter(monkeypatch)
    cu = torch.tensor([0, 7, 7, 8, 40])
    assert_close(_compare(spec, dims, 1, 40, torch.float64, cu_seqlens=cu, reverse=reverse), 1e-10)
    # the runtime's split: one call per non-empty sequence
    assert counts["chunk_diag_fwd_states"] == (1 if native else 3), counts


# ------------------------------------------------------------------ the kernels themselves
def _inputs(BH, T, K, V, per_key, reads, dtype=torch.float64, decay=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    k, v, S0 = rnd(BH, T, K), rnd(BH, T, V), rnd(BH, K, V)
    gl = -decay * torch.rand(BH, T, *((K,) if per_key else ()), generator=g, dtype=torch.float64).to(dtype)
    qs = [(rnd(BH, T, K), inclusive) for inclusive in reads]
    return k, v, gl, S0, qs


def _against_torch(k, v, g, S0, qs, read=None):
    """Outputs, final state and every gradient of chunk_kernels.chunk_diag and of the torch
    form: max abs difference, and whether the Triton ones are finite. `read`: which outputs
    the loss reads (default all)."""
    leaves = [x.clone().requires_grad_() for x in (k, v, g, S0, *(q for q, _ in qs))]
    res = []
    for f in (chunk_kernels.chunk_diag, scans.chunk_diag):
        outs, S = f([(q, inc) for q, (_, inc) in zip(leaves[4:], qs)], *leaves[:4])
        w = torch.Generator().manual_seed(5)
        loss = (S * torch.randn(S.shape, generator=w, dtype=S.dtype)).sum()
        for i, o in enumerate(outs):
            if read is None or i in read:
                loss = loss + (o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum()
        res.append([*outs, S, *torch.autograd.grad(loss, leaves, allow_unused=True)])
    diff = max(float((a - b).abs().max()) for a, b in zip(*res) if a is not None and b is not None)
    assert all((a is None) == (b is None) for a, b in zip(*res))
    return diff, all(bool(torch.isfinite(x).all()) for x in res[0] if x is not None)


@pytest.mark.parametrize("per_key", [True, False])
@pytest.mark.parametrize("reads", [(True,), (False,), (True, False), ()])
def test_kernels_match_the_torch_form(per_key, reads):
    """Inclusive and strict readouts, two readouts of one state, only the final state read;
    T = 45 over two chunks of 32 with a short last one, V = 40 in two V blocks."""
    diff, finite = _against_torch(*_inputs(2, 45, 20, 40, per_key, reads))
    assert finite and diff <= 1e-10, diff


@pytest.mark.parametrize("per_key", [True, False])
def test_the_gpu_chunk_size_in_the_interpreter(per_key, monkeypatch):
    """BT = 64 as on a GPU (four sub-blocks a chunk), T = 100: a short last chunk."""
    monkeypatch.setattr(chunk_kernels, "chunk_size", lambda device: 64)
    diff, finite = _against_torch(*_inputs(1, 100, 16, 16, per_key, (True, False)))
    assert finite and diff <= 1e-10, diff


@pytest.mark.parametrize("per_key", [True, False])
def test_a_scalar_decay_runs_the_one_pass_kernels(per_key, monkeypatch):
    """A scalar decay's outputs and dq come from one program per chunk (and row, V block for
    the outputs), which reads the chunk's inputs once; a per-key decay keeps the sub-block
    kernels; dk / dv run the sub-block kernel for both. Once per readout."""
    counts = _launch_counter(monkeypatch)
    diff, finite = _against_torch(*_inputs(1, 40, 16, 16, per_key, (True, False)))
    assert finite and diff <= 1e-10, diff
    assert counts.get("chunk_diag_bwd_dkv") == 2, counts
    for name in ("chunk_diag_fwd_output", "chunk_diag_bwd_dq"):
        chosen, other = (name, name + "_scalar")[::1 if per_key else -1]
        assert counts.get(chosen) == 2 and other not in counts, counts


@pytest.mark.parametrize("reads", [(True,), (False,)])
def test_the_one_pass_kernels_at_the_gpu_chunk_size(reads, monkeypatch):
    """The scalar-decay one-pass kernels over whole chunks of BT = 64 (a [64, 64] pair decay),
    T = 100: a short last chunk whose padded rows must add nothing; strong decays (down to
    -40 per step) so that e^{-b} over a chunk would overflow, inclusive and strict readouts."""
    monkeypatch.setattr(chunk_kernels, "chunk_size", lambda device: 64)
    counts = _launch_counter(monkeypatch)
    k, v, g, S0, qs = _inputs(1, 100, 16, 16, False, reads, decay=40.0)
    diff, finite = _against_torch(k, v, g, S0, qs)
    assert finite and diff <= 1e-10, diff
    assert all(counts.get(name) == 1 for name in ("chunk_diag_fwd_output_scalar", "chunk_diag_bwd_dq_scalar")), counts


def test_an_unread_output_gets_no_cotangent():
    diff, finite = _against_torch(*_inputs(2, 40, 16, 16, True, (True, False)), read={1})
    assert finite and diff <= 1e-10, diff


def test_strong_decay_stays_finite():
    """Log decays down to -100 per step (and below the floor of -80): every exponent the
    kernels take is <= 0, so nothing overflows, and the floor's gradient is clamp's. T = 45:
    the second chunk's last sub-block holds no step."""
    k, v, g, S0, qs = _inputs(2, 45, 16, 16, True, (True, False), decay=60.0)
    g[0, 3] = -100.0
    diff, finite = _against_torch(k, v, g - 30.0, S0, qs)
    assert finite and diff <= 1e-10, diff


def test_double_backward_differentiates_the_torch_twin():
    """create_graph=True: the backward is autograd's derivative of the torch form, so second
    derivatives equal the torch form's own."""
    k, v, g, S0, qs = _inputs(1, 20, 16, 16, False, (True,))
    res = []
    for f in (chunk_kernels.chunk_diag, scans.chunk_diag):
        xs = [x.clone().requires_grad_() for x in (k, v, g, S0, qs[0][0])]
        (o,), S = f([(xs[4], True)], *xs[:4])
        first = torch.autograd.grad((o ** 2).sum() + S.sum(), xs, create_graph=True)
        res.append(torch.autograd.grad(sum((d ** 2).sum() for d in first), xs))
    for a, b in zip(*res):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())


# ------------------------------------------------------------------ ahead of time
STDLIB_COMPILES = isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, scalar, size, tmp_path, monkeypatch):
    """K = V = 64 and 128 float32, as a GPU launches them (chunk_kernels.choose_blocks' sizes
    and warps)."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    compiled = chunk_kernels.compile_ahead(arch, K=size, V=size, scalar=scalar)
    assert len(compiled) == len(chunk_kernels.AOT_VARIANTS)
    for c in compiled:
        assert f"sm_{arch}" in c.asm["ptx"] and c.registers > 0, c.name
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_{arch}"


# ------------------------------------------------------------------ reverse, cu_seqlens, dtypes in the kernels
def _loop_oracle(readouts, k, v, g, S0, reverse=False, cu_seqlens=None):
    """The recurrence step by step in float64, independent of every chunk form: per sequence
    of cu_seqlens (its own initial state, sequence-major) and right to left for reverse."""
    BH, T, _ = k.shape
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    outs, finals = [[None] * T for _ in readouts], []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        S = S0[i * BH:(i + 1) * BH]
        for t in (range(stop - 1, start - 1, -1) if reverse else range(start, stop)):
            decay = g[:, t].exp()
            before = S
            S = (decay[:, None, None] if g.dim() == 2 else decay[:, :, None]) * S + k[:, t, :, None] * v[:, t, None, :]
            for r, (q, inclusive) in enumerate(readouts):
                outs[r][t] = torch.einsum("bk,bkv->bv", q[:, t], S if inclusive else before)
        finals.append(S)
    return [torch.stack(o, 1) for o in outs], torch.cat(finals)


def _launch_counter(monkeypatch) -> dict:
    return launch_counter(chunk_kernels, monkeypatch)


def _against_oracle(k, v, g, S0, qs, reverse=False, cu=None, scales=None):
    """Max abs errors of chunk_kernels.chunk_diag (in its inputs' dtype) against the float64
    loop oracle on the same (rounded) inputs: outputs and final states, every gradient; the
    scales of both; and the dtypes the kernels returned. `scales`: a constant per readout,
    passed to the kernels as (q, inclusive, scale) and to the oracle as q * scale."""
    leaves = [x.clone().requires_grad_() for x in (k, v, g, S0, *(q for q, _ in qs))]
    exact = [x.detach().double().requires_grad_() for x in leaves]
    res, dtypes = [], []
    for f, xs in ((chunk_kernels.chunk_diag, leaves), (_loop_oracle, exact)):
        if scales is None:
            readouts = [(q, inc) for q, (_, inc) in zip(xs[4:], qs)]
        elif f is _loop_oracle:
            readouts = [(q * c, inc) for q, (_, inc), c in zip(xs[4:], qs, scales)]
        else:
            readouts = [(q, inc, c) for q, (_, inc), c in zip(xs[4:], qs, scales)]
        outs, S = f(readouts, *xs[:4], reverse, cu)
        w = torch.Generator().manual_seed(5)
        loss = 0
        for i, o in enumerate((*outs, S)):   # the same cotangents, rounded to the kernels' output dtypes
            weight = torch.randn(o.shape, generator=w, dtype=torch.float64)
            loss = loss + (o * weight.to(dtypes[0][i] if dtypes else o.dtype).to(o.dtype)).sum()
        grads = torch.autograd.grad(loss, xs)
        res.append([x.detach().double() for x in (*outs, S)] + [d.double() for d in grads])
        dtypes.append([x.dtype for x in (*outs, S, *grads)])
    n_fwd = len(qs) + 1
    err = [float((a - b).abs().max()) for a, b in zip(*res)]
    scale = [max(1.0, float(b.abs().max())) for b in res[1]]
    return {"fwd": max(e / s for e, s in zip(err[:n_fwd], scale)), "grad": max(e / s for e, s in
                                                                           zip(err[n_fwd:], scale[n_fwd:])),
            "dtypes": dtypes[0]}


LENGTHS_5_37_64 = torch.tensor([0, 5, 42, 106], dtype=torch.int32)


@pytest.mark.parametrize("per_key, reverse, cu", [(False, True, None), (False, False, LENGTHS_5_37_64),
                                                  (False, True, LENGTHS_5_37_64), (True, True, LENGTHS_5_37_64)],
                         ids=["reverse", "cu_seqlens", "reverse+cu_seqlens", "per_key-reverse+cu_seqlens"])
def test_reverse_and_cu_seqlens_in_the_kernels(per_key, reverse, cu, monkeypatch):
    """Three sequences of 5, 37 and 64 steps packed along T, each with its own initial and
    final state, right to left too: one launch of every kernel for all of them (the state
    pass included), against the float64 step loop with every gradient."""
    counts = _launch_counter(monkeypatch)
    sequences = 1 if cu is None else len(cu) - 1
    k, v, g, _, qs = _inputs(1, 106 if cu is not None else 45, 16, 16, per_key, (True, False) if not per_key
                             else (False,))
    S0 = torch.randn(sequences, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = _against_oracle(k, v, g, S0, qs, reverse, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e
    # one launch for all sequences: the state pass once; the per-readout kernels once per readout
    assert counts["chunk_diag_cumsum"] == 1 and counts["chunk_diag_fwd_states"] == 1, counts
    whole_chunk = "" if per_key else "_scalar"      # a scalar decay's one-pass output and dq kernels
    assert all(counts[f"chunk_diag_{name}"] == len(qs) for name in ("fwd_output" + whole_chunk, "bwd_dstates",
                                                                     "bwd_dq" + whole_chunk, "bwd_dkv",
                                                                     "bwd_dg")), counts


def test_heads_and_sizes_not_a_power_of_two_with_cu_seqlens():
    """K = 60, V = 100 (padded keys, four V blocks), two rows (heads) per sequence: the
    initial states sequence-major, as the runtime orders them."""
    k, v, g, _, qs = _inputs(2, 40, 60, 100, False, (True,))
    cu = torch.tensor([0, 17, 17, 40], dtype=torch.int32)
    S0 = torch.randn(3 * 2, 60, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = _against_oracle(k, v, g, S0, qs, True, cu)
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    """bf16 / fp16 inputs: loads widen to fp32 and everything sums in fp32, so the errors
    against float64 on the same rounded inputs are the outputs' own rounding (bf16 keeps 8
    bits: 2^-8 relative), not T steps of half-precision sums; outputs and gradients come
    back in the inputs' dtype, the final state in S0's."""
    k, v, g, S0, qs = _inputs(1, 40, 16, 16, False, (True, False), dtype=dtype)
    cu = torch.tensor([0, 9, 40], dtype=torch.int32)
    S0 = torch.cat([S0, S0]).float()
    e = _against_oracle(k, v, g, S0, qs, True, cu)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert e["fwd"] <= tol and e["grad"] <= tol, e
    outs_and_grads = e["dtypes"]
    assert outs_and_grads[:2] == [dtype, dtype] and outs_and_grads[2] == torch.float32, outs_and_grads
    assert outs_and_grads[3:6] == [dtype, dtype, dtype] and outs_and_grads[6] == torch.float32, outs_and_grads


@pytest.mark.slow
@pytest.mark.parametrize("per_key", [False, True])
def test_half_inputs_per_key_and_inclusive_readout(per_key):
    k, v, g, S0, qs = _inputs(2, 50, 16, 32, per_key, (True,), dtype=torch.bfloat16)
    e = _against_oracle(k, v, g, S0.float(), qs, False, None)
    assert e["fwd"] <= 2 ** -7 and e["grad"] <= 2 ** -7, e


def test_cost_rule_and_inspect_header():
    """The chosen sizes by shape, and the line `recdsl inspect --stage triton` prints."""
    cuda = torch.device("cuda")
    assert chunk_kernels.choose_blocks(64, 64) == chunk_kernels.Blocks(64, 16, 64, 32, 8, 2, "")
    big = chunk_kernels.choose_blocks(128, 128)
    assert (big.BT, big.BK, big.BV, big.num_warps) == (64, 128, 16, 16)
    assert chunk_kernels.choose_blocks(256, 64).BT == 32
    assert chunk_kernels.choose_blocks(60, 100, T=20).BT == 32 and chunk_kernels.choose_blocks(16, 16, T=5).BT == 16
    assert chunk_kernels.choose_blocks(16, 16, device=cuda).num_warps == 4
    assert chunk_kernels.choose_blocks(64, 64, capability=(7, 5)).dkv_stages == 1
    assert chunk_kernels.choose_blocks(64, 64, device=torch.device("cpu")).BT == 32
    spec, dims = _dims("gla", 64, 64)
    text = emit_cell(spec.lower(**dims), "triton").kernels
    assert chunk_kernels.header(64, 64) in text.splitlines()


@pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")
def test_packed_right_to_left_kernels_compile_without_spills(tmp_path, monkeypatch):
    """VARLEN and REVERSE (the chunk table's loads, the backwards addressing) cost no spills."""
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    for c in chunk_kernels.compile_ahead(90, K=64, V=64, scalar=False, varlen=True, reverse=True):
        assert c.spills == 0, f"{c.name} spills {c.spills} bytes on sm_90"


def test_heads_are_read_in_place():
    """With heads, the kernels index [B, T, H, .] themselves: a forward of GLA copies none of
    its inputs into [B * H, T, .] rows and back (the torch ops outside the launches, counted
    as traffic.py counts them for the roofline, are the non-finite check and the zero
    initial state's copy: the decay's floor and the query scale are the kernels')."""
    from recdsl.backends.triton import traffic
    spec, dims = _dims("gla", 16, 16)
    layer = spec(backend="triton", heads=2, **dims)
    xs = random_inputs(spec, layer, 2, 37, torch.float32)
    with torch.no_grad():
        layer(**xs)
        counted = traffic.count_traffic(lambda: layer(**xs), torch_ops=True)
    assert KERNEL in layer.ran
    one_input = xs["q"].numel() * xs["q"].element_size()
    copies = [(x.kernel, x.store_bytes) for x in counted.launch_log
              if x.torch_op and x.kernel in ("aten.clone", "aten.copy_", "aten._to_copy")]
    assert copies and all(written < one_input for _, written in copies), copies   # the initial state's only


# ------------------------------------------------------------------ the floor and a constant query scale in the kernels
@pytest.mark.parametrize("per_key, reverse, cu", [(True, False, None), (False, False, None), (True, True, None),
                                                  (False, True, LENGTHS_5_37_64), (True, False, LENGTHS_5_37_64)],
                         ids=["per_key", "scalar", "per_key-reverse", "scalar-reverse+cu_seqlens",
                              "per_key-cu_seqlens"])
def test_a_scaled_readout_matches_the_step_loop(per_key, reverse, cu, monkeypatch):
    """A readout (q, inclusive, c) reads c * q: the kernels scale the output at its store and
    do at its loads in the backward (dq is then the gradient of q itself). One scaled and
    one unscaled readout, inclusive and strict, with every gradient against the float64 loop,
    each kernel launched as often as without the scale (no extra pass)."""
    counts = _launch_counter(monkeypatch)
    sequences = 1 if cu is None else len(cu) - 1
    k, v, g, _, qs = _inputs(1, 106 if cu is not None else 45, 16, 16, per_key, (True, False))
    S0 = torch.randn(sequences, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = _against_oracle(k, v, g, S0, qs, reverse, cu, scales=(0.125 ** 0.5, 1.0))
    assert e["fwd"] <= 1e-12 and e["grad"] <= 1e-12, e
    scaled_counts = dict(counts)
    counts.clear()
    _against_oracle(k, v, g, S0, qs, reverse, cu)
    assert scaled_counts == counts and counts["chunk_diag_bwd_dkv"] == 2, (scaled_counts, counts)


def test_a_scaled_readout_below_the_floor_and_twice_differentiated():
    """The scale with log decays below the floor against the torch chunk form: the kernels'
    backward (dg zero below the floor, as clamp's), and create_graph=True (the torch twin,
    given the scale too)."""
    k, v, g, S0, qs = _inputs(2, 45, 16, 16, True, (True, False), decay=60.0)
    g = g - 30.0
    c = 0.25
    leaves = [x.clone().requires_grad_() for x in (k, v, g, S0, qs[0][0], qs[1][0])]
    res = []
    for f, reads in ((chunk_kernels.chunk_diag, lambda a, b: [(a, True, c), (b, False)]),
                     (scans.chunk_diag, lambda a, b: [(a * c, True), (b, False)])):
        def loss():
            outs, S = f(reads(*leaves[4:]), *leaves[:4])
            return outs, S, S.sum() + sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs)
        outs, S, first_loss = loss()
        first = torch.autograd.grad(first_loss, leaves)
        twice = torch.autograd.grad(loss()[2], leaves, create_graph=True)
        second = torch.autograd.grad(sum((d ** 2).sum() for d in twice), leaves)
        res.append([*outs, S, *first, *second])
    below = g < scans.LOG_DECAY_FLOOR
    dg = res[0][3 + 2]          # after the two outputs and S: dk, dv, dg
    assert bool(below.any()) and bool((dg[below] == 0).all()) and bool((dg[~below] != 0).any())
    for a, b in zip(*res):
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max()))


def test_gla_runs_its_query_scale_and_the_floor_in_the_kernels():
    """GLA reads o = (q * K**-0.5) @ S': the driver hands (q, True, K**-0.5) to the stage (no
    `* 0.57...` torch op over q), and neither the forward nor the backward runs a torch
    clamp / ge / where for the log decay's floor (the kernels floor g in their loads)."""
    from recdsl.backends.triton import traffic
    spec, dims = _dims("gla", 16, 16)
    emitted = emit_cell(spec.lower(**dims), "triton")
    assert "* 0.25" not in emitted.source and "(inputs['q'], True, 0.25)" in emitted.source, emitted.source
    assert [c.kernel.name for c in _chunk_stages(emitted.selection)] == [KERNEL]
    layer = spec(backend="triton", **dims)
    xs = {name: x.requires_grad_() for name, x in random_inputs(spec, layer, 2, 37, torch.float32).items()}

    def forward_backward():
        out, _ = layer(**xs)
        out.sum().backward()
    counted = traffic.count_traffic(forward_backward, torch_ops=True)
    assert KERNEL in layer.ran
    torch_ops = {x.kernel for x in counted.launch_log if x.torch_op}
    launched = {x.kernel for x in counted.launch_log if not x.torch_op}
    assert {"chunk_diag_fwd_output", "chunk_diag_bwd_dg"} <= launched, launched
    assert not torch_ops & {"aten.clamp", "aten.ge", "aten.where", "aten.mul"}, torch_ops
