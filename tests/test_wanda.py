"""The `wanda` criterion (Sun et al. 2023) and Hugging Face's `Conv1D` (GPT-2's projections), out of the box.

- wanda's scores are |W_ij|·‖X_j‖ on a test vector, exactly; for a conv, the channel's norm over batch and positions,
  checked against the rows of `F.unfold`; grouped and transposed convs read the right channels;
- its input hooks are on the model only while they are needed (`calibrate`, `observe`), even when the model raises,
  and the model pickles afterwards;
- it works with 'weight', '2:4' and global scope, falls back to magnitude with a warning before any input, and its
  state survives `state_dict`;
- `Conv1D` (weight (in, out)) is pruned with the right dims by 'weight', 'filter' and '2:4', by a `Sparsifier` and by a
  fastai `Learner` fit with `SparsifyCallback`."""
import pickle, warnings
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.basics import Learner, CrossEntropyLossFlat, Callback, set_seed
from fastai.callback.progress import no_bar # noqa: F401

from fasterprune.criteria import Layer, Wanda, wanda, get_criterion, InputHooks
from fasterprune.granularities import Grouping, granularity_table, in_units, out_units
from fasterprune.sparsifier import Sparsifier
from fasterprune.callback import SparsifyCallback
from test_zoo import HFClassifier, _dls, digit_words

torch.set_num_threads(1)
warnings.filterwarnings('ignore', message=r'`torch.jit.script` is deprecated', category=FutureWarning)

# ---------------------------------------------------------------- wanda's scores

def _observed(m, *xs, name='m', crit=wanda):
    "A `Layer` for `m` and its wanda state after the inputs `xs`"
    l = Layer(name, m)
    st = crit.init_state(l)
    with InputHooks(crit, [l], {name: st}):
        for x in xs: m(x)
    return l, st

def test_test_vector_linear_exact():
    "W = [[1, -2, 3], [-4, 5, 0.5]], X = rows [1, 2, 2], [0, 0, 4]: the scores |W_ij|·‖X_j‖, computed by hand"
    fc = nn.Linear(3, 2, bias=False)
    with torch.no_grad(): fc.weight.copy_(torch.tensor([[1., -2., 3.], [-4., 5., .5]]))
    X = torch.tensor([[1., 2., 2.], [0., 0., 4.]]) # ‖X_0‖ = 1, ‖X_1‖ = 2, ‖X_2‖ = sqrt(4 + 16) = sqrt(20)
    l, st = _observed(fc, X, name='fc')
    assert torch.equal(st['sq'], torch.tensor([1., 4., 20.]))
    r = torch.tensor(20.).sqrt() # in float32, as the criterion computes it
    want = torch.tensor([[1 * 1., 2 * 2., 3 * r], [4 * 1., 5 * 2., .5 * r]])
    assert torch.equal(wanda.score(l, st), want)
    assert get_criterion('wanda') is wanda
    # the same rows as one batch of sequences (batch × tokens × features): the same norms
    l2, st2 = _observed(fc, X[None], name='fc')
    assert torch.equal(st2['sq'], st['sq'])

def test_sparsifier_prunes_the_lowest_wanda_scores():
    fc = nn.Linear(3, 2, bias=False)
    with torch.no_grad(): fc.weight.copy_(torch.tensor([[1., -2., 3.], [-4., 5., .5]]))
    X = torch.tensor([[1., 2., 2.], [0., 0., 4.]])
    sp = Sparsifier(fc, 0.5, criterion='wanda').calibrate([X]).prune()
    # scores 1, 4, 6.71 / 4, 10, 2.24: the three smallest are W[0,0], W[1,2] and W[0,1]
    assert sp.masks[''].tolist() == [[False, False, True], [True, True, False]]
    # magnitude would have pruned W[1,2], W[0,0] and W[0,1] too, but not in this order; with input 1 doubled, W[0,1] survives
    sp = Sparsifier(fc, 0.5, criterion='wanda').calibrate([X * torch.tensor([1., 3., 1.])]).prune()
    assert not bool(sp.masks[''][0, 1])

def test_mean_of_calls_then_exponential():
    fc = nn.Linear(2, 1)
    a, b, c = torch.tensor([[1., 2.]]), torch.tensor([[3., 0.]]), torch.tensor([[0., 4.]])
    _, st = _observed(fc, a, b, crit=Wanda(window=2))
    assert torch.equal(st['sq'], torch.tensor([5., 2.])) # the mean of (1, 4) and (9, 0)
    _, st = _observed(fc, a, b, c, crit=Wanda(window=2))
    assert torch.equal(st['sq'], torch.tensor([2.5, 9.])) # then weight 1/2 on the newest: (5, 2) / 2 + (0, 16) / 2
    assert st['calls'].item() == 3
    assert repr(Wanda(window=2)) == 'wanda(window=2)' and repr(wanda) == 'wanda'

@pytest.mark.parametrize('bad', [0, -1, 1.5, True, None])
def test_bad_window_is_refused(bad):
    with pytest.raises(ValueError, match=r"`window`="): Wanda(window=bad)

def test_conv_norms_against_unfold():
    "A channel's norm over batch and positions; with patches that tile the input, it is the norm over unfold's rows of every kernel position of that channel"
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 2, stride=2) # 2×2 patches tiling an 8×8 input
    x = torch.randn(4, 3, 8, 8)
    l, st = _observed(conv, x)
    cols = F.unfold(x, 2, stride=2) # (N, 3·2·2, L): one row per (image, position), one column per (channel, kernel position)
    per_col = cols.square().sum((0, 2)).view(3, 4) # each column's squared norm, by channel
    torch.testing.assert_close(st['sq'], per_col.sum(1))
    torch.testing.assert_close(wanda.score(l, st), conv.weight.detach().abs() * st['sq'].sqrt()[None, :, None, None])
    # a 1×1 conv is a Linear over positions: unfold's columns are the channels themselves
    c1 = nn.Conv2d(3, 4, 1)
    l, st = _observed(c1, x)
    torch.testing.assert_close(st['sq'], F.unfold(x, 1).square().sum((0, 2)))
    # with overlapping patches, every unfold column's norm is at most the channel's
    c3 = nn.Conv2d(3, 4, 3, padding=1)
    l, st = _observed(c3, x)
    per_col = F.unfold(x, 3, padding=1).square().sum((0, 2)).view(3, 9)
    assert bool((per_col <= st['sq'][:, None] * (1 + 1e-6)).all())
    # an unbatched input (C, H, W): the same channel norms as a batch of one
    _, st1 = _observed(c3, x[0])
    _, st2 = _observed(c3, x[:1])
    torch.testing.assert_close(st1['sq'], st2['sq'])

def test_grouped_and_transposed_convs_read_their_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    n = x.square().sum((0, 2, 3)).sqrt()
    g = nn.Conv2d(8, 4, 3, groups=2) # weight (4, 4, 3, 3): outputs 0, 1 read channels 0-3, outputs 2, 3 read 4-7
    l, st = _observed(g, x)
    want = g.weight.detach().abs() * torch.stack([n[:4], n[:4], n[4:], n[4:]])[:, :, None, None]
    torch.testing.assert_close(wanda.score(l, st), want)
    t = nn.ConvTranspose2d(8, 6, 3, groups=2) # weight (8, 3, 3, 3): dim 0 is the input channel
    l, st = _observed(t, x)
    torch.testing.assert_close(wanda.score(l, st), t.weight.detach().abs() * n[:, None, None, None])
    t1 = nn.Conv1d(8, 4, 3)
    l, st = _observed(t1, x.flatten(2))
    torch.testing.assert_close(st['sq'], x.square().sum((0, 2, 3)))

def test_wrong_inputs_are_refused():
    fc = nn.Linear(4, 2)
    l = Layer('fc', fc); st = wanda.init_state(l)
    with pytest.raises(ValueError, match=r"layer `fc` was called with an input of shape \[2, 3\]"):
        wanda.observe(l, st, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"cannot score layer `emb` \(Embedding\)"): wanda.init_state(Layer('emb', nn.Embedding(5, 4)))

# ---------------------------------------------------------------- hooks: on only while needed

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

def _hooks(model): return sum(len(m._forward_pre_hooks) for m in model.modules())

def test_calibrate_leaves_no_hook_even_when_the_model_raises():
    model = _mlp()
    model.train()
    sp = Sparsifier(model, 0.5, criterion='wanda')
    with pytest.raises(ValueError, match=r"layer `0` was called with an input of shape \[4, 7\]"):
        sp.calibrate([torch.randn(4, 8), torch.randn(4, 7)]) # the second batch has the wrong width: the first hook raises
    class Fails(nn.Module):
        def __init__(self): super().__init__(); self.fc = nn.Linear(8, 8)
        def forward(self, x): self.fc(x); raise RuntimeError('boom')
    m = Fails()
    with pytest.raises(RuntimeError, match='boom'): Sparsifier(m, 0.5, criterion='wanda').calibrate([torch.randn(4, 8)])
    assert _hooks(m) == 0
    assert _hooks(model) == 0 and not sp.observing and model.training # hooks off, mode restored
    pickle.dumps(model)
    with pytest.raises(ValueError, match="`batches` is empty"): sp.calibrate([])

def test_observe_is_explicit_and_idempotent():
    model = _mlp()
    sp = Sparsifier(model, 0.5, criterion='wanda')
    h = sp.observe()
    assert sp.observe() is h and _hooks(model) == 3 and sp.observing
    with pytest.raises(Exception): pickle.dumps(model) # what a hook left on would do to `learn.export`
    model(torch.randn(4, 8))
    sp.calibrate([torch.randn(4, 8)]) # hooks already on stay on
    assert _hooks(model) == 3
    assert [sp.state[l.name]['calls'].item() for l in sp.layers] == [2, 2, 2]
    sp.stop_observing(); sp.stop_observing() # a second call does nothing
    assert _hooks(model) == 0 and not sp.observing
    pickle.dumps(model)
    pickle.dumps(sp.state_dict())
    # a criterion that reads no inputs puts no hook on
    sp = Sparsifier(model, 0.5)
    with sp.observe(): assert _hooks(model) == 0

def test_tied_users_are_observed_too():
    fc = nn.Linear(4, 4, bias=False)
    class Twice(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = fc, nn.Linear(4, 4, bias=False); self.b.weight = fc.weight
        def forward(self, x): return self.b(self.a(x))
    m = Twice()
    sp = Sparsifier(m, 0.5, criterion='wanda')
    assert [l.name for l in sp.layers] == ['a'] and sp.layers[0].tied
    x = torch.randn(3, 4)
    sp.calibrate([x])
    want = (x.square().sum(0) + fc(x).detach().square().sum(0)) / 2 # two calls: their mean
    torch.testing.assert_close(sp.state['a']['sq'], want)

def test_no_input_yet_means_magnitude_with_a_warning():
    model = _mlp()
    sp = Sparsifier(model, 0.5, criterion='wanda')
    with pytest.warns(UserWarning, match=r"criterion wanda has seen no input yet for 1 layer \(`0`\): no batch went through .*scored by magnitude"):
        sp.prune()
    assert sp.by_magnitude == {'0', '2', '4'}
    assert (sp.report().note[:3] == 'scored by magnitude until it had inputs').all()
    ref = Sparsifier(_mlp(), 0.5).prune()
    assert all(torch.equal(sp.masks[n], ref.masks[n]) for n in sp.masks)

def test_state_dict_round_trip():
    model = _mlp()
    sp = Sparsifier(model, 0.5, criterion='wanda').calibrate([torch.randn(4, 8)]).prune()
    sp2 = Sparsifier(model, 0.5, criterion='wanda').load_state_dict(sp.state_dict())
    assert all(torch.equal(sp.state[n]['sq'], sp2.state[n]['sq']) for n in sp.state)
    sp2.prune()
    assert all(torch.equal(sp.masks[n], sp2.masks[n]) for n in sp.masks)

# ---------------------------------------------------------------- with N:M and global scope

def test_two_four_keeps_the_two_best_wanda_scores_of_each_block():
    torch.manual_seed(0)
    fc = nn.Linear(8, 3)
    x = torch.randn(16, 8) * torch.tensor([1., 10., .1, 1., 5., 1., .01, 2.])
    sp = Sparsifier(fc, 0.5, '2:4', criterion='wanda').calibrate([x]).prune()
    s = fc.weight.detach().abs() * x.norm(dim=0)
    want = s.view(3, 2, 4).argsort(-1).argsort(-1).ge(2).view(3, 8)
    assert torch.equal(sp.masks[''], want)
    assert torch.equal((fc.weight != 0), want)

def test_global_scope_ranks_wanda_scores_across_layers():
    model = _mlp()
    xs = [torch.randn(4, 8) for _ in range(2)]
    sp = Sparsifier(model, 0.6, criterion='wanda', scope='global').calibrate(xs)
    scores = [wanda.score(l, sp.state[l.name]).flatten() for l in sp.layers]
    sp.prune()
    allsc = torch.cat(scores)
    k = round(0.6 * allsc.numel())
    t = allsc.kthvalue(k).values
    pruned = torch.cat([~sp.masks[l.name].flatten() for l in sp.layers])
    assert int(pruned.sum()) == k
    assert bool((allsc[pruned] <= t).all()) and bool((allsc[~pruned] >= t).all())
    # the input statistics of the calibration batches: the paper's norms over their rows, over sqrt(2) for every layer alike
    torch.testing.assert_close(sp.state['0']['sq'] * 2, torch.cat(xs).square().sum(0))

# ---------------------------------------------------------------- layer types registered by name, lazily

def test_fasterprune_does_not_import_transformers():
    import subprocess, sys
    code = "import sys, fasterprune.all; assert not [m for m in sys.modules if m.startswith('transformers')], 'imported'"
    subprocess.run([sys.executable, '-c', code], check=True, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})

def test_lazy_entry_joins_the_table_once_its_module_is_imported(monkeypatch):
    import sys, types
    from fasterprune.granularities import LayerTable
    t = LayerTable({nn.Linear: granularity_table[nn.Linear]})
    entry = dict(view=lambda m, w: w, in_dim=1, dims=dict(weight=()))
    t.add_lazy('fake_lib.layers', 'Dense', entry)
    t.add_lazy('fake_lib.layers', 'Gone', entry)
    assert list(t) == [nn.Linear] and t.pending # the module is not imported: nothing happens, nothing is imported
    mod = types.ModuleType('fake_lib.layers')
    class Dense(nn.Linear): pass
    mod.Dense = Dense
    monkeypatch.setitem(sys.modules, 'fake_lib.layers', mod)
    with pytest.warns(UserWarning, match=r"`fake_lib.layers.Gone` is None, not a module class"):
        assert Dense in t
    assert t[Dense] is entry and not t.pending

# ---------------------------------------------------------------- Hugging Face Conv1D

transformers = pytest.importorskip('transformers', reason='transformers is not installed (it is in the dev extra)')
from transformers.pytorch_utils import Conv1D

def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()

def _conv1d_names(model): return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]

def test_conv1d_is_in_the_table():
    assert Conv1D in granularity_table and granularity_table[Conv1D]['in_dim'] == 0
    c = Conv1D(nf=6, nx=8)
    assert (in_units(c), out_units(c)) == (8, 6)
    assert Grouping(c, 'filter').n_groups == 6 and Grouping(c, 'filter').per_group == 8
    assert Grouping(c, 'channel').n_groups == 8
    with pytest.raises(ValueError, match=r"its input size per group, 6, is not a multiple of 4"): Grouping(Conv1D(nf=8, nx=6), '2:4')

def test_gpt2_weight_exact_counts():
    model, x = _gpt2(), torch.randint(0, 100, (2, 16))
    y0 = model(x).logits.detach()
    sp = Sparsifier(model, 0.5)
    names = [l.name for l in sp.layers]
    assert set(_conv1d_names(model)) <= set(names) and len(_conv1d_names(model)) == 8
    sp.prune()
    for l in sp.layers:
        assert int((l.weight == 0).sum()) == round(0.5 * l.weight.numel()), l.name
    y1 = model(x).logits.detach()
    assert bool(torch.isfinite(y1).all()) and not torch.allclose(y0, y1)

def test_gpt2_two_four_along_the_input_dim():
    model, x = _gpt2(), torch.randint(0, 100, (2, 16))
    sp = Sparsifier(model, 0.5, '2:4', include=Conv1D).prune()
    assert len(sp.layers) == 8
    for l in sp.layers:
        w = l.weight.detach() # (in, out): blocks of 4 consecutive inputs of one output
        assert ((w.view(-1, 4, w.shape[1]) != 0).sum(1) == 2).all(), l.name
    assert bool(torch.isfinite(model(x).logits).all())

def test_gpt2_filter_prunes_output_columns_and_their_bias():
    model, x = _gpt2(), torch.randint(0, 100, (2, 16))
    for m in model.modules():
        if isinstance(m, Conv1D): nn.init.normal_(m.bias) # GPT-2 starts with zero biases: make them visible
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        sp = Sparsifier(model, 0.5, 'filter', include=Conv1D, sample_input=x).prune()
    for l in sp.layers:
        w, out = l.weight.detach(), l.weight.shape[1]
        dead = w.abs().sum(0) == 0 # whole output columns
        assert int(dead.sum()) == round(0.5 * out), l.name
        assert bool((l.module.bias[dead] == 0).all()) and bool((l.module.bias[~dead] != 0).all())
        assert int((w.abs().sum(1) == 0).sum()) == 0 # no input row is emptied
    assert bool(torch.isfinite(model(x).logits).all())

def test_gpt2_wanda_calibrated():
    model = _gpt2()
    batches = [torch.randint(0, 100, (2, 16)) for _ in range(3)]
    sp = Sparsifier(model, 0.5, criterion='wanda').calibrate(batches).prune()
    assert not sp.by_magnitude and _hooks(model) == 0
    for l in sp.layers: assert int((l.weight == 0).sum()) == round(0.5 * l.weight.numel())
    sp = Sparsifier(_gpt2(), 0.5, '2:4', criterion='wanda', scope='global').calibrate(batches).prune()
    assert not sp.by_magnitude

def _gpt2_learner():
    set_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=258, n_positions=32, num_labels=10, pad_token_id=1)
    model = HFClassifier(transformers.GPT2ForSequenceClassification(cfg))
    return Learner(_dls(*digit_words()), model, loss_func=CrossEntropyLossFlat())

def test_gpt2_learner_fit_with_sparsify_callback():
    learn = _gpt2_learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=SparsifyCallback(0.5, include=Conv1D))
    df = learn.sparsity_report()
    rows = df[df.type == 'Conv1D']
    assert len(rows) == 8 and (rows.sparsity == 0.5).all() and (rows.zeros >= rows.params // 2).all()

def test_gpt2_learner_fit_with_wanda():
    "The callback holds the input hooks for the training batches only: no ranking before the first input, no hook left, the model pickles"
    learn = _gpt2_learner()
    cb = SparsifyCallback(0.5, granularity='2:4', criterion='wanda', include=Conv1D)
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
        warnings.simplefilter('error', UserWarning) # no "has seen no input yet": nothing is ranked before the first batch's inputs
        learn.fit(1, 1e-3, cbs=cb)
    sp = cb.sparsifier
    assert not sp.observing and _hooks(learn.model) == 0
    assert all(sp.state[l.name]['calls'].item() == 4 for l in sp.layers) # the 4 training batches, not the 4 validation ones
    pickle.dumps(learn.model)
    for l in sp.layers:
        w = l.weight.detach()
        assert ((w.view(-1, 4, w.shape[1]) != 0).sum(1) <= 2).all(), l.name


def test_wanda_hooks_removed_when_the_fit_raises():
    "A fit that raises skips fastai's `after_fit`: the `Learner.fit` wrapper takes the hooks off"
    class Boom(Callback):
        def after_batch(self): raise RuntimeError('boom')
    learn = _gpt2_learner()
    with pytest.raises(RuntimeError, match='boom'), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=[SparsifyCallback(0.5, criterion='wanda', include=Conv1D), Boom()])
    assert _hooks(learn.model) == 0
    pickle.dumps(learn.model)
