"""The runtime contract of the compiled module (LANGUAGE.md §7, recdsl/runtime.py) on
cells of tests/analysis/cells and the stdlib, backend="reference":

- `layer.step(...)` repeated T times equals `forward` (outputs and states);
- `reverse=True` equals running on time-flipped inputs and flipping the outputs back;
- `cu_seqlens` on a packed batch equals a loop over the sequences (outputs and final states);
- continuing from a returned state equals one long run;
- `torch.autograd.gradcheck` in float64 through inputs, initial states and params;
- bf16 / fp16 inputs give outputs of their dtype and fp32 states."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import recdsl

from .common import as_tuple, close, inputs_for, load, make, random_state

# name -> dims (small: 2-4); stdlib names and cells of tests/analysis/cells
CELLS = {
    "gru": dict(D=3, H=4),
    "gla": dict(K=3, V=2),
    "mlstm": dict(K=3, V=2),
    "lru": dict(D=3, N=2),
    "retnet": dict(K=3, V=2, NH=2),
    "ssd": dict(P=2, N=3, NH=2),
    "deltanet": dict(K=3, V=2),
    "aaren": dict(D=3, V=2),
    "rwkv6": dict(K=2, V=3, NH=2),
    "slstm": dict(D=3, H=2, NH=2),
}
NAMES = sorted(CELLS)
B, T = 2, 9


def _inputs(layer, B=B, T=T, seed=0):
    xs = inputs_for(layer, B, T, seed=seed)
    # keep gates in their usual ranges where the cell expects a log gate
    if "gk" in xs:
        xs["gk"] = torch.nn.functional.logsigmoid(xs["gk"] * 4) / 4
    if "beta" in xs:
        xs["beta"] = torch.sigmoid(xs["beta"])
    if "k" in xs and layer.spec.name == "DeltaNet":
        xs["k"] = torch.nn.functional.normalize(xs["k"], dim=-1)
    return xs


def _layer(name, **kw):
    return make(name, **CELLS[name], **kw)


def _same_state(got, want, tol=1e-10):
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], tol, what=f"state {k}")


def _same_outputs(got, want, tol=1e-10):
    got, want = as_tuple(got), as_tuple(want)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        close(a, b, tol, what=f"output {i}")


# ---------------------------------------------------------------------------- step

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("from_state", [False, True])
def test_step_repeated_equals_forward(name, from_state):
    layer = _layer(name)
    xs = _inputs(layer)
    st0 = random_state(layer, B) if from_state else None
    if name in ("aaren", "mlstm", "slstm") and from_state:  # a stabiliser m from a random draw is fine too,
        st0 = {k: v.abs() if k in ("den", "n") else v for k, v in st0.items()}  # but keep normalisers positive
    outs, st = layer(**xs, state=st0)
    s = st0
    steps = []
    for t in range(T):
        o, s = layer.step(**{n: x[:, t] for n, x in xs.items()}, state=s)
        steps.append(as_tuple(o))
    for i, full in enumerate(as_tuple(outs)):
        close(torch.stack([o[i] for o in steps], 1), full, 1e-10, what=f"{name} output {i}")
    _same_state(s, st)


def test_step_output_shapes_with_heads():
    layer = _layer("retnet")
    xs = _inputs(layer, T=1)
    o, s = layer.step(**{n: x[:, 0] for n, x in xs.items()})
    assert o.shape == (B, 2, 2)  # [B, heads, V]
    assert s["S"].shape == (B, 2, 3, 2)


# ---------------------------------------------------------------------------- reverse

def _flip_outs(outs):
    flipped = tuple(o.flip(1) for o in as_tuple(outs))
    return flipped if len(flipped) > 1 else flipped[0]


@pytest.mark.parametrize("name", NAMES)
def test_reverse_equals_flipped_inputs(name):
    layer = _layer(name)
    xs = _inputs(layer)
    outs_r, st_r = layer(**xs, reverse=True)
    outs_f, st_f = layer(**{n: x.flip(1) for n, x in xs.items()})
    _same_outputs(outs_r, _flip_outs(outs_f))
    _same_state(st_r, st_f)
    # and it is not the forward run (the test would pass vacuously on a symmetric input)
    outs, _ = layer(**xs)
    assert (as_tuple(outs)[0] - as_tuple(outs_r)[0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["gru", "gla", "mlstm"])
def test_reverse_as_a_module_default(name):
    fwd = _layer(name)
    rev = make(name, **CELLS[name], reverse=True)
    rev.load_state_dict(fwd.state_dict())
    xs = _inputs(fwd)
    _same_outputs(rev(**xs)[0], fwd(**xs, reverse=True)[0])
    _same_outputs(rev(**xs, reverse=False)[0], fwd(**xs)[0])


# ---------------------------------------------------------------------------- cu_seqlens

def _pack(xs_list):
    return {n: torch.cat([xs[n] for xs in xs_list], 1) for n in xs_list[0]}


def _varlen_case(layer, lens, reverse=False, with_state=False):
    seqs = [_inputs(layer, B=1, T=L, seed=10 + i) for i, L in enumerate(lens)]
    packed = _pack(seqs)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    st0 = random_state(layer, len(lens), seed=3) if with_state else None
    if st0 is not None and layer.spec.name in ("Aaren", "MLSTM", "SLSTM"):
        st0 = {k: v.abs() if k in ("den", "n") else v for k, v in st0.items()}
    outs, finals = layer(**packed, cu_seqlens=cu, reverse=reverse, state=st0)
    want_outs, want_states = [], []
    for i, xs in enumerate(seqs):
        s = None if st0 is None else {k: v[i:i + 1] for k, v in st0.items()}
        if lens[i] == 0:
            want_states.append(s if s is not None else layer.initial_state(1, torch.float64))
            continue
        o, s = layer(**xs, reverse=reverse, state=s)
        want_outs.append(as_tuple(o))
        want_states.append(s)
    for j, got in enumerate(as_tuple(outs)):
        close(got, torch.cat([o[j] for o in want_outs], 1), 1e-10, what=f"packed output {j}")
    for k in finals:
        close(finals[k], torch.cat([s[k] for s in want_states], 0), 1e-10, what=f"final state {k}")


@pytest.mark.parametrize("name", NAMES)
def test_cu_seqlens_equals_a_loop_over_sequences(name):
    _varlen_case(_layer(name), [3, 5, 1, 3])


@pytest.mark.parametrize("name", ["gru", "gla", "mlstm", "deltanet"])
def test_cu_seqlens_with_initial_states_and_reverse(name):
    layer = _layer(name)
    _varlen_case(layer, [4, 2, 5], with_state=True)
    _varlen_case(layer, [4, 2, 5], reverse=True)
    _varlen_case(layer, [4, 2, 5], reverse=True, with_state=True)


def test_cu_seqlens_with_an_empty_sequence_keeps_its_initial_state():
    layer = _layer("gla")
    _varlen_case(layer, [3, 0, 4], with_state=True)
    _varlen_case(layer, [0, 5], with_state=False)


def test_cu_seqlens_sequences_do_not_leak_into_each_other():
    layer = _layer("gru")
    seqs = [_inputs(layer, B=1, T=L, seed=20 + i) for i, L in enumerate([4, 4])]
    cu = torch.tensor([0, 4, 8])
    o, st = layer(**_pack(seqs), cu_seqlens=cu)
    o_joined, _ = layer(**_pack(seqs))  # one sequence of 8
    close(o[:, :4], o_joined[:, :4], 1e-10, what="first sequence")
    assert (o[:, 4:] - o_joined[:, 4:]).abs().max() > 1e-6  # the second restarts from zero


# ---------------------------------------------------------------------------- continuing

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", [1, 4])
def test_continuing_from_a_state_equals_one_long_run(name, split):
    layer = _layer(name)
    xs = _inputs(layer)
    full, st_full = layer(**xs)
    a, st_a = layer(**{n: x[:, :split] for n, x in xs.items()})
    b, st_b = layer(**{n: x[:, split:] for n, x in xs.items()}, state=st_a)
    for i, f in enumerate(as_tuple(full)):
        close(torch.cat([as_tuple(a)[i], as_tuple(b)[i]], 1), f, 1e-10, what=f"{name} output {i}")
    _same_state(st_b, st_full)


def test_continuing_in_reverse_equals_one_long_reverse_run():
    layer = _layer("gla")
    xs = _inputs(layer)
    full, st_full = layer(**xs, reverse=True)
    late, st = layer(**{n: x[:, 5:] for n, x in xs.items()}, reverse=True)
    early, st = layer(**{n: x[:, :5] for n, x in xs.items()}, reverse=True, state=st)
    close(torch.cat([early, late], 1), full, 1e-10, what="reverse output")
    _same_state(st, st_full)


# ---------------------------------------------------------------------------- gradients

GRAD_CELLS = {
    "gru": dict(D=2, H=3),
    "gla": dict(K=2, V=3),
    "mlstm": dict(K=2, V=3),
    "lru": dict(D=2, N=3),
    "deltanet": dict(K=2, V=2),
}


@pytest.mark.parametrize("name", sorted(GRAD_CELLS))
def test_gradcheck_inputs_states_and_params(name):
    layer = make(name, **GRAD_CELLS[name])
    Bg, Tg = 2, 3
    xs = _inputs(layer, B=Bg, T=Tg, seed=5)
    st0 = random_state(layer, Bg, seed=6, scale=0.3)
    if name == "mlstm":  # n is a normaliser: keep it away from the max(|.|, exp(-m)) kink
        st0["n"] = st0["n"].abs() + 0.5
    pnames = [n for n, _ in layer.named_parameters()]
    xnames, snames = list(xs), list(st0)
    leaves = [xs[n] for n in xnames] + [st0[n] for n in snames] + [getattr(layer, n).detach() for n in pnames]
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    assert sorted(pnames) == sorted(layer.spec.cell.params)  # gla, mlstm, deltanet have none

    def f(*args):
        xi = dict(zip(xnames, args[:len(xnames)]))
        si = dict(zip(snames, args[len(xnames):len(xnames) + len(snames)]))
        pi = dict(zip(pnames, args[len(xnames) + len(snames):]))
        outs, st = functional_call(layer, pi, args=(), kwargs=dict(xi, state=si))
        return as_tuple(outs) + tuple(st[k] for k in snames)

    # every leaf reaches some result (else gradcheck would be vacuous for it)
    outs = f(*leaves)
    grads = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(outs)), leaves, allow_unused=True)
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), \
        [n for n, gr in zip(xnames + snames + pnames, grads) if gr is None or gr.abs().sum() == 0]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_reach_a_learned_initial_state():
    src = """
cell Learned(H):
    input x[H], a[H]
    param h0[H] ~ normal(0, 1)
    state h[H] = h0
    h' = sigmoid(a) * h + x
    output h'
"""
    layer = recdsl.load(src)(H=3, backend="reference").double()
    x, a = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    y, _ = layer(x=x, a=a)
    y.sum().backward()
    want = torch.sigmoid(a).cumprod(1).sum(1).sum(0)  # d sum_t h_t / d h0
    close(layer.h0.grad, want, 1e-10, what="grad h0")


# ---------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("name", ["gru", "gla", "mlstm", "lru", "retnet"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_outputs_and_fp32_states(name, dtype):
    torch.manual_seed(0)
    layer = load(name)(backend="reference", **CELLS[name])  # fp32 params
    xs = {n: x.to(dtype) for n, x in _inputs(layer).items()}
    outs, st = layer(**xs)
    for o in as_tuple(outs):
        assert o.dtype == dtype
    for k, v in st.items():
        assert v.dtype == torch.float32, k
    # the computation itself ran in fp32: same as an fp32 run on the same (rounded) inputs
    outs32, st32 = layer(**{n: x.float() for n, x in xs.items()})
    for o, o32 in zip(as_tuple(outs), as_tuple(outs32)):
        close(o.float(), o32.to(dtype).float(), 0.0, what="half output vs fp32 run rounded")
    for k in st:
        close(st[k], st32[k], 0.0, what=f"state {k}")
    # a step too
    o1, s1 = layer.step(**{n: x[:, 0] for n, x in xs.items()})
    assert all(o.dtype == dtype for o in as_tuple(o1))
    assert all(v.dtype == torch.float32 for v in s1.values())


# ---------------------------------------------------------------------------- output shapes

STATE_FREE_OUTPUTS = """
cell StateFreeOutputs(H):
    input x[H]
    param b[H] ~ normal(0, 1)
    state h[H] = 0
    h' = 0.5 * h + x
    output y = h'
    output c = b * 2
    output s = sum(x)
"""


def test_outputs_that_read_no_state_have_the_declared_shape_in_step():
    layer = recdsl.load(STATE_FREE_OUTPUTS)(H=3, backend="reference").double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    (y, c, s), _ = layer.step(x=x[:, 0])
    assert (y.shape, c.shape, s.shape) == ((2, 3), (2, 3), (2,))
    close(c, (2 * layer.b.detach()).expand(2, 3), 0.0, what="c")


def test_outputs_that_read_only_params_have_batch_size_b_in_forward():
    layer = recdsl.load(STATE_FREE_OUTPUTS)(H=3, backend="reference").double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    (y, c, s), _ = layer(x=x)
    assert y.shape == (2, 4, 3) and s.shape == (2, 4)
    assert c.shape == (2, 4, 3)
