"""Interrupts and resume (issue 6): a fit killed at a random batch resumes to the uninterrupted run's masks, and leaves the
model a plain model.

The kill is an exception raised from a callback at a batch and event drawn from a seeded RNG (so CI is reproducible and
each case is a different point of the schedule). Checkpoints come from `SaveModelCallback(every_epoch=True,
with_opt=True)`, which saves through `learn.save`: the model file plus the callback's `.sparsity.pth` sidecar. The
resumed run is a new `Learner` (other initial weights) with a new `SparsifyCallback`, loaded with `learn.load(...,
with_opt=True)` and continued with `fit_one_cycle(..., start_epoch=k)`. `tests/test_callback.py` already resumes after a
clean checkpoint for `movement` and `filter + update_every`; these cases add the kill and the other criteria and scopes.
"""
import random, warnings
from functools import partial

import pytest
import torch
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import SGD
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.callback import SparsifyCallback, sidecar
from fasterprune.demo import digits_dls, small_cnn

EPOCHS = 3
EVENTS = ['before_batch', 'after_pred', 'after_loss', 'after_backward', 'before_step', 'after_step', 'after_batch']


@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64, shuffle=False) # 23 batches; a fixed order, so two runs see the same batches


def mk(dls, path, cbs=None, seed=0):
    set_seed(seed)
    return Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=path, cbs=cbs,
                   opt_func=partial(SGD, mom=0.9, wd=1e-2))


def quiet_fit(learn, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(EPOCHS, 1e-2, **kwargs)
    return learn


class Kill(Callback):
    "Raise `exc` at training batch `at` (counted over the fit), from event `event`"
    def __init__(self, at, event, order, exc=RuntimeError):
        self.at, self.event, self.order, self.exc, self.n = at, event, order, exc, -1
        if event != 'before_batch': setattr(self, event, self._maybe)
    def before_batch(self):
        if self.training: self.n += 1
        if self.event == 'before_batch': self._maybe()
    def _maybe(self):
        if self.training and self.n == self.at: raise self.exc(f'killed at batch {self.n} in {self.event}')


def kill_point(seed, n_batches):
    "A batch after the first epoch (so a checkpoint exists), an event and a side of the SparsifyCallback, from `seed`"
    r = random.Random(seed)
    return r.randrange(n_batches, EPOCHS * n_batches), r.choice(EVENTS), r.choice([0, 99])


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): same(a[k], b[k])
        else: assert torch.equal(a[k], b[k]), k


# an int `update_every` (two runs are compared: 'auto' times its cadence; test_cadence.py resumes it under a fixed clock)
CASES = {
    'global-large_final': (dict(scope='global', update_every=1), 11),
    'local-taylor': (dict(criterion='taylor', update_every=1), 12),
    'global-random': (dict(scope='global', criterion='random', update_every=1), 13),
    'filter-movement-global': (dict(granularity='filter', exclude='fc', criterion='movement', scope='global', update_every=1), 14),
    'lamp-update_every': (dict(scope='global', criterion='lamp', update_every=7), 15),
}


@pytest.mark.parametrize('case', list(CASES))
def test_killed_fit_resumes_to_uninterrupted_masks(dls, tmp_path, case):
    cfg, seed = CASES[case]
    full = quiet_fit(mk(dls, tmp_path/'full', SparsifyCallback(0.85, **cfg)))
    at, event, order = kill_point(seed, len(dls.train))
    killed = mk(dls, tmp_path/'run', SparsifyCallback(0.85, **cfg))
    with pytest.raises(RuntimeError, match='killed'):
        quiet_fit(killed, cbs=[SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'), Kill(at, event, order)])
    epoch = at // len(dls.train) # the epoch it died in; its predecessor was checkpointed
    resumed = mk(dls, tmp_path/'run', SparsifyCallback(0.85, **cfg), seed=1).load(f'ckpt_{epoch - 1}', with_opt=True)
    # `learn.load` read the checkpoint's sidecar (it did not in the full suite while a notebook's `Learner.load` was left
    # patched on fastai: see `_no_notebook_patches` in tests/conftest.py)
    assert resumed.sparsify.state_dict() is not None, 'learn.load did not read the SparsifyCallback state of the checkpoint'
    with warnings.catch_warnings():
        warnings.simplefilter('error') # no "saved at another step" warning
        quiet_fit(resumed, start_epoch=epoch)
    a, b = full.sparsify.sparsifier, resumed.sparsify.sparsifier
    assert a.counts == b.counts
    same(a.masks, b.masks)
    same(a.state, b.state)
    same(full.model.state_dict(), resumed.model.state_dict())
    assert a.report().equals(b.report())
    assert b.counts == b.group_counts(1.) and b.sparsity_achieved() > 0.5 # and that is the full target


def plain_signature(model):
    "Everything fasterprune could leave on a model: state_dict keys, parameter/buffer names and types, module attributes, hooks"
    hooks = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks', '_state_dict_hooks',
             '_state_dict_pre_hooks', '_load_state_dict_pre_hooks', '_load_state_dict_post_hooks')
    mods = {n: (type(m).__name__, sorted(m.__dict__), sorted(m._parameters), sorted(m._buffers),
                {h: len(getattr(m, h)) for h in hooks}) for n, m in model.named_modules()}
    params = {n: (type(p).__name__, getattr(p, '_backward_hooks', None), getattr(p, '_post_accumulate_grad_hooks', None),
                  p.requires_grad) for n, p in model.named_parameters()}
    return list(model.state_dict()), mods, params


def global_hooks():
    from torch.nn.modules import module as M
    return [len(getattr(M, h)) for h in dir(M) if h.startswith('_global_') and isinstance(getattr(M, h), dict)]


@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize('gran', ['weight', 'filter'])
def test_interrupted_fit_leaves_a_plain_model(dls, tmp_path, gran, exc):
    "Killed mid-fit: the model has exactly a fresh `small_cnn`'s structure, loads strictly into one, and its zeros are the masks'"
    hooks_before = global_hooks()
    learn = mk(dls, tmp_path, SparsifyCallback(0.7, granularity=gran, exclude='fc' if gran == 'filter' else None))
    at = kill_point(21, len(dls.train))[0]
    event, order = ('after_step', 0) if gran == 'weight' else ('before_batch', 99) # before its re-mask; after its update
    with pytest.raises(exc): quiet_fit(learn, cbs=Kill(at, event, order, exc))
    assert plain_signature(learn.model) == plain_signature(small_cnn())
    assert global_hooks() == hooks_before
    plain = small_cnn()
    plain.load_state_dict(learn.model.state_dict(), strict=True)
    sp = learn.sparsify.sparsifier
    for l in sp.layers: assert not l.weight[~l.grouping.weight_mask(sp.masks[l.name])].any() # the kill left no weight half-masked
    learn.save('after_kill', with_opt=False) # and what it holds can be saved and resumed from
    saved = torch.load(sidecar(tmp_path/'models/after_kill.pth'), weights_only=True)['sparsify']['sparsifier']['masks']
    same(saved, sp.masks)
    plain.load_state_dict(torch.load(tmp_path/'models/after_kill.pth'), strict=True)


def test_interrupted_fit_leaves_the_learner_clean(dls, tmp_path):
    "fastai skips after_fit on an exception, yet the callback's `sparsity` column leaves learn.metrics, and the model stays plain"
    learn = mk(dls, tmp_path)
    n_metrics = len(learn.metrics)
    with pytest.raises(KeyboardInterrupt):
        quiet_fit(learn, cbs=[SparsifyCallback(0.7), Kill(30, 'after_backward', 99, KeyboardInterrupt)])
    assert len(learn.metrics) == n_metrics
    assert len(learn.validate()) == 1 + n_metrics
    quiet_fit(learn, cbs=SparsifyCallback(0.5)) # a new callback: one sparsity column, its own
    assert list(learn.recorder.metric_names).count('sparsity') == 1
