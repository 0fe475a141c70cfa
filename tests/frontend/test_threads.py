"""The front end is thread-safe: 8 threads parse, check and plan every stdlib cell (and a few
broken ones) at once, and each gets exactly what a single thread gets -- the same plan, and
for a broken file the same error at the same place."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import recdsl
from recdsl.errors import RecError
from recdsl.spec import stdlib_files

BROKEN = [
    "cell c(D):\n    input x[D]\n    state h[D]\n    h' = tanh(h + (x * 2)\n    output y = h'\n",
    "cell c(D):\n    input x[D]\n   state h[D]\n",
    "cell c(D):\n    input x[D]\n\tstate h[D]\n",
    "cell c(D):\n    input x[D]\n    state h[D]\n    h' = h + y\n    output y = h'\n",
]


def _front_end(text: str, name: str) -> str:
    """What one file yields: the plan of each cell, or the located error."""
    try:
        return "\n".join(str(spec.plan()) for spec in recdsl.load_all(text))
    except RecError as e:
        return f"error at {e.span.line}:{e.span.col}: {e}" if e.span else f"error: {e}"


def _jobs() -> list[tuple[str, str]]:
    jobs = [(p.read_text(), str(p)) for p in stdlib_files().values()]
    return jobs + [(text, f"<broken {i}>") for i, text in enumerate(BROKEN)]


@pytest.mark.parametrize("threads", [8])
def test_front_end_in_threads_matches_one_thread(threads):
    jobs = _jobs()
    serial = [_front_end(text, name) for text, name in jobs]
    assert sum(s.startswith("error") for s in serial) == len(BROKEN)
    with ThreadPoolExecutor(threads) as pool:
        rounds = [list(pool.map(lambda job: _front_end(*job), jobs * 2)) for _ in range(2)]
    for got in rounds:
        mismatched = [jobs[i % len(jobs)][1] for i, g in enumerate(got) if g != serial[i % len(jobs)]]
        assert not mismatched, f"threads changed the result of {mismatched[:5]}"
