"""Dense semiring recurrences (issue 14): s'[i] = (+)_j (s[j] + A[j, i]) + b[i] in the log
semiring ((+) = logsumexp: the HMM forward algorithm) or the tropical one ((+) = max:
Viterbi), with a dense transition A (a param or a per-step input) -- classified as semiring
affine with a dense transition (not nonlinear), proven (float64 spot check, sympy proofs of
the folding of b, associativity and composition), lowered to DenseSemiringScan, and run on
reference, torch (parallel scan of semiring matrix products for small N; the C matrix-vector
loop, or its torch stand-in, otherwise) and triton (the borrowed torch kernel), outputs and
gradients against hand loops written from the equations (gradcheck in float64 for both)."""
from __future__ import annotations

import pytest
import torch

import recdsl
import recdsl.lowering as L
from recdsl import plan as P
from recdsl.backends.torch import semiring as SR
from recdsl.lowering import match

HMM = """cell HMM(N):
    \"\"\"HMM forward in log space (Rabiner, 1989).\"\"\"
    input logB[N]
    param logA[N, N] ~ normal(0, 1)
    state alpha[N] = 0
    alpha' = logsumexp(alpha[:, None] + logA, axis=0) + logB
    output alpha'
"""
VITERBI = """cell Vit(N):
    \"\"\"Viterbi (1967), log space.\"\"\"
    input logB[N]
    param logA[N, N] ~ normal(0, 1)
    state delta[N] = 0
    delta' = amax(delta[:, None] + logA, axis=0) + logB
    output delta'
"""
# unseen spellings: the transposed one (A[i, j], axis=1, the state broadcast as a row), a
# per-step transition input with terms inside the reduction, a state-free offset subtracted
TRANSPOSED = """cell HMMT(N):
    \"\"\"HMM forward, transition stored to-from.\"\"\"
    input logB[N]
    param logAT[N, N] ~ normal(0, 1)
    state a[N] = 0
    a' = logB + logsumexp(logAT + a, axis=-1)
    output a'
"""
PER_STEP = """cell InputMaxPlus(N):
    \"\"\"Max-plus with a per-step transition input and the emission inside the reduction.\"\"\"
    input M[N, N], e[N], c[]
    state d[N] = 0
    d' = amax(d[:, None] + M + e[None, :] - 0.5, axis=-2) - c
    output y = d'
"""
# (name, source, semiring, the transition as the hand loop reads it: from j to i)
CASES = {
    "hmm": (HMM, "log-sum-exp"),
    "viterbi": (VITERBI, "max-plus"),
    "transposed": (TRANSPOSED, "log-sum-exp"),
    "per_step": (PER_STEP, "max-plus"),
}
NOT_DENSE = {
    # s[i] + reduce_j A[i, j]: elementwise, no transition between states
    "elementwise": "a' = logsumexp(a[:, None] + W, axis=1) + x",
    "product": "a' = logsumexp(a[:, None] * W, axis=0) + x",
    "negated": "a' = -logsumexp(a[:, None] + W, axis=0) + x",
    "state in the transition": "a' = logsumexp(a[:, None] + W * a[None, :], axis=0) + x",
    "twice": "a' = logsumexp(a[:, None] + a[None, :] + W, axis=0) + x",
    "sum": "a' = sum(a[:, None] + W, axis=0) + x",
}


def _hand_loop(kind, A, b, h0):
    """h_t[i] = (+)_j (h_{t-1}[j] + A_t[j, i]) + b_t[i], explicit loops over t, i and j (float64):
    A [B, T, N, N] (from j, to i), b [B, T, N], h0 [B, N]."""
    Bn, Tn, N = b.shape
    out = []
    h = h0
    for t in range(Tn):
        new = []
        for i in range(N):
            terms = torch.stack([h[:, j] + A[:, t, j, i] for j in range(N)], -1)
            red = torch.logsumexp(terms, -1) if kind == "lse" else terms.max(-1).values
            new.append(red + b[:, t, i])
        h = torch.stack(new, -1)
        out.append(h)
    return torch.stack(out, 1)


def _oracle(case, layer, xs, h0):
    """The hand loop fed with the case's transition and offset, as the equations define them."""
    Bn, Tn = next(iter(xs.values())).shape[:2]
    if case in ("hmm", "viterbi"):
        A = layer.logA.detach()[None, None].expand(Bn, Tn, -1, -1)
        return _hand_loop("lse" if case == "hmm" else "maxplus", A, xs["logB"], h0)
    if case == "transposed":
        A = layer.logAT.detach().T[None, None].expand(Bn, Tn, -1, -1)
        return _hand_loop("lse", A, xs["logB"], h0)
    A = xs["M"] + xs["e"][:, :, None, :] - 0.5
    return _hand_loop("maxplus", A, -xs["c"][..., None].expand(xs["e"].shape), h0)


# ---------------------------------------------------------------------------- classification

@pytest.mark.parametrize("case", sorted(CASES))
def test_classified_as_a_dense_semiring_recurrence(case):
    src, semiring = CASES[case]
    plan = recdsl.load(src).plan(N=5)
    (s,) = plan.stages
    assert s.cls == P.SEMIRING and s.transition == "dense", (s.cls, s.detail)
    assert s.detail == f"{semiring}, dense transition [N, N]"
    spot, proof = s.checks
    assert "float64 spot check" in spot and float(spot.rsplit(" ", 1)[1]) < 1e-12, spot
    assert "associative" in proof and "NOT" not in proof, proof
    form = plan.form(0)
    assert isinstance(form, L.DenseSemiringScan) and form.semiring == semiring and form.n == 5 and form.products
    text = str(plan)
    assert f"semiring affine, {semiring}, dense transition [N, N]" in text and "transition: dense" in text
    assert "torch: dense semiring scan" in text and "-> torch.dense_semiring" in text
    choice = plan.selections["torch"].choice(0)
    assert choice.form is form and choice.kernel.name == "torch.dense_semiring"


def test_the_elementwise_semiring_forms_are_unchanged():
    spec = recdsl.load("cell M(N):\n    input a[N], b[N]\n    state m[N] = 0\n    m' = max(m + a, b)\n    output m'\n")
    (s,) = spec.plan().stages
    assert s.cls == P.SEMIRING and s.transition == "elementwise" and isinstance(spec.plan().form(0), L.ElementScan)


@pytest.mark.parametrize("name", sorted(NOT_DENSE))
def test_what_is_not_a_dense_semiring(name):
    src = ("cell X(N):\n    input x[N]\n    param W[N, N] ~ normal(0, 1)\n    state a[N] = 0\n"
           f"    {NOT_DENSE[name]}\n    output a'\n")
    (s,) = recdsl.load(src).plan().stages
    assert s.transition != "dense", name
    assert not any(isinstance(c, L.DenseSemiringScan) for c in recdsl.load(src).plan().candidates[0])


def test_the_combine_is_proven_associative():
    from recdsl.analysis.symbolic import combine_is_associative
    assert combine_is_associative("dense-maxplus", 2) and combine_is_associative("dense-logsumexp", 2)


def test_a_large_state_runs_the_matrix_vector_loop():
    plan = recdsl.load(HMM).plan(N=match.DENSE_SEMIRING_PRODUCTS_MAX + 1)
    choice = plan.selections["torch"].choice(0)
    assert isinstance(choice.form, L.DenseSemiringScan) and not choice.form.products
    assert choice.passed and "N = 17 > 16" in choice.passed[0].reason
    assert "C call" in choice.note


# ---------------------------------------------------------------------------- against the hand loop

def _layers(src, N, backends, heads=None):
    spec = recdsl.load(src)
    torch.manual_seed(0)
    layers = [spec(backend=b, N=N, heads=heads).double() for b in backends]
    for other in layers[1:]:
        other.load_state_dict(layers[0].state_dict())
    return spec, layers


def _inputs(spec, layer, Bn, Tn, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    return {n: torch.randn((Bn, Tn) + heads + layer.ir.concrete(v.shape), dtype=torch.float64, generator=g)
            for n, v in spec.cell.inputs.items()}


def _agree(case, backend, N, Tn=9, products_max=None, monkeypatch=None):
    src, _ = CASES[case]
    if products_max is not None:
        monkeypatch.setattr(match, "DENSE_SEMIRING_PRODUCTS_MAX", products_max)
    spec, (ref, other) = _layers(src, N, ("reference", backend))
    xs = _inputs(spec, ref, 2, Tn)
    h0 = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (state_name,) = spec.cell.states
    want = _oracle(case, ref, xs, h0)
    leaves = {k: v.clone().requires_grad_() for k, v in xs.items()}
    grads = []
    for layer in (ref, other):
        out, st = layer(**leaves, state={state_name: h0})
        assert (out - want).abs().max() < 1e-10, (case, backend, layer.backend_name)
        assert (st[state_name] - want[:, -1]).abs().max() < 1e-10
        w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad((out * w).sum(), list(leaves.values()) + list(layer.parameters())))
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10, (case, backend)
    return other


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", ["products", "loop"])
def test_torch_matches_the_hand_loop(case, variant, monkeypatch):
    layer = _agree(case, "torch", 4, products_max=16 if variant == "products" else 0, monkeypatch=monkeypatch)
    assert layer.selection.choice(0).form.products == (variant == "products")
    assert layer.ran == ["torch.dense_semiring"]


@pytest.mark.parametrize("case", ["hmm", "per_step"])
def test_torch_loop_without_a_c_compiler(case, monkeypatch):
    monkeypatch.setattr(SR, "_c_usable", lambda *ts: False)
    layer = _agree(case, "torch", 3, products_max=0, monkeypatch=monkeypatch)
    assert layer.ran == ["torch.loop"]


@pytest.mark.parametrize("case", ["hmm", "viterbi", "transposed", "per_step"])
@pytest.mark.parametrize("own", [True, False])
def test_triton_matches_the_hand_loop(case, own, monkeypatch):
    """On triton the generated sequential kernel runs where the step fits its registers;
    once that declines (here: made to, by a matrix budget of 0), the dense semiring kernel
    (semiring_kernels.py), never the borrowed torch kernel."""
    from recdsl.backends.triton import seq_kernels
    if not own:
        monkeypatch.setattr(seq_kernels, "MATRIX_LIMIT", 0)
    layer = _agree(case, "triton", 3, monkeypatch=monkeypatch)
    choice = layer.selection.choice(0)
    assert layer.ran == [choice.kernel.name]
    if not own:
        assert isinstance(choice.form, L.DenseSemiringScan) and choice.kernel.borrowed is None
        assert layer.ran == ["triton.dense_semiring"]
    else:
        assert choice.kernel.name == "triton.sequential"


@pytest.mark.parametrize("kind", ["lse", "maxplus"])
def test_no_path_is_no_gradient(kind):
    """A state no path reaches (-inf) passes no gradient back, in both derived backwards
    (autograd through torch.logsumexp of all -inf gives NaN there: the torch loop is not compared)."""
    N = 3
    A = torch.zeros(1, 4, N, N, dtype=torch.float64)
    A[..., :, 2] = float("-inf")                       # nothing reaches state 2
    b = torch.randn(1, 4, N, dtype=torch.float64).requires_grad_()
    h0 = torch.zeros(1, N, dtype=torch.float64).requires_grad_()
    M = (A + b[..., None, :])
    g = []
    for f in (lambda: SR._Products.apply(kind, M, h0),) + \
            ((lambda: SR._Loop.apply(kind, A, False, b, h0),) if SR.cpu_kernels.available() else ()):
        h = f()
        assert torch.isneginf(h[..., 2]).all()
        g.append(torch.autograd.grad(h[..., :2].sum(), (b, h0)))
        assert torch.isfinite(g[-1][0]).all() and (g[-1][0][..., 2] == 0).all()
    for other in g[1:]:
        assert all(torch.allclose(x, y) for x, y in zip(g[0], other))


@pytest.mark.parametrize("products_max", [16, 0])
@pytest.mark.parametrize("case", ["hmm", "per_step"])
def test_heads_and_float32(case, products_max, monkeypatch):
    """Heads: a param transition per head, or a per-step input with a head axis."""
    monkeypatch.setattr(match, "DENSE_SEMIRING_PRODUCTS_MAX", products_max)
    spec, (ref, fast) = _layers(CASES[case][0], 5, ("reference", "torch"), heads=3)
    assert fast.selection.choice(0).form.products == bool(products_max)
    xs = {k: v.requires_grad_() for k, v in _inputs(spec, ref, 2, 7).items()}
    (o1, _), (o2, _) = ref(**xs), fast(**xs)
    assert o1.shape == (2, 7, 3, 5) and (o1 - o2).abs().max() < 1e-10
    g1 = torch.autograd.grad(o1.sum(), list(xs.values()) + list(ref.parameters()))
    g2 = torch.autograd.grad(o2.sum(), list(xs.values()) + list(fast.parameters()))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(g1, g2))
    xs = {k: v.detach() for k, v in xs.items()}
    xs32 = {k: v.float() for k, v in xs.items()}
    o32, _ = fast.float()(**xs32)
    assert o32.dtype == torch.float32 and (o32.double() - o1).abs().max() < 1e-4
    assert fast.ran == ["torch.dense_semiring"]


# ---------------------------------------------------------------------------- gradcheck (float64)

@pytest.mark.parametrize("kind", ["lse", "maxplus"])
@pytest.mark.parametrize("how", ["products", "c loop", "torch loop"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck(kind, how, shared):
    """The derived backwards against finite differences: posteriors (log semiring), the
    argmax path (max-plus, away from ties), the transition shared by all rows or per step."""
    g = torch.Generator().manual_seed(1)
    R, H, Tn, N = 4, 2, 5, 4      # rows r = batch x heads; a shared transition per head: A[r % H]
    A = torch.randn(((H, N, N) if shared else (R, Tn, N, N)), dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(R, Tn, N, dtype=torch.float64, generator=g).requires_grad_()
    h0 = torch.randn(R, N, dtype=torch.float64, generator=g).requires_grad_()
    if how == "products":
        def f(A, b, h0):
            Af = A.repeat(R // H, 1, 1)[:, None].expand(R, Tn, N, N) if shared else A
            return SR._Products.apply(kind, Af + b[..., None, :], h0)
    elif how == "c loop":
        if not SR.cpu_kernels.available():
            pytest.skip(f"no C library: {SR.cpu_kernels.unavailable_reason()}")

        def f(A, b, h0):
            return SR._Loop.apply(kind, A, shared, b, h0)
    else:
        def f(A, b, h0):
            return SR.loop_torch(kind, A, shared, b, h0)
    assert torch.autograd.gradcheck(f, (A, b, h0), eps=1e-6, atol=1e-6)
    if kind == "lse":
        assert torch.autograd.gradgradcheck(f, (A, b, h0), eps=1e-6, atol=1e-6)
