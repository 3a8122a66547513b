"Shared test setup: one thread per process (CI and `pytest -n 2` share two cores) and a modest hypothesis profile."
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported anywhere

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile('ci', deadline=None, max_examples=50)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

import pytest

@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread: a notebook or demo run in the same worker may have changed it, and float results
    (so near-tied scores, so masks) depend on the number of threads"""
    torch.set_num_threads(1)
    yield
