"Model graphs of the models fastai users train: which norms follow which layer, which layers are the model's inputs and outputs, fx or hooks."
import warnings
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasterprune.graph import ModelGraph, unit_norm_types
from fasterprune.granularities import granularity_table

torch.set_num_threads(1)
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

def bound_norms(g):
    "norm name -> the layers `following_norms` binds it to"
    out = {}
    for n, m in g.modules.items():
        if isinstance(m, tuple(granularity_table)):
            for b in g.following_norms(n): out.setdefault(b, []).append(n)
    return out

# ------------------------------------------------------------------ following_norms

class Norms(nn.Module):
    "One layer before each kind of norm; `dynamic` adds data-dependent control flow, so fx fails and hooks are used"
    def __init__(self, dynamic=False):
        super().__init__()
        from timm.layers import BatchNormAct2d, LayerNorm2d
        self.dynamic = dynamic
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3), BatchNormAct2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3), nn.SyncBatchNorm(4)
        self.c3, self.gn = nn.Conv2d(4, 6, 1), nn.GroupNorm(2, 6)
        self.c4, self.ln2d = nn.Conv2d(6, 6, 1), LayerNorm2d(6)
        self.c5, self.ln_wrong = nn.Conv2d(6, 4, 1), nn.LayerNorm(4) # over the last spatial dim, not the channels
        self.c6, self.gn_fixed = nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4, affine=False) # no γ, β
        self.fc, self.ln = nn.Linear(4, 5), nn.LayerNorm(5)
    def forward(self, x):
        if self.dynamic and x.sum() > 1e9: return x
        x = self.c2(self.bn1(self.c1(x)))
        x = self.ln_wrong(self.c5(self.ln2d(self.c4(self.gn(self.c3(self.bn2(x)))))))
        x = self.gn_fixed(self.c6(x))
        return self.ln(F.gelu(self.fc(x.mean((2, 3)))))

@pytest.mark.parametrize('dynamic', [False, True])
def test_following_norms_kinds(dynamic):
    g = ModelGraph(Norms(dynamic), sample_input=torch.randn(2, 3, 8, 8))
    assert g.mode == ('hooks' if dynamic else 'fx')
    assert bound_norms(g) == dict(bn1=['c1'], bn2=['c2'], gn=['c3'], ln2d=['c4'], ln=['fc'])
    assert g.following_bns('c1') == ['bn1'] # the old name answers the same

def test_timm_batchnormact_bound():
    "every BatchNormAct2d of a timm MobileNetV3 but the head's BatchNorm1d (after pooling) follows one conv"
    timm = pytest.importorskip('timm')
    m = timm.create_model('mobilenetv3_small_050', num_classes=10, pretrained=False)
    g = ModelGraph(m)
    assert g.mode == 'fx'
    bns = [n for n, x in m.named_modules() if isinstance(x, unit_norm_types)]
    b = bound_norms(g)
    assert len(bns) > 20 and sorted(b) == sorted(bns) and all(len(v) == 1 for v in b.values())
    assert b['bn1'] == ['conv_stem'] and type(m.bn1).__name__ == 'BatchNormAct2d'

def test_syncbn_converted_resnet():
    "what fastai's `distrib_ctx` does to a model: every BatchNorm becomes a SyncBatchNorm, and stays bound"
    import torchvision
    m = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10))
    g = ModelGraph(m)
    assert g.following_norms('layer2.0.downsample.0') == ['layer2.0.downsample.1']
    assert len(bound_norms(g)) == 20

# ------------------------------------------------------------------ the models fastai users train: input and output layers

class TxClf(nn.Module):
    def __init__(self, vocab=40, d=16, n_class=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 32, batch_first=True), 2)
        self.head = nn.Linear(d, n_class)
    def forward(self, x): return self.head(self.enc(self.emb(x)).mean(1))

class HFWrap(nn.Module):
    "A Hugging Face model whose forward takes `input_ids` and returns the logits, as a fastai Learner wants"
    def __init__(self, m): super().__init__(); self.hf = m
    def forward(self, input_ids): return self.hf(input_ids=input_ids).logits

def vision():
    from fastai.vision.all import create_vision_model, resnet18
    return create_vision_model(resnet18, 10, pretrained=False), torch.randn(2, 3, 32, 32)
def timm_vision():
    pytest.importorskip('timm')
    from fastai.vision.all import create_timm_model
    return create_timm_model('mobilenetv3_small_050', 10, pretrained=False)[0], torch.randn(2, 3, 32, 32)
def unet():
    from fastai.vision.all import create_unet_model, resnet18
    return create_unet_model(resnet18, 5, (32, 32), pretrained=False), torch.randn(2, 3, 32, 32)
def tabular():
    from fastai.tabular.all import TabularModel
    return TabularModel([(5, 3), (4, 2)], 7, 2, [20, 10]), (torch.randint(0, 4, (4, 2)), torch.randn(4, 7))
def awd_lstm():
    from fastai.text.all import get_text_classifier, AWD_LSTM, awd_lstm_clas_config
    cfg = dict(awd_lstm_clas_config, emb_sz=16, n_hid=24, n_layers=2)
    return get_text_classifier(AWD_LSTM, 40, 2, seq_len=8, config=cfg), torch.randint(0, 40, (2, 10))
def transformer(): return TxClf(), torch.randint(0, 40, (2, 10))
def bert():
    tr = pytest.importorskip('transformers')
    cfg = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=3)
    return HFWrap(tr.BertForSequenceClassification(cfg)), torch.randint(0, 50, (2, 10))

# (model, mode, input layers, output layers): an embedding reads a text model's input, and is no prunable layer (in hooks
# mode too: the first prunable layer to run reads the inputs only when no embedding or LSTM ran before it)
cases = [(vision, 'fx', {'0.0'}, {'1.8'}),
         (timm_vision, 'fx', {'0.model.conv_stem'}, {'1.8'}),
         (unet, 'hooks', {'layers.0.0'}, {'layers.12.0'}),
         (tabular, 'fx', {'layers.0.0'}, {'layers.2.0'}),
         (awd_lstm, 'hooks', set(), {'1.layers.1.2'}),
         (transformer, 'fx', set(), {'head'}),
         (bert, 'hooks', set(), {'hf.classifier'})]

@pytest.mark.parametrize('make,mode,ins,outs', cases, ids=[c[0].__name__ for c in cases])
def test_input_output_layers(make, mode, ins, outs):
    model, x = make()
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) # DynamicUnet has its own
    before = n_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter('error') # tracing a model, either way, warns about nothing
        g = ModelGraph(model, sample_input=x)
    assert g.mode == mode
    assert (g.input_layers(), g.output_layers()) == (ins, outs)
    for n in outs: # each output layer writes the model's output units
        m = g.modules[n]
        assert isinstance(m, tuple(granularity_table))
    assert n_hooks() == before # nothing left behind

def test_output_layers_fx_walk():
    "outputs found through norms, activations and a sum of two heads; a module with weights that is not prunable stops the walk"
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)
            self.bn, self.emb, self.c = nn.BatchNorm1d(3), nn.Embedding(10, 3), nn.Linear(3, 3)
        def forward(self, x, i): return self.bn(F.relu(self.a(self.body(x))) + self.b(self.body(x)).view(x.size(0), -1)) + self.emb(i)
    g = ModelGraph(TwoHeads())
    assert g.mode == 'fx' and g.output_layers() == {'a', 'b'} and g.input_layers() == {'body'}

# ------------------------------------------------------------------ sample inputs: tensor, tuple, dict

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    def forward(self, x, y=None):
        if x.sum() > 1e9: return x # data-dependent: fx cannot trace this
        return self.head(self.bn(self.a(x)) + self.b(y))

@pytest.mark.parametrize('kind', ['tuple', 'list', 'dict'])
def test_sample_input_forms(kind):
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    xb = dict(tuple=(x, y), list=[x, y], dict=dict(x=x, y=y))[kind]
    g = ModelGraph(TwoInputs(), sample_input=xb)
    assert g.mode == 'hooks' and g.following_norms('a') == ['bn']
    assert (g.input_layers(), g.output_layers()) == ({'a'}, {'head'})

def test_hf_dict_input():
    "a Hugging Face model called with its keyword inputs, as its own batches are"
    tr = pytest.importorskip('transformers')
    cfg = tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=3)
    m = tr.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 50, (2, 10))
    g = ModelGraph(m, sample_input=dict(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert g.mode == 'hooks' and g.output_layers() == {'classifier'}

def test_no_graph_warns_once():
    g = None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        g = ModelGraph(TwoInputs())
        n = len(w)
        for _ in range(3): assert g.output_layers() == set() and g.input_layers() == set()
    assert g.mode is None and n == 1
    assert len(w) - n == 2 and all('unknown' in str(x.message) for x in w[n:]) # one for outputs, one for inputs

# ------------------------------------------------------------------ lookahead on models fx cannot trace in one piece

from fasterprune.granularities import in_units, out_units
from fasterprune.criteria import LookaheadCriterion, lookahead, lookahead_bn

def assert_sizes_match(g, mode='graph'):
    "every link pairs channels that exist on both sides: a neighbour of another size is never linked"
    for n in g.chain:
        m = g.modules[n]
        for links, mine, theirs in ((g.producers(n, mode), in_units(m), out_units), (g.consumers(n, mode), out_units(m), in_units)):
            for l in links:
                if l.layer is None: continue
                other = theirs(g.modules[l.layer])
                if l.here is None: assert mine == other, (n, l)
                else: assert int(l.here.max()) < mine and int((l.here if l.there is None else l.there).max()) < other, (n, l)

@pytest.mark.parametrize('make', [unet, awd_lstm, transformer, bert], ids=['unet', 'awd_lstm', 'transformer', 'bert'])
@pytest.mark.parametrize('sample', [True, False], ids=['sample', 'no_sample'])
def test_neighbours_of_untraceable_models(make, sample):
    model, x = make()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        g = ModelGraph(model, sample_input=x if sample else None)
        src = g.neighbour_sources()
        assert_sizes_match(g)
        assert_sizes_match(g, 'chain')
    assert set(src) == set(g.chain)
    if sample: # every layer that runs in the forward pass gets its neighbours from fx, a traced block or the hooks
        never_called = {n for n in g.chain if n.endswith('self_attn.out_proj')} # MultiheadAttention reads its weight directly
        assert {n for n, s in src.items() if s is None} == never_called
        assert 'chain' not in ''.join(s for s in src.values() if s)

def test_hooks_follow_the_data_not_the_registration_order():
    "registered c, a, b but run a -> bn -> relu -> b -> gelu -> c: the hooks link what fx would, chain mode does not"
    class Shuffled(nn.Module):
        def __init__(self, dynamic):
            super().__init__()
            self.dynamic = dynamic
            self.c, self.a, self.bn, self.b = nn.Linear(6, 4), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6)
        def forward(self, x):
            if self.dynamic and x.sum() > 1e9: return x
            return self.c(F.gelu(self.b(torch.relu(self.bn(self.a(x))))))
    torch.manual_seed(0)
    ref = Shuffled(False)
    with torch.no_grad():
        ref.bn.weight.uniform_(.5, 2); ref.bn.running_var.uniform_(.5, 2)
    ref.eval()
    dyn = Shuffled(True)
    dyn.load_state_dict(ref.state_dict())
    dyn.eval()
    gf, gh = ModelGraph(ref), ModelGraph(dyn, sample_input=torch.randn(2, 4))
    assert (gf.mode, gh.mode) == ('fx', 'hooks')
    assert [l.layer for l in gh.consumers('a')] == ['b'] and [b for l in gh.consumers('a') for b, _ in l.bns] == ['bn']
    from fasterprune.criteria import Layer
    for crit in (lookahead, lookahead_bn):
        for n in ('c', 'a', 'b'):
            torch.testing.assert_close(crit.score(Layer(n, gh.modules[n], graph=gh)), crit.score(Layer(n, gf.modules[n], graph=gf)))
    assert [l.layer for l in gh.producers('a')] == [None] and [l.layer for l in gh.producers('a', 'chain')] == ['c'] # c "feeds" a

def count_kinds(w):
    "warning text (first 60 characters) -> how many times it was given"
    import collections
    return collections.Counter(str(x.message)[:60] for x in w if 'jit' not in str(x.message))

def test_chain_mode_mismatches_warned_once():
    import torchvision
    from fasterprune.sparsifier import Sparsifier
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        sp = Sparsifier(torchvision.models.resnet18(num_classes=10), 0.5, criterion=LookaheadCriterion(mode='chain'))
        for _ in range(3): sp.prune()
    kinds = count_kinds(w)
    chain = [k for k in kinds if k.startswith('chain mode')]
    assert len(chain) == 1 and kinds[chain[0]] == 1, kinds
    assert len(sp.graph.chain_mismatches) == 3 # the three projection shortcuts, registered after their block's conv2

@pytest.mark.parametrize('sample', [True, False], ids=['sample', 'no_sample'])
def test_tiny_bert_fit_warns_once(sample):
    "a 2-epoch fit of a tiny BERT with lookahead pruning: at most one warning of each kind, one from lookahead"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    model, _ = bert()
    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (32, 10)), torch.randint(0, 3, (32,))
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=8, device='cpu')
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(),
                    cbs=SparsifyCallback(0.5, criterion='lookahead', sample_input=x[:2] if sample else None))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    kinds = count_kinds(w)
    assert all(v == 1 for v in kinds.values()), kinds
    assert sum(k.startswith('lookahead') for k in kinds) == 1, kinds


# ---------------------------------------------------------------- norms further down: after a norm, after pooling and concat-pool

class _NormAfterNorm(nn.Module):
    "A skip connection normalised again (as a unet's blocks do with the encoder's features)"
    def __init__(s):
        super().__init__()
        s.conv, s.bn, s.relu, s.bn2, s.head = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(16, 4, 1)
    def forward(s, x): h = s.relu(s.bn(s.conv(x))); return s.head(torch.cat([h, s.bn2(h)], 1))

def _pooled_head(concat):
    from fastai.layers import AdaptiveConcatPool2d
    pool = AdaptiveConcatPool2d(1) if concat else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), pool, nn.Flatten(), nn.BatchNorm1d(16 if concat else 8), nn.Linear(16 if concat else 8, 4))

@pytest.mark.parametrize('make,norms', [(_NormAfterNorm, ['bn', 'bn2']), (lambda: _pooled_head(False), ['4']),
                                        (lambda: _pooled_head(True), ['4'])], ids=['norm_after_norm', 'pool_flatten_bn1d', 'concat_pool'])
def test_norms_further_down_are_zeroed(make, norms):
    "A pruned filter outputs exactly 0 after every norm its channel reaches unmixed, not only the first one"
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    m = make()
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm): nn.init.uniform_(b.bias, .5, 1); nn.init.uniform_(b.weight, .5, 1)
    first = 'conv' if isinstance(m, _NormAfterNorm) else '0'
    assert ModelGraph(m).following_norms(first) == norms
    sp = Sparsifier(m, 0.5, 'filter', include=first).prune()
    dead = ~sp.masks[first].reshape(-1)
    seen = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach())) for n, b in m.named_modules()
             if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for mode in ('train', 'eval'):
        getattr(m, mode)()
        with torch.no_grad(): m(torch.randn(4, 1 if isinstance(m, _NormAfterNorm) else 3, 8, 8))
        for n, o in seen.items():
            per = o.view(o.shape[0], -1, dead.numel(), *o.shape[2:]) if o.shape[1] != dead.numel() else o.unsqueeze(1)
            assert not per[:, :, dead].any(), f"{n} ({mode}): pruned channels are not 0"
    for h in hooks: h.remove()

def test_a_norm_after_an_add_is_left_alone():
    "A norm after a residual add reads another branch too: zeroing its γ, β for a pruned channel would kill live values"
    class Res(nn.Module):
        def __init__(s): super().__init__(); s.a, s.b, s.pool, s.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm1d(4)
        def forward(s, x): return s.bn(s.pool(s.a(x) + s.b(x)).flatten(1))
    assert ModelGraph(Res()).following_norms('a') == []


def test_language_model_channel_keeps_its_layers():
    "A language model fx cannot trace: its decoder reads the LSTM's outputs, not the model's inputs, so 'channel' prunes it"
    from fastai.text.all import get_language_model, AWD_LSTM, awd_lstm_lm_config
    from fasterprune.sparsifier import Sparsifier
    model = get_language_model(AWD_LSTM, 40, config=dict(awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=2))
    x = torch.randint(0, 40, (2, 8))
    g = ModelGraph(model, x)
    assert g.mode == 'hooks' and g.input_layers() == set() and g.output_layers() == {'1.decoder'}
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); sp = Sparsifier(model, 0.5, 'channel', sample_input=x).prune()
    assert '1.decoder' in [l.name for l in sp.layers]
