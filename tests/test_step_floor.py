"""What each optimizer step costs the callback (issue 14): gradients are masked at every step, but the weights are
masked again after the step only where the optimizer could move a pruned weight.

A pruned weight has zero value, zero gradient (masked after `backward`) and zero optimizer state (zeroed when it was
pruned). fastai's optimizers and PyTorch's element-wise ones then leave it at exactly zero, so the callback skips the
full `apply` after their steps (`keeps_zeros`), and applies all masks once as a fit starts and once as it ends. Any other optimizer gets
`apply` after every step. Both halves are checked here by what they promise: pruned weights exactly zero after every
optimizer step, for every optimizer `keeps_zeros` trusts, and for one it must not trust."""
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn
from fastai.basics import Learner, CrossEntropyLossFlat, set_seed
from fastai.callback.core import Callback
from fastai.optimizer import SGD, Adam, RAdam, QHAdam, Lamb, Larc, RMSProp, ranger, OptimWrapper, Optimizer, sgd_step

from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import keeps_zeros
from fasterprune.sparsifier import Sparsifier
from fasterprune.demo import digits_dls

torch.set_num_threads(1)

def mlp():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 48), act1=nn.ReLU(), fc2=nn.Linear(48, 32), act2=nn.ReLU(), fc3=nn.Linear(32, 10)))

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64)

class Flat(nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(x.view(x.shape[0], -1))

class ZerosChecked(Callback):
    "After every optimizer step (after the pruning callback's own `after_step`): the pruned weights are exactly zero"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.steps, self.bad = 0, []
    def after_step(self):
        sp = self.learn.cbs.filter(lambda c: isinstance(c, SparsifyCallback))[0].sparsifier
        self.steps += 1
        for l in sp.layers:
            m = sp.masks.get(l.name)
            if m is None: continue
            w = l.module.weight.detach()
            if bool((w != 0).logical_and(~l.grouping.weight_mask(m)).any()): self.bad.append((self.steps, l.name))

class Drift(torch.optim.Optimizer):
    "An optimizer `keeps_zeros` cannot know: every step moves every weight, gradient or not"
    def __init__(self, params, lr=1e-3, weight_decay=0.): super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g['params']: p.add_(-g['lr'] * (p.grad if p.grad is not None else 0.) + 1e-3)

def wrapped(cls, **kw): return partial(OptimWrapper, opt=partial(cls, **kw))

def fit(dls, opt_func, granularity='weight', update_every='auto'):
    set_seed(0)
    cb = SparsifyCallback(0.5 if ':' in granularity else 0.8, granularity=granularity, update_every=update_every)
    learn = Learner(dls, Flat(mlp()), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, cbs=[cb, ZerosChecked()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, wd=0.1) # not `fit_one_cycle`: Adagrad has no momentum to schedule
    return learn, cb

TRUSTED = dict(sgd=SGD, sgd_momentum=partial(SGD, mom=0.9), adam=Adam, radam=RAdam, qhadam=QHAdam, lamb=Lamb, larc=Larc,
               rmsprop=partial(RMSProp, mom=0.9), ranger=ranger, torch_adamw=wrapped(torch.optim.AdamW),
               torch_sgd_nesterov=wrapped(torch.optim.SGD, momentum=0.9, nesterov=True), torch_rmsprop=wrapped(torch.optim.RMSprop, centered=True),
               torch_adagrad=wrapped(torch.optim.Adagrad), torch_adamax=wrapped(torch.optim.Adamax), torch_nadam=wrapped(torch.optim.NAdam))

@pytest.mark.parametrize('name', list(TRUSTED))
def test_trusted_optimizers_keep_pruned_weights_at_zero_without_apply(dls, name, monkeypatch):
    applies = []
    real = Sparsifier.apply
    monkeypatch.setattr(Sparsifier, 'apply', lambda self: (applies.append(1), real(self))[1])
    learn, cb = fit(dls, TRUSTED[name])
    probe = learn.cbs.filter(lambda c: isinstance(c, ZerosChecked))[0]
    assert keeps_zeros(learn.opt) and not cb._apply_every_step
    assert probe.steps == cb.starts[-1] > 0 and probe.bad == [], probe.bad[:5]
    assert len(applies) == 2 # not after every step: once as the fit starts, once as it ends
    assert abs(cb.sparsifier.sparsity_achieved() - 0.8) < 0.01

def test_an_unknown_optimizer_gets_apply_after_every_step(dls):
    learn, cb = fit(dls, wrapped(Drift))
    probe = learn.cbs.filter(lambda c: isinstance(c, ZerosChecked))[0]
    assert not keeps_zeros(learn.opt) and cb._apply_every_step
    assert probe.steps > 0 and probe.bad == [], probe.bad[:5]

def test_a_fastai_optimizer_with_a_step_of_its_own_is_not_trusted(dls):
    def noisy_step(p, lr, **kwargs): p.data.add_(1e-3) # moves every weight: not one of fastai's steps
    learn, cb = fit(dls, lambda params, lr=1e-3, **kw: Optimizer(params, [sgd_step, noisy_step], lr=lr, **kw))
    probe = learn.cbs.filter(lambda c: isinstance(c, ZerosChecked))[0]
    assert cb._apply_every_step and probe.bad == []

@pytest.mark.parametrize('granularity', ['filter', '2:4'])
def test_structured_masks_stay_applied_without_apply(dls, granularity):
    learn, cb = fit(dls, Adam, granularity=granularity, update_every=1)
    probe = learn.cbs.filter(lambda c: isinstance(c, ZerosChecked))[0]
    assert not cb._apply_every_step and probe.steps > 0 and probe.bad == [], probe.bad[:5]
