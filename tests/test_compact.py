"Compaction, coupled masks, saving/loading, ONNX and the 2:4 report (fasterprune.compact, nbs/10_compact.ipynb)."
import io, sys, warnings

import pytest
import torch
import torchvision
from torch import nn

from fasterprune.sparsifier import Sparsifier
from fasterprune.graph import ModelGraph
from fasterprune.compact import (coupled, compact, load_compact, count_macs, compact_report, weight_pattern,
                                 semi_structured_report, semi_structured_support, to_semi_structured)

tp = pytest.importorskip('torch_pruning', reason="the 'compact' extra (torch-pruning) is not installed")


def cbr(ci, co): return [nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU()]

def vgg_bn():
    return nn.Sequential(*cbr(3, 16), *cbr(16, 16), nn.MaxPool2d(2), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

class InvRes(nn.Module):
    def __init__(self, ci, co, stride=1, t=4):
        super().__init__()
        h = ci * t
        self.expand = nn.Sequential(nn.Conv2d(ci, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, co, 1, bias=False), nn.BatchNorm2d(co))
        self.res = stride == 1 and ci == co
    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.res else y

class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvRes(16, 16), InvRes(16, 24, 2), InvRes(24, 24))
        self.head = nn.Linear(24, 10)
    def forward(self, x): return self.head(self.blocks(self.stem(x)).mean((2, 3)))

def with_stats(model, seed=0):
    "BatchNorm statistics and affine parameters as after training, so that a forgotten channel shows"
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=g); m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g); m.bias.data.normal_(generator=g)
    return model.eval()

def n_params(m): return sum(p.numel() for p in m.parameters())

def max_diff(a, b, x):
    with torch.no_grad(): return (a.eval()(x) - b.eval()(x)).abs().max().item()

def resnet18(): return torchvision.models.resnet18(num_classes=10)

NETS = {'vgg': (vgg_bn, '18'), 'resnet18': (resnet18, 'fc'), 'mobilenet': (MobileNetish, 'head')}

@pytest.fixture
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- coupled masks

def test_coupled_masks_identical_across_residual_group_and_exact():
    torch.manual_seed(0)
    rn = resnet18()
    sp = Sparsifier(rn, 0.5, 'filter', exclude='fc', links=coupled).prune()
    for group in (['conv1', 'layer1.0.conv2', 'layer1.1.conv2'],
                  ['layer3.0.conv2', 'layer3.0.downsample.0', 'layer3.1.conv2']):
        masks = [sp.masks[n].reshape(-1) for n in group]
        assert all(torch.equal(masks[0], m) for m in masks[1:])
        assert int((~masks[0]).sum()) == masks[0].numel() // 2
    # every layer, linked or not, loses exactly half its filters, and so do the weights
    for l in sp.layers:
        dead = (l.weight.detach().flatten(1).abs().sum(1) == 0).sum()
        assert int((~sp.masks[l.name]).sum()) == l.grouping.n_groups // 2 and int(dead) >= l.grouping.n_groups // 2

def test_coupled_scores_are_summed():
    "The unit's ranking follows the sum of its members' group scores, not either member's own"
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)
        def forward(self, x): return self.head(self.a(x) + self.b(x))
    m = Two()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([1., 2, 3, 10])[:, None].expand(4, 4))
        m.b.weight.copy_(torch.tensor([5., 4, 0.5, 0])[:, None].expand(4, 4))
    sp = Sparsifier(m, 0.5, 'filter', exclude='head', links=coupled).prune() # sums 6, 6, 3.5, 10
    assert sp.masks['a'].reshape(-1).tolist() == [False, True, False, True] # ties go to the earlier group
    assert torch.equal(sp.masks['a'], sp.masks['b'])

def test_coupled_global_scope_exact_count_never_empty():
    torch.manual_seed(0)
    rn = resnet18()
    sp = Sparsifier(rn, 0.95, 'filter', scope='global', exclude='fc', links=coupled).prune()
    n_unit_groups = sum(u[0].grouping.n_groups for u in sp.units)
    pruned = sum(int((~sp.masks[u[0].name]).sum()) for u in sp.units)
    assert pruned == round(0.95 * n_unit_groups)
    assert all(m.any() for m in sp.masks.values())
    for u in sp.units: assert all(torch.equal(sp.masks[u[0].name].reshape(-1), sp.masks[l.name].reshape(-1)) for l in u)

def test_depthwise_linked_to_its_producer():
    sets, tangled = ModelGraph(MobileNetish()).same_channels('out')
    assert ['blocks.0.expand.0', 'blocks.0.dw.0'] in sets and ['stem.0', 'blocks.0.project.0'] in sets and not tangled

def test_coupled_needs_an_fx_graph():
    "`coupled` and `ModelGraph.same_channels` refuse, with the reason, a model fx cannot trace, and an unknown side"
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        def forward(self, x): return self.b(self.a(x)) if x.sum() > -1e9 else x
    with pytest.raises(ValueError, match=r"`coupled` needs a model torch.fx can trace; torch.fx could not trace Dynamic"):
        Sparsifier(Dynamic(), 0.5, 'filter', include=['a', 'b'], links=coupled)
    with pytest.raises(ValueError, match="`side`='sideways'"): ModelGraph(MobileNetish()).same_channels('sideways')

def test_links_errors_and_warnings():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)) # '4', the output layer, may stay dense
    with pytest.raises(ValueError, match='need as many groups'): Sparsifier(mlp, 0.5, 'filter', links=[['0', '2']])
    with pytest.raises(ValueError, match="'9' is not a pruned layer"): Sparsifier(mlp, 0.5, 'filter', links=[['0', '9']])
    with pytest.raises(ValueError, match="links 'filter' or 'channel'"): Sparsifier(mlp, 0.5, 'weight', links=coupled)
    rn = resnet18()
    with pytest.warns(UserWarning, match=r"which are not pruned"): Sparsifier(rn, 0.5, 'filter', exclude=['fc', 'conv1'], links=coupled)

def test_concat_then_add_is_reported_tangled():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
        def forward(self, x): return torch.cat([self.a(x), self.b(x)], 1) + self.c(x)
    with pytest.warns(UserWarning, match='share channels at different positions'):
        sp = Sparsifier(Cat(), 0.5, 'filter', include=['a', 'b', 'c'], links=coupled) # named: output layers pruned too
    assert all(len(u) == 1 for u in sp.units)


# --- compaction

@pytest.mark.parametrize('net', list(NETS))
@pytest.mark.parametrize('granularity', ['filter', 'channel'])
def test_compact_equivalent(net, granularity, x):
    torch.manual_seed(0)
    make, head = NETS[net]
    model = with_stats(make())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore') # 'channel': the last stream is read by the dense head
        Sparsifier(model, 0.5, granularity, exclude=head, links=coupled).prune()
    small = compact(model, x[:2])
    assert max_diff(model, small, x) <= 1e-4
    assert n_params(small) < (0.35 if granularity == 'filter' else 1) * n_params(model)

def test_compact_leaves_original_and_output_shape(x):
    "Pruned classifier rows stay (as zeros): the outputs keep their shape"
    model = with_stats(vgg_bn())
    Sparsifier(model, 0.5, 'filter', links=coupled).prune()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model, x[:2])
    assert small[-1].out_features == 10 and max_diff(model, small, x) <= 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

def test_compact_sees_through_wrappers(x):
    "A `torch.compile` (or DataParallel) wrapper is unwrapped: the compact model is the plain one, smaller and equivalent"
    model = with_stats(vgg_bn())
    Sparsifier(model, 0.5, 'filter', links=coupled).prune()
    for wrapped in (torch.compile(model, backend='eager'), nn.DataParallel(model)):
        small = compact(wrapped, x[:2])
        assert not isinstance(small, (nn.DataParallel, torch._dynamo.eval_frame.OptimizedModule))
        assert n_params(small) < n_params(model) and max_diff(model, small, x) <= 1e-4

def test_compact_keep_and_dense_model(x):
    model = with_stats(vgg_bn())
    small = compact(model, x[:2]) # nothing pruned: nothing removed
    assert n_params(small) == n_params(model)
    Sparsifier(model, 0.5, 'filter', exclude='18').prune()
    small = compact(model, x[:2], keep=['0'])
    assert small[0].out_channels == 16 and small[3].out_channels == 8

def test_compact_check_catches_a_wrong_removal(x, monkeypatch):
    import fasterprune.compact as C
    model = with_stats(vgg_bn())
    monkeypatch.setattr(C, '_dead_channels', lambda DG, tp, group, reach, why=None: torch.arange(len(group[0].idxs)) % 2 == 0)
    with pytest.raises(RuntimeError, match='differs from `model`'): compact(model, x[:2])

def test_missing_torch_pruning_message(monkeypatch, x):
    monkeypatch.setitem(sys.modules, 'torch_pruning', None)
    with pytest.raises(ImportError, match=r"pip install 'fasterprune\[compact\]'"): compact(vgg_bn(), x[:2])

def test_learner_compact_finds_the_sparsifier(x):
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    class Holds(Callback):
        def __init__(self, sp): self.sparsifier = sp
    model = with_stats(vgg_bn())
    sp = Sparsifier(model, 0.5, 'filter', exclude='18').prune()
    with torch.no_grad(): model[0].weight.add_(1.) # as after an optimizer step: the masks are re-applied by compact
    ds = list(zip(x, torch.zeros(4, dtype=torch.long)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=4), model, loss_func=nn.CrossEntropyLoss(), cbs=Holds(sp))
    small = learn.compact()
    assert small[0].out_channels == 8 and max_diff(model, small, x) <= 1e-4


# --- saving, loading, exporting

def test_state_dict_round_trip_into_fresh_architecture(x):
    torch.manual_seed(0)
    for make, head in NETS.values():
        model = with_stats(make())
        Sparsifier(model, 0.5, 'filter', exclude=head, links=coupled).prune()
        small = compact(model, x[:2])
        buf = io.BytesIO(); torch.save(small.state_dict(), buf); buf.seek(0)
        loaded = load_compact(make(), torch.load(buf, weights_only=True))
        assert max_diff(small, loaded, x) == 0
        with pytest.raises(RuntimeError): make().load_state_dict(small.state_dict()) # why load_compact exists

def test_whole_model_save_load(x):
    model = with_stats(MobileNetish())
    Sparsifier(model, 0.5, 'filter', exclude='head', links=coupled).prune()
    small = compact(model, x[:2])
    buf = io.BytesIO(); torch.save(small, buf); buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert max_diff(small, loaded, x) == 0

def test_onnx_export(x):
    onnx = pytest.importorskip('onnx', reason="the 'compact' extra (onnx) is not installed")
    from onnx.reference import ReferenceEvaluator
    model = with_stats(vgg_bn())
    Sparsifier(model, 0.5, 'filter', exclude='18', links=coupled).prune()
    small = compact(model, x[:2]).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.onnx.export(small, (x[:1],), f, dynamo=False, input_names=['x'])
    proto = onnx.load_from_string(f.getvalue())
    onnx.checker.check_model(proto)
    (y,) = ReferenceEvaluator(proto).run(None, {'x': x[:1].numpy()})
    with torch.no_grad(): assert (torch.from_numpy(y) - small(x[:1])).abs().max() <= 1e-4


# --- report and 2:4

def test_count_macs_by_hand():
    tiny = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16, 3))
    assert count_macs(tiny, torch.randn(3, 4, 4, 4)) == {'0': 8 * 16 * 2 * 9, '1': 8 * 16, '3': 3 * 128}

def test_compact_report_resnet(x):
    torch.manual_seed(0)
    rn = with_stats(resnet18())
    Sparsifier(rn, 0.5, 'filter', exclude='fc', links=coupled).prune()
    small = compact(rn, x[:2])
    rep = compact_report(rn, small, x[:1])
    tot = rep.iloc[-1]
    assert tot['name'] == 'total' and tot.params == n_params(rn) and tot.params_after == n_params(small)
    assert tot.macs_after / tot.macs < 0.27
    assert set(rep.pattern[rep.type == 'Conv2d']) == {'filter'} and rep[rep.type == 'Conv2d'].accelerable.all()

def test_weight_patterns():
    lin = nn.Linear(8, 4)
    assert weight_pattern(lin) == 'dense'
    with torch.no_grad():
        lin.weight[1] = 0; assert weight_pattern(lin) == 'filter'
        lin.weight[:, 2] = 0; assert weight_pattern(lin) == 'filter+channel'
        lin.weight[0, 0] = 0; assert weight_pattern(lin) == 'unstructured'
    m = nn.Linear(8, 4)
    Sparsifier(m, 0.5, '2:4').prune()
    assert weight_pattern(m) == '2:4'

def test_semi_structured_report_on_cpu():
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10), nn.Conv2d(4, 8, 1))
    Sparsifier(mlp, 0.5, '2:4', include=nn.Linear).prune()
    rep = semi_structured_report(mlp, torch.bfloat16)
    assert rep.pattern.tolist() == ['2:4', '2:4', 'dense']
    assert rep.eligible.tolist() == [True, False, False]
    assert 'multiples of' in rep.why_not[1] and 'Linear layers only' in rep.why_not[2]
    assert 'no 2:4 kernel' in semi_structured_report(mlp, torch.float64).why_not[0]
    if not torch.cuda.is_available():
        assert not rep.here.any() and 'no CUDA device' in rep.why_not[0]
        with pytest.raises(RuntimeError, match='cannot use 2:4 kernels: no CUDA device'): to_semi_structured(mlp)

@pytest.mark.skipif(not semi_structured_support()[0], reason=f"2:4 kernels unavailable: {semi_structured_support()[1]}")
def test_to_semi_structured_on_gpu():
    mlp = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    Sparsifier(mlp, 0.5, '2:4').prune()
    mlp = mlp.half().cuda()
    xin = torch.randn(64, 128, dtype=torch.half, device='cuda')
    with torch.no_grad(): ref = mlp(xin)
    rep = to_semi_structured(mlp)
    assert rep.converted.tolist() == [True, False]
    with torch.no_grad(): assert (mlp(xin) - ref).abs().max().item() <= 1e-2


# --- fastai learners and batches (issue 12): `TensorImage`, tuples, dicts; the parameter count falls; why a layer stays

def _image_dls(seg=False, n=8, size=32):
    "Tiny fastai DataLoaders of `TensorImage` batches (labels: classes, or masks for segmentation)"
    from fastai.data.core import Datasets
    from fastai.torch_core import TensorImage, TensorCategory, TensorMask
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n, size, size) if seg else (n,), generator=g)
    tfms = [[lambda i: TensorImage(xs[i])], [lambda i: TensorMask(ys[i]) if seg else TensorCategory(ys[i])]]
    return Datasets(range(n), tfms, splits=[range(4), range(4, n)]).dataloaders(bs=4)

def _learner(kind):
    from fastai.vision.learner import vision_learner, unet_learner
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fasterprune.demo import small_cnn
    torch.manual_seed(0)
    if kind == 'vision': return vision_learner(_image_dls(), torchvision.models.resnet18, pretrained=False, n_out=10,
                                               loss_func=CrossEntropyLossFlat())
    if kind == 'unet': return unet_learner(_image_dls(seg=True), torchvision.models.resnet18, pretrained=False, n_out=10,
                                           loss_func=CrossEntropyLossFlat(axis=1))
    return Learner(_image_dls(), small_cnn(c_in=3), loss_func=CrossEntropyLossFlat())

@pytest.mark.parametrize('kind', ['vision', 'unet', 'plain'])
def test_learner_compact_on_fastai_batches(kind):
    "A `TensorImage` batch traces like a plain tensor: the model shrinks after 'filter' pruning, its outputs unchanged"
    from fastai.torch_core import TensorImage
    learn = _learner(kind)
    xb = learn.dls.valid.one_batch()[0]
    assert isinstance(xb, TensorImage)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        Sparsifier(learn.model, 0.5, 'filter', sample_input=xb[:2].as_subclass(torch.Tensor)).prune()
        small = learn.compact() # the default example batch: two samples of a validation batch, a `TensorImage`
    assert n_params(small) < 0.9 * n_params(learn.model)
    with torch.no_grad():
        x = xb.as_subclass(torch.Tensor)
        ref, out = learn.model.eval()(x), small.eval()(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4 # every output (class) is still there

class _DictNet(nn.Module):
    "A model reading a dict of tensors, as a fastai batch `(dict,)` or Hugging Face keyword inputs give it"
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(4, 16), nn.Linear(16, 3)
    def forward(self, d=None, **kw):
        d = d if d is not None else kw
        return self.head(torch.relu(self.a(d['x']) + self.b(d['y'])))

def test_compact_dicts_and_tuples():
    "Inputs given as a dict (keyword inputs), a tuple holding a dict (a fastai `xb`), or a `Learner`'s dict batches"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.losses import CrossEntropyLossFlat
    g = torch.Generator().manual_seed(0)
    batch = {'x': torch.randn(4, 6, generator=g), 'y': torch.randn(4, 4, generator=g)}
    net = _DictNet()
    Sparsifier(net, 0.5, 'filter', include=['a', 'b'], links=[['a', 'b']]).prune()
    for inputs in (batch, (batch,)):
        small = compact(net, inputs)
        assert (small.a.out_features, small.head.in_features, small.head.out_features) == (8, 8, 3)
    ds = [({'x': batch['x'][i], 'y': batch['y'][i]}, torch.tensor(i % 3)) for i in range(4)]
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=4), net, loss_func=CrossEntropyLossFlat())
    assert learn.compact().a.out_features == 8

def test_compact_says_why_channels_stay(x):
    "Zero channels that cannot go are named with the reason: once in a warning, in `compact_notes` and in `compact_report`"
    rn = with_stats(resnet18())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        Sparsifier(rn, 0.5, 'filter', include=['conv1', 'layer1.*', 'fc']).prune() # no links; the classifier named: its rows pruned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        small = compact(rn, x[:2])
    msgs = [str(w.message) for w in caught if '`compact`' in str(w.message)]
    assert len(msgs) == 1 and '`conv1`' in msgs[0]
    notes = small.compact_notes
    assert 'links=coupled' in notes['conv1'] and '`layer1.0.conv2`' in notes['conv1']
    assert "model's outputs" in notes['fc'] and small.fc.out_features == 10
    assert 'layer1.0.conv1' not in notes and small.layer1[0].conv1.out_channels == 32 # it shrank: nothing to explain
    rep = compact_report(rn, small).set_index('name')
    assert 'links=coupled' in rep.loc['conv1', 'how'] and "model's outputs" in rep.loc['fc', 'how']
