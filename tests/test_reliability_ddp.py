"""Distributed training (issues 6 and 13): `SparsifyCallback` under `DistributedDataParallel` keeps identical masks on every rank.

Two CPU processes, gloo backend, started as `torchrun` would start them (this file run as a script with `MASTER_ADDR`,
`MASTER_PORT`, `WORLD_SIZE` and `RANK` in the environment). Most fits wrap `learn.model` in torch's
`DistributedDataParallel` from a callback, exactly as fastai's `DistributedTrainer` does (order 11, wrap in `before_fit`,
unwrap in `after_fit`), and each rank reads its own half of every global batch; one fit goes through fastai's own
`distrib_ctx` (`fastai.distributed`, built on Hugging Face Accelerate; skipped where `accelerate` cannot be imported).

Why the masks agree: by construction. When torch.distributed is initialised with more than one process,
`Sparsifier.update` broadcasts rank 0's group counts and new masks to every rank whenever masks change (one small
broadcast for the counts, one for all the masks; no collective on steps where nothing changes). Most criteria would agree
without it (DDP all-reduces the gradients inside `loss.backward()`, before fastai's `after_backward`, so weights,
gradients and the `movement`/`taylor` state are the same on every rank, and `random` draws from a generator seeded by
the layer's name), but not all: `lookahead_bn` reads the BatchNorms' running variances, which each rank updates with its
own data (issue 13, case 4: masks differed on 21 of 32 steps), and a user's criterion may read anything. The tests check
each step: gradients equal across ranks at `after_backward` while the local losses differ, criterion state
bit-identical, masks bit-identical at every optimizer step (BatchNorm CNN with `lookahead_bn`, `random`, `taylor`,
`movement`, global scope, `'filter'`), a criterion drawing from the per-rank global RNG gets rank 0's masks, and the
result equals one process training on the whole global batch.

fastai's `distrib_ctx` is written for CUDA: `DistributedDL._broadcast` moves its indices to the GPU (replaced here by the
same broadcast on a CPU tensor), and `SyncBatchNorm` (what `distrib_ctx` substitutes for every BatchNorm by default)
synchronises only CUDA tensors: on these CPU processes `distrib_ctx` runs with `sync_bn=False`, and
`test_syncbn_pruned_channels_output_zero` checks in one process that a pruned filter's channel outputs exactly 0 through
a `SyncBatchNorm` (which computes as a BatchNorm there).
"""
import hashlib, os, socket, subprocess, sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from fasterprune.criteria import LargeFinal

WORLD, BS, N_BATCHES, EPOCHS, SPARSITY, LR = 2, 8, 6, 3, 0.8, 0.1

# name -> SparsifyCallback arguments; every criterion that keeps state or draws random numbers, both scopes
CONFIGS = OrderedDict([
    ('global-large_final', dict(scope='global')),
    ('local-random', dict(criterion='random')),
    ('global-random', dict(scope='global', criterion='random')),
    ('global-movement', dict(scope='global', criterion='movement')),
    ('local-taylor', dict(criterion='taylor')),
    ('global-taylor-filter', dict(scope='global', criterion='taylor', granularity='filter')),
    ('global-lamp', dict(scope='global', criterion='lamp')),
])


# the same on a CNN with BatchNorm, where `lookahead_bn` reads per-rank running variances
BN_CONFIGS = OrderedDict([
    ('cnn-global-lookahead_bn-filter', dict(scope='global', criterion='lookahead_bn', granularity='filter')),
    ('cnn-local-lookahead_bn', dict(criterion='lookahead_bn')),
    ('cnn-global-random-filter', dict(scope='global', criterion='random', granularity='filter')),
    ('cnn-global-taylor-filter', dict(scope='global', criterion='taylor', granularity='filter')),
    ('cnn-global-movement', dict(scope='global', criterion='movement')),
    (AUTO := 'cnn-global-auto-cadence', dict(scope='global', update_every='auto')), # under a fixed clock, another budget per rank
])
DISTRIB_CTX = 'fastai-distrib_ctx-lookahead_bn-filter' # the same first configuration through fastai's `distrib_ctx`


class GlobalRNG(LargeFinal):
    "A negative control: magnitude plus noise from the *global* RNG, which differs between ranks"
    def score(self, layer, state=None): return layer.weight.detach().abs() + torch.rand(layer.weight.shape)
    def __repr__(self): return 'global_rng'

CONTROL = dict(scope='global', criterion=GlobalRNG())


def make_model():
    "An MLP without BatchNorm, so that two half batches and one whole batch are the same computation"
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), act2=nn.ReLU(),
                                     fc3=nn.Linear(32, 4)))


def make_cnn():
    "A small CNN with BatchNorm after each conv"
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), act1=nn.ReLU(),
                                     conv2=nn.Conv2d(8, 16, 3, padding=1), bn2=nn.BatchNorm2d(16), act2=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 4)))


def global_data(cnn=False):
    g = torch.Generator().manual_seed(0)
    n = WORLD * BS * N_BATCHES
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4 # learnable, not trivial
    if cnn: x = (x.repeat(1, 12).view(n, 3, 8, 8) + 0.5 * torch.randn(n, 3, 8, 8, generator=g)) * (1 + torch.arange(n) % 3).view(n, 1, 1, 1)
    return x, y # (the CNN's inputs have per-sample scales: running variances differ between the ranks' halves)


def dls_for(rank=None, cnn=False, bs=None):
    "Rank `rank`'s half of every global batch (batch i holds rows [i*2*BS, (i+1)*2*BS)), or the whole global batches"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    x, y = global_data(cnn)
    if rank is None: items, bs = list(zip(x, y)), bs or WORLD * BS
    else:
        idx = torch.arange(len(x)).view(N_BATCHES, WORLD, BS)[:, rank].reshape(-1)
        items, bs = list(zip(x[idx], y[idx])), BS
    return DataLoaders(DataLoader(items, bs=bs, shuffle=False), DataLoader(items[:bs], bs=bs, shuffle=False))


def mask_digest(sp):
    h = hashlib.sha1()
    for k, m in sp.masks.items(): h.update(k.encode()); h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()


def fit(cfg, rank=None, cnn=False, distrib_ctx=False):
    """Train one configuration; rank=None is the single-process run on whole global batches.
    `distrib_ctx`: through fastai's `Learner.distrib_ctx` (Accelerate, `DistributedDL`) instead of the DDP callback"""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import SGD
    from fastai.callback.core import Callback
    from fastai.callback.schedule import fit_one_cycle
    from fastai.torch_core import set_seed
    from fasterprune.callback import SparsifyCallback
    import torch.distributed as dist

    class DDP(Callback):
        "Wrap the model in DistributedDataParallel for the fit, as fastai's DistributedTrainer does"
        order = 11
        def before_fit(self): self.learn.model = nn.parallel.DistributedDataParallel(self.learn.model)
        def after_fit(self): self.learn.model = self.learn.model.module

    class Probe(Callback):
        "Per step: are the gradients equal on every rank at `after_backward`, the local loss, the masks' digest"
        order = SparsifyCallback.order + 1
        def before_fit(self): self.synced, self.losses, self.digests, self.bn_digests = [], [], [], []
        def before_batch(self): # what `lookahead_bn` reads at the mask update: the running variances, per rank
            if self.training: self.bn_digests.append(hashlib.sha1(b''.join(
                b.numpy().tobytes() for n, b in self.learn.model.named_buffers() if n.endswith('running_var'))).hexdigest())
        def after_backward(self):
            if rank is None: return
            g = torch.cat([p.grad.reshape(-1) for p in self.learn.model.parameters()])
            every = [torch.empty_like(g) for _ in range(WORLD)]
            dist.all_gather(every, g)
            self.synced.append(all(torch.equal(every[0], e) for e in every[1:]))
            self.losses.append(float(self.loss))
        def after_step(self): self.digests.append(mask_digest(self.sparsify.sparsifier))

    set_seed(0)
    model = make_cnn() if cnn else make_model()
    torch.manual_seed(1000 + (rank or 0)) # a global RNG that differs between ranks: nothing may depend on it
    probe = Probe()
    # an int `update_every` unless the configuration says 'auto': runs are compared, and 'auto' times its cadence
    sparsify = SparsifyCallback(SPARSITY, **{'update_every': 1, **cfg})
    cbs = ([DDP()] if rank is not None and not distrib_ctx else []) + [sparsify, probe]
    if sparsify.update_every == 'auto':
        import fasterprune.cadence as fcad # the clock the cadence reads
        class Clock: # every reading one second later: a recompute and a step each "take" one second
            now = 0.
            def perf_counter(self): self.now += 1.; return self.now
        fcad.time, sparsify.budget, sparsify.min_rankings = Clock(), (0.02 if not rank else 1.), 1 # alone, rank 1 would choose 1, rank 0 64
    dls = dls_for(None if distrib_ctx else rank, cnn, bs=BS if distrib_ctx else None) # `distrib_ctx` splits the data
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        if distrib_ctx:
            from fastai.distributed import DistributedDL
            def _broadcast(self, t, rank): # fastai's, on a CPU tensor: its own hard-codes `.cuda()` (for NCCL)
                t = torch.tensor(t, dtype=torch.long)
                dist.broadcast(t, rank)
                return t.tolist()
            DistributedDL._broadcast = _broadcast
            with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit_one_cycle(EPOCHS, LR)
        else: learn.fit_one_cycle(EPOCHS, LR)
    import time, fasterprune.cadence as fcad
    fcad.time = time # the real clock again
    sp = learn.sparsify.sparsifier
    return dict(masks=dict(sp.masks), state=sp.state, counts=sp.counts, weights=learn.model.state_dict(),
                params={k: p.detach().clone() for k, p in learn.model.named_parameters()},
                synced=probe.synced, losses=probe.losses, digests=probe.digests, bn_digests=probe.bn_digests,
                model_type=type(learn.model).__name__, cadence=learn.sparsify.cadence)


def rank_local_masks(rank, broadcast):
    "Masks of a criterion drawing from the per-rank global RNG, with the engine's rank-0 broadcast on or off"
    import fasterprune.sparsifier as fs
    from fasterprune.sparsifier import Sparsifier
    torch.manual_seed(0)
    model = make_model()
    torch.manual_seed(1000 + rank)
    world = fs.world_size
    if not broadcast: fs.world_size = lambda: 1
    try: sp = Sparsifier(model, SPARSITY, criterion=GlobalRNG(), scope='global').prune()
    finally: fs.world_size = world
    return mask_digest(sp)


def worker(out: Path):
    "One rank: run every configuration, save what it saw"
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo') # env:// from MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK
    rank = dist.get_rank()
    try:
        res = {name: fit(cfg, rank) for name, cfg in [*CONFIGS.items(), ('control', CONTROL)]}
        res.update({name: fit(cfg, rank, cnn=True) for name, cfg in BN_CONFIGS.items()})
        try: import accelerate # noqa: F401 (fastai.distributed needs it)
        except ImportError: pass
        else: res[DISTRIB_CTX] = fit(next(iter(BN_CONFIGS.values())), rank, cnn=True, distrib_ctx=True)
        res['local_masks'] = {b: rank_local_masks(rank, b) for b in (False, True)}
        torch.save(res, out / f'rank{rank}.pt')
    finally: dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(out: Path):
    "Start WORLD processes the way torchrun does, wait for them, load what each saved"
    port = free_port()
    procs = []
    for r in range(WORLD):
        env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': str(WORLD),
               'RANK': str(r), 'LOCAL_RANK': str(r), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, cwd=Path(__file__).parent.parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try: logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs: q.kill()
            raise
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f'rank {r} failed:\n{log[-4000:]}'
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope='session')
def ranks(tmp_path_factory):
    "The two ranks' results, computed once per test session even under pytest-xdist (shared folder and a file lock)"
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'fasterprune_ddp' # this session's
    root.mkdir(exist_ok=True)
    with FileLock(str(root) + '.lock'):
        if not all((root / f'rank{r}.pt').exists() for r in range(WORLD)): return run_ranks(root)
        return [torch.load(root / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): same(a[k], b[k])
        else: assert torch.equal(a[k], b[k]), k


def accelerate_missing():
    try: import accelerate # noqa: F401
    except ImportError: return True
    return False


IDENTICAL = [*CONFIGS, *BN_CONFIGS, pytest.param(DISTRIB_CTX, marks=pytest.mark.skipif(
    accelerate_missing(), reason="fastai.distributed needs `accelerate` (pip install accelerate)"))]


@pytest.mark.slow
@pytest.mark.parametrize('name', IDENTICAL)
def test_ddp_masks_identical(ranks, name):
    "Bit-identical masks on both ranks after every optimizer step, and identical criterion state, counts and weights"
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0['model_type'] == 'Sequential' # DDP unwrapped again after the fit
    assert len(r0['digests']) == EPOCHS * N_BATCHES and r0['digests'] == r1['digests']
    assert len(set(r0['digests'])) > (EPOCHS * N_BATCHES // 2 if name in CONFIGS else 3) # masks changed at many steps
    same(r0['masks'], r1['masks'])
    same(r0['state'], r1['state'])
    assert r0['counts'] == r1['counts']
    same(r0['params'], r1['params']) # the replicas did not diverge
    if name in CONFIGS: same(r0['weights'], r1['weights'])
    n = sum(m.numel() for m in r0['masks'].values())
    assert sum(int((~m).sum()) for m in r0['masks'].values()) > 0.5 * SPARSITY * n # it did prune


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in [*BN_CONFIGS, DISTRIB_CTX] if 'lookahead_bn' in n])
def test_ddp_lookahead_bn_reads_rank_local_statistics(ranks, name):
    "Why the broadcast is needed: what `lookahead_bn` reads at a mask update (running variances) differs between ranks"
    if name not in ranks[0]: pytest.skip("fastai.distributed needs `accelerate`")
    r0, r1 = ranks[0][name], ranks[1][name]
    assert len(r0['bn_digests']) == EPOCHS * N_BATCHES
    assert sum(a != b for a, b in zip(r0['bn_digests'], r1['bn_digests'])) > EPOCHS * N_BATCHES // 2


@pytest.mark.slow
def test_ddp_auto_cadence_is_rank0s(ranks):
    "`update_every='auto'` chooses its cadence from each rank's timings: every rank takes rank 0's, so they recompute together"
    assert ranks[0][AUTO]['cadence'] == ranks[1][AUTO]['cadence'] == 64 # rank 0's: 1/64 <= 0.02 (rank 1 alone: 1); `_next` ranks sooner on this 18-step fit


@pytest.mark.slow
def test_ddp_rank_dependent_criterion_gets_rank0_masks(ranks):
    "A criterion drawing from the global RNG (seeded per rank) still gives the same masks on every rank: rank 0's"
    r0, r1 = ranks[0]['control'], ranks[1]['control']
    assert r0['digests'] == r1['digests']
    same(r0['masks'], r1['masks'])
    same(r0['weights'], r1['weights'])
    # the comparison has teeth: without the engine's broadcast, the same criterion gives each rank other masks
    assert ranks[0]['local_masks'][False] != ranks[1]['local_masks'][False]
    assert ranks[0]['local_masks'][True] == ranks[1]['local_masks'][True]


@pytest.mark.slow
def test_ddp_gradients_synchronised_before_after_backward(ranks):
    "Why no collective is needed: at fastai's `after_backward` the gradients are already the all-reduced ones"
    for name in [*CONFIGS, *BN_CONFIGS]:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert len(r0['synced']) == EPOCHS * N_BATCHES and all(r0['synced']) and all(r1['synced'])
        assert r0['losses'] != r1['losses'] # each rank saw other data: the equality above comes from DDP


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CONFIGS))
def test_ddp_matches_single_process(ranks, name):
    """Two ranks with half batches end with the masks of one process on the whole batches.

    The model has no BatchNorm and SGD has no randomness, so the arithmetic is the same up to the order of float
    additions (the all-reduce averages two half-batch means where one process takes one mean): weights end within
    ~1.5e-8 of each other, accumulated scores likewise, not bit for bit. That is orders of magnitude below the gaps
    between neighbouring scores at the pruning threshold in these small layers, so the masks are compared exactly; a
    failure with only a handful of differing entries would point at a near-tie rather than a bug (the message says how
    many differ).
    """
    single = fit(CONFIGS[name])
    ddp = ranks[0][name]
    for k, w in single['weights'].items():
        torch.testing.assert_close(ddp['weights'][k], w, rtol=1e-5, atol=1e-6)
    for k, s in single['state'].items():
        for n, t in s.items(): torch.testing.assert_close(ddp['state'][k][n], t, rtol=1e-4, atol=1e-6)
    assert ddp['counts'] == single['counts']
    total = sum(m.numel() for m in single['masks'].values())
    differ = sum(int((single['masks'][k] != m).sum()) for k, m in ddp['masks'].items())
    assert differ == 0, f'{differ} of {total} mask entries differ from the single-process run'



@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_syncbn_pruned_channels_output_zero(training):
    """The model `distrib_ctx` trains by default has `SyncBatchNorm`s (`convert_sync_batchnorm`, as fastai's
    `DistributedTrainer` does): a pruned filter's channel outputs exactly 0 after its SyncBatchNorm and ReLU. (In one
    process a SyncBatchNorm computes as a BatchNorm; what is checked is that the engine zeroes its gamma and beta.)"""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import SGD
    from fastai.callback.schedule import fit_one_cycle # noqa: F401
    from fastai.torch_core import set_seed
    from fasterprune.callback import SparsifyCallback
    set_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(make_cnn())
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    learn = Learner(dls_for(None, cnn=True), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=SparsifyCallback(0.5, granularity='filter'))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, LR)
    sp = learn.sparsify.sparsifier
    outs = {}
    hooks = [getattr(model, a).register_forward_hook(lambda m, i, o, a=a: outs.__setitem__(a, o)) for a in ('act1', 'act2')]
    model.train(training)
    with torch.no_grad(): model(global_data(cnn=True)[0][:32])
    for h in hooks: h.remove()
    n = 0
    for conv, act in (('conv1', 'act1'), ('conv2', 'act2')):
        l = next(l for l in sp.layers if l.name == conv)
        dead = ~l.grouping.out_mask(sp.masks[conv])
        assert dead.any()
        worst = float(outs[act][:, dead].abs().max())
        assert worst == 0, f"pruned channels of `{conv}` output up to {worst:.3g} after their SyncBatchNorm"
        assert outs[act][:, ~dead].abs().sum() > 0
        n += int(dead.sum())
    assert n >= 5


if __name__ == '__main__': worker(Path(sys.argv[1]))
