"""The module API: parameters and their initialisers, shapes, errors, state handling."""
import math

import pytest
import torch

import recdsl
from recdsl import RecError
from helpers import ROOT

MAMBA = recdsl.load("mamba")


def test_params_registered_with_rec_names_and_initialisers():
    torch.manual_seed(0)
    layer = recdsl.load("lstm")(D=6, H=5)
    names = dict(layer.named_parameters())
    assert set(names) == {"W_ih", "W_hh", "b_ih", "b_hh"}
    assert names["W_ih"].shape == (20, 6) and names["b_hh"].shape == (20,)
    bound = 1 / math.sqrt(5)
    assert names["W_hh"].abs().max() <= bound and names["W_hh"].abs().max() > bound / 2


def test_value_initialiser_broadcasts():
    layer = MAMBA(D=3, N=4)
    expected = torch.log(torch.arange(1, 5, dtype=torch.float32)).expand(3, 4)
    assert torch.allclose(layer.A_log, expected)
    assert torch.equal(layer.Dskip, torch.ones(3))


def test_normal_initialiser_statistics():
    torch.manual_seed(0)
    layer = recdsl.load("mingru")(D=400, H=300)
    w = layer.W_z.detach()
    assert abs(w.mean()) < 0.005 and abs(w.std() - 1 / math.sqrt(400)) < 0.002


def test_heads_give_params_a_leading_axis():
    layer = recdsl.load("slstm")(D=4, H=3, NH=2)
    assert layer.heads == 2 and layer.W.shape == (2, 12, 4)
    x = torch.randn(2, 5, 2, 4)
    y, st = layer(x=x)
    assert y.shape == (2, 5, 2, 3) and st["c"].shape == (2, 2, 3)


def test_heads_keyword_for_a_cell_without_heads_clause():
    layer = recdsl.load("gla")(K=4, V=3, heads=2)
    q = torch.randn(1, 3, 2, 4)
    o, st = layer(q=q, k=q, v=torch.randn(1, 3, 2, 3), gk=-torch.rand(1, 3, 2, 4))
    assert o.shape == (1, 3, 2, 3) and st["S"].shape == (1, 2, 4, 3)


def test_learned_initial_state_receives_gradient():
    spec = recdsl.load("""
cell Learned(H):
    input x[H]
    param h0[H] ~ normal(0, 1)
    state h[H] = h0
    h' = 0.5 * h + x
    output h'
""")
    layer = spec(H=3)
    y, _ = layer(x=torch.zeros(2, 4, 3))
    assert torch.allclose(y[:, 0], 0.5 * layer.h0.detach().expand(2, 3))
    y.sum().backward()
    assert layer.h0.grad is not None and layer.h0.grad.abs().sum() > 0


@pytest.mark.parametrize("call, match", [
    (lambda l: l(x=torch.randn(2, 3, 5)), "input x has shape"),
    (lambda l: l(xs=torch.randn(2, 3, 4)), "did you mean x"),
    (lambda l: l(), "missing input x"),
    (lambda l: l(x=torch.randn(2, 3, 4), state={"h": torch.zeros(2, 4)}), "lacks c"),
    (lambda l: l(x=torch.randn(2, 3, 4), state={"h": torch.zeros(2, 4), "c": torch.zeros(3, 4)}), "state c has shape"),
    (lambda l: l(x=torch.randn(2, 4, 4), cu_seqlens=[0, 2, 4]), "batch of one"),
    (lambda l: l(x=torch.randn(1, 4, 4), cu_seqlens=[0, 3, 2, 4]), "cu_seqlens must rise"),
    (lambda l: l(x=torch.randint(0, 3, (2, 3, 4))), "floating point"),
])
def test_bad_calls_raise_rec_errors(call, match):
    layer = recdsl.load("lstm")(D=4, H=4)
    with pytest.raises(RecError, match=match):
        call(layer)


@pytest.mark.parametrize("kwargs, match", [
    ({"D": 4}, "needs a value for dimension H"),
    ({"D": 4, "H": 0}, "positive integer"),
    ({"D": 4, "H": 4, "Q": 1}, "no dimension or hyper-parameter Q"),
    ({"D": 4, "H": 4, "backend": "cuda"}, "unknown backend"),
])
def test_bad_instantiation(kwargs, match):
    with pytest.raises(RecError, match=match):
        recdsl.load("lstm")(**kwargs)


def test_state_continuation_equals_one_run():
    torch.manual_seed(1)
    layer = recdsl.load("mlstm")(K=3, V=2).double()
    xs = {"q": torch.randn(2, 8, 3), "k": torch.randn(2, 8, 3), "v": torch.randn(2, 8, 2),
          "ig": torch.randn(2, 8), "fg": torch.randn(2, 8)}
    xs = {k: v.double() for k, v in xs.items()}
    full, st_full = layer(**xs)
    a, st = layer(**{k: v[:, :5] for k, v in xs.items()})
    b, st = layer(**{k: v[:, 5:] for k, v in xs.items()}, state=st)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-12)
    assert all(torch.allclose(st[k], st_full[k], atol=1e-12) for k in st)


def test_hyper_parameter_override_changes_the_step():
    spec = recdsl.load("gla")
    q = torch.randn(1, 2, 4)
    args = dict(q=q, k=q, v=torch.randn(1, 2, 3), gk=-torch.rand(1, 2, 4))
    o1, _ = spec(K=4, V=3)(**args)
    o2, _ = spec(K=4, V=3, scale=1.0)(**args)
    assert torch.allclose(o1 * 2, o2)  # default scale K**-0.5 = 0.5


def test_plan_property_and_generated_code():
    layer = recdsl.load("mingru")(D=3, H=4)
    assert layer.backend_name == "torch"  # auto picks the fastest backend that runs the cell
    assert layer.plan.classes() == {"h": "diagonal affine"}
    assert "def forward(" in layer.generated and "mingru.rec:" in layer.generated
    ref = recdsl.load("mingru")(D=3, H=4, backend="reference")
    assert "def step(" in ref.generated


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_scalar_update_of_a_vector_state_broadcasts(backend):
    spec = recdsl.load("""
cell Reset(H):
    input x[H], r[]
    state h[H] = 0
    state c[H] = 1
    h' = sigmoid(r) * h + x
    c' = 2
    output y = h' + c'
""")
    assert spec.plan().classes() == {"h": "diagonal affine", "c": "hoisted"}
    layer = spec(H=3, backend=backend).double()
    y, st = layer(x=torch.zeros(2, 4, 3, dtype=torch.float64), r=torch.zeros(2, 4, dtype=torch.float64))
    assert y.shape == (2, 4, 3) and st["c"].shape == (2, 3) and torch.equal(st["c"], torch.full((2, 3), 2.0,
                                                                                                   dtype=torch.float64))


@pytest.mark.parametrize("name", ["reverse", "cu_seqlens"])
def test_inputs_cannot_shadow_forward_options(name):
    with pytest.raises(RecError, match="option of forward"):
        recdsl.load(f"cell X(H):\n    input {name}[H]\n    state h[H] = 0\n    h' = h + {name}\n    output h'\n")


def test_declarations_cannot_take_builtin_names():
    with pytest.raises(RecError, match="builtin function"):
        recdsl.load("cell X(H):\n    input exp[H]\n    state h[H] = 0\n    h' = h + exp\n    output h'\n")


def test_a_cell_needs_an_input():
    with pytest.raises(RecError, match="has no input"):
        recdsl.load("cell Clock(H):\n    state h[H] = 0\n    h' = h + 1\n    output h'\n")


def test_positional_inputs_are_refused_with_the_names_and_repr_shows_hyper_parameters():
    layer = recdsl.load(str(ROOT / "benchmarks" / "cells" / "yaad.rec"))(
        K=3, V=4, reverse=True)
    with pytest.raises(RecError) as e:
        layer(torch.randn(2, 3, 3))
    assert "by name" in e.value.message and "q=..., k=..., v=..., ga=..., gl=..." in e.value.hint
    assert repr(layer) == "RecModule(cell=Yaad, K=3, V=4, delta=1.0, backend=torch, reverse=True)"
