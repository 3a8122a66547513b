"""The engine on the models fastai users train (issue 12): the default selection fits the granularity, the model's
outputs and inputs are protected, every norm after a pruned unit is silenced, the numbers come from the masks and say
what is covered, gradient criteria never rank by position, lazy and empty layers get a clear answer."""
import copy, warnings
import numpy as np

import pytest
import torch
from torch import nn

from fasterprune.criteria import Criterion, large_final, taylor, movement
from fasterprune.sparsifier import Sparsifier


def _build(*args, **kwargs):
    "A Sparsifier, and the messages of the warnings its construction raised"
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        sp = Sparsifier(*args, **kwargs)
    return sp, [str(w.message) for w in ws]


def small_cnn(c_in=3, n_out=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_out))


class Tabular(nn.Module):
    "fastai's tabular model in small: embeddings and 7 continuous features, concatenated into Linear layers"
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.l1, self.l2, self.head = nn.Linear(4 + 7, 16), nn.Linear(16, 8), nn.Linear(8, 2)
        self.cont = nn.Linear(7, 4)  # a 7-feature layer: '2:4' cannot take it
    def forward(self, xc, xn):
        h = torch.relu(self.l1(torch.cat([self.emb(xc), xn], 1)))
        return self.head(torch.relu(self.l2(h))) + self.cont(xn).sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The default selection fits the granularity
# ---------------------------------------------------------------------------------------------------------------------
def test_kernel_leaves_a_linear_head_dense_with_one_warning():
    model = small_cnn()
    sp, ws = _build(model, 0.5, 'kernel')
    assert sp.skipped == {'8': "Linear has no 'kernel' groups (it has channel, filter, weight)"}
    assert [l.name for l in sp.layers] == ['0', '3'] and len(ws) == 1 and '`8`' in ws[0] and "'kernel'" in ws[0]
    sp.prune()
    assert bool(model[8].weight.ne(0).all())
    df = sp.report().set_index('name')
    assert df.loc['8', 'note'] == sp.skipped['8'] and df.loc['8', 'weight_sparsity'] == 0


def test_nm_leaves_layers_whose_inputs_do_not_fit_dense():
    sp, ws = _build(Tabular(), 0.5, '2:4')
    assert sp.skipped == {'l1': 'its input size per group, 11, is not a multiple of 4',
                          'cont': 'its input size per group, 7, is not a multiple of 4'}
    assert len(ws) == 1 and '`l1`: its input size' in ws[0] and '`cont`: its input size' in ws[0]
    sp, ws = _build(small_cnn(), 0.5, '2:4')  # the 3-channel stem
    assert list(sp.skipped) == ['0'] and len(ws) == 1
    # a layer named in `include` must take the granularity, as before
    with pytest.raises(ValueError, match="`granularity`='kernel' does not apply to layer `8`"):
        Sparsifier(small_cnn(), 0.5, 'kernel', include=['0', '8'])
    with pytest.raises(ValueError, match='its input size per group, 7, is not a multiple of 4'):
        Sparsifier(Tabular(), 0.5, '2:4', include='cont')


def test_nothing_left_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no layer of Sequential can be pruned with `granularity`='kernel' \(`0`: Linear"):
        Sparsifier(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 0.5, 'kernel')
    with pytest.raises(ValueError, match="output units are the model's outputs"):  # one Linear: its filters are the outputs
        Sparsifier(nn.Sequential(nn.Linear(4, 3)), 0.5, 'filter')


def test_layer_sparsity_and_links_say_a_layer_was_left_dense():
    with pytest.raises(ValueError, match=r"matches only layers left dense: `8` \(Linear has no 'kernel'"):
        _build(small_cnn(), 0.5, 'kernel', layer_sparsity={'8': 0.2})
    with pytest.raises(ValueError, match="'8' is not a pruned layer \\(it is left dense"):
        _build(small_cnn(), 0.5, 'kernel', links=[['3', '8']])


class WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.empty, self.b = nn.Linear(4, 8), nn.Linear(4, 0), nn.Linear(8, 4)
    def forward(self, x): return self.b(torch.relu(self.a(x))) + self.empty(x).sum()


@pytest.mark.parametrize('gran', ['weight', 'filter', 'channel', '2:4'])
def test_empty_layers_are_skipped(gran):
    model = WithEmpty()
    sp, ws = _build(model, 0.5, gran)
    assert sp.skipped['empty'] == 'empty weight [0, 4]' and len(ws) == 1
    sp.prune()
    assert 'empty' not in sp.masks and sp.sparsity_achieved() == pytest.approx(0.5)
    sp, _ = _build(model, 0.5, 'weight', include=['a', 'empty'])  # named or not: nothing to prune in it
    assert list(sp.skipped) == ['empty']


def test_lazy_layers_ask_for_a_batch_first():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"lazy layers whose weights do not exist yet \(`0`\): run one batch"):
        Sparsifier(model, 0.5)
    model(torch.randn(2, 5))
    assert Sparsifier(model, 0.5).prune().sparsity_achieved() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Protected outputs and inputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('scope', ['local', 'global'])
def test_filter_never_prunes_the_classes(scope):
    model = small_cnn()
    sp, ws = _build(model, 0.5, 'filter', scope=scope)
    assert list(sp.skipped) == ['8'] and "its output units are the model's outputs" in sp.skipped['8'] and len(ws) == 1
    sp.prune()
    assert '8' not in sp.masks and bool(model[8].weight.ne(0).any(1).all())  # every class keeps its row
    assert sp.sparsity_achieved() == pytest.approx(0.5, abs=0.05)
    sp, ws = _build(small_cnn(), 0.5, 'filter', include='*')  # asked for: pruned
    assert not sp.skipped and not ws and '8' in {l.name for l in sp.layers}


class Untraceable(nn.Module):
    "fx cannot trace it (data-dependent control flow); the hooks find its last layer on a batch"
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(8, 5)
    def forward(self, x):
        h = self.body(x)
        if h.sum() > -1e9: h = h * 1
        return self.head(h)


def test_output_protected_without_fx():
    sp, _ = _build(Untraceable(), 0.5, 'filter', sample_input=torch.randn(2, 3, 8, 8))
    assert sp.graph.mode == 'hooks' and list(sp.skipped) == ['head']
    sp, _ = _build(Untraceable(), 0.5, 'channel', sample_input=torch.randn(2, 3, 8, 8))
    assert list(sp.skipped) == ['body.0'] and "reads the model's inputs" in sp.skipped['body.0']


def test_channel_never_prunes_the_model_inputs():
    model = small_cnn()
    sp, _ = _build(model, 0.6, 'channel')
    assert list(sp.skipped) == ['0'] and "it reads the model's inputs" in sp.skipped['0']
    sp.prune()
    assert bool(model[0].weight.ne(0).any((0, 2, 3)).all())  # R, G and B are all still read
    sp, _ = _build(small_cnn(), 0.6, 'channel', include='*')
    assert '0' in {l.name for l in sp.layers}


class TiedLM(nn.Module):
    "A language model whose decoder shares its weight with the embedding"
    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.emb, self.hidden, self.dec = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab)
        self.dec.weight = self.emb.weight
    def forward(self, x): return self.dec(torch.relu(self.hidden(self.emb(x))))


def test_tied_decoder_keeps_the_vocabulary():
    model = TiedLM()
    sp, _ = _build(model, 0.5, 'filter', sample_input=torch.randint(0, 40, (2, 5)))
    assert list(sp.skipped) == ['dec']
    sp.prune()
    assert bool(model.emb.weight.ne(0).any(1).all())  # no token lost its embedding or its logit
    assert sp.coverage()['largest_unpruned'][0][:2] == ('emb.weight', 640)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Every norm after a pruned unit
# ---------------------------------------------------------------------------------------------------------------------
class BNAct(nn.BatchNorm2d):
    "Like timm's BatchNormAct2d: a BatchNorm2d subclass with its activation inside"
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()
    def forward(self, x): return self.act(super().forward(x))


def _norm_models():
    out = {'syncbn': nn.Sequential(nn.Conv2d(4, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
           'bnact': nn.Sequential(nn.Conv2d(4, 8, 3), BNAct(8), nn.Conv2d(8, 4, 1)),
           'groupnorm': nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.GELU(), nn.Conv2d(8, 4, 1)),
           'layernorm': nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4))}
    try:
        from timm.layers import BatchNormAct2d
        out['timm'] = nn.Sequential(nn.Conv2d(4, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU), nn.Conv2d(8, 4, 1))
    except ImportError: pass
    return out


@pytest.mark.parametrize('kind', list(_norm_models()))
@pytest.mark.parametrize('train', [False, True])
def test_pruned_unit_outputs_exactly_zero_after_its_norm(kind, train):
    torch.manual_seed(0)
    model = _norm_models()[kind]
    norm = model[2] if kind == 'layernorm' else model[1]
    with torch.no_grad():
        for p in norm.parameters(): p.normal_()  # as after training: shifts are not zero
        if hasattr(norm, 'running_mean'): norm.running_mean.normal_(); norm.running_var.uniform_(0.5, 2)
    layer = '1' if kind == 'layernorm' else '0'
    sp = Sparsifier(model, 0.5, 'filter').prune()
    assert {l.name: l.norms for l in sp.layers}[layer] == [norm]
    keep = sp.masks[layer].reshape(-1)
    assert int((~keep).sum()) == 4
    x = torch.randn(3, 4, 7, 7) if kind != 'layernorm' else torch.randn(3, 4, 5, 5)
    upto = 4 if kind == 'layernorm' else (2 if kind in ('bnact', 'timm') else 3)  # after the norm and the activation
    model.train(train)
    with torch.no_grad(): y = model[:upto](x)
    assert bool((y[:, ~keep] == 0).all()), 'a pruned unit still outputs something after its norm and activation'
    assert bool((y[:, keep] != 0).any())


# ---------------------------------------------------------------------------------------------------------------------
# 4. Honest numbers
# ---------------------------------------------------------------------------------------------------------------------
def test_sparsity_is_read_from_the_masks():
    model = small_cnn()
    sp = Sparsifier(model, 0.5, 'filter', scope='global', include=['0', '3']).prune()
    with torch.no_grad(): model[3].weight[sp.masks['3'].reshape(-1)] = 0  # kept filters that happen to be 0 now
    pruned = {n: int((~sp.masks[n]).sum()) for n in ('0', '3')}
    assert sp.sparsity_achieved() == sp.sparsity_achieved('groups') == pytest.approx(sum(pruned.values()) / 24)
    want = (pruned['0'] * 27 + pruned['3'] * 72) / (8 * 27 + 16 * 72)
    assert sp.sparsity_achieved('weights') == pytest.approx(want)
    df = sp.report().set_index('name')
    assert df.loc['3', 'zeros'] == 16 * 72 and df.loc['3', 'weight_sparsity'] == pytest.approx(pruned['3'] / 16)
    assert df.loc['total', 'sparsity'] == pytest.approx(0.5) and df.loc['total', 'pruned'] == 12
    with pytest.raises(ValueError, match="`of`='params' is unknown"): sp.sparsity_achieved('params')


def test_report_columns_rows_and_nm_units():
    model = Tabular()
    sp, _ = _build(model, 0.5, '2:4')
    sp.prune()
    df = sp.report()
    assert list(df.columns) == ['name', 'type', 'shape', 'params', 'groups', 'pruned', 'sparsity', 'weight_sparsity',
                                'zeros', 'granularity', 'note']
    assert df.name.tolist() == ['l1', 'l2', 'head', 'cont', 'total', 'model']
    r = df.set_index('name')
    assert (r.loc['l2', 'groups'], r.loc['l2', 'pruned']) == (128, 64)  # N:M counts weights as its groups
    assert r.loc['total', 'params'] == 128 + 16 and r.loc['model', 'params'] == sum(p.numel() for p in model.parameters())
    assert 'coverage' in r.loc['model', 'note'] and 'left dense' in r.loc['total', 'note']


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 3)
    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        h, _ = self.att(h, h, h)
        return self.fc2(torch.relu(self.fc1(h[:, -1])))


def test_coverage_names_what_is_not_pruned():
    model = Mixed()
    sp, _ = _build(model, 0.5, 'filter', exclude='fc1')
    sp.prune()
    pruned = model.att.out_proj.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    cov = sp.coverage(n=20)
    assert (cov['pruned'], cov['total']) == (pruned, total) and cov['share'] == pytest.approx(pruned / total)
    why = {name: w for name, _, w in cov['largest_unpruned']}
    assert why['rnn.weight_hh_l0'] == "weight_hh_l0 of LSTM: pruned by 'weight' and N:M only" and why['emb.weight'] == 'embedding'
    assert why['att.in_proj_weight'] == "in_proj_weight of MultiheadAttention: pruned by 'weight' and N:M only"
    assert why['fc1.weight'] == 'excluded' and why['fc2.weight'].startswith("skipped: its output units are the model's outputs")
    assert why['att.in_proj_bias'] == 'in_proj_bias of MultiheadAttention' and why['rnn.bias_ih_l0'] == why['fc1.bias'] == 'bias'
    sizes = [s for _, s, _ in cov['largest_unpruned']]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 128 * 32
    r = sp.report().set_index('name')
    assert r.loc['total', 'sparsity'] == 0.5 and r.loc['model', 'params'] == total
    assert r.loc['model', 'weight_sparsity'] == pytest.approx(0.5 * pruned / total)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Attention and recurrent weights
# ---------------------------------------------------------------------------------------------------------------------
def test_attention_and_recurrent_weights_take_weight_pruning():
    model = Mixed()
    sp = Sparsifier(model, 0.9, exclude='fc2').prune()
    assert [l.name for l in sp.layers] == ['rnn.weight_ih_l0', 'rnn.weight_hh_l0', 'att.in_proj_weight', 'att.out_proj', 'fc1']
    for w in (model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.att.in_proj_weight):
        assert int((w == 0).sum()) == round(0.9 * w.numel())
    model(torch.randint(0, 50, (2, 6))).sum().backward()  # the model still runs, on the pruned weights
    assert sp.coverage()['share'] == pytest.approx(sum(l.weight.numel() for l in sp.layers) / sum(p.numel() for p in model.parameters()))
    assert [l.name for l in Sparsifier(Mixed(), 0.9, exclude=[nn.LSTM, nn.MultiheadAttention]).layers] == ['att.out_proj', 'fc1', 'fc2']


def test_attention_takes_nm_with_separate_projections():
    att = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    sp = Sparsifier(att, 0.5, '2:4').prune()
    assert [l.name for l in sp.layers] == ['q_proj_weight', 'k_proj_weight', 'v_proj_weight', 'out_proj']
    for w in (att.q_proj_weight, att.k_proj_weight, att.v_proj_weight):
        assert bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_weight_dropout_prunes_the_raw_weight():
    "fastai's AWD-LSTM recomputes `weight_hh_l0` from `weight_hh_l0_raw` at every forward: the raw one is masked"
    from fastai.text.models.awdlstm import AWD_LSTM
    torch.manual_seed(0)
    enc = AWD_LSTM(30, 8, 12, 2, pad_token=1)
    sp = Sparsifier(enc, 0.75).prune()
    names = [l.name for l in sp.layers]
    assert names == ['rnns.0.weight_hh_l0_raw', 'rnns.0.module.weight_ih_l0', 'rnns.1.weight_hh_l0_raw', 'rnns.1.module.weight_ih_l0']
    enc.train(); enc(torch.randint(0, 30, (2, 5)))
    for i in (0, 1):
        wd = enc.rnns[i]
        assert bool((wd.module.weight_hh_l0[wd.weight_hh_l0_raw == 0] == 0).all())  # the dropped-out copy keeps the zeros
    assert sp.coverage()['largest_unpruned'][0][:2] == ('encoder.weight', 30 * 8)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Gradient criteria never rank by position
# ---------------------------------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))


@pytest.mark.parametrize('crit', ['taylor', 'movement'])
@pytest.mark.parametrize('gran,scope', [('weight', 'local'), ('filter', 'global'), ('2:4', 'local')])
def test_no_gradient_yet_means_magnitude(crit, gran, scope):
    "An update before any backward pass selects what magnitude selects, not the first weights in memory"
    model = _mlp()
    ref = Sparsifier(_mlp(), 0.5, gran, large_final, scope).prune()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        sp = Sparsifier(model, 0.5, gran, crit, scope)
        sp.update(0.5); sp.update(1.)
    msgs = [str(w.message) for w in ws if 'no gradient yet' in str(w.message)]
    assert len(msgs) == 1 and 'magnitude' in msgs[0]
    assert sp.masks.keys() == ref.masks.keys() and all(torch.equal(sp.masks[k], ref.masks[k]) for k in ref.masks)
    assert sp.by_magnitude == {l.name for l in sp.layers}


def test_frozen_layer_falls_back_alone_in_local_scope():
    model = _mlp()
    model[0].requires_grad_(False)  # as in fine_tune's frozen epoch
    sp = Sparsifier(model, 0.5, 'weight', taylor, 'local')
    x = torch.randn(16, 10)
    for _ in range(3):
        model.zero_grad(); model(x).square().sum().backward(); sp.accumulate()
    assert [sp.state[n]['grads'].item() for n in ('0', '2', '4')] == [0, 3, 3]
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        sp.prune()
    assert sum('no gradient yet' in str(w.message) for w in ws) == 1 and sp.by_magnitude == {'0'}
    mag = Sparsifier(_mlp(), 0.5, 'weight').prune()
    assert torch.equal(sp.masks['0'], mag.masks['0'])
    assert torch.equal(sp.masks['2'], sp.state['2']['score'] > sp.state['2']['score'].flatten().kthvalue(200).values)
    sd = sp.state_dict()
    sp2 = Sparsifier(_mlp(), 0.5, 'weight', taylor, 'local').load_state_dict(sd)
    assert [sp2.state[n]['grads'].item() for n in ('0', '2', '4')] == [0, 3, 3]
    assert 'scored by magnitude' in sp.report().set_index('name').loc['0', 'note']


def test_state_saved_before_gradients_were_counted_still_ranks_by_gradient():
    "A checkpoint from before the count: its criterion state has scores but no 'grads'; loaded, the layers are ready"
    model = _mlp()
    sp = Sparsifier(model, 0.5, 'weight', movement)
    model(torch.randn(4, 10)).sum().backward(); sp.accumulate()
    sd = sp.state_dict()
    for s in sd['state'].values(): del s['grads']
    sp2 = Sparsifier(_mlp(), 0.5, 'weight', movement).load_state_dict(sd)
    assert all(sp2.criterion.ready(l, sp2.state[l.name]) for l in sp2.layers)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no fallback warning: the scores are the gradients'
        sp2.prune()
    assert not sp2.by_magnitude


# ---------------------------------------------------------------- scores: shape checked, ties keep the current mask

def test_criterion_with_wrong_score_shape_is_refused():
    "A criterion returning transposed scores is an error naming the layer, before any weight changes"
    class Transposed(Criterion):
        def score(self, layer, state=None): return layer.weight.detach().abs().t()
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = Sparsifier(model, 0.5, criterion=Transposed(), include='*')
    with pytest.raises(ValueError, match=r"returned shape \(6, 4\) for layer `0`.*\(4, 6\)"): sp.prune()
    for k, v in model.state_dict().items(): assert torch.equal(v, before[k]), k

def test_equal_scores_keep_the_groups_pruned_already():
    "Under a gradient criterion, weights pruned by magnitude at step 0 score 0 later: a rising count must not revive them"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = Sparsifier(model, 0.8, criterion='taylor', include='*')
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); sp.update(0.25) # no gradient yet: by magnitude
    x = torch.randn(8, 16)
    x[:, :8] = 0 # half the inputs are always 0: their weights get exactly 0 gradient, so taylor scores them 0 too
    for share in (0.5, 0.75, 1.):
        prev = {k: m.clone() for k, m in sp.masks.items()}
        model.zero_grad(); model(x).sum().backward(); sp.mask_grads(); sp.accumulate()
        sp.update(share)
        for k, m in sp.masks.items(): assert not (~prev[k] & m).any(), f"a pruned weight of `{k}` came back at share {share}"


# ---------------------------------------------------------------- global scope: one selection (issue 14)

@pytest.mark.parametrize('seed', range(6))
def test_global_selection_protects_exactly_as_protecting_every_layer(seed):
    """Global scope keeps each layer's best group. The engine protects only the layers a sample says could lose all
    (one selection instead of two); the masks equal those of protecting every layer's best group up front"""
    from fasterprune.sparsifier import _protect_best, _at_risk, select_smallest
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 32), (3, 4), (48, 48), (2, 2), (10, 64)]
    model = nn.Sequential(*[nn.Linear(i, o) for o, i in sizes])
    with torch.no_grad():
        for j, m in enumerate(model): m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.01 if j in (1, 3) else 1))
    for s in (0.5, 0.9, 0.99):
        sp = Sparsifier(model, s, 'weight', 'large_final', 'global', include='*')
        units = sp._pools()['*']
        heads, k = [u[0] for u in units], sp.group_counts(1.)['*']
        ref = select_smallest(_protect_best(heads, sp._group_scores(units, 'global')), k)
        if s == 0.99: assert _at_risk(heads, sp._group_scores(units, 'global'), k) # the small layers are at risk here
        sp.update(1.)
        for l, r in zip(heads, ref): assert torch.equal(sp.masks[l.name].reshape(-1), ~r), (s, l.name)
        assert all(bool(sp.masks[l.name].any()) for l in heads) # no layer emptied


# ---------------------------------------------------------------- ranking every few steps, pruning at every step (issue 14)

@pytest.mark.parametrize('granularity,scope', [('weight', 'local'), ('weight', 'global'), ('filter', 'global'), ('2:4', 'global')])
def test_queue_gives_every_steps_masks_and_ranks_again_when_it_must(granularity, scope):
    """`update(share, ahead=...)` queues the next groups; updates within the queue score nothing and give the masks of a
    ranking at every step (weights still); a schedule that turns down, or goes past the queue, ranks again"""
    from fasterprune.schedules import dsd
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 12))
    twin = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 12))
    twin.load_state_dict(model.state_dict())
    sp, ref = (Sparsifier(m, 0.5, granularity, 'large_final', scope, include='*') for m in (model, twin))
    shares = [dsd(i / 49) for i in range(50)] # up to the target by the middle, then back down
    ranked = []
    for i, s in enumerate(shares):
        sp.update(s, force=i % 10 == 0, ahead=shares[min(49, i + 10)])
        ranked.append(bool(sp.ranked))
        if i == 15: sd = sp.state_dict() # a queue in progress, for a checkpoint
        ref.update(s, force=True) # the full selection at every step
        for k in ref.masks: assert torch.equal(sp.masks[k], ref.masks[k]), (i, k)
    assert not any(ranked[i] for i in range(1, 20) if i % 10) # within a queue on the way up: nothing scored
    assert any(ranked[i] for i in range(26, 50) if i % 10) # on the way down the queue does not apply: ranked again
    assert sd['plans'] and all(isinstance(p['unit'], torch.Tensor) and p['base'] <= p['at'] for p in sd['plans'].values())


@pytest.mark.parametrize('granularity,scope,crit', [('weight', 'local', 'large_final'), ('weight', 'global', 'large_final'),
                                                    ('filter', 'global', 'large_final'), ('weight', 'global', 'lookahead'),
                                                    ('weight', 'global', 'lamp'), ('kernel', 'local', 'large_final')])
def test_ranking_the_groups_left_gives_the_full_selections_masks(granularity, scope, crit, monkeypatch):
    """Where pruned weights score 0 (`zero_when_pruned`), a ranking looks only at the groups left (`_rank_left`): the masks
    are those of the full selection at every step, as the weights move, ties included"""
    used = []
    rank_left = Sparsifier._rank_left
    monkeypatch.setattr(Sparsifier, '_rank_left', lambda self, *a, **k: used.append(rank_left(self, *a, **k)) or used[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 12))
    with torch.no_grad(): model[3].weight[:2] = 0.5 # runs of equal scores
    twin = copy.deepcopy(model)
    sp, ref = (Sparsifier(m, 0.8, granularity, crit, scope, include=nn.Conv2d if granularity == 'kernel' else '*',
                                 sample_input=torch.randn(2, 4, 8, 8)) for m in (model, twin))
    g = torch.Generator().manual_seed(1)
    for i in range(30):
        s, nxt = i / 29, min(1., (i + 3) / 29)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                d = torch.randn(p.shape, generator=g) * 0.05; p.add_(d); q.add_(d)
        sp.apply(); ref.apply()
        sp.update(s, fresh=True, ahead=nxt) # ranked at every step, with a queue to 3 steps ahead
        ref.update(s, force=True)
        for k in ref.masks: assert torch.equal(sp.masks[k], ref.masks[k]), (i, k)
    assert sum(used) >= 5 # the rankings did look only at the groups left


@pytest.mark.parametrize('seed', range(5))
def test_stable_order_is_numpys_stable_argsort(seed):
    "The queue's order: the same permutation as `np.argsort(kind='stable')`, with negatives, -0.0 against +0.0, infinities and runs of ties"
    from fasterprune.sparsifier import stable_order
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(20_000).astype(np.float32)
    x[rng.integers(0, len(x), 3000)] = 0.
    x[rng.integers(0, len(x), 3000)] = -0.
    x[rng.integers(0, len(x), 500)] = x[7]
    x[rng.integers(0, len(x), 20)] = np.inf
    x[rng.integers(0, len(x), 20)] = -np.inf
    np.testing.assert_array_equal(stable_order(x), np.argsort(x, kind='stable'))
    assert stable_order(x[:0]).shape == (0,) and stable_order(x[:1]).tolist() == [0]


@pytest.mark.parametrize('seed', range(4))
def test_queue_takes_only_the_ties_it_needs(seed, monkeypatch):
    """A block of equal scores at the queue's bound (weights already exactly zero that no mask holds: a model pruned
    before, loaded into a new sparsifier) is cut to the groups the queue needs, and its first groups are still exactly
    those of a stable sort of every group left"""
    from types import SimpleNamespace
    from fasterprune import sparsifier as S
    rng = np.random.default_rng(seed)
    arrays = [np.abs(rng.standard_normal(n)).astype(np.float32) for n in (30_000, 5_000, 50_000)]
    for a in arrays: a[rng.random(len(a)) < 0.7] = 0. # 70 % exact zeros
    arrays[1][:100] = arrays[0][7] # and a run of some other equal score
    lefts = [rng.random(len(a)) < 0.9 for a in arrays]
    heads = [SimpleNamespace(grouping=SimpleNamespace(nm=None))] * 3
    pruned = sum(len(l) - int(l.sum()) for l in lefts)
    flat, left = np.concatenate(arrays), np.concatenate(lefts)
    ref = np.flatnonzero(left)[np.argsort(flat[left], kind='stable')] # every group left, in the selection's order
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    for ties in (S._TIES, 0): # the sample sees the ties; and the count after the fact finds them
        monkeypatch.setattr(S, '_TIES', ties)
        for need in (1, 500, 20_000, 60_000):
            p = S._plan(heads, [torch.from_numpy(a) for a in arrays], [torch.from_numpy(l) for l in lefts], pruned + need, 'local')
            got = offsets[p['unit'].numpy()] + p['group'].numpy()
            assert len(got) >= need and len(got) <= 2 * need + S._TIES + 200, (need, len(got)) # not the 70 % of zeros
            np.testing.assert_array_equal(got[:need], ref[:need])


@pytest.mark.parametrize('scope', ['local', 'global'])
def test_ranking_a_model_pruned_before_gives_the_full_selections_masks(scope):
    "A model whose weights are mostly exact zeros before its sparsifier exists: the queue's masks are the full selection's at every step, and no queue holds the zeros it will not take"
    from fasterprune.sparsifier import _TIES
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        for m in model[::2]: m.weight.mul_(torch.rand_like(m.weight) > 0.8) # 80 % zero, held by no mask
    twin = copy.deepcopy(model)
    sp, ref = (Sparsifier(m, 0.9, 'weight', 'large_final', scope, include='*') for m in (model, twin))
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        s, nxt = (i / 19) ** 2, min(1., ((i + 3) / 19) ** 2)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                d = torch.randn(p.shape, generator=g) * 0.01 * (p != 0); p.add_(d); q.add_(d) # the zeros stay zero
        sp.apply(); ref.apply()
        sp.update(s, fresh=True, ahead=nxt)
        ref.update(s, force=True)
        for k in ref.masks: assert torch.equal(sp.masks[k], ref.masks[k]), (i, k)
        want = sp.group_counts(nxt)
        for key, p in sp.plans.items(): assert len(p['unit']) <= 2 * (want[key] - p['base']) + _TIES, (i, key, len(p['unit']))
