"""Property tests and external oracles for the pruning engine (issue 2).

Counting rules checked here (see `Sparsifier.group_counts` and nbs/06_sparsifier.ipynb):
- local: each layer loses exactly min(round(s·n), n−1) of its n groups;
- global: the pool loses exactly min(round(s·N), N−L) of its N groups (L layers), and no layer is emptied;
- N:M (M−N weights pruned per pruned block): a layer (local) or the pool (global) loses exactly
  min(round(s·W/(M−N)), B) blocks, W weights and B blocks, and every block keeps at least N weights.
"""
import copy, io, math, warnings
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune

from fasterprune.criteria import lamp_scores
from fasterprune.graph import ModelGraph
from fasterprune.schedules import agp, builtin_schedules, check_schedule, iterative, one_cycle, one_shot
from fasterprune.sparsifier import Sparsifier, kth_smallest, select_smallest

# ---------------------------------------------------------------------------------------------------------------------
# Schedules: the test vectors of algorithms.md §1.1
# ---------------------------------------------------------------------------------------------------------------------
TAUS = [i / 10 for i in range(11)]
OCP6 = [.00247, .00996, .03918, .14190, .40145, .73130, .91713, .97845, .99485, .99898, 1]
OCP5 = [.00669, .02660, .09976, .31006, .64574, .88091, .96782, .99196, .99810, .99962, 1]
AGP3 = [0, .271, .488, .657, .784, .875, .936, .973, .992, .999, 1]


@pytest.mark.parametrize('sched,table,tol', [(one_cycle, OCP6, 1e-5), (partial(one_cycle, beta=5), OCP5, 1e-5),
                                             (partial(agp, start=0.), AGP3, 1e-3)],
                         ids=['one_cycle_beta6', 'one_cycle_beta5', 'agp'])
def test_schedule_vectors(sched, table, tol):
    for tau, want in zip(TAUS, table): assert abs(sched(tau) - want) <= tol, (tau, sched(tau), want)


def test_schedule_shapes():
    assert one_cycle(1.) == 1. and one_cycle(0.) > 0  # OCP's non-zero start
    # AGP in its true form s_f + (s_i - s_f)(1 - tau)^3, here with s_i = 0.3 of the target, window [0.2, 1]
    for pos in np.linspace(0.2, 1, 9):
        tau = (pos - 0.2) / 0.8
        assert abs(agp(pos, initial=0.3) - (1 + (0.3 - 1) * (1 - tau) ** 3)) < 1e-12
    assert agp(0.1) == 0 and agp(0.2, initial=0.3) == pytest.approx(0.3)
    # one-shot and iterative as the One-Cycle comparison used them (§1.3)
    assert one_shot(0.39) == 0 and one_shot(0.4) == 1
    assert [iterative(p) for p in (0.2, 0.21, 0.46, 0.47, 0.73, 0.74, 1.)] == [0, 1/3, 1/3, 2/3, 2/3, 1, 1]
    for name, f in builtin_schedules.items():  # every built-in passes its own check, and stays in [0, 1]
        check_schedule(f, name)
        assert all(0 <= f(float(p)) <= 1 for p in np.linspace(0, 1, 101)), name


def test_fastai_annealers_are_schedules():
    from fastai.callback.schedule import SchedCos, SchedLin, combine_scheds
    check_schedule(SchedCos(0, 1))
    check_schedule(combine_scheds([0.3, 0.7], [SchedLin(0, 0.5), SchedCos(0.5, 1)]))


# ---------------------------------------------------------------------------------------------------------------------
# Selection internals: kth_smallest / select_smallest against a stable sort
# ---------------------------------------------------------------------------------------------------------------------
def _make_values(kind, n, g, dtype):
    if kind == 'normal': v = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == 'few': v = torch.randint(-2, 3, (n,), generator=g).double()  # 5 distinct values, negatives
    elif kind == 'zeros': v = torch.where(torch.rand(n, generator=g) < 0.7, 0., torch.rand(n, generator=g, dtype=torch.float64))
    elif kind == 'signed_zeros': v = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.), torch.tensor(0.)).double()
    elif kind == 'constant': v = torch.full((n,), 3.25, dtype=torch.float64)
    elif kind == 'sorted': v = torch.randn(n, generator=g, dtype=torch.float64).sort().values
    elif kind == 'rounded': v = torch.randn(n, generator=g, dtype=torch.float64).round(decimals=1)
    else: raise ValueError(kind)
    return v.to(dtype)


def _split(v, n_parts, g):
    "`v` cut into `n_parts` consecutive tensors of random sizes, some possibly empty"
    n = v.numel()
    cuts = sorted(torch.randint(0, n + 1, (n_parts - 1,), generator=g).tolist())
    bounds = [0] + cuts + [n]
    return [v[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]


def _reference_select(scores, k):
    "The first `k` of a stable sort of the concatenation: ties to the earlier tensor, then the earlier position"
    allv = torch.cat([s.double() for s in scores])
    order = torch.sort(allv, stable=True).indices[:k]
    flat = torch.zeros(allv.numel(), dtype=torch.bool)
    flat[order] = True
    return list(flat.split([s.numel() for s in scores]))


SIZES = [1, 7, 2**14 - 1, 2**14, 2**14 + 1, 2**16 - 1, 2**16, 2**16 + 1, 300_001]
KINDS = ['normal', 'few', 'zeros', 'signed_zeros', 'constant', 'sorted', 'rounded']


@given(n=st.sampled_from(SIZES), kind=st.sampled_from(KINDS), n_parts=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1),
       kq=st.one_of(st.sampled_from([0., 1.]), st.floats(0, 1)))
def test_kth_and_select_match_a_sort(n, kind, n_parts, dtype, seed, kq):
    g = torch.Generator().manual_seed(seed)
    scores = _split(_make_values(kind, n, g, dtype), n_parts, g)
    k = 1 + round(kq * (n - 1))
    allv = torch.cat(scores).sort().values
    assert kth_smallest(scores, k) == allv[k - 1].item()
    got = select_smallest(scores, k)
    want = _reference_select(scores, k)
    assert [m.dtype for m in got] == [torch.bool] * len(scores)
    assert sum(int(m.sum()) for m in got) == k
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@settings(max_examples=20)
@given(n_tensors=st.sampled_from([1500, 5000]), size=st.integers(4, 12), seed=st.integers(0, 2**31 - 1),
       order=st.sampled_from(['ascending', 'descending', 'first_small']), kq=st.floats(0, 1))
def test_select_many_small_tensors(n_tensors, size, seed, order, kq):
    "Thousands of small tensors (smaller than the sampling stride): the strided sample sees only their first elements"
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n_tensors, size, generator=g)
    if order == 'ascending': v = v.sort(1).values
    elif order == 'descending': v = v.sort(1, descending=True).values
    else: v[:, 0] = -100.  # every sampled value is the same outlier
    scores = list(v.unbind(0))
    n = v.numel()
    k = 1 + round(kq * (n - 1))
    assert kth_smallest(scores, k) == v.reshape(-1).sort().values[k - 1].item()
    got = select_smallest(scores, k)
    assert all(torch.equal(a, b) for a, b in zip(got, _reference_select(scores, k)))


@pytest.mark.parametrize('n', [2**14 + 1, 2**16 + 1, 2**20 + 7])
def test_select_periodic_adversary(n):
    "Every value the strided sample sees is the same (zeros on the sample's positions): the bracket must fall back"
    g = torch.Generator().manual_seed(n)
    v = torch.rand(n, generator=g) + 1
    stride = max(1, n // min(1 << 16, max((1 << 14) // 4, n // 64)))
    v[::stride] = 0.
    for k in (1, v.eq(0).sum().item(), v.eq(0).sum().item() + 1, n // 2, n):
        assert kth_smallest([v], k) == v.sort().values[k - 1].item()
        assert int(select_smallest([v], k)[0].sum()) == k


@given(n=st.sampled_from([100, 2**14 + 1, 2**16 + 1]), kind=st.sampled_from(['normal', 'few', 'zeros']),
       n_parts=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), kq=st.floats(0, 1), lazy=st.lists(st.booleans(), min_size=4, max_size=4))
def test_select_lazy_scores(n, kind, n_parts, seed, kq, lazy):
    "Scores recomputed on each read (`LazyScores`, used for very large pools) select exactly what tensors do"
    import fasterprune.sparsifier as S
    if not hasattr(S, 'LazyScores'): pytest.skip('no LazyScores in this version of the engine')
    g = torch.Generator().manual_seed(seed)
    scores = _split(_make_values(kind, n, g, torch.float32), n_parts, g)
    def wrap(s): return S.LazyScores(lambda: s.clone(), s.numel(), s.device)
    mixed = [wrap(s) if z else s for s, z in zip(scores, lazy)]
    k = 1 + round(kq * (n - 1))
    assert kth_smallest(mixed, k) == torch.cat(scores).sort().values[k - 1].item()
    got = select_smallest(mixed, k)
    assert all(torch.equal(a, b) for a, b in zip(got, _reference_select(scores, k)))
    assert [int(m.sum()) for m in select_smallest(mixed, 0)] == [0] * len(scores)


def test_select_k_zero_and_torch_backend():
    a, b = torch.tensor([3., 1, 1, 2]), torch.tensor([1., 5])
    assert [int(m.sum()) for m in select_smallest([a, b], 0)] == [0, 0]
    # float16 (and mixed dtypes) take the torch path rather than numpy: same answer
    for scores in ([a.half(), b.half()], [a, b.double()], [a.half(), b]):
        for k in range(1, 7):
            got = select_smallest(scores, k)
            assert all(torch.equal(x, y) for x, y in zip(got, _reference_select(scores, k))), (scores, k)
    big = [torch.randn(40_000, generator=torch.Generator().manual_seed(1)).half()]
    for k in (1, 12_345, 40_000):
        assert kth_smallest(big, k) == big[0].float().sort().values[k - 1].item()
        assert int(select_smallest(big, k)[0].sum()) == k
    with pytest.raises(ValueError, match='outside'): kth_smallest([a], 5)


# ---------------------------------------------------------------------------------------------------------------------
# Random layers and models
# ---------------------------------------------------------------------------------------------------------------------
CONV = {('conv', 1): nn.Conv1d, ('conv', 2): nn.Conv2d, ('conv', 3): nn.Conv3d,
        ('convT', 1): nn.ConvTranspose1d, ('convT', 2): nn.ConvTranspose2d, ('convT', 3): nn.ConvTranspose3d}
KINDS_ALL = ['linear'] + [f'{k}{d}' for k, d in CONV]


@st.composite
def layer_specs(draw, nm=False, kinds=None):
    "A small layer description; with `nm`, one whose input size is a multiple of 4 (so '2:4' applies)"
    kind = draw(st.sampled_from(kinds or KINDS_ALL))
    bias = draw(st.booleans())
    if kind == 'linear':
        i = 4 * draw(st.integers(1, 3)) if nm else draw(st.integers(1, 12))
        return ('linear', i, draw(st.integers(1, 10)), bias)
    t, nd = kind[:-1], int(kind[-1])
    style = draw(st.sampled_from(['dense', 'grouped', 'depthwise'] if not nm else ['dense', 'grouped']))
    g = 1 if style == 'dense' else draw(st.integers(2, 3))
    a = 4 * draw(st.integers(1, 2)) if nm else draw(st.integers(1, 3))  # input channels per group
    if style == 'depthwise': a = 1
    b = draw(st.integers(1, 3))  # output channels per group (depth multiplier for depthwise)
    ks = tuple(draw(st.integers(1, 3 if nd < 3 else 2)) for _ in range(nd))
    return (t, nd, g * a, g * b, ks, g, bias)


def build(spec):
    if spec[0] == 'linear': return nn.Linear(spec[1], spec[2], bias=spec[3])
    t, nd, i, o, ks, g, bias = spec
    return CONV[(t, nd)](i, o, ks, groups=g, bias=bias)


def build_model(specs, seed, ties=False):
    torch.manual_seed(seed)
    model = nn.Sequential(*[build(s) for s in specs])
    if ties:  # few distinct values and many exact zeros
        with torch.no_grad():
            for p in model.parameters(): p.copy_((p * 3 / p.abs().max().clamp_min(1e-12)).round())
    return model


def fake_backward(sp, seed, times=2):
    "Give every pruned layer a gradient and let the criterion accumulate it"
    g = torch.Generator().manual_seed(seed)
    for _ in range(times):
        for l in sp.layers: l.weight.grad = torch.randn(l.weight.shape, generator=g)
        sp.accumulate()


def local_oracle(s, n):
    "Acceptable local counts: round(s·n), capped at n−1. At an exact .5 tie either neighbour (the engine rounds s·n as Python does: test_local_count_is_round_s_n)"
    x = s * n
    if abs(x - math.floor(x) - 0.5) < 1e-9: return {min(math.floor(x), n - 1), min(math.ceil(x), n - 1)}
    return {min(round(x), n - 1)}


def pruned_groups(l, mask):
    if l.grouping.nm: return int((~l.grouping._blocks(mask)).any(1).sum())
    return int((~mask).sum())


def module_fingerprint(model):
    "Everything a sparsifier could have stored on the model: state_dict layout, attributes, hooks"
    sd = model.state_dict()
    return ({k: (tuple(v.shape), v.dtype) for k, v in sd.items()},
            {n: sorted(m.__dict__) for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()},
            {n: len(p._backward_hooks or {}) if hasattr(p, '_backward_hooks') else 0 for n, p in model.named_parameters()})


def check_masks(sp, s, share=1.):
    "Masks are bool at the group's shape, counts are exact, no layer is emptied, pruned weights are zero"
    masks = sp.masks
    assert set(masks) == {l.name for l in sp.layers}
    for l in sp.layers:
        m = masks[l.name]
        assert m.dtype == torch.bool and tuple(m.shape) == tuple(l.grouping.mask_shape)
        w = l.weight.detach()
        if l.grouping.nm:
            n, M = l.grouping.nm
            kept = l.grouping._blocks(m).sum(1)
            assert bool((kept >= n).all()), 'an N:M block kept fewer than N weights'
            assert bool(((kept == n) | (kept == M)).all())
            assert bool((w[~m] == 0).all())
        else:
            assert bool(m.any()), f'layer {l.name} emptied'
            v = l.grouping.view(w)
            assert bool((v * m == v).all()), 'a pruned weight is not zero'
    per_layer = {l.name: pruned_groups(l, masks[l.name]) for l in sp.layers}
    nm = sp.layers[0].grouping.nm
    if sp.scope == 'local':
        for l in sp.layers:
            if nm:
                n, M = nm
                want = {min(round(s * share * l.grouping.numel / (M - n)), l.grouping.n_groups)}
            else: want = local_oracle(s * share, l.grouping.n_groups)
            assert per_layer[l.name] in want, (l, s, per_layer[l.name], want)
            assert sp.counts[l.name] == per_layer[l.name]
    else:
        if nm:
            n, M = nm
            total = sum(l.grouping.numel for l in sp.layers) / (M - n)
            want = min(round(s * share * total), sum(l.grouping.n_groups for l in sp.layers))
        else:
            N, L = sum(l.grouping.n_groups for l in sp.layers), len(sp.layers)
            want = min(round(s * share * N), N - L)
        assert sum(per_layer.values()) == want, (s, per_layer, want)
        assert sp.counts['*'] == want


# ---------------------------------------------------------------------------------------------------------------------
# Property tests: exact counts, bool masks, never empty, idempotent, nothing on the model, deterministic
# ---------------------------------------------------------------------------------------------------------------------
CRITERIA = ['large_final', 'random', 'lamp', 'movement', 'taylor']


@st.composite
def configs(draw):
    gran = draw(st.sampled_from(['weight', 'kernel', 'filter', 'channel', '2:4']))
    nm = gran == '2:4'
    kinds = [k for k in KINDS_ALL if k != 'linear'] if gran == 'kernel' else None
    specs = draw(st.lists(layer_specs(nm=nm, kinds=kinds), min_size=1, max_size=4))
    smax = 0.5 if nm else 1.
    s = draw(st.one_of(st.sampled_from([0., smax, smax / 2]), st.floats(0, smax)))
    return dict(specs=specs, granularity=gran, sparsity=s, scope=draw(st.sampled_from(['local', 'global'])),
                criterion=draw(st.sampled_from(CRITERIA)), reduce=draw(st.sampled_from(['mean', 'sum', 'l2', 'max'])),
                seed=draw(st.integers(0, 2**16)), ties=draw(st.booleans()), share=draw(st.sampled_from([1., 0.5, 0.3])))


def make(cfg, model=None):
    model = model if model is not None else build_model(cfg['specs'], cfg['seed'], cfg['ties'])
    sp = Sparsifier(model, cfg['sparsity'], cfg['granularity'], cfg['criterion'], cfg['scope'], reduce=cfg['reduce'],
                    include='*')  # every layer, the model's ends included (the default selection protects them)
    if sp.criterion.needs_grad: fake_backward(sp, cfg['seed'])
    return model, sp


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_sparsifier_properties(cfg):
    model = build_model(cfg['specs'], cfg['seed'], cfg['ties'])
    before = module_fingerprint(model)
    model, sp = make(cfg, model)
    if sp.criterion.needs_grad:
        for p in model.parameters(): p.grad = None
    sp.update(cfg['share'], force=True)
    check_masks(sp, cfg['sparsity'], cfg['share'])
    assert module_fingerprint(model) == before, 'the sparsifier stored something on the model'
    # applying twice changes nothing; recomputing at the same target gives the same masks
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    masks1 = {k: m.clone() for k, m in sp.masks.items()}
    sp.apply()
    assert all(torch.equal(w1[k], v) for k, v in model.state_dict().items())
    assert sp.update(cfg['share']) is False  # same counts: nothing recomputed
    sp.update(cfg['share'], force=True)
    assert all(torch.equal(w1[k], v) for k, v in model.state_dict().items()), 'a forced update changed the weights'
    if not (cfg['ties'] and cfg['granularity'] == '2:4'):  # N:M ties among kept zeros may swap places in a block
        assert all(torch.equal(masks1[k], m) for k, m in sp.masks.items()), 'a forced update changed the masks'
    # ties are broken deterministically: the same model and arguments give the same masks
    _, sp2 = make(cfg)
    sp2.update(cfg['share'], force=True)
    assert all(torch.equal(masks1[k], m) for k, m in sp2.masks.items())


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_lazy_scores_path_gives_the_same_masks(cfg):
    "Pools above `_LAZY_ABOVE` weights recompute scores on each pass instead of keeping them: same masks"
    import fasterprune.sparsifier as S
    if not hasattr(S, '_LAZY_ABOVE'): pytest.skip('no lazy path in this version of the engine')
    masks = []
    for limit in (S._LAZY_ABOVE, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(S, '_LAZY_ABOVE', limit)
            _, sp = make(cfg)
            sp.update(cfg['share'], force=True)
            masks.append(sp.masks)
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(layer_specs(), min_size=2, max_size=4), seed=st.integers(0, 2**16),
       s=st.floats(0, 1), own=st.floats(0, 1), gran=st.sampled_from(['weight', 'filter', 'channel']))
def test_global_with_layer_sparsity(specs, seed, s, own, gran):
    "A layer with its own target is pruned locally to it; the others share the global ranking"
    model = build_model(specs, seed)
    sp = Sparsifier(model, s, gran, scope='global', layer_sparsity={'0': own}, include='*').prune()
    first, rest = sp.layers[0], sp.layers[1:]
    assert pruned_groups(first, sp.masks['0']) in local_oracle(own, first.grouping.n_groups)
    N, L = sum(l.grouping.n_groups for l in rest), len(rest)
    assert sum(pruned_groups(l, sp.masks[l.name]) for l in rest) == min(round(s * N), N - L)
    assert all(sp.masks[l.name].any() for l in sp.layers)


@given(n=st.integers(2, 12), seed=st.integers(0, 2**16), gran=st.sampled_from(['weight', 'filter']),
       crit=st.sampled_from(['large_final', 'lamp', 'random']))
def test_global_never_empties_a_layer(n, seed, gran, crit):
    "A tiny-valued layer next to a large one: plain global magnitude would empty it at high sparsity"
    model = build_model([('linear', 8, n, False), ('linear', n, 16, False)], seed)
    with torch.no_grad(): model[0].weight.mul_(1e-6)
    sp = Sparsifier(model, 0.99, gran, crit, 'global').prune()
    check_masks(sp, 0.99)
    assert all(bool(l.weight.ne(0).any()) for l in sp.layers)


@pytest.mark.parametrize('gran', ['weight', 'filter'])
@pytest.mark.parametrize('scope', ['local', 'global'])
def test_all_equal_scores(gran, scope):
    "Every score tied (constant weights, or all zero): exact counts, nothing emptied, and the same masks every time"
    for fill in (0.5, 0.):
        masks = []
        for _ in range(2):
            model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 3), nn.Linear(4, 3))
            for p in model.parameters(): nn.init.constant_(p, fill)
            sp = Sparsifier(model, 0.9, gran, scope=scope).prune()
            check_masks(sp, 0.9)
            masks.append(sp.masks)
        assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _input_for(m, g, batch=3):
    if isinstance(m, nn.Linear): return torch.randn(batch, m.in_features, generator=g)
    nd = len(m.kernel_size)
    return torch.randn(batch, m.in_channels, *[4] * nd, generator=g)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(spec=layer_specs(), seed=st.integers(0, 2**16), s=st.floats(0.05, 1), act=st.booleans(),
       gran=st.sampled_from(['filter', 'channel']), scope=st.sampled_from(['local', 'global']))
def test_filter_and_channel_mean_what_they_say(spec, seed, s, act, gran, scope):
    """Functional oracle, on every layer type (grouped, depthwise, transposed): a pruned filter's output channel is
    exactly zero after its BatchNorm (weight, bias, γ and β zeroed); a pruned channel's input does not matter"""
    torch.manual_seed(seed)
    m = build(spec)
    nd = 1 if isinstance(m, nn.Linear) else len(m.kernel_size)
    bn = BN[nd](m.weight.shape[1] * m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else m.weight.shape[0])
    nn.init.normal_(bn.weight); nn.init.normal_(bn.bias)
    with torch.no_grad(): bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(m, *([nn.ReLU()] if act else []), bn).eval()
    sp = Sparsifier(model, s, gran, scope=scope, include='0').prune()  # named: the model's output and input layer
    keep = sp.masks['0'].reshape(-1)
    assert keep.numel() == (bn.num_features if gran == 'filter' else (m.in_features if isinstance(m, nn.Linear) else m.in_channels))
    assert int((~keep).sum()) in local_oracle(s, keep.numel())  # one layer: local and global agree
    g = torch.Generator().manual_seed(seed)
    x = _input_for(m, g)
    with torch.no_grad():
        y = model(x)
        if gran == 'filter':
            assert sp.layers[0].norms == [bn]
            assert bool((y[:, ~keep] == 0).all()), 'a pruned filter still produces an output after its BatchNorm'
            assert bool((bn.weight[~keep] == 0).all() and (bn.bias[~keep] == 0).all())
            if m.bias is not None: assert bool((m.bias[~keep] == 0).all())
            assert bool((bn.weight[keep] != 0).all())
        else:
            x2 = x.clone(); x2[:, ~keep] = torch.randn(x2[:, ~keep].shape, generator=g) * 100
            assert torch.allclose(model(x2), y, atol=1e-4), 'a pruned input channel still changes the output'
            assert bn.weight.ne(0).all()  # channel pruning leaves the BatchNorm alone
    # gradients of pruned weights (and, for filters, of bias and BatchNorm) are zeroed by mask_grads
    model.train(); model.zero_grad()
    model(x).square().sum().backward()
    sp.mask_grads()
    v = sp.layers[0].grouping.view(m.weight.grad)
    assert bool((v * sp.masks['0'] == v).all())
    if gran == 'filter': assert bool((bn.weight.grad[~keep] == 0).all() and (bn.bias.grad[~keep] == 0).all())


def test_report():
    model = build_model([('linear', 8, 6, True), ('conv', 2, 6, 4, (3, 3), 1, False)], 0)
    sp = Sparsifier(model, 0.5, 'weight', scope='global').prune()
    df = sp.report()
    assert list(df.columns) == ['name', 'type', 'shape', 'params', 'groups', 'pruned', 'sparsity', 'weight_sparsity',
                                'zeros', 'granularity', 'note']
    assert df.name.tolist() == ['0', '1', 'total', 'model'] and df.type.tolist()[:2] == ['Linear', 'Conv2d']
    assert df.params.tolist() == [48, 216, 264, 264 + 6] and df.zeros.iloc[2] == df.pruned.iloc[2] == round(0.5 * 264) == 132
    assert df.sparsity.iloc[2] == pytest.approx(0.5) and sp.sparsity_achieved() == pytest.approx(0.5)


def test_nm_on_grouped_transposed_conv_checks_input_per_group():
    "ConvTranspose2d(4, 4, 1, groups=2): 2 inputs per group, like Conv2d(4, 4, 1, groups=2), which '2:4' refuses"
    with pytest.raises(ValueError, match='multiple of 4'): Sparsifier(nn.Sequential(nn.Conv2d(4, 4, 1, groups=2)), 0.5, '2:4')
    m = nn.ConvTranspose2d(4, 4, 1, groups=2, bias=False)  # weight (in=4, out/g=2, 1, 1); output 0 reads inputs 0, 1
    with torch.no_grad(): m.weight[:, 0, 0, 0] = torch.tensor([0.1, 0.2, 0.9, 0.8])  # inputs 2, 3 feed output 2
    try: Sparsifier(nn.Sequential(m), 0.5, '2:4').prune()
    except ValueError as e:
        assert 'multiple of 4' in str(e); return
    assert bool(m.weight[0:2, 0].ne(0).any()), 'output channel 0 lost every input weight: the block spanned two groups'


def test_parametrized_layer_is_pruned_or_refused():
    "A parametrized layer (weight_norm) would be pruned without effect (its `weight` is recomputed): it is refused, naming it"
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(8, 4)), nn.Linear(4, 2))
    try: sp = Sparsifier(model, 0.5)
    except (ValueError, TypeError) as e:  # refusing at construction, naming the layer, is fine too
        assert '`0`' in str(e); return
    sp.prune()
    assert int((model[0].weight == 0).sum()) == 16


def test_local_count_is_round_s_n():
    "5 filters of 9 weights at s=0.7: round(0.7*5) = round(3.5) = 4, which global scope gives, but local gives 3"
    model = nn.Sequential(nn.Conv2d(1, 5, 3))
    assert Sparsifier(model, 0.7, 'filter', scope='global', include='0').group_counts() == {'*': round(0.7 * 5)}
    assert Sparsifier(model, 0.7, 'filter', scope='local', include='0').group_counts() == {'0': round(0.7 * 5)}


# ---------------------------------------------------------------------------------------------------------------------
# External oracles: torch.nn.utils.prune
# ---------------------------------------------------------------------------------------------------------------------
@given(specs=st.lists(layer_specs(), min_size=1, max_size=4), seed=st.integers(0, 2**16), s=st.floats(0, 0.95))
def test_global_weight_matches_global_unstructured(specs, seed, s):
    model = build_model(specs, seed)
    ref = copy.deepcopy(model)
    N = sum(m.weight.numel() for m in model)
    assume(torch.cat([m.weight.detach().abs().flatten() for m in model]).unique().numel() == N)  # no ties
    k = round(s * N)
    prune.global_unstructured([(m, 'weight') for m in ref], pruning_method=prune.L1Unstructured, amount=k)
    assume(all(bool(m.weight_mask.any()) for m in ref))  # where plain global MP would empty a layer, we differ on purpose
    sp = Sparsifier(model, s, 'weight', 'large_final', 'global').prune()
    for i, m in enumerate(ref): assert torch.equal(sp.masks[str(i)].reshape(m.weight.shape), m.weight_mask.bool()), i
    for i, m in enumerate(ref): assert torch.equal(model[i].weight, m.weight)


@given(spec=layer_specs(kinds=['linear', 'conv1', 'conv2', 'conv3', 'convT1', 'convT2']), seed=st.integers(0, 2**16),
       s=st.floats(0, 1))
def test_local_filter_l2_matches_ln_structured(spec, seed, s):
    model = build_model([spec], seed)
    m = model[0]
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    assume(not (transposed and m.groups > 1))  # a grouped transposed conv's filters are not slices along one dim
    dim = 1 if transposed else 0
    norms = m.weight.detach().transpose(0, dim).flatten(1).norm(dim=1)
    assume(norms.unique().numel() == norms.numel())
    n = norms.numel()
    k = min(round(s * n), n - 1)
    assume(len(local_oracle(s, n)) == 1)
    ref = copy.deepcopy(m)
    prune.ln_structured(ref, 'weight', amount=k, n=2, dim=dim)
    sp = Sparsifier(model, s, 'filter', 'large_final', 'local', reduce='l2', include='0').prune()
    want = ref.weight_mask.transpose(0, dim).flatten(1).all(1)
    assert torch.equal(sp.masks['0'].reshape(-1), want)
    assert torch.equal(m.weight, ref.weight)


def test_lamp_vector():
    "algorithms.md §3: A=[1,2,3], B=[10,20]; prune 2 of 5 globally: LAMP removes A[0], B[0]; magnitude A[0], A[1]"
    assert torch.allclose(lamp_scores(torch.tensor([1., 2, 3])), torch.tensor([1 / 14, 4 / 13, 1.]))
    assert torch.allclose(lamp_scores(torch.tensor([10., 20])), torch.tensor([0.2, 1.]))
    assert torch.allclose(lamp_scores(torch.tensor([3., 1, 2])), torch.tensor([1., 1 / 14, 4 / 13]))  # any order
    def model():
        m = nn.Sequential(nn.Linear(3, 1, bias=False), nn.Linear(2, 1, bias=False))
        with torch.no_grad(): m[0].weight.copy_(torch.tensor([[1., 2, 3]])); m[1].weight.copy_(torch.tensor([[10., 20]]))
        return m
    sp = Sparsifier(model(), 0.4, 'weight', 'lamp', 'global').prune()
    assert sp.masks['0'].tolist() == [[False, True, True]] and sp.masks['1'].tolist() == [[False, True]]
    mp = Sparsifier(model(), 0.4, 'weight', 'large_final', 'global').prune()
    assert mp.masks['0'].tolist() == [[False, False, True]] and mp.masks['1'].tolist() == [[True, True]]


def _lamp_reference(w):
    "algorithms.md §3 on one flat tensor, in float64: W[u]² / Σ_{v ≥ u} W[v]², ascending order"
    sq = w.double().flatten().square()
    order = sq.argsort()
    suffix = sq[order].flip(0).cumsum(0).flip(0)
    out = torch.empty_like(sq); out[order] = sq[order] / suffix
    return out


@given(specs=st.lists(layer_specs(), min_size=1, max_size=4), seed=st.integers(0, 2**16), s=st.floats(0, 1))
def test_global_lamp_matches_reference(specs, seed, s):
    "Global LAMP prunes the round(s·N) smallest LAMP scores over all layers (capped at N−L: each layer keeps its 1)"
    model = build_model(specs, seed)
    ref = [_lamp_reference(m.weight.detach()) for m in model]
    allr = torch.cat(ref)
    N, L = allr.numel(), len(ref)
    assume(allr.unique().numel() == N)
    k = min(round(s * N), N - L)
    thr = allr.sort().values[k - 1] if k else -1.
    sp = Sparsifier(model, s, 'weight', 'lamp', 'global').prune()
    for i, r in enumerate(ref): assert torch.equal(sp.masks[str(i)].reshape(-1), r > thr), i


@given(specs=st.lists(layer_specs(), min_size=1, max_size=3), seed=st.integers(0, 2**16), s=st.floats(0, 1),
       gran=st.sampled_from(['weight', 'filter', 'channel']))
def test_local_lamp_is_local_magnitude(specs, seed, s, gran):
    "LAMP is monotone within a layer: in local scope it prunes what magnitude prunes"
    model = build_model(specs, seed)
    assume(all(m.weight.detach().abs().unique().numel() == m.weight.numel() for m in model))
    a = Sparsifier(copy.deepcopy(model), s, gran, 'lamp', 'local', include='*').prune()
    b = Sparsifier(copy.deepcopy(model), s, gran, 'large_final', 'local', include='*').prune()
    assume(all(l.grouping.reduce_scores(l.weight.detach().abs()).unique().numel() == l.grouping.n_groups for l in b.layers))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize('criterion,score', [('movement', lambda w, g: -(g * w)), ('taylor', lambda w, g: (g * w).abs())])
def test_gradient_criteria_scores(criterion, score):
    "movement accumulates −grad·W (Sanh et al.), taylor |grad·W|, over every backward; the k lowest are pruned"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 6))
    sp = Sparsifier(model, 0.6, 'weight', criterion, 'global')
    g = torch.Generator().manual_seed(3)
    acc = [torch.zeros_like(l.weight) for l in sp.layers]
    for _ in range(3):
        for l, a in zip(sp.layers, acc):
            l.weight.grad = torch.randn(l.weight.shape, generator=g)
            a += score(l.weight.detach(), l.weight.grad)
        sp.accumulate()
    for l, a in zip(sp.layers, acc): assert torch.allclose(sp.state[l.name]['score'], a, atol=1e-6)
    allv = torch.cat([a.flatten() for a in acc])
    k = round(0.6 * allv.numel())
    thr = allv.sort().values[k - 1]
    sp.prune()
    for l, a in zip(sp.layers, acc): assert torch.equal(sp.masks[l.name], a > thr)


def test_random_criterion_is_seeded():
    from fasterprune.criteria import RandomCriterion
    def masks(seed):
        torch.manual_seed(123)  # the global RNG must not matter
        model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 5))
        torch.manual_seed(seed + 1000)
        return Sparsifier(model, 0.5, 'weight', RandomCriterion(seed), 'global').prune().masks
    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nm_pattern_on_each_layer_type():
    "2:4 keeps the 2 largest |w| of every 4 consecutive weights along the input dim (apex ASP m4n2_1d)"
    torch.manual_seed(0)
    for m in (nn.Linear(8, 3), nn.Conv1d(8, 2, 3), nn.Conv2d(4, 2, 2), nn.Conv2d(8, 4, 3, groups=2),
              nn.Conv3d(4, 2, 2), nn.ConvTranspose2d(8, 2, 2), nn.ConvTranspose2d(16, 4, 2, groups=2)):
        in_dim = 0 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 1
        blocks = m.weight.detach().movedim(in_dim, -1).reshape(-1, 4).clone()
        sp = Sparsifier(nn.Sequential(m), 0.5, '2:4').prune()
        after = m.weight.detach().movedim(in_dim, -1).reshape(-1, 4)
        want = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, blocks.abs().topk(2, dim=1).indices, True)
        assert torch.equal(after != 0, want), m
        assert torch.equal(after[want], blocks[want])
        assert torch.equal(sp.masks['0'].movedim(in_dim, -1).reshape(-1, 4), want)


# ---------------------------------------------------------------------------------------------------------------------
# BatchNorm binding from the graph
# ---------------------------------------------------------------------------------------------------------------------
def resnet18_bn_pairs(model):
    "conv -> BatchNorm pairs of torchvision's ResNet, known from its source"
    pairs = {'conv1': 'bn1'}
    for name, _ in model.named_modules():
        if name.startswith('layer') and name.split('.')[-1] in ('conv1', 'conv2', 'conv3'):
            pairs[name] = name[:-len('convX')] + 'bn' + name[-1]
        if name.endswith('downsample.0'): pairs[name] = name[:-1] + '1'
    return pairs


@pytest.mark.parametrize('scope,criterion', [('local', 'large_final'), ('global', 'random'), ('global', 'lamp')])
def test_filter_pruning_zeroes_bias_and_bn_of_resnet18(scope, criterion):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d): nn.init.normal_(m.weight); nn.init.normal_(m.bias)
    nn.init.normal_(model.fc.bias)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = Sparsifier(model, 0.6, 'filter', criterion, scope).prune()
    assert list(sp.skipped) == ['fc'] and torch.equal(model.fc.weight, before['fc.weight'])  # its outputs are the classes
    mods = dict(model.named_modules())
    pairs = resnet18_bn_pairs(model)
    assert len(pairs) == 20
    for l in sp.layers:
        assert [mods[b] for b in sp.graph.following_bns(l.name)] == ([mods[pairs[l.name]]] if l.name in pairs else [])
        assert l.norms == ([mods[pairs[l.name]]] if l.name in pairs else [])
    checked = 0
    for l in sp.layers:
        keep = sp.masks[l.name].reshape(-1)
        assert keep.numel() == l.weight.shape[0] and bool(keep.any())
        if scope == 'local': assert int((~keep).sum()) == round(0.6 * keep.numel())
        w = l.weight.detach().flatten(1)
        assert bool((w[~keep] == 0).all())
        tensors = [f'{l.name}.bias'] if l.module.bias is not None else []
        if l.name in pairs: tensors += [f'{pairs[l.name]}.weight', f'{pairs[l.name]}.bias']
        for t in tensors:
            now = model.state_dict()[t]
            assert bool((now[~keep] == 0).all()), t
            assert torch.equal(now[keep], before[t][keep]), t  # kept filters' BN and bias untouched
            checked += 1
    assert checked == 2 * 20
    assert sum(int((~m).sum()) for m in sp.masks.values()) > 0
    # BatchNorm running statistics are not parameters of the pruned filters: left alone
    for k, v in model.state_dict().items():
        if 'running' in k or 'num_batches' in k: assert torch.equal(v, before[k]), k


class _Untraceable(nn.Module):
    "torch.fx cannot trace data-dependent control flow: the graph falls back to forward hooks"
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1); self.bn = nn.BatchNorm2d(8); self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1); self.bn2 = nn.BatchNorm2d(8)
    def forward(self, x):
        if x.sum() > 0: x = x * 1
        return self.bn2(self.conv2(self.act(self.bn(self.conv(x)))))


def test_bn_binding_with_hooks():
    model = _Untraceable()
    for bn in (model.bn, model.bn2): nn.init.normal_(bn.weight); nn.init.normal_(bn.bias)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sp = Sparsifier(model, 0.5, 'filter', sample_input=torch.randn(2, 3, 8, 8), include='*').prune()
    assert sp.graph.mode == 'hooks'
    assert {l.name: l.norms for l in sp.layers} == {'conv': [model.bn], 'conv2': [model.bn2]}
    for conv, bn in (('conv', model.bn), ('conv2', model.bn2)):
        keep = sp.masks[conv].reshape(-1)
        assert int((~keep).sum()) == 4 and bool((bn.weight[~keep] == 0).all()) and bool((bn.bias[~keep] == 0).all())
        assert bool((bn.weight[keep] != 0).all())


class _FreedOutput(nn.Module):
    "The conv's output is reduced to a scalar and freed; the BatchNorm reads a tensor the conv never produced"
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1); self.bn = nn.BatchNorm2d(8)
    def forward(self, x):
        if x.sum() > 0: x = x * 1  # untraceable by torch.fx
        t = self.conv(x).mean()
        y = x.new_zeros(2, 8, 8, 8)  # unrelated to conv
        return self.bn(y) + t


def test_hook_graph_has_no_false_edges():
    found = [ModelGraph(_FreedOutput(), torch.randn(2, 3, 8, 8)).following('conv') for _ in range(5)]
    assert found == [[]] * 5


# ---------------------------------------------------------------------------------------------------------------------
# state_dict / load_state_dict round trip
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('criterion,gran,scope', [('movement', 'weight', 'global'), ('taylor', 'filter', 'local'),
                                                  ('large_final', '2:4', 'local'), ('lamp', 'kernel', 'global')])
def test_state_dict_round_trip(criterion, gran, scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Conv1d(8, 4, 1))
    sp = Sparsifier(model, 0.5, gran, criterion, scope)
    fake_backward(sp, 1)
    sp.update(0.6)
    buf = io.BytesIO(); torch.save(sp.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors and builtins: loads without pickle's risks
    model2 = copy.deepcopy(model)
    before = module_fingerprint(model2)
    w_before = {k: v.clone() for k, v in model2.state_dict().items()}
    sp2 = Sparsifier(model2, 0.5, gran, criterion, scope).load_state_dict(sd)
    assert all(torch.equal(w_before[k], v) for k, v in model2.state_dict().items())  # loading changes no weight
    assert module_fingerprint(model2) == before
    assert sp2.counts == sp.counts
    assert sp2.masks.keys() == sp.masks.keys() and all(torch.equal(sp2.masks[k], m) for k, m in sp.masks.items())
    assert all(m.dtype == torch.bool for m in sp2.masks.values())
    assert sp2.state.keys() == sp.state.keys()
    for k, st_ in sp.state.items():
        assert all(torch.equal(t, sp2.state[k][n]) for n, t in st_.items())
    assert sp2.update(0.6) is False
    # both continue identically
    fake_backward(sp, 2); fake_backward(sp2, 2)
    sp.update(1.); sp2.update(1.)
    assert all(torch.equal(sp2.masks[k], m) for k, m in sp.masks.items())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    # a state saved for other settings is refused
    with pytest.raises(ValueError, match='granularity'):
        Sparsifier(copy.deepcopy(model), 0.5, 'channel', criterion, scope, include=sd['layers']).load_state_dict(sd)
    with pytest.raises(ValueError, match='layers'):
        Sparsifier(copy.deepcopy(model), 0.5, gran, criterion, scope, exclude='0').load_state_dict(sd)
