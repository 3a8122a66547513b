"""A small ViT on the CIFAR-10 subset, pruned while it trains (issue 18): by attention heads, by heads and MLP hidden
units, and by 2:4 on its Linear layers; accuracy against dense, and the size and CPU latency of the compacted model.

    python benchmarks/vit.py run --threads 1      # every method x seed (rows appended as they finish: resumable)
    python benchmarks/vit.py report               # the table; rewrites only the section "ViT ... (issue 18)" of RESULTS.md

Model: timm's `VisionTransformer` (img 32, patch 4: 64 tokens; width 96, depth 4, 6 heads of 16, MLP ratio 2, average
pooling, no class token; 0.31 M parameters), random init. One `fit_one_cycle` per run (fastai Adam, batch 64, random
horizontal flips), the same length and learning rate for every method; pruning follows `one_cycle` from the first batch
to the last, `large_final` (magnitude), each layer at the target ('local'). Methods:
- dense;
- heads: `SparsifyCallback(0.5, granularity='head')`: half of each attention layer's heads (3 of 6);
- heads+mlp: the same, plus `SparsifyCallback(0.5, granularity='filter', include='*mlp.fc1')`: half of each MLP's
  hidden units;
- 2:4: `SparsifyCallback(0.5, granularity='2:4', include='blocks.*')`: every Linear layer of the encoder blocks.
After the fit, heads and heads+mlp are compacted (`compact`), which checks that the small model's outputs equal the
masked model's; the table gives its parameters, its multiply-accumulates per image (`count_macs`: Linear and convolution layers;
attention's own products, which shrink with the heads too, are not counted) and its CPU forward
time against the dense architecture's (batch 64, one thread, process CPU time, median of interleaved repeats; wall beside).
2:4 gives no CPU speed-up: its row reports the share of Linear weights in a valid 2:4 pattern, and the GPU latency table
(`benchmarks/compact.py`) is for a machine with an NVIDIA GPU.

Data: `cifar10_subset.npz` (5085 train / 1017 test), from `--data` or settings.ini's `data_path`.
Results: benchmarks/vit.csv (one row per fit), benchmarks/vit.json (settings, commands).
"""
import argparse, contextlib, io, json, platform, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402
from schedules import cifar_tensors, make_dls, random_flip_cb, append_row, CFG, OUT  # noqa: E402

import numpy as np
import pandas as pd
import torch
from torch import nn

CSV, META = OUT / 'vit.csv', OUT / 'vit.json'
SECTION = '## ViT on the CIFAR-10 subset: heads, MLP units and 2:4 (issue 18)'
METHODS = ['dense', 'heads', 'heads+mlp', '2:4']
SETUP = dict(epochs=12, lr=2e-3, bs=64, sparsity=0.5)

def vit(img_size=32, patch_size=4, in_chans=3, embed_dim=96, depth=4, num_heads=6, mlp_ratio=2, num_classes=10):
    "A small timm ViT: average pooling, no class token"
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes, global_pool='avg', class_token=False)

def callbacks(method, sparsity):
    "The pruning callbacks of one method"
    from fasterprune.callback import SparsifyCallback
    if method == 'dense': return []
    if method == '2:4': return [SparsifyCallback(0.5, granularity='2:4', include='blocks.*')]
    cbs = [SparsifyCallback(sparsity, granularity='head')]
    if method == 'heads+mlp': cbs.append(SparsifyCallback(sparsity, granularity='filter', include='*mlp.fc1'))
    return cbs

def head_share(model):
    "Share of the attention head groups whose output is exactly zero (`dead_groups`: measured from the weights)"
    from fasterprune.attention import attention_heads
    from fasterprune.compact_heads import dead_groups
    dead = [dead_groups(lay)[0] for lay in attention_heads(model)]
    return float(sum(d.sum() for d in dead) / sum(len(d) for d in dead))

def fc1_share(model):
    "Share of the MLP hidden units whose fc1 row (and bias) is all zero"
    fc1 = [m for n, m in model.named_modules() if n.endswith('mlp.fc1')]
    z = sum(int(((m.weight == 0).all(1) & (m.bias == 0)).sum()) for m in fc1)
    return z / sum(m.out_features for m in fc1)

def nm_share(model):
    "Share of the encoder blocks' Linear weights that lie in valid 2:4 blocks (along the inputs)"
    ws = [m.weight.detach() for n, m in model.named_modules() if n.startswith('blocks.') and isinstance(m, nn.Linear)]
    ok = sum(int(((w.reshape(-1, 4) != 0).sum(1) <= 2).sum()) * 4 for w in ws)
    return ok / sum(w.numel() for w in ws)

def cpu_latency(models, x, reps=15):
    "Median CPU and wall time of one forward of each model on `x`, repeats interleaved"
    cpu, wall = [[] for _ in models], [[] for _ in models]
    with torch.no_grad():
        for m in models: m.eval()(x)
        for _ in range(reps):
            for i, m in enumerate(models):
                c0, t0 = time.process_time(), time.perf_counter()
                m(x)
                cpu[i].append(time.process_time() - c0); wall[i].append(time.perf_counter() - t0)
    return [float(np.median(c)) for c in cpu], [float(np.median(w)) for w in wall]

def markdown(df):
    "A DataFrame as a markdown table (without the optional `tabulate`)"
    cols = [df.index.name or ''] + [str(c) for c in df.columns]
    rows = [[str(i)] + [str(v) for v in r] for i, r in zip(df.index, df.itertuples(index=False))]
    return '\n'.join(['| ' + ' | '.join(cols) + ' |', '|---' * len(cols) + '|'] + ['| ' + ' | '.join(r) + ' |' for r in rows])

def n_params(m): return sum(p.numel() for p in m.parameters())

def fit_one(data, method, seed, epochs=None, lr=None):
    "One fit; a result row"
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    from fasterprune.compact import compact, count_macs
    epochs, lr, s = epochs or SETUP['epochs'], lr or SETUP['lr'], SETUP['sparsity']
    set_seed(seed)
    model = vit()
    dls = make_dls(data, SETUP['bs'], torch.device('cpu'))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[random_flip_cb()] + callbacks(method, s))
    c0, t0 = time.process_time(), time.perf_counter()
    with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
        learn.fit_one_cycle(epochs, lr)
        acc = float(learn.validate()[1])
    cpu_s, fit_s = time.process_time() - c0, time.perf_counter() - t0
    m = learn.model.eval()
    row = dict(method=method, seed=seed, epochs=epochs, lr=lr, sparsity=0. if method == 'dense' else s, acc=round(acc, 5),
               heads_pruned=round(head_share(m), 4), fc1_pruned=round(fc1_share(m), 4), nm_valid=round(nm_share(m), 4),
               params=n_params(m), cpu_s=round(cpu_s, 1), fit_s=round(fit_s, 1))
    if method.startswith('heads'):
        xv = data[1][0]
        small = compact(m, xv[:8])
        x = xv[:64]
        (c_d, c_s), (w_d, w_s) = cpu_latency([m, small], x)
        with torch.no_grad(): same = bool((small(xv).argmax(1) == m(xv).argmax(1)).all())
        row.update(compact_params=n_params(small), macs=int(sum(count_macs(m, x[:1]).values())),
                   compact_macs=int(sum(count_macs(small, x[:1]).values())), cpu_ms=round(1e3 * c_d, 2),
                   compact_cpu_ms=round(1e3 * c_s, 2), wall_ms=round(1e3 * w_d, 2), compact_wall_ms=round(1e3 * w_s, 2),
                   same_predictions=same)
    return row

def done(path=CSV):
    if not path.exists(): return set()
    df = pd.read_csv(path)
    return set(zip(df.method, df.seed))

def run(args):
    torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore', category=FutureWarning)
    data = cifar_tensors(args.data)
    meta = json.loads(META.read_text()) if META.exists() else {}
    cmds = meta.get('commands', []) + ['python benchmarks/vit.py ' + ' '.join(sys.argv[1:])] # every run that wrote rows
    META.write_text(json.dumps(dict(setup=SETUP, commands=cmds, threads=args.threads, torch=torch.__version__,
                                    machine=platform.processor() or platform.machine()), indent=1) + '\n')
    have = done()
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in have: continue
            row = fit_one(data, method, seed)
            append_row(row, CSV)
            print(row, flush=True)

def table(df):
    "Mean ± std over seeds, per method"
    g = df.groupby('method', sort=False)
    def ms(c, f=1, d=2): return g[c].agg(lambda v: f"{f * v.mean():.{d}f} ± {f * v.std(ddof=1):.{d}f}" if len(v) > 1 else f"{f * v.mean():.{d}f}")
    t = pd.DataFrame({'seeds': g.seed.count(), 'accuracy %': ms('acc', 100), 'heads pruned %': ms('heads_pruned', 100, 1),
                      'MLP units pruned %': ms('fc1_pruned', 100, 1), 'in 2:4 pattern %': ms('nm_valid', 100, 1)})
    t.loc[t.index != '2:4', 'in 2:4 pattern %'] = '' # zero rows of pruned heads count as 2:4 blocks too: shown for the 2:4 run only
    return t.reindex([m for m in METHODS if m in t.index])

def compact_table(df):
    "Size and CPU latency of the compacted models against the dense architecture"
    d = df[df.method.str.startswith('heads')].groupby('method', sort=False)
    med = lambda c: d[c].median()
    return pd.DataFrame({'parameters': med('params').astype(int), 'compact parameters': med('compact_params').astype(int),
                         'MACs / image': med('macs').astype(int), 'compact MACs / image': med('compact_macs').astype(int),
                         'CPU ms (b64)': med('cpu_ms'), 'compact CPU ms': med('compact_cpu_ms'),
                         'CPU ratio': (d.apply(lambda r: (r.compact_cpu_ms / r.cpu_ms).median())).round(3),
                         'wall ratio': (d.apply(lambda r: (r.compact_wall_ms / r.wall_ms).median())).round(3),
                         'same predictions': d.same_predictions.all()})

def section_text(df, meta):
    t, c = table(df), compact_table(df)
    dense = df[df.method == 'dense'].set_index('seed').acc
    gaps = {m: (df[df.method == m].set_index('seed').acc - dense).dropna() * 100 for m in METHODS[1:]}
    gap = lambda m: f"{gaps[m].mean():+.2f} ({', '.join(f'{v:+.2f}' for v in gaps[m])})" if len(gaps[m]) else 'n/a'
    return '\n'.join([SECTION, '',
        f"Commands: {', '.join(f'`{c}`' for c in meta['commands'])}, then `python benchmarks/vit.py report`; "
        f"{meta['threads']} torch thread, torch {meta['torch']}.",
        '', __doc__.split('\n\n')[2].strip(), '',
        'Accuracy on the 1017 test images (mean ± std over seeds); the pruned shares are measured from the weights after the fit:', '',
        markdown(t), '',
        'Accuracy minus dense, per seed (points): ' + '; '.join(f"{m} {gap(m)}" for m in METHODS[1:]) + '.', '',
        'The compacted models (medians over seeds; the dense architecture is the masked model before compaction):', '',
        markdown(c), '',
        '2:4 on GPU: not measured here (no NVIDIA GPU was available); `benchmarks/compact.py` has the latency code path.'])

def report(args):
    df, meta = pd.read_csv(CSV), json.loads(META.read_text())
    print(markdown(table(df))); print(markdown(compact_table(df)))
    write_section(SECTION, section_text(df, meta))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('cmd', choices=['run', 'report'])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--data', default=None, help='the CIFAR-10 subset (default: settings.ini data_path)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    args = p.parse_args()
    {'run': run, 'report': report}[args.cmd](args)
