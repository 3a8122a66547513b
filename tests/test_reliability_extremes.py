"""Extremes (issue 6): sparsity 0 changes nothing bit for bit, sparsity 0.999 and 1 on tiny layers empty no layer, NaN or
inf weights stop the fit with the layer's name, tied weights get one mask counted once.

`tests/test_engine_errors.py::test_non_finite_weights` covers NaN/inf for a bare `Sparsifier.prune()`; here it happens in
the middle of a fastai fit. `tests/test_engine.py::test_global_never_empties_a_layer` covers the engine at any target;
here the callback drives it to the cap on layers of a handful of weights, through a whole schedule.
"""
import itertools, math, re
from functools import partial

import pytest
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam, SGD, OptimWrapper
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.sparsifier import state_mirrors
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.demo import digits_dls, small_cnn


def snapshot(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits_equal(a, b):
    "Bit-identical tensors (NaN-safe, -0.0 != 0.0)"
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))


# ---------------------------------------------------------------- sparsity 0

OPTS = dict(adamw=partial(Adam, wd=0.1, decouple_wd=True), sgd_momentum=partial(SGD, mom=0.9, wd=1e-2),
            torch_adamw=partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=0.1)))


def opt_tensors(opt):
    "Every tensor of the optimizer's per-parameter state, in parameter order"
    out, inner = [], getattr(opt, 'opt', None) # fastai's `Optimizer` keeps `state`; an `OptimWrapper`, its torch optimizer's
    for st in [opt.state] + ([inner.state] if isinstance(inner, torch.optim.Optimizer) else []):
        for p, s in st.items():
            out += [(k, v) for k, v in sorted(s.items()) if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize('opt', list(OPTS))
@pytest.mark.parametrize('cfg', [dict(), dict(scope='global', criterion='movement'), dict(granularity='filter', exclude='fc')],
                         ids=['local', 'global-movement', 'filter'])
def test_sparsity_zero_changes_nothing_bit_for_bit(opt, cfg):
    "SparsifyCallback(0) leaves the weights, the BatchNorm statistics, the optimizer's state and the losses bit-identical"
    def run(cbs):
        set_seed(0) # before the DataLoaders too: their shuffling RNG is drawn when they are built
        learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=OPTS[opt], cbs=cbs)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
        return learn
    plain, pruned = run([]), run([SparsifyCallback(0, **cfg)])
    a, b = plain.model.state_dict(), pruned.model.state_dict()
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
    sa, sb = opt_tensors(plain.opt), opt_tensors(pruned.opt)
    assert len(sa) == len(sb) > 0 and all(ka == kb and bits_equal(x, y) for (ka, x), (kb, y) in zip(sa, sb))
    assert [float(l) for l in plain.recorder.losses] == [float(l) for l in pruned.recorder.losses]
    assert [v[:3] for v in plain.recorder.values] == [v[:3] for v in pruned.recorder.values] # train/valid loss, accuracy


# ---------------------------------------------------------------- 0.999 and 1 on tiny layers

class Tiny(nn.Module):
    "Three layers of 8, 16 and 6 weights"
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(1, 2, 2), nn.Linear(8, 2), nn.Linear(2, 3)
    def forward(self, x): return self.b(torch.relu(self.a(torch.relu(self.conv(x)).flatten(1))))


def tiny_dls():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 3, 3, generator=g), torch.randint(0, 3, (48,), generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items, bs=8, shuffle=False), DataLoader(items[:8], bs=8))


CRITERIA = ['large_final', 'movement', 'lamp', 'random', 'taylor']
EXTREME = [(s, g, sc, CRITERIA[i % len(CRITERIA)])
           for i, (s, g, sc) in enumerate(itertools.product([0.999, 1], ['weight', 'filter', 'channel'], ['local', 'global']))]


@pytest.mark.parametrize('sparsity,gran,scope,crit', EXTREME)
def test_extreme_sparsity_on_tiny_layers_empties_no_layer(sparsity, gran, scope, crit):
    set_seed(0)
    learn = Learner(tiny_dls(), Tiny(), loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.01),
                    cbs=SparsifyCallback(sparsity, granularity=gran, scope=scope, criterion=crit))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    sp = learn.sparsify.sparsifier
    kept = {l.name: int(sp.masks[l.name].sum()) for l in sp.layers}
    if scope == 'local': assert all(k == 1 for k in kept.values()), kept # capped at n-1: exactly one group left
    else: assert all(k >= 1 for k in kept.values()) and sum(kept.values()) == len(sp.layers), kept
    for l in sp.layers:
        assert not l.weight[~l.grouping.weight_mask(sp.masks[l.name])].any()
        assert l.weight[l.grouping.weight_mask(sp.masks[l.name])].count_nonzero() >= 1 # the kept group is alive
    assert all(math.isfinite(float(x)) for x in learn.recorder.losses)


# ---------------------------------------------------------------- NaN and inf

class Poison(Callback):
    "Write `value` into one kept weight of `layer` before the callback's `before_batch` of training step `at`"
    order = SparsifyCallback.order - 1
    def __init__(self, layer, value, at): self.layer, self.value, self.at, self.n = layer, value, at, 0
    def before_batch(self):
        if not self.training: return
        if self.n == self.at:
            sp = self.sparsify.sparsifier
            l = next(l for l in sp.layers if l.name == self.layer)
            self.masks = {k: m.clone() for k, m in sp.masks.items()}
            self.zeros = {l.name: (l.weight == 0).clone() for l in sp.layers}
            with torch.no_grad(): l.weight.view(-1)[int(l.grouping.weight_mask(sp.masks[l.name]).reshape(-1).nonzero()[0])] = self.value
        self.n += 1


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf], ids=['nan', 'inf', '-inf'])
@pytest.mark.parametrize('cfg', [dict(), dict(scope='global'), dict(scope='global', criterion='lamp', granularity='filter', exclude='fc')],
                         ids=['local', 'global', 'global-lamp-filter'])
def test_non_finite_weights_stop_the_fit_with_the_layer_name(bad, cfg):
    "A FloatingPointError naming the layer, and no mask of that layer (of any layer, in global scope) computed from it"
    set_seed(0)
    poison = Poison('conv3', bad, 27)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[poison, SparsifyCallback(0.8, **cfg)])
    with pytest.raises(FloatingPointError, match='layer `conv3`'):
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    assert torch.equal(sp.masks['conv3'], poison.masks['conv3']) # the poisoned layer kept the masks it had
    if cfg.get('scope') == 'global': assert all(torch.equal(sp.masks[k], m) for k, m in poison.masks.items())
    for l in sp.layers: # the weights were not touched by a half-computed update
        assert torch.equal((l.weight == 0) & ~torch.isnan(l.weight), poison.zeros[l.name])


def test_non_finite_gradients_stop_accumulating_criteria():
    """movement/taylor learn from gradients: a NaN loss would poison their state. The fit stops at that loss, naming the
    poisoned layer, before the state learns from it, whether it ranks at every step or not"""
    for ue, msg in (('auto', r"weights of layer `conv2` hold NaN"), (1, r"weights of layer `conv2` hold NaN")):
        set_seed(0)
        learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(),
                        cbs=[Poison('conv2', math.nan, 10), SparsifyCallback(0.8, criterion='taylor', scope='global', update_every=ue)])
        with pytest.raises(FloatingPointError, match=msg):
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
        assert all(bool(torch.isfinite(t).all()) for st in learn.sparsify.sparsifier.state.values() for t in st.values())


def test_non_finite_weights_error_names_the_step():
    "The FloatingPointError names the layer and the optimizer step (and epoch and batch) at which it was found"
    set_seed(0)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[Poison('conv3', math.nan, 27), SparsifyCallback(0.8)])
    with pytest.raises(FloatingPointError) as info:
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    msg = str(info.value)
    assert 'conv3' in msg
    assert re.search(r'\bstep\b\D{0,12}\b27\b', msg), msg # 22 steps per epoch: epoch 1, batch 5 is optimizer step 27


# ---------------------------------------------------------------- tied weights

class Tied(nn.Module):
    "`dec` shares `enc`'s weight (as a language model's head shares its embedding)"
    def __init__(self):
        super().__init__()
        self.enc, self.mid, self.dec, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.dec.weight = self.enc.weight
    def forward(self, x): return self.out(torch.relu(self.dec(torch.relu(self.mid(torch.relu(self.enc(x)))))))


def tied_dls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    items = list(zip(x, x[:, :4].argmax(1)))
    return DataLoaders(DataLoader(items, bs=16, shuffle=False), DataLoader(items[:16], bs=16))


@pytest.mark.parametrize('cfg', [dict(scope='global'), dict(criterion='movement'), dict(include='dec', criterion='taylor')],
                         ids=['global', 'local-movement', 'second-name'])
def test_tied_weights_one_mask_counted_once(cfg):
    set_seed(0)
    model = Tied()
    learn = Learner(tied_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.1),
                    cbs=SparsifyCallback(0.75, **cfg))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    names = [l.name for l in sp.layers]
    assert names == (['dec'] if 'include' in cfg else ['enc', 'mid', 'out']) # the shared weight once, under one name
    assert model.dec.weight is model.enc.weight # still tied
    df = sp.report()
    assert df.set_index('name').loc['total', 'params'] == (256 if len(names) == 1 else 256 + 256 + 64) # the tied matrix counted once
    zeros = int((~sp.layers[0].grouping.weight_mask(sp.masks[sp.layers[0].name])).sum())
    assert int((model.enc.weight == 0).sum()) == int((model.dec.weight == 0).sum()) >= zeros
    if cfg.get('scope') == 'global': assert sum(int((~m).sum()) for m in sp.masks.values()) == round(0.75 * (256 + 256 + 64))
    else: assert zeros == round(0.75 * 256)
    states = state_mirrors(learn.opt)
    for l in sp.layers: assert not any(t[~l.grouping.weight_mask(sp.masks[l.name])].any() for t in states(l.weight))


def test_tied_filter_pruning_silences_every_user():
    "With 'filter' granularity a tied weight's pruned filters zero the bias of every module that uses it"
    set_seed(0)
    model = Tied()
    for m in model.modules():
        if isinstance(m, nn.Linear): nn.init.normal_(m.bias)
    sp = Sparsifier(model, 0.5, 'filter', exclude='out').prune()
    dead = ~sp.masks['enc'].reshape(-1)
    assert not model.enc.bias[dead].any()
    assert not model.dec.bias[dead].any() # dec's output units j are pruned too: its bias must not keep them alive
