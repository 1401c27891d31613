"""Gates tests run vectorised simulations: on the shared, loaded 2-core machine intra-op threads
only contend (a 50k-element op took 1000x longer with 2 threads than with 1), so every test here
runs with one torch thread, restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
