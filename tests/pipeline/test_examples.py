"""examples/char_lm.py: a model built from a new .rec cell (and from a stdlib cell) learns:
its loss falls well below the uniform guess within a few dozen CPU steps."""
from __future__ import annotations

import importlib.util
import math

import pytest

from helpers import ROOT


def _example():
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "examples" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cell", [None, "lstm"])
def test_char_lm_loss_goes_down(cell):
    lm = _example()
    losses = lm.train(cell or lm.CELL, steps=60, hidden=32, layers=1, log_every=20)
    vocab = len(set(lm.corpus()))
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < math.log(vocab) - 1.0, losses
