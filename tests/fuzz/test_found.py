"""Bugs the fuzzer found, as shrunk reproducers (tests/fuzz/found/*.rec, each with its
fuzz-case line; run on triton when the name starts with triton_, else on torch):
xfail(strict) until the backend is fixed; then the marker goes."""
from pathlib import Path

import pytest

from recdsl.fuzz.runner import Case, run_case

FOUND = Path(__file__).parent / "found"

XFAIL: dict[str, str] = {}  # name -> reason, while a found bug is open


@pytest.mark.parametrize("name", sorted(p.name for p in FOUND.glob("*.rec")))
def test_found_reproducer_agrees(name, request):
    if name in XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason=XFAIL[name]))
    path = FOUND / name
    case = Case.from_file(path.read_text(), str(path))
    assert case is not None, "a reproducer carries its fuzz-case line"
    res = run_case(case, ["triton" if name.startswith("triton_") else "torch"])
    assert not res.mismatches, [str(m) for m in res.mismatches]
