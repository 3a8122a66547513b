"""Distributed training (issue 6): `SparsifyCallback` under `DistributedDataParallel` keeps identical masks on every rank.

Two CPU processes, gloo backend, started as `torchrun` would start them (this file run as a script with `MASTER_ADDR`,
`MASTER_PORT`, `WORLD_SIZE` and `RANK` in the environment). fastai's own distributed support (`fastai.distributed`:
`to_distributed`, `distrib_ctx`) cannot be used here: it is built on Hugging Face Accelerate, which is not a dependency
of fasterprune (with fastai 2.8 `import fastai.distributed` even fails with a NameError when accelerate is missing). So
each rank wraps `learn.model` in torch's `DistributedDataParallel` from a callback, exactly as fastai's
`DistributedTrainer` does (order 11, wrap in `before_fit`, unwrap in `after_fit`), and reads its own half of every
global batch.

Why the masks agree: DDP all-reduces (averages) the gradients inside `loss.backward()`, before fastai's `after_backward`
event, so every rank sees the same gradients; the weights start equal (DDP broadcasts rank 0's) and every rank takes the
same optimizer step. The engine computes masks from the weights (`large_final`, `lamp`), from a generator seeded by the
criterion's seed and the layer's name (`random`: no global RNG, no rank), or from state accumulated from those
synchronised gradients and weights in `before_step` (`movement`, `taylor`). Nothing needs a collective of its own. The
tests check each step of that argument: gradients equal across ranks at `after_backward` while the local losses differ,
criterion state bit-identical, masks bit-identical at every optimizer step, and the result equal to one process
training on the whole global batch.
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


class GlobalRNG(LargeFinal):
    "A negative control: magnitude plus noise from the *global* RNG, which differs between ranks"
    def score(self, layer, state=None): return layer.weight.detach().abs() + torch.rand(layer.weight.shape)
    def __repr__(self): return 'global_rng'

CONTROL = dict(scope='global', criterion=GlobalRNG())


def make_model():
    "An MLP without BatchNorm, so that two half batches and one whole batch are the same computation"
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), act2=nn.ReLU(),
                                     fc3=nn.Linear(32, 4)))


def global_data():
    g = torch.Generator().manual_seed(0)
    n = WORLD * BS * N_BATCHES
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4 # learnable, not trivial
    return x, y


def dls_for(rank=None):
    "Rank `rank`'s half of every global batch (batch i holds rows [i*2*BS, (i+1)*2*BS)), or the whole global batches"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    x, y = global_data()
    if rank is None: items, bs = list(zip(x, y)), WORLD * BS
    else:
        idx = torch.arange(len(x)).view(N_BATCHES, WORLD, BS)[:, rank].reshape(-1)
        items, bs = list(zip(x[idx], y[idx])), BS
    return DataLoaders(DataLoader(items, bs=bs, shuffle=False), DataLoader(items[:bs], bs=bs, shuffle=False))


def mask_digest(sp):
    h = hashlib.sha1()
    for k, m in sp.masks.items(): h.update(k.encode()); h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()


def fit(cfg, rank=None):
    "Train one configuration; rank=None is the single-process run on whole global batches"
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
        def before_fit(self): self.synced, self.losses, self.digests = [], [], []
        def after_backward(self):
            if rank is None: return
            g = torch.cat([p.grad.reshape(-1) for p in self.learn.model.parameters()])
            every = [torch.empty_like(g) for _ in range(WORLD)]
            dist.all_gather(every, g)
            self.synced.append(all(torch.equal(every[0], e) for e in every[1:]))
            self.losses.append(float(self.loss))
        def after_step(self): self.digests.append(mask_digest(self.sparsify.sparsifier))

    set_seed(0)
    model = make_model()
    torch.manual_seed(1000 + (rank or 0)) # a global RNG that differs between ranks: nothing may depend on it
    probe = Probe()
    cbs = ([DDP()] if rank is not None else []) + [SparsifyCallback(SPARSITY, **cfg), probe]
    learn = Learner(dls_for(rank), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(EPOCHS, LR)
    sp = learn.sparsify.sparsifier
    return dict(masks=dict(sp.masks), state=sp.state, counts=sp.counts, weights=learn.model.state_dict(),
                synced=probe.synced, losses=probe.losses, digests=probe.digests, model_type=type(learn.model).__name__)


def worker(out: Path):
    "One rank: run every configuration, save what it saw"
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo') # env:// from MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK
    rank = dist.get_rank()
    try:
        res = {name: fit(cfg, rank) for name, cfg in [*CONFIGS.items(), ('control', CONTROL)]}
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


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CONFIGS))
def test_ddp_masks_identical(ranks, name):
    "Bit-identical masks on both ranks after every optimizer step, and identical criterion state, counts and weights"
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0['model_type'] == 'Sequential' # DDP unwrapped again after the fit
    assert len(r0['digests']) == EPOCHS * N_BATCHES and r0['digests'] == r1['digests']
    assert len(set(r0['digests'])) > EPOCHS * N_BATCHES // 2 # the masks changed at most steps: each was compared
    same(r0['masks'], r1['masks'])
    same(r0['state'], r1['state'])
    assert r0['counts'] == r1['counts']
    same(r0['weights'], r1['weights'])
    n = sum(m.numel() for m in r0['masks'].values())
    assert sum(int((~m).sum()) for m in r0['masks'].values()) > 0.5 * SPARSITY * n # it did prune


@pytest.mark.slow
def test_ddp_comparison_detects_rank_dependent_masks(ranks):
    "The comparison above has teeth: a criterion drawing from the global RNG (seeded per rank) gives masks that differ"
    r0, r1 = ranks[0]['control'], ranks[1]['control']
    assert r0['digests'][0] != r1['digests'][0]
    assert any(not torch.equal(r0['masks'][k], m) for k, m in r1['masks'].items())


@pytest.mark.slow
def test_ddp_gradients_synchronised_before_after_backward(ranks):
    "Why no collective is needed: at fastai's `after_backward` the gradients are already the all-reduced ones"
    for name in CONFIGS:
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


if __name__ == '__main__': worker(Path(sys.argv[1]))
