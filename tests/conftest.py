import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import language_examples  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: each keeps to one intra-op thread so the
    # workers do not oversubscribe the cores between them.
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def examples():
    return language_examples()
