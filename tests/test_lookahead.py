"Lookahead pruning: exact scores against hand and brute-force computations, graph vs chain mode, and use with the engine."
import itertools, warnings
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, strategies as st

from fasterprune.criteria import Layer, get_criterion
from fasterprune.graph import ModelGraph
from fasterprune.criteria import LookaheadCriterion, lookahead, lookahead_bn
from fasterprune.lookahead import lookahead_factors, in_sq, out_sq
from fasterprune.sparsifier import Sparsifier

torch.set_num_threads(1)

def scores(model, crit=lookahead, names=None, graph=None):
    "Lookahead scores of the Linear/Conv layers of `model`, by name"
    g = graph or ModelGraph(model)
    names = names or g.chain
    return {n: crit.score(Layer(n, g.modules[n], graph=g)) for n in names}

def randomize_bns(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + .5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + .5)
    return model.eval()

# ------------------------------------------------------------------ the test vector of algorithms.md §2.7

def fc_vector():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                        nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3, 2], [.2, .1]]))
        net[2].weight.copy_(torch.tensor([[1, -1.2], [2, .5]]))
        net[4].weight.copy_(torch.tensor([[2, 1.5]]))
    return net

@pytest.mark.parametrize('crit', [lookahead, LookaheadCriterion(mode='chain'), lookahead_bn])
def test_fc_vector(crit):
    s = scores(fc_vector(), crit)
    torch.testing.assert_close(s['0'], torch.tensor([[6.7082, 4.4721], [0.26, 0.13]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(s['2'], torch.tensor([[7.2111, 0.5367], [10.8167, 0.1677]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(s['4'], torch.tensor([[3.1241, 3.0923]]), atol=1e-4, rtol=0)

def test_fc_vector_pruning():
    def kept(crit):
        net = fc_vector()
        Sparsifier(net, 0.5, criterion=crit, include='2').prune()
        return {tuple(i) for i in (net[2].weight != 0).nonzero().tolist()}
    assert kept('lookahead') == {(0, 0), (1, 0)}
    assert kept('large_final') == {(1, 0), (0, 1)}

def test_names_and_repr():
    assert get_criterion('lookahead') is lookahead and get_criterion('lookahead_bn') is lookahead_bn
    assert repr(LookaheadCriterion(mode='chain', bn=True)) == "lookahead_bn(mode='chain')"
    with pytest.raises(ValueError, match="one of"): LookaheadCriterion(mode='dag')

# ------------------------------------------------------------------ brute force on linear chains

def brute_force(Ws, i):
    "‖W_{i+1} W_i W_{i-1} − same with W_i[j,k] zeroed‖_F for every (j, k); missing neighbours are identities"
    W = Ws[i].double()
    prev = Ws[i - 1].double() if i > 0 else torch.eye(W.shape[1], dtype=torch.float64)
    nxt = Ws[i + 1].double() if i + 1 < len(Ws) else torch.eye(W.shape[0], dtype=torch.float64)
    base = nxt @ W @ prev
    out = torch.empty_like(W)
    for j, k in itertools.product(range(W.shape[0]), range(W.shape[1])):
        W2 = W.clone(); W2[j, k] = 0
        out[j, k] = torch.linalg.matrix_norm(base - nxt @ W2 @ prev)
    return out

@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_brute_force_linear_chain(sizes, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for l in net: l.weight.mul_((torch.rand_like(l.weight) > .3).float()) # some weights already pruned
    s = scores(net)
    Ws = [l.weight.detach() for l in net]
    for i in range(len(Ws)):
        torch.testing.assert_close(s[str(i)].double(), brute_force(Ws, i), rtol=1e-5, atol=1e-6)

# ------------------------------------------------------------------ 1x1 convs, flatten, chain vs graph

def test_1x1_convs_score_like_mlp():
    torch.manual_seed(0)
    sizes = [6, 5, 7, 4, 3]
    mlp = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU())][:-2])
    conv = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Conv2d(a, b, 1), nn.BatchNorm2d(b), nn.ReLU())][:-2])
    randomize_bns(mlp)
    conv.load_state_dict({k: v.reshape(v.shape + (1, 1)) if k.endswith('weight') and v.dim() == 2 else v
                          for k, v in mlp.state_dict().items()})
    conv.eval()
    for crit in (lookahead, lookahead_bn):
        sm, sc = scores(mlp, crit), scores(conv, crit)
        assert list(sm) == list(sc)
        for n in sm: torch.testing.assert_close(sc[n][:, :, 0, 0], sm[n], rtol=1e-6, atol=0)

class FlatNet(nn.Module):
    "conv (C=3 channels of 2x2) -> flatten (P=4 features per channel) -> Linear -> Linear"
    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.bn = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3)
        self.fc1, self.fc2 = nn.Linear(12, 6), nn.Linear(6, 2)
    def forward(self, x): return self.fc2(torch.relu(self.fc1(torch.flatten(F.relu(self.bn(self.c1(self.c0(x)))), 1))))

def test_flatten_scores_like_per_feature_expansion():
    torch.manual_seed(1)
    net = randomize_bns(FlatNet())
    for crit in (lookahead, lookahead_bn):
        s = scores(net, crit)
        d = (net.bn.weight / (net.bn.running_var + net.bn.eps).sqrt()).detach() if crit.bn else torch.ones(3)
        Wc0, Wc1, W1, W2 = (m.weight.detach() for m in (net.c0, net.c1, net.fc1, net.fc2))
        P = 4
        # fc1: feature f is its own input; written by filter f // P of c1, through the BatchNorm's channel f // P
        prev = torch.stack([d[f // P] * Wc1[f // P].norm() for f in range(12)])
        nxt = torch.stack([W2[:, j].norm() for j in range(6)])
        torch.testing.assert_close(s['fc1'], W1.abs() * nxt[:, None] * prev[None, :], rtol=1e-5, atol=0)
        # c1: channel c is read as features cP .. cP+P-1 of fc1
        nxt = torch.stack([d[c] * sum(W1[:, f].square().sum() for f in range(c * P, c * P + P)).sqrt() for c in range(3)])
        prev = torch.stack([Wc0[k].norm() for k in range(5)])
        torch.testing.assert_close(s['c1'], Wc1.abs() * (nxt[:, None] * prev[None, :])[..., None, None], rtol=1e-5, atol=0)

def vgg_like():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))

@pytest.mark.parametrize('bn', [False, True])
def test_chain_and_graph_agree_on_vgg(bn):
    torch.manual_seed(2)
    net = randomize_bns(vgg_like())
    g = ModelGraph(net)
    sg, sc = scores(net, LookaheadCriterion(bn=bn), graph=g), scores(net, LookaheadCriterion(mode='chain', bn=bn), graph=g)
    for n in sg: torch.testing.assert_close(sg[n], sc[n], rtol=1e-6, atol=0)

def test_concat_pool_head():
    "fastai's AdaptiveConcatPool2d: feature f of the head's Linear reads channel f mod C, through BatchNorm1d feature f"
    from fastai.vision.learner import create_head
    torch.manual_seed(3)
    net = randomize_bns(nn.Sequential(nn.Conv2d(3, 8, 3), create_head(8, 4, lin_ftrs=[5])))
    s = scores(net, lookahead_bn)
    bn = net[1][2]
    d = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    Wc, W = net[0].weight.detach(), net[1][4].weight.detach()
    prev = torch.stack([d[f] * Wc[f % 8].norm() for f in range(16)])
    nxt_lin = lookahead_factors(Layer('1.4', net[1][4], graph=ModelGraph(net)), lookahead_bn.uses(
        Layer('1.4', net[1][4], graph=ModelGraph(net))), bn=True)[0][1]
    torch.testing.assert_close(s['1.4'], W.abs() * nxt_lin[:, None] * prev[None, :], rtol=1e-5, atol=0)
    nxt = torch.stack([(d[c] ** 2 * W[:, c].square().sum() + d[c + 8] ** 2 * W[:, c + 8].square().sum()).sqrt() for c in range(8)])
    torch.testing.assert_close(s['0'], Wc.abs() * nxt[:, None, None, None], rtol=1e-5, atol=0)

def test_concatenation_shifts_channels():
    class CatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(6, 5, 1)
        def forward(self, x): return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))
    torch.manual_seed(4)
    net = CatNet()
    s = scores(net)
    Wa, Wb, Wc = (m.weight.detach() for m in (net.a, net.b, net.c))
    prev = torch.cat([Wa.flatten(1).norm(dim=1), Wb.flatten(1).norm(dim=1)])
    torch.testing.assert_close(s['c'], Wc.abs() * prev[None, :, None, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(s['b'], Wb.abs() * Wc[:, 4:].flatten(1).norm(dim=0)[:, None, None, None], rtol=1e-6, atol=0)

# ------------------------------------------------------------------ residual networks

class ResNet(nn.Module):
    "stem -> block with an identity skip -> head conv; and a second block traced from the model's input"
    def __init__(self, stem=True):
        super().__init__()
        self.stem = stem
        if stem: self.s = nn.Conv2d(3, 4, 3, padding=1)
        C = 4 if stem else 3
        self.c1, self.bn1, self.c2, self.bn2 = nn.Conv2d(C, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Conv2d(5, C, 3, padding=1), nn.BatchNorm2d(C)
        self.out = nn.Conv2d(C, 2, 1)
    def forward(self, x):
        if self.stem: x = F.relu(self.s(x))
        y = F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.out(y)

def rows(W): return W.flatten(1).square().sum(1) # squared norm per output channel
def cols(W): return W.transpose(0, 1).flatten(1).square().sum(1) # per input channel

@pytest.mark.parametrize('bn', [False, True])
def test_residual_uses_the_skip(bn):
    torch.manual_seed(5)
    net = randomize_bns(ResNet())
    g = ModelGraph(net)
    assert sorted(l.layer for l in g.producers('out')) == ['c2', 's'] and sorted(l.layer for l in g.consumers('s')) == ['c1', 'out']
    s = scores(net, LookaheadCriterion(bn=bn), graph=g)
    Ws, W1, W2, Wo = (m.weight.detach() for m in (net.s, net.c1, net.c2, net.out))
    d2 = (net.bn2.weight / (net.bn2.running_var + net.bn2.eps).sqrt()).detach() ** 2 if bn else torch.ones(4)
    d1 = (net.bn1.weight / (net.bn1.running_var + net.bn1.eps).sqrt()).detach() ** 2 if bn else torch.ones(5)
    # out reads the sum c2 (through bn2) + s (through the skip)
    torch.testing.assert_close(s['out'], Wo.abs() * (d2 * rows(W2) + rows(Ws)).sqrt()[None, :, None, None], rtol=1e-5, atol=0)
    # s is read by c1 and, through the skip, by out
    torch.testing.assert_close(s['s'], Ws.abs() * (cols(W1) + cols(Wo)).sqrt()[:, None, None, None], rtol=1e-5, atol=0)
    # c2 is read by out only, through bn2; it reads c1 through bn1
    f = (d2 * cols(Wo)).sqrt()[:, None] * (d1 * rows(W1)).sqrt()[None, :]
    torch.testing.assert_close(s['c2'], W2.abs() * f[..., None, None], rtol=1e-5, atol=0)

def test_identity_skip_contributes_one():
    torch.manual_seed(6)
    net = ResNet(stem=False)
    s = scores(net)
    W2, Wo, W1 = net.c2.weight.detach(), net.out.weight.detach(), net.c1.weight.detach()
    torch.testing.assert_close(s['out'], Wo.abs() * (rows(W2) + 1).sqrt()[None, :, None, None], rtol=1e-5, atol=0)
    torch.testing.assert_close(s['c1'], W1.abs() * cols(net.c2.weight.detach()).sqrt()[:, None, None, None], rtol=1e-5, atol=0)

def test_resnet18_bn_binding():
    "lookahead_bn scales a conv's consumers by the BatchNorm that really follows it, also next to a projection shortcut"
    import torchvision
    rn = torchvision.models.resnet18().eval()
    with torch.no_grad(): rn.layer2[0].bn2.weight.fill_(3.); rn.layer2[0].downsample[1].weight.fill_(.5)
    g = ModelGraph(rn)
    for name, gain in (('layer2.0.conv2', 3.), ('layer2.0.downsample.0', .5)):
        l = Layer(name, g.modules[name], graph=g)
        torch.testing.assert_close(lookahead_bn.score(l), gain / (1 + 1e-5) ** .5 * lookahead.score(l), rtol=1e-5, atol=0)

# ------------------------------------------------------------------ grouped convs

def brute_prev_next(Wp, W, Wn, g, gn):
    "Factors of every weight of a conv with `g` groups between convs with weights Wp (dense) and Wn (`gn` groups), by loops"
    C_out, cin_g = W.shape[:2]
    prev, nxt = torch.zeros(W.shape[:2]), torch.zeros(C_out)
    for j, k in itertools.product(range(C_out), range(cin_g)):
        c = (j // (C_out // g)) * cin_g + k # the input channel W[j, k] reads
        prev[j, k] = Wp[c].norm()
    Co2, ci2 = Wn.shape[:2]
    for o, k in itertools.product(range(Co2), range(ci2)):
        c = (o // (Co2 // gn)) * ci2 + k # the input channel Wn[o, k] reads
        nxt[c] += Wn[o, k].square().sum()
    return prev, nxt.sqrt()

@pytest.mark.parametrize('g,gn', [(1, 1), (2, 1), (4, 2), (8, 8), (2, 4)])
def test_grouped_convs_match_brute_force(g, gn):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=g), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=gn))
    s = scores(net)
    prev, nxt = brute_prev_next(net[0].weight.detach(), net[2].weight.detach(), net[4].weight.detach(), g, gn)
    torch.testing.assert_close(s['2'], net[2].weight.detach().abs() * (nxt[:, None] * prev)[..., None, None], rtol=1e-5, atol=0)

def test_grouped_norms_by_loops():
    torch.manual_seed(8)
    for m in (nn.Conv2d(6, 4, 3, groups=2), nn.Conv1d(6, 6, 3, groups=3), nn.ConvTranspose2d(6, 4, 3, groups=2)):
        W = m.weight.detach()
        T = isinstance(m, nn.ConvTranspose2d)
        ins, outs = torch.zeros(m.in_channels), torch.zeros(m.out_channels)
        for a, b in itertools.product(range(W.shape[0]), range(W.shape[1])):
            rows_g, cols_g = W.shape[0] // m.groups, W.shape[1]
            i, o = (a, (a // rows_g) * cols_g + b) if T else ((a // rows_g) * cols_g + b, a)
            ins[i] += W[a, b].square().sum(); outs[o] += W[a, b].square().sum()
        torch.testing.assert_close(in_sq(m), ins, rtol=1e-5, atol=0)
        torch.testing.assert_close(out_sq(m), outs, rtol=1e-5, atol=0)

# ------------------------------------------------------------------ fallbacks, scopes, granularities

class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    def forward(self, x): return self.c(F.relu(self.b(F.relu(self.a(x))))) if x.sum() > -1e9 else x

@pytest.mark.parametrize('sample', [None, torch.randn(2, 4)])
def test_untraceable_model_falls_back_to_chain(sample):
    torch.manual_seed(9)
    net = Dynamic()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        sp = Sparsifier(net, 0.5, criterion=lookahead, sample_input=sample)
        s = {l.name: lookahead.score(l) for l in sp.layers}
        ref = scores(nn.Sequential(net.a, nn.ReLU(), net.b, nn.ReLU(), net.c))
        sp.prune()
    msgs = [str(x.message) for x in w if 'lookahead' in str(x.message)]
    assert msgs and 'could not trace' in msgs[0] and 'chain mode' in msgs[0]
    for n, r in zip('abc', ('0', '2', '4')): torch.testing.assert_close(s[n], ref[r])
    assert sp.sparsity_achieved() == pytest.approx(0.5, abs=0.01)

def test_layer_outside_the_traced_graph():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)
        def forward(self, x): return self.fc(self.att(x, x, x)[0])
    net = Att()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = scores(net, names=['att.out_proj', 'fc'])
    assert any('not called in the traced graph' in str(x.message) for x in w)
    torch.testing.assert_close(s['att.out_proj'], net.att.out_proj.weight.detach().abs())

def test_global_normalisation_ranks_like_reference():
    "The reference divides squared scores by their L2 norm before one global ranking"
    gen = torch.Generator().manual_seed(10)
    s = [torch.rand(50, generator=gen) * 10, torch.rand(30, generator=gen)]
    ours = torch.cat(lookahead.normalize(s, 'global')).argsort()
    ref = torch.cat([x.square() / x.square().norm() for x in s]).argsort()
    assert torch.equal(ours, ref)
    assert lookahead.normalize(s, 'local') is s
    big, zero = torch.tensor([1e12, 3e12]), torch.zeros(3)
    torch.testing.assert_close(lookahead.normalize([big], 'global')[0], big / (big.double() ** 4).sum().pow(.25).float())
    assert torch.equal(lookahead.normalize([zero], 'global')[0], zero)

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.dw, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4, 8)
    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = x + self.c3(self.dw(F.relu(self.c2(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))

@pytest.mark.parametrize('granularity,scope', list(itertools.product(['weight', 'kernel', 'filter', 'channel', '2:4'], ['local', 'global'])))
@pytest.mark.parametrize('crit', [lookahead, lookahead_bn])
def test_every_granularity_and_scope(granularity, scope, crit):
    torch.manual_seed(11)
    net = Small()
    exclude = {'2:4': ['c1', 'dw'], 'kernel': ['fc']}.get(granularity) # no blocks of 4 in 3 or 1 input channels; Linear has no kernels
    sp = Sparsifier(net, 0.5, granularity=granularity, criterion=crit, scope=scope, exclude=exclude).prune()
    if granularity == '2:4': assert sp.sparsity_achieved() == 0.5
    else: # half of the groups (a global ranking may take more small groups than large ones)
        masks = [sp.masks[l.name] for l in sp.layers]
        assert sum(int((~m).sum()) for m in masks) == round(0.5 * sum(m.numel() for m in masks))
    assert torch.isfinite(net(torch.randn(2, 3, 8, 8))).all()

def test_caching_gives_the_same_scores():
    import torchvision
    m = torchvision.models.resnet18()
    g = ModelGraph(m)
    layers = [Layer(n, g.modules[n], graph=g) for n in g.chain]
    plain = [lookahead.score(l) for l in layers]
    with g.caching(): cached = [lookahead.score(l) for l in layers]
    for a, b in zip(plain, cached): assert torch.equal(a, b)
    assert g.cache is None

def test_sparsify_callback():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fasterprune.callback import SparsifyCallback
    torch.manual_seed(12)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 8, (64,))
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds, ds, bs=16, device='cpu')
    learn = Learner(dls, Small(), loss_func=nn.CrossEntropyLoss(), cbs=SparsifyCallback(0.6, criterion=lookahead_bn))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    sp = learn.sparsify.sparsifier
    assert sp.sparsity_achieved() == pytest.approx(0.6, abs=0.01)

def test_walk_failure_falls_back_to_chain(monkeypatch):
    "Should the channel walk fail on some graph, scoring goes on in chain mode, with a warning"
    def boom(self): raise RuntimeError('unexpected node')
    monkeypatch.setattr(ModelGraph, '_index_channels', boom)
    net = fc_vector()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = scores(net)
    assert any('unexpected node' in str(x.message) and 'chain mode' in str(x.message) for x in w)
    torch.testing.assert_close(s['2'], torch.tensor([[7.2111, 0.5367], [10.8167, 0.1677]]), atol=1e-4, rtol=0)

def test_view_flatten_forms():
    "x.view(x.size(0), -1) and x.view(-1, n) are flattens too"
    class Lenet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.f = nn.Conv2d(1, 2, 3), nn.Linear(2 * 2 * 2, 3)
        def forward(self, x): y = F.max_pool2d(self.c(x), 2); return self.f(y.view(-1, 8)) + self.f(y.view(y.size(0), -1))
    g = ModelGraph(Lenet())
    assert [(l.layer, l.there.tolist()) for l in g.producers('f')] == [('c', [0, 0, 0, 0, 1, 1, 1, 1])] * 2


def test_lookahead_refuses_layers_stored_in_another_layout():
    "Hugging Face's Conv1D stores its weight (in, out): lookahead's norms would be taken along the wrong axis, so it refuses, naming the layer"
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 50, (2, 8))
    for crit in ('lookahead', 'lookahead_bn'):
        with pytest.raises(ValueError, match=r"`transformer\.h\.0\.attn\.c_attn` \(Conv1D, weight \[32, 96\]\)"):
            Sparsifier(m, 0.5, criterion=crit, sample_input=ids)
    # a Linear whose neighbours are Conv1D layers is refused too: their norms feed its score
    with pytest.raises(ValueError, match='Conv1D'): Sparsifier(m, 0.5, criterion='lookahead', include=['lm_head'], sample_input=ids)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Sparsifier(m, 0.5, criterion='large_final').prune() # magnitude knows the layout
    c_fc = m.transformer.h[0].mlp.c_fc.weight
    assert (c_fc == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3) and not torch.equal(c_fc, before['transformer.h.0.mlp.c_fc.weight'])
