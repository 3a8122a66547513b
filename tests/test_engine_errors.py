"""Bad input is rejected at construction, with a message naming the argument and the value, and the model untouched."""
import math, re

import pytest
import torch
from torch import nn

from fasterprune.schedules import check_schedule
from fasterprune.sparsifier import Sparsifier


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4, 2))


def snapshot(model):
    "Bit-exact copy of the state_dict, plus everything else a failed construction could have left on the model"
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {n: (sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    return sd, extra, grads


def assert_untouched(model, snap):
    sd, extra, grads = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():  # bit-identical, NaN-safe
        assert now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k].flatten().view(torch.uint8), v.flatten().view(torch.uint8)), k
    assert {n: (sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == extra
    assert all(p.grad is grads[n] for n, p in model.named_parameters())


def rejects(model, exc, words, *args, **kwargs):
    "Construction raises `exc`; its message contains every one of `words`; the model is bit-identical afterwards"
    snap = snapshot(model)
    with pytest.raises(exc) as info: Sparsifier(model, *args, **kwargs)
    msg = str(info.value)
    for w in words: assert w in msg, f'{w!r} not in {msg!r}'
    assert_untouched(model, snap)
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# sparsity
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('value,hint', [(50, '0.5'), (90, '0.9'), (100, '1'), (5, '0.05'), (12.5, '0.125')])
def test_sparsity_percent_gets_a_hint(value, hint):
    rejects(mlp(), ValueError, ['`sparsity`', repr(float(value)), f'did you mean {hint}?', '[0, 1]'], value)


@pytest.mark.parametrize('value', [-0.1, -50, 1.5, 2.5, 100.5, 1e6, math.inf, -math.inf, math.nan]) # 1.5 is no percentage: no 'did you mean 0.015?'
def test_sparsity_out_of_range(value):
    msg = rejects(mlp(), ValueError, ['`sparsity`', repr(float(value)), '[0, 1]'], value)
    assert 'did you mean' not in msg


@pytest.mark.parametrize('value', ['0.5', '50%', None, True, [0.5], torch.tensor(0.5)])
def test_sparsity_wrong_type(value):
    rejects(mlp(), TypeError, ['`sparsity`', repr(value)], value)


def test_sparsity_bounds_are_accepted():
    for s in (0, 0., 1, 1., 0.5):
        model = mlp(); snap = snapshot(model)
        Sparsifier(model, s)
        assert_untouched(model, snap)  # construction alone changes no weight


def test_layer_sparsity_values():
    rejects(mlp(), ValueError, ["layer_sparsity['0']", '50.0', 'did you mean 0.5?'], 0.5, layer_sparsity={'0': 50})
    rejects(mlp(), ValueError, ["layer_sparsity['*']", '-1.0'], 0.5, layer_sparsity={'*': -1})
    rejects(mlp(), TypeError, ['`layer_sparsity`', '0.5'], 0.5, layer_sparsity=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# granularity, criterion, scope, reduce: unknown names list the known ones
# ---------------------------------------------------------------------------------------------------------------------
def test_unknown_granularity():
    rejects(convnet(), ValueError, ['`granularity`', "'row'", 'weight', 'kernel', 'filter', 'channel', 'N:M'], 0.5, 'row')
    rejects(convnet(), TypeError, ['`granularity`', '4', 'weight', 'filter'], 0.5, 4)


@pytest.mark.parametrize('nm', ['4:2', '0:4', '2:2'])
def test_invalid_nm(nm):
    rejects(convnet(), ValueError, ['`granularity`', repr(nm), '0 < N < M'], 0.5, nm, exclude='0')


def test_unknown_criterion():
    rejects(mlp(), ValueError, ['`criterion`', "'magnitude'", 'large_final', 'random', 'movement', 'taylor', 'lamp'],
            0.5, criterion='magnitude')
    rejects(mlp(), ValueError, ['`criterion`', 'abs'], 0.5, criterion=abs)


def test_unknown_scope():
    rejects(mlp(), ValueError, ['`scope`', "'layer'", 'local', 'global'], 0.5, scope='layer')
    rejects(mlp(), ValueError, ['`scope`', "'Global'", 'local', 'global'], 0.5, scope='Global')


def test_unknown_reduce():
    rejects(mlp(), ValueError, ['`reduce`', "'median'", 'mean', 'sum', 'l2', 'max'], 0.5, 'filter', reduce='median')


# ---------------------------------------------------------------------------------------------------------------------
# granularities that do not apply to a layer name the layer
# ---------------------------------------------------------------------------------------------------------------------
def test_kernel_on_linear():
    "Named in `include`, a Linear is refused under 'kernel', naming it; chosen by default it is left dense (issue 12)"
    rejects(mlp(), ValueError, ['`granularity`', "'kernel'", 'layer `0`', 'Linear'], 0.5, 'kernel', include='0')
    rejects(convnet(), ValueError, ['`granularity`', "'kernel'", 'layer `5`', 'Linear'], 0.5, 'kernel', include=['0', '5'])
    rejects(mlp(), ValueError, ['`granularity`', "'kernel'", '`0`', '`3`', 'Linear', '`include`'], 0.5, 'kernel')  # nothing left
    with pytest.warns(UserWarning, match="`5`: Linear has no 'kernel' groups"): sp = Sparsifier(convnet(), 0.5, 'kernel')
    assert [l.name for l in sp.layers] == ['0', '3'] and list(sp.skipped) == ['5']
    Sparsifier(convnet(), 0.5, 'kernel', include=nn.Conv2d)  # fine once the Linear is left out


def test_nm_on_input_not_multiple_of_4():
    rejects(mlp(), ValueError, ['`granularity`', "'2:4'", 'layer `0`', '6', 'multiple of 4'], 0.5, '2:4', include='0')
    rejects(convnet(), ValueError, ['`granularity`', "'2:4'", 'layer `0`', '3', 'multiple of 4'], 0.5, '2:4', include=nn.Conv2d)
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))  # depthwise: one input channel per group; nothing else to prune
    rejects(dw, ValueError, ['`granularity`', "'2:4'", '`0`', 'input size per group, 1', 'multiple of 4'], 0.5, '2:4')
    with pytest.warns(UserWarning, match="`0`: its input size per group, 3, is not a multiple of 4"):
        assert [l.name for l in Sparsifier(convnet(), 0.5, '2:4').layers] == ['3', '5']  # the default selection adapts
    rejects(mlp(), ValueError, ['`sparsity`', "'2:4'", '0.5'], 0.6, '2:4', exclude='0')  # 2:4 reaches at most 50%


# ---------------------------------------------------------------------------------------------------------------------
# layer selection
# ---------------------------------------------------------------------------------------------------------------------
def test_include_exclude_matching_nothing():
    rejects(mlp(), ValueError, ['`include`', "'layer9.*'", 'matches no prunable layer'], 0.5, include='layer9.*')
    rejects(mlp(), ValueError, ['`exclude`', "'fc'", 'matches no prunable layer'], 0.5, exclude='fc')
    rejects(mlp(), ValueError, ['`include`', 'Conv2d', 'matches no prunable layer'], 0.5, include=nn.Conv2d)
    rejects(mlp(), ValueError, ['`exclude`', "'2'"], 0.5, exclude='2')  # a BatchNorm is not a prunable layer
    rejects(mlp(), ValueError, ['`include`', 'matches no prunable layer'], 0.5, include=lambda n, m: False)
    rejects(mlp(), ValueError, ['`include`', "'nope'"], 0.5, include=['0', '3', 'nope'])
    rejects(mlp(), TypeError, ['`include`', 'layer selector', '3.5'], 0.5, include=3.5)


@pytest.mark.parametrize('kw,arg', [(dict(include=[['0']]), 'include'), (dict(include={'0'}), 'include'), (dict(exclude=7), 'exclude'),
                                    (dict(include=nn.Linear(2, 2)), 'include'), (dict(exclude=int), 'exclude')])
def test_selector_of_the_wrong_kind(kw, arg):
    rejects(mlp(), TypeError, [f'`{arg}`', 'layer selector'], 0.5, **kw)


def test_selectors_see_only_prunable_layers():
    "A predicate or type selects Linear/Conv layers only; a type matching only a BatchNorm says so"
    seen = []
    sp = Sparsifier(mlp(), 0.5, include=lambda n, m: seen.append(n) or True)
    assert [l.name for l in sp.layers] == ['0', '3'] and seen == ['0', '3']
    rejects(mlp(), ValueError, ['`include`=BatchNorm1d', 'matches only `2` (BatchNorm1d)', 'no granularity table'], 0.5, include=nn.BatchNorm1d)
    assert [l.name for l in Sparsifier(mlp(), 0.5, exclude=nn.BatchNorm1d).layers] == ['0', '3']  # harmless in `exclude`


def test_predicate_that_raises_names_the_argument_and_layer():
    def bad(n, m): return m.kernel_size == 3
    msg = rejects(mlp(), ValueError, ['`exclude`', 'bad', 'AttributeError', 'layer `0`'], 0.5, exclude=bad)
    with pytest.raises(ValueError) as info: Sparsifier(mlp(), 0.5, include=bad)
    assert isinstance(info.value.__cause__, AttributeError)


def test_include_exclude_leaving_nothing():
    rejects(mlp(), ValueError, ["`include`=['0', '3'] selects ['0', '3']", "`exclude`=Linear removes ['0', '3']", 'no prunable layer'],
            0.5, include=['0', '3'], exclude=nn.Linear)


@pytest.mark.parametrize('wrap', ['parametrizations.weight_norm', 'parametrizations.spectral_norm', 'weight_norm', 'prune'])
def test_recomputed_weights_are_refused(wrap):
    "A weight recomputed at every forward cannot be pruned by zeroing it: refused, naming the layer; fine once excluded"
    import warnings
    from torch.nn.utils import parametrizations, prune, weight_norm
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.nn.utils.weight_norm is deprecated
        if wrap == 'prune': prune.l1_unstructured(model[3], 'weight', 0.5)
        elif wrap == 'weight_norm': weight_norm(model[3])
        else: getattr(parametrizations, wrap.split('.')[1])(model[3])
    rejects(model, ValueError, ['layer `3`', 'cannot be pruned', "exclude='3'"], 0.5)
    assert [l.name for l in Sparsifier(model, 0.5, exclude='3').layers] == ['0']


def test_layer_sparsity_above_nm_cap():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    rejects(model, ValueError, ['`layer_sparsity`', 'layer `1`', '0.75', "'2:4'", '0.5'], 0.3, '2:4', layer_sparsity={'1': 0.75})


@pytest.mark.parametrize('links,words', [('0', ['`links` must be a list']), ([('0', '3'), 5], ['`links`: each linked set', '5']),
                                         ([['0', 3]], ['`links`: layer names are strings', '3']),
                                         (lambda sp: [][1], ['`links`=', 'IndexError'])])
def test_links_of_the_wrong_form(links, words):
    rejects(mlp(), (TypeError, ValueError), words, 0.5, 'filter', links=links)


@pytest.mark.parametrize('share', [1.5, -0.5, math.nan, '1', None, True])
def test_update_share(share):
    model = mlp()
    sp = Sparsifier(model, 0.5).prune()
    masks = {k: v.clone() for k, v in sp.masks.items()}
    with pytest.raises((TypeError, ValueError), match='`share`'): sp.update(share)
    assert all(torch.equal(sp.masks[k], v) for k, v in masks.items())


def test_layer_sparsity_key_matching_nothing():
    rejects(mlp(), ValueError, ['`layer_sparsity`', "'fc'", 'matches no pruned layer', "'0'", "'3'"], 0.5, layer_sparsity={'fc': 0.2})
    rejects(mlp(), ValueError, ['`layer_sparsity`', "'0'"], 0.5, exclude='0', layer_sparsity={'0': 0.2})  # excluded layer


def test_no_prunable_layer():
    for model in (nn.Sequential(nn.ReLU()), nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4)), nn.Module()):
        rejects(model, ValueError, ['`model`', type(model).__name__, 'no prunable layer'], 0.5)
    rejects(mlp(), ValueError, ['no prunable layer'], 0.5, exclude='*')
    with pytest.raises(TypeError, match='`model` must be an nn.Module'): Sparsifier([nn.Linear(2, 2)], 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# schedules (checked by `check_schedule`, used by the callback at construction)
# ---------------------------------------------------------------------------------------------------------------------
def test_schedule_not_callable():
    for bad in (0.5, 'one_cycle', None):
        with pytest.raises(TypeError) as info: check_schedule(bad, 'sched')
        msg = str(info.value)
        assert '`sched`' in msg and repr(bad) in msg and 'one_cycle' in msg and 'agp' in msg


@pytest.mark.parametrize('f,pos,value', [(lambda p: 2 * p, 1.0, '2.0'), (lambda p: p - 0.5, 0.0, '-0.5'),
                                         (lambda p: 50., 0.0, '50.0'), (lambda p: math.nan, 0.0, 'nan')])
def test_schedule_out_of_range(f, pos, value):
    with pytest.raises(ValueError) as info: check_schedule(f, 'sched')
    msg = str(info.value)
    assert '`sched`' in msg and f'returned {value} at pos={pos}' in msg and '[0, 1]' in msg


def test_schedule_that_fails():
    with pytest.raises(TypeError, match=re.escape('`schedule`=') + '.*could not be evaluated at pos=0.0'):
        check_schedule(lambda: 0.5)  # wrong signature
    with pytest.raises(TypeError, match='could not be evaluated at pos=0.5'):
        check_schedule(lambda p: 1 / (p - 0.5) if p == 0.5 else 0.)


# ---------------------------------------------------------------------------------------------------------------------
# non-finite weights: refused with the layer's name, weights untouched
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bad', [math.nan, math.inf])
def test_non_finite_weights(bad):
    model = mlp()
    with torch.no_grad(): model[3].weight[1, 2] = bad
    sp = Sparsifier(model, 0.5, scope='global')
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match='layer `3`'): sp.prune()
    assert_untouched(model, snap)
