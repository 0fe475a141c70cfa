"""Run modes of random cases (reverse, heads, initial state, packed sequences): drawn often
enough, packed sequences laid out as recdsl/runtime.py expects, compared like the others,
written to and read back from reproducer files, shrunk."""
import random
from dataclasses import replace

import pytest
import torch

import recdsl
from recdsl.fuzz.runner import (MODE_P, Case, Report, _Run, _unpacked, build, random_case, random_packing,
                                run_case)
from recdsl.fuzz.shrink import shrink

GLA = """cell G(K, V):
    input q[K], k[K], v[V], g[]
    state S[K, V] = 0
    S' = exp(logsigmoid(g)) * S + outer(k, v)
    output o = q @ S'
"""

ELMAN = """cell E(H, D):
    input x[D], z[]
    param W[H, D] ~ normal(0, 0.5)
    param U[H, H] ~ uniform(-0.3, 0.3)
    param u[H] ~ normal(0, 0.5)
    state h[H] = 0
    h' = tanh(U @ h + W @ x + z * u)
    output h'
"""


def _valid(cu, T):
    return cu[0] == 0 and cu[-1] == T and all(b >= a for a, b in zip(cu, cu[1:])) and len(cu) >= 3


def test_packings_have_empty_and_one_step_sequences():
    rng = random.Random(0)
    empty = one = 0
    for _ in range(500):
        T = rng.choice([2, 3, 5, 9, 40, 70, 130])
        cu = random_packing(T, rng)
        assert _valid(cu, T), (T, cu)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        empty += 0 in lengths
        one += 1 in lengths
    assert empty > 200 and one > 200


def test_every_mode_is_drawn_often_enough():
    spec = recdsl.load(GLA)
    rng = random.Random(1)
    n = 1000
    cases = [random_case(GLA, rng, spec) for _ in range(n)]
    counts = {"reverse": sum(c.reverse for c in cases), "heads": sum(bool(c.heads) for c in cases),
              "init_state": sum(c.init_state for c in cases),
              "cu_seqlens": sum(c.cu_seqlens is not None for c in cases)}
    assert set(counts) == set(MODE_P)
    for mode, k in counts.items():
        assert k >= 0.1 * n, (mode, k)
    packed = [c for c in cases if c.cu_seqlens is not None]
    assert all(c.B == 1 and _valid(c.offsets(), c.T) for c in packed)
    assert any(c.T > 64 for c in packed) and any(c.reverse for c in packed) and any(c.init_state for c in packed)


def test_packed_case_round_trips_through_a_file():
    case = Case(GLA, {"K": 3, "V": 2}, B=1, T=9, cu_seqlens=[0, 0, 1, 9], reverse=True, init_state=True, seed=5)
    back = Case.from_file(case.to_file(), "x.rec")
    assert back.config() == case.config() and back.cu_seqlens == [0, 0, 1, 9]
    assert "cu_seqlens=[0, 0, 1, 9]" in case.describe()
    # a case shortened by the shrinker (T alone) is written with offsets fitted to T
    short = replace(case, T=4)
    assert short.offsets() == [0, 0, 1, 4] and Case.from_file(short.to_file(), "x.rec").cu_seqlens == [0, 0, 1, 4]
    assert replace(case, T=1).offsets() == [0, 0, 1, 1]
    # files written before packed sequences: no key, no packing
    plain = Case(GLA, {"K": 3, "V": 2})
    assert "cu_seqlens" not in plain.to_file() and Case.from_file(plain.to_file(), "x.rec").cu_seqlens is None


def test_packed_run_is_the_runs_of_each_sequence():
    """_Run with cu_seqlens: outputs [1, T, ...], one final state per sequence, equal to
    running each sequence alone from its own initial state."""
    spec = recdsl.load(ELMAN)
    case = Case(ELMAN, {"H": 3, "D": 2}, B=1, T=7, cu_seqlens=[0, 2, 2, 3, 7], grad=False, init_state=True)
    layer = build(spec, "reference", case)
    gen = torch.Generator().manual_seed(0)
    xs = {"x": torch.randn(1, 7, 2, generator=gen, dtype=torch.float64),
          "z": torch.randn(1, 7, generator=gen, dtype=torch.float64)}
    st0 = {"h": torch.randn(4, 3, generator=gen, dtype=torch.float64)}
    run = _Run(layer, xs, st0, case, [], gen)
    assert run.outs[0].shape == (1, 7, 3) and run.states["h"].shape == (4, 3)
    cu = case.offsets()
    for i in range(4):
        a, b = cu[i], cu[i + 1]
        if a == b:
            assert torch.equal(run.states["h"][i], st0["h"][i])
            continue
        o, s = layer(x=xs["x"][:, a:b], z=xs["z"][:, a:b], state={"h": st0["h"][i:i + 1]})
        assert torch.allclose(o, run.outs[0][:, a:b]) and torch.allclose(s["h"][0], run.states["h"][i])


@pytest.mark.parametrize("src,dims", [(GLA, {"K": 3, "V": 2}), (ELMAN, {"H": 3, "D": 2})])
@pytest.mark.parametrize("grad", [True, False])
def test_packed_cases_agree_with_reference(src, dims, grad):
    for T, cu, rev, init in [(70, [0, 0, 1, 70], False, True), (9, [0, 4, 4, 5, 9], True, False),
                             (5, [0, 5, 5], True, True)]:
        case = Case(src, dims, B=1, T=T, grad=grad, reverse=rev, init_state=init, cu_seqlens=cu, seed=3)
        res = run_case(case, ["torch"], classes=False)
        assert res.runs == 1 and not res.declined and not res.skipped, (res.declined, res.skipped)
        assert not res.mismatches, [str(m) for m in res.mismatches]


def test_packed_disagreement_is_unpacked_and_shrunk():
    """A disagreement that does not need the packing loses it before shrinking; one that
    does keeps offsets consistent with every shorter T the shrinker tries."""
    case = Case(GLA, {"K": 3, "V": 2}, B=1, T=40, cu_seqlens=[0, 0, 1, 17, 40], seed=1)
    seen = []

    def long_sequence(c):  # "fails" while some packed sequence is 5 steps or longer
        cu = c.offsets()
        seen.append((c.T, cu))
        return cu is not None and max(b - a for a, b in zip(cu, cu[1:])) >= 5

    small = shrink(case, "torch", budget_s=20, still_fails=long_sequence)
    assert seen and all(len(cu) == 5 and _valid(cu, T) for T, cu in seen)
    # the shrinker's T steps are 1..5, 8, ...: T = 5 leaves 4 steps to the longest sequence
    assert small.T == 8 and small.offsets() == [0, 0, 1, 8, 8], small.describe()
    back = Case.from_file(small.to_file(), "s.rec")
    assert back.offsets() == small.offsets() and long_sequence(back)
    # _unpacked: kept packed when the plain run agrees (no bug here), dropped otherwise
    assert _unpacked(case, "torch", None) is case


def test_report_prints_modes_and_spelling_tags():
    from recdsl.fuzz.generator import TAGS
    r = Report(seed=0, backends=["torch"])
    r.tags = {"mat.decay.hyper": 3, "delta.rwkv7": 1}
    r.modes = {"cu_seqlens": 2, "reverse": 1}
    lines = r.class_lines()
    assert "classes (stages seen):" in lines[0]
    text = "\n".join(lines)
    assert "modes (cases): cu_seqlens 2, reverse 1" in text
    assert "spellings (generated cells using each):" in text
    assert "hyper 3" in text and "rwkv7 1" in text
    assert f"not drawn: {len(TAGS) - 2} of {len(TAGS)}" in text
    assert r.class_lines(tags=False) == lines[:len(r.class_lines(tags=False))]
    assert not any("spellings" in ln for ln in r.class_lines(tags=False))
