"""Cells the analysis was not developed on (tests/analysis/cells/*.rec, and a few inline
counterexamples), each checked three ways:

1. it loads and checks (and the analysis' own verifications pass);
2. it is classified as an expert would: the class of every state and the detail that
   matters (decay kind, rank, block size, Jacobian structure, readout kind, lowering);
3. on backend="reference" in float64 it matches an independent implementation to 1e-6,
   outputs AND final states, with parameters copied across.

The oracles are torch.nn.GRU / torch.nn.RNN, closed (parallel) forms, or hand loops
written from the papers' equations, never from the .rec text; fla-core's naive kernels are
extra oracles where it is installed."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import recdsl.lowering as L
import recdsl
from recdsl import plan as P

from .common import CELLS, close, fla_naive, inputs_for, load, make

B, T = 2, 7
ALL_CELLS = sorted(p.stem for p in CELLS.glob("*.rec"))


def g(seed):
    return torch.Generator().manual_seed(seed)


def rn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, generator=g(seed)) * scale


# ============================================================================ 1. load and check

def test_the_cell_folder_is_complete():
    assert set(ALL_CELLS) >= {"gru", "elman", "indrnn", "hgrn", "hgrn_core", "retnet", "retnet_multiscale", "rglru",
                              "minlstm", "ssd", "linear_attention", "rwkv6", "aaren", "deltanet", "qrnn", "qrnn2",
                              "kda", "slstm_no_recurrence", "linear_rnn"}


@pytest.mark.parametrize("name", ALL_CELLS)
def test_loads_checks_and_verifies(name):
    spec = recdsl.load(CELLS / f"{name}.rec")
    assert spec.doc and re.search(r"\b(19|20)\d\d\b", spec.doc)  # cites its paper (a year)
    assert spec.cell.states and spec.cell.outputs
    plan = spec.plan()
    assert set(plan.classes()) == set(spec.cell.states)
    assert plan.backends["reference"] is None
    for s in plan.stages:
        assert s.reason and isinstance(plan.form(s.index), L.Form)
        for c in s.checks:
            assert "FAILED" not in c and "NOT" not in c, c
            if "max err" in c:
                assert float(c.rsplit("max err", 1)[1].split()[0]) < 1e-12, c


def test_check_command_accepts_every_cell():
    from click.testing import CliRunner
    from recdsl.cli import main
    res = CliRunner().invoke(main, ["check", *[str(CELLS / f"{n}.rec") for n in ALL_CELLS]])
    assert res.exit_code == 0, res.output
    assert res.output.count(": ok") == len(ALL_CELLS)


# ============================================================================ 2. classification

EXPECTED = {
    "gru": {"h": P.NONLINEAR},
    "elman": {"h": P.NONLINEAR},
    "indrnn": {"h": P.NONLINEAR},
    "hgrn": {"h": P.DIAGONAL},
    "hgrn_core": {"h": P.DIAGONAL},
    "retnet": {"S": P.DIAGONAL},
    "retnet_multiscale": {"S": P.DIAGONAL},
    "rglru": {"h": P.DIAGONAL},
    "minlstm": {"h": P.DIAGONAL},
    "ssd": {"h": P.DIAGONAL},
    "linear_attention": {"S": P.DIAGONAL, "z": P.DIAGONAL},
    "rwkv6": {"S": P.DIAGONAL},
    "aaren": {"m": P.SEMIRING, "num": P.DIAGONAL, "den": P.DIAGONAL},
    "deltanet": {"S": P.LOW_RANK},
    "qrnn": {"h": P.DIAGONAL},
    "qrnn2": {"xp": P.HOISTED, "h": P.DIAGONAL},
    "kda": {"S": P.LOW_RANK},
    "slstm_no_recurrence": {"m": P.SEMIRING, "c": P.DIAGONAL, "n": P.DIAGONAL},
    "linear_rnn": {"h": P.DENSE},
}

# Cells the analysis gets wrong today (each reported to the owner of recdsl/analysis).

def test_every_cell_has_an_expectation():
    assert set(EXPECTED) == set(ALL_CELLS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_classes(name):
    assert load(name).plan().classes() == EXPECTED[name]


def _plan(name, **dims):
    return load(name).plan(**dims)


def _output(plan, name):
    return next(o for o in plan.outputs if o.name == name)


def test_gru_and_elman_are_nonlinear_with_a_dense_jacobian():
    for name in ("gru", "elman"):
        s = _plan(name).stage_of("h")
        assert s.jacobian == "dense", name
        assert "W_hh @ h" in s.jacobian_reason, name


def test_indrnn_has_a_diagonal_jacobian():
    s = _plan("indrnn").stage_of("h")
    assert s.cls == P.NONLINEAR and s.jacobian == "diagonal"
    assert isinstance(_plan("indrnn").form(s.index), L.SequentialLoop)  # the loop first; then, for backend="newton":
    assert isinstance(_plan("indrnn").candidates[s.index][-1], L.NewtonSolve)
    assert "relu" in s.reason


@pytest.mark.parametrize("name", ["hgrn", "hgrn_core", "rglru", "minlstm", "qrnn", "qrnn2"])
def test_gated_vector_recurrences_have_a_per_channel_decay(name):
    plan = _plan(name)
    s = plan.stage_of("h")
    assert s.decay == "elementwise"  # a [H] decay for an [H] state
    assert isinstance(plan.form(s.index), L.ElementScan)
    assert plan.outputs[0].kind == "linear readout"


def test_log_space_is_found_where_the_decay_is_an_exp_or_a_sigmoid():
    assert "log space" in _plan("hgrn_core").stage_of("h").detail      # exp(g)
    assert "log space" in _plan("qrnn").stage_of("h").detail           # sigmoid(.)
    assert _plan("hgrn_core").stage_of("h").coefficients["log a"] == "g"


@pytest.mark.parametrize("name", ["retnet", "retnet_multiscale"])
def test_retnet_scalar_decay_linear_readout_chunkwise(name):
    plan = _plan(name)
    s = plan.stage_of("S")
    assert s.decay == "scalar"
    assert isinstance(plan.selected("torch", s.index), L.ChunkDiag)
    assert plan.outputs[0].kind == "linear readout"


def test_retnet_decay_is_the_hyper_parameter():
    plan = load("retnet").plan(gamma=0.5)
    import sympy
    assert float(sympy.sympify(plan.stage_of("S").coefficients["a"])) == 0.5


def test_ssd_scalar_decay_per_head_chunkwise_linear_readout():
    plan = _plan("ssd")
    s = plan.stage_of("h")
    assert s.decay == "scalar" and "log space" in s.detail
    assert isinstance(plan.selected("torch", s.index), L.ChunkDiag)
    assert plan.outputs[0].kind == "linear readout"


def test_linear_attention_identity_decay_and_an_epilogue():
    plan = _plan("linear_attention")
    assert plan.stage_of("S").decay == "identity"
    assert plan.stage_of("z").decay == "identity"
    assert plan.stage_of("S") is not plan.stage_of("z")  # independent: two scans
    o = _output(plan, "o")
    assert o.kind == "epilogue"
    assert sorted(o.stages) == sorted({plan.stage_of("S").index, plan.stage_of("z").index})


def test_rwkv6_vector_decay_chunkwise_and_the_bonus_read_is_linear():
    plan = _plan("rwkv6")
    s = plan.stage_of("S")
    assert s.decay == "vector" and "log space" in s.detail
    assert isinstance(plan.selected("torch", s.index), L.ChunkDiag)
    assert _output(plan, "o").kind == "linear readout"  # r @ (S + u*kv) reads the old S linearly


def test_aaren_max_plus_then_diagonal_given_m_then_an_epilogue():
    plan = _plan("aaren")
    m = plan.stage_of("m")
    assert m.detail.startswith("max-plus")
    for st in ("num", "den"):
        s = plan.stage_of(st)
        assert s.index > m.index
        assert "given m" in s.detail and s.decay == "scalar"
    assert _output(plan, "o").kind == "epilogue"


def test_deltanet_identity_plus_rank_one_ungated():
    plan = _plan("deltanet")
    s = plan.stage_of("S")
    assert s.rank == 1 and s.decay == "identity"
    assert "ungated" in s.detail and isinstance(plan.selected("torch", s.index), L.ChunkDelta)
    assert plan.outputs[0].kind == "linear readout"


def test_kda_identity_plus_rank_one_with_a_diagonal_decay():
    plan = _plan("kda")
    s = plan.stage_of("S")
    assert s.cls == P.LOW_RANK
    assert s.rank == 1 and s.decay == "vector" and isinstance(plan.form(s.index), L.ChunkDPLR)


def test_kda_readout_is_linear():
    assert _output(_plan("kda"), "o").kind == "linear readout"


def test_slstm_without_recurrence_has_a_max_plus_stabiliser():
    m = _plan("slstm_no_recurrence").stage_of("m")
    assert m.cls == P.SEMIRING and m.detail.startswith("max-plus")


def test_slstm_without_recurrence_gates_are_diagonal_given_m_and_the_output_an_epilogue():
    plan = _plan("slstm_no_recurrence")
    for st in ("c", "n"):
        s = plan.stage_of(st)
        assert s.cls == P.DIAGONAL and s.decay == "elementwise" and "given m" in s.detail
        assert s.index > plan.stage_of("m").index
    assert _output(plan, "y").kind == "epilogue"


def test_a_dense_transition_is_dense_affine():
    plan = _plan("linear_rnn")
    s = plan.stage_of("h")
    assert s.cls == P.DENSE and "A @ h" in s.detail
    assert isinstance(plan.form(s.index), L.SequentialLoop)
    assert _output(plan, "y").kind == "linear readout"


def test_qrnn2_shift_state_is_hoisted_and_h_is_diagonal_given_it():
    plan = _plan("qrnn2")
    assert plan.stage_of("xp").cls == P.HOISTED
    assert plan.stage_of("xp").index < plan.stage_of("h").index
    assert "given xp" in plan.stage_of("h").detail


# ---------------------------------------------------------------------------- counterexamples

COUPLED = """
cell Coupled(H):
    input x[H], a[H], b[H]
    state h[H] = 0
    state g[H] = 1
    h' = a * h * g + x
    g' = b * g + h
    output h'
"""

SQUARE = """
cell Square(H):
    input x[H], a[H]
    state h[H] = 0
    h' = h * h * a + x
    output h'
"""

TANH_READ = """
cell TanhRead(K, V):
    input q[K], k[K], v[V], g[]
    state S[K, V] = 0
    S' = exp(g) * S + outer(k, v)
    output o = tanh(q @ S')
    output lin = q @ S'
"""

HOISTED = """
cell Hoist(D, H):
    input x[D]
    param W[H, D] ~ normal(0, 1)
    state p[H] = 0
    state h[H] = 0
    p' = tanh(W @ x)
    h' = sigmoid(p) * h + p'
    output y = p'
    output x2 = x * 2
"""


def test_a_product_of_two_states_of_one_group_is_nonlinear():
    plan = recdsl.load(COUPLED).plan()
    assert plan.classes() == {"h": P.NONLINEAR, "g": P.NONLINEAR}
    s = plan.stage_of("h")
    assert s.states == ["h", "g"]
    assert s.jacobian == "block-diagonal (k=2)" and s.block == 2
    assert "h * g" in s.reason or "product" in s.reason


def test_a_square_of_the_state_is_nonlinear_with_a_diagonal_jacobian():
    s = recdsl.load(SQUARE).plan().stage_of("h")
    assert s.cls == P.NONLINEAR and s.jacobian == "diagonal"


def test_a_matrix_state_read_through_tanh_is_an_epilogue():
    plan = recdsl.load(TANH_READ).plan()
    assert plan.classes() == {"S": P.DIAGONAL}
    assert _output(plan, "o").kind == "epilogue"
    assert _output(plan, "lin").kind == "linear readout"


def test_a_state_that_reads_no_state_is_hoisted():
    plan = recdsl.load(HOISTED).plan()
    assert plan.classes() == {"p": P.HOISTED, "h": P.DIAGONAL}
    assert "given p" in plan.stage_of("h").detail
    assert _output(plan, "y").kind == "hoisted"
    assert _output(plan, "x2").kind == "hoisted"


def test_counterexamples_run_as_written():
    """The counterexamples against hand loops: the classification is not a licence to
    compute something else."""
    torch.manual_seed(0)
    H = 3
    x, a, b = rn(B, T, H, seed=1), rn(B, T, H, seed=2, scale=0.5), rn(B, T, H, seed=3, scale=0.5)
    layer = recdsl.load(COUPLED)(H=H, backend="reference").double()
    y, st = layer(x=x, a=a, b=b)
    h, gg = torch.zeros(B, H, dtype=torch.float64), torch.ones(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        h, gg = a[:, t] * h * gg + x[:, t], b[:, t] * gg + h
        ys.append(h)
    close(y, torch.stack(ys, 1), what="Coupled output")
    close(st["h"], h, what="Coupled h")
    close(st["g"], gg, what="Coupled g")

    layer = recdsl.load(SQUARE)(H=H, backend="reference").double()
    y, st = layer(x=x * 0.3, a=a)
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = h * h * a[:, t] + 0.3 * x[:, t]
        ys.append(h)
    close(y, torch.stack(ys, 1), what="Square output")
    close(st["h"], h, what="Square h")


# ---------------------------------------------------------------------------- probes: equivalent spellings

LA_Z_FIRST = (CELLS / "linear_attention.rec").read_text().replace(
    "    state S[K, V] = 0\n    state z[K] = 0\n", "    state z[K] = 0\n    state S[K, V] = 0\n")

AAREN_DEN_FIRST = (CELLS / "aaren.rec").read_text().replace(
    "    state num[V] = 0\n    state den[] = 0\n", "    state den[] = 0\n    state num[V] = 0\n")

LERP = """
cell MinGRULerp(D, H):
    input x[D]
    param W_z[H, D] ~ normal(0, 1)
    param W_h[H, D] ~ normal(0, 1)
    state h[H] = 0
    z = sigmoid(W_z @ x)
    h' = h + z * (W_h @ x - h)
    output h'
"""

RESET = """
cell HardReset(H):
    input x[H], a[H], reset[]
    state h[H] = 0
    h' = where(reset > 0.5, 0, a * h) + x
    output h'
"""


def test_reordered_declarations_do_not_change_the_states_classes():
    assert LA_Z_FIRST != (CELLS / "linear_attention.rec").read_text()
    assert AAREN_DEN_FIRST != (CELLS / "aaren.rec").read_text()
    assert recdsl.load(LA_Z_FIRST).plan().classes() == EXPECTED["linear_attention"]
    assert recdsl.load(AAREN_DEN_FIRST).plan().classes() == EXPECTED["aaren"]


def test_linear_attention_epilogue_does_not_depend_on_declaration_order():
    assert _output(recdsl.load(LA_Z_FIRST).plan(), "o").kind == "epilogue"


def test_aaren_epilogue_does_not_depend_on_declaration_order():
    assert _output(recdsl.load(AAREN_DEN_FIRST).plan(), "o").kind == "epilogue"


VECTOR_LSE = """
cell VectorLSE(H):
    input s[H], a[H]
    state m[H] = 0
    m' = logaddexp(m + logsigmoid(a), s)
    output m'
"""

SCALAR_LSE = VECTOR_LSE.replace("s[H], a[H]", "s[], a[]").replace("state m[H]", "state m[]")


def test_a_scalar_log_sum_exp_recurrence_is_a_semiring():
    s = recdsl.load(SCALAR_LSE).plan().stage_of("m")
    assert s.cls == P.SEMIRING and s.detail.startswith("log-sum-exp")


def test_a_vector_log_sum_exp_recurrence_is_a_semiring():
    s = recdsl.load(VECTOR_LSE).plan().stage_of("m")
    assert s.cls == P.SEMIRING and s.detail.startswith("log-sum-exp")


def test_the_lerp_spelling_of_a_gated_update_is_diagonal():
    s = recdsl.load(LERP).plan().stage_of("h")
    assert s.cls == P.DIAGONAL and s.decay == "elementwise"


def test_a_hard_reset_through_where_is_diagonal():
    s = recdsl.load(RESET).plan().stage_of("h")
    assert s.cls == P.DIAGONAL and s.decay == "elementwise"


def test_a_hard_reset_through_where_runs_as_written():
    H = 3
    layer = recdsl.load(RESET)(H=H, backend="reference").double()
    x, a = rn(B, T, H, seed=1), rn(B, T, H, seed=2)
    reset = (torch.arange(T) % 3 == 0).double().expand(B, T).clone()
    y, st = layer(x=x, a=a, reset=reset)
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = (0 if reset[0, t] > 0.5 else a[:, t] * h) + x[:, t]
        ys.append(h)
    close(y, torch.stack(ys, 1), what="HardReset output")
    close(st["h"], h, what="HardReset h")


@pytest.mark.parametrize("src,name", [(LA_Z_FIRST, "linear_attention"), (AAREN_DEN_FIRST, "aaren")])
def test_reordered_cells_compute_the_same(src, name):
    a = make(name, K=3, V=2) if name == "linear_attention" else make(name, D=3, V=2)
    torch.manual_seed(0)
    b = recdsl.load(src)(backend="reference", **a.dims).double()
    b.load_state_dict(a.state_dict())
    xs = inputs_for(a, B, T)
    ya, sa = a(**xs)
    yb, sb = b(**xs)
    close(yb, ya, what="output")
    for k in sa:
        close(sb[k], sa[k], what=k)


# ============================================================================ 3. against independent implementations

def test_gru_matches_torch_gru():
    D, H = 3, 4
    layer = make("gru", D=D, H=H)
    ref = torch.nn.GRU(D, H, batch_first=True).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.W_ih)
        ref.weight_hh_l0.copy_(layer.W_hh)
        ref.bias_ih_l0.copy_(layer.b_ih)
        ref.bias_hh_l0.copy_(layer.b_hh)
    x = rn(B, T, D, seed=1)
    h0 = rn(B, H, seed=2, scale=0.5)
    y, st = layer(x=x, state={"h": h0})
    want_y, want_h = ref(x, h0[None])
    close(y, want_y, what="GRU output")
    close(st["h"], want_h[0], what="GRU h")
    # from the zero state too
    y, st = layer(x=x)
    want_y, want_h = ref(x)
    close(y, want_y, what="GRU output (h0 = 0)")
    close(st["h"], want_h[0], what="GRU h (h0 = 0)")


def test_elman_matches_torch_rnn():
    D, H = 3, 4
    layer = make("elman", D=D, H=H)
    ref = torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.W_ih)
        ref.weight_hh_l0.copy_(layer.W_hh)
        ref.bias_ih_l0.copy_(layer.b_ih)
        ref.bias_hh_l0.copy_(layer.b_hh)
    x = rn(B, T, D, seed=1)
    h0 = rn(B, H, seed=2, scale=0.5)
    y, st = layer(x=x, state={"h": h0})
    want_y, want_h = ref(x, h0[None])
    close(y, want_y, what="Elman output")
    close(st["h"], want_h[0], what="Elman h")


def test_indrnn_matches_a_hand_loop():
    D, H = 3, 5
    layer = make("indrnn", D=D, H=H)
    with torch.no_grad():
        layer.b.copy_(rn(H, seed=5, scale=0.3))
    x = rn(B, T, D, seed=1)
    y, st = layer(x=x)
    W, u, b = layer.W.detach(), layer.u.detach(), layer.b.detach()
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = torch.relu(x[:, t] @ W.T + u * h + b)
        ys.append(h)
    assert (torch.stack(ys) == 0).any() and (torch.stack(ys) > 0).any()  # both sides of relu are exercised
    close(y, torch.stack(ys, 1), what="IndRNN output")
    close(st["h"], h, what="IndRNN h")


def _hgrn_loop(x, Wf, bf, Wc, Wg, lb, h):
    ys = []
    for t in range(x.shape[1]):
        f = lb + (1 - lb) * torch.sigmoid(x[:, t] @ Wf.T + bf)
        c = F.silu(x[:, t] @ Wc.T)
        h = f * h + (1 - f) * c
        ys.append(h * torch.sigmoid(x[:, t] @ Wg.T))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("lb", [None, 0.6])
def test_hgrn_matches_a_hand_loop(lb):
    D, H = 3, 4
    dims = dict(D=D, H=H) if lb is None else dict(D=D, H=H, lower_bound=lb)
    layer = make("hgrn", **dims)
    with torch.no_grad():
        layer.b_f.copy_(rn(H, seed=4))
    x = rn(B, T, D, seed=1)
    h0 = rn(B, H, seed=2)
    y, st = layer(x=x, state={"h": h0})
    want_y, want_h = _hgrn_loop(x, layer.W_f.detach(), layer.b_f.detach(), layer.W_c.detach(), layer.W_g.detach(),
                                0.25 if lb is None else lb, h0)
    close(y, want_y, what="HGRN output")
    close(st["h"], want_h, what="HGRN h")


def test_hgrn_core_matches_a_hand_loop():
    D = 4
    layer = make("hgrn_core", D=D)
    x, gl = rn(B, T, D, seed=1), F.logsigmoid(rn(B, T, D, seed=2))
    h0 = rn(B, D, seed=3)
    y, st = layer(x=x, g=gl, state={"h": h0})
    h, ys = h0, []
    for t in range(T):
        h = torch.exp(gl[:, t]) * h + x[:, t]
        ys.append(h)
    close(y, torch.stack(ys, 1), what="HGRNCore output")
    close(st["h"], h, what="HGRNCore h")


def test_hgrn_core_matches_fla_naive_recurrent_hgrn():
    naive = fla_naive("hgrn.naive", "naive_recurrent_hgrn")
    D = 4
    layer = make("hgrn_core", D=D)
    x, gl = rn(B, T, D, seed=1), F.logsigmoid(rn(B, T, D, seed=2))
    h0 = rn(B, D, seed=3)
    y, st = layer(x=x, g=gl, state={"h": h0})
    want_y, want_h = naive(x, gl, initial_state=h0.float(), output_final_state=True)
    close(y, want_y, tol=1e-5, what="HGRNCore output vs fla (fp32)")
    close(st["h"], want_h, tol=1e-5, what="HGRNCore h vs fla (fp32)")


def _decayed_attention(q, k, v, logdecay):
    """o_i = sum_{j<=i} exp(L_i - L_j) (q_i . k_j) v_j and S_T = sum_j exp(L_T - L_j) k_j v_j^T,
    L the cumulative log decay; q, k: [B, T, K], v: [B, T, V], logdecay: [B, T] (per step)."""
    L = torch.cumsum(logdecay, 1)
    Tn = q.shape[1]
    mask = torch.tril(torch.ones(Tn, Tn, dtype=torch.bool))
    D = torch.where(mask, torch.exp(L[:, :, None] - L[:, None, :]), torch.zeros((), dtype=q.dtype))
    A = torch.einsum("bik,bjk->bij", q, k) * D
    o = torch.einsum("bij,bjv->biv", A, v)
    w = torch.exp(L[:, -1:] - L)  # [B, T]
    S = torch.einsum("bj,bjk,bjv->bkv", w, k, v)
    return o, S


def test_retnet_matches_parallel_retention():
    K, V, NH, gamma = 3, 2, 2, 0.8
    layer = make("retnet", K=K, V=V, NH=NH, gamma=gamma)
    q, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    o, st = layer(q=q, k=k, v=v)
    # closed form: sum_j gamma^(i-j) (q_i . k_j) v_j, with an explicit power (no cumulative sums)
    i = torch.arange(T)
    Dm = torch.where(i[:, None] >= i[None, :], gamma ** (i[:, None] - i[None, :]).double(), torch.zeros(()).double())
    want = torch.einsum("bihk,bjhk,ij,bjhv->bihv", q, k, Dm, v)
    close(o, want, what="RetNet output")
    want_S = torch.einsum("j,bjhk,bjhv->bhkv", gamma ** (T - 1 - i).double(), k, v)
    close(st["S"], want_S, what="RetNet S")


def test_multiscale_retention_matches_parallel_retention():
    K, V, NH = 3, 2, 3
    layer = make("retnet_multiscale", K=K, V=V, NH=NH)
    gammas = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64)
    with torch.no_grad():
        layer.gamma.copy_(gammas)
    q, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    o, st = layer(q=q, k=k, v=v)
    for h in range(NH):
        want_o, want_S = _decayed_attention(q[:, :, h] * K ** -0.5, k[:, :, h], v[:, :, h],
                                            torch.full((B, T), math.log(gammas[h])).double())
        close(o[:, :, h], want_o, what=f"MSR output head {h}")
        close(st["S"][:, h], want_S, what=f"MSR S head {h}")


def test_multiscale_retention_matches_fla_naive_retention():
    naive = fla_naive("retention.naive", "naive_retention")
    K, V, NH = 3, 2, 3
    layer = make("retnet_multiscale", K=K, V=V, NH=NH)
    with torch.no_grad():  # the paper's (and fla's) decays
        layer.gamma.copy_(1 - 2.0 ** (-5.0 - torch.arange(NH, dtype=torch.float64)))
    q, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    o, _ = layer(q=q, k=k, v=v)
    want = naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    close(o, want, tol=1e-5, what="MSR vs fla (fp32)")


def test_rglru_matches_a_hand_loop():
    D, c = 4, 8.0
    layer = make("rglru", D=D)
    with torch.no_grad():
        layer.b_a.copy_(rn(D, seed=7, scale=0.5))
        layer.b_x.copy_(rn(D, seed=8, scale=0.5))
    x = rn(B, T, D, seed=1)
    h0 = rn(B, D, seed=2)
    y, st = layer(x=x, state={"h": h0})
    Wa, ba, Wx, bx, Lam = (getattr(layer, n).detach() for n in ("W_a", "b_a", "W_x", "b_x", "Lambda"))
    h, ys = h0, []
    for t in range(T):
        r = torch.sigmoid(x[:, t] @ Wa.T + ba)
        i = torch.sigmoid(x[:, t] @ Wx.T + bx)
        log_a = c * r * F.logsigmoid(Lam)  # Griffin's log-space form of sigma(Lambda)^(c r)
        a = torch.exp(log_a)
        h = a * h + torch.sqrt(-torch.expm1(2 * log_a)) * (i * x[:, t])
        ys.append(h)
    close(y, torch.stack(ys, 1), what="RG-LRU output")
    close(st["h"], h, what="RG-LRU h")


def test_minlstm_matches_a_hand_loop():
    D, H = 3, 4
    layer = make("minlstm", D=D, H=H)
    x = rn(B, T, D, seed=1)
    y, st = layer(x=x)
    Wf, Wi, Wh = layer.W_f.detach(), layer.W_i.detach(), layer.W_h.detach()
    h, ys = torch.zeros(B, H, dtype=torch.float64), []
    for t in range(T):
        f, i = torch.sigmoid(x[:, t] @ Wf.T), torch.sigmoid(x[:, t] @ Wi.T)
        fn, in_ = f / (f + i), i / (f + i)
        h = fn * h + in_ * (x[:, t] @ Wh.T)
        ys.append(h)
    close(y, torch.stack(ys, 1), what="minLSTM output")
    close(st["h"], h, what="minLSTM h")


def test_ssd_matches_the_quadratic_form():
    P_, N, NH = 2, 3, 2
    layer = make("ssd", P=P_, N=N, NH=NH)
    with torch.no_grad():
        layer.A_log.copy_(torch.tensor([-0.5, 0.7], dtype=torch.float64))
        layer.dt_bias.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
        layer.Dskip.copy_(torch.tensor([0.5, -1.5], dtype=torch.float64))
    x, dt = rn(B, T, NH, P_, seed=1), rn(B, T, NH, seed=2)
    Bm, Cm = rn(B, T, NH, N, seed=3), rn(B, T, NH, N, seed=4)
    y, st = layer(x=x, dt=dt, B=Bm, C=Cm)
    for h in range(NH):
        A = -torch.exp(layer.A_log[h].detach())
        delta = F.softplus(dt[:, :, h] + layer.dt_bias[h].detach())  # [B, T]
        cum = torch.cumsum(delta * A, 1)
        i = torch.arange(T)
        seg = torch.where(i[:, None] >= i[None, :], torch.exp(cum[:, :, None] - cum[:, None, :]),
                          torch.zeros((), dtype=torch.float64))                 # [B, T, T]
        CB = torch.einsum("bin,bjn->bij", Cm[:, :, h], Bm[:, :, h])
        want_y = torch.einsum("bij,bj,bjp->bip", seg * CB, delta, x[:, :, h]) + layer.Dskip[h].detach() * x[:, :, h]
        w = torch.exp(cum[:, -1:] - cum) * delta
        want_h = torch.einsum("bj,bjp,bjn->bpn", w, x[:, :, h], Bm[:, :, h])
        close(y[:, :, h], want_y, what=f"SSD output head {h}")
        close(st["h"][:, h], want_h, what=f"SSD h head {h}")


def test_linear_attention_matches_cumulative_sums():
    K, V, eps = 3, 2, 1e-6
    layer = make("linear_attention", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    o, st = layer(q=q, k=k, v=v)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    S = torch.cumsum(torch.einsum("btk,btv->btkv", fk, v), 1)
    z = torch.cumsum(fk, 1)
    want = torch.einsum("btk,btkv->btv", fq, S) / (torch.einsum("btk,btk->bt", fq, z)[..., None] + eps)
    close(o, want, what="linear attention output")
    close(st["S"], S[:, -1], what="linear attention S")
    close(st["z"], z[:, -1], what="linear attention z")


def _rwkv6_loop(r, k, v, w, u, S):
    """RWKV-6 (Finch) wkv: o_t = r_t (diag(u) k_t v_t^T + S_{t-1}); S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t v_t^T."""
    os = []
    for t in range(r.shape[1]):
        kv = k[:, t, ..., :, None] * v[:, t, ..., None, :]
        os.append(torch.einsum("...k,...kv->...v", r[:, t], S + u[..., :, None] * kv))
        S = torch.exp(-torch.exp(w[:, t]))[..., None] * S + kv
    return torch.stack(os, 1), S


def test_rwkv6_matches_a_hand_loop():
    K, V, NH = 3, 2, 2
    layer = make("rwkv6", K=K, V=V, NH=NH)
    r, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    w = rn(B, T, NH, K, seed=4)
    S0 = rn(B, NH, K, V, seed=5)
    o, st = layer(r=r, k=k, v=v, w=w, state={"S": S0})
    want_o, want_S = _rwkv6_loop(r, k, v, w, layer.u.detach(), S0)
    close(o, want_o, what="RWKV6 output")
    close(st["S"], want_S, what="RWKV6 S")


def test_rwkv6_matches_fla_naive_recurrent_rwkv6():
    naive = fla_naive("rwkv6.recurrent_naive", "naive_recurrent_rwkv6")
    K, V, NH = 3, 2, 2
    layer = make("rwkv6", K=K, V=V, NH=NH)
    r, k, v = rn(B, T, NH, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    w = rn(B, T, NH, K, seed=4)
    o, st = layer(r=r, k=k, v=v, w=w)
    tr = lambda a: a.transpose(1, 2)  # noqa: E731  fla: [B, H, T, ...]; its w is the log decay
    want_o, want_S = naive(tr(r), tr(k), tr(v), tr(-torch.exp(w)), layer.u.detach(), scale=1.0,
                           output_final_state=True)
    close(o, tr(want_o), tol=1e-5, what="RWKV6 output vs fla (fp32)")
    close(st["S"], want_S, tol=1e-5, what="RWKV6 S vs fla (fp32)")


def test_aaren_matches_softmax_attention_over_the_prefix():
    D, V = 3, 2
    layer = make("aaren", D=D, V=V)
    k, v = rn(B, T, D, seed=1, scale=1.5), rn(B, T, V, seed=2)
    o, st = layer(k=k, v=v)
    q = layer.q.detach()
    s = k @ q  # [B, T]
    for i in range(T):
        att = torch.softmax(s[:, :i + 1], dim=1)
        close(o[:, i], torch.einsum("bj,bjv->bv", att, v[:, :i + 1]), what=f"Aaren output t={i}")
    m = s.max(1).values
    close(st["m"], m, what="Aaren m")
    close(st["den"], torch.exp(s - m[:, None]).sum(1), what="Aaren den")
    close(st["num"], torch.einsum("bj,bjv->bv", torch.exp(s - m[:, None]), v), what="Aaren num")


def _delta_loop(q, k, v, beta, S):
    os = []
    K = k.shape[-1]
    for t in range(q.shape[1]):
        kt, bt = k[:, t], beta[:, t]
        A = torch.eye(K, dtype=q.dtype) - bt[:, None, None] * kt[:, :, None] * kt[:, None, :]
        S = A @ S + bt[:, None, None] * kt[:, :, None] * v[:, t, None, :]
        os.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    return torch.stack(os, 1), S


def test_deltanet_matches_the_householder_loop():
    K, V = 3, 2
    layer = make("deltanet", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    beta = torch.sigmoid(rn(B, T, seed=4))
    S0 = rn(B, K, V, seed=5)
    o, st = layer(q=q, k=k, v=v, beta=beta, state={"S": S0})
    want_o, want_S = _delta_loop(q, k, v, beta, S0)
    close(o, want_o, what="DeltaNet output")
    close(st["S"], want_S, what="DeltaNet S")


def test_deltanet_matches_fla_delta_rule_recurrence():
    naive = fla_naive("delta_rule.naive", "delta_rule_recurrence")
    K, V = 3, 2
    layer = make("deltanet", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    beta = torch.sigmoid(rn(B, T, seed=4))
    o, st = layer(q=q, k=k, v=v, beta=beta)
    h = lambda a: a[:, None]  # noqa: E731  one head, fla layout [B, H, T, ...]; fla scales q by K**-0.5
    want_o, want_S = naive(h(q) * K ** 0.5, h(k), h(v), h(beta))
    close(o, want_o[:, 0], tol=1e-5, what="DeltaNet output vs fla (fp32)")
    close(st["S"], want_S[:, 0], tol=1e-5, what="DeltaNet S vs fla (fp32)")


def test_qrnn_matches_a_hand_loop():
    D, H = 3, 4
    layer = make("qrnn", D=D, H=H)
    x = rn(B, T, D, seed=1)
    y, st = layer(x=x)
    h, ys = torch.zeros(B, H, dtype=torch.float64), []
    for t in range(T):
        z, f = torch.tanh(x[:, t] @ layer.W_z.detach().T), torch.sigmoid(x[:, t] @ layer.W_f.detach().T)
        h = f * h + (1 - f) * z
        ys.append(h)
    close(y, torch.stack(ys, 1), what="QRNN output")
    close(st["h"], h, what="QRNN h")


def test_qrnn2_matches_a_width_two_convolution():
    D, H = 3, 4
    layer = make("qrnn2", D=D, H=H)
    x = rn(B, T, D, seed=1)
    y, st = layer(x=x)
    # the masked width-2 convolution of the paper, computed for all steps with conv1d
    wz = torch.stack([layer.V_z.detach(), layer.W_z.detach()], -1)  # [H, D, 2]: taps x[t-1], x[t]
    wf = torch.stack([layer.V_f.detach(), layer.W_f.detach()], -1)
    xin = F.pad(x.transpose(1, 2), (1, 0))
    Z, Fg = torch.tanh(F.conv1d(xin, wz)).transpose(1, 2), torch.sigmoid(F.conv1d(xin, wf)).transpose(1, 2)
    h, ys = torch.zeros(B, H, dtype=torch.float64), []
    for t in range(T):
        h = Fg[:, t] * h + (1 - Fg[:, t]) * Z[:, t]
        ys.append(h)
    close(y, torch.stack(ys, 1), what="QRNN2 output")
    close(st["h"], h, what="QRNN2 h")
    close(st["xp"], x[:, -1], what="QRNN2 xp")


def _kda_loop(q, k, v, g, beta, S):
    """Kimi Delta Attention: S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T; o_t = q_t^T S_t / sqrt(K)."""
    Kd = q.shape[-1]
    os = []
    for t in range(q.shape[1]):
        kt, bt = k[:, t], beta[:, t]
        Hh = torch.eye(Kd, dtype=q.dtype) - bt[:, None, None] * kt[:, :, None] * kt[:, None, :]
        S = Hh @ torch.diag_embed(torch.exp(g[:, t])) @ S + bt[:, None, None] * kt[:, :, None] * v[:, t, None, :]
        os.append(torch.einsum("bk,bkv->bv", q[:, t] * Kd ** -0.5, S))
    return torch.stack(os, 1), S


def _kda_inputs(K, V):
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    gl = F.logsigmoid(rn(B, T, K, seed=4) + 2)
    beta = torch.sigmoid(rn(B, T, seed=5))
    return q, k, v, gl, beta


def test_kda_matches_a_hand_loop():
    K, V = 3, 2
    layer = make("kda", K=K, V=V)
    q, k, v, gl, beta = _kda_inputs(K, V)
    S0 = rn(B, K, V, seed=6)
    o, st = layer(q=q, k=k, v=v, g=gl, beta=beta, state={"S": S0})
    want_o, want_S = _kda_loop(q, k, v, gl, beta, S0)
    close(o, want_o, what="KDA output")
    close(st["S"], want_S, what="KDA S")


def test_kda_matches_fla_naive_recurrent_kda():
    naive = fla_naive("kda.naive", "naive_recurrent_kda")
    K, V = 3, 2
    layer = make("kda", K=K, V=V)
    q, k, v, gl, beta = _kda_inputs(K, V)
    o, st = layer(q=q, k=k, v=v, g=gl, beta=beta)
    h = lambda a: a[:, :, None]  # noqa: E731  one head, fla layout [B, T, H, ...]
    want_o, want_S = naive(h(q), h(k), h(v), h(gl), h(beta), output_final_state=True)
    close(o, want_o[:, :, 0], tol=1e-5, what="KDA output vs fla (fp32)")
    close(st["S"], want_S[:, 0], tol=1e-5, what="KDA S vs fla (fp32)")


def test_slstm_without_recurrence_matches_a_hand_loop():
    D, H = 3, 4
    layer = make("slstm_no_recurrence", D=D, H=H)
    with torch.no_grad():
        layer.b.copy_(rn(4 * H, seed=9))
    x = rn(B, T, D, seed=1, scale=2.0)
    y, st = layer(x=x)
    pre = x @ layer.W.detach().T + layer.b.detach()  # [B, T, 4H]
    zi, zf, zz, zo = pre.split(H, -1)
    # stabilised recursion, written from the paper
    c = n = torch.zeros(B, H, dtype=torch.float64)
    m = torch.zeros(B, H, dtype=torch.float64)
    # and the unstabilised one: the output c/n does not depend on the stabiliser
    cu, nu = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    ys, ys_u = [], []
    for t in range(T):
        lf = F.logsigmoid(zf[:, t])
        m_new = torch.maximum(lf + m, zi[:, t])
        i, f = torch.exp(zi[:, t] - m_new), torch.exp(lf + m - m_new)
        c, n, m = f * c + i * torch.tanh(zz[:, t]), f * n + i, m_new
        ys.append(torch.sigmoid(zo[:, t]) * c / n)
        cu = torch.sigmoid(zf[:, t]) * cu + torch.exp(zi[:, t]) * torch.tanh(zz[:, t])
        nu = torch.sigmoid(zf[:, t]) * nu + torch.exp(zi[:, t])
        ys_u.append(torch.sigmoid(zo[:, t]) * cu / nu)
    close(y, torch.stack(ys, 1), what="sLSTM(R=0) output")
    close(y, torch.stack(ys_u, 1), what="sLSTM(R=0) output vs the unstabilised form")
    close(st["c"], c, what="sLSTM(R=0) c")
    close(st["n"], n, what="sLSTM(R=0) n")
    close(st["m"], m, what="sLSTM(R=0) m")


def test_linear_rnn_matches_matrix_powers():
    D, H = 3, 4
    layer = make("linear_rnn", D=D, H=H)
    x = rn(B, T, D, seed=1)
    h0 = rn(B, H, seed=2)
    y, st = layer(x=x, state={"h": h0})
    A, Bm, C = layer.A.detach(), layer.Bm.detach(), layer.C.detach()
    pw = [torch.linalg.matrix_power(A, p) for p in range(T + 1)]
    u = x @ Bm.T  # [B, T, H]
    hs = [h0 @ pw[t + 1].T + sum(u[:, j] @ pw[t - j].T for j in range(t + 1)) for t in range(T)]
    close(y, torch.stack(hs, 1) @ C.T, what="linear RNN output")
    close(st["h"], hs[-1], what="linear RNN h")
