"""A non-finite input must not reach the past (issue 12, part 2).

For every stdlib cell whose torch selection runs a chunkwise form (ChunkDiag: GLA, RetNet,
mLSTM, Mamba-2, signed / transposed decays; ChunkDelta: DeltaNet, gated DeltaNet;
HouseholderProducts: DeltaProduct; ChunkDPLR: KDA, RWKV-7), with the chunk lengths shortened
so that T covers two chunks (and the vector-decay scores two sub-blocks per chunk), NaN and
then +inf are put into one input at one step p -- every input, every p in 1..T-1 at once, one
batch row per p -- and in float64:

  - forward: every output at steps < p equals the clean run's (not only finite), with
    gradients enabled (the chunkwise training path) and without (the inference path);
  - backward: for the loss L = Σ_{t<p} <w_t, o_t>, the gradient of every input at steps < p
    equals the clean run's -- wherever the per-step `reference` backend gives a finite one.

Why "wherever the reference does": a loss over the earlier outputs still sends a zero
cotangent through the later steps, and autograd multiplies it by their partial derivatives;
where a partial is NaN, 0 * NaN = NaN. A NaN key, gate, beta or query at step p makes the
partials of the transition at p NaN, so even the per-step loop returns NaN for the earlier
gradients (asserted below, so that the exemption stays honest). What a chunkwise form must
not do is add NaN of its own: a masked pair (i, j > i) multiplied by a later row, or a pair
decay whose gradient reaches steps outside (j, i] (as a difference of cumulative sums does).
A loss over all outputs is NaN as soon as one later output is, and so is every gradient:
there is nothing to compare there.

The triton backend runs these stages on its own kernels (chunk_kernels, delta_kernels:
a call with a non-finite input runs torch's chunk form, which `layer.ran` records;
dplr_kernels: a recurrence, causal by construction; a scan where the plan prefers one):
those are checked in Triton's interpreter under `slow` (NaN, five positions across both
chunks)."""
from __future__ import annotations

import functools

import pytest
import torch

import recdsl
import recdsl.lowering as L
from helpers import as_tuple, random_inputs
from recdsl.backends.torch import dplr, scans
from recdsl.spec import stdlib_files

CHUNKWISE = (L.ChunkDiag, L.ChunkDelta, L.HouseholderProducts, L.ChunkDPLR)
C = 8                       # the chunk length in these tests
T = 2 * C
# One batch row per position (rows are independent: row b is poisoned at step P[b] only, and a
# row that leaked into another would show there too).
P = tuple(range(1, T))
P_TRITON = (1, C - 1, C, C + 1, T - 1)                # Triton's interpreter runs one program per row
VALUES = {"nan": float("nan"), "inf": float("inf")}
TOL = 1e-9


def _chunkwise(name: str, backend: str = "torch") -> list:
    spec = recdsl.load(name)
    if spec.cell.over != "seq":
        return []
    sel = spec.plan().selections[backend]
    return [c.form for c in sel.stages if isinstance(c.form, CHUNKWISE)]


CELLS = [n for n in stdlib_files() if _chunkwise(n)]


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    monkeypatch.setattr(scans, "DIAG_CHUNK", C)
    monkeypatch.setattr(scans, "DELTA_CHUNK", C)
    monkeypatch.setattr(scans, "SUB", C // 2)          # two sub-blocks per chunk: the factored pairs run
    monkeypatch.setattr(dplr, "CHUNK", C)
    monkeypatch.setattr(dplr, "GROUP_ROWS", 1)         # one chunk per group: the state passes between groups


@functools.lru_cache(maxsize=None)
def _setup(name: str, backend: str, pos: tuple):
    spec = recdsl.load(name)
    torch.manual_seed(0)
    ref = spec(backend="reference", **spec.analysis_dims()).double()
    layer = spec(backend=backend, **spec.analysis_dims()).double()
    layer.load_state_dict(ref.state_dict())
    xs = random_inputs(spec, ref, len(pos), T, torch.float64)
    return spec, ref, layer, xs


def _earlier(x: torch.Tensor, pos: tuple) -> torch.Tensor:
    """[B, T, ...] -> a mask of the steps before each row's position, broadcastable to x."""
    before = torch.arange(T)[None, :] < torch.tensor(pos)[:, None]
    return before.reshape(before.shape + (1,) * (x.dim() - 2))


def _run(layer, xs, pos: tuple, grad=True):
    """Outputs, and the gradients of Σ_b Σ_{t<pos[b]} <w_bt, o_bt> w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_(grad) for k, v in xs.items()}
    with torch.set_grad_enabled(grad):
        outs = as_tuple(layer(**leaves)[0])
    if not grad:
        return outs, None
    gen = torch.Generator().manual_seed(1)
    loss = sum(torch.where(_earlier(o, pos), o * torch.randn(o.shape, dtype=o.dtype, generator=gen), 0).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def _poisoned(xs, name, value, pos: tuple):
    xs = dict(xs)
    x = xs[name].clone()
    x[torch.arange(len(pos)), torch.tensor(pos)] = value
    xs[name] = x
    return xs


@functools.lru_cache(maxsize=None)
def _reference_finite(name: str, inp: str, value: str) -> frozenset:
    """The inputs whose earlier gradients the per-step reference keeps finite in every row."""
    _, ref, _, xs = _setup(name, "torch", P)
    _, grads = _run(ref, _poisoned(xs, inp, VALUES[value], P), P)
    return frozenset(k for k, g in grads.items()
                     if g is None or bool(torch.isfinite(g[_earlier(g, P).expand_as(g)]).all()))


def _close(a, b, pos, what):
    """a == b (up to TOL) at the steps before each row's position."""
    m = _earlier(a, pos).expand_as(a)
    a, b = a[m], b[m]
    assert bool(torch.isfinite(a).all()), f"{what}: not finite"
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= TOL * scale, f"{what}: max |error| {err:.3g} (scale {scale:.3g})"


def _check(name: str, backend: str, pos: tuple = P, values=tuple(VALUES)):
    spec, ref, layer, xs = _setup(name, backend, pos)
    clean_outs, clean_grads = _run(layer, xs, pos)
    for inp in xs:
        for value in values:
            what = f"{name}: {value} in {inp}"
            bad = _poisoned(xs, inp, VALUES[value], pos)
            outs, grads = _run(layer, bad, pos)
            for o, c in zip(outs, clean_outs):
                _close(o, c, pos, f"{what}: training-path outputs before it")
            for o, c in zip(_run(layer, bad, pos, grad=False)[0], clean_outs):
                _close(o, c, pos, f"{what}: no-grad outputs before it")
            for k in _reference_finite(name, inp, value):
                if grads[k] is not None:
                    _close(grads[k], clean_grads[k], pos, f"{what}: gradient of {k} before it")
    return layer


@pytest.mark.parametrize("name", CELLS)
def test_a_non_finite_input_leaves_the_past_alone(name):
    layer = _check(name, "torch")
    assert layer.ran == [c.kernel.name for c in layer.selection.stages]
    assert any(k.startswith("torch.chunk") or k == "torch.delta_product" for k in layer.ran), layer.ran


def test_the_chunkwise_cells_cover_every_chunkwise_form():
    forms = {type(f) for n in CELLS for f in _chunkwise(n)}
    assert forms == set(CHUNKWISE)
    diag = [f for n in CELLS for f in _chunkwise(n) if isinstance(f, L.ChunkDiag)]
    assert any(f.signed for f in diag) and any(f.transposed for f in diag)


def test_the_reference_exemption_is_the_transition_not_everything():
    """The exemption above is narrow: a NaN value (v) leaves every earlier gradient of the
    per-step loop finite, while a NaN key of the delta rule (it enters the transition
    I - beta k k^T) does not -- so the chunkwise forms are held to the same line."""
    assert _reference_finite("deltanet", "v", "nan") == frozenset({"q", "k", "v", "beta"})
    assert _reference_finite("gla", "k", "nan") == frozenset({"q", "k", "v", "gk"})
    assert "k" not in _reference_finite("deltanet", "k", "nan")


TRITON_OWN = [n for n in CELLS if any(not c.kernel.borrowed for c in recdsl.load(n).plan().selections["triton"].stages
                                      if not isinstance(c.form, L.Vectorised))]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRITON_OWN)
def test_triton_own_kernels_leave_the_past_alone(name):
    """The cells whose chunkwise stage triton runs on its own (scan) kernel, in Triton's
    interpreter; the borrowed forms run the torch code tested above."""
    _check(name, "triton", P_TRITON, values=("nan",))
