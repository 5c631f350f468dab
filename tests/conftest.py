import os
import warnings

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker, and every process a
# test launches, computes on one thread: two workers of torch's default thread count would put twice
# as many busy-waiting threads as cores on the machine, which slows every kernel many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)  # in case a plugin loaded torch before the variable above was set

import pytest  # noqa: E402

import diffguide as dg
from helpers import sd_schedule

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def sd():
    return sd_schedule()


@pytest.fixture(scope="session")
def gmm(sd):
    return dg.GaussianMixture.ring(sd)
