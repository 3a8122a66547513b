"""Hostile input (issue 6): every invalid argument combination for `SparsifyCallback` and `Sparsifier` raises ValueError
or TypeError naming an offending argument, and leaves the model bit-identical (also when the error comes from the
callback's `before_fit`, inside `learn.fit`).

Hypothesis draws which arguments are wrong (none, one or two), then a value for every argument from its pool of valid
or invalid values. An oracle (`offenders`) says which arguments are wrong *for this model*, including the errors that
depend on it (a pattern that matches nothing, a granularity a layer does not have, a `layer_sparsity` key outside the
pruned layers, a target above what an N:M pattern can reach, `rewind_epoch` past the fit). Valid combinations must fit
without error.

Every value in the pools is drawn: none is set aside as a known failure. (Should a value ever fail to give the promised
error, pin it with a strict xfail test of its own and `assume` it away here until it is fixed, so that this page and
nbs/13_guarantees.ipynb's list of known gaps stay honest.) The single cases at the end were once such gaps: selectors
of the wrong kind, predicates that raise, selections that leave nothing, malformed `links`, a `layer_sparsity` above an
N:M cap, and `Sparsifier.update(share)`.

`tests/test_engine_errors.py` and `tests/test_callback.py::test_bad_arguments_*` check the wording of single errors;
this file checks the combinations. `FP_HOSTILE_EXAMPLES=2000 python -m pytest tests/test_reliability_hostile.py` searches
harder than CI's 60 examples per property.
"""
import fnmatch, math, os
from collections import OrderedDict
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, assume, event, settings, HealthCheck, strategies as st
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.callback.schedule import SchedCos

from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.criteria import LargeFinal, RandomCriterion, Movement, large_final
from fasterprune.schedules import one_cycle, agp, one_shot, iterative

N_EPOCH = 2
LAYERS = {'conv': nn.Conv2d, 'fc': nn.Linear} # the prunable layers of `model()`, with their input sizes 4 and 8


def model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 8, 3, padding=1), bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 4)))


def tiny_dls():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items, bs=8, shuffle=False), DataLoader(items[:8], bs=8))


DLS = tiny_dls()


def snapshot(m):
    "Bit-exact state_dict, and everything else a failed call could leave on the model: attributes, hooks, gradients"
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    extra = {n: (sorted(x.__dict__), len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks)) for n, x in m.named_modules()}
    return sd, extra, {n: p.grad for n, p in m.named_parameters()}


def assert_untouched(m, snap):
    sd, extra, grads = snap
    now = m.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].flatten().view(torch.uint8), v.flatten().view(torch.uint8)), k
    assert {n: (sorted(x.__dict__), len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks)) for n, x in m.named_modules()} == extra
    assert all(p.grad is grads[n] for n, p in m.named_parameters())


# ---------------------------------------------------------------- value pools
# named functions, so that hypothesis' reports are readable
def linear(p): return p
def twice(p): return 2 * p
def nan_sched(p): return math.nan
def negative(p): return -1.
def no_arg(): return 0.5
def crashes(p): return 1 / 0
def sneaky(p): return 1.5 if 0.2 < p < 0.4 else p # in [0, 1] at 0, 0.5 and 1, where `check_schedule` looks
def is_fc(n, m): return n == 'fc'
def is_conv(n, m): return n == 'conv'
def everything(n, m): return True # also BatchNorm, which has a weight but no granularity
def raises(n, m): raise ZeroDivisionError('boom')
def no_links(sp): return []
def links_crash(sp): return 1 / 0

OK, BAD = 'ok', 'bad'
POOLS = {
    'sparsity': {OK: [0, 1, 0.5, 0.0, 1.0, np.float64(0.3), np.float32(0.7), Fraction(1, 3)],
                 BAD: [math.nan, math.inf, -math.inf, -0.1, 1.5, 50, 100, '0.5', None, True, False, [0.5],
                       torch.tensor(0.5), 0.5 + 0j]},
    'schedule': {OK: [one_cycle, agp, one_shot, partial(one_shot, start=0.5), iterative, linear, SchedCos(0, 1)],
                 BAD: ['one_cycle', None, 0.5, twice, nan_sched, negative, no_arg, crashes, sneaky]},
    'granularity': {OK: ['weight', 'filter', 'channel', 'kernel', '2:4', '1:4'],
                    BAD: ['row', '', 'Weight', None, 3, '4:2', '0:4', '2:2', '2:3', 'a:b', ['weight']]},
    'criterion': {OK: ['large_final', 'random', 'movement', 'taylor', 'lamp', large_final, RandomCriterion(3), Movement()],
                  BAD: ['magnitude', None, 3, LargeFinal, is_fc, '']},
    'scope': {OK: ['local', 'global'], BAD: ['layer', None, 'GLOBAL', 1, ['local']]},
    'include': {OK: [None, 'conv', 'fc', 'c*', nn.Conv2d, nn.Linear, ['conv', 'fc'], is_fc, [nn.Conv2d, 'fc'], [], everything],
                BAD: ['nomatch', nn.LSTM, 'bn', ['conv', 'zzz'], 42, [[]], {'conv'}, nn.BatchNorm2d, raises]},
    'exclude': {OK: [None, 'fc', 'conv', nn.Conv2d, 'c*', is_conv, nn.BatchNorm2d, []],
                BAD: ['nomatch', nn.GRU, 'bn', 3.5, raises]},
    'layer_sparsity': {OK: [None, {}, {'fc': 0.3}, {'conv': 0.0}, {'*': 0.25}, {'fc': 1, 'conv': 0.4}, {'c*': 0.6}],
                       BAD: [[0.5], 'fc', {'nomatch': 0.2}, {'fc': 2}, {'fc': 'x'}, {'fc': None}, {'fc': math.nan},
                             {'fc': True}, {3: 0.5}, {'conv': -0.5}]},
    'reduce': {OK: ['mean', 'sum', 'l2', 'max'], BAD: ['median', None, 2, 'L2']},
    'update_every': {OK: [None, 'auto', 1, 3, 100], BAD: [0, -1, 1.5, '3', True, math.nan, np.int64(3)]},
    'lth': {OK: [False, True], BAD: ['yes', 1, None, 0]},
    'rewind_epoch': {OK: [0, 1, 5], BAD: [-1, 0.5, '0', None, True]},
    'links': {OK: [None, [], [['conv']], no_links],
              BAD: [[['conv', 'nomatch']], [['conv', 'fc']], 'conv', [[1, 2]], 42, [1], links_crash]},
    'model': {OK: [], BAD: [None, 'model', [nn.Linear(2, 2)], nn.Linear, nn.Sequential(nn.ReLU())]},
}
CALLBACK_ARGS = ['sparsity', 'schedule', 'granularity', 'criterion', 'scope', 'include', 'exclude', 'layer_sparsity',
                 'reduce', 'update_every', 'lth', 'rewind_epoch']
SPARSIFIER_ARGS = ['model', 'sparsity', 'granularity', 'criterion', 'scope', 'include', 'exclude', 'layer_sparsity',
                   'reduce', 'links']


def pruned(kw):
    "The layers of `model()` that valid `include`/`exclude` values select"
    def match(spec, name):
        if spec is None: return False
        if isinstance(spec, list): return any(match(s, name) for s in spec)
        if isinstance(spec, str): return fnmatch.fnmatchcase(name, spec)
        if isinstance(spec, type): return issubclass(LAYERS[name], spec)
        return spec(name, None)
    inc, exc = kw.get('include'), kw.get('exclude')
    keep = [n for n in LAYERS if (match(inc, n) if inc not in (None, []) else True)]
    return [n for n in keep if not match(exc, n)]


def offenders(kw, fit_epochs=N_EPOCH):
    """The arguments that are wrong for `model()`, plus markers for two kinds of error ('empty_selection': include and
    exclude leave no layer; 'layer_sparsity_nm': a layer_sparsity value above the N:M cap)"""
    off = {a for a, v in kw.items() if any(v is b or (type(v) == type(b) and _same(v, b)) for b in POOLS[a][BAD])}
    if 'model' in off: return off | {'include', 'exclude', 'layer_sparsity', 'links', 'granularity'} # all relative to it
    sel_ok = not ({'include', 'exclude'} & off)
    layers = pruned(kw) if sel_ok else None
    if sel_ok and not layers: off |= {'include', 'exclude', 'empty_selection'}
    if not layers: return off
    g = kw.get('granularity', 'weight')
    if kw.get('include') not in (None, []): # layers named in `include` must take the granularity
        if g == 'kernel' and 'fc' in layers: off.add('granularity')
    elif isinstance(g, str): # the default selection leaves dense what does not fit (issue 12): a Linear under 'kernel',
        dense = {'kernel': {'fc'}, 'filter': {'fc'}, 'channel': {'conv'}}.get(g, set()) # the outputs, the inputs
        layers = [n for n in layers if n not in dense]
        if not layers: return off | {'granularity'} # nothing left
    ls = kw.get('layer_sparsity')
    if 'layer_sparsity' not in off and ls:
        if any(not any(n == k or fnmatch.fnmatchcase(n, k) for n in layers) for k in ls): off.add('layer_sparsity')
    if g in ('2:4', '1:4') and not ({'sparsity', 'layer_sparsity', 'granularity'} & off):
        n_, m_ = map(int, g.split(':'))
        for n in layers:
            own = [v for k, v in (ls or {}).items() if n == k or fnmatch.fnmatchcase(n, k)]
            target = float(own[-1]) if own else float(kw.get('sparsity', 0.5))
            if target > 1 - n_ / m_: off |= {'layer_sparsity', 'layer_sparsity_nm'} if own else {'sparsity'}
    links = kw.get('links')
    if isinstance(links, list) and 'links' not in off and any(n not in layers for ns in links for n in ns): off.add('links')
    if kw.get('lth') is True and 'rewind_epoch' not in off and kw.get('rewind_epoch', 0) >= fit_epochs: off.add('rewind_epoch')
    return off


def _same(a, b):
    try: return bool(a == b) if not isinstance(a, float) or not math.isnan(a) else math.isnan(b)
    except Exception: return False


@st.composite
def arguments(draw, names, required=('sparsity',)):
    wrong = draw(st.sets(st.sampled_from([n for n in names if POOLS[n][BAD]]), max_size=2))
    kw = {}
    for n in names:
        if n in wrong: kw[n] = draw(st.sampled_from(POOLS[n][BAD]))
        elif n in required or draw(st.booleans()):
            if n == 'sparsity': kw[n] = draw(st.one_of(st.sampled_from(POOLS[n][OK]), st.floats(0, 1)))
            elif POOLS[n][OK]: kw[n] = draw(st.sampled_from(POOLS[n][OK]))
    return kw


SETTINGS = settings(max_examples=int(os.environ.get('FP_HOSTILE_EXAMPLES', 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def assert_names_an_offender(e, off):
    assert type(e) in (ValueError, TypeError), f'{type(e).__name__}: {e}'
    msg = str(e)
    assert off, f'a valid combination was refused: {msg}'
    assert any(f'`{a}' in msg for a in off), f'the message names none of {sorted(off)}: {msg}'


@SETTINGS
@given(kw=arguments(CALLBACK_ARGS))
def test_hostile_callback_arguments(kw):
    off = offenders(kw)
    learn = Learner(DLS, model(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    snap, n_metrics, n_cbs = snapshot(learn.model), len(learn.metrics), len(learn.cbs)
    try:
        cb = SparsifyCallback(**kw)
    except Exception as e:
        event('refused at construction')
        assert_names_an_offender(e, off)
        return
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, 1e-2, cbs=cb)
    except Exception as e:
        event('refused in before_fit')
        assert_names_an_offender(e, off) # raised in before_fit...
        assert_untouched(learn.model, snap) # ... before any weight changed
        assert len(learn.metrics) == n_metrics and len(learn.cbs) == n_cbs and not hasattr(learn, 'sparsify')
        return
    event('fitted')
    assert not off, f'accepted {sorted(off)}: {kw}'
    assert cb.sparsifier.counts == cb.sparsifier.group_counts(1.) # the last step met the target


@SETTINGS
@given(kw=arguments(SPARSIFIER_ARGS))
def test_hostile_sparsifier_arguments(kw):
    off = offenders(kw)
    m = kw['model'] = kw['model'] if 'model' in kw else model()
    snap = snapshot(m) if isinstance(m, nn.Module) else None
    try: sp = Sparsifier(**kw)
    except Exception as e:
        event('refused')
        assert_names_an_offender(e, off)
        if snap is not None: assert_untouched(m, snap)
        return
    event('pruned')
    assert not off, f'accepted {sorted(off)}: {kw}'
    sp.prune()
    assert sp.counts == sp.group_counts(1.)


# ---------------------------------------------------------------- single cases

def refused_naming(f, names, m=None):
    "`f()` raises ValueError/TypeError whose message names one of `names`; `m` is untouched"
    snap = snapshot(m) if m is not None else None
    try: f()
    except (ValueError, TypeError) as e: msg = str(e) # any other exception escapes and fails the test
    else: raise AssertionError('accepted without an error')
    assert any(f'`{n}' in msg for n in names), msg
    if m is not None: assert_untouched(m, snap)


def test_schedule_out_of_range_between_sample_points_is_refused_before_the_fit():
    "`check_schedule` looks at pos 0, 0.5 and 1 only; the callback checks every step's share in `before_fit`"
    learn = Learner(DLS, model(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    def fit():
        with learn.no_bar(), learn.no_logging(): learn.fit(8, 1e-2, cbs=SparsifyCallback(0.5, schedule=sneaky))
    refused_naming(fit, ['schedule'], learn.model)
    assert len(learn.metrics) == 1


# ---------------------------------------------------------------- single cases (formerly known gaps)


@pytest.mark.parametrize('kw', [dict(include=42), dict(include=[[]]), dict(include={'conv'}), dict(exclude=3.5),
                                dict(include=nn.BatchNorm2d), dict(include=raises), dict(exclude=raises)],
                         ids=['int', 'nested-list', 'set', 'float-exclude', 'batchnorm-type', 'raising-include', 'raising-exclude'])
def test_bad_layer_selectors_name_the_argument(kw):
    m = model()
    refused_naming(lambda: Sparsifier(m, 0.5, **kw), list(kw), m)


def test_include_predicate_selects_only_prunable_layers():
    "An `include` type or predicate selects only modules with a granularity (not BatchNorm), as the pattern '*' does"
    assert [l.name for l in Sparsifier(model(), 0.5, include=everything).layers] == ['conv', 'fc']


def test_include_exclude_leaving_nothing_name_themselves():
    "Not '`model` has no prunable layer': the error names `include`/`exclude` and what each selected"
    m = model()
    refused_naming(lambda: Sparsifier(m, 0.5, include='fc', exclude=nn.Linear), ['include', 'exclude'], m)


@pytest.mark.parametrize('links', [42, [1], links_crash], ids=['int', 'int-set', 'raising-function'])
def test_bad_links_name_the_argument(links):
    m = model()
    refused_naming(lambda: Sparsifier(m, 0.5, links=links), ['links'], m)


def test_layer_sparsity_above_nm_cap_names_layer_sparsity():
    "Not '`sparsity`=0.7 is above ...': the value came from `layer_sparsity`"
    m = model()
    refused_naming(lambda: Sparsifier(m, 0.3, '2:4', layer_sparsity={'conv': 0.7}), ['layer_sparsity'], m)


@pytest.mark.parametrize('share', [1.5, -1, math.nan, 'x', None])
def test_update_share_is_checked(share):
    m = model()
    sp = Sparsifier(m, 0.5).prune()
    masks = {k: v.clone() for k, v in sp.masks.items()}
    refused_naming(lambda: sp.update(share), ['share'], m)
    assert all(torch.equal(sp.masks[k], v) for k, v in masks.items())
