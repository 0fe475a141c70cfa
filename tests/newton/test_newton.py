"""The newton backend (backends/newton): parallel Newton for nonlinear stages whose Jacobian
w.r.t. their own states is diagonal or k x k per element, against `reference` in float64
(outputs, final states, gradients of inputs, params and initial states); the selection per
stage (typed: which kernel ran); the refusal of a dense Jacobian; options and the error on
divergence."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.errors import RecError
from recdsl.lowering import NewtonSolve, Rejection, SequentialLoop

# Cells the stdlib does not have: a tanh cell with a vector recurrent weight, a gated one
# (a sigmoid gate on the state and on the input), and a two-state cell with elementwise coupling.
TANH_CELL = """
cell TanhDiag(D):
    input x[D]
    param w[D] ~ uniform(-0.9, 0.9)
    state h[D] = 0
    h' = tanh(w * h + x)
    output h'
"""
GATED_CELL = """
cell GatedDiag(D):
    input x[D]
    input z[D]
    param a[D] ~ uniform(-1.0, 1.0)
    param c[D] ~ uniform(-0.5, 0.5)
    state h[D] = 0
    g = sigmoid(z + a * h)
    h' = g * h + (1 - g) * softplus(x - c * h) - 0.5
    output y = h' * x
"""
COUPLED_CELL = """
cell Coupled(D):
    input x[D]
    param a[D] ~ uniform(-0.8, 0.8)
    param b[D] ~ uniform(-0.8, 0.8)
    state u[D] = 0
    state v[D] = 0
    u' = tanh(a * u + 0.3 * v + x)
    v' = 0.5 * v + sigmoid(b * u) * silu(x)
    output o = u' + v'
"""
# every derivative rule of the forward-mode pass at least once (exp, softplus, silu, gelu, elu,
# abs, where, comparisons, max, logaddexp, sqrt, sin, cos, division, pow, log1p)
FUNCS_CELL = """
cell Funcs(D):
    input x[D]
    param w[D] ~ uniform(0.1, 0.5)
    state h[D] = 0.5
    p = exp(-softplus(w * h)) + 0.1 * silu(h) + 0.05 * gelu(h) + 0.05 * elu(h) - 0.01 * abs(h)
    q = where(h > 0, 0.2 * h, 0.1 * h) + 0.1 * max(h, x) + 0.1 * logaddexp(h, x) + 0.1 * sqrt(1 + h * h)
    h' = 0.5 * p / (1 + 0.1 * sin(h) * cos(h)) + 0.3 * q + 0.1 * (1 + h * h) ** 0.5 + 0.1 * log1p(h * h) + x
    output h'
"""
# outputs that read the gate of the previous state (a shift in time), and a matrix state
SHIFT_CELL = """
cell Shift(D):
    input x[D]
    input z[D]
    param a[D] ~ uniform(-1.0, 1.0)
    state h[D] = 0
    g = sigmoid(z + a * h)
    h' = g * h + (1 - g) * tanh(x)
    output y = g
    output o = h' * g
"""
MATRIX_CELL = """
cell Mat(K, V):
    input k[K]
    input v[V]
    param w[K, V] ~ uniform(-0.9, 0.9)
    state S[K, V] = 0
    S' = tanh(w * S + outer(k, v))
    output o = S'
"""
CHAIN_CELL = """
cell Chain(D):
    input x[D]
    param w[D] ~ uniform(-0.9, 0.9)
    param v[D] ~ uniform(-0.9, 0.9)
    state h[D] = 0
    state s[D] = 0
    h' = tanh(w * h + x)
    s' = sigmoid(v * s + h')
    output o = s'
"""
DIVERGENT = """
cell Square(D):
    input x[D]
    state h[D] = 0
    h' = 3 * h * h + x
    output h'
"""


def _pair(spec, dims, heads=None, seed=0):
    torch.manual_seed(seed)
    ref = spec(backend="reference", heads=heads, **dims).double()
    nw = spec(backend="newton", heads=heads, **dims).double()
    nw.load_state_dict(ref.state_dict())
    return ref, nw


def _inputs(spec, layer, B, T, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    return {n: (torch.randn((B, T) + heads + layer.ir.concrete(v.shape), generator=g, dtype=torch.float64) * scale)
            .requires_grad_() for n, v in spec.cell.inputs.items()}


def _tuple(o):
    return o if isinstance(o, tuple) else (o,)


def _agree(spec, dims, B=2, T=23, heads=None, seed=0, tol=1e-6, init_state=False, **call):
    """Max errors of outputs, final states and gradients (inputs, params, initial states)."""
    ref, nw = _pair(spec, dims, heads, seed)
    xs = _inputs(spec, ref, B, T, seed)
    n_seq = len(call["cu_seqlens"]) - 1 if "cu_seqlens" in call else B
    s0 = None
    if init_state:
        g = torch.Generator().manual_seed(seed + 7)
        s0 = {k: (0.5 * torch.randn(v.shape, generator=g, dtype=torch.float64)).requires_grad_()
              for k, v in ref.initial_state(n_seq, torch.float64).items()}
    errs = {}
    grads = []
    for layer in (ref, nw):
        o, s = layer(**xs, state=s0, **call)
        o = _tuple(o)
        w = [torch.randn(a.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)) for a in o]
        loss = sum((a * c).sum() for a, c in zip(o, w)) + sum((v * v).sum() for v in s.values())
        wrt = list(xs.values()) + list(layer.parameters()) + (list(s0.values()) if s0 else [])
        grads.append((o, s, torch.autograd.grad(loss, wrt, allow_unused=True)))
    (o1, s1, g1), (o2, s2, g2) = grads
    errs["out"] = max(float((a - b).detach().abs().max()) for a, b in zip(o1, o2))
    errs["state"] = max(float((s1[k] - s2[k]).detach().abs().max()) for k in s1)
    errs["grad"] = max(float((a - b).abs().max()) for a, b in zip(g1, g2) if a is not None and b is not None)
    assert all((a is None) == (b is None) for a, b in zip(g1, g2))
    assert max(errs.values()) < tol, errs
    assert nw.ran and all(k == "newton.solve" for k in nw.ran if k.startswith("newton")), nw.ran
    return nw


@pytest.mark.parametrize("name", ["indrnn", "paragru", "paralstm"])
def test_stdlib_diagonal_and_block_cells(name):
    spec = recdsl.load(name)
    nw = _agree(spec, {"D": 5, "H": 6}, init_state=True)
    assert nw.ran == ["newton.solve"]
    choice = nw.selection.choice(0)
    assert isinstance(choice.form, NewtonSolve) and choice.kernel.name == "newton.solve"
    assert choice.form.block == (2 if name == "paralstm" else 1)
    rep = nw.last_solve[0]
    assert rep.iterations >= 1 and rep.residual <= rep.tol


@pytest.mark.parametrize("text", [TANH_CELL, GATED_CELL, COUPLED_CELL], ids=["tanh", "gated", "coupled"])
def test_unseen_cells(text):
    spec = recdsl.load(text)
    nw = _agree(spec, {"D": 7}, init_state=True)
    assert nw.ran == ["newton.solve"]
    assert nw.selection.choice(0).form.block == len(spec.cell.states)


@pytest.mark.parametrize("text", [FUNCS_CELL, SHIFT_CELL, MATRIX_CELL, CHAIN_CELL],
                         ids=["funcs", "shift", "matrix", "chain"])
def test_more_unseen_cells(text):
    spec = recdsl.load(text)
    dims = {"K": 3, "V": 4} if "Mat" in text else {"D": 5}
    nw = _agree(spec, dims, T=40, init_state=True)
    assert nw.ran == ["newton.solve"] * len(spec.cell.states)   # Chain: two stages, one Newton solve each
    _agree(spec, dims, T=1, init_state=True)


@pytest.mark.parametrize("text", [TANH_CELL, GATED_CELL], ids=["tanh", "gated"])
def test_long_sequence(text):
    spec = recdsl.load(text)
    nw = _agree(spec, {"D": 8}, B=2, T=4096)
    # the tanh cell is contractive (|w| < 1): a few iterations; the gated one has stretches with
    # |dh'/dh| up to ~1.3, where the linearised steps grow and Newton needs tens of iterations
    assert nw.last_solve[0].iterations < (15 if "Tanh" in text else 100)


@pytest.mark.parametrize("mode", ["reverse", "cu_seqlens", "heads"])
def test_modes(mode):
    spec = recdsl.load(GATED_CELL)
    if mode == "reverse":
        _agree(spec, {"D": 5}, init_state=True, reverse=True)
    elif mode == "cu_seqlens":
        _agree(spec, {"D": 5}, B=1, T=30, init_state=True, cu_seqlens=torch.tensor([0, 7, 7, 19, 30]))
    else:
        _agree(spec, {"D": 5}, heads=3, init_state=True)


def test_linear_stages_borrow_torch_kernels():
    """A cell with a linear stage before the Newton one: each stage says what runs it."""
    text = """
cell Mixed(D):
    input x[D]
    param w[D] ~ uniform(-0.9, 0.9)
    state s[D] = 0
    state h[D] = 0
    s' = 0.9 * s + x
    h' = tanh(w * h + s')
    output y = h'
"""
    nw = _agree(recdsl.load(text), {"D": 4}, init_state=True)
    assert nw.ran == ["torch.element_scan", "newton.solve"]
    assert [c.kernel.borrowed for c in nw.selection.stages] == ["torch", None]


def test_dense_jacobian_falls_back_with_reason():
    nw = recdsl.load("lstm")(backend="newton", D=4, H=5)
    choice = nw.selection.choice(0)
    assert isinstance(choice.form, SequentialLoop) and choice.kernel.name == "torch.c_loop"
    assert choice.kernel.borrowed == "torch"
    why = [p for p in choice.passed if p.title == NewtonSolve.title]
    assert len(why) == 1 and "dense Jacobian" in why[0].reason
    assert any(isinstance(c, Rejection) for c in nw.plan.candidates[0])
    x = torch.randn(2, 9, 4)
    nw(x=x)
    assert nw.ran == ["torch.c_loop"] and nw.last_solve == []
    # the exact backends never select the Newton form
    assert nw.plan.selections["torch"].choice(0).kernel.name == "torch.c_loop"


def test_divergence_raises_named_error():
    layer = recdsl.load(DIVERGENT)(backend="newton", D=3)
    x = torch.full((1, 40, 3), 5.0, dtype=torch.float64)
    with pytest.raises(RecError, match=r"cell Square, stage 0 \(h\): the residual is not finite .* at iteration \d+"):
        layer(x=x)
    layer.newton_options.damping = "none"
    with pytest.raises(RecError, match=r"cell Square, stage 0 \(h\): the residual is not finite"):
        layer(x=x)
    # bounded but not converged in time: the same error names max_iters
    x = torch.full((1, 40, 3), 0.05, dtype=torch.float64)
    layer.newton_options.max_iters = 2
    with pytest.raises(RecError, match=r"cell Square.*max_iters=2"):
        layer(x=x)
    layer.newton_options.max_iters = 100
    layer(x=x)   # small inputs: contractive around the solution, converges
    assert layer.last_solve[0].residual < 1e-9


def test_options_and_report():
    spec = recdsl.load(TANH_CELL)
    ref, nw = _pair(spec, {"D": 6})
    x = torch.randn(2, 64, 6, dtype=torch.float64)
    nw.newton_options.tol = 1e-3
    o_loose, _ = nw(x=x)
    loose = nw.last_solve[0]
    nw.newton_options.tol = 1e-13
    o_tight, _ = nw(x=x)
    tight = nw.last_solve[0]
    assert tight.iterations > loose.iterations and tight.residual <= 1e-13 < 1e-3 >= loose.residual
    assert float((o_tight - ref(x=x)[0]).detach().abs().max()) < 1e-10
    nw.newton_options.max_iters = 1
    with pytest.raises(RecError, match="max_iters=1"):
        nw(x=x)
    nw.newton_options.max_iters, nw.newton_options.damping = 100, 0.5   # fixed relaxation: still converges
    nw(x=x)
    assert nw.last_solve[0].iterations > tight.iterations
    nw.newton_options.damping = "sometimes"
    with pytest.raises(RecError, match="damping"):
        nw(x=x)
    assert recdsl.load(TANH_CELL)(backend="torch", D=3).newton_options is None


def test_float32_and_no_grad():
    spec = recdsl.load("paragru")
    torch.manual_seed(0)
    ref = spec(backend="reference", D=8, H=16)
    nw = spec(backend="newton", D=8, H=16)
    nw.load_state_dict(ref.state_dict())
    x = torch.randn(3, 200, 8)
    with torch.no_grad():
        o1, _ = ref(x=x)
        o2, _ = nw(x=x)
    assert float((o1 - o2).abs().max()) < 1e-4


def test_registry_entries_name_emitter_methods():
    """Every newton registry entry: the backend's own emitter method, or a torch kernel
    borrowed explicitly (the same kernel name and emitter method as on torch)."""
    from recdsl.backends.newton.codegen import NewtonEmitter
    from recdsl.backends.newton.kernels import REGISTRY
    from recdsl.backends.torch.kernels import REGISTRY as TORCH
    own = [k for k in REGISTRY.kernels if k.borrowed is None]
    assert [(k.form, k.name) for k in own] == [(NewtonSolve, "newton.solve")]
    assert "_stage_newton" in NewtonEmitter.__dict__
    torch_names = {k.name for k in TORCH.kernels}
    for k in REGISTRY.kernels:
        assert callable(getattr(NewtonEmitter, k.emit, None)), k.name
        if k.borrowed:
            assert k.borrowed == "torch" and k.name in torch_names


def test_generated_jacobian_is_forward_mode_from_the_ir():
    """The Jacobian function is generated text: one unit tangent per state and the ops'
    derivative rules (no autograd call in it)."""
    layer = recdsl.load(COUPLED_CELL)(backend="newton", D=3)
    src = layer.generated
    assert "def jac" in src and src.count("torch.ones_like(") == 2
    assert "autograd" not in src and "jvp" not in src


def test_inspect_stage_newton():
    from click.testing import CliRunner

    from recdsl.cli import main
    r = CliRunner().invoke(main, ["inspect", "lstm", "--stage", "newton"])
    assert r.exit_code == 0, r.output
    assert "passed over: parallel Newton: dense Jacobian" in r.output and "torch.c_loop" in r.output
    r = CliRunner().invoke(main, ["inspect", "indrnn", "--stage", "newton"])
    assert r.exit_code == 0 and "-> newton.solve" in r.output and "def jac" in r.output
