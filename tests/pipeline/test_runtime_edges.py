"""Runtime edges a user hits by accident get one clear RecError, the same on every backend;
and a decay-only update (no input term) runs on every backend like the reference."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import recdsl
from helpers import as_tuple, random_inputs
from recdsl.errors import RecError
from recdsl.lowering import ElementScan

BACKENDS = ("reference", "torch", "triton")


def _layer(backend, name="gla"):
    spec = recdsl.load(name)
    return spec, spec(backend=backend, **spec.analysis_dims())


def _inputs(spec, layer, B, T):
    return random_inputs(spec, layer, B, T, torch.float32)


EDGES = {
    "state is not a tensor": lambda spec, m: m(**_inputs(spec, m, 2, 3), state={s: [[1.0]] for s in spec.cell.states}),
    "float cu_seqlens tensor": lambda spec, m: m(**_inputs(spec, m, 1, 6), cu_seqlens=torch.tensor([0.0, 2.5, 6.0])),
    "float in a cu_seqlens list": lambda spec, m: m(**_inputs(spec, m, 1, 6), cu_seqlens=[0, 2.0, 6]),
    "2-D cu_seqlens": lambda spec, m: m(**_inputs(spec, m, 1, 6), cu_seqlens=torch.tensor([[0, 6]])),
    "no time steps with cu_seqlens": lambda spec, m: m(**_inputs(spec, m, 1, 0), cu_seqlens=[0, 0]),
    "empty batch": lambda spec, m: m(**_inputs(spec, m, 0, 4)),
    "empty batch in step": lambda spec, m: m.step(**{k: v[:, 0] for k, v in _inputs(spec, m, 0, 1).items()}),
    "reverse as a string": lambda spec, m: m(**_inputs(spec, m, 1, 4), reverse="no"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mamba", "lstm"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_runtime_edge_is_a_rec_error(edge, cell, backend):
    spec, layer = _layer(backend, cell)
    with pytest.raises(RecError):
        EDGES[edge](spec, layer)


def test_reverse_option_of_the_constructor_is_a_flag():
    with pytest.raises(RecError):
        recdsl.load("gla")(K=4, V=4, reverse="no")


@pytest.mark.parametrize("cu", [[0, 2, 6], (0, 2, 6), np.array([0, 2, 6]), torch.tensor([0, 2, 6], dtype=torch.int64),
                                [np.int64(0), np.int64(2), np.int64(6)]])
def test_integer_cu_seqlens_in_every_spelling(cu):
    spec, layer = _layer("torch")
    xs = _inputs(spec, layer, 1, 6)
    out, state = layer(**xs, cu_seqlens=cu)
    ref, ref_state = layer(**xs, cu_seqlens=[0, 2, 6])
    assert torch.equal(as_tuple(out)[0], as_tuple(ref)[0])


DECAY_ONLY = """cell decay_only(K, V):
    input a[K]
    input q[K]
    state S[K, V] = 1.0
    S' = sigmoid(a)[:, None] * S
    output o = q @ S'
    output m = S'
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["plain", "reverse", "cu_seqlens", "heads", "initial state"])
def test_decay_only_update_matches_reference(backend, mode):
    """S' = sigmoid(a)[:, None] * S: an element scan with no input term (b absent)."""
    spec = recdsl.load(DECAY_ONLY)
    heads = 2 if mode == "heads" else None
    torch.manual_seed(0)
    ref = spec(backend="reference", heads=heads, K=3, V=2).double()
    other = spec(backend=backend, heads=heads, K=3, V=2).double()
    B, T = (1, 7) if mode == "cu_seqlens" else (2, 5)
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, torch.float64).items()}
    kw = {"reverse": True} if mode == "reverse" else {"cu_seqlens": [0, 3, 7]} if mode == "cu_seqlens" else {}
    if mode == "initial state":
        kw["state"] = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in ref.initial_state(B, torch.float64).items()}
    o1, s1 = ref(**xs, **kw)
    o2, s2 = other(**xs, **kw)
    (choice,) = other.selection.stages
    assert isinstance(choice.form, ElementScan) and choice.form.b is None
    assert other.ran == [c.kernel.name for c in other.selection.stages]
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1["S"], s2["S"])
    g1 = torch.autograd.grad(sum(o.sum() for o in o1), list(xs.values()))
    g2 = torch.autograd.grad(sum(o.sum() for o in o2), list(xs.values()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_triton_interpret_in_the_environment_is_explained_or_respected(tmp_path):
    """`TRITON_INTERPRET=1 recdsl inspect --stage ttir` compiles (the variable is dropped for an
    ahead-of-time compile and said so), and with triton already imported interpreted the
    error is a RecError with a hint, never an internal error."""
    env = dict(os.environ, TRITON_INTERPRET="1", RECDSL_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "recdsl", "inspect", "gla", "--stage", "ttir"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "TRITON_INTERPRET ignored" in done.stderr and "tt.func" in done.stdout
    # nothing compiled yet (ours or triton's cache): the compile really runs
    env.update(RECDSL_CACHE=str(tmp_path / "fresh"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    done = subprocess.run([sys.executable, "-c",
                           "import triton, sys\nfrom recdsl.cli import main\n"
                           "sys.argv = ['recdsl', 'inspect', 'gla', '--stage', 'ttir']\nmain()"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "internal error" not in done.stderr + done.stdout
    assert "TRITON_INTERPRET" in done.stderr + done.stdout


CONSTANT_OUTPUT = """cell constant_output(D):
    input x[D]
    state h[D]
    h' = 0.5 * h + x
    output y = h'
    output 7
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_output_has_the_full_shape(backend):
    """`output 7` (found by the end-to-end mutant fuzz): a Python number in the generated step."""
    layer = recdsl.load(CONSTANT_OUTPUT)(backend=backend, D=3)
    x = torch.randn(2, 4, 3)
    (_, seven), _ = layer(x=x)
    assert torch.equal(seven, torch.full((2, 4), 7.0))
    (_, seven_now), _ = layer.step(x=x[:, 0])
    assert torch.equal(seven_now, torch.full((2,), 7.0))


@pytest.mark.parametrize("cell, kw", [("gla", dict(K=4, V=4, heads=10**20)), ("gla", dict(K=4, V=4, heads=0)),
                                      ("gla", dict(K=4, V=4, heads=True)), ("lstm", dict(D=64, H=64, heads=2**20))])
def test_absurd_heads_are_refused(cell, kw):
    with pytest.raises(RecError) as e:
        recdsl.load(cell)(**kw)
    if cell == "lstm":   # too many elements: located at the param
        assert e.value.span is not None and e.value.span.line == 5


FUNCTION_OF_A_CONSTANT = """cell function_of_a_constant(D):
    input x[D]
    state h[D]
    th = exp(0)
    h' = 0.5 * cos(th) * h + sin(th) * x + tanh(2.0)
    output y = h'
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_function_of_a_bare_constant(backend):
    """cos(exp(0)) (found by the 3,000-mutant fuzz): the constant reaches torch.cos as a tensor."""
    spec = recdsl.load(FUNCTION_OF_A_CONSTANT)
    torch.manual_seed(0)
    ref, other = spec(backend="reference", D=3), spec(backend=backend, D=3)
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(other(x=x)[0], ref(x=x)[0])
    torch.testing.assert_close(other.step(x=x[:, 0])[0], ref.step(x=x[:, 0])[0])
