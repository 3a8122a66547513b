"""Optimizer state that mirrors a weight is masked with it (issue 13, case 8 and the `to_non_native_fp16` part of case 9).

Three kinds of tensors hold a copy of a weight, or something shaped like it, outside the model:
- the optimizer's per-parameter state (momentum, squared averages): cleaned since the first version;
- fastai's `Lookahead` optimizer (`ranger` is `Lookahead(RAdam)`) keeps *slow weights* and every `k` steps sets
  `slow += alpha * (fast - slow); fast = slow`. A pruned position whose slow weight is not zero comes back from it: a
  lottery-ticket rewind is half undone at the next sync, a weight a `dsd` schedule revives comes back at its old slow
  value instead of 0, and `learn.save(with_opt=True)` writes pruned values;
- fastai's `NonNativeMixedPrecision` (`to_non_native_fp16`) keeps fp32 *master copies*: the optimizer steps on them and
  `after_step` copies them back into the fp16 model. Their optimizer state is keyed by the master copies, not by the
  model's weights; a rewind written only into the model is overwritten at the next step.

The callback zeroes all of these at pruned positions when the masks change (not at every step: a pruned position then
has zero weight, zero gradient, zero state and zero slow weight, so no optimizer step moves it), and an `lth` rewind is
written into the master copies and slow weights too. The probes below read fastai's objects directly
(`opt.slow_weights`, `cb.master_pgs`), not the library's helpers, so they check the behaviour, not the implementation.

`NonNativeMixedPrecision.before_fit` asserts a CUDA device; `CPUNonNativeMixedPrecision` is fastai's class with only that
assertion left out, so its master copies, loss scaling and copies back run on the CPU unchanged.
"""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam, ranger
from fastai.callback.core import Callback
from fastai.callback.fp16 import NonNativeMixedPrecision, ModelToHalf, get_master, _copy_state
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)
from fastai.torch_core import set_seed

from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import dsd


def mlp():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), act2=nn.ReLU(),
                                     fc3=nn.Linear(32, 4)))


def dls(n=128, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :4].argmax(1)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items, bs=bs, shuffle=True), DataLoader(items[:bs], bs=bs))


class CPUNonNativeMixedPrecision(NonNativeMixedPrecision):
    "fastai's `NonNativeMixedPrecision` without the CUDA assertion in `before_fit` (the rest is fastai's code)"
    def before_fit(self):
        if self.learn.opt is None: self.learn.create_opt()
        self.model_pgs, self.master_pgs = get_master(self.opt, self.flat_master)
        self.old_pgs = self.opt.param_lists
        _copy_state(self.learn.opt, self.model_pgs, self.master_pgs)
        if self.dynamic: self.count = 0


def slow_weights(opt):
    "`{id(param the optimizer steps): slow weight}`, read from fastai's `Lookahead`"
    if getattr(opt, 'slow_weights', None) is None: return {}
    return {id(p): s for sg, pg in zip(opt.slow_weights, opt.param_lists) for p, s in zip(pg, sg)}


def master_views(learn):
    "`{id(model param): (master param, view of a tensor shaped like the master as the model param)}` under non-native fp16"
    cb = next((c for c in learn.cbs if isinstance(c, NonNativeMixedPrecision)), None)
    if cb is None or not hasattr(cb, 'master_pgs'): return {}
    out = {}
    for mps, ms in zip(cb.model_pgs, cb.master_pgs):
        start = 0
        for i, p in enumerate(mps):
            m = ms[0] if cb.flat_master else ms[i]
            s = start if cb.flat_master else 0
            out[id(p)] = (m, lambda t, s=s, p=p: t.reshape(-1)[s:s + p.numel()].view(p.shape))
            start += p.numel()
    return out


def mirrors(learn, p):
    "Every tensor shaped like model param `p` outside the model: master copy, slow weight, optimizer state (name, tensor)"
    q, view = master_views(learn).get(id(p), (p, lambda t: t))
    out = [('master', view(q.data))] if q is not p else []
    if (s := slow_weights(learn.opt).get(id(q))) is not None: out.append(('slow', view(s)))
    st = learn.opt.state.get(q, {})
    out += [(k, view(v)) for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == q.shape]
    return out


def pruned_params(sp):
    "(param, bool mask of its pruned entries) for every pruned weight, and for pruned filters their bias"
    for l in sp.layers:
        m = sp.masks.get(l.name)
        if m is None: continue
        yield l.weight, ~l.grouping.weight_mask(m)
        om = l.grouping.out_mask(m)
        if om is not None and l.module.bias is not None: yield l.module.bias, ~om


class CheckMirrors(Callback):
    "After every optimizer step: every mirror of every pruned entry is exactly 0; counts what it checked"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.checked = dict(slow=0, master=0, state=0)
    def after_step(self):
        for p, dead in pruned_params(self.sparsify.sparsifier):
            if not dead.any(): continue
            for kind, t in mirrors(self.learn, p):
                bad = int(t[dead].ne(0).sum())
                assert bad == 0, f"{kind} of a {tuple(p.shape)} parameter: {bad} of {int(dead.sum())} pruned entries non-zero"
                self.checked[kind if kind in ('slow', 'master') else 'state'] += 1


def learner(opt_func=ranger, cbs=(), **kw):
    set_seed(0)
    sp = SparsifyCallback(**{'sparsity': 0.8, **kw})
    return Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, cbs=[sp, *cbs])


@pytest.mark.parametrize('granularity', ['weight', 'filter'])
def test_ranger_slow_weights_masked(granularity):
    "With `ranger`, slow weights (and RAdam's state) are 0 wherever a mask prunes, after every step"
    chk = CheckMirrors()
    learn = learner(granularity=granularity, cbs=[chk])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert chk.checked['slow'] > 0 and chk.checked['state'] > 0 # the probe saw slow weights and state to check


def test_ranger_save_with_opt_holds_zeros(tmp_path):
    "`learn.save(with_opt=True)` after pruning with ranger writes 0 at every pruned position of the slow weights"
    learn = learner()
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    f = learn.save('pruned', with_opt=True)
    sd = torch.load(f, weights_only=False)
    sp = learn.sparsify.sparsifier
    pos = {id(p): (i, j) for i, pg in enumerate(learn.opt.param_lists) for j, p in enumerate(pg)}
    n = bad = 0
    for p, dead in pruned_params(sp):
        i, j = pos[id(p)]
        slow = sd['opt']['slow_weights'][i][j]
        n, bad = n + int(dead.sum()), bad + int(slow[dead].ne(0).sum())
    assert n > 0 and bad == 0, f"{bad} of {n} pruned positions are non-zero in the saved slow weights"


class AfterRewind(Callback):
    "Right after SparsifyCallback's `before_batch`: when it rewound, `check(layer, rewound weight)` for every layer"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.n, self.prev = 0, {}
    def before_batch(self):
        if not self.training: return
        sp, cb = self.sparsify.sparsifier, self.sparsify
        changed = any(sp.masks.get(k) is not v for k, v in self.prev.items())
        self.prev = dict(sp.masks)
        if not (changed and cb.snapshot is not None and self.ready()): return
        for l in sp.layers:
            rewound = cb.snapshot[l.name] * l.grouping.weight_mask(sp.masks[l.name])
            assert torch.equal(l.weight.detach(), rewound) # the rewind itself (unchanged behaviour)
            self.check(l, rewound)
        self.n += 1

class SlowRewound(AfterRewind):
    "With ranger: the slow weights equal the rewound weights"
    def ready(self): return bool(slow_weights(self.opt))
    def check(self, l, rewound):
        assert torch.equal(slow_weights(self.opt)[id(l.weight)], rewound), f"slow weights of `{l.name}` not rewound"

class MasterRewound(AfterRewind):
    "Under non-native fp16: the fp32 master copies equal the rewound weights"
    def ready(self): return True
    def check(self, l, rewound):
        m, view = master_views(self.learn)[id(l.weight)]
        assert torch.equal(view(m.data), rewound.float()), f"master copy of `{l.name}` not rewound"


def test_lth_rewind_reaches_slow_weights():
    "An `lth` rewind writes the rewound weights into ranger's slow weights, so the next sync keeps it"
    chk = SlowRewound()
    learn = learner(lth=True, cbs=[chk, CheckMirrors()], opt_func=lambda *a, **k: ranger(*a, k=2, **k))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert chk.n > 3 # rewinds were checked


def test_lth_rewind_not_undone_by_sync():
    "End to end: with k=1 (a sync at every step) and lr=0, weights stay at the rewound values after the next step"
    class Check(Callback):
        order = SparsifyCallback.order + 1
        def before_fit(self): self.n = 0
        def after_step(self):
            cb = self.sparsify
            if cb.step <= 8: return # the rewind comes at step 8, the first with lr=0
            sp = cb.sparsifier
            for l in sp.layers:
                assert torch.equal(l.weight.detach(), cb.snapshot[l.name] * l.grouping.weight_mask(sp.masks[l.name])), l.name
            self.n += 1
    chk = Check()
    # epoch 0 trains (lr > 0) so that the weights leave the snapshot; the rewind then brings them back, and with lr=0
    # afterwards nothing but a stale slow weight can move them
    learn = learner(lth=True, schedule=lambda pos: 0. if pos < 0.34 else 1., cbs=[chk],
                    opt_func=lambda *a, **k: ranger(*a, k=1, **k))
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, lr=1e-2, cbs=[SetLR(after=8)])
    assert chk.n > 0


class SetLR(Callback):
    "lr 0 from optimizer step `after` on (so that only the pruning changes weights)"
    order = SparsifyCallback.order + 2
    def __init__(self, after): self.after = after
    def before_fit(self): self.i = 0
    def before_step(self):
        if self.i >= self.after: self.opt.set_hyper('lr', 0.)
        self.i += 1


class Revived(Callback):
    "At every batch, entries the masks keep again (a `dsd` schedule shrinking) have weight 0 and slow weight 0"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.n, self.prev = 0, {}
    def before_batch(self):
        if not self.training: return
        sp = self.sparsify.sparsifier
        slow = slow_weights(self.opt)
        for l in sp.layers:
            m, o = sp.masks.get(l.name), self.prev.get(l.name)
            if m is None or o is None: continue
            back = l.grouping.weight_mask(m) & ~l.grouping.weight_mask(o)
            if not back.any() or not slow: continue
            assert not l.weight[back].any()
            assert not slow[id(l.weight)][back].any(), f"`{l.name}`: revived weights come back at old slow values"
            self.n += int(back.sum())
        self.prev = {k: v.clone() for k, v in sp.masks.items()}


def test_dsd_revived_weights_come_back_at_zero():
    "A `dsd` schedule revives weights: with ranger they come back at 0, not at old slow values"
    chk = Revived()
    learn = learner(schedule=dsd, cbs=[chk], opt_func=lambda *a, **k: ranger(*a, k=3, **k))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert chk.n > 100 # many weights were revived and checked


@pytest.mark.parametrize('flat', [False, True], ids=['master', 'flat_master'])
@pytest.mark.parametrize('opt', ['adam', 'ranger'])
def test_non_native_fp16_masters_masked(flat, opt):
    "`to_non_native_fp16`: the fp32 master copies of pruned weights, their optimizer state and slow weights stay 0"
    chk = CheckMirrors()
    opt_func = Adam if opt == 'adam' else ranger
    learn = learner(opt_func=opt_func, granularity='filter',
                    cbs=[chk, ModelToHalf(), CPUNonNativeMixedPrecision(flat_master=flat, dynamic=False)])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    assert chk.checked['master'] > 0 and chk.checked['state'] > 0
    if opt == 'ranger': assert chk.checked['slow'] > 0


def test_non_native_fp16_lth_rewind_reaches_masters():
    "`to_non_native_fp16` with `lth`: a rewind is written into the master copies, so the next step does not undo it"
    chk = MasterRewound()
    learn = learner(opt_func=Adam, lth=True, cbs=[chk, ModelToHalf(), CPUNonNativeMixedPrecision(dynamic=False)])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert chk.n > 3
