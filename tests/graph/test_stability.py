"""pLSTM's stability conditions (Pöppel et al., 2025; MATH.md §6) as `recdsl check` finds them
(recdsl.analysis.stability): P-mode (the transitions leaving each in-edge, or entering each
new value, sum to <= 1 in magnitude), D-mode (a multitree with each |T| <= 1), otherwise a
warning naming the offending transition. Asserted on the typed result, plan.stability."""
import math

import pytest
from click.testing import CliRunner

import recdsl
from recdsl.cli import main

HEAD = "cell C(D):\n    over grid2d\n    input x[D], a[D], b[D]\n    state c[D] = 0\n"


def _stab(src):
    plan = recdsl.load(src).plan()
    return plan.stability, plan


def test_stable_p_mode_per_out_edge_is_silent():
    st, plan = _stab(HEAD + "    c' = sigmoid(a) / 2 * c.left + sigmoid(b) / 2 * c.up + x\n    output c'\n")
    assert st.stable and st.mode == "P" and st.proven and plan.warnings == []
    assert st.states == ["c"] and st.out_sums["c"] <= 1 and st.offending is None
    assert {(t.source, t.via) for t in st.transitions} == {("c", "left"), ("c", "up")}
    assert all(t.bound == pytest.approx(0.5) and t.proven for t in st.transitions)


def test_stable_p_mode_per_in_edge_t_and_one_minus_t():
    """The reference layer's normalisation: each in-edge hands t to one out-edge, 1 - t to the
    other; the sum is exactly 1 (found symbolically: intervals alone would give 2)."""
    src = ("cell P(K, V):\n    over grid2d\n    input k[K], v[V], a[]\n"
           "    state Cr[K, V] = 0\n    state Cd[K, V] = 0\n    t = sigmoid(a)\n"
           "    Cr' = t * Cr.left + t * Cd.up + outer(k, v)\n"
           "    Cd' = (1 - t) * Cd.up + (1 - t) * Cr.left + outer(k, v)\n    output y = Cr'[0] + Cd'[0]\n")
    st, plan = _stab(src)
    assert st.stable and st.mode == "P" and st.rule == "per in-edge" and st.proven and plan.warnings == []
    assert st.in_sums == {"Cd.up": pytest.approx(1.0), "Cr.left": pytest.approx(1.0)}
    assert not st.multitree and max(st.out_sums.values()) > 1   # rows alone would not show it


def test_unstable_two_bare_tanh_in_edges_warns_with_location(tmp_path):
    path = tmp_path / "bad.rec"
    path.write_text(HEAD + "    c' = tanh(a) * c.left + tanh(b) * c.up + x\n    output c'\n")
    st, plan = _stab(path)
    assert not st.stable and st.mode is None and not st.multitree
    assert st.in_sums["c.left"] == pytest.approx(2.0)   # c is read on both out-edges
    bad = st.offending
    assert (bad.target, bad.source, bad.via) == ("c", "c", "left")
    assert (bad.span.line, bad.span.col) == (5, 10) and bad.span.file == str(path)
    assert bad.written == "tanh(a) * c.left" and bad.bound == pytest.approx(1.0)
    (w,) = plan.warnings
    assert w == st.warning() and w.startswith(f"{path}:5:10:") and st.hint in w


def test_check_prints_the_warning_and_still_succeeds(tmp_path):
    path = tmp_path / "bad.rec"
    path.write_text(HEAD + "    c' = tanh(a) * c.left + tanh(b) * c.up + x\n    output c'\n")
    res = CliRunner().invoke(main, ["check", str(path)])
    assert res.exit_code == 0
    assert f"warning: {path}:5:10:" in res.output and "stability:" in res.output


def test_d_mode_recognised_on_the_grid():
    st, plan = _stab(recdsl.load("plstm2d_dmode").source_text)
    assert st.stable and st.mode == "D" and st.proven and st.multitree and st.requires is None
    assert plan.warnings == [] and set(st.states) == {"Cr", "Cd"}
    assert {(t.target, t.source, t.via) for t in st.transitions} == {
        ("Cr", "Cr", "left"), ("Cr", "Cd", "up"), ("Cd", "Cd", "up")}
    assert st.in_sums["Cd.up"] > 1   # not P-mode: Cd.up feeds both Cd' and Cr'


def test_d_mode_needs_each_transition_within_one():
    src = ("cell P(K, V):\n    over grid2d\n    input k[K], v[V], a[], b[], c[]\n"
           "    state Cr[K, V] = 0\n    state Cd[K, V] = 0\n"
           "    Cr' = tanh(a) * Cr.left + 2 * tanh(b) * Cd.up + outer(k, v)\n"
           "    Cd' = tanh(c) * Cd.up + outer(k, v)\n    output y = Cr'[0]\n")
    st, plan = _stab(src)
    assert not st.stable and st.multitree
    assert (st.offending.target, st.offending.source) == ("Cr", "Cd") and st.offending.bound == pytest.approx(2.0)
    assert (st.offending.span.line, st.offending.span.col) == (6, 31)
    assert st.offending.written == "2 * tanh(b) * Cd.up"
    assert len(plan.warnings) == 1


def test_d_mode_over_a_dag_requires_a_multitree_graph():
    st, plan = _stab(recdsl.load("tree_lstm").source_text)
    assert st.stable and st.mode == "D" and st.proven and st.requires and plan.warnings == []
    assert st.states == ["c"]   # h = o * tanh(c) is not linear in the neighbours


def test_caller_given_transitions_are_an_assumption():
    st, plan = _stab(recdsl.load("plstm2d").source_text)
    assert st.stable and not st.proven and st.mode == "P" and len(st.assumes) == 1 and plan.warnings == []
    assert {t.text for t in st.transitions} == {"t_rl", "t_ru", "t_dl", "t_du"}
    assert all(t.given and math.isinf(t.bound) for t in st.transitions)
    st, _ = _stab(recdsl.load("plstm_graph").source_text)
    assert st.stable and not st.proven and st.mode == "D" and st.requires and st.assumes


def test_the_2d_lstm_is_warned_about():
    """Graves et al.'s c = f_l c_left + f_u c_up + i g: two sigmoid forget gates can sum to 2."""
    st, plan = _stab(recdsl.load("mdlstm2d").source_text)
    assert not st.stable and st.states == ["c"] and st.in_sums["c.left"] == pytest.approx(2.0)
    assert st.offending.written == "sigmoid(zfl) * c.left" and len(plan.warnings) == 1


def test_sequences_have_no_stability_result():
    assert recdsl.load("gla").plan().stability is None


def test_a_param_transition_is_judged_at_its_initial_value():
    """As the decay warnings do: a param's range at initialisation (not proven: training may move it)."""
    src = ("cell A(D):\n    over grid2d\n    input x[D]\n    param g[D] = {g}\n    state h[D] = 0\n"
           "    h' = g * h.left + g * h.up + x\n    output h'\n")
    st, plan = _stab(src.format(g=0.4))
    assert st.stable and st.mode == "P" and not st.proven and plan.warnings == []
    assert st.in_sums == {"h.left": pytest.approx(0.8), "h.up": pytest.approx(0.8)}
    st, plan = _stab(src.format(g=0.6))
    assert not st.stable and not st.offending.proven and len(plan.warnings) == 1


def test_a_masked_choice_of_in_edges_is_a_convex_weight():
    st, plan = _stab("cell A(D):\n    over grid2d\n    input x[D], m[D]\n    state h[D] = 0\n"
                     "    h' = where(m > 0, 0.5 * h.left, 0.5 * h.up) + x\n    output h'\n")
    assert st.stable and st.mode == "P" and st.proven and plan.warnings == []


def test_an_unbounded_matrix_transition_warns():
    st, plan = _stab("cell A(D):\n    over dag\n    input x[D]\n    param W[D, D] ~ normal(0, 1)\n"
                     "    state h[D] = 0\n    h' = sum_in(W @ h) + x\n    output h'\n")
    assert not st.stable and math.isinf(st.offending.bound) and len(plan.warnings) == 1


def test_the_pass_is_traced():
    trace = {}
    recdsl.load("plstm2d_dmode").plan(trace)
    assert "D-mode" in trace["stability"]


@pytest.mark.parametrize("edges, expect", [
    ([("c", "c", "left")], True),
    ([("c", "c", "left"), ("c", "c", "up")], False),                       # a node state read both ways
    ([("r", "r", "left"), ("r", "d", "up"), ("d", "d", "up"), ("d", "r", "left")], False),   # P-mode's mixing
    ([("r", "r", "left"), ("r", "d", "up"), ("d", "d", "up")], True),      # D-mode, chirality L
    ([("r", "d", "up"), ("d", "r", "left")], True),                        # a staircase: one path
    ([("a", "a", "left"), ("b", "b", "left"), ("b", "a", "left")], False),  # J = 2 along one axis
    ([("c", "c", "in")], True),                                            # over a DAG: per node path
])
def test_multitree(edges, expect):
    from recdsl.analysis.stability import Transition, _is_multitree
    trans = [Transition(t, s, via, "t", 1.0, True, False) for t, s, via in edges]
    assert _is_multitree(trans, sorted({x for e in edges for x in e[:2]})) is expect


def test_the_stages_checked_are_named_by_their_plan_index():
    plan = recdsl.load("plstm2d_dmode").plan()
    assert sorted(plan.stability.stages) == [s.index for s in plan.stages] == [0, 1]
    plan = recdsl.load("mdlstm2d").plan()
    assert plan.stability.stages == [0]


def test_a_layer_plan_carries_it():
    layer = recdsl.load("plstm2d_dmode")(K=2, V=3)
    st = layer.plan.stability
    assert st.mode == "D" and st.stable and f"stability: {st.summary}" in str(layer.plan)
