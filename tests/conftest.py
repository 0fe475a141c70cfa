import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import language_examples  # noqa: E402


@pytest.fixture(scope="session")
def examples():
    return language_examples()
