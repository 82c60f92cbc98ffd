import pyro
import pytest
import torch

# small networks: one thread is as fast and immune to oversubscription when test processes share 2 cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts with an empty Pyro param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
