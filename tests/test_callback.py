"`SparsifyCallback` inside fastai fits: dead weights, checkpoints, resume, composition, recorder, bad input."
import contextlib, io, pickle, re, warnings
from functools import partial

import pytest
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam, SGD, OptimWrapper
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.schedule import ParamScheduler, SchedCos, fit_one_cycle, fine_tune, lr_find
from fastai.callback.progress import ProgressCallback

from fasterprune.sparsifier import state_mirrors
from fasterprune.callback import SparsifyCallback, optimizer_steps, sidecar
from fasterprune.schedules import one_cycle, one_shot, iterative
from fasterprune.demo import digits_dls, small_cnn

torch.set_num_threads(1)

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64)

@pytest.fixture(scope='module')
def dls_fixed(): return digits_dls(bs=64, shuffle=False)

def mk(dls, path='.', cbs=None, seed=0, **kwargs):
    set_seed(seed)
    return Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=path, cbs=cbs, **kwargs)

def quiet_fit(learn, n, lr=1e-2, one_cycle=True, **kwargs):
    with learn.no_bar(), learn.no_logging():
        (learn.fit_one_cycle if one_cycle else learn.fit)(n, lr, **kwargs)
    return learn

def same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): same_tensors(a[k], b[k])
        else: assert torch.equal(a[k], b[k]), k

def snapshot(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

class DeadStaysDead(Callback):
    "After every step: pruned weights (and pruned filters' bias and BN) and their optimizer state are zero; masks only grow"
    order = SparsifyCallback.order + 1
    steps = 0
    def before_fit(self): self.prev = {} # each fit runs the schedule anew: masks may relax at its start
    def after_step(self):
        sp, states = self.sparsify.sparsifier, state_mirrors(self.opt)
        for l in sp.layers:
            if l.name not in sp.masks: continue # a gradient criterion ranks nothing before the first backward pass
            dead = ~l.grouping.weight_mask(sp.masks[l.name])
            assert not l.weight[dead].any()
            assert not any(t[dead].any() for t in states(l.weight))
            if sp.granularity == 'filter':
                out_dead = ~sp.masks[l.name].reshape(-1)
                for bn in l.norms:
                    for p in (bn.weight, bn.bias):
                        assert not p[out_dead].any()
                        assert not any(t[out_dead].any() for t in states(p))
            prev = getattr(self, 'prev', {}).get(l.name)
            if prev is not None: assert not (prev & ~dead).any(), 'a pruned weight came back'
            self.prev = {**getattr(self, 'prev', {}), l.name: dead}
        self.steps += 1

# ---------------------------------------------------------------- dead stays dead

OPTS = dict(adamw=partial(Adam, wd=0.1, decouple_wd=True), sgd_momentum=partial(SGD, mom=0.9, wd=1e-2),
            torch_adamw=partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.1)),
            torch_sgd=partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-2)))

@pytest.mark.parametrize('opt', list(OPTS))
def test_zeros_stay_zero_300_steps(opt):
    dls = digits_dls(bs=16) # 89 steps per epoch
    check = DeadStaysDead()
    learn = mk(dls, opt_func=OPTS[opt], cbs=[SparsifyCallback(0.8, one_cycle), check])
    quiet_fit(learn, 4, 3e-3)
    assert check.steps >= 300
    assert learn.sparsify.report().set_index('name').sparsity['total'] == pytest.approx(0.8, abs=1e-3)

@pytest.mark.parametrize('granularity,sparsity', [('kernel', 0.7), ('channel', 0.5), ('2:4', 0.5)])
def test_zeros_stay_zero_other_granularities(dls, granularity, sparsity):
    check = DeadStaysDead()
    learn = mk(dls, opt_func=OPTS['adamw'], cbs=[SparsifyCallback(sparsity, one_cycle, granularity, exclude=['conv1', 'fc']), check])
    quiet_fit(learn, 1)
    assert check.steps == 22
    assert learn.sparsify.sparsifier.masks['conv3'].dtype == torch.bool

def test_filter_bias_and_batchnorm_stay_zero(dls):
    check = DeadStaysDead()
    learn = mk(dls, opt_func=OPTS['adamw'], cbs=[SparsifyCallback(0.5, iterative, 'filter', exclude='fc'), check])
    for m in learn.model.modules(): # BN shifts as after training, so zeroing them is visible
        if isinstance(m, nn.BatchNorm2d): nn.init.normal_(m.bias)
    quiet_fit(learn, 3)
    kept = learn.sparsify.sparsifier.masks['conv3'].reshape(-1)
    assert kept.sum() == 32
    assert torch.equal(learn.model.bn3.weight != 0, kept) and torch.equal(learn.model.bn3.bias != 0, kept)

# ---------------------------------------------------------------- checkpoints

def test_save_model_callback_reloads_best_with_its_masks(dls, tmp_path):
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.9))
    quiet_fit(learn, 4, cbs=SaveModelCallback(monitor='accuracy'))
    assert (tmp_path/'models/model.pth').exists() and (tmp_path/'models/model.sparsity.pth').exists()
    sp = learn.sparsify.sparsifier
    for l in sp.layers: assert torch.equal(l.weight != 0, l.grouping.weight_mask(sp.masks[l.name]))
    plain = small_cnn()
    plain.load_state_dict(torch.load(tmp_path/'models/model.pth'), strict=True)
    same_tensors(plain.state_dict(), learn.model.state_dict())

def test_save_model_callback_every_epoch(dls, tmp_path):
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.5))
    quiet_fit(learn, 2, cbs=SaveModelCallback(every_epoch=True))
    names = sorted(p.name for p in (tmp_path/'models').iterdir())
    assert names == ['model_0.pth', 'model_0.sparsity.pth', 'model_1.pth', 'model_1.sparsity.pth']

def test_lr_find_is_inert(dls, tmp_path):
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.9))
    with learn.no_bar(): learn.lr_find(show_plot=False, num_it=20) # before any fit: nothing to restore
    assert learn.sparsify.sparsifier is None
    quiet_fit(learn, 1)
    before, masks, hist = snapshot(learn.model), dict(learn.sparsify.sparsifier.masks), learn.recorder.sparsity
    with learn.no_bar(): learn.lr_find(show_plot=False, num_it=20)
    same_tensors(learn.model.state_dict(), before)
    same_tensors(learn.sparsify.sparsifier.masks, masks)
    assert learn.recorder.sparsity is hist
    assert not list((tmp_path/'models').glob('**/*.pth')) # lr_find's temporary files are gone

def test_mid_fit_save_then_load_into_fresh_learner(dls, tmp_path):
    class SaveAt(Callback):
        order = SparsifyCallback.order + 1
        def after_epoch(self):
            if self.epoch == 1: self.learn.save('mid', with_opt=True); self.masks = dict(self.sparsify.sparsifier.masks)
    saver = SaveAt()
    learn = mk(dls, tmp_path, cbs=[SparsifyCallback(0.9), saver])
    quiet_fit(learn, 3)
    fresh = mk(dls, tmp_path, cbs=SparsifyCallback(0.9), seed=1).load('mid', with_opt=True)
    assert fresh.sparsify.sparsifier is None # restored when it is next needed
    same_tensors(fresh.sparsify.build().masks, saver.masks)
    plain = small_cnn()
    plain.load_state_dict(torch.load(tmp_path/'models/mid.pth', weights_only=False)['model'], strict=True) # fastai pickles its optimizer state
    quiet_fit(fresh, 1) # continues from the loaded state without error

def test_load_without_callback_and_stale_sidecar(dls, tmp_path):
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.9))
    quiet_fit(learn, 1)
    learn.save('m')
    plain = mk(dls, tmp_path).load('m') # a Learner without the callback loads the weights only
    same_tensors(plain.model.state_dict(), learn.model.state_dict())
    plain.save('m') # saving without a callback removes the now stale sidecar
    assert not sidecar(tmp_path/'models/m.pth').exists()

def test_export_and_load_learner(dls, tmp_path):
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.5, granularity='filter', exclude='fc'))
    quiet_fit(learn, 1)
    pickle.dumps(learn.sparsify) # no traced graph, no model references beyond the Learner's
    learn.export('export.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn2 = load_learner(tmp_path/'export.pkl')
    same_tensors(learn2.sparsify.build().masks, learn.sparsify.sparsifier.masks)
    assert learn2.sparsity_report().zeros.tolist() == learn.sparsity_report().zeros.tolist()
    item = dls.valid_ds.items[0]
    assert learn2.predict(item)[1] == learn.predict(item)[1]
    same_tensors(learn2.model.state_dict(), learn.model.state_dict())

def test_export_without_the_callback_pickles_no_fasterprune(dls, tmp_path):
    "Once its SparsifyCallback is removed, an exported Learner holds nothing of fasterprune (the recorder forgets the last fit's callbacks)"
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.5))
    quiet_fit(learn, 1)
    learn.remove_cb(learn.sparsify)
    learn.export('plain.pkl')
    assert b'fasterprune' not in (tmp_path/'plain.pkl').read_bytes()

def test_recorded_sparsity_after_load_is_measured(dls, tmp_path):
    "After `learn.load`, the recorder logs the loaded masks' sparsity, also on steps where the masks do not change"
    learn = mk(dls, tmp_path, cbs=SparsifyCallback(0.8, schedule=one_shot))
    quiet_fit(learn, 1)
    learn.save('pruned')
    again = mk(dls, tmp_path, cbs=SparsifyCallback(0.8, schedule=partial(one_shot, start=0.))).load('pruned')
    quiet_fit(again, 1) # the masks are already at the target: they never change in this fit
    achieved = again.recorder.sparsity['achieved']
    assert len(achieved) == len(dls.train) and min(achieved) > 0.79

# ---------------------------------------------------------------- resume

@pytest.mark.parametrize('kw', [dict(criterion='movement'), dict(update_every=5, granularity='filter', exclude='fc')])
def test_resume_equals_uninterrupted(dls_fixed, tmp_path, kw):
    full = mk(dls_fixed, tmp_path, cbs=SparsifyCallback(0.8, **kw))
    quiet_fit(full, 3, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    resumed = mk(dls_fixed, tmp_path, cbs=SparsifyCallback(0.8, **kw), seed=1).load('ckpt_0', with_opt=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error') # no "saved at another step" warning
        quiet_fit(resumed, 3, start_epoch=1)
    a, b = full.sparsify.sparsifier, resumed.sparsify.sparsifier
    same_tensors(a.masks, b.masks)
    same_tensors(a.state, b.state)
    assert a.counts == b.counts
    same_tensors(full.model.state_dict(), resumed.model.state_dict())

# ---------------------------------------------------------------- position and composition

class StepCount(Callback):
    order = SparsifyCallback.order + 1
    def before_fit(self): self.n, self.targets = 0, []
    def after_step(self): self.n += 1; self.targets.append(self.sparsify.sparsity * self.sparsify._share)

def test_gradient_accumulation_counts_optimizer_steps(dls):
    counter = StepCount()
    learn = mk(dls, cbs=[GradientAccumulation(n_acc=3 * 64), SparsifyCallback(0.9), counter])
    steps = optimizer_steps(learn, 3)
    assert steps == [0, 7, 14, 22] # 22 batches per epoch, a step every 3, the count carried across epochs
    quiet_fit(learn, 3)
    assert counter.n == steps[-1]
    targets = learn.recorder.sparsity['target']
    assert len(targets) == 3 * 22 and len(set(targets)) == steps[-1] # one target per optimizer step
    assert counter.targets[0] == pytest.approx(0.9 * one_cycle(0)) and counter.targets[-1] == 0.9
    assert learn.sparsity_report().set_index('name').sparsity['total'] == pytest.approx(0.9, abs=1e-3)

def test_last_step_meets_target_exactly(dls):
    counter = StepCount()
    learn = quiet_fit(mk(dls, cbs=[SparsifyCallback(0.73, scope='global'), counter]), 2)
    assert counter.targets[-1] == 0.73 and counter.n == 44
    sp = learn.sparsify.sparsifier
    n = sum(l.weight.numel() for l in sp.layers)
    assert sum(int((~m).sum()) for m in sp.masks.values()) == round(0.73 * n)

def test_fine_tune_prunes_once_in_the_unfrozen_phase(dls):
    class Probe(Callback):
        order = SparsifyCallback.order + 1
        def before_fit(self): self.frozen = not self.model.conv1.weight.requires_grad
        def after_fit(self): self.learn.probes = getattr(self.learn, 'probes', []) + [(self.frozen, self.sparsify.sparsifier.sparsity_achieved())]
    split = lambda m: [list(m.conv1.parameters()) + list(m.conv2.parameters()), [p for n, p in m.named_parameters() if not n.startswith(('conv1', 'conv2'))]]
    learn = mk(dls, splitter=split, cbs=Probe())
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(2, 1e-2, freeze_epochs=1, cbs=SparsifyCallback(0.7))
    (f1, s1), (f2, s2) = learn.probes
    assert f1 and not f2
    assert s1 == 0 and s2 == pytest.approx(0.7, abs=2e-3) # the frozen epoch prunes nothing
    assert (learn.model.conv1.weight == 0).float().mean() == pytest.approx(0.7, abs=0.02) # the body too, once unfrozen

def test_frozen_filters_keep_batchnorm_clean(dls):
    # frozen convolutions have no gradient, but fastai still trains their BatchNorm (train_bn): its pruned γ/β and
    # their optimizer state must stay zero too (a fit of a frozen model: `fine_tune`'s frozen phase does not prune)
    split = lambda m: [list(m.conv1.parameters()) + list(m.bn1.parameters()), [p for n, p in m.named_parameters() if not n.startswith(('conv1', 'bn1'))]]
    check = DeadStaysDead()
    learn = mk(dls, splitter=split, cbs=check)
    learn.model.relu1 = nn.Identity() # as before a residual add: a dead channel's β still gets gradients
    for m in learn.model.modules():
        if isinstance(m, nn.BatchNorm2d): nn.init.normal_(m.bias)
    learn.freeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-2, cbs=SparsifyCallback(0.5, iterative, 'filter', exclude='fc'))
    assert check.steps == 22
    assert int((learn.model.conv1.weight.flatten(1).abs().sum(1) == 0).sum()) == 8 # the frozen layer is pruned

def test_param_scheduler_and_fit(dls):
    sched = {'lr': SchedCos(1e-2, 1e-4)}
    learn = mk(dls, cbs=SparsifyCallback(0.6, iterative))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, cbs=ParamScheduler(sched))
    assert learn.recorder.hps['lr'][0] == pytest.approx(1e-2)
    assert learn.sparsity_report().set_index('name').sparsity['total'] == pytest.approx(0.6, abs=1e-3)

def test_mixed_precision_and_bf16_autocast(dls):
    # fastai's MixedPrecision autocasts for CUDA only: attached on a CPU it must at least not disturb pruning
    learn = mk(dls, cbs=[MixedPrecision(amp_mode='bf16'), SparsifyCallback(0.8)])
    quiet_fit(learn, 1)
    assert learn.sparsity_report().set_index('name').sparsity['total'] == pytest.approx(0.8, abs=1e-3)
    class CPUAutocast(Callback):
        order = MixedPrecision.order
        def before_batch(self): self.ctx = torch.autocast('cpu', dtype=torch.bfloat16); self.ctx.__enter__()
        def after_pred(self): self.learn.pred = self.pred.float()
        def after_loss(self): self.ctx.__exit__(None, None, None)
    check = DeadStaysDead()
    learn = mk(dls, cbs=[CPUAutocast(), SparsifyCallback(0.8, criterion='taylor'), check])
    quiet_fit(learn, 1)
    assert check.steps == 22
    assert learn.sparsity_report().set_index('name').sparsity['total'] == pytest.approx(0.8, abs=1e-3)

def test_two_callbacks_on_disjoint_layers(dls):
    learn = mk(dls, cbs=[SparsifyCallback(0.9, include=nn.Conv2d), SparsifyCallback(0.5, granularity='filter', include='fc')])
    with learn.no_bar(): quiet_fit(learn, 1)
    assert learn.sparsify is not learn.sparsify_1
    assert list(learn.recorder.metric_names[-3:-1]) == ['sparsity', 'sparsity_1 (filters)']
    df = learn.sparsity_report().set_index('name')
    assert df.loc['conv3', 'sparsity'] == pytest.approx(0.9, abs=1e-3) and df.loc['fc', 'sparsity'] == 0.5
    assert set(learn.recorder.sparsity) == {'target', 'achieved', 'target_1', 'achieved_1'}
    learn = mk(dls, cbs=[SparsifyCallback(0.9), SparsifyCallback(0.5, include='fc')])
    with pytest.raises(ValueError, match="layers \\['fc'\\] are pruned by `sparsify` too"): learn.fit(1)

def test_lottery_ticket_rewinds_to_epoch_start(dls):
    class Spy(Callback):
        order = SparsifyCallback.order + 1
        def before_train(self):
            if self.epoch == 1: self.w1 = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.dim() > 1}
        def before_batch(self):
            if self.training and self.sparsify._achieved > 0 and not hasattr(self, 'at_change'):
                self.at_change = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.dim() > 1}
    spy = Spy()
    learn = mk(dls, cbs=[SparsifyCallback(0.8, partial(one_shot, start=0.75), lth=True, rewind_epoch=1), spy])
    quiet_fit(learn, 2, one_cycle=False)
    for n, w in spy.at_change.items():
        kept = w != 0
        assert kept.float().mean() == pytest.approx(0.2, abs=0.01)
        assert torch.equal(w[kept], spy.w1[n][kept])
    assert learn.sparsify.snapshot is None # the copy lives only during the fit

def test_no_weight_copies_without_lth(dls):
    cb = SparsifyCallback(0.9)
    learn = quiet_fit(mk(dls, cbs=cb), 1)
    sp = cb.sparsifier
    held = sum(m.numel() * m.element_size() for m in sp.masks.values())
    held += sum(t.numel() * t.element_size() for s in sp.state.values() for t in s.values())
    assert cb.snapshot is None and not sp.state
    params = sum(p.numel() * p.element_size() for p in learn.model.parameters())
    assert held / params <= 0.26

def test_update_every_holds_masks_between_updates(dls):
    counter = StepCount()
    learn = quiet_fit(mk(dls, cbs=[SparsifyCallback(0.9, update_every=10), counter]), 2)
    targets = counter.targets
    assert len(set(targets)) == len(range(0, 44, 10)) + 1 # steps 0, 10, 20, 30, 40 and the last, 43
    assert targets[-1] == 0.9 and targets[9] == targets[0] != targets[10]

# ---------------------------------------------------------------- recorder, silence, inert

def test_recorder_columns_and_history(dls):
    learn = mk(dls, cbs=SparsifyCallback(0.9, update_every=1)) # the exact path: the masks follow the schedule at every step
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out): quiet_fit(learn, 2)
    assert out.getvalue() == '' # silent under no_bar/no_logging
    assert 'sparsity' in learn.recorder.metric_names
    col = list(learn.recorder.metric_names[1:]).index('sparsity')
    assert learn.recorder.values[-1][col] == learn.sparsify.sparsifier.sparsity_achieved()
    hist = learn.recorder.sparsity
    assert len(hist['target']) == len(hist['achieved']) == 44
    assert hist['target'][0] == pytest.approx(0.9 * one_cycle(0)) and hist['target'][-1] == 0.9
    assert all(abs(a - t) < 2e-3 for a, t in zip(hist['achieved'], hist['target']))
    assert learn.recorder.plot_sparsity() is not None
    assert len(learn.metrics) == 1 and len(learn.validate()) == 2 # the column is gone after the fit

def test_inert_in_validate_get_preds_predict(dls):
    learn = quiet_fit(mk(dls, cbs=SparsifyCallback(0.9)), 1)
    before, hist = snapshot(learn.model), learn.recorder.sparsity
    res = learn.validate()
    with learn.removed_cbs(learn.sparsify): res0 = learn.validate()
    assert res == res0
    learn.get_preds(); learn.predict(dls.valid_ds.items[0])
    same_tensors(learn.model.state_dict(), before)
    assert learn.recorder.sparsity is hist

def test_masks_follow_dtype_moves(dls):
    learn = quiet_fit(mk(dls, cbs=SparsifyCallback(0.9)), 1)
    sp = learn.sparsify.sparsifier
    zeros = {l.name: l.weight == 0 for l in sp.layers}
    learn.model.to(torch.bfloat16)
    with torch.no_grad():
        for l in sp.layers: l.weight.add_(1) # revive everything, then let the masks zero it again
    sp.apply()
    for l in sp.layers:
        assert l.weight.dtype == torch.bfloat16
        assert torch.equal(l.weight == 0, zeros[l.name])

# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs,msg', [
    (dict(sparsity=90), 'did you mean 0.9'), (dict(sparsity='90%'), '`sparsity` must be a number'),
    (dict(schedule='one_cycle'), '`schedule` must be a function'), (dict(schedule=lambda p: 2 * p), '`schedule`='),
    (dict(granularity='row'), "`granularity`='row' is unknown"), (dict(granularity=2), '`granularity` must be a name'),
    (dict(criterion='magnitude'), '`criterion`='), (dict(scope='layer'), "`scope`='layer' is unknown"),
    (dict(reduce='median'), "`reduce`='median' is unknown"), (dict(layer_sparsity={'fc': 2}), "`layer_sparsity['fc']`"),
    (dict(layer_sparsity=[0.5]), '`layer_sparsity` must be a dict'), (dict(update_every=0), '`update_every`'),
    (dict(update_every=True), '`update_every`'), (dict(lth='yes'), '`lth`'), (dict(rewind_epoch=-1), '`rewind_epoch`'),
    (dict(links='conv3'), '`links` must be a list'), (dict(links=[1]), '`links`: each linked set'),
    (dict(links=[['conv3', 4]]), '`links`: layer names are strings'),
])
def test_bad_arguments_fail_at_construction(kwargs, msg):
    kwargs = {'sparsity': 0.5, **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)): SparsifyCallback(**kwargs)

def test_signature_delegates_the_engine_options():
    "The engine's options are in the signature with the engine's own defaults and docments; an unknown one fails at once; no memory address"
    import inspect
    from nbdev.showdoc import BasicMarkdownRenderer
    sig = inspect.signature(SparsifyCallback)
    assert {'include', 'exclude', 'layer_sparsity', 'reduce', 'links'} <= set(sig.parameters) and 'kwargs' not in sig.parameters
    doc = BasicMarkdownRenderer(SparsifyCallback)._repr_markdown_()
    assert ' at 0x' not in doc and '# layers to leave dense' in doc
    with pytest.raises(TypeError, match='layer_type'): SparsifyCallback(0.5, layer_type=nn.Conv2d)
    assert SparsifyCallback(0.5).schedule is one_cycle and SparsifyCallback(0.5, None, 'filter', 'movement', 'global', exclude='fc').exclude == 'fc'

def test_fastai_wrappers_pass_arguments_through():
    "`Learner.fit`, `fine_tune`, `save` and `load` show fastai's signature and keep fastai's own method as `_fastai`"
    import inspect
    for k in ('fit', 'fine_tune', 'save', 'load'):
        f = getattr(Learner, k)
        assert f._fastai is not f and inspect.signature(f) == inspect.signature(f._fastai), k

@pytest.mark.parametrize('kwargs,msg', [
    (dict(include='layer4.*'), "`include`='layer4.*' matches no prunable layer"),
    (dict(exclude=nn.LSTM), '`exclude`='),
    (dict(layer_sparsity={'head': 0.1}), "`layer_sparsity` key 'head'"),
    (dict(granularity='kernel', include=['conv2', 'fc']), "`granularity`='kernel' does not apply to layer `fc`"), # named: an error; by default: left dense
    (dict(granularity='2:4', include='conv1'), "does not apply to layer `conv1`"),
    (dict(lth=True, rewind_epoch=2), '`rewind_epoch`=2'),
    (dict(schedule=lambda p: 1.5 if 0.2 < p < 0.4 else p), 'returned 1.5 at pos='), # fine at 0, 0.5 and 1 only
    (dict(schedule=lambda p: '0.5' if 0.2 < p < 0.4 else p), "returned '0.5' (str)"), # a number, not a string
    (dict(granularity='filter', links=[['conv3', 'conv9']]), "`links`: 'conv9' is not a pruned layer"),
    (dict(granularity='filter', links=[['conv2', 'conv3']]), '`links`: linked layers need as many groups'),
    (dict(granularity='filter', links=lambda sp: 1 / 0), '`links`='),
])
def test_bad_arguments_fail_in_before_fit_without_touching_weights(dls, kwargs, msg):
    learn = mk(dls)
    before = snapshot(learn.model)
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)): learn.fit(2, cbs=SparsifyCallback(0.5, **kwargs))
    same_tensors(learn.model.state_dict(), before)
    assert len(learn.metrics) == 1 and not hasattr(learn, 'sparsify')


def test_links_prune_linked_layers_as_one_unit(dls):
    "`links` goes to the engine: linked layers get one mask per step, ranked by their summed scores, in every scope"
    class SameMasks(Callback):
        order = SparsifyCallback.order + 1
        def before_fit(self): self.checked = 0
        def after_step(self):
            m = self.sparsify.sparsifier.masks
            assert torch.equal(m['conv3'], m['conv4']); self.checked += 1
    for scope in ('local', 'global'):
        spy = SameMasks()
        learn = quiet_fit(mk(dls, cbs=[SparsifyCallback(0.5, granularity='filter', scope=scope, exclude='fc',
                                                        links=[['conv3', 'conv4']]), spy]), 1)
        sp = learn.sparsify.sparsifier
        assert spy.checked == len(dls.train)
        assert [[l.name for l in u] for u in sp.units if len(u) > 1] == [['conv3', 'conv4']]
        assert sp.counts == sp.group_counts(1.)
        kept = sp.masks['conv3'].reshape(-1)
        if scope == 'local': assert int((~kept).sum()) == 32 # half of the 64 filters, the same ones in both layers
        for name in ('conv3', 'conv4'): # the linked filters are dead in both layers, with their BatchNorm
            w = getattr(learn.model, name).weight
            assert torch.equal(w.detach().flatten(1).abs().sum(1) != 0, kept)
            assert torch.equal(getattr(learn.model, 'bn' + name[-1]).weight.detach() != 0, kept)
