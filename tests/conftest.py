import os

import pytest
import torch

# Under pytest-xdist every worker is one process on a small machine: one thread each avoids
# oversubscribing the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
