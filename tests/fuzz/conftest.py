import random

import pytest

import recdsl
from recdsl.fuzz.generator import generate

N_CELLS = 400


@pytest.fixture(scope="session")
def generated():
    """(source, spec) of N_CELLS generated cells, seeds 0..N_CELLS-1."""
    return [(src, recdsl.load(src)) for src in (generate(random.Random(i)) for i in range(N_CELLS))]
