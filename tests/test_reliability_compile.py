"""torch.compile (issue 6): a compiled model trains under `SparsifyCallback`, its pruned weights stay exactly zero, and
mask changes cause no recompilation.

The engine masks in place (`weight.mul_(mask)` after each step, `grad.mul_(mask)` after backward) and adds no hooks or
parametrizations, so a compiled graph, which reads parameters as inputs, needs nothing special. Backend: inductor when a
C compiler is on the PATH (it generates and builds C++ for the CPU), else `aot_eager` (same graph capture and autograd
tracing, no code generation).
"""
import shutil

import pytest
import torch
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.sparsifier import state_mirrors
from fasterprune.callback import SparsifyCallback
from fasterprune.sparsifier import Sparsifier
from fasterprune.demo import digits_dls, small_cnn

BACKEND = 'inductor' if any(shutil.which(c) for c in ('cc', 'gcc', 'clang', 'c++', 'g++')) else 'aot_eager'


class Watch(Callback):
    "Pruned weights and their optimizer state are zero after every step; graphs compiled so far, at each epoch's end"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.steps, self.graphs, self.changes, self.prev = 0, [], 0, None
    def after_step(self):
        sp = self.sparsify.sparsifier
        for l in sp.layers:
            if l.name not in sp.masks: continue # movement/taylor rank nothing before the first backward pass
            dead = ~l.grouping.weight_mask(sp.masks[l.name])
            assert not l.weight[dead].any(), l.name
            assert not any(t[dead].any() for t in state_mirrors(self.opt)(l.weight))
        now = {k: m.clone() for k, m in sp.masks.items()}
        if self.prev is not None and any(not torch.equal(now[k], m) for k, m in self.prev.items()): self.changes += 1
        self.prev, self.steps = now, self.steps + 1
    def after_epoch(self): self.graphs.append(torch._dynamo.utils.counters['stats']['unique_graphs'])


@pytest.mark.slow
@pytest.mark.parametrize('cfg', [dict(scope='global', criterion='movement', update_every=1), dict(granularity='filter', exclude='fc', update_every=1)],
                         ids=['global-movement', 'filter'])
def test_compiled_model_keeps_pruned_weights_zero(cfg):
    torch._dynamo.reset()
    set_seed(0)
    model = small_cnn()
    model.compile(backend=BACKEND) # in place: the module keeps its names, so masks and checkpoints match the eager model's
    watch = Watch()
    learn = Learner(digits_dls(bs=64), model, loss_func=CrossEntropyLossFlat(), cbs=[SparsifyCallback(0.7, **cfg), watch])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    sp = learn.sparsify.sparsifier
    assert [l.name for l in sp.layers][:2] == ['conv1', 'conv2']
    assert watch.steps == 44 and watch.changes >= 15 # the masks changed at many steps of the second epoch too
    assert watch.graphs[0] >= 1 and watch.graphs[-1] == watch.graphs[0] # ... without a single recompilation
    assert sp.counts == sp.group_counts(1.)
    assert learn.recorder.values[-1][1] < 1.8 # it learned (validation loss; chance is ln 10 = 2.3)


def test_torch_compile_wrapper_keeps_layer_names():
    "`torch.compile(model)` (an OptimizedModule) is unwrapped: layers keep their plain names, states move to the plain model"
    model = small_cnn()
    compiled = torch.compile(model, backend='eager') # names do not depend on the backend
    assert [l.name for l in Sparsifier(compiled, 0.5).layers] == [l.name for l in Sparsifier(small_cnn(), 0.5).layers]
    sp = Sparsifier(compiled, 0.5, include='fc', layer_sparsity={'fc': 0.2}).prune()
    Sparsifier(model, 0.5, include='fc', layer_sparsity={'fc': 0.2}).load_state_dict(sp.state_dict())
