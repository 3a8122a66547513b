"""Ordinary fastai workflows around `SparsifyCallback` that used to fail silently (issues 12 and 13): each either works as a
user would expect or says so. Small data and models: a 16-32-4 MLP on 256 random points, the digits CNN where it matters."""
import random, warnings
from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.torch_core import set_seed
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy, ValueMetric
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback
from fastai.callback.schedule import fit_one_cycle, fine_tune, lr_find # noqa: F401 -- patch Learner
from fastai.callback.hook import summary # noqa: F401

import fasterprune.callback as fpcb
from fasterprune.sparsifier import state_mirrors
from fasterprune.callback import SparsifyCallback, optimizer_steps
from fasterprune.criteria import Criterion
from fasterprune.schedules import one_cycle, one_shot
from fasterprune.demo import digits_dls, small_cnn

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---------------------------------------------------------------- small things to train

def points(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return list(zip(x, (x[:, :4] * 2).argmax(1)))

def tiny_dls(bs=32, shuffle=True):
    ds = points()
    return DataLoaders(DataLoader(ds[:192], bs=bs, shuffle=shuffle), DataLoader(ds[192:], bs=bs))

def mlp():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act=nn.ReLU(), fc2=nn.Linear(32, 4)))

def tiny(path, cbs=None, dls=None, model=None, seed=0, **kwargs):
    set_seed(seed)
    return Learner(dls or tiny_dls(), model or mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=path, cbs=cbs, **kwargs)

def quiet(learn, n, lr=1e-2, one_cycle=True, **kwargs):
    with learn.no_bar(), learn.no_logging(): (learn.fit_one_cycle if one_cycle else learn.fit)(n, lr, **kwargs)
    return learn

def pruned_share(sp):
    "Share of the pruned layers' weights that are exactly zero"
    return sum(int((l.weight == 0).sum()) for l in sp.layers) / sum(l.weight.numel() for l in sp.layers)

def at_target(sp, share=1.):
    return sp.counts == sp.group_counts(share)

def consistent(sp):
    "Every weight a mask prunes is zero"
    return all(not l.weight[~l.grouping.weight_mask(m)].any() for l in sp.layers if (m := sp.masks.get(l.name)) is not None)

def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def messages(ws, part='SparsifyCallback'): return [str(w.message) for w in ws if part in str(w.message)]

class Boom(Callback):
    "Raise `exc` at batch `at` of the first loop where `when(self)` holds (or at its `after_epoch`)"
    order = 100
    def __init__(self, when, at, exc, event='after_batch'): self.when, self.at, self.exc, self.event, self.fired = when, at, exc, event, False
    def _maybe(self, event, i=None):
        if self.fired or event != self.event or not self.when(self) or (i is not None and i != self.at): return
        self.fired = True
        raise self.exc('boom')
    def after_batch(self): self._maybe('after_batch', self.iter)
    def after_epoch(self): self._maybe('after_epoch')

# ---------------------------------------------------------------- 1 and 7: only a training fit changes pruning state

@settings(max_examples=8, **SETTINGS)
@given(where=st.sampled_from(['lr_find', 'validate', 'get_preds']), at=st.integers(0, 1), # 2 validation batches
       exc=st.sampled_from([KeyboardInterrupt, RuntimeError]), event=st.sampled_from(['after_batch', 'after_epoch']),
       fitted=st.booleans())
def test_interrupted_lr_find_or_validate_leaves_pruning_on(tmp_path_factory, where, at, exc, event, fitted):
    "Whatever stopped an `lr_find`, `validate` or `get_preds` (Ctrl-C, another callback's error), the next fit prunes"
    learn = tiny(tmp_path_factory.mktemp('w'), cbs=SparsifyCallback(0.8))
    if fitted: quiet(learn, 1)
    in_lr_find = lambda cb: hasattr(cb.learn, 'lr_finder')
    boom = Boom(in_lr_find if where == 'lr_find' else (lambda cb: not cb.training), at, exc, 'after_batch' if where == 'lr_find' else event)
    with learn.added_cbs(boom), learn.no_bar(), learn.no_logging(), pytest.raises(exc):
        if where == 'lr_find': learn.lr_find(num_it=10, show_plot=False)
        elif where == 'validate': learn.validate()
        else: learn.get_preds()
    quiet(learn, 2)
    sp = learn.sparsify.sparsifier
    assert at_target(sp) and consistent(sp)
    assert pruned_share(sp) == pytest.approx(0.8, abs=0.01)

def test_summary_validate_get_preds_lr_find_change_no_pruning_state(tmp_path):
    "`summary`, `validate`, `get_preds` and `lr_find` between `learn.load` and an `lth` resume change nothing; `summary` never raises"
    def cb(): return SparsifyCallback(0.8, partial(one_shot, start=0.6), lth=True, rewind_epoch=1)
    fresh = tiny(tmp_path, cbs=cb())
    with fresh.no_bar(): fresh.summary() # used to raise: `rewind_epoch`=1, but this fit has 1 epochs
    assert fresh.sparsify.sparsifier is None
    full = tiny(tmp_path, dls=tiny_dls(shuffle=False), cbs=cb())
    quiet(full, 3, one_cycle=False, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    resumed = tiny(tmp_path, dls=tiny_dls(shuffle=False), cbs=cb(), seed=1).load('ckpt_1', with_opt=True)
    pending = resumed.sparsify._pending
    with resumed.no_bar(), resumed.no_logging():
        resumed.summary(); resumed.validate(); resumed.get_preds(); resumed.lr_find(num_it=5, show_plot=False)
    assert resumed.sparsify._pending is not None and same(resumed.sparsify._pending['snapshot'], pending['snapshot'])
    resumed.load('ckpt_1', with_opt=True) # lr_find trained the weights: back to the checkpoint
    quiet(resumed, 3, one_cycle=False, start_epoch=2) # used to fail: the lottery-ticket snapshot was dropped by `summary`
    assert same(resumed.sparsify.sparsifier.masks, full.sparsify.sparsifier.masks)
    assert same(resumed.model.state_dict(), full.model.state_dict())

# ---------------------------------------------------------------- 2: the layers pruned are those in the model now

def test_new_head_between_fits_is_noticed_and_pruned(tmp_path):
    learn = quiet(tiny(tmp_path, cbs=SparsifyCallback(0.8, partial(one_shot, start=0.))), 1)
    old_fc1 = learn.sparsify.sparsifier.masks['fc1']
    learn.model.fc2 = nn.Linear(32, 4) # a new head on the same model object
    class Probe(Callback):
        order = SparsifyCallback.order + 1
        def before_fit(self): self.kept = self.sparsify.sparsifier.masks.get('fc1') is old_fc1
    probe = Probe()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 1, cbs=probe)
    msg = messages(ws, 'changed')
    assert len(msg) == 1 and "replaced: ['fc2']" in msg[0] and 'keeping the masks of the 1 unchanged' in msg[0]
    assert probe.kept # the unchanged layer kept its mask through the rebuild
    sp = learn.sparsify.sparsifier
    assert sp.layers[-1].module is learn.model.fc2
    assert float((learn.model.fc2.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    assert pruned_share(sp) == pytest.approx(0.8, abs=0.01)

# ---------------------------------------------------------------- 3: resume with the callback passed to `fit(cbs=...)`

@settings(max_examples=4, **SETTINGS)
@given(stop=st.integers(0, 2), lr_find_first=st.booleans())
def test_resume_with_callback_passed_to_fit(tmp_path_factory, stop, lr_find_first):
    "The README's way: the callback passed to each fit; `learn.load` keeps the state for the next fit's callback"
    path = tmp_path_factory.mktemp('r')
    def cb(): return SparsifyCallback(0.8, criterion='movement')
    full = tiny(path, dls=tiny_dls(shuffle=False))
    quiet(full, 4, cbs=[cb(), SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt')])
    resumed = tiny(path, dls=tiny_dls(shuffle=False), seed=1).load(f'ckpt_{stop}', with_opt=True)
    if lr_find_first: # its own save and load keep the state `learn.load` read for the next fit
        with resumed.no_bar(), resumed.no_logging(): resumed.lr_find(num_it=5, show_plot=False)
    c = cb()
    with warnings.catch_warnings():
        warnings.simplefilter('error') # no warning: the state is taken, at the step it was saved at
        quiet(resumed, 4, cbs=c, start_epoch=stop + 1)
    assert same(c.sparsifier.masks, full.recorder.sparsify_cbs[0].sparsifier.masks)
    assert same(resumed.model.state_dict(), full.model.state_dict())

def test_sidecar_taken_by_no_callback_warns(tmp_path):
    learn = quiet(tiny(tmp_path, cbs=SparsifyCallback(0.8)), 1)
    learn.save('m')
    plain = tiny(tmp_path).load('m')
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(plain, 1) # no SparsifyCallback: trains without the masks
    assert len(messages(ws, 'taken by no callback')) == 1
    other = tiny(tmp_path).load('m')
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(other, 1, cbs=SparsifyCallback(0.8, partial(one_shot, start=0.))) # named `sparsify`: takes it
    assert not messages(ws, 'taken by no callback')
    assert same(other.recorder.sparsify_cbs[0].sparsifier.masks, learn.sparsify.sparsifier.masks)

# ---------------------------------------------------------------- 5: skipped batches, early stops

class Skip(Callback):
    "Skip the training batches `which` of the last epoch (before or after the SparsifyCallback's `before_batch`)"
    def __init__(self, which, early): self.which, self.order = set(which), (SparsifyCallback.order - 1 if early else SparsifyCallback.order + 1)
    def before_batch(self):
        if self.training and self.epoch == self.n_epoch - 1 and self.iter in self.which: raise CancelBatchException()

@settings(max_examples=8, **SETTINGS)
@given(which=st.sets(st.integers(0, 5), min_size=1, max_size=4), early=st.booleans(),
       gran=st.sampled_from(['weight', 'filter']), update_every=st.sampled_from([None, 4]))
def test_skipped_batches_still_end_at_the_target(tmp_path_factory, which, early, gran, update_every):
    learn = tiny(tmp_path_factory.mktemp('s'), cbs=[SparsifyCallback(0.7, granularity=gran, scope='global', update_every=update_every),
                                                  Skip(which, early)])
    quiet(learn, 2)
    sp = learn.sparsify.sparsifier
    assert at_target(sp) and consistent(sp)
    assert learn.recorder.values[-1][-1] == pytest.approx(sp.sparsity_achieved(of='groups'))

@settings(max_examples=5, **SETTINGS)
@given(stop=st.integers(0, 2), how=st.sampled_from(['early_stopping', 'cancel']))
def test_early_stop_warns_and_one_line_prunes_to_target(tmp_path_factory, stop, how):
    class Stop(Callback):
        order = 90
        def after_epoch(self):
            if self.epoch == stop: raise CancelFitException()
    learn = tiny(tmp_path_factory.mktemp('e'), cbs=SparsifyCallback(0.9))
    if how == 'early_stopping': # a metric that gets worse every epoch: EarlyStoppingCallback stops after `stop` more
        learn.metrics = [ValueMetric(lambda: float(learn.epoch), 'epoch_no')]
        extra = EarlyStoppingCallback(monitor='epoch_no', comp=np.less, patience=stop)
    else: extra = Stop()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 6, cbs=extra)
    msg = messages(ws, 'cancelled')
    assert len(msg) == 1 and 'learn.sparsify_to_target()' in msg[0] and 'of the 0.9 target' in msg[0]
    sp = learn.sparsify.sparsifier
    assert not at_target(sp)
    learn.sparsify_to_target()
    assert at_target(sp) and consistent(sp)
    states = state_mirrors(learn.opt)
    for l in sp.layers:
        dead = ~l.grouping.weight_mask(sp.masks[l.name])
        assert not any(t[dead].any() for t in states(l.weight))

# ---------------------------------------------------------------- 6: GradientAccumulation with batch sizes that cannot be told

class Steps(Callback):
    order = SparsifyCallback.order + 1
    def before_fit(self): self.n, self.targets = 0, []
    def after_step(self): self.n += 1
    def after_batch(self):
        if self.training: self.targets.append(self.sparsify.sparsity * self.sparsify._share)

def test_gradient_accumulation_with_a_subset_sampler_counts_real_steps(tmp_path):
    from torch.utils.data import DataLoader as TorchDL, SubsetRandomSampler
    ds = points()
    dl = TorchDL(ds, batch_size=32, sampler=SubsetRandomSampler(range(100))) # 4 batches: 32, 32, 32, 4
    steps = Steps()
    learn = tiny(tmp_path, dls=DataLoaders(dl, TorchDL(ds[192:], batch_size=32)), cbs=[GradientAccumulation(n_acc=64), SparsifyCallback(0.8), steps])
    want = optimizer_steps(learn, 3)
    assert want == [0, 1, 3, 4] # 100 items per epoch, a step every 64, the count carried across epochs
    quiet(learn, 3)
    assert steps.n == want[-1] and steps.targets[0] < 0.8 and steps.targets[-1] == 0.8
    assert at_target(learn.sparsify.sparsifier)

def test_gradient_accumulation_with_a_batch_sampler_advances_by_batch(tmp_path):
    from torch.utils.data import DataLoader as TorchDL
    ds = points()
    dl = TorchDL(ds, batch_sampler=[list(range(i, i + 24)) for i in range(0, 192, 24)]) # 8 batches of unknown size
    steps = Steps()
    learn = tiny(tmp_path, dls=DataLoaders(dl, TorchDL(ds[192:], batch_size=32)), cbs=[GradientAccumulation(n_acc=64), SparsifyCallback(0.8), steps])
    assert optimizer_steps(learn, 2) is None
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 2)
    msg = messages(ws, 'by training batch')
    assert len(msg) == 1 and '16 batches' in msg[0]
    t = steps.targets
    assert len(t) == 16 and t[0] == pytest.approx(0.8 * one_cycle(0)) and t[-1] == 0.8 and t[0] < t[8] # never the full target at once
    assert at_target(learn.sparsify.sparsifier)

# ---------------------------------------------------------------- 9: resumed fits of another length, interrupts, bad values

def test_resume_with_other_length_or_accumulation_warns(tmp_path):
    full = tiny(tmp_path, dls=tiny_dls(shuffle=False), cbs=SparsifyCallback(0.8))
    quiet(full, 4, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    def resume(n, start, cbs=None):
        learn = tiny(tmp_path, dls=tiny_dls(shuffle=False), cbs=SparsifyCallback(0.8)).load('ckpt_1', with_opt=True)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            quiet(learn, n, start_epoch=start, cbs=cbs)
        return messages(ws)
    assert resume(4, 2) == []
    longer = resume(8, 2) # the same step at epoch 2, but a fit of 48 steps, not 24
    assert len(longer) == 1 and 'fit of 24 optimizer steps, but this one makes 48' in longer[0]
    acc = resume(4, 2, cbs=GradientAccumulation(n_acc=64))
    assert len(acc) == 1 and 'saved at optimizer step 12, but this fit resumes at step 6' in acc[0] and 'fit of 24' in acc[0]

class Flaky(Criterion):
    "Magnitude scores, with a KeyboardInterrupt at the `at`-th score once `armed`"
    def __init__(self, at): self.at, self.armed, self.calls = at, False, 0
    def score(self, layer, state):
        if self.armed:
            self.calls += 1
            if self.calls == self.at: self.armed = False; raise KeyboardInterrupt
        return layer.weight.detach().abs()
    def __repr__(self): return 'Flaky()'

@settings(max_examples=8, **SETTINGS)
@given(at=st.integers(1, 4), phase=st.sampled_from(['score', 'apply']), scope=st.sampled_from(['local', 'global']),
       batch=st.integers(1, 4))
def test_ctrl_c_inside_a_mask_update_leaves_masks_and_weights_consistent(tmp_path_factory, at, phase, scope, batch):
    path = tmp_path_factory.mktemp('k')
    crit = Flaky(at)
    class Arm(Callback):
        order = SparsifyCallback.order - 1
        def before_batch(self):
            if self.training and self.iter == batch: crit.armed = True
    import fasterprune.sparsifier as fpsp
    calls, orig_mask, orig_zero = [0], fpsp.Sparsifier._mask_tensors, fpsp.zero_at
    def tick(): # a Ctrl-C while `update` applies the new masks, layer by layer: the masks and counts are new, some weights not yet
        if crit.armed and phase == 'apply':
            calls[0] += 1
            if calls[0] == at: crit.armed = False; raise KeyboardInterrupt
    def mask_tensors(sp, attr, layers=None):
        if attr == 'data': tick()
        return orig_mask(sp, attr, layers)
    def zero_at(t, idx): tick(); return orig_zero(t, idx)
    learn = tiny(path, cbs=[SparsifyCallback(0.8, criterion=crit, scope=scope, update_every=1), Arm()]) # ranks at the armed batch
    if phase == 'apply': crit.at = 10 ** 9
    fpsp.Sparsifier._mask_tensors, fpsp.zero_at = mask_tensors, zero_at
    try:
        with pytest.raises(KeyboardInterrupt): quiet(learn, 1)
    finally: fpsp.Sparsifier._mask_tensors, fpsp.zero_at = orig_mask, orig_zero
    sp = learn.sparsify.sparsifier
    assert consistent(sp)
    for key, k in sp.counts.items(): # the counts describe the masks
        names = [l.name for l in sp.layers] if key == '*' else [key]
        assert sum(int((~sp.masks[n]).sum()) for n in names) == k
    learn.save('cut')
    back = tiny(path, cbs=SparsifyCallback(0.8, criterion=Flaky(0), scope=scope)).load('cut')
    assert consistent(back.sparsify.build())

def test_schedule_returning_a_string_is_refused_before_the_fit(tmp_path):
    learn = tiny(tmp_path)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    sched = lambda pos: '0.5' if 0.2 < pos < 0.8 else pos
    with pytest.raises(TypeError, match=r"`schedule`=.* returned '0.5' \(str\)"): quiet(learn, 1, cbs=SparsifyCallback(0.5, sched))
    assert same(learn.model.state_dict(), before)
    quiet(learn, 1, cbs=SparsifyCallback(0.5, lambda pos: np.float32(pos))) # numpy numbers are numbers

def test_meta_device_model_is_refused_clearly(tmp_path):
    with torch.device('meta'): model = mlp()
    learn = tiny(tmp_path, model=model)
    with pytest.raises(ValueError, match='meta device.*fc1.weight.*to_empty'): quiet(learn, 1, cbs=SparsifyCallback(0.5))

# ---------------------------------------------------------------- issue 12: fine_tune, SaveModelCallback, lazy modules, column

def head_split(m):
    body = [p for n, p in m.named_parameters() if n.startswith(('conv1', 'conv2', 'bn1', 'bn2'))]
    return [body, [p for p in m.parameters() if all(p is not q for q in body)]]

def test_fine_tune_prunes_once_in_the_unfrozen_phase():
    class Probe(Callback):
        order = SparsifyCallback.order + 1
        def after_fit(self): self.learn.probes = getattr(self.learn, 'probes', []) + [pruned_share(self.sparsify.sparsifier)]
    set_seed(0)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=head_split)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(2, 1e-2, freeze_epochs=1, cbs=[SparsifyCallback(0.8), Probe()])
    frozen, unfrozen = learn.probes
    assert frozen == 0 # never the target inside the frozen epoch
    assert unfrozen == pytest.approx(0.8, abs=2e-3)
    assert learn.recorder.sparsity['target'][-1] == 0.8
    with learn.no_bar(): assert learn.validate()[1] > 0.75 # accuracy survives (dense: 0.98, chance: 0.1)

def test_save_model_callback_restoring_a_less_sparse_epoch_warns(tmp_path):
    learn = tiny(tmp_path, cbs=SparsifyCallback(0.8))
    learn.metrics = [ValueMetric(lambda: -float(learn.epoch), 'first_is_best')]
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 3, cbs=SaveModelCallback(monitor='first_is_best', comp=np.greater))
    msg = messages(ws, 'less sparse')
    assert len(msg) == 1 and 'sparsify_to_target' in msg[0]
    assert learn.sparsify.sparsifier.sparsity_achieved(of='groups') < 0.8
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 3, cbs=SaveModelCallback(monitor='first_is_best', comp=np.greater, at_end=True))
    assert not messages(ws, 'less sparse') # the last epoch is kept

class LazyNet(nn.Module):
    def __init__(self): super().__init__(); self.fc1, self.fc2 = nn.LazyLinear(32), nn.LazyLinear(4)
    def forward(self, x): return self.fc2(torch.relu(self.fc1(x)))

def test_lazy_modules_are_materialised_without_drawing_random_numbers(tmp_path):
    "One batch materialises the lazy layers; drawing it moves no generator: the weights are those a plain first forward makes"
    learn = tiny(tmp_path, model=LazyNet(), cbs=SparsifyCallback(0.5))
    set_seed(1, reproducible=True)
    dl_state, py, npy = learn.dls.valid.rng.getstate(), random.getstate(), np.random.get_state()[1].copy()
    learn.sparsify.build()
    assert learn.dls.valid.rng.getstate() == dl_state and random.getstate() == py and (np.random.get_state()[1] == npy).all()
    set_seed(1, reproducible=True)
    plain = LazyNet(); plain(torch.zeros(1, 16))
    assert same(learn.model.state_dict(), plain.state_dict())
    learn = tiny(tmp_path, model=LazyNet(), cbs=SparsifyCallback(0.5))
    quiet(learn, 1)
    assert at_target(learn.sparsify.sparsifier)

class Untraceable(nn.Module):
    "A CNN whose forward branches on the data: torch.fx cannot trace it"
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0: x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

def test_a_batch_traces_the_graph_when_fx_cannot():
    set_seed(0)
    learn = Learner(digits_dls(bs=64), Untraceable(), loss_func=CrossEntropyLossFlat(), cbs=SparsifyCallback(0.5, granularity='filter', exclude='fc'))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        quiet(learn, 1)
    assert not messages(ws, 'Without a `sample_input`')
    sp = learn.sparsify.sparsifier
    assert sp.graph.mode == 'hooks'
    kept = sp.masks['conv1'].reshape(-1)
    assert int(kept.sum()) == 8 and torch.equal(learn.model.bn1.weight != 0, kept) and torch.equal(learn.model.bn1.bias != 0, kept)

@pytest.mark.parametrize('gran,column', [('weight', 'sparsity'), ('2:4', 'sparsity'), ('filter', 'sparsity (filters)'),
                                         ('channel', 'sparsity (channels)')])
def test_recorder_column_counts_what_the_target_counts(tmp_path, gran, column):
    learn = tiny(tmp_path, cbs=SparsifyCallback(0.5, granularity=gran, scope='local' if ':' in gran else 'global'))
    quiet(learn, 1)
    assert column in learn.recorder.metric_names
    sp = learn.sparsify.sparsifier
    value = learn.recorder.values[-1][list(learn.recorder.metric_names[1:]).index(column)]
    groups = sum(int((~m).sum()) for m in sp.masks.values()) / sum(m.numel() for m in sp.masks.values())
    assert value == pytest.approx(0.5, abs=0.02) and value == pytest.approx(groups)
    ax = learn.recorder.plot_sparsity()
    gap = learn.sparsify.max_gap
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f'target {column}', f'achieved {column} (largest gap {gap:.3g})']
