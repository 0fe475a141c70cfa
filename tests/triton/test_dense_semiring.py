"""The triton backend's dense semiring kernel (backends/triton/semiring_kernels.py, registry
entry triton.dense_semiring): the HMM forward algorithm and Viterbi select it at any N
(above 64 states the generated sequential kernel cannot hold the [N, N] transition) and
agree with the reference backend in Triton's interpreter -- outputs, final states, the
gradients of inputs, params and the initial state; plain, reversed, cu_seqlens, heads; a
per-step transition; the kernels against the torch backend's C loop where paths are cut
(-inf) and where max-plus ties; and they compile for sm_80 / sm_90 without spills."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import as_tuple, grad_inputs, outputs_and_grads, paired_layers, random_initial_state
from recdsl.backends.torch import semiring
from recdsl.backends.triton import semiring_kernels
from recdsl.lowering import DenseSemiringScan
from recdsl.pipeline import emit_cell

KERNEL = "triton.dense_semiring"
CELLS = ["hmm_forward", "viterbi"]

PER_STEP = """
cell PerStepHMM(N):
    input logA[N, N], logB[N]
    state alpha[N] = 0
    alpha' = logsumexp(alpha[:, None] + logA, axis=0) + logB
    output alpha'
"""


@pytest.mark.parametrize("name", CELLS)
def test_cells_select_the_kernel_above_the_sequential_kernels_reach(name):
    """N = 3: the generated sequential kernel holds the transition in registers; N = 70:
    it cannot, and this kernel runs (never the borrowed torch loop)."""
    spec = recdsl.load(name)
    (small,) = emit_cell(spec.lower(N=3), "triton").selection.stages
    assert small.kernel.name == "triton.sequential"
    assert any(p.kernel == KERNEL and "registers" in p.reason for p in small.passed), small.passed
    (big,) = emit_cell(spec.lower(N=70), "triton").selection.stages
    assert isinstance(big.form, DenseSemiringScan) and big.kernel.name == KERNEL and big.kernel.borrowed is None


@pytest.fixture
def no_sequential_kernel(monkeypatch):
    """The sequential kernel declines every matrix (as it does above 64 x 64), so this kernel
    runs the small interpreter shapes."""
    from recdsl.backends.triton import seq_kernels
    monkeypatch.setattr(seq_kernels, "MATRIX_LIMIT", 0)


def _max_errors(spec, dims, B, T, heads=None, **call):
    ref, tri = paired_layers(spec, "triton", dims, heads)
    xs = grad_inputs(spec, ref, B, T)
    rows = len(call["cu_seqlens"]) - 1 if "cu_seqlens" in call else B
    st = random_initial_state(spec, ref, rows)
    got = [outputs_and_grads(layer, xs, st, **call) for layer in (ref, tri)]
    got = [([o.detach() for o in out], {k: v.detach() for k, v in fin.items()}, grads) for out, fin, grads in got]
    assert KERNEL in tri.ran, tri.ran
    (o1, s1, g1), (o2, s2, g2) = got
    assert all((a is None) == (b is None) for a, b in zip(g1, g2))
    return max([float((a - b).abs().max()) for a, b in zip(o1, o2)]
               + [float((s1[k] - s2[k]).abs().max()) for k in s1]
               + [float((a - b).abs().max()) for a, b in zip(g1, g2) if a is not None])


@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("N", [5, 70])
@pytest.mark.parametrize("name", CELLS)
def test_cells_match_reference(name, N, T, no_sequential_kernel):
    assert _max_errors(recdsl.load(name), {"N": N}, 2, T) <= 1e-10


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_reverse_cu_seqlens_and_heads(name, reverse, no_sequential_kernel):
    spec = recdsl.load(name)
    assert _max_errors(spec, {"N": 6}, 2, 7, reverse=reverse) <= 1e-10
    assert _max_errors(spec, {"N": 6}, 1, 12, cu_seqlens=torch.tensor([0, 5, 5, 12]), reverse=reverse) <= 1e-10
    assert _max_errors(spec, {"N": 6}, 2, 5, heads=3, reverse=reverse) <= 1e-10


def test_a_per_step_transition(no_sequential_kernel):
    """The transition an input of every step: a [R, T, N, N] operand, its gradient per step."""
    spec = recdsl.load(PER_STEP)
    assert _max_errors(spec, {"N": 20}, 2, 6) <= 1e-10


# ------------------------------------------------------------------ the kernels themselves
def _operands(kind, R, T, N, shared, heads=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn((heads, N, N) if shared else (R, T, N, N), generator=g, dtype=torch.float64)
    b = torch.randn(R, T, N, generator=g, dtype=torch.float64)
    h0 = torch.randn(R, N, generator=g, dtype=torch.float64)
    if kind == "maxplus":                      # ties: the first argmax wins on both sides
        A = A.round()
        b, h0 = b.round(), h0.round()
    A[..., 1, :] = float("-inf")               # a state that leads nowhere
    b[:, 2, 3] = float("-inf")                 # a state never reached at one step
    return A, b, h0


def _against_c(kind, shared, A, b, h0, heads=1):
    leaves = [x.clone().requires_grad_() for x in (A, b, h0)]
    res = []
    for f in (semiring_kernels.DenseSemiringLoop.apply, semiring._Loop.apply):
        h = f(kind, leaves[0], shared, leaves[1], leaves[2])
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=h.dtype)
        loss = (torch.where(torch.isfinite(h), h, 0) * w).sum()
        res.append([h, *torch.autograd.grad(loss, leaves)])
    for a, c in zip(*(map(torch.Tensor.detach, r) for r in res)):
        assert torch.equal(torch.isfinite(a), torch.isfinite(c))
        assert float((torch.where(torch.isfinite(a), a - c, 0)).abs().max()) <= 1e-10


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kind", ["lse", "maxplus"])
def test_kernels_match_the_c_loop(kind, shared, monkeypatch):
    """Tiles of 4 source states (N = 11: three tiles, a short last one), so the online (+)
    and the first-argmax rule cross tiles; cut paths give -inf states and zero weights."""
    monkeypatch.setattr(semiring_kernels, "_tiles", lambda N, device: (16, 4))
    heads = 2 if shared else 1
    _against_c(kind, shared, *_operands(kind, 4, 6, 11, shared, heads), heads=heads)


def test_bfloat16_runs_in_float32():
    A, b, h0 = (x.to(torch.bfloat16) for x in _operands("lse", 2, 5, 9, True))
    h = semiring_kernels.DenseSemiringLoop.apply("lse", A, True, b, h0)
    want = semiring.loop_torch("lse", A.float(), True, b.float(), h0.float())
    assert h.dtype == torch.bfloat16
    assert float((h.float() - want).nan_to_num(posinf=0, neginf=0).abs().max()) <= 0.05 * float(want.abs().max())


def test_double_backward_differentiates_the_torch_loop():
    A, b, h0 = (x.clone().requires_grad_() for x in _operands("lse", 2, 4, 5, True))
    A.data[..., 1, :] = 0.0
    b.data[:, 2, 3] = 0.0
    got, want = [], []
    for f, out in ((semiring_kernels.DenseSemiringLoop.apply, got), (semiring._Loop.apply, want)):
        h = f("lse", A, True, b, h0)
        (dA,) = torch.autograd.grad((h ** 2).sum(), A, create_graph=True)
        out.extend(torch.autograd.grad(dA.sum(), (b, h0)))
    assert max(float((a - c).abs().max()) for a, c in zip(got, want)) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch):
    for N in (128, 512):
        compiled = semiring_kernels.compile_ahead(arch, N)
        assert all(c.spills == 0 for c in compiled), [(c.name, c.registers, c.spills) for c in compiled]
