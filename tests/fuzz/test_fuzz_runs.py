"""Bounded fuzz runs: a fixed seed gives no disagreement; an injected backend bug is found
and shrunk to a cell of a few lines."""
import time

import pytest

from recdsl.fuzz import inject
from recdsl.fuzz.runner import Case, fuzz, run_case, signature
from recdsl.fuzz.shrink import shrink, statement_lines

# Disagreements already reported (reproducers in found/, xfail in test_found.py): the
# bounded runs tolerate these and nothing else. Remove an entry when its bug is fixed.
KNOWN: list[str] = []  # text of open bugs' mismatches (str(Mismatch): message and where raised)


def _unknown(report):
    return [f for f in report.failures
            if not any(any(k in str(m) for k in KNOWN) for m in f.mismatches)]


def test_fixed_seed_bounded_run():
    # bounded by a cell count (the clock only as a backstop): the same 60 cells on a loaded
    # machine; a cell with a new sequential stage compiles its C loop first (0.4-0.7 s cold)
    report = fuzz(seconds=600, max_cells=60, seed=0, shrink=False, mutants_per_cell=2)
    assert report.cells == 60 and report.runs >= report.cells
    assert report.skipped <= report.cells // 50
    assert not report.frontend_crashes, report.frontend_crashes[:1]
    assert not _unknown(report), [f.summary() + "\n" + f.case.to_file() for f in _unknown(report)][:2]
    classes = {k.split(":")[0] for k in report.histogram}
    assert {"diagonal affine", "semiring affine", "identity + low rank", "nonlinear"} <= classes


@pytest.mark.slow
def test_fixed_seed_two_minutes():
    # every new sequential stage compiles its C loop (0.4-0.7 s with a cold kernel cache):
    # 200 cells take 45-90 s here, by machine load
    report = fuzz(seconds=900, max_cells=200, seed=1, shrink=False)
    assert report.cells == 200
    assert not report.frontend_crashes and not _unknown(report)


@pytest.fixture
def chunk_carry_bug():
    inject.inject("chunk-carry")
    yield
    inject.restore()


def test_injected_bug_is_found_and_shrunk(chunk_carry_bug):
    t0 = time.monotonic()
    numeric = lambda r: any(signature(m) == "mismatch" for f in r.failures for m in f.mismatches)  # noqa: E731
    report = fuzz(seconds=40, seed=0, shrink=False, frontend=False, stop_when=numeric)
    found = [f for f in report.failures if any(signature(m) == "mismatch" for m in f.mismatches)]
    assert found, f"not found in {report.cells} cells"
    fail = found[0]
    small = shrink(fail.case, fail.backend, budget_s=25, kinds={"mismatch"})
    assert time.monotonic() - t0 < 80
    assert statement_lines(small.source) <= 6, small.to_file()
    assert small.T > 64  # the bug lives in the carry between chunks of 64
    replay = Case.from_file(small.to_file(), "replay.rec")
    assert run_case(replay, ["torch"]).mismatches
    inject.restore()
    assert not run_case(replay, ["torch"]).mismatches  # the disagreement was the injected bug


@pytest.mark.slow
def test_fixed_seed_triton_run():
    """Random cells of every class on the triton backend (Triton's interpreter): outputs,
    states and gradients agree with reference."""
    report = fuzz(seconds=600, max_cells=40, seed=5, backends=["triton"], shrink=False, mutants_per_cell=0)
    assert report.cells == 40 and not _unknown(report), \
        [f.summary() + "\n" + f.case.to_file() for f in _unknown(report)][:2]


def test_injected_bug_in_a_packed_case(chunk_carry_bug):
    """Packed sequences are compared per sequence: the carry bug shows in a 70-step
    sequence packed after an empty and a one-step one, not when every sequence is short;
    the packing is dropped before shrinking when the plain run fails too."""
    from recdsl.fuzz.runner import _unpacked
    src = "cell G(K, V):\n    input q[K], k[K], v[V], g[]\n    state S[K, V] = 0\n" \
          "    S' = exp(logsigmoid(g)) * S + outer(k, v)\n    output o = q @ S'\n"
    packed = Case(src, {"K": 2, "V": 2}, B=1, T=71, cu_seqlens=[0, 0, 1, 71], seed=3)
    res = run_case(packed, ["torch"], classes=False)
    assert any(signature(m) == "mismatch" for m in res.mismatches), res
    short = Case(src, {"K": 2, "V": 2}, B=1, T=71, cu_seqlens=[0, 0, 1, 36, 71], seed=3)
    assert not run_case(short, ["torch"], classes=False).mismatches
    plain = _unpacked(packed, "torch", {"mismatch"})
    assert plain.cu_seqlens is None and plain.T == 71 and plain.B == 1


def test_crash_signature_names_the_crash():
    """Crashes are told apart by type, the function that raised and the message (numbers
    masked): a shrink keeps to the same crash."""
    from recdsl.fuzz.runner import Mismatch, _raised_in

    def element_scan_like():
        raise RuntimeError("The expanded size of the tensor (3) must match the existing size (65)")
    try:
        element_scan_like()
    except RuntimeError as e:
        m = Mismatch("torch", "error", float("inf"), 0.0, f"RuntimeError: {e}", _raised_in(e))
    assert m.where == "element_scan_like" and str(m).endswith("(in element_scan_like)")
    assert signature(m) == "RuntimeError in element_scan_like: The expanded size of the tensor (#) must match"
    other = Mismatch("torch", "error", float("inf"), 0.0, "RuntimeError: expected scalar type Double", "forward")
    assert signature(other) != signature(m) and signature(Mismatch("torch", "output y", 1.0, 0.0)) == "mismatch"
