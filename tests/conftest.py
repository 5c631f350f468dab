import warnings

import pytest

import diffguide as dg
from helpers import sd_schedule

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def sd():
    return sd_schedule()


@pytest.fixture(scope="session")
def gmm(sd):
    return dg.GaussianMixture.ring(sd)
