"Compaction of transformers: dead attention groups and dead MLP hidden units removed, outputs unchanged, checkpoints reload"
import io, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F

pytest.importorskip('torch_pruning')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')
import torchvision
from fasterprune.attention import attention_heads
from fasterprune.compact import compact, load_compact
from fasterprune.compact_heads import mlp_blocks, dead_groups, dead_units, _unit_dim

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))

def zero_heads(lay, groups):
    "Zero groups `groups` as a head mask does: q, k, v rows and bias, output-projection columns"
    with torch.no_grad():
        for p in lay.projs:
            u = lay.units(p, groups)
            p.w.index_fill_(p.dim, u, 0)
            if p.b is not None: p.b.index_fill_(0, u, 0)

def zero_units(mlp, units):
    with torch.no_grad():
        u = torch.as_tensor(list(units))
        for w in (mlp.fc, mlp.up):
            if w is None: continue
            w.weight.index_fill_(_unit_dim(w, False), u, 0)
            if w.bias is not None: w.bias.index_fill_(0, u, 0)
        mlp.out.weight.index_fill_(_unit_dim(mlp.out, True), u, 0)

def n_params(m): return sum(p.numel() for p in m.parameters())

def out(m, x):
    with torch.no_grad(): o = m(**x) if isinstance(x, dict) else m(x)
    return getattr(o, 'logits', getattr(o, 'last_hidden_state', o))

def compact_quiet(m, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        small = compact(m, x, **kw)
    return small, [str(w.message) for w in caught if '`compact`' in str(w.message)]

def round_trip(small, fresh, x):
    buf = io.BytesIO(); torch.save(small.state_dict(), buf); buf.seek(0)
    back = load_compact(fresh, torch.load(buf)).eval()
    torch.testing.assert_close(out(back, x), out(small, x), rtol=0, atol=0)
    return back

# the models, tiny
def vit(): return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=10).eval()
GPT = dict(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1, pad_token_id=2)
def gpt2(): return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT)).eval()
def bert(): return transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                  intermediate_size=64, max_position_embeddings=16, pad_token_id=0)).eval()
LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
def llama(**kw): return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(LLAMA | kw))).eval()
def tv_vit(): return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64).eval()
def encoder(): return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()

def test_timm_vit():
    m, x = vit(), torch.randn(2, 3, 32, 32)
    for lay in attention_heads(m): zero_heads(lay, [1])
    for mlp in mlp_blocks(m): zero_units(mlp, range(100))
    small, warned = compact_quiet(m, x)
    assert not warned
    a, p = small.blocks[1].attn, small.blocks[1].mlp
    assert (a.num_heads, a.attn_dim, tuple(a.qkv.weight.shape), tuple(a.qkv.bias.shape), tuple(a.proj.weight.shape)) == (2, 128, (384, 192), (384,), (192, 128))
    assert (tuple(p.fc1.weight.shape), tuple(p.fc2.weight.shape)) == ((668, 192), (192, 668))
    assert n_params(m) - n_params(small) == 2 * ((3 * 64 * 193 + 64 * 192) + 100 * (192 + 1 + 192))
    assert small.compact_removed['blocks.0.attn'] == {'heads': 1} and small.compact_removed['blocks.0.mlp'] == {'units': 100}
    torch.testing.assert_close(out(small, x), out(m, x), rtol=0, atol=1e-4)
    back = round_trip(small, vit(), x)
    assert back.blocks[0].attn.num_heads == 2

def test_gpt2():
    m = gpt2()
    for lay in attention_heads(m): zero_heads(lay, [0, 3])
    for mlp in mlp_blocks(m): zero_units(mlp, range(0, 128, 4))
    small, warned = compact_quiet(m, {'input_ids': IDS})
    assert len(warned) == 1 and 'Torch-Pruning could not trace' in warned[0] # and said so: no silent skip
    a, p = small.transformer.h[0].attn, small.transformer.h[0].mlp
    assert (a.num_heads, a.split_size, a.c_attn.nf, tuple(a.c_attn.weight.shape), tuple(a.c_attn.bias.shape)) == (2, 16, 48, (32, 48), (48,))
    assert tuple(a.c_proj.weight.shape) == (16, 32) and a.c_proj.nf == 32
    assert (p.c_fc.nf, tuple(p.c_fc.weight.shape), tuple(p.c_proj.weight.shape), p.c_proj.nx) == (96, (32, 96), (96, 32), 96)
    assert n_params(m) - n_params(small) == 2 * (2 * (3 * 8 * 33 + 8 * 32) + 32 * (32 + 1 + 32))
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)
    back = round_trip(small, gpt2(), {'input_ids': IDS})
    assert back.transformer.h[1].attn.split_size == 16 and back.transformer.h[1].mlp.c_fc.nf == 96

def test_bert_value_rows_alone_kill_a_head():
    m = bert()
    lay = attention_heads(m)[0]
    v = next(p for p in lay.projs if p.role == 'v')
    with torch.no_grad(): v.w[8:16] = 0; v.b[8:16] = 0 # head 1's values only: its output is softmax(...) @ 0 = 0
    assert dead_groups(lay)[0].tolist() == [False, True, False, False]
    zero_heads(attention_heads(m)[1], [2, 3])
    for mlp in mlp_blocks(m): zero_units(mlp, range(10))
    small, warned = compact_quiet(m, {'input_ids': IDS})
    assert not warned
    s0, s1 = small.encoder.layer[0].attention, small.encoder.layer[1].attention
    assert (s0.self.num_attention_heads, s0.self.all_head_size, s0.self.query.out_features, s0.output.dense.in_features) == (3, 24, 24, 24)
    assert (s1.self.num_attention_heads, s1.self.key.out_features) == (2, 16)
    assert small.encoder.layer[0].intermediate.dense.out_features == 54
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)
    round_trip(small, bert(), {'input_ids': IDS})

def test_llama_gqa():
    m = llama()
    for lay in attention_heads(m): zero_heads(lay, [1])
    mlps = mlp_blocks(m)
    with torch.no_grad():
        mlps[0].up.weight[:8] = 0 # a zero up row kills its unit whatever the gate
        mlps[0].fc.weight[8:12] = 0 # a zero gate row too, SiLU(0) = 0
        mlps[1].out.weight[:, :5] = 0 # units down_proj does not read
    small, warned = compact_quiet(m, {'input_ids': IDS})
    assert not warned
    a = small.model.layers[0].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (16, 8, 8, 16)
    assert a.num_key_value_groups == 2 and small.config.num_attention_heads == 4 and small.config.num_key_value_heads == 2
    assert [l.mlp.gate_proj.out_features for l in small.model.layers] == [52, 59]
    assert [l.mlp.down_proj.in_features for l in small.model.layers] == [52, 59]
    assert small.compact_removed['model.layers.0.self_attn'] == {'heads': 2, 'kv_heads': 1}
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)
    back = round_trip(small, llama(), {'input_ids': IDS})
    assert [(l.n_heads, l.n_kv_heads) for l in attention_heads(back)] == [(2, 1), (2, 1)]

def test_gqa_partial_group_stays_with_a_note():
    m = llama()
    lay = attention_heads(m)[0]
    o = next(p for p in lay.projs if p.role == 'o')
    with torch.no_grad(): o.w[:, 0:8] = 0 # query head 0 of group 0; query head 1 shares its key/value head and lives
    small, warned = compact_quiet(m, {'input_ids': IDS})
    assert small.model.layers[0].self_attn.q_proj.out_features == 32
    assert '1 of 2 query heads of group 0' in small.compact_notes['model.layers.0.self_attn']
    assert len(warned) == 1 and 'model.layers.0.self_attn' in warned[0]

def test_gate_row_needs_act_zero():
    m = llama(hidden_act='sigmoid') # sigmoid(0) = 1/2: a zero gate row leaves up(x)/2
    mlp = mlp_blocks(m)[0]
    with torch.no_grad(): mlp.fc.weight[:4] = 0
    assert not dead_units(mlp).any()
    small, _ = compact_quiet(m, {'input_ids': IDS})
    assert small.model.layers[0].mlp.gate_proj.out_features == 64

@pytest.mark.parametrize('make,x', [(tv_vit, torch.randn(2, 3, 32, 32)), (encoder, torch.randn(2, 5, 32))], ids=['torchvision', 'nn.TransformerEncoder'])
def test_multihead_attention_becomes_slim(make, x):
    m = make()
    for lay in attention_heads(m): zero_heads(lay, [2])
    mlps = mlp_blocks(m)
    assert [l.width for l in mlps] == [64, 64]
    for mlp in mlps: zero_units(mlp, range(0, 64, 2))
    small, warned = compact_quiet(m, x)
    assert [l.width for l in mlp_blocks(small)] == [32, 32]
    assert [tuple(l.fc.weight.shape) for l in mlp_blocks(small)] == [(32, 32)] * 2
    lays = attention_heads(small)
    assert [(l.kind, l.n_heads) for l in lays] == [('slim', 3)] * 2
    assert [(tuple(l.module.in_proj_weight.shape), tuple(l.module.out_proj.weight.shape), l.module.heads_kept.tolist()) for l in lays] == [((72, 32), (32, 24), [0, 1, 3])] * 2
    assert not any(l.name in small.compact_notes for l in lays)
    assert n_params(m) - n_params(small) == 2 * ((3 * 8 * 33 + 8 * 32) + 32 * (32 + 1 + 32))
    torch.testing.assert_close(out(small, x), out(m, x), rtol=0, atol=1e-4)
    round_trip(small, make(), x)
    small.train()(x).sum().backward() # it trains
    assert lays[0].module.in_proj_weight.grad is not None

def test_slim_encoder_masks():
    "A compacted nn.TransformerEncoder with padding and causal masks computes what the original does"
    m, x = encoder(), torch.randn(2, 5, 32)
    zero_heads(attention_heads(m)[0], [0, 3])
    small, _ = compact_quiet(m, x)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kw in [dict(src_key_padding_mask=pad), dict(mask=causal, is_causal=True), dict(mask=causal.isinf(), src_key_padding_mask=pad)]:
            torch.testing.assert_close(small(x, **kw), m(x, **kw), rtol=0, atol=1e-4)

def test_multihead_attention_with_key_bias_stays():
    class Net(nn.Module):
        def __init__(s): super().__init__(); s.attn = nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)
        def forward(s, x): return s.attn(x, x, x, need_weights=False)[0]
    net = Net().eval()
    zero_heads(attention_heads(net)[0], [1])
    small, warned = compact_quiet(net, torch.randn(2, 5, 32))
    assert isinstance(small.attn, nn.MultiheadAttention) and 'key/value biases' in small.compact_notes['attn']

def test_all_dead_keeps_one():
    m = llama()
    for lay in attention_heads(m): zero_heads(lay, [0, 1])
    for mlp in mlp_blocks(m): zero_units(mlp, range(64))
    small, warned = compact_quiet(m, {'input_ids': IDS})
    a, p = small.model.layers[1].self_attn, small.model.layers[1].mlp
    assert (a.q_proj.out_features, a.k_proj.out_features) == (16, 8) and p.up_proj.out_features == 1
    assert 'one group stays' in small.compact_notes['model.layers.1.self_attn']
    assert 'one stays' in small.compact_notes['model.layers.1.mlp']
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)
    v = vit()
    for lay in attention_heads(v): zero_heads(lay, [0, 1, 2])
    small, _ = compact_quiet(v, torch.randn(2, 3, 32, 32))
    assert [b.attn.num_heads for b in small.blocks] == [1, 1]

class FreeMatmul(nn.Module):
    "fc1, GELU, then a product with a free matrix that mixes the hidden units, then fc2"
    def __init__(self):
        super().__init__()
        self.fc1, self.W, self.fc2 = nn.Linear(8, 16), nn.Parameter(torch.randn(16, 16)), nn.Linear(16, 8)
    def forward(self, x): return self.fc2(F.gelu(self.fc1(x)) @ self.W)

def test_matmul_with_a_free_parameter_is_not_seen_through():
    m = FreeMatmul()
    with torch.no_grad(): m.fc1.weight[:4] = 0; m.fc1.bias[:4] = 0; m.fc2.weight[:, 8:12] = 0 # zero, but W mixes them in
    x = torch.randn(2, 5, 8)
    small, warned = compact_quiet(m, x)
    assert (small.fc1.out_features, small.fc2.in_features) == (16, 16)
    assert 'matrix product (MmBackward0)' in small.compact_notes['fc1'] and len(warned) == 1
    torch.testing.assert_close(out(small, x), out(m, x), rtol=0, atol=1e-5)

@pytest.mark.parametrize('bias', [True, False])
def test_a_linear_own_matmul_is_seen_through(bias):
    "A Linear on a 3-D input is traced as view, addmm (mm without bias) with its own transposed weight, view: fc1's dead rows go"
    m = nn.Sequential(nn.Linear(8, 16, bias=bias), nn.ReLU(), nn.Linear(16, 8, bias=bias))
    with torch.no_grad():
        m[0].weight[:6] = 0
        if bias: m[0].bias[:6] = 0
    x = torch.randn(2, 5, 8)
    small, warned = compact_quiet(m, x)
    assert (small[0].out_features, small[2].in_features) == (10, 10) and not warned
    torch.testing.assert_close(out(small, x), out(m, x), rtol=0, atol=1e-5)

def test_keep_leaves_heads():
    m, x = vit(), torch.randn(2, 3, 32, 32)
    for lay in attention_heads(m): zero_heads(lay, [0])
    small, _ = compact_quiet(m, x, keep=['blocks.0.attn.qkv'])
    assert [b.attn.num_heads for b in small.blocks] == [3, 2]

@pytest.mark.parametrize('seed', range(4))
def test_random_dead_groups(seed):
    "Any set of dead groups goes, value-only zeros included, and one group always stays; the outputs stay the same"
    g = torch.Generator().manual_seed(seed)
    m = llama(num_attention_heads=8, num_key_value_heads=4)
    expect = []
    for lay in attention_heads(m):
        dead = (torch.rand(4, generator=g) < 0.5).nonzero().flatten().tolist()
        for i in dead:
            if torch.rand(1, generator=g) < 0.5: zero_heads(lay, [i])
            else:
                v = next(p for p in lay.projs if p.role == 'v')
                with torch.no_grad(): v.w[lay.units(v, i)] = 0
        expect.append(max(4 - len(dead), 1))
    small, _ = compact_quiet(m, {'input_ids': IDS})
    assert [l.n_kv_heads for l in attention_heads(small)] == expect
    assert [l.self_attn.q_proj.out_features for l in small.model.layers] == [8 * e for e in expect] # 2 query heads of 4 per group
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)

def test_compact_twice():
    "A compact model compacts again: its attentions are still found, with their new head counts"
    m, x = vit(), torch.randn(2, 3, 32, 32)
    zero_heads(attention_heads(m)[0], [0])
    once, _ = compact_quiet(m, x)
    zero_heads(attention_heads(once)[0], [1])
    twice, _ = compact_quiet(once, x)
    assert twice.blocks[0].attn.num_heads == 1 and twice.compact_removed == {'blocks.0.attn': {'heads': 1}}
    torch.testing.assert_close(out(twice, x), out(once, x), rtol=0, atol=1e-4)
    enc, xe = encoder(), torch.randn(2, 5, 32)
    zero_heads(attention_heads(enc)[0], [0])
    once, _ = compact_quiet(enc, xe)
    zero_heads(attention_heads(once)[0], [2]) # the slim attention's third head: the original's head 3
    twice, _ = compact_quiet(once, xe)
    assert twice.layers[0].self_attn.heads_kept.tolist() == [1, 2]
    torch.testing.assert_close(out(twice, xe), out(once, xe), rtol=0, atol=1e-4)
    round_trip(twice, encoder(), xe)

def test_sparsifier_filter_masks_on_fc1():
    "The issue's example: half of each fc1's rows pruned by a Sparsifier go, with fc2's columns"
    from fasterprune.sparsifier import Sparsifier
    m, x = vit(), torch.randn(2, 3, 32, 32)
    Sparsifier(m, 0.5, 'filter', include=['*mlp.fc1']).prune()
    small, warned = compact_quiet(m, x)
    assert [(b.mlp.fc1.out_features, b.mlp.fc2.in_features) for b in small.blocks] == [(384, 384)] * 2 and not warned
    torch.testing.assert_close(out(small, x), out(m, x), rtol=0, atol=1e-4)

def test_slim_decoder_and_sequence_first():
    "nn.TransformerDecoder (self- and cross-attention, causal mask) with inputs (seq, batch, feature)"
    class Dec(nn.Module):
        def __init__(s):
            super().__init__()
            s.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64), 1)
        def forward(s, tgt, mem): return s.dec(tgt, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[0]), tgt_is_causal=True)
    m = Dec().eval()
    lays = attention_heads(m)
    assert [l.name for l in lays] == ['dec.layers.0.self_attn', 'dec.layers.0.multihead_attn']
    zero_heads(lays[0], [1]); zero_heads(lays[1], [0, 2])
    x = (torch.randn(6, 2, 32), torch.randn(4, 2, 32))
    small, _ = compact_quiet(m, x)
    assert [l.n_heads for l in attention_heads(small)] == [3, 2]
    with torch.no_grad(): torch.testing.assert_close(small(*x), m(*x), rtol=0, atol=1e-4)

def test_llama_with_biases():
    "q, k, v biases (Qwen-style) and MLP biases are cut with their rows"
    m = llama(attention_bias=True, mlp_bias=True)
    for lay in attention_heads(m): zero_heads(lay, [0])
    for mlp in mlp_blocks(m): zero_units(mlp, range(8))
    small, warned = compact_quiet(m, {'input_ids': IDS})
    a, p = small.model.layers[0].self_attn, small.model.layers[0].mlp
    assert (tuple(a.q_proj.bias.shape), tuple(a.k_proj.bias.shape), tuple(a.o_proj.bias.shape)) == ((16,), (8,), (32,))
    assert (tuple(p.up_proj.bias.shape), tuple(p.gate_proj.bias.shape), tuple(p.down_proj.bias.shape)) == ((56,), (56,), (32,))
    torch.testing.assert_close(out(small, {'input_ids': IDS}), out(m, {'input_ids': IDS}), rtol=0, atol=1e-4)
    round_trip(small, llama(attention_bias=True, mlp_bias=True), {'input_ids': IDS})
