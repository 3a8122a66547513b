"""A zoo of real fastai learners, each built small (`pretrained=False`, tiny inputs, real data shipped with scikit-learn
and mlxtend), fitted briefly while pruning with 'weight', 'filter' and N:M ('2:4'), and checked as a user would check them:

- exact counts: every pruned layer loses exactly `round(target × groups)` of its groups, and the report says so;
- every class stays predictable: under 'filter' the model's output layer keeps all its output units;
- a pruned filter's channel outputs exactly 0, after its norm and activation too (forward hooks, not parameters);
- warnings come once: no kind of warning is emitted more than once in a fit;
- the report gives the coverage: the share of the model's parameters that sit in pruned layers."""
import math, re, warnings
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.basics import L, DataLoaders, Learner, CrossEntropyLossFlat, accuracy, set_seed
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches `Learner`)
from fastai.callback.progress import no_bar # noqa: F401

from fasterprune.callback import SparsifyCallback
from fasterprune.demo import digit_items

torch.set_num_threads(1)
warnings.filterwarnings('ignore', message=r'`torch.jit.script` is deprecated', category=FutureWarning)

# ---------------------------------------------------------------- data: real, small, no download

def _digits(size=8):
    "scikit-learn's 1,797 digits, shuffled: images 1×size×size in [0, 1] and labels"
    items = digit_items(0)
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    if size != 8: x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
    return x, y

def _dls(x, y, n_train=64, n_valid=64, bs=16):
    "DataLoaders of the first `n_valid` items for validation and the next `n_train` for training"
    valid, train = list(zip(x[:n_valid], y[:n_valid])), list(zip(x[n_valid:n_valid + n_train], y[n_valid:n_valid + n_train]))
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=True, drop_last=True)

def digit_words():
    "The digits read as sentences of 8 words: each image row, thresholded at 0.3, is an 8-bit word (ids 2..257; 0, 1: unk, pad)"
    x, y = _digits()
    bits = (x.view(-1, 8, 8) > 0.3).long()
    return (bits * 2 ** torch.arange(8)).sum(-1) + 2, y

VOCAB = ['xxunk', 'xxpad'] + [f'{i:08b}' for i in range(256)]

# ---------------------------------------------------------------- the zoo

def _vision(arch, size, n_in=1):
    from fastai.vision.learner import vision_learner
    from fastai.vision.core import TensorImage, TensorCategory
    x, y = _digits(size)
    dls = _dls(TensorImage(x.expand(-1, n_in, -1, -1)), TensorCategory(y)) # fastai's types, as its DataBlocks give; n_in=3: RGB
    learn = vision_learner(dls, arch, pretrained=False, n_in=n_in, n_out=10, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    return learn, learn.model[1][-1]

def resnet18_learner(n_in=1):
    from torchvision.models import resnet18
    return _vision(resnet18, 8, n_in)

def small_cnn_learner():
    "fasterprune's demo CNN in a plain `Learner`"
    from fasterprune.demo import small_cnn
    from fastai.vision.core import TensorImage, TensorCategory
    model, (x, y) = small_cnn(), _digits()
    return Learner(_dls(TensorImage(x), TensorCategory(y)), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy), model.fc

def timm_learner(arch):
    pytest.importorskip('timm', reason='timm is not installed (it is in the dev extra)')
    return _vision(arch, 32 if arch.startswith('convnext') else 16)

def unet_learner_():
    "unet on the digits as segmentation: each pixel brighter than 0.5 is its digit (classes 1..10), the rest background (0)"
    from fastai.vision.learner import unet_learner
    from torchvision.models import resnet18
    from fastai.vision.core import TensorImage, TensorMask
    x, y = _digits(16)
    masks = torch.where(x[:, 0] > 0.5, y[:, None, None] + 1, 0)
    dls = _dls(TensorImage(x), TensorMask(masks))
    learn = unet_learner(dls, resnet18, pretrained=False, n_in=1, n_out=11, loss_func=CrossEntropyLossFlat(axis=1),
                         cut=6) # the body up to `layer2`: the same blocks and decoder, 1.8M parameters instead of 26M
    return learn, [m for m in learn.model.modules() if isinstance(m, nn.Conv2d)][-1]

def autompg_df():
    "The Auto MPG cars (mlxtend): predict the origin (USA, Europe, Japan) from cylinders, model year and five measures"
    from mlxtend.data import autompg_data
    X, y = autompg_data()
    df = pd.DataFrame(X[:, :7], columns=['cylinders', 'displacement', 'horsepower', 'weight', 'acceleration', 'year', 'origin'])
    df['mpg'] = y
    df[['cylinders', 'year', 'origin']] = df[['cylinders', 'year', 'origin']].astype(int)
    return df.sample(frac=1, random_state=0).reset_index(drop=True)

def tabular_learner_():
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, CategoryBlock
    df = autompg_df()
    dls = TabularDataLoaders.from_df(df, y_names='origin', y_block=CategoryBlock(), cat_names=['cylinders', 'year'],
                                     cont_names=['displacement', 'horsepower', 'weight', 'mpg'], # 4 + embeddings 4 + 7: 15 inputs
                                     procs=[Categorify, Normalize], valid_idx=list(range(64)), bs=16)
    learn = tabular_learner(dls, layers=[32, 16], metrics=accuracy)
    return learn, learn.model.layers[-1][0]

def awd_lstm_learner():
    from fastai.text.all import text_classifier_learner, AWD_LSTM
    dls = _dls(*digit_words())
    dls.vocab = L([VOCAB, list(range(10))]) # what `text_classifier_learner` reads the vocabulary size from
    cfg = dict(emb_sz=32, n_hid=64, n_layers=2)
    learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=cfg, seq_len=8,
                                    loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    return learn, learn.model[-1].layers[-1][-1]

class TransformerClassifier(nn.Module):
    "Token and position embeddings, an `nn.TransformerEncoder` and a linear head on the mean of the sequence"
    def __init__(self, vocab=258, n_out=10, d=32, heads=2, layers=2, seq_len=8):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, seq_len, d))
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_out)
    def forward(self, x): return self.head(self.encoder(self.emb(x) + self.pos).mean(1))

def transformer_learner():
    dls = _dls(*digit_words())
    model = TransformerClassifier()
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy), model.head

class HFClassifier(nn.Module):
    "A Hugging Face sequence classifier as a fastai model: token ids in, logits out"
    def __init__(self, model): super().__init__(); self.model = model
    def forward(self, x): return self.model(input_ids=x).logits

def bert_learner():
    transformers = pytest.importorskip('transformers', reason='transformers is not installed (it is in the dev extra)')
    cfg = transformers.BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=8, num_labels=10)
    model = HFClassifier(transformers.BertForSequenceClassification(cfg))
    dls = _dls(*digit_words())
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy), model.model.classifier

ZOO = {
    'resnet18': resnet18_learner,
    'efficientnet_b0': partial(timm_learner, 'efficientnet_b0'),
    'convnext_atto': partial(timm_learner, 'convnext_atto'),
    'unet': unet_learner_,
    'tabular': tabular_learner_,
    'awd_lstm': awd_lstm_learner,
    'transformer': transformer_learner,
    'bert': bert_learner,
}
GRANULARITIES = ('weight', 'filter', '2:4')
TARGET = 0.5
EXTRA = {'resnet18_rgb': partial(resnet18_learner, 3), 'small_cnn': small_cnn_learner} # for single checks below

def build(name):
    set_seed(0)
    learn, out = {**ZOO, **EXTRA}[name]()
    return learn, out

# ---------------------------------------------------------------- the checks

def _module_name(model, m):
    return next(n for n, x in model.named_modules() if x is m)

_ELEMENTWISE = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU,
                nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d,
                nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._MaxPoolNd,
                nn.modules.pooling._AvgPoolNd, nn.Flatten) # pooling keeps a zero channel zero; fastai's concat pool below

def _concat_pool():
    from fastai.layers import AdaptiveConcatPool2d
    return AdaptiveConcatPool2d

def _flatten():
    from fastai.layers import Flatten # fastai's own, in every `vision_learner` head
    return (nn.Flatten, Flatten)

class ChannelWatch:
    """Forward hooks that follow each pruned filter's output through the modules that read it directly and act channel by
    channel (norms, activations with f(0)=0, dropout): the largest |value| each of them gives on a pruned unit. A tensor
    changed in place before the next module reads it (a residual `out += identity`) is not followed."""
    def __init__(self, model, dead:dict): # dead: {module: bool tensor, True = pruned output unit}
        self.dead, self.worst, self.live, self.pending, self.hooks = dead, {}, {}, {}, []
        for n, m in model.named_modules():
            if m in dead or isinstance(m, _ELEMENTWISE + (_concat_pool(), *_flatten())):
                self.hooks += [m.register_forward_pre_hook(self.pre), m.register_forward_hook(partial(self.hook, n))]
    def pre(self, mod, inp):
        x = inp[0] if inp else None
        src = self.live.get(id(x)) if isinstance(x, torch.Tensor) else None
        # the very tensor a pruned filter (or a module after it) wrote, not changed since
        self.pending[mod] = src[:3] if src is not None and src[3] is x and src[4] == x._version else None
    def hook(self, name, mod, inp, out):
        src = self.pending.pop(mod, None)
        if not isinstance(out, torch.Tensor): return
        if mod in self.dead: src = (self.dead[mod], -1 if isinstance(mod, nn.Linear) or out.dim() <= 2 else 1, name)
        if src is None: return
        dead, dim, root = src
        if isinstance(mod, _concat_pool()): dead = torch.cat([dead, dead]) # [max, avg] of each channel
        if isinstance(mod, _flatten()): # (N, C, 1, 1) -> (N, C): the channels become the features
            if dim != 1 or out.dim() != 2: return
            dim = -1
        src = (dead, dim, root)
        if not dead.any() or out.shape[dim] != dead.numel(): return
        v = out.detach().movedim(dim, 0)[dead.to(out.device)].abs().max().item()
        key = root if mod in self.dead else f'{root} -> {name}'
        self.worst[key] = max(self.worst.get(key, 0.), v)
        self.live[id(out)] = (*src, out, out._version)
    def remove(self):
        for h in self.hooks: h.remove()
        self.live.clear()

def dead_units(sp):
    "{module: bool tensor of its pruned output units} for every layer a 'filter' sparsifier pruned"
    out = {}
    for l in sp.layers:
        m = sp.masks.get(l.name)
        om = l.grouping.out_mask(m) if m is not None else None
        if om is not None: out[l.module] = ~om.reshape(-1).bool()
    return out

def warning_kind(w):
    "A warning's message with names, numbers and quoted values blanked: messages that differ only in them are one kind"
    msg = str(w.message)
    msg = re.sub(r"`[^`]*`|'[^']*'|\"[^\"]*\"", '_', msg)
    return w.category.__name__ + ': ' + re.sub(r'\d+(\.\d+)?', '#', msg)[:120]

_FOREIGN = (r'`torch.jit.script` is deprecated', r'enable_nested_tensor', r'does not have many workers',
            r'upsample_bilinear2d_backward_out_cpu', r'TypedStorage is deprecated')

def fasterprune_warnings(ws):
    return [w for w in ws if not any(re.search(p, str(w.message)) for p in _FOREIGN)]

def prune_fit(learn, granularity, sparsity=TARGET, **kwargs):
    "One short one-cycle fit pruning to `sparsity`; the callback and the warnings it raised"
    cb = SparsifyCallback(sparsity, granularity=granularity, **kwargs)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3, cbs=cb)
    return cb, fasterprune_warnings(ws)

def expected_pruned(l, target):
    "Groups a layer loses at `target`: round(target × groups) (N:M: blocks worth round(target × weights)), at least one kept"
    gr = l.grouping
    if gr.nm: return round(target * gr.numel / gr.per_group)
    return min(round(target * gr.n_groups), gr.n_groups - 1)

def pruned_groups(l, mask):
    gr = l.grouping
    if gr.nm: return int((~mask).sum()) // gr.per_group
    return int((~mask).sum())

# ---------------------------------------------------------------- the tests

CASES = [(n, g) for n in ZOO for g in GRANULARITIES]

@pytest.fixture(scope='module')
def fits():
    "Each (model, granularity, callback arguments) fitted once for all the checks; only the weights are kept"
    cache = {}
    def get(name, granularity, **kwargs):
        key = (name, granularity, *sorted(kwargs.items()))
        if key not in cache:
            learn, out = build(name)
            try: cb, ws = prune_fit(learn, granularity, **kwargs); cache[key] = (learn, out, cb, ws, None)
            except Exception as e: cache[key] = (learn, out, None, [], e)
            learn.opt = None # the optimizer state and the gradients are not needed by the checks
            for p in learn.model.parameters(): p.grad = None
        learn, out, cb, ws, err = cache[key]
        if err is not None: raise err
        return learn, out, cb, ws
    return get

def _inputs(learn):
    "A validation batch's inputs, as the model takes them"
    return learn.dls.valid.one_batch()[:learn.dls.n_inp]

def _logits(learn, xb):
    learn.model.eval()
    with torch.no_grad(): out = learn.model(*xb)
    return out[0] if isinstance(out, tuple) else out # fastai's text classifier also returns the LSTM's outputs

@pytest.mark.parametrize('name,granularity', CASES)
def test_fits_and_exact_counts(fits, name, granularity):
    "The default selection fits the granularity (no error), and every pruned layer loses exactly round(target × groups)"
    learn, out, cb, ws = fits(name, granularity)
    sp = cb.sparsifier
    layers = {n for n, m in learn.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d))}
    assert layers <= {l.name for l in sp.layers} | set(sp.skipped), 'a Linear or Conv layer is neither pruned nor listed as skipped'
    assert all(isinstance(why, str) and why for why in sp.skipped.values()), sp.skipped
    for l in sp.layers:
        assert pruned_groups(l, sp.masks[l.name]) == expected_pruned(l, TARGET), l.name
    rep = sp.report()
    assert {'groups', 'sparsity', 'weight_sparsity', 'zeros', 'note'} <= set(rep.columns), list(rep.columns)
    rows = rep.set_index('name')
    for l in sp.layers:
        r, gr = rows.loc[l.name], l.grouping
        k = expected_pruned(l, TARGET)
        if gr.nm: # N:M counts its weights as its groups: the target is a share of weights
            assert r.groups == gr.numel, (l.name, r.groups)
            k *= gr.per_group
        else: assert r.groups == gr.n_groups, (l.name, r.groups)
        assert round(r.sparsity * r.groups) == k, (l.name, r.sparsity, r.groups)
    assert math.isclose(sp.sparsity_achieved(of='groups'), TARGET, abs_tol=0.02)
    # the Recorder's column: what the target counts, and named so
    names, col = learn.recorder.metric_names, 'sparsity' if granularity == 'weight' or ':' in granularity else f'sparsity ({granularity}s)'
    assert col in names, names
    assert math.isclose(learn.recorder.values[-1][names.index(col) - 1], sp.sparsity_achieved(of='groups'))

@pytest.mark.parametrize('name', list(ZOO))
def test_filter_keeps_every_class(fits, name):
    "Under 'filter' the output layer keeps all its output units: no class becomes impossible to predict"
    learn, out, cb, ws = fits(name, 'filter')
    w = out.weight.detach()
    rows = w.reshape(w.shape[0], -1) if not isinstance(out, nn.ConvTranspose2d) else w.transpose(0, 1).reshape(w.shape[1], -1)
    assert (rows != 0).any(1).all(), f"{int((rows == 0).all(1).sum())} of {rows.shape[0]} output units pruned"
    logits = _logits(learn, _inputs(learn))
    per_class = logits.movedim(1, 0).reshape(logits.shape[1], -1) # classes first (a segmentation map: per pixel)
    assert per_class.std(1).gt(0).all(), 'some class has a constant logit'

@pytest.mark.parametrize('name', list(ZOO))
def test_filter_pruned_channels_output_zero(fits, name):
    "A pruned filter's channel is exactly 0 at the layer's output and after the norm and activation that follow it"
    learn, out, cb, ws = fits(name, 'filter')
    dead = dead_units(cb.sparsifier)
    assert dead and any(d.any() for d in dead.values())
    watch = ChannelWatch(learn.model, dead)
    xb = _inputs(learn)
    for mode in ('train', 'eval'): # train: batch statistics; eval: running statistics
        getattr(learn.model, mode)()
        with torch.no_grad(): learn.model(*xb)
    watch.remove()
    bad = {k: v for k, v in watch.worst.items() if v != 0}
    assert not bad, f"pruned channels output non-zero: {dict(list(sorted(bad.items(), key=lambda kv: -kv[1]))[:8])}"

@pytest.mark.parametrize('name,granularity', CASES)
def test_warnings_once(fits, name, granularity):
    "No kind of warning comes more than once in a fit"
    learn, out, cb, ws = fits(name, granularity)
    kinds = pd.Series([warning_kind(w) for w in ws], dtype=object).value_counts()
    assert (kinds <= 1).all(), kinds[kinds > 1].to_dict()

@pytest.mark.parametrize('name,granularity', CASES)
def test_coverage_given(fits, name, granularity):
    "The report and `coverage()` say which share of the model's parameters sits in pruned layers, naming the largest left"
    learn, out, cb, ws = fits(name, granularity)
    sp = cb.sparsifier
    cov = sp.coverage()
    n_model = sum(p.numel() for p in learn.model.parameters())
    n_pruned = sum(l.weight.numel() for l in sp.layers)
    assert 0 < cov['share'] <= 1
    assert math.isclose(cov['share'], n_pruned / n_model, rel_tol=0.05), (cov['share'], n_pruned / n_model)
    assert isinstance(cov['largest_unpruned'], list)
    rep = sp.report()
    assert 'model' in set(rep.name)

# ---------------------------------------------------------------- what the issue found, model by model

def n_params(model): return sum(p.numel() for p in model.parameters())

@pytest.mark.parametrize('name', list(ZOO))
def test_graph_finds_output_layer(name):
    "The graph names the model's output layer: traced with fx, or with hooks on a batch where fx cannot trace the model"
    from fasterprune.graph import ModelGraph
    learn, out = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        g = ModelGraph(learn.model, sample_input=_inputs(learn))
    assert g.output_layers() == {_module_name(learn.model, out)}, (g.mode, g.output_layers())

@pytest.mark.parametrize('name', ['efficientnet_b0', 'convnext_atto'])
def test_kernel_leaves_linear_layers_dense(fits, name):
    "'kernel' by default on a timm model: its Linear layers are left dense, named in one warning and in the report"
    learn, out, cb, ws = fits(name, 'kernel')
    sp = cb.sparsifier
    linear = {n for n, m in learn.model.named_modules() if isinstance(m, nn.Linear)}
    assert linear and linear <= set(sp.skipped), linear - set(sp.skipped)
    said = [w for w in ws if any(f'`{n}`' in str(w.message) for n in linear)]
    assert len(said) == 1, [str(w.message)[:200] for w in said]
    notes = sp.report().set_index('name').note
    assert all(notes[n] for n in linear)

def test_channel_keeps_the_model_inputs(fits):
    "'channel' never removes the RGB channels the stem convolution reads"
    learn, out, cb, ws = fits('resnet18_rgb', 'channel')
    stem = learn.model[0][0]
    assert stem.in_channels == 3
    assert (stem.weight.detach().transpose(0, 1).reshape(3, -1) != 0).any(1).all()

@pytest.mark.parametrize('name', ['unet', 'transformer', 'bert'])
def test_lookahead_warns_once(fits, name):
    "Lookahead on models fx cannot trace (or only in part): each kind of warning at most once in the fit"
    learn, out, cb, ws = fits(name, 'weight', criterion='lookahead')
    kinds = pd.Series([warning_kind(w) for w in ws], dtype=object).value_counts()
    assert (kinds <= 1).all(), kinds[kinds > 1].to_dict()

@pytest.mark.parametrize('name', ['small_cnn', 'resnet18', 'unet'])
def test_compact_shrinks(fits, name):
    "`learn.compact()` on fastai's own batches gives a smaller model that computes the same outputs"
    pytest.importorskip('torch_pruning', reason='torch-pruning is not installed (it is in the dev extra)')
    learn, out, cb, ws = fits(name, 'filter')
    small = learn.compact()
    assert n_params(small) < 0.8 * n_params(learn.model), (n_params(small), n_params(learn.model))
    xb = _inputs(learn)
    small.eval(); learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(small(*xb), learn.model(*xb), atol=1e-4, rtol=1e-4)

def test_fine_tune_vision_learner_prunes_once():
    "`fine_tune` on a `vision_learner` (its body really frozen in the first phase): the target once, exact, dead stays dead"
    learn, out = build('resnet18')
    cb = SparsifyCallback(TARGET, granularity='filter')
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=cb)
    sp = cb.sparsifier
    for l in sp.layers: assert pruned_groups(l, sp.masks[l.name]) == expected_pruned(l, TARGET), l.name
    assert (out.weight.detach() != 0).any(1).all()
    watch = ChannelWatch(learn.model, dead_units(sp))
    learn.model.eval()
    with torch.no_grad(): learn.model(*_inputs(learn))
    watch.remove()
    assert watch.worst and not any(watch.worst.values()), {k: v for k, v in watch.worst.items() if v}
    kinds = pd.Series([warning_kind(w) for w in fasterprune_warnings(ws)], dtype=object).value_counts()
    assert (kinds <= 1).all(), kinds[kinds > 1].to_dict()

def test_global_filter_counts_filters(fits):
    "'filter' in global scope: the target and the column count filters (not weights), and the classes stay protected"
    learn, out, cb, ws = fits('resnet18', 'filter', scope='global')
    sp = cb.sparsifier
    n = sum(l.grouping.n_groups for l in sp.layers)
    assert sum(pruned_groups(l, sp.masks[l.name]) for l in sp.layers) == round(TARGET * n)
    names = learn.recorder.metric_names
    assert learn.recorder.values[-1][names.index('sparsity (filters)') - 1] == pytest.approx(TARGET, abs=1 / n)
    assert (out.weight.detach() != 0).any(1).all()
