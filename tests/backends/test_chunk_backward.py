"""The derived backward of the torch backend's chunkwise forms (scans.chunk_diag and
scans.chunk_delta: autograd Functions whose backward is the adjoint of the chunk form).

In float64:
  - kernel level: the gradients of every input (queries, keys, values, betas, log decays,
    initial state) for a loss on the outputs and the final state, against autograd through
    the per-step recurrence -- scalar and vector decay, inclusive and exclusive readouts,
    several readouts at once, gated and ungated delta rule, T a multiple of the chunk or
    not, a loss on the outputs only or on the final state only; with the C library and
    without it (the torch stand-ins of the C kernels);
  - torch's gradcheck, and gradgradcheck (create_graph=True recomputes through the chunk
    form in differentiable ops);
  - every chunkwise stdlib cell the derived backward serves (ChunkDiag, ChunkDelta,
    HouseholderProducts in the torch selection), with chunks short enough that T spans
    several: gradients of inputs, params and initial states against the reference backend;
  - what the forward keeps for the backward: its inputs and one state per chunk, nothing
    of the chunks' insides;
  - without the C library, a NaN value at step p leaves the gradients before p alone (the
    C path is covered cell by cell in test_nonfinite_causality.py)."""
from __future__ import annotations

import pytest
import torch

import recdsl
import recdsl.lowering as L
from helpers import as_tuple, random_inputs
from recdsl.backends.torch import cpu_kernels, scans
from recdsl.spec import stdlib_files

DT = torch.float64
TOL = 1e-10


@pytest.fixture(params=(["C"] if cpu_kernels.available() else []) + ["torch"])
def path(request, monkeypatch):
    """Run with the C library's kernels (where it builds), and with their torch stand-ins."""
    if request.param == "torch":
        monkeypatch.setattr(scans, "use_c", lambda *ts: False)
    return request.param


def _loop_diag(reads, k, v, g, S0):
    """The per-step recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ and its readouts."""
    S, outs = S0, [[] for _ in reads]
    for t in range(k.shape[1]):
        dec = torch.exp(g[:, t]).reshape(k.shape[0], -1, 1)
        new = dec * S + k[:, t, :, None] * v[:, t, None, :]
        for o, (q, inclusive) in zip(outs, reads):
            o.append((q[:, t, None, :] @ (new if inclusive else S))[:, 0])
        S = new
    return [torch.stack(o, 1) for o in outs], S


def _loop_delta(q, k, v, beta, g, S0):
    S, outs = S0, []
    for t in range(k.shape[1]):
        kt, bt = k[:, t], beta[:, t, None, None]
        dec = 1.0 if g is None else torch.exp(g[:, t])[:, None, None]
        S = dec * (S - bt * kt[:, :, None] * (kt[:, None, :] @ S)) + bt * kt[:, :, None] * v[:, t, None, :]
        outs.append((q[:, t, None, :] @ S)[:, 0])
    return torch.stack(outs, 1), S


def _grads(outs, S, leaves, on_outputs: bool, on_state: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    if on_outputs:
        loss = loss + sum((o * torch.randn(o.shape, generator=gen, dtype=DT)).sum() for o in outs)
    if on_state:
        loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=DT)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), (what, i)
        if a is not None:
            err = float((a - b).detach().abs().max())
            assert err <= TOL * max(1.0, float(b.detach().abs().max())), (what, i, err)


def _diag_inputs(reads, T, scalar, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 2, 5, 3
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=DT)   # noqa: E731
    qs = [rnd(B, T, K).requires_grad_() for _ in reads]
    k, v = rnd(B, T, K).requires_grad_(), rnd(B, T, V).requires_grad_()
    g = (-2 * torch.rand((B, T) if scalar else (B, T, K), generator=gen, dtype=DT)).requires_grad_()
    S0 = rnd(B, K, V).requires_grad_()
    return qs, k, v, g, S0


@pytest.mark.parametrize("scalar", [True, False], ids=["scalar", "vector"])
@pytest.mark.parametrize("reads", [(True,), (False,), (True, False)], ids=["incl", "excl", "both"])
@pytest.mark.parametrize("T, chunk", [(19, 8), (16, 8), (5, 8)])
@pytest.mark.parametrize("loss", ["outputs+state", "outputs", "state"])
def test_chunk_diag_gradients_match_the_recurrence(path, scalar, reads, T, chunk, loss, monkeypatch):
    monkeypatch.setattr(scans, "SUB", 4)                 # the torch stand-in's factored sub-blocks run too
    qs, k, v, g, S0 = _diag_inputs(reads, T, scalar)
    leaves = qs + [k, v, g, S0]
    on_outputs, on_state = "outputs" in loss, "state" in loss
    outs, S = scans.chunk_diag(list(zip(qs, reads)), k, v, g, S0, chunk=chunk)
    want_outs, want_S = _loop_diag(list(zip(qs, reads)), k, v, g, S0)
    _assert_close(outs + [S], want_outs + [want_S], "values")
    _assert_close(_grads(outs, S, leaves, on_outputs, on_state), _grads(want_outs, want_S, leaves, on_outputs, on_state),
                  f"gradients ({path})")


def _delta_inputs(T, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 2, 4, 3
    q = torch.randn(B, T, K, generator=gen, dtype=DT).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, K, generator=gen, dtype=DT), dim=-1).requires_grad_()
    v = torch.randn(B, T, V, generator=gen, dtype=DT).requires_grad_()
    beta = torch.rand(B, T, generator=gen, dtype=DT).requires_grad_()
    g = (-torch.rand(B, T, generator=gen, dtype=DT)).requires_grad_() if gated else None
    S0 = torch.randn(B, K, V, generator=gen, dtype=DT).requires_grad_()
    return q, k, v, beta, g, S0


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("T, chunk", [(19, 8), (16, 8), (3, 8)])
@pytest.mark.parametrize("loss", ["outputs+state", "outputs", "state"])
def test_chunk_delta_gradients_match_the_recurrence(path, gated, T, chunk, loss):
    q, k, v, beta, g, S0 = _delta_inputs(T, gated)
    leaves = [x for x in (q, k, v, beta, g, S0) if x is not None]
    on_outputs, on_state = "outputs" in loss, "state" in loss
    o, S = scans.chunk_delta(q, k, v, beta, g, S0, chunk=chunk)
    want_o, want_S = _loop_delta(q, k, v, beta, g, S0)
    _assert_close([o, S], [want_o, want_S], "values")
    _assert_close(_grads([o], S, leaves, on_outputs, on_state), _grads([want_o], want_S, leaves, on_outputs, on_state),
                  f"gradients ({path})")


def test_chunk_diag_gradcheck_and_gradgradcheck(path):
    gen = torch.Generator().manual_seed(3)
    B, T, K, V = 1, 7, 3, 2
    q, k = (torch.randn(B, T, K, generator=gen, dtype=DT).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, V, generator=gen, dtype=DT).requires_grad_()
    gs = -torch.rand(B, T, generator=gen, dtype=DT)
    gv = -torch.rand(B, T, K, generator=gen, dtype=DT)
    S0 = torch.randn(B, K, V, generator=gen, dtype=DT).requires_grad_()
    for g in (gs.requires_grad_(), gv.requires_grad_()):
        def f(q, k, v, g, S0):
            outs, S = scans.chunk_diag([(q, True), (q, False)], k, v, g, S0, chunk=4)
            return (*outs, S)
        assert torch.autograd.gradcheck(f, (q, k, v, g, S0))
        assert torch.autograd.gradgradcheck(f, (q, k, v, g, S0))


def test_chunk_delta_gradcheck_and_gradgradcheck(path):
    for gated in (True, False):
        q, k, v, beta, g, S0 = _delta_inputs(7, gated, seed=4)
        ins = tuple(x for x in (q, k, v, beta, g, S0) if x is not None)

        def f(*xs):
            q, k, v, beta, *rest = xs
            g, S0 = (rest[0], rest[1]) if gated else (None, rest[0])
            return scans.chunk_delta(q, k, v, beta, g, S0, chunk=4)
        assert torch.autograd.gradcheck(f, ins)
        assert torch.autograd.gradgradcheck(f, ins)


# --------------------------------------------------------------------------- what the forward keeps

def _saved_numel(fn) -> int:
    """Elements of the tensors autograd saves for the backward while fn runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_the_forward_keeps_its_inputs_and_one_state_per_chunk():
    T, C = 64, 16
    for scalar in (True, False):
        qs, k, v, g, S0 = _diag_inputs((True,), T, scalar)
        inputs = sum(x.numel() for x in qs + [k, v, g, S0])
        saved = _saved_numel(lambda: scans.chunk_diag([(qs[0], True)], k, v, g, S0, chunk=C))
        assert saved <= inputs + S0.numel() * T // C, (scalar, saved, inputs + S0.numel() * T // C)
    for gated in (True, False):
        q, k, v, beta, g, S0 = _delta_inputs(T, gated)
        inputs = sum(x.numel() for x in (q, k, v, beta, g, S0) if x is not None)
        saved = _saved_numel(lambda: scans.chunk_delta(q, k, v, beta, g, S0, chunk=C))
        assert saved <= inputs + S0.numel() * T // C, (gated, saved, inputs + S0.numel() * T // C)


# --------------------------------------------------------------------------- non-finite inputs, torch path

@pytest.mark.parametrize("form", ["scalar", "vector", "exclusive", "delta", "gated delta"])
def test_without_the_c_library_a_nan_value_leaves_earlier_gradients_alone(form, monkeypatch):
    """A NaN value at step p (every p of two chunks, one batch row each) changes no gradient
    at steps before p of a loss on the outputs before p: the torch stand-ins of the C kernels
    (the sub-block scores, the chunk loops, torch's triangular solves) keep the causality
    the C kernels keep."""
    monkeypatch.setattr(scans, "use_c", lambda *ts: False)
    monkeypatch.setattr(scans, "SUB", 4)
    C, T = 8, 16
    P = list(range(1, T))
    gen = torch.Generator().manual_seed(5)
    B, K, V = len(P), 4, 3
    q, k = torch.randn(B, T, K, generator=gen, dtype=DT), torch.randn(B, T, K, generator=gen, dtype=DT)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, T, V, generator=gen, dtype=DT)
    beta = torch.rand(B, T, generator=gen, dtype=DT)
    g = -torch.rand((B, T, K) if form == "vector" else (B, T), generator=gen, dtype=DT)
    S0 = torch.randn(B, K, V, generator=gen, dtype=DT)
    before = torch.arange(T)[None, :] < torch.tensor(P)[:, None]                   # [B, T]
    w = torch.randn(B, T, V, generator=gen, dtype=DT)

    def grads(v):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, g, S0)]
        lq, lk, lv, lb, lg, lS = leaves
        if form in ("delta", "gated delta"):
            o, _ = scans.chunk_delta(lq, lk, lv, lb, lg if form == "gated delta" else None, lS, chunk=C)
        else:
            (o,), _ = scans.chunk_diag([(lq, form != "exclusive")], lk, lv, lg, lS, chunk=C)
        loss = torch.where(before[..., None], o * w, 0).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True)
    bad = v.clone()
    bad[torch.arange(B), torch.tensor(P)] = float("nan")
    for name, clean, poisoned in zip("q k v beta g S0".split(), grads(v), grads(bad)):
        if clean is None:
            continue
        if name == "S0":
            assert torch.equal(torch.isfinite(poisoned), torch.ones_like(poisoned, dtype=torch.bool)), name
            assert float((poisoned - clean).abs().max()) <= TOL, name
            continue
        m = before.reshape(before.shape + (1,) * (clean.dim() - 2)).expand_as(clean)
        assert bool(torch.isfinite(poisoned[m]).all()), f"{form}: NaN in the gradient of {name} before p"
        assert float((poisoned[m] - clean[m]).abs().max()) <= TOL * max(1.0, float(clean.abs().max())), name


# --------------------------------------------------------------------------- every chunkwise stdlib cell

DERIVED = (L.ChunkDiag, L.ChunkDelta, L.HouseholderProducts)


def _derived_forms(name: str) -> list:
    spec = recdsl.load(name)
    if spec.cell.over != "seq":
        return []
    return [c.form for c in spec.plan().selections["torch"].stages if isinstance(c.form, DERIVED)]


CELLS = [n for n in stdlib_files() if _derived_forms(n)]
CHUNK = 8


@pytest.fixture
def short_chunks(monkeypatch):
    monkeypatch.setattr(scans, "DIAG_CHUNK", CHUNK)
    monkeypatch.setattr(scans, "DELTA_CHUNK", CHUNK)
    monkeypatch.setattr(scans, "SUB", CHUNK // 2)


def test_the_cells_cover_every_derived_form():
    forms = [f for n in CELLS for f in _derived_forms(n)]
    assert {type(f) for f in forms} == set(DERIVED)
    diag = [f for f in forms if isinstance(f, L.ChunkDiag)]
    assert any(f.signed for f in diag) and any(f.transposed for f in diag)
    assert any(not r.inclusive for f in diag for r in f.readouts)


@pytest.mark.parametrize("name", CELLS)
def test_cell_gradients_match_the_reference(name, short_chunks):
    """Inputs, params and initial states, for a loss on every output and final state, with
    T spanning three chunks (and a ragged last one)."""
    spec = recdsl.load(name)
    torch.manual_seed(0)
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims).double()
    layer = spec(backend="torch", **dims).double()
    layer.load_state_dict(ref.state_dict())
    B, T = 2, 2 * CHUNK + 3
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, DT).items()}
    gen = torch.Generator().manual_seed(1)
    state = {k: (0.5 * torch.randn(v.shape, generator=gen, dtype=DT)).requires_grad_()
             for k, v in ref.initial_state(B, DT).items()}

    def grads(m):
        outs, st = m(**xs, state=state)
        g2 = torch.Generator().manual_seed(2)
        loss = sum((o * torch.randn(o.shape, generator=g2, dtype=DT)).sum() for o in as_tuple(outs)) \
            + sum((st[k] * torch.randn(st[k].shape, generator=g2, dtype=DT)).sum() for k in sorted(st))
        return torch.autograd.grad(loss, list(xs.values()) + [state[k] for k in sorted(state)] + list(m.parameters()),
                                   allow_unused=True)
    want, got = grads(ref), grads(layer)
    assert layer.ran == [c.kernel.name for c in layer.selection.stages]
    scale = max([1.0] + [float(a.abs().max()) for a in want if a is not None])
    for i, (a, b) in enumerate(zip(want, got)):
        assert (a is None) == (b is None), (name, i)
        if a is not None:
            assert float((a - b).abs().max()) <= 1e-9 * scale, (name, i, float((a - b).abs().max()))
