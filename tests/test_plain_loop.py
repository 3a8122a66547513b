"""The engine's per-step protocol for a plain PyTorch loop (issue 15): `update`, `clean_state`, `mask_grads`, and `apply`
where `keeps_zeros` says the optimizer could move a pruned weight. With it, a loop without fastai's `Learner` gets what
the callback guarantees: exact counts, pruned weights (and pruned filters' bias and BatchNorm) exactly zero after every
step, and optimizer state zero at every pruned position."""
from functools import partial

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from fastai.optimizer import ranger, SGD as fastai_SGD

from fasterprune.sparsifier import Sparsifier, keeps_zeros, state_mirrors
from fasterprune.schedules import one_cycle
from test_step_floor import Drift # moves every weight at every step: an optimizer `keeps_zeros` must not trust

torch.set_num_threads(1)

def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

OPTS = dict(adamw=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), sgd=partial(torch.optim.SGD, lr=1e-2, momentum=0.9, weight_decay=1e-2),
            fastai_ranger=partial(ranger, lr=1e-2, wd=0.1), fastai_sgd=partial(fastai_SGD, lr=1e-2, mom=0.9, wd=1e-2), drift=partial(Drift, lr=1e-2))

def dead_positions(sp, l):
    "The pruned entries of layer `l`'s weight, and per pruned filter, of its bias and norms (as (tensor, bool index) pairs)"
    m = sp.masks[l.name]
    out = [(l.module.weight, ~l.grouping.weight_mask(m))]
    om = l.grouping.out_mask(m)
    if om is not None: out += [(p, ~om.to(p.device)) for p in sp._out_params(l)]
    return out

@pytest.mark.parametrize('granularity', ['weight', 'filter', '2:4'])
@pytest.mark.parametrize('opt_name', list(OPTS))
def test_plain_loop_keeps_pruned_weights_and_state_at_zero(opt_name, granularity):
    torch.manual_seed(0)
    model = cnn()
    opt = OPTS[opt_name](list(model.parameters()))
    sparsity = 0.5 if ':' in granularity else 0.7
    sp = Sparsifier(model, sparsity, granularity, sample_input=torch.randn(2, 3, 8, 8))
    x, y, n = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,)), 30
    mirror = state_mirrors(opt)
    for step in range(n):
        i = torch.randint(0, 64, (16,))
        if sp.update(one_cycle(step / (n - 1))): sp.clean_state(opt)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(); loss.backward()
        sp.mask_grads(); opt.step()
        if not keeps_zeros(opt): sp.apply()
        for l in sp.layers:
            for t, dead in dead_positions(sp, l):
                assert not t.detach()[dead].any(), (step, l.name, 'weight')
                assert not any(s[dead].any() for s in mirror(t)), (step, l.name, 'state')
    assert keeps_zeros(opt) == (opt_name != 'drift')
    assert abs(sp.sparsity_achieved() - sparsity) <= 0.5 / 16 # each layer rounds its count: 16 filters, or many weights

def test_clean_state_whole_cleans_every_pruned_position():
    "After masks are loaded (or set by hand), `whole=True` zeroes the state at every pruned position, not only the newest"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 4, (8,))).backward(); opt.step() # momentum everywhere
    sp = Sparsifier(model, 0.5)
    sd = Sparsifier(model, 0.5).prune().state_dict()
    sp.load_state_dict(sd); sp.apply()
    mirror = state_mirrors(opt)
    assert any(s[~sp.masks['0']].any() for s in mirror(model[0].weight)) # momentum left where the loaded masks prune
    sp.clean_state(opt) # nothing pruned by an update yet: nothing to clean
    assert any(s[~sp.masks['0']].any() for s in mirror(model[0].weight))
    sp.clean_state(opt, whole=True)
    for l in sp.layers: assert not any(s[~sp.masks[l.name]].any() for s in mirror(l.module.weight))
