"""Masks that move (issue 17): `Regrow` and `SparsifyCallback(regrow=...)`.

Each fit checks, at every optimizer step: the sparsity stays exactly at its target through every drop-and-grow update
(each layer's count in local scope, the pool's total in global scope), N:M masks keep their pattern, and the weights an
update brings in are zero with zero optimizer state (read through `mirrors_of`, as the callback cleans them). Resume: a
fit checkpointed after its first epoch and resumed in a new `Learner` ends with the uninterrupted fit's masks, weights
and update history. DDP: two gloo CPU processes (this file run as a script, as in tests/test_reliability_ddp.py) have
bit-identical masks at every step, and their masks moved.
"""
import os, subprocess, sys, warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from fastai.torch_core import set_seed
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.callback.schedule import fit_one_cycle # noqa: F401 (patches Learner)

from fasterprune.callback import SparsifyCallback
from fasterprune.learner import mirrors_of
from fasterprune.regrow import Regrow, check_regrow
from fasterprune.schedules import one_shot
from fasterprune.sparsifier import Sparsifier
from fasterprune.demo import digits_dls, small_cnn

torch.set_num_threads(1)
EPOCHS = 3
static = partial(one_shot, start=0.) # the whole target from the first step: static sparse training, then regrowth


@pytest.fixture(scope='module')
def dls(): return digits_dls(bs=64, shuffle=False) # 23 batches


def mk(dls, cbs=None, seed=0, path=None, opt_func=None):
    set_seed(seed)
    kw = dict(opt_func=opt_func) if opt_func else {}
    return Learner(dls, small_cnn(), loss_func=CrossEntropyLossFlat(), cbs=cbs, path=path or '.', **kw)


def quiet_fit(learn, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(EPOCHS, 1e-2, **kwargs)
    return learn


class Probe(Callback):
    "After the callback's `after_backward` (where it drops and grows): counts, N:M blocks, and the new weights at zero with zero state"
    order = SparsifyCallback.order + 1
    def before_fit(self): self.counts, self.prev, self.new, self.blocks_ok = [], None, 0, True
    def after_backward(self):
        sp, f = self.sparsify.sparsifier, mirrors_of(self.learn)
        masks = {n: m.clone() for n, m in sp.masks.items()}
        for l in sp.layers:
            if self.prev is None or l.name not in self.prev: continue
            new = (masks[l.name] & ~self.prev[l.name]).reshape(l.weight.shape)
            out = (self.prev[l.name] & ~masks[l.name]).reshape(l.weight.shape)
            if new.any():
                self.new += int(new.sum())
                assert not l.weight[new].any(), 'a grown weight is not zero'
                assert not l.weight[out].any(), 'a dropped weight is not zero'
                for t in f(l.weight): assert not t[new].any() and not t[out].any(), 'optimizer state of a swapped weight not zero'
            if l.grouping.nm:
                n, M = l.grouping.nm
                kept = l.grouping._in_place(masks[l.name].contiguous()).sum(1)
                self.blocks_ok &= bool(((kept == n) | (kept == M)).all())
        self.prev = masks
        self.counts.append({n: int(m.sum()) for n, m in masks.items()})


@pytest.mark.parametrize('gran,scope,sparsity', [('weight', 'local', 0.9), ('weight', 'global', 0.9), ('2:4', 'local', 0.5),
                                                 ('2:4', 'global', 0.4), ('1:4', 'local', 0.75)])
@pytest.mark.parametrize('grow', ['gradient', 'random'])
def test_exact_sparsity_nm_and_clean_new_weights(dls, gran, scope, sparsity, grow):
    rg = Regrow(grow, every=5)
    cb = SparsifyCallback(sparsity, static, granularity=gran, scope=scope, criterion='random', regrow=rg)
    probe = Probe()
    learn = quiet_fit(mk(dls, [cb, probe])) # fastai's Adam: its moments are the state that must be clean
    first = probe.counts[0]
    for c in probe.counts:
        if scope == 'local': assert c == first # each layer keeps its count exactly
        else: assert sum(c.values()) == sum(first.values()) # the pool keeps its total
    assert probe.blocks_ok
    due = [s for s in range(cb.starts[-1]) if rg.due(s, cb.starts[-1])]
    hist = learn.recorder.regrowth['sparsify']
    assert [r['step'] for r in hist] == due and len(due) >= 5 and due[-1] < 0.75 * cb.starts[-1]
    assert all(r['dropped'] == r['grown'] for r in hist)
    assert probe.new == sum(r['grown'] for r in hist) > 0 # every weight brought in was checked
    achieved = learn.recorder.sparsity['achieved']
    assert max(achieved) - min(achieved) < 1e-12 and abs(achieved[-1] - cb._measure()) < 1e-12
    if scope == 'global' and gran == 'weight': assert all(v > 0 for v in probe.counts[-1].values()) # no layer emptied


def test_sgd_momentum_and_weight_decay_state_clean(dls):
    "SGD with momentum and weight decay: the momentum buffers of swapped weights are zeroed, and the weights stay where the masks say"
    cb = SparsifyCallback(0.8, static, criterion='random', regrow=Regrow('gradient', every=4))
    probe = Probe()
    quiet_fit(mk(dls, [cb, probe], opt_func=partial(SGD, mom=0.9, wd=1e-2)))
    assert probe.new > 0
    sp = cb.sparsifier
    for l in sp.layers: assert not l.weight[~l.grouping.weight_mask(sp.masks[l.name])].any()


def test_regrowth_changes_masks_and_gradual_pruning_with_it(dls):
    "GraNet: gradual pruning every ΔT steps and a drop-and-grow after each; the fit ends at the target with moved masks"
    rg = Regrow('gradient', fraction=0.5, min_fraction=0.005, stop=1., every=6)
    cb = SparsifyCallback(0.9, update_every=6, regrow=rg)
    learn = quiet_fit(mk(dls, cb))
    assert abs(cb._measure() - 0.9) < 1e-3 and cb._at_target()
    assert sum(r['grown'] for r in rg.history) > 0 and rg.history[-1]['step'] == (cb.starts[-1] - 1) // 6 * 6 # until the end


@pytest.mark.parametrize('update_every', ['auto', 5])
def test_rankings_do_not_undo_the_swaps(dls, update_every):
    """With `regrow`, a ranking never starts over: the default cadence becomes the regrowth's ΔT, an explicit one is kept, and the
    masks the swaps made stay (a `'random'` criterion ranked again from scratch would draw the first mask back)"""
    rg = Regrow('random', every=4, stop=0.5)
    cb = SparsifyCallback(0.8, static, criterion='random', update_every=update_every, regrow=rg)
    test = {}
    class Watch(Callback):
        order = SparsifyCallback.order + 1
        def after_backward(self):
            if self.sparsify.step == 0: test['first'] = {n: m.clone() for n, m in self.sparsify.sparsifier.masks.items()}
    quiet_fit(mk(dls, [cb, Watch()]))
    assert cb.update_every == (4 if update_every == 'auto' else 5) and not cb.restart
    sp = cb.sparsifier
    moved = sum(int((test['first'][n] != m).sum()) for n, m in sp.masks.items())
    assert moved > 0 and sum(r['grown'] for r in rg.history) > 0 # the swaps are in the final masks
    assert abs(cb._measure() - 0.8) < 1e-3
    again = Sparsifier(mk(dls).model, 0.8, criterion='random').prune() # the first mask, drawn again: not where the fit ended
    assert any(not torch.equal(again.masks[n], m) for n, m in sp.masks.items())


@pytest.mark.parametrize('mode', ['fp16', 'bf16'])
def test_mixed_precision_overflow_steps_are_skipped(dls, mode):
    "fastai's MixedPrecision code path on the CPU: an update on an overflowing step (scaled gradients inf) is skipped, the others rank the scaled gradients; counts exact, swapped weights and Adam state at zero"
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability_precision import CPUMixedPrecision, mlp
    set_seed(0)
    mp = CPUMixedPrecision(mode, init_scale=2.**24) if mode == 'fp16' else CPUMixedPrecision(mode)
    rg = Regrow('gradient', every=1)
    cb, probe = SparsifyCallback(0.8, static, criterion='random', regrow=rg), Probe()
    learn = Learner(dls, mlp(), loss_func=CrossEntropyLossFlat(), cbs=[mp, cb, probe])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    skipped = [r['step'] for r in rg.history if r['skipped']]
    if mode == 'fp16': assert mp.n_skipped >= 3 and len(skipped) >= 1 # the first steps overflow (in some layer: those whose pruned weights' gradients stayed finite are ranked)
    else: assert not skipped
    assert all(c == probe.counts[0] for c in probe.counts) and probe.new > 0


def test_gradient_accumulation_updates_once_per_step(dls):
    rg = Regrow('gradient', every=3)
    cb = SparsifyCallback(0.9, static, criterion='random', regrow=rg)
    learn = quiet_fit(mk(dls, [cb, GradientAccumulation(n_acc=128)])) # two batches per optimizer step
    steps = [r['step'] for r in rg.history]
    assert steps == [s for s in range(cb.starts[-1]) if rg.due(s, cb.starts[-1])] and len(steps) > 3


@pytest.mark.parametrize('grow', ['gradient', 'random'])
def test_resume_gives_the_uninterrupted_masks(dls, tmp_path, grow):
    def cb(): return SparsifyCallback(0.9, static, criterion='random', regrow=Regrow(grow, every=4, seed=3))
    opt = partial(SGD, mom=0.9)
    full = quiet_fit(mk(dls, cb(), path=tmp_path/'full', opt_func=opt))
    first = mk(dls, cb(), path=tmp_path/'run', opt_func=opt)
    quiet_fit(first, cbs=SaveModelCallback(every_epoch=True, with_opt=True, fname='ckpt'))
    resumed = mk(dls, cb(), seed=1, path=tmp_path/'run', opt_func=opt).load('ckpt_0', with_opt=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        quiet_fit(resumed, start_epoch=1)
    a, b = full.sparsify, resumed.sparsify
    for n in a.sparsifier.masks: assert torch.equal(a.sparsifier.masks[n], b.sparsifier.masks[n]), n
    for k, v in full.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert a.regrow.history == b.regrow.history and len(a.regrow.history) == len([s for s in range(a.starts[-1]) if a.regrow.due(s, a.starts[-1])])
    assert all(torch.equal(a.regrow.ever[n], b.regrow.ever[n]) for n in a.regrow.ever)


def test_bad_input():
    for bad, msg in [('rigll', "`regrow`='rigll' is unknown"), (3, '`regrow` must be a `Regrow`')]:
        with pytest.raises((ValueError, TypeError), match=msg): SparsifyCallback(0.9, regrow=bad)
    with pytest.raises(ValueError, match="granularity 'weight' or N:M"): SparsifyCallback(0.5, granularity='kernel', regrow='set')
    with pytest.raises(ValueError, match='`grow`'): Regrow('magnitude')
    with pytest.raises(ValueError, match='did you mean 0.3'): Regrow(fraction=30)
    with pytest.raises(ValueError, match='`every`'): Regrow(every=2.5)
    with pytest.raises(ValueError, match='`stop`'): Regrow(stop=-1)
    with pytest.raises(ValueError, match='`decay`'): Regrow(decay='linear')
    assert check_regrow(None) is None and check_regrow('rigl').grow == 'gradient' and check_regrow('set').grow == 'random'
    assert check_regrow('rigl') is not check_regrow('rigl') # a preset is a new object each time: no history shared


def _mlp(): return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

def _grads(sp, seed=0):
    g = torch.Generator().manual_seed(seed)
    for l in sp.layers: l.weight.grad = torch.randn(l.weight.shape, generator=g)


def test_random_growth_is_seeded_not_global():
    "SET's draw depends on (seed, step, layer), not on the global RNG: the same on every rank and after a resume"
    def masks(seed, step, glob):
        torch.manual_seed(0); sp = Sparsifier(_mlp(), 0.9, criterion='random').prune()
        torch.manual_seed(glob)
        Regrow('random', seed=seed).update(sp, step, 1000)
        return torch.cat([m.reshape(-1) for m in sp.masks.values()])
    assert torch.equal(masks(0, 100, 1), masks(0, 100, 2))
    assert not torch.equal(masks(0, 100, 1), masks(1, 100, 1)) and not torch.equal(masks(0, 100, 1), masks(0, 200, 1))


def test_gradient_growth_takes_the_largest_gradients_and_drops_the_smallest_weights():
    torch.manual_seed(0)
    sp = Sparsifier(_mlp(), 0.9, criterion='random').prune()
    _grads(sp)
    old = {n: m.clone() for n, m in sp.masks.items()}
    row = Regrow('gradient', fraction=0.2).update(sp, 0, 100)
    assert row['dropped'] == row['grown'] > 0
    for l in sp.layers:
        o, m = old[l.name].reshape(-1), sp.masks[l.name].reshape(-1)
        w, g = l.weight.detach().reshape(-1).abs(), l.weight.grad.reshape(-1).abs()
        grown, dropped, stayed_out, stayed_in = m & ~o, o & ~m, ~o & ~m, o & m
        k = int(grown.sum())
        assert k == int(dropped.sum()) == round(0.2 * int(o.sum()))
        assert g[grown].min() >= g[stayed_out].max() # the pruned weights with the largest |gradient| came in
        assert not w[dropped].any() # the dropped weights are zero now...
    assert not sp.plans # ...and the engine's queues are gone: its next update ranks again


def test_per_layer_allocation_keeps_each_layer_count():
    "A per-layer target (`layer_sparsity`, as ERK's allocation will be) is its own pool: its count is kept exactly, beside a global pool that keeps its total"
    torch.manual_seed(0)
    sp = Sparsifier(_mlp(), 0.9, scope='global', layer_sparsity={'0': 0.7}, criterion='random').prune()
    before = {n: int(m.sum()) for n, m in sp.masks.items()}
    rg = Regrow('gradient', fraction=0.5)
    for step in range(3):
        _grads(sp, step)
        assert rg.update(sp, step, 100)['grown'] > 0
    after = {n: int(m.sum()) for n, m in sp.masks.items()}
    assert after['0'] == before['0'] and sum(after.values()) == sum(before.values())
    assert after != before # the global pool's layers traded weights


def test_non_finite_gradients_skip_the_update():
    torch.manual_seed(0)
    sp = Sparsifier(_mlp(), 0.9, criterion='random').prune()
    _grads(sp)
    sp.layers[1].weight.grad[0, 0] = float('inf') # a mixed-precision overflow step
    old = {n: m.clone() for n, m in sp.masks.items()}
    rg = Regrow('gradient')
    assert rg.update(sp, 100, 1000) is None
    assert all(torch.equal(old[n], sp.masks[n]) for n in old)
    assert rg.history[-1]['skipped'] == 'non-finite gradients'


def test_not_pruned_yet_and_links():
    sp = Sparsifier(_mlp(), 0.9)
    row = Regrow().update(sp, 100, 1000) # no mask yet (a gradual schedule's dense start): nothing to swap
    assert row['dropped'] == 0 and not sp.masks
    linked = Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), 0.5, links=[['0', '1']]).prune()
    with pytest.raises(ValueError, match='linked layers'): Regrow().update(linked, 100, 1000)


# ---------------------------------------------------------------- DDP (two gloo CPU processes)

DDP_CONFIGS = {
    'local-rigl': dict(schedule=static, regrow=Regrow('gradient', every=2)),
    'global-set': dict(schedule=static, scope='global', regrow=Regrow('random', every=2, seed=5)),
    'granet': dict(update_every=3, regrow=Regrow('gradient', fraction=0.5, stop=1., every=3)),
}


def worker(out: Path):
    import torch.distributed as dist
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability_ddp import fit
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    try:
        res = {}
        for name, cfg in DDP_CONFIGS.items():
            r = fit(cfg, rank)
            res[name] = dict(digests=r['digests'], synced=r['synced'], masks=r['masks'])
        torch.save(res, out / f'rank{rank}.pt')
    finally: dist.destroy_process_group()




@pytest.mark.slow
def test_ddp_masks_equal_on_every_rank(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability_ddp import free_port
    port, procs = free_port(), []
    for r in range(2):
        env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2', 'RANK': str(r),
               'LOCAL_RANK': str(r), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, cwd=Path(__file__).parent.parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)): assert p.returncode == 0, f'rank {r} failed:\n{log[-4000:]}'
    a, b = (torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2))
    for name in DDP_CONFIGS:
        assert all(a[name]['synced']), name # DDP all-reduced the gradients before `after_backward`
        assert a[name]['digests'] == b[name]['digests'], name # masks bit-identical at every optimizer step
        assert len(set(a[name]['digests'][1:])) > 2, name # and they moved


if __name__ == '__main__': worker(Path(sys.argv[1]))
