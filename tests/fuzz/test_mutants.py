"""Mutants of the stdlib run end to end (check, plan, build, a short forward and backward on
reference and torch): accepted and run, or rejected with a RecError -- never an internal
error, never a hang."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from recdsl.cli import main
from recdsl.fuzz.mutants import Hang, stdlib_mutants, time_limit


def _assert_clean(report):
    assert not report.crashes, "\n\n".join(f"{what}\n{src}" for src, what, _ in report.crashes[:3])
    assert report.ran > 0 and report.rejected > 0   # both paths were exercised


def test_stdlib_mutants_end_to_end(tmp_path):
    _assert_clean(stdlib_mutants(150, seed=11, backends=["torch"], out=tmp_path))


@pytest.mark.slow
def test_three_thousand_stdlib_mutants(tmp_path):
    report = stdlib_mutants(3000, seed=2026, backends=["torch"], out=tmp_path)
    assert report.mutants == 3000
    _assert_clean(report)


def test_a_mutant_that_runs_too_long_is_a_hang():
    with pytest.raises(Hang):
        with time_limit(0.2):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:
                pass


def test_cli_mutants(tmp_path):
    result = CliRunner().invoke(main, ["fuzz", "--mutants", "20", "--seed", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "0 internal errors, 0 hangs" in result.output
