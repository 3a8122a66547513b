"Shared test setup: one thread per process (CI and `pytest -n 2` share two cores) and a modest hypothesis profile."
import os, sys
os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported anywhere

import torch
from hypothesis import settings

torch.set_num_threads(1)

settings.register_profile('ci', deadline=None, max_examples=50)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

import pytest
import fasterprune.all # noqa: F401 -- the library's own patches (`Learner.save`, `load`, `fit`, `compact`...) are in place before any test

@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread: a notebook or demo run in the same worker may have changed it, and float results
    (so near-tied scores, so masks) depend on the number of threads"""
    torch.set_num_threads(1)
    yield


def _patchable():
    "The classes a notebook patches with fastcore's `@patch`: fastai's and fastcore's, torch's `Module` and `Tensor`"
    out = {torch.nn.Module, torch.Tensor}
    for name, m in list(sys.modules.items()):
        if m is not None and name.partition('.')[0] in ('fastai', 'fastcore'):
            out.update(c for c in list(vars(m).values()) if isinstance(c, type) and c.__module__ == name)
    return out

def _from_main(v):
    "Whether `v` (a function, property, static or class method) was defined in `__main__`: in a notebook run in this process"
    f = v.fget if isinstance(v, property) else getattr(v, '__func__', v)
    return getattr(f, '__module__', None) == '__main__'

_missing = object()

@pytest.fixture(autouse=True)
def _no_notebook_patches():
    """Undo what a notebook run in this process patched onto fastai's classes, and give `__main__` back.

    `tests/test_nbs.py` runs each notebook in the pytest worker (nbdev's `test_nb`, an IPython shell that also replaces
    `sys.modules['__main__']`). A notebook that defines a patch (today only `07a_learner.ipynb`, where every change to
    fastai's classes lives) replaces the library's `Learner.fit`, `save`, `load`... for the rest of the worker with the
    notebook's copy. Those copies find the callbacks through the library's `SparsityCheckpoint`, so they behave as the
    library's do; but a notebook that defined its own copy of a class they look for (as `07_callback.ipynb` once did
    with `SparsifyCallback`, making every later `learn.load` in that worker skip the masks) would make later tests depend
    on which notebooks xdist gave the worker first. Each test therefore starts with the library's own functions."""
    main, before = sys.modules.get('__main__'), {c: dict(vars(c)) for c in _patchable()}
    yield
    if main is not None: sys.modules['__main__'] = main
    for c, old in before.items():
        for k, v in list(vars(c).items()):
            if old.get(k, _missing) is v or not _from_main(v): continue
            if k in old: setattr(c, k, old[k])
            else: delattr(c, k)
