"""Shrinking during the fit (issue 19): optimizer state cut with the channels, the counts continuing in units of the
original layers, the equivalence check at each shrink, `round_to`, bad input, and a checkpoint resumed across a shrink."""
import warnings
from functools import partial

import pytest
import torch
from torch import nn
from hypothesis import given, strategies as st
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam, SGD, Lookahead, OptimWrapper
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.fp16 import NonNativeMixedPrecision
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.sparsifier import Sparsifier, rounded_count
from fasterprune.compact import compact
from fasterprune.callback import SparsifyCallback
from fasterprune.shrink import shrink_model, cut_optimizer, cut_sparsifier
from fasterprune.demo import digits_dls, small_cnn


def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

X, Y = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10

def trained(opt_func, share=0.5, sparsity=0.5, steps=3, seed=0, **kw):
    "A CNN, its sparsifier at `share` of `sparsity` of its filters and an optimizer with state, after a few steps"
    torch.manual_seed(seed)
    m = cnn()
    sp = Sparsifier(m, sparsity, 'filter', include=nn.Conv2d, sample_input=X, **kw)
    opt = opt_func(list(m.parameters()))
    def train(n):
        for _ in range(n):
            nn.functional.cross_entropy(m(X), Y).backward()
            sp.mask_grads(); opt.step(); opt.zero_grad()
    train(steps)
    sp.update(share); sp.clean_state(opt, whole=True); sp.apply()
    train(2)
    return m, sp, opt, train

def names_of(model): return {id(p): n for n, p in model.named_parameters()}

def shrink_all(m, sp, opt):
    cuts = shrink_model(m, X)
    cut_sparsifier(sp, {names_of(m)[id(q)]: ids for q, ids in cuts.values()})
    if opt is not None: cut_optimizer(opt, cuts)
    return cuts

OPTS = {'fastai Adam': partial(Adam, lr=1e-2), 'fastai SGD momentum': partial(SGD, lr=1e-2, mom=0.9),
        'Lookahead(Adam)': lambda ps: Lookahead(Adam(ps, lr=1e-2)),
        'torch AdamW (OptimWrapper)': lambda ps: OptimWrapper(ps, torch.optim.AdamW, lr=1e-2),
        'torch SGD': lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}

def state_of(opt):
    "Per parameter, its state tensors shaped like it (momentum, moments), and a Lookahead's slow weight"
    inner = opt.opt if isinstance(opt, (Lookahead, OptimWrapper)) else opt
    st = inner.state
    out = {p: {k: v.clone() for k, v in st[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape} for p in list(st)}
    if isinstance(opt, Lookahead):
        for sg, pg in zip(opt.slow_weights, opt.param_lists):
            for s, p in zip(sg, pg): out.setdefault(p, {})['slow'] = s.clone()
    return out

def params_of(opt):
    if isinstance(opt, torch.optim.Optimizer): return [p for g in opt.param_groups for p in g['params']]
    return list(opt.all_params().itemgot(0))

@pytest.mark.parametrize('name', list(OPTS))
def test_optimizer_state_cut(name):
    "After a shrink the optimizer steps the model's new parameters, and their state is the old state at the kept positions"
    m, sp, opt, train = trained(OPTS[name])
    before = state_of(opt)
    assert any(before.values())
    cuts = shrink_all(m, sp, opt)
    assert cuts and m[0].out_channels == 12 and m[3].out_channels == 24
    assert [id(p) for p in params_of(opt)] == [id(p) for p in m.parameters()]
    after = state_of(opt)
    for old, (new, ids) in cuts.items():
        assert before[old], f"{name}: no state for a cut parameter"
        assert after[new].keys() == before[old].keys()
        for k, v in before[old].items(): assert torch.equal(after[new][k], v.reshape(-1)[ids].view(new.shape)), k
    train(2) # and it trains on
    assert all(torch.isfinite(p).all() for p in m.parameters())

def test_counts_continue_in_original_units():
    "After a shrink at 40 % of the schedule, each later share prunes, in groups of the original layers, what the unshrunk sparsifier would"
    m, sp, opt, _ = trained(partial(Adam, lr=1e-2), share=0.4)
    ref = Sparsifier(cnn(), 0.5, 'filter', include=nn.Conv2d, sample_input=X) # same layers, never shrunk
    shrink_all(m, sp, opt)
    assert sp.removed == {'0': 3, '3': 6, '6': 5} # round(0.2 · n) of 16, 32, 24
    for share in (0.4, 0.55, 0.7, 0.85, 1.):
        sp.update(share)
        got = {l.name: sp._counts(l)[1] for l in sp.layers}
        assert got == ref.group_counts(share), share
        assert sp.sparsity_achieved() == pytest.approx(sum(ref.group_counts(share).values()) / 72)
    shrink_all(m, sp, opt)
    assert [m[0].out_channels, m[3].out_channels, m[6].out_channels] == [8, 16, 12]
    assert sp.counts == {'0': 0, '3': 0, '6': 0} and sp.sparsity_achieved() == 0.5
    sp.update(1.) # at the target: nothing more to prune
    assert sp.counts == {'0': 0, '3': 0, '6': 0}

def test_sparsifier_state_round_trip_after_shrink():
    "`state_dict` carries what was removed; a sparsifier on the shrunk model loads it and counts the same"
    m, sp, opt, _ = trained(partial(Adam, lr=1e-2), share=0.6)
    shrink_all(m, sp, opt)
    sp.update(0.8)
    other = Sparsifier(m, 0.5, 'filter', include=nn.Conv2d, sample_input=X).load_state_dict(sp.state_dict())
    assert other.removed == sp.removed and other.group_counts(1.) == sp.group_counts(1.)
    assert other.sparsity_achieved() == sp.sparsity_achieved()

def test_shrink_refuses_a_mismatch_and_leaves_the_model():
    "A cut model that differs from the masked one raises, naming the difference, and the model is not changed"
    m, sp, opt, _ = trained(partial(Adam, lr=1e-2))
    params, shapes = list(m.parameters()), [p.shape for p in m.parameters()]
    with pytest.raises(RuntimeError, match='differs from the masked model'): shrink_model(m, X, atol=-1.)
    assert [id(p) for p in m.parameters()] == [id(p) for p in params] and [p.shape for p in m.parameters()] == shapes

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64, shuffle=False)

def mk(dls, cbs, seed=0, path=None, opt_func=Adam):
    set_seed(seed)
    return Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cbs, opt_func=opt_func, **({'path': path} if path else {}))

def quiet(learn, n=3, **kw):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_one_cycle(n, 1e-2, **kw)
    return learn

class Watch(SparsifyCallback):
    "Records, at each shrink, the masked and the shrunk model's outputs on a validation batch, and the parameter counts"
    def shrink_now(self):
        xb = self.dls.valid.one_batch()[0]
        m = self.learn.model
        was = m.training
        with torch.no_grad(): before = m.eval()(xb)
        rec = super().shrink_now()
        with torch.no_grad(): after = m.eval()(xb)
        m.train(was)
        self.seen = getattr(self, 'seen', []) + [(before, after, rec)]
        return rec

def test_each_shrink_equivalent_in_a_fit(dls):
    "In a fit, each shrink leaves outputs equal to the masked model's, the model smaller, and the fit at its target"
    cb = Watch(0.5, granularity='filter', include=nn.Conv2d, shrink=0.15, update_every=1)
    learn = quiet(mk(dls, cb))
    assert len(cb.seen) >= 3 and len(cb.shrinks) == len([r for _, _, r in cb.seen if r])
    for before, after, rec in cb.seen: torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    sizes = [r['params'] for _, _, r in cb.seen if r]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < cb.shrinks[0]['params_before']
    assert [m.out_channels for m in learn.model.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32, 32]
    assert cb._measure() == 0.5 and learn.recorder.values[-1][-1] == 0.5 # the sparsity column, original units
    opt_params = {id(p) for p in learn.opt.all_params().itemgot(0)}
    assert opt_params == {id(p) for p in learn.model.parameters()}

@pytest.mark.parametrize('r', [1, 4, 8])
def test_round_to_masks_and_compaction(r):
    "With `round_to`, every layer keeps a multiple of it at every share, and compaction keeps those counts"
    torch.manual_seed(0)
    m = cnn()
    sp = Sparsifier(m, 0.6, 'filter', include=nn.Conv2d, sample_input=X, round_to=r)
    n = {'0': 16, '3': 32, '6': 24}
    for share in (0.2, 0.5, 0.8, 1.):
        sp.update(share)
        for l in sp.layers:
            kept = int(sp.masks[l.name].sum())
            k0 = round(0.6 * share * n[l.name])
            assert kept % r == 0 and abs(kept - (n[l.name] - k0)) <= r / 2, (share, l.name, kept)
    small = compact(m, X)
    assert [small[i].out_channels for i in (0, 3, 6)] == [int(sp.masks[k].sum()) for k in ('0', '3', '6')]

@given(n=st.integers(1, 300), frac=st.floats(0, 1), r=st.integers(1, 32))
def test_rounded_count(n, frac, r):
    k = min(n - 1, round(frac * n))
    got = rounded_count(n, k, r)
    kept = n - got
    assert 0 <= got < n or (got == 0 and n >= 1)
    if k == 0 or n <= r: assert got == 0
    else:
        assert kept % r == 0 or kept == n
        assert kept >= r and abs(kept - (n - k)) <= r / 2 or kept == n or kept == r

@pytest.mark.parametrize('kw, match', [
    (dict(shrink=0), 'share of the groups'), (dict(shrink=1.5), 'share of the groups'), (dict(shrink='yes'), 'share of the groups'),
    (dict(shrink=True), 'share of the groups'), (dict(shrink=0.1, granularity='weight'), "'filter' or 'channel'"),
    (dict(shrink=0.1, lth=True), 'lth'), (dict(round_to=0), 'integer >= 1'), (dict(round_to=2.5), 'integer >= 1'),
    (dict(round_to=8, granularity='kernel'), "'filter' or 'channel'"), (dict(round_to=8, scope='global'), "scope`='local'")])
def test_bad_input_at_construction(kw, match):
    kw = dict(dict(granularity='filter'), **kw)
    with pytest.raises(ValueError, match=match): SparsifyCallback(0.5, **kw)

class CPUMasters(NonNativeMixedPrecision):
    "fastai's `NonNativeMixedPrecision`, which asserts a CUDA device in `before_fit`: here it only has to be there"
    order = SparsifyCallback.order + 1
    def before_fit(self): pass

def test_shrink_refused_with_fp32_masters(dls):
    "`NonNativeMixedPrecision` keeps fp32 copies the shrink cannot follow: a clear error before any weight changes"
    learn = mk(dls, [SparsifyCallback(0.5, granularity='filter', include=nn.Conv2d, shrink=0.2), CPUMasters()])
    ws = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='NonNativeMixedPrecision'): quiet(learn, 1)
    assert all(torch.equal(p.detach(), w) for p, w in zip(learn.model.parameters(), ws))

class StopAfter(Callback):
    order = 99
    def __init__(self, epoch): self.stop = epoch
    def after_epoch(self):
        if self.epoch == self.stop: raise CancelFitException()

@pytest.mark.parametrize('opt_func', [Adam, partial(SGD, mom=0.9)], ids=['Adam', 'SGD'])
def test_resume_across_a_shrink(dls, tmp_path, opt_func):
    "A checkpoint saved after a shrink loads into a fresh model of the original architecture; the resumed fit ends where the uninterrupted one does"
    opts = dict(granularity='filter', include=nn.Conv2d, shrink=0.2, update_every=1, round_to=2)
    a = quiet(mk(dls, SparsifyCallback(0.5, **opts), path=tmp_path, opt_func=opt_func))
    b = mk(dls, SparsifyCallback(0.5, **opts), path=tmp_path, opt_func=opt_func)
    quiet(b, cbs=[SaveModelCallback(every_epoch=True, with_opt=True, fname='ck'), StopAfter(1)])
    assert b.sparsify.shrinks and b.sparsify.shrinks[0]['epoch'] <= 1 # the checkpoint of epoch 1 holds a shrunk model
    c = mk(dls, SparsifyCallback(0.5, **opts), seed=1, path=tmp_path, opt_func=opt_func)
    c.load('ck_1', with_opt=True)
    saved = torch.load(tmp_path/'models'/'ck_1.pth', weights_only=False)['model']
    assert {k: v.shape for k, v in c.model.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    assert c.model.state_dict()[next(iter(saved))].shape[0] < 16 # conv1 of the original model has 16 filters
    quiet(c, start_epoch=2)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa: assert torch.equal(sa[k], sc[k]), k
    assert c.sparsify.sparsifier.removed == a.sparsify.sparsifier.removed
    assert c.sparsify._measure() == a.sparsify._measure() == 0.5

def test_channel_masks_shrink_too():
    "'channel' masks: the inputs no layer reads go, with the filters that wrote them; outputs unchanged, counts in original units"
    torch.manual_seed(0)
    m = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore') # the first conv, which reads the model's inputs, is left dense
        sp = Sparsifier(m, 0.5, 'channel', sample_input=X)
    sp.update(0.5); sp.apply()
    ref = m.eval()(X)
    shrink_all(m, sp, None)
    torch.testing.assert_close(m(X), ref, atol=1e-5, rtol=1e-5)
    assert (m[3].in_channels, m[6].in_channels, m[10].in_features) == (12, 24, 18) and sp.removed == {'3': 4, '6': 8, '10': 6}
    sp.update(1.)
    assert sp.sparsity_achieved() == 0.5

def test_best_epoch_loaded_at_the_end_of_a_shrinking_fit(dls, tmp_path):
    "`SaveModelCallback` loading an earlier, larger epoch at the end of a shrinking fit: the model takes that epoch's sizes and masks"
    cb = SparsifyCallback(0.5, granularity='filter', include=nn.Conv2d, shrink=0.2)
    learn = mk(dls, cb, path=tmp_path)
    quiet(learn, cbs=SaveModelCallback(monitor='valid_loss', comp=lambda a, b: a > b)) # keeps the worst epoch: the first, before any shrink
    saved = torch.load(tmp_path/'models'/'model.pth', weights_only=False)
    saved = saved.get('model', saved)
    assert {k: v.shape for k, v in learn.model.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    assert learn.model.conv1.out_channels == 16 and learn.sparsity_report().sparsity.iloc[-2] < 0.5
