import random

import pytest

import recdsl
from recdsl.fuzz.generator import generate_tagged

N_CELLS = 400


@pytest.fixture(scope="session")
def tagged():
    """(source, tags) of N_CELLS generated cells, seeds 0..N_CELLS-1."""
    return [generate_tagged(random.Random(i)) for i in range(N_CELLS)]


@pytest.fixture(scope="session")
def generated(tagged):
    """(source, spec) of the same N_CELLS generated cells."""
    return [(src, recdsl.load(src)) for src, _ in tagged]
