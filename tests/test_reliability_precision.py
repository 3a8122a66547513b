"""Mixed precision and dtypes (issue 6): low-precision weights, fastai's `MixedPrecision` code path (loss scaling, skipped
steps) and dtype/layout moves in the middle of a fit all keep the masks exact and the pruned weights at zero.

fastai's `MixedPrecision` hard-codes CUDA (`autocast('cuda')`, `GradScaler('cuda')`), so on a CPU it runs but does
nothing. `CPUMixedPrecision` below is fastai's class with only those two objects replaced by their CPU versions: its
`before_backward` (loss scaling), `before_step` (unscaling, `CancelStepException` when the scaled gradients overflow) and
`after_step` (scale update) run unchanged. `tests/test_callback.py` already runs fastai's `MixedPrecision` on the CPU and a
plain bf16 autocast with `taylor`; these tests add float16/bfloat16 *weights*, real loss scaling with skipped steps, and
moves of the model between dtypes and memory layouts while it trains.
"""
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD, Adam
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.sparsifier import state_mirrors
from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import one_shot
from fasterprune.demo import digits_dls, small_cnn


def mlp():
    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 64), act1=nn.ReLU(), fc2=nn.Linear(64, 64),
                                     act2=nn.ReLU(), fc3=nn.Linear(64, 10)))


class CheckMasks(Callback):
    "After every step: pruned weights and their optimizer state are exactly zero; masks are bool at the weight's device"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.steps = 0
    def after_step(self):
        sp = self.sparsify.sparsifier
        for l in sp.layers:
            if l.name not in sp.masks: continue # movement/taylor rank nothing before the first backward pass
            dead = ~l.grouping.weight_mask(sp.masks[l.name])
            assert sp.masks[l.name].dtype == torch.bool
            assert not l.weight[dead].any(), l.name
            assert not any(t[dead].any() for t in state_mirrors(self.opt)(l.weight)), l.name
        self.steps += 1


def assert_exact(sp):
    "Each pool lost exactly its group count, and the weights are zero at least wherever the masks say"
    assert sp.counts == sp.group_counts(1.)
    pools = sp._pools()
    for key, k in sp.counts.items():
        lost = sum(int((~sp.masks[u[0].name]).sum()) for u in pools[key])
        if not sp.layers[0].grouping.nm: assert lost == k, key
    masked = sum(int((~l.grouping.weight_mask(sp.masks[l.name])).sum()) for l in sp.layers)
    zeros = sum(int((l.weight == 0).sum()) for l in sp.layers)
    n = sum(l.weight.numel() for l in sp.layers)
    assert masked <= zeros <= masked + 0.01 * n # a kept weight can round to zero in low precision, rarely


class Cast(Callback):
    "Feed the model inputs of its own dtype, hand fastai a float32 prediction (the loss stays float32)"
    order = 1
    def __init__(self, dtype): self.dtype = dtype
    def before_batch(self): self.learn.xb = tuple(x.to(self.dtype) for x in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('cfg', [dict(), dict(scope='global', criterion='movement'), dict(granularity='2:4', sparsity=0.5),
                                 dict(granularity='filter', scope='global', criterion='taylor')],
                         ids=['local', 'global-movement', '2:4', 'filter-global-taylor'])
def test_low_precision_weights(dtype, cfg):
    "A model whose weights are float16 or bfloat16 trains with exact masks; scores are ranked in float32"
    cfg = dict(cfg); sparsity = cfg.pop('sparsity', 0.8)
    set_seed(0)
    check = CheckMasks()
    learn = Learner(digits_dls(bs=64), mlp().to(dtype), loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.9),
                    cbs=[Cast(dtype), SparsifyCallback(sparsity, **cfg), check])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    assert check.steps == 44 and all(l.weight.dtype == dtype for l in sp.layers)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for s in sp.state.values() for t in s.values())
    assert_exact(sp)


class CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision` with its CUDA autocast and GradScaler replaced by the CPU ones; counts skipped steps"
    def before_fit(self):
        super().before_fit()
        dt = torch.bfloat16 if self.amp_mode == 'bf16' else torch.float16
        self.autocast, self.learn.scaler = torch.autocast('cpu', dtype=dt), torch.amp.GradScaler('cpu', **self.kwargs)
        self.n_skipped = 0
    def after_cancel_step(self): self.n_skipped += 1


@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
@pytest.mark.parametrize('cfg', [dict(scope='global', criterion='movement', update_every=1), dict(criterion='taylor', update_every=5)],
                         ids=['global-movement', 'taylor-update_every'])
def test_mixed_precision_with_loss_scaling(mode, cfg):
    """Autocast, loss scaling and overflowing steps: the callback masks the (scaled) gradients, learns only from
    unscaled gradients of steps that are taken (never from the inf of a skipped one), counts skipped steps as steps,
    and ends at the target exactly"""
    set_seed(0)
    # fp16: a huge initial scale makes the first steps overflow, so GradScaler skips them (and halves the scale)
    mp = CPUMixedPrecision(mode, init_scale=2.**24) if mode == 'fp16' else CPUMixedPrecision(mode)
    check = CheckMasks()
    learn = Learner(digits_dls(bs=64), mlp(), loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.1),
                    cbs=[mp, SparsifyCallback(0.8, **cfg), check])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    if mode == 'fp16': assert mp.n_skipped >= 3 # the skipped-step path really ran
    assert learn.sparsify.step == check.steps == 44 # skipped steps count: the schedule does not drift
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for s in sp.state.values() for t in s.values())
    assert_exact(sp)


class Mover(Callback):
    "Moves the model while it trains: epoch 1 in bfloat16, epoch 2 back to float32 and `.to('cpu')`, epoch 3 channels_last"
    order = 1
    def before_fit(self): self.dtype = torch.float32
    def before_epoch(self):
        if self.epoch == 1: self.dtype = torch.bfloat16; self.model.to(torch.bfloat16)
        if self.epoch == 2: self.dtype = torch.float32; self.model.to(torch.float32).to('cpu')
        if self.epoch == 3: self.model.to(memory_format=torch.channels_last)
    def before_batch(self): self.learn.xb = tuple(x.to(self.dtype) for x in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float()


class MaskLog(Callback):
    order = SparsifyCallback.order + 2
    def before_fit(self): self.at = []
    def after_epoch(self): self.at.append({k: m.clone() for k, m in self.sparsify.sparsifier.masks.items()})


@pytest.mark.parametrize('opt', ['sgd', 'adam'])
@pytest.mark.parametrize('cfg', [dict(), dict(granularity='filter', exclude='fc', criterion='movement', scope='global')],
                         ids=['weight', 'filter-movement-global'])
def test_masks_survive_dtype_and_layout_moves_mid_fit(opt, cfg):
    """Pruned once at the first step (movement: the second, after the first gradient), then moved float32 -> bfloat16 -> float32 (and `.to('cpu')`) -> channels_last:
    the masks stay bit-identical, the pruned weights and their optimizer state stay zero at every step.
    (PyTorch's own AdamW cannot follow a parameter into another dtype; fastai's optimizers can.)"""
    set_seed(0)
    check, log = CheckMasks(), MaskLog()
    opt_func = partial(SGD, mom=0.9, wd=1e-2) if opt == 'sgd' else partial(Adam, wd=0.1)
    learn = Learner(digits_dls(bs=64), small_cnn(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func,
                    cbs=[Mover(), SparsifyCallback(0.6, partial(one_shot, start=0.), **cfg), check, log])
    with learn.no_bar(), learn.no_logging(): learn.fit(4, 1e-2)
    sp = learn.sparsify.sparsifier
    assert check.steps == 4 * 22
    for masks in log.at[1:]:
        assert all(torch.equal(masks[k], m) for k, m in log.at[0].items())
    assert all(l.weight.dtype == torch.float32 for l in sp.layers)
    assert learn.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(t.dtype == torch.float32 for s in sp.state.values() for t in s.values())
    assert_exact(sp)
