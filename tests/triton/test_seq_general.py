"""The Triton sequential kernel on nonlinear steps it was not written for: per-step scalar
inputs, concat (and slices) in the step, reductions over a vector (logsumexp, softmax,
mean, max), where / clamp / minimum / maximum, matmuls of computed vectors, sliced and
transposed weights, and matrix states. Each cell is written here, run on the triton
backend (Triton's interpreter, CPU tensors) and on the reference in float64: outputs,
final states and the gradients of inputs, params and the initial state agree; and the
selection (and what the forward ran) is `triton.sequential` for every sequential stage,
never the borrowed torch loop."""
from __future__ import annotations

import pytest
import torch

import recdsl
from helpers import as_tuple, grad_inputs, outputs_and_grads, paired_layers, random_initial_state
from recdsl.lowering import SequentialLoop
from recdsl.pipeline import emit_cell

SCALAR_INPUT = """
cell ScalarGate(H):
    input x[H], ts[]
    param W[H, H] ~ normal(0, 0.3)
    state h[H] = 0
    h' = tanh(W @ h + x) * ts
    output h'
"""

# CfC-like: the backbone reads concat(x, h) (concat_split splits its matmul: the weight is a
# column slice), a time gap ts[] per step, and a scalar param broadcast against vectors
CFC_LIKE = """
cell CfcLike(D, H, U):
    input x[D], ts[]
    param W_bb[U, D+H] ~ normal(0, 0.4)
    param b_bb[U] = 0.1
    param W_1[H, U] ~ normal(0, 0.4)
    param W_2[H, U] ~ normal(0, 0.4)
    param W_t[H, U] ~ normal(0, 0.4)
    param tau[] = 0.7
    state h[H] = 0
    bb = 1.7159 * tanh(0.666 * (W_bb @ concat(x, h) + b_bb))
    f1 = tanh(W_1 @ bb)
    f2 = tanh(W_2 @ bb)
    t = sigmoid((W_t @ bb) * ts * tau)
    h' = f1 * (1 - t) + t * f2
    output h'
"""

# concat of slices of the state in the step, elementwise and under a weight
CONCAT_STATE = """
cell ConcatState(N, P):
    input x[N+P]
    param A[N+P] ~ uniform(0.5, 0.9)
    param W[N+P, N+P] ~ normal(0, 0.3)
    state z[N+P] = 0
    phi = concat(z[0:N], relu(z[N:N+P]))
    rot = concat(z[N:N+P], tanh(z[0:N]))
    z' = A * z + W @ phi + 0.5 * tanh(rot + x)
    output z'
"""

# an HMM's forward recursion in log space: a dense log-transition param read elementwise
# against the state's column, logsumexp over the previous state, normalised every step
HMM_LOGSUMEXP = """
cell HmmForward(N):
    input e[N]
    param A[N, N] ~ normal(0, 1)
    state a[N] = 0
    u = logsumexp(a[:, None] + A, axis=0) + e
    a' = u - logsumexp(u)
    output a'
"""

# a small softmax in the step (attention over M memory slots computed from h), a mean,
# clamp, where and minimum / maximum
SOFTMAX_SLOTS = """
cell SoftSlots(H, M):
    input x[H]
    param Q[M, H] ~ normal(0, 0.5)
    param V[H, M] ~ normal(0, 0.5)
    state h[H] = 0
    p = softmax(Q @ h + mean(x))
    r = V @ p
    c = clamp(r + x, -0.8, 0.8)
    h' = where(c > 0, max(c, 0.1 * h), min(c, tanh(h))) + amax(r) * 0.1
    output h'
"""

# Yaad-like: a matrix memory trained online with a clipped error, a scalar retention gate
YAAD_LIKE = """
cell YaadLike(K, V):
    input k[K], v[V], ga[], gl[]
    state M[K, V] = 0
    kn = l2norm(k)
    err = clamp(kn @ M - v, -0.5, 0.5)
    M' = sigmoid(ga) * M - sigmoid(gl) * outer(kn, err)
    output o = kn @ M'
"""

# a matrix state read through its transpose and a product on the right, a nonlinear update
MATRIX_NONLINEAR = """
cell MatrixTanh(K):
    input k[K], q[K]
    param W[K, K] ~ normal(0, 0.3)
    state S[K, K] = 0
    y = tanh(S @ k + W @ q)
    S' = tanh(0.9 * S.T + outer(y, k) + sum(S, axis=0)[None, :] * 0.1)
    output o = S' @ q
"""

# a nonlinear matrix update whose outer(k, v) is hoisted (a [K, V] value per step, read by the
# kernel), with a scalar decay and a matrix param read elementwise
MATRIX_LEAF = """
cell MatrixLeaf(K, V):
    input k[K], v[V], a[]
    param D[K, V] ~ uniform(0.5, 0.9)
    state S[K, V] = 0
    S' = tanh(sigmoid(a) * D * S + outer(k, v))
    output o = sum(S', axis=0)
"""

# matmuls of computed values: a transposed weight and a row slice of one times computed
# vectors, a matrix computed from the state (times a hoisted transpose of a param) times h
COMPUTED_MATMULS = """
cell ComputedMatmuls(H):
    input x[H]
    param W[H, H] ~ normal(0, 0.3)
    param V[H+2, H] ~ normal(0, 0.3)
    param U[H, H] ~ normal(0, 0.3)
    state h[H] = 0
    y = W.T @ (x * h) + tanh(h) @ V[1:H+1, :]
    G = sigmoid(outer(h, x)) * U.T
    h' = tanh(G @ h + y + x)
    output h'
"""

# a scalar state beside a vector one, an element of the state, diag / arange constants,
# rmsnorm, and a softmax along the rows of a matrix computed in the step
SCALAR_STATE_MIX = """
cell ScalarStateMix(H) where H >= 2:
    input x[H]
    param W[H, H] ~ normal(0, 0.3)
    state h[H] = 0
    state n[] = 1
    n' = 0.9 * n + 0.01 * sum(tanh(h)) ** 2 + 0.1 + 0.05 * h[1]
    P = softmax(outer(h, x) + W)
    h' = rmsnorm(tanh(diag(x) @ h + P @ x + arange(H) * 0.1)) / sqrt(1 + n' * n')
    output h'
"""

CELLS = {
    "scalar_input": (SCALAR_INPUT, {"H": 8}),
    "cfc_like": (CFC_LIKE, {"D": 3, "H": 4, "U": 5}),
    "concat_state": (CONCAT_STATE, {"N": 3, "P": 4}),
    "hmm_logsumexp": (HMM_LOGSUMEXP, {"N": 5}),
    "softmax_slots": (SOFTMAX_SLOTS, {"H": 6, "M": 3}),
    "yaad_like": (YAAD_LIKE, {"K": 3, "V": 4}),
    "matrix_nonlinear": (MATRIX_NONLINEAR, {"K": 3}),
    "matrix_leaf": (MATRIX_LEAF, {"K": 3, "V": 2}),
    "computed_matmuls": (COMPUTED_MATMULS, {"H": 5}),
    "scalar_state_mix": (SCALAR_STATE_MIX, {"H": 5}),
}


def _pair(name, heads=None):
    src, dims = CELLS[name]
    spec = recdsl.load(src)
    return (spec, *paired_layers(spec, "triton", dims, heads))


def _compare(name, B=3, T=9, heads=None, cu=None, **call):
    """Max abs differences (outputs, final states, gradients) of triton against the
    reference, and the triton module."""
    spec, ref, tri = _pair(name, heads)
    xs = grad_inputs(spec, ref, B, T)
    state = random_initial_state(spec, ref, B if cu is None else len(cu) - 1)
    if cu is not None:
        call["cu_seqlens"] = torch.tensor(cu)
    o_ref, s_ref, g_ref = outputs_and_grads(ref, xs, state, **call)
    o_tri, s_tri, g_tri = outputs_and_grads(tri, xs, state, **call)
    assert [a is None for a in g_ref] == [a is None for a in g_tri], name
    return (max(float((a - b).abs().max()) for a, b in zip(o_ref, o_tri)),
            max(float((s_ref[k] - s_tri[k]).abs().max()) for k in s_ref),
            max(float((a - b).abs().max()) for a, b in zip(g_ref, g_tri) if a is not None)), tri


def _sequential_kernels(tri) -> list[str]:
    return [c.kernel.name for c in tri.selection.stages if isinstance(c.form, SequentialLoop)]


@pytest.mark.parametrize("name", CELLS)
def test_selection_is_the_triton_sequential_kernel(name):
    src, dims = CELLS[name]
    spec = recdsl.load(src)
    sel = emit_cell(spec.lower(**dims), "triton").selection
    loops = [c for c in sel.stages if isinstance(c.form, SequentialLoop)]
    assert loops and all(c.kernel.name == "triton.sequential" and c.kernel.borrowed is None for c in loops), \
        [(c.kernel.name, [p.reason for p in c.passed]) for c in loops]


@pytest.mark.parametrize("name", CELLS)
def test_cell_matches_reference_with_gradients(name):
    (out, state, grad), tri = _compare(name)
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)
    assert "triton.sequential" in tri.ran and "torch.loop" not in tri.ran, tri.ran
    assert set(_sequential_kernels(tri)) == {"triton.sequential"}


@pytest.mark.parametrize("name", ["cfc_like", "yaad_like"])
@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_and_cu_seqlens(name, reverse):
    """In the kernel (the selection hands both to it): per-sequence initial and final
    states, an empty and a one-step sequence, gradients."""
    (out, state, grad), tri = _compare(name, B=1, T=12, cu=[0, 5, 5, 6, 12], reverse=reverse)
    assert tri._program.native
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)


@pytest.mark.parametrize("name", ["softmax_slots", "yaad_like"])
def test_heads(name):
    (out, state, grad), _ = _compare(name, B=2, T=5, heads=2)
    assert out <= 1e-12 and state <= 1e-12 and grad <= 1e-10, (out, state, grad)


@pytest.mark.parametrize("name", ["hmm_logsumexp", "matrix_leaf"])
def test_second_derivative(name):
    """create_graph=True: autograd's derivative of the stage's torch twin (a matrix read per
    step is handed to it flat, as to the kernel) against the reference's."""
    spec, ref, tri = _pair(name)
    xs = grad_inputs(spec, ref, 2, 5)
    second = []
    for layer in (ref, tri):
        out, _ = layer(**xs)
        first = torch.autograd.grad((as_tuple(out)[0] ** 2).sum(), list(xs.values()), create_graph=True)
        second.append(torch.autograd.grad(sum((g ** 2).sum() for g in first), list(layer.parameters())))
    assert max(float((a - b).abs().max()) for a, b in zip(*second)) <= 1e-10


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", CELLS)
def test_kernels_compile_for_a_gpu_without_spills(name, arch):
    """What only a GPU compiler rejects (3-d tiles, permutes, one-row programs) is caught
    here, with no GPU: triton.compile for sm_80 / sm_90, ptxas for registers and spills."""
    from recdsl.backends import triton as triton_backend
    src, dims = CELLS[name]
    emitted = emit_cell(recdsl.load(src).lower(**dims), "triton")
    _, compiled = triton_backend.compile_cell(emitted, arch)
    assert compiled and all(c.spills == 0 for c in compiled), [(c.name, c.registers, c.spills) for c in compiled]


def test_a_matrix_too_big_for_one_program_splits_by_columns_or_falls_back():
    """Yaad-like acts on M column by column: a block of columns per program (the numbers:
    tests/triton/test_seq_columns.py); MatrixTanh's S.T and sum(S, axis=0) mix them: the torch loop."""
    emitted = emit_cell(recdsl.load(YAAD_LIKE).lower(K=128, V=64), "triton")
    kern, = emitted.emitter.kernels
    assert emitted.selection.choice(0).kernel.name == "triton.sequential" and kern.split.axis == 1
    choice = emit_cell(recdsl.load(MATRIX_NONLINEAR).lower(K=96), "triton").selection.choice(0)
    assert isinstance(choice.form, SequentialLoop) and choice.kernel.name == "torch.loop"


@pytest.mark.parametrize("name", CELLS)
def test_kernels_compute_nothing_unread(name):
    """Every value the generated kernels assign is read (tests/pipeline/test_no_dead_code.py's
    checker, which covers the stdlib, on these cells too)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "pipeline" / "test_no_dead_code.py"
    spec = importlib.util.spec_from_file_location("_dead_code_checker", path)
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    src, dims = CELLS[name]
    assert checker.dead_python(emit_cell(recdsl.load(src).lower(**dims), "triton").kernels) == []
