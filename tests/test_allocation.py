"""Layer budgets (issue 20): every allocation prunes exactly its global count, `min_keep` holds in every scope, bad input is
a clear error at construction, `sensitivity` leaves the model as it found it, and ERK matches RigL's own computation."""
import math, warnings

import numpy as np
import pytest
import torch
from torch import nn

from fasterprune.allocation import check_min_keep, erk_counts, erk_score, max_pruned, min_kept, sensitivity, units, curve_counts
from fasterprune.sparsifier import Sparsifier


def net(seed=0):
    "Layers of very different sizes: a 3-channel stem, a wide conv, a 1x1 conv, a small classifier"
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


SAMPLE = torch.randn(2, 3, 8, 8)


def build(sparsity, granularity='weight', scope='local', **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # 'filter' leaves the classifier dense, and says so
        return Sparsifier(kw.pop('model', None) or net(), sparsity, granularity, kw.pop('criterion', 'large_final'), scope,
                          sample_input=SAMPLE, **kw)


def per_layer(sp):
    "(units the target counts, units pruned, units kept) per pruned layer, in the report's unit (N:M: weights)"
    out = {}
    for l in sp.layers:
        n, pruned, _ = sp._counts(l)
        out[l.name] = (n, pruned, n - pruned)
    return out


def expected_total(sp, s):
    "round(s·N) in the pruned layers' groups; N:M: the blocks (of M−N weights) that remove round(s·W / (M−N)) of them"
    grs = [l.grouping for l in sp.layers]
    if grs[0].nm: return round(s * sum(g.numel for g in grs) / grs[0].per_group) * grs[0].per_group
    return round(s * sum(g.n_groups for g in grs))


CASES = [('weight', 0.9), ('kernel', 0.8), ('filter', 0.6), ('2:4', 0.4)]


@pytest.mark.parametrize('granularity,s', CASES)
@pytest.mark.parametrize('scope,criterion', [('global', 'large_final'), ('global', 'lamp'), ('erk', 'large_final')])
@pytest.mark.parametrize('min_keep', [None, 0.03, 2])
def test_global_allocations_exact(granularity, s, scope, criterion, min_keep):
    "global, LAMP and ERK prune exactly round(s·N) over the pruned layers, and keep `min_keep` in each"
    sp = build(s, granularity, scope, criterion=criterion, min_keep=min_keep).prune()
    c = per_layer(sp)
    assert sum(p for _, p, _ in c.values()) == expected_total(sp, s)
    for l in sp.layers: assert c[l.name][2] >= max(min_kept(l.grouping, min_keep), 0 if l.grouping.nm else 1), l.name


@pytest.mark.parametrize('granularity,s', CASES)
@pytest.mark.parametrize('min_keep', [None, 0.03, 2])
def test_local_exact_per_layer(granularity, s, min_keep):
    "local (uniform) is exact per layer: round(s·n) of each layer's n groups"
    sp = build(s, granularity, 'local', min_keep=min_keep).prune()
    for l in sp.layers:
        n, p, _ = per_layer(sp)[l.name]
        want = round(s * l.grouping.numel / l.grouping.per_group) * l.grouping.per_group if l.grouping.nm else round(s * n)
        assert p == want, l.name


def test_min_keep_binds_in_global():
    "A layer whose weights are tiny would lose all but one in a global ranking; `min_keep` keeps its floor, the total stays exact"
    m = net()
    with torch.no_grad(): m[6].weight.mul_(1e-3)  # the 1x1 conv: 512 weights, all below every other layer's
    free = build(0.7, 'weight', 'global', model=m).prune()
    assert per_layer(free)['6'][2] == 1
    for mk, floor in ((0.25, 128), (100, 100)):
        m2 = net()
        with torch.no_grad(): m2[6].weight.mul_(1e-3)
        sp = build(0.7, 'weight', 'global', model=m2, min_keep=mk).prune()
        c = per_layer(sp)
        assert c['6'][2] == floor  # exactly its floor: everything above it is still ranked below the others
        assert sum(p for _, p, _ in c.values()) == expected_total(sp, 0.7)


def test_min_keep_in_gradual_global_updates():
    "Along a schedule, with the queued plans of later updates, every step keeps `min_keep` and the last step is exact"
    m = net()
    with torch.no_grad(): m[6].weight.mul_(1e-3)
    sp = build(0.8, 'weight', 'global', model=m, min_keep=0.15)
    shares = np.linspace(0.05, 1, 20)
    for a, b in zip(shares, list(shares[1:]) + [1.]):
        sp.update(float(a), ahead=float(b))
        for l in sp.layers: assert per_layer(sp)[l.name][2] >= min_kept(l.grouping, 0.15), (a, l.name)
    assert sum(p for _, p, _ in per_layer(sp).values()) == expected_total(sp, 0.8)


def test_min_keep_with_layer_sparsity():
    "A `layer_sparsity` entry is honoured where `min_keep` allows it, and is a clear error where it does not"
    sp = build(0.5, 'weight', 'global', layer_sparsity={'0': 0.9}, min_keep=0.1).prune()
    assert per_layer(sp)['0'][1] == round(0.9 * 216)
    with pytest.raises(ValueError, match=r"layer `0`.*`layer_sparsity` entry=0.95"):
        build(0.5, 'weight', 'global', layer_sparsity={'0': 0.95}, min_keep=0.1)


def test_erk_with_layer_sparsity_exact_over_the_rest():
    "Layers with their own target are left out of ERK, which shares round(s·N) among the others exactly"
    sp = build(0.8, 'weight', 'erk', layer_sparsity={'11': 0.0}).prune()
    c = per_layer(sp)
    assert c['11'][1] == 0
    rest = [l for l in sp.layers if l.name != '11']
    assert sum(c[l.name][1] for l in rest) == round(0.8 * sum(l.grouping.n_groups for l in rest))


def test_erk_prune_again_recomputes_targets():
    "`prune(s)` at another sparsity recomputes ERK's targets: exact again"
    sp = build(0.5, 'weight', 'erk').prune()
    for s in (0.7, 0.93):
        sp.prune(s)
        assert sum(p for _, p, _ in per_layer(sp).values()) == expected_total(sp, s)


def test_erk_hand_example_and_dense_layer():
    "100x100 and 4x100 at 50 %: unclipped ε = 5200/304 would give the small layer density 4.4, so it stays dense"
    m = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 4))
    sp = Sparsifier(m, 0.5, scope='erk').prune()
    c = per_layer(sp)
    assert (c['0'][1], c['2'][1]) == (5200, 0)
    assert erk_score((100, 100)) == 0.02 and erk_score((4, 100)) == 0.26
    assert erk_counts([1000] * 3, [0.1, 0.2, 0.3], [999] * 3, 1500).tolist() == [750, 500, 250]


def rigl_erk(shapes, sparsity):
    "RigL's `get_sparsities(..., 'erdos_renyi_kernel')` (google-research/rigl, sparse_utils.py), re-typed: densities per layer"
    dense = set()
    while True:
        divisor = rhs = 0; raw = {}
        for i, shp in enumerate(shapes):
            n = math.prod(shp)
            if i in dense: rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity); raw[i] = sum(shp) / n; divisor += raw[i] * n
        eps = rhs / divisor
        mx = max(raw.values())
        if mx * eps <= 1: break
        dense |= {i for i, p in raw.items() if p == mx}
    return [1. if i in dense else eps * raw[i] for i in range(len(shapes))]


@pytest.mark.parametrize('seed', range(5))
def test_erk_matches_rigl(seed):
    "On random conv and linear shapes, each layer's count is RigL's density times its size, rounded (within 1)"
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(x) for x in rng.integers(1, 64, 2)) + ((k, k) if (k := int(rng.choice([1, 3, 5]))) else ())
              for _ in range(int(rng.integers(3, 9)))]
    s = float(rng.uniform(0.5, 0.98))
    n = [math.prod(x) for x in shapes]
    p = erk_counts(n, [erk_score(x) for x in shapes], n, round(s * sum(n)))
    assert p.sum() == round(s * sum(n))
    for pi, ni, d in zip(p, n, rigl_erk(shapes, s)): assert abs(pi - (1 - d) * ni) <= 1 + 1e-6


def test_erk_filter_counts_filters():
    "With 'filter', ERK shares out filters: exactly round(s·F) of the F filters of the pruned layers go"
    sp = build(0.5, 'filter', 'erk').prune()
    assert sum(p for _, p, _ in per_layer(sp).values()) == round(0.5 * sum(l.grouping.n_groups for l in sp.layers))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('bad,exc,words', [(1.5, ValueError, 'outside [0, 1)'), (1.0, ValueError, 'pass the int 1'),
                                           (-2, ValueError, 'negative'), (True, TypeError, 'min_keep'),
                                           ('5%', TypeError, 'fraction'), (float('nan'), ValueError, 'outside')])
def test_bad_min_keep(bad, exc, words):
    from fasterprune.callback import SparsifyCallback
    m = net(); before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=words.replace('[', r'\[').replace(')', r'\)')): Sparsifier(m, 0.5, min_keep=bad)
    with pytest.raises(exc, match=words.replace('[', r'\[').replace(')', r'\)')): SparsifyCallback(0.5, min_keep=bad)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize('scope', ['global', 'erk'])
def test_unreachable_global_target(scope):
    "`min_keep` that leaves fewer prunable groups than the target asks is an error at construction, naming both"
    with pytest.raises(ValueError, match=r"`sparsity`=0.9 prunes .* but `min_keep`=0.2 lets .* lose"):
        build(0.9, 'weight', scope, min_keep=0.2)


def test_unreachable_local_target():
    with pytest.raises(ValueError, match=r"`min_keep`=3: layer `0` keeps at least 3 of its 8 groups, but `sparsity`=0.9"):
        build(0.9, 'filter', 'local', min_keep=3)


def test_unknown_scope_lists_erk():
    with pytest.raises(ValueError, match=r"'erk'"): Sparsifier(net(), 0.5, scope='ERK')


# ---------------------------------------------------------------- sensitivity

def learner(seed=0, n=256):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:192], ds[192:], bs=32, num_workers=0, device='cpu')
    return Learner(dls, net(seed), loss_func=CrossEntropyLossFlat())


def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('granularity', ['weight', 'filter', '2:4'])
def test_sensitivity_restores_model(granularity):
    "Weights, biases, norms and running statistics bit-identical afterwards, and the train/eval mode as it was"
    learn = learner()
    learn.model.train()
    before = state(learn.model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sens = sensitivity(learn, (0.25, 0.5), granularity=granularity, show_progress=False, sample_input=SAMPLE)
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert learn.model.training
    assert set(sens.curves.layer) == set(sens.sizes) and len(sens.curves) == 2 * len(sens.sizes)
    assert (sens.curves.loss != sens.base['loss']).any()  # pruning did change the outputs while it was measured


def test_sensitivity_restores_after_an_error():
    "A metric that fails mid-measurement: the error comes through, the model is as it was"
    learn = learner()
    before, calls = state(learn.model), []
    def metric(p, y):
        calls.append(1)
        if len(calls) > 4: raise RuntimeError('metric broke')
        return (p.argmax(1) == y).float().mean()
    with pytest.raises(RuntimeError, match='metric broke'): sensitivity(learn, (0.5, 0.9), metric=metric, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())


@pytest.mark.parametrize('granularity', ['weight', 'filter', '2:4'])
@pytest.mark.parametrize('min_keep', [None, 0.1, 2])
@pytest.mark.parametrize('rule', ['sum', 'level'])
def test_sensitivity_targets_exact(granularity, min_keep, rule):
    "The curves' targets prune exactly round(s·N) in a Sparsifier, and keep `min_keep`"
    learn = learner()
    s = 0.45 if granularity == '2:4' else 0.8
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sens = sensitivity(learn, (0.3, 0.5, 0.7, 0.9), granularity=granularity, show_progress=False, sample_input=SAMPLE,
                           min_keep=min_keep)
    ls = sens.layer_sparsity(s, rule=rule)
    sp = build(s, granularity, 'local', model=learn.model, layer_sparsity=ls, min_keep=min_keep).prune()
    c = per_layer(sp)
    assert sum(p for _, p, _ in c.values()) == expected_total(sp, s)
    for l in sp.layers: assert c[l.name][2] >= min_kept(l.grouping, min_keep)


def test_sensitivity_bad_input():
    learn = learner()
    for kw, words in ((dict(sparsities=(0.5, 1.2)), 'outside'), (dict(sparsities=()), 'empty'), (dict(n_batches=0), 'n_batches'),
                      (dict(criterion='movement'), 'needs gradients'), (dict(links=[['0', '3']]), 'links'),
                      (dict(min_keep=2.0), 'pass the int 2')):
        with pytest.raises((ValueError, TypeError), match=words): sensitivity(learn, show_progress=False, **{'sparsities': (0.5,), **kw})
    sens = sensitivity(learn, (0.5, 0.9), show_progress=False)
    with pytest.raises(ValueError, match="`by`='x'"): sens.layer_sparsity(0.5, by='x')
    with pytest.raises(ValueError, match="`rule`='y'"): sens.layer_sparsity(0.5, rule='y')
    with pytest.raises(ValueError, match='no metric'): sens.layer_sparsity(0.5, by='metric')
    with pytest.raises(ValueError, match=r"`min_keep`=0.5 lets"): sens.layer_sparsity(0.8, min_keep=0.5)


@pytest.mark.parametrize('rule', ['sum', 'level'])
def test_curve_counts(rule):
    "Both rules: the cheaper layer goes further; a flat curve is pruned first, to its cap; the count is exact"
    assert curve_counts([100, 100], [([0.5, 0.9], [0.1, 1.0]), ([0.5, 0.9], [0.0, 0.2])], [99, 99], 120, rule).tolist() == [50, 70]
    p = curve_counts([100, 100], [([0.5, 0.9], [0.1, 1.0]), ([0.5, 0.9], [0.0, 0.0])], [99, 80], 90, rule)
    assert p.tolist() == [10, 80]


def test_curve_counts_sum_weighs_layer_size():
    "Least total cost: a large layer at 0.0002 then 0.0005 per group gives all 600 before a small one at 0.001; 'level' splits"
    curves = [([0.5, 0.9], [0.1, 0.3]), ([0.5, 0.9], [0.05, 0.5])]
    assert curve_counts([1000, 100], curves, [999, 99], 600, 'sum').tolist() == [600, 0]
    level = curve_counts([1000, 100], curves, [999, 99], 600, 'level')
    assert level.sum() == 600 and level[1] > 0
    with pytest.raises(ValueError, match="`rule`='x'"): curve_counts([10], [([0.5], [0.1])], [9], 5, 'x')


@pytest.mark.parametrize('seed', range(4))
def test_curve_counts_sum_is_least_total(seed):
    "On convex random curves, the 'sum' allocation's total cost is no more than that of random exact allocations"
    rng = np.random.default_rng(seed)
    sp = np.array([0.25, 0.5, 0.75, 0.9])
    sizes = [int(x) for x in rng.integers(50, 400, 4)]
    curves = [(sp, np.cumsum(np.sort(rng.uniform(0, 1, 4))) * rng.uniform(0.1, 2)) for _ in sizes]  # convex, increasing
    caps = [int(0.9 * n) for n in sizes]
    k = int(0.6 * sum(sizes))
    cost = lambda p: sum(np.interp(pi / n, np.r_[0, s], np.r_[0, c]) for pi, n, (s, c) in zip(p, sizes, curves))
    best = cost(curve_counts(sizes, curves, caps, k, 'sum'))
    for _ in range(200):
        w = rng.dirichlet(np.ones(4)) * k
        p = np.minimum(np.round(w), caps)
        if p.sum() != k: continue
        assert best <= cost(p) + 1e-3


@pytest.mark.parametrize('rule', ['sum', 'level'])
def test_curve_counts_stay_within_measured(rule):
    "No layer goes past the highest sparsity measured while the target can be met inside it; when it cannot, the count is still exact"
    curves = [([0.5, 0.9], [0.2, 0.4]), ([0.5, 0.9], [0.01, 0.02])]  # the second looks cheap: extrapolated, it would take all
    p = curve_counts([1000, 1000], curves, [999, 999], 1700, rule)
    assert p.sum() == 1700 and p.max() <= 900
    p = curve_counts([1000, 1000], curves, [999, 999], 1900, rule)
    assert p.sum() == 1900 and p.min() >= 900


def test_min_keep_in_lazy_global_pool(monkeypatch):
    "Pools too large to keep their scores (recomputed on each pass) honour `min_keep` and the exact count too"
    import fasterprune.sparsifier as S
    monkeypatch.setattr(S, '_LAZY_ABOVE', 100)
    m = net()
    with torch.no_grad(): m[6].weight.mul_(1e-3)
    sp = build(0.7, 'weight', 'global', model=m, min_keep=0.25).prune()
    c = per_layer(sp)
    assert c['6'][2] == 128 and sum(p for _, p, _ in c.values()) == expected_total(sp, 0.7)


# ---------------------------------------------------------------- with masks that move and with shrinking (issues 17, 19)

def test_regrowth_keeps_each_layers_erk_count():
    "RigL under scope='erk': every drop-and-grow keeps each layer at its ERK count (ERK layers are pools of their own)"
    from functools import partial
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.callback.schedule import fit_one_cycle # noqa: F401
    from fastai.torch_core import set_seed
    from fasterprune.callback import SparsifyCallback
    from fasterprune.regrow import Regrow
    from fasterprune.schedules import one_shot
    from fasterprune.demo import digits_dls, small_cnn
    torch.set_num_threads(1); set_seed(0)
    rg = Regrow('gradient', every=3)
    cb = SparsifyCallback(0.8, partial(one_shot, start=0.), scope='erk', regrow=rg)
    learn = Learner(digits_dls(bs=64, shuffle=False), small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cb)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    sp = cb.sparsifier
    want = {l.name: round(l.target * l.grouping.n_groups) for l in sp.layers}
    got = {l.name: int((~sp.masks[l.name]).sum()) for l in sp.layers}
    assert got == want and len(set(l.target for l in sp.layers)) > 1 # per-layer ERK targets, each count kept
    assert sum(r['grown'] for r in rg.history) > 0 # the masks did move
    assert sum(want.values()) == round(0.8 * sum(l.grouping.n_groups for l in sp.layers)) # and ERK's total is exact

def test_min_keep_counts_groups_of_the_original_layer_after_a_shrink():
    "After `shrink` removed channels, `min_keep` still counts the original layer's groups: the counts end at the same target"
    sp = Sparsifier(net(), 0.6, 'filter', scope='global', min_keep=0.25, include=nn.Conv2d, sample_input=SAMPLE)
    before = {l.name: l.cap for l in sp.layers}
    full = sp.group_counts(1.)
    l = sp.layers[0]
    sp.removed[l.name] = 2 # as if a shrink took 2 of its filters: its grouping would then hold 2 fewer
    from fasterprune.granularities import Grouping
    l.grouping = Grouping(nn.Conv2d(l.module.in_channels, l.module.out_channels - 2, l.module.kernel_size), 'filter', l.name)
    assert {l.name: l.cap for l in sp.layers} == before # caps are in the original layers' groups
    assert sp.group_counts(1.)['*'] == full['*'] - 2 # the 2 removed count as pruned
    g = sp._group_scores([(l,)], 'global')[0]
    test_keep = l.grouping.n_groups + 2 - l.cap # the groups it must still keep: all in the layer left
    assert int(torch.isinf(g).sum()) == test_keep
