"""Attention-head pruning (`granularity='head'`, issue 18): per implementation (nn.MultiheadAttention in nn.TransformerEncoder
and torchvision's ViT, timm's ViT, Hugging Face GPT-2, BERT and Llama with grouped-query attention), exact counts per
attention, what a pruned head group zeroes and what a kept one leaves alone, masks after an update, `reduce`, the fastai
callback, resume, and bad input."""
import copy, math, warnings
from pathlib import Path
from functools import partial

import pytest
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.sparsifier import Sparsifier
from fasterprune.attention import attention_heads
from fasterprune.callback import SparsifyCallback
from fasterprune.demo import digits_dls
from fasterprune.criteria import LargeFinal

torch.set_num_threads(1)

def _hf(): # tiny random Hugging Face models, special tokens inside the vocabulary
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel
    from transformers.utils import logging; logging.set_verbosity_error()
    return dict(
        gpt2=lambda: GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        bert=lambda: BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                          vocab_size=50, max_position_embeddings=16, pad_token_id=0)),
        llama=lambda: LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                             intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0)))

def _timm():
    import timm
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=32, num_heads=4, depth=2, num_classes=10)

def _tv():
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)

IMPLS = ['torch', 'torchvision', 'timm', 'gpt2', 'bert', 'llama']

def build(impl, seed=0):
    "(model, input) of a tiny random model of implementation `impl`"
    torch.manual_seed(seed)
    if impl == 'torch':
        m = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
        with torch.no_grad(): # PyTorch starts the q, k, v bias at zero: give it values, so that the test sees them zeroed
            for l in m.layers: l.self_attn.in_proj_bias.normal_()
        return m.eval(), torch.randn(2, 5, 32)
    if impl == 'torchvision': return _tv().eval(), torch.randn(2, 3, 32, 32)
    if impl == 'timm': return _timm().eval(), torch.randn(2, 3, 32, 32)
    m = _hf()[impl]().eval()
    return m, torch.randint(3, 50, (2, 7))

def out(m, x):
    with torch.no_grad(): o = m(x)
    return o if isinstance(o, torch.Tensor) else o.last_hidden_state

def pruned_groups(lay):
    "The groups of `lay` whose o columns are all zero"
    o = next(p for p in lay.projs if p.role == 'o')
    return [g for g in range(lay.n_groups) if bool((o.w.index_select(o.dim, lay.units(o, g)) == 0).all())]

def group_tensors(lay, g):
    "Every q, k, v, o weight entry and q, k, v bias entry of group `g` of `lay`, flat"
    ts = []
    for p in lay.projs:
        idx = lay.units(p, g)
        ts.append(p.w.detach().index_select(p.dim, idx).reshape(-1))
        if p.b is not None: ts.append(p.b.detach()[idx])
    if lay.kind == 'torch' and lay.module.in_proj_bias is not None and lay.module.in_proj_weight is None:
        E = lay.module.embed_dim
        ts += [lay.module.in_proj_bias.detach()[i * E + lay.units(lay.projs[0], g)] for i in range(3)]
    return torch.cat(ts)

def expected(s, G): return min(round(s * G), G - 1) # the engine's count, and each attention keeps a group

# ---------------------------------------------------------------- counts and what is zeroed

@pytest.mark.parametrize('impl', IMPLS)
def test_local_counts_and_zeros(impl):
    m, x = build(impl)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lays = attention_heads(m)
    assert len(lays) == 2
    for s in (0.25, 0.5, 0.75, 1.0):
        sp = Sparsifier(m, s, 'head').prune()
        for lay in lays:
            gone = pruned_groups(lay)
            assert len(gone) == expected(s, lay.n_groups), (impl, s, lay.name)
            for g in range(lay.n_groups):
                t = group_tensors(lay, g)
                assert bool((t == 0).all()) == (g in gone)
        # the masks say the same: one mask per weight of an attention, identical over its weights
        for u in sp.units: assert len({tuple(sp.masks[l.name].reshape(-1).tolist()) for l in u}) == 1
        m.load_state_dict(before)
    # kept groups and every other parameter are untouched
    Sparsifier(m, 0.5, 'head').prune()
    names = {p.layer for lay in lays for p in lay.projs}
    for lay in lays:
        ref = copy.deepcopy(m); ref.load_state_dict(before)
        rl = {l.name: l for l in attention_heads(ref)}[lay.name]
        for g in set(range(lay.n_groups)) - set(pruned_groups(lay)): assert torch.equal(group_tensors(lay, g), group_tensors(rl, g))
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(k.startswith(n) or k.startswith(n.rpartition('.')[0] + '.in_proj_bias') for n in names) for k in changed), changed

@pytest.mark.parametrize('impl', IMPLS)
def test_output_is_the_heads_contribution_removed(impl):
    "Pruning a head group removes its contribution and nothing else: the output equals the dense model's with only those heads' o columns zeroed"
    m, x = build(impl)
    ref = copy.deepcopy(m)
    Sparsifier(m, 0.5, 'head').prune()
    for lay, rl in zip(attention_heads(m), attention_heads(ref)):
        o = next(p for p in rl.projs if p.role == 'o')
        with torch.no_grad(): o.w.index_fill_(o.dim, lay.units(o, pruned_groups(lay)), 0.)
    torch.testing.assert_close(out(m, x), out(ref, x), atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize('impl', ['torch', 'timm', 'llama'])
def test_global_scope(impl):
    m, x = build(impl)
    lays = attention_heads(m)
    G = sum(l.n_groups for l in lays)
    for s in (0.3, 0.5, 0.9):
        sp = Sparsifier(m, s, 'head', scope='global').prune()
        gone = [len(pruned_groups(l)) for l in lays]
        assert sum(gone) == min(round(s * G), sum(l.n_groups - 1 for l in lays)) and all(g < l.n_groups for g, l in zip(gone, lays))
        assert sp.sparsity_achieved() == pytest.approx(sum(gone) / G)

@pytest.mark.parametrize('how', ['mean', 'sum', 'l2', 'max'])
def test_reduce_scores_a_group_over_all_its_weights(how):
    "A group's score is `reduce` over the |W| of all its q, k, v rows and o columns together, not a sum of per-weight reductions (GQA: parts of unequal sizes)"
    m, x = build('llama')
    with torch.no_grad(): # group 0: small q and o, large k and v (one large q entry for 'max'); group 1: medium everywhere
        for lay in attention_heads(m):
            for p in lay.projs:
                p.w.index_fill_(p.dim, lay.units(p, 0), 0.01 if how == 'max' else 1. if p.role in 'kv' else 0.1)
                p.w.index_fill_(p.dim, lay.units(p, 1), 0.3 if how == 'max' else 0.45)
            if how == 'max': lay.projs[0].w[0, 0] = 1.
    want = {}
    for lay in attention_heads(m):
        sc = []
        for g in range(lay.n_groups):
            w = torch.cat([p.w.detach().index_select(p.dim, lay.units(p, g)).reshape(-1) for p in lay.projs]).abs()
            sc.append(dict(mean=w.mean(), sum=w.sum(), l2=w.norm(), max=w.max())[how])
        want[lay.name] = [int(torch.stack(sc).argmin())]
    assert want['layers.0.self_attn'] == [0 if how in ('mean', 'sum') else 1] # where a sum of per-weight reductions ranks the other way
    Sparsifier(m, 0.5, 'head', reduce=how).prune()
    assert {l.name: pruned_groups(l) for l in attention_heads(m)} == want

def test_masks_survive_updates_and_gradients():
    m, x = build('gpt2')
    m.train()
    sp = Sparsifier(m, 0.5, 'head').prune()
    lays = attention_heads(m)
    gone = {l.name: pruned_groups(l) for l in lays}
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p))
    sp.apply()
    assert {l.name: pruned_groups(l) for l in lays} == gone
    for l in lays:
        for g in range(l.n_groups): assert bool((group_tensors(l, g) == 0).all()) == (g in gone[l.name])
    m(x).last_hidden_state.square().mean().backward()
    sp.mask_grads()
    for l in lays:
        for p in l.projs:
            idx = l.units(p, gone[l.name])
            assert bool((p.w.grad.index_select(p.dim, idx) == 0).all())
            if p.b is not None: assert bool((p.b.grad[idx] == 0).all())
            assert p.w.grad.abs().sum() > 0

def test_gradient_criterion_and_state_dict_round_trip():
    m, x = build('bert')
    m.train()
    sp = Sparsifier(m, 0.5, 'head', criterion='taylor')
    m(x).last_hidden_state.square().mean().backward()
    sp.accumulate(); sp.prune()
    sd = sp.state_dict()
    m2, _ = build('bert'); m2.load_state_dict(m.state_dict())
    sp2 = Sparsifier(m2, 0.5, 'head', criterion='taylor').load_state_dict(sd)
    for k in sp.masks: assert torch.equal(sp.masks[k], sp2.masks[k])

# ---------------------------------------------------------------- selection and options

def test_include_exclude_and_layer_sparsity():
    m, x = build('llama')
    sp = Sparsifier(m, 0.5, 'head', include='layers.0.self_attn')
    assert [l.name for l in sp.layers] == [f'layers.0.self_attn.{r}_proj' for r in 'qkvo']
    sp = Sparsifier(m, 0.5, 'head', exclude='layers.0.self_attn.k_proj') # a weight's name selects its attention
    assert [l.name for l in sp.layers] == [f'layers.1.self_attn.{r}_proj' for r in 'qkvo']
    assert sp.left_out['layers.0.self_attn.q_proj'] == 'excluded' and 'attention heads only' in sp.left_out['layers.0.mlp.up_proj']
    m, x = build('torch')
    assert len(Sparsifier(m, 0.5, 'head', include=nn.MultiheadAttention).layers) == 4 # by the attention module's type
    sp = Sparsifier(m, 0.5, 'head', include=lambda n, mod: n.startswith('layers.1')) # a predicate sees each attention module
    assert [l.name for l in sp.layers] == ['layers.1.self_attn.in_proj_weight', 'layers.1.self_attn.out_proj']
    with pytest.raises(ValueError, match=r"`include`: the predicate .* raised ZeroDivisionError on attention `layers.0.self_attn`"):
        Sparsifier(m, 0.5, 'head', include=lambda n, mod: 1 / 0)
    m, x = build('timm')
    sp = Sparsifier(m, 0.5, 'head', layer_sparsity={'blocks.1.attn': 0.75}).prune()
    assert [len(pruned_groups(l)) for l in attention_heads(m)] == [2, 3]
    assert Sparsifier(m, 1.0, 'head').prune().report().groups.iloc[0] == 4 # 1.0: every attention keeps its best group
    assert [len(pruned_groups(l)) for l in attention_heads(m)] == [3, 3]

def test_bad_input():
    m, x = build('timm')
    with pytest.raises(ValueError, match=r"found no attention.*attention_readers"): Sparsifier(nn.Sequential(nn.Linear(4, 4)), 0.5, 'head')
    for crit in ('wanda', 'lookahead'):
        with pytest.raises(ValueError, match=r"cannot score attention heads"): Sparsifier(m, 0.5, 'head', criterion=crit)
    with pytest.raises(ValueError, match=r"matches no attention.*blocks.0.attn"): Sparsifier(m, 0.5, 'head', include='head.*')
    with pytest.raises(ValueError, match=r"leave no attention"): Sparsifier(m, 0.5, 'head', exclude='blocks.*')
    with pytest.raises(ValueError, match=r"`links`.*linked already"): Sparsifier(m, 0.5, 'head', links=[['blocks.0.attn.qkv', 'blocks.1.attn.qkv']])
    with pytest.raises(ValueError, match=r"`round_to`"): Sparsifier(m, 0.5, 'head', round_to=2)
    with pytest.raises(ValueError, match=r"`shrink`.*'head'"): SparsifyCallback(0.5, granularity='head', shrink=0.1)
    with pytest.raises(ValueError, match=r"cannot score attention heads"): SparsifyCallback(0.5, granularity='head', criterion='wanda') # at construction
    with pytest.raises(ValueError, match=r"`links`.*linked already"): SparsifyCallback(0.5, granularity='head', links=[['a', 'b']])
    with pytest.raises(ValueError, match=r"`regrow`"): SparsifyCallback(0.5, granularity='head', regrow='rigl')
    with pytest.raises(ValueError, match=r"'head'"): Sparsifier(m, 0.5, 'heads') # a typo: the message names 'head'
    with warnings.catch_warnings():
        warnings.simplefilter('error') # no per-layer "left dense" warning for the MLPs and the classifier
        Sparsifier(m, 0.5, 'head')

# ---------------------------------------------------------------- fastai

def vit(seed=0):
    import timm
    set_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=8, patch_size=2, in_chans=1, embed_dim=32,
                             num_heads=4, depth=2, num_classes=10)

@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=128, shuffle=False)

def mk(dls, path, cbs=None, seed=0):
    return Learner(dls, vit(seed), loss_func=CrossEntropyLossFlat(), path=path, cbs=cbs, opt_func=Adam)

def quiet_fit(learn, n, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n, 3e-3, **kw)
    return learn

def test_callback_reaches_target_and_resumes(dls, tmp_path):
    full = mk(dls, tmp_path, cbs=SparsifyCallback(0.5, granularity='head'))
    quiet_fit(full, 2, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    assert [len(pruned_groups(l)) for l in attention_heads(full.model)] == [2, 2]
    assert full.sparsify.column == 'sparsity (heads)' and full.sparsify.sparsifier.sparsity_achieved() == 0.5
    for l in attention_heads(full.model):
        for g in pruned_groups(l): assert bool((group_tensors(l, g) == 0).all())
    resumed = mk(dls, tmp_path, cbs=SparsifyCallback(0.5, granularity='head'), seed=1).load('ckpt_0', with_opt=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        quiet_fit(resumed, 2, start_epoch=1)
    a, b = full.sparsify.sparsifier, resumed.sparsify.sparsifier
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.counts == b.counts
    for k, v in full.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k

def test_multihead_attention_with_separate_qkv_weights():
    "nn.MultiheadAttention with kdim/vdim: three q, k, v weights, one packed bias; the model is the attention itself"
    torch.manual_seed(0)
    m = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True).eval()
    with torch.no_grad(): m.in_proj_bias.normal_()
    ref = copy.deepcopy(m)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 6, 16)
    sp = Sparsifier(m, 0.5, 'head').prune()
    assert [l.name for l in sp.layers] == ['q_proj_weight', 'k_proj_weight', 'v_proj_weight', 'out_proj']
    lay, = attention_heads(m)
    gone = pruned_groups(lay)
    assert len(gone) == 2 and all(bool((group_tensors(lay, g) == 0).all()) == (g in gone) for g in range(4))
    with torch.no_grad(): ref.out_proj.weight[:, lay.units(lay.projs[-1], gone)] = 0
    torch.testing.assert_close(m(q, kv, kv)[0], ref(q, kv, kv)[0], atol=1e-5, rtol=1e-4)

def test_callback_selects_attention_by_name(dls):
    "`include` naming an attention module works through the callback (its layer layout included), and the report names the rest"
    learn = quiet_fit(mk(dls, '.', cbs=SparsifyCallback(0.75, granularity='head', include='blocks.1.attn')), 1)
    assert [len(pruned_groups(l)) for l in attention_heads(learn.model)] == [0, 3]
    rep = learn.sparsify.report()
    assert list(rep.name[:2]) == ['blocks.1.attn.qkv', 'blocks.1.attn.proj'] and list(rep.pruned[:2]) == [3, 3]
    learn.sparsify.build() # the layout check sees the same layers: no rebuild
    assert learn.sparsify._built_on_model_now()

@pytest.mark.parametrize('crit', ['random', 'movement', 'taylor', 'lamp'])
def test_other_criteria_and_scopes(crit):
    m, x = build('llama'); m.train()
    for scope in ('local', 'global', 'erk'):
        sp = Sparsifier(m, 0.5, 'head', criterion=crit, scope=scope)
        if sp.criterion.needs_grad:
            m(x).last_hidden_state.square().mean().backward(); sp.accumulate(); m.zero_grad()
        sp.prune()
        gone = [len(pruned_groups(l)) for l in attention_heads(m)]
        assert sum(gone) == 2 and (scope != 'local' or gone == [1, 1]), (scope, gone)
        m, x = build('llama'); m.train()

def test_optimizer_state_of_pruned_heads_is_zeroed():
    m, x = build('timm'); m.train()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    m(x).square().mean().backward(); opt.step()
    sp = Sparsifier(m, 0.5, 'head').prune()
    sp.clean_state(opt)
    for lay in attention_heads(m):
        g = pruned_groups(lay)
        for p in lay.projs:
            for st in (opt.state[p.w]['exp_avg'], opt.state[p.w]['exp_avg_sq']):
                assert bool((st.index_select(p.dim, lay.units(p, g)) == 0).all()) and st.abs().sum() > 0
            if p.b is not None: assert bool((opt.state[p.b]['exp_avg'][lay.units(p, g)] == 0).all())

# ---------------------------------------------------------------- torch.distributed

RANK_NOISE = '''class RankNoise(LargeFinal): # scores that differ between ranks: only the broadcast of rank 0's masks makes them agree
    def score(self, layer, state=None): return torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(rank))
    def __repr__(self): return 'rank_noise'
'''

DDP_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist
from torch import nn
from fasterprune.sparsifier import Sparsifier
from fasterprune.criteria import LargeFinal
torch.set_num_threads(1)
rank, port, out, dist_on = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == '1'
''' + RANK_NOISE + r'''if dist_on:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=2)
torch.manual_seed(0)
m = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
sp = Sparsifier(m, 0.5, 'head', criterion=RankNoise(), scope='global').prune()
torch.save(dict(masks=sp.masks, weights=m.state_dict()), f"{out}/{rank}.pt")
if dist_on: dist.destroy_process_group()
'''

def test_ddp_ranks_take_rank0s_head_masks(tmp_path):
    import os, subprocess, sys
    from test_reliability_ddp import free_port
    script = tmp_path / 'ddp_heads.py'; script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    def run(dist_on):
        port, d = str(free_port()), tmp_path / f'dist{dist_on}'; d.mkdir()
        ps = [subprocess.Popen([sys.executable, str(script), str(r), port, str(d), str(int(dist_on))], env=env, stderr=subprocess.PIPE) for r in range(2)]
        for p in ps: assert p.wait(120) == 0, p.stderr.read().decode()[-2000:]
        return [torch.load(d / f'{r}.pt') for r in range(2)]
    exec(RANK_NOISE, ns := dict(LargeFinal=LargeFinal, torch=torch)) # the script's criterion, here
    def alone(rank): # negative control: without torch.distributed the two ranks choose other heads
        ns['rank'] = rank
        torch.manual_seed(0)
        m = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
        return dict(masks=Sparsifier(m, 0.5, 'head', criterion=ns['RankNoise'](), scope='global').prune().masks)
    alone = [alone(0), alone(1)]
    assert any(not torch.equal(alone[0]['masks'][k], alone[1]['masks'][k]) for k in alone[0]['masks'])
    a, b = run(True)
    assert all(torch.equal(a['masks'][k], b['masks'][k]) for k in a['masks'])
    assert all(torch.equal(a['masks'][k], alone[0]['masks'][k]) for k in a['masks'])
    assert all(torch.equal(a['weights'][k], b['weights'][k]) for k in a['weights']) # rank 1 zeroed rank 0's heads

def test_multi_query_attention_stays_dense_and_says_so():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    m = LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
                               vocab_size=50, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with pytest.raises(ValueError, match=r"single head group.*nothing to prune"): Sparsifier(m, 0.5, 'head')
    two = nn.ModuleDict(dict(mqa=m, enc=nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1, enable_nested_tensor=False)))
    with pytest.warns(UserWarning, match=r"`mqa.layers.0.self_attn`, `mqa.layers.1.self_attn` have a single head group.*they stay dense"):
        sp = Sparsifier(two, 0.5, 'head').prune()
    assert [len(pruned_groups(l)) for l in attention_heads(two)] == [0, 0, 2]

def test_callback_warns_once_for_multi_query_attention(dls):
    "The callback's layer-layout checks do not repeat the sparsifier's single warning"
    from transformers import LlamaConfig, LlamaModel
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit()
            self.mqa = LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                              intermediate_size=64, vocab_size=50, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        def forward(self, x): return self.vit(x)
    learn = Learner(dls, Both(), loss_func=CrossEntropyLossFlat(), cbs=SparsifyCallback(0.5, granularity='head'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        learn.sparsify._built_on_model_now()
    assert len([x for x in w if 'single head group' in str(x.message)]) == 1
    assert [len(pruned_groups(l)) for l in attention_heads(learn.model)] == [2, 2, 0]

def test_gpt2_cross_attention():
    "GPT-2's cross-attention: q in its own `q_attn`, k and v packed in `c_attn`"
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    m = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0, add_cross_attention=True)).eval()
    ref = copy.deepcopy(m)
    sp = Sparsifier(m, 0.5, 'head').prune()
    assert [l.name for l in sp.layers][2:] == ['h.0.crossattention.c_attn', 'h.0.crossattention.q_attn', 'h.0.crossattention.c_proj']
    lays = attention_heads(m)
    for lay, rl in zip(lays, attention_heads(ref)):
        gone = pruned_groups(lay)
        assert len(gone) == 2 and all(bool((group_tensors(lay, g) == 0).all()) == (g in gone) for g in range(4))
        o = rl.projs[-1]
        with torch.no_grad(): o.w.index_fill_(o.dim, lay.units(o, gone), 0.)
    ids, enc = torch.randint(3, 50, (2, 7)), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, encoder_hidden_states=enc).last_hidden_state, ref(ids, encoder_hidden_states=enc).last_hidden_state)

def test_lottery_ticket_rewind_keeps_heads_pruned(dls):
    learn = quiet_fit(mk(dls, '.', cbs=SparsifyCallback(0.5, granularity='head', lth=True)), 2)
    assert [len(pruned_groups(l)) for l in attention_heads(learn.model)] == [2, 2]
    for l in attention_heads(learn.model):
        for g in pruned_groups(l): assert bool((group_tensors(l, g) == 0).all())
