"""Determinism (issue 6): same seed, same masks, run to run and process to process.

A fit seeded with fastai's `set_seed` (before its `DataLoaders` are built: their shuffling RNG is drawn then) gives
bit-identical masks, criterion state and weights when run twice. The engine's selection draws no random numbers (its
sample is strided, ties go to the earlier layer and position), and `random` scores come from a generator seeded by the
criterion's seed and the layer's name, so a fresh interpreter with another hash seed, another global torch seed and
another thread count computes the same masks. `tests/test_engine.py::test_random_criterion_is_seeded` covers one
process; the DDP tests cover two ranks in lockstep.
"""
import os, random, subprocess, sys
from functools import partial

import numpy as np
import pytest
import torch
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.callback import SparsifyCallback
from fasterprune.demo import digits_dls, small_cnn


def fit_masks(cfg):
    set_seed(0)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.1),
                    cbs=SparsifyCallback(0.8, **cfg))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    return sp.masks, sp.state, learn.model.state_dict()


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): same(a[k], b[k])
        else: assert torch.equal(a[k], b[k]), k


# an int `update_every`: the default 'auto' chooses its cadence from measured time (see test_cadence.py for its own determinism)
@pytest.mark.parametrize('cfg', [dict(scope='global', update_every=1), dict(criterion='movement', granularity='filter', exclude='fc', update_every=1),
                                 dict(criterion='random', scope='global', update_every=3)],
                         ids=['global', 'movement-filter', 'random-global'])
def test_same_seed_same_masks(cfg):
    "Two seeded fits with shuffled data: bit-identical masks, criterion state and weights"
    m1, s1, w1 = fit_masks(cfg)
    m2, s2, w2 = fit_masks(cfg)
    same(m1, m2); same(s1, s2); same(w1, w2)


def rng_states_after_fit(cbs):
    set_seed(0)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cbs)
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1]


def test_callback_draws_nothing_from_global_rngs():
    "torch's, Python's and numpy's global generators end a fit where they would without the callback: pruning never shifts a run's randomness"
    plain = rng_states_after_fit([])
    for cb in (SparsifyCallback(0.7, criterion='random', scope='global'), SparsifyCallback(0.5, granularity='filter', criterion='movement')):
        t, py, npy = rng_states_after_fit([cb])
        assert torch.equal(t, plain[0]) and py == plain[1] and (npy == plain[2]).all()


SCRIPT = r'''
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(int(sys.argv[3])) # the global RNG must not matter
from torch import nn
from fasterprune.sparsifier import Sparsifier
def model():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 10))
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g).round(decimals=1)) # many ties
    return m
out = {}
for name, kw in [('random', dict(criterion='random', scope='global')), ('random_local', dict(criterion='random')),
                 ('magnitude', dict(scope='global')), ('filter', dict(granularity='filter', scope='global', reduce='l2'))]:
    out[name] = Sparsifier(model(), 0.7, **kw).prune().masks
torch.save(out, sys.argv[1])
'''


@pytest.mark.slow
def test_masks_same_across_processes(tmp_path):
    """Two fresh interpreters with different PYTHONHASHSEED, global torch seeds and thread counts compute the same
    masks: for `random` and for magnitude scores full of ties (weights rounded to one decimal)"""
    script = tmp_path / 'masks.py'
    script.write_text(SCRIPT)
    res = []
    for i, (hash_seed, threads, seed) in enumerate([('1', 1, 1), ('2', 2, 99)]):
        env = {**os.environ, 'PYTHONHASHSEED': hash_seed, 'OMP_NUM_THREADS': str(threads), 'PYTHONWARNINGS': 'ignore'}
        out = tmp_path / f'{i}.pt'
        r = subprocess.run([sys.executable, str(script), str(out), str(threads), str(seed)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        res.append(torch.load(out))
    a, b = res
    for name in a: same(a[name], b[name])
    assert not all(torch.equal(a['random'][k], a['magnitude'][k]) for k in a['random'])
