"""The default mask-update cadence, `update_every='auto'` (issue 14): the counts follow the schedule at every step, the
weights are ranked again every `cadence` steps (chosen from measured time), and a resumed fit ranks where the
uninterrupted one did.

Timing-dependent choices are tested under a fixed clock (`Clock`), so that they are deterministic."""
import math, warnings
import pytest
import torch
from fastai.basics import Learner, CrossEntropyLossFlat, set_seed
from fastai.callback.all import SaveModelCallback
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

import fasterprune.cadence as fcad
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import one_cycle, one_shot
from fastai.callback.core import Callback
from fasterprune.demo import digits_dls, small_cnn


@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64, shuffle=False)

def mk(dls, cb, path='.', seed=0):
    set_seed(seed)
    return Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), path=path, cbs=cb)

def quiet_fit(learn, n=2, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n, 1e-2, **kwargs)
    return learn

class Clock:
    "A `time` stand-in whose every reading is one second after the last: a recompute and a training step each take one second"
    def __init__(self): self.now = 0.
    def perf_counter(self): self.now += 1.; return self.now

@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(fcad, 'time', c)
    return c

def recomputes(cb):
    "The optimizer steps (batch indices of the fit) at which the achieved sparsity changed"
    a = cb._hist['achieved']
    return [i for i in range(1, len(a)) if a[i] != a[i - 1]]

ROUNDING = 2e-3 # the masks prune whole groups: the achieved sparsity is the target rounded per layer


def test_default_is_auto_and_ends_exact(dls):
    cb = SparsifyCallback(0.9)
    assert cb.update_every == 'auto' and cb.cadence is None and SparsifyCallback(0.9, update_every=None).update_every == 'auto'
    quiet_fit(mk(dls, cb), 3)
    assert cb.cadence >= 1 and cb.cadence & (cb.cadence - 1) == 0 # a power of two, chosen in this fit
    assert set(cb.timing) == {'step_ms', 'update_ms'} and all(v > 0 for v in cb.timing.values())
    assert cb._hist['achieved'][-1] == pytest.approx(0.9, abs=1e-3) # the last step recomputes: the final count is exact
    assert cb.sparsifier.counts == cb.sparsifier.group_counts(1.)
    assert cb.max_gap == max(abs(t - a) for t, a in zip(cb._hist['target'], cb._hist['achieved']))
    assert cb.max_gap < ROUNDING # the counts follow the schedule at every step, between rankings too


@pytest.mark.parametrize('budget,min_rankings,cadence', [(0.02, 32, 64), (0.02, 1, 64), (0.25, 1, 4), (1., 1, 1)])
def test_cadence_from_the_timed_costs(dls, clock, budget, min_rankings, cadence):
    "Ranking ÷ step = 1 under the fixed clock: cadence = the smallest power of two n with 1 / n <= budget; a ranking every n steps, or one per 1/min_rankings of the fit if that is sooner"
    cb = SparsifyCallback(0.9)
    cb.budget, cb.min_rankings = budget, min_rankings
    quiet_fit(mk(dls, cb), 3) # 69 steps: 64 · 32 > 69, so the first case ranks once in each 1/32 of the fit
    assert cb.cadence == cadence and cb.timing == dict(step_ms=1e3, update_ms=1e3)
    steps = 3 * len(dls.train)
    pools = len(cb.sparsifier._pools()) # after the timed steps, each pool is ranked once more when its count next changes
    spaced, s = 0, 0
    while s < steps: spaced, s = spaced + 1, cb._next(s) # every `cadence` steps, or every `max_age`, or once per 32nd of the fit
    assert spaced <= max(math.ceil(steps / min(cadence, cb.max_age)), min(min_rankings, steps)) + 1
    assert cb.n_updates <= 4 + pools + spaced + 1 # timed, first queues, the spaced ones, the last
    if min_rankings == 32: assert cb.n_updates >= min_rankings and cb.n_updates < steps
    if cadence == 1: assert cb.n_updates == steps
    assert cb.max_gap < ROUNDING and len(recomputes(cb)) > steps // 2 # the masks change at most steps all the same


class RankedAt(Callback):
    "The optimizer steps at which the sparsifier ranked the weights"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.steps = []
    def before_batch(self):
        if self.training and self.sparsify.sparsifier.ranked: self.steps.append(self.sparsify.step)


def test_short_fit_ranks_once_in_each_32nd(dls, clock):
    "When the budget's cadence is sparser than 1/32 of the fit, a ranking comes at the start of each 1/32 of it: every 32nd has one, gaps within one step of steps/32"
    cb, at = SparsifyCallback(0.9), RankedAt()
    quiet_fit(mk(dls, [cb, at]), 3) # 69 steps; under the clock the budget's cadence is 64
    steps = 3 * len(dls.train)
    assert cb.cadence * cb.min_rankings > steps
    assert {s * 32 // steps for s in at.steps} == set(range(32)) and len(at.steps) < steps
    gaps = [b - a for a, b in zip(at.steps, at.steps[1:] + [steps])]
    assert max(gaps) <= math.ceil(steps / 32)
    assert cb.max_gap < ROUNDING and cb._hist['achieved'][-1] == pytest.approx(0.9, abs=1e-3) # the counts at every step all the same


def test_auto_takes_a_jump_at_once(dls, clock):
    "With a step schedule (one_shot) the jump is taken at once, even with a long cadence"
    cb = SparsifyCallback(0.8, schedule=one_shot)
    quiet_fit(mk(dls, cb), 2)
    jump = next(i for i, t in enumerate(cb._hist['target']) if t > 0)
    assert cb._hist['achieved'][jump] == pytest.approx(0.8, abs=1e-3) and cb.max_gap < 2e-3


@pytest.mark.parametrize('bad', [0, -2, 'every', 1.5, True])
def test_bad_update_every_names_what_is_allowed(bad):
    with pytest.raises(ValueError, match="`update_every` must be 'auto'"): SparsifyCallback(0.9, update_every=bad)


def test_resumed_auto_fit_recomputes_where_the_uninterrupted_one_did(dls, tmp_path, monkeypatch):
    "A checkpoint keeps the cadence and where the last recompute was: the resumed fit ends with the same masks and weights"
    def cb():
        c = SparsifyCallback(0.85, scope='global')
        c.budget, c.min_rankings = 0.25, 1 # cadence 4 under the clock: when the last ranking was decides when the next one is
        return c
    monkeypatch.setattr(fcad, 'time', Clock())
    full = quiet_fit(mk(dls, cb(), tmp_path/'full'), 3)
    monkeypatch.setattr(fcad, 'time', Clock())
    run = quiet_fit(mk(dls, cb(), tmp_path/'run'), 3, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    assert run.sparsify.cadence == full.sparsify.cadence == 4
    monkeypatch.setattr(fcad, 'time', Clock())
    resumed = mk(dls, cb(), tmp_path/'run', seed=1).load('ckpt_0', with_opt=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        quiet_fit(resumed, 3, start_epoch=1)
    a, b = full.sparsify, resumed.sparsify
    assert b.cadence == 4 and b.timing is None # from the checkpoint: not timed again
    assert [s for s in recomputes(a) if s > len(dls.train)] == [s + len(dls.train) for s in recomputes(b)]
    for k, m in a.sparsifier.masks.items(): assert torch.equal(m, b.sparsifier.masks[k]), k
    for k, w in full.model.state_dict().items(): assert torch.equal(w, resumed.model.state_dict()[k]), k


@pytest.mark.parametrize('crit', ['movement', 'taylor'])
def test_gradient_criteria_wait_for_the_first_gradient(dls, crit):
    "An ordinary fit with a gradient criterion gives no 'no gradient yet' warning (nothing is ranked before the first backward pass)"
    cb = SparsifyCallback(0.8, criterion=crit)
    learn = mk(dls, cb)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet_fit(learn)
    assert not [w for w in ws if 'no gradient yet' in str(w.message)], [str(w.message) for w in ws]
    assert not cb.sparsifier.by_magnitude and cb.sparsifier.sparsity_achieved() == pytest.approx(0.8, abs=1e-3)
    assert cb._hist['achieved'][0] == 0 and cb._hist['achieved'][1] > 0 # the first step waited, the second pruned


def test_a_frozen_layer_still_warns(dls):
    "A layer that never gets a gradient is scored by magnitude, and the warning names it"
    cb = SparsifyCallback(0.8, criterion='movement')
    learn = mk(dls, cb)
    first_conv = next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match='has seen no gradient yet for 1 layer'): quiet_fit(learn)
    assert len(cb.sparsifier.by_magnitude) == 1
