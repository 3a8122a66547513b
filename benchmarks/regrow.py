"""Dynamic sparse training (issue 17): static sparse, SET, RigL, one-cycle gradual pruning, GraNet and dense on one budget.

    python benchmarks/regrow.py run --threads 1      # every dataset x sparsity x method x seed (appends to regrow.csv)
    python benchmarks/regrow.py report               # the table; rewrites only the section
                                                     # "Dynamic sparse training (issue 17)" of RESULTS.md

The data, models, learning rates, batch size, epochs and seeds are those of the One-Cycle reproduction
(`benchmarks/schedules.py`: MNIST-5k small CNN, 6 epochs; CIFAR-10 subset ResNet-8, 8 epochs with random flips; one
`fit_one_cycle` of fastai Adam per run), and as there only the `nn.Conv2d` weights are pruned, each layer at the target
('local'), 'weight' granularity. Every method gets the same training budget; they differ only in their masks:

- dense: no pruning;
- static: a random mask at the target from the first step (`partial(one_shot, start=0.)`, criterion 'random'), held;
- SET: the same random start, then every ΔT steps the smallest |w| dropped and as many pruned weights grown at random
  (`Regrow('random')`), drop fraction 0.3 decaying along a cosine, masks frozen from 75 % of training;
- RigL: the same, growing the pruned weights with the largest |dense gradient| of the update step (`Regrow('gradient')`);
- one_cycle: gradual magnitude pruning with One-Cycle's schedule (fasterprune's default callback, 'auto' cadence);
- GraNet: the same one_cycle schedule applied every ΔT steps (`update_every=ΔT`), and after each pruning step a drop
  and grow by gradient with GraNet's death rate (0.5 decaying along a cosine to 0.005, until the end of training).

ΔT: RigL's ΔT = 100 steps gives ~240 mask updates on ImageNet (32k steps, stopping at 75 %) and ~700 on CIFAR-10;
these fits are 372 (MNIST) and 632 (CIFAR) optimizer steps long, where ΔT = 100 would give 2-4 updates and ΔT = 1 would
leave a grown weight one step to grow before the next update. We take ΔT = total/40, rounded (9 and 16 steps): 30 and 29
updates before 75 %, each after ΔT steps of training. Seeds set the initial weights, the batch order and (for static, SET and RigL) the
random initial mask (`RandomCriterion(seed)`).

Results: benchmarks/regrow.csv (one row per fit, appended as they finish: an interrupted run resumes where it stopped),
benchmarks/regrow_turnover.json (the mask updates of the first seed's SET, RigL and GraNet fits, for the docs page),
benchmarks/regrow.json (settings, command, times).
"""
import argparse, contextlib, io, json, os, platform, sys, time
from functools import partial
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402
import schedules as S  # noqa: E402  (data, models, learning rates, seeds: the One-Cycle reproduction's)

import numpy as np
import pandas as pd
import torch
from torch import nn

OUT = S.OUT
CSV, META, TURNOVER = OUT / 'regrow.csv', OUT / 'regrow.json', OUT / 'regrow_turnover.json'
SECTION = '## Dynamic sparse training (issue 17)'
METHODS = ['static', 'set', 'rigl', 'one_cycle', 'granet']
NAMES = dict(dense='dense', static='static sparse (random)', set='SET', rigl='RigL', one_cycle='one_cycle (gradual)', granet='GraNet')
SPARSITIES = [0.9, 0.95]
UPDATES = 40 # ΔT = total steps / UPDATES


def sparsify_cb(method, sparsity, seed, every):
    "The callback of one method, or None for dense"
    from fasterprune.callback import SparsifyCallback
    from fasterprune.criteria import RandomCriterion
    from fasterprune.regrow import Regrow
    from fasterprune.schedules import one_shot, one_cycle
    if method == 'dense': return None
    conv = dict(include=nn.Conv2d)
    if method in ('static', 'set', 'rigl'):
        rg = None if method == 'static' else Regrow('random' if method == 'set' else 'gradient', every=every, seed=seed)
        return SparsifyCallback(sparsity, partial(one_shot, start=0.), criterion=RandomCriterion(seed), regrow=rg, **conv)
    if method == 'one_cycle': return SparsifyCallback(sparsity, one_cycle, **conv)
    if method == 'granet':
        return SparsifyCallback(sparsity, one_cycle, update_every=every, **conv,
                                regrow=Regrow('gradient', fraction=0.5, min_fraction=0.005, stop=1., every=every))
    raise ValueError(method)


def fit_one(dataset, data, method, sparsity, seed):
    "One `fit_one_cycle` of the One-Cycle reproduction's setup with `method`'s masks; a result row, and the mask updates"
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
    s = S.SETUPS[dataset]
    set_seed(seed)
    model = S.MODELS[s['model']]()
    dls = S.make_dls(data, s['bs'], torch.device('cpu'))
    total = s['epochs'] * len(dls.train)
    every = max(1, round(total / UPDATES))
    cbs = [S.random_flip_cb()] if dataset.startswith('cifar') else []
    sp = sparsify_cb(method, sparsity, seed, every)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs + ([sp] if sp else []))
    t0, c0 = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
        learn.fit_one_cycle(s['epochs'], s['lr'])
        acc = float(learn.validate()[1])
    fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rg = getattr(sp, 'regrow', None)
    hist = rg.table() if rg is not None else None
    row = dict(dataset=dataset, model=s['model'], method=method, sparsity=0. if method == 'dense' else sparsity, seed=seed,
               epochs=s['epochs'], lr=s['lr'], bs=s['bs'], steps=total, every=every if rg is not None else None,
               acc=round(acc, 5), conv_sparsity=round(S.conv_sparsity(learn.model), 5),
               n_regrow=len(hist) if hist is not None else 0,
               swapped=int(hist.dropped.sum()) if hist is not None else 0,
               explored=round(float(hist.explored.iloc[-1]), 5) if hist is not None and len(hist) else None,
               fit_s=round(fit_s, 2), cpu_s=round(cpu_s, 2))
    return row, hist


def done_keys(path=CSV):
    if not path.exists(): return set()
    df = pd.read_csv(path)
    return set(zip(df.dataset, df.method, df.sparsity.round(4), df.seed))


def run(args):
    torch.set_num_threads(args.threads)
    done, t_start, n = done_keys(), time.time(), 0
    turnover = json.loads(TURNOVER.read_text()) if TURNOVER.exists() else {}
    for ds in args.datasets:
        data = S.load_data(ds, args)
        jobs = [('dense', 0.)] + [(m, sp) for sp in args.sparsities for m in args.methods]
        for seed in args.seeds:
            for m, sp in jobs:
                if (ds, m, round(sp, 4), seed) in done: continue
                row, hist = fit_one(ds, data, m, sp, seed)
                row['threads'] = args.threads
                S.append_row(row, CSV)
                if hist is not None and seed == args.seeds[0]:
                    turnover[f'{ds} {m} {sp:g}'] = dict(steps=row['steps'], every=row['every'], updates=hist.to_dict('list'))
                    TURNOVER.write_text(json.dumps(turnover, indent=1) + '\n')
                n += 1
                print(f"{ds:6s} {m:9s} {sp:.2f} seed {seed}: acc {row['acc']:.4f}  conv sparsity {row['conv_sparsity']:.4f}  "
                      f"updates {row['n_regrow']} explored {row['explored']}  {row['cpu_s']:.1f}s cpu  "
                      f"(total {time.time() - t_start:.0f}s)", flush=True)
    if not n: print('regrow.py: every fit asked for is already in', CSV); return
    import fastai
    meta = json.loads(META.read_text()) if META.exists() else {}
    meta.setdefault('runs', []).append(dict(command='python benchmarks/regrow.py ' + ' '.join(sys.argv[1:]), fits=n,
        wall_s=round(time.time() - t_start, 1), threads=args.threads, torch=torch.__version__, fastai=fastai.__version__,
        machine=platform.machine(), cpus=os.cpu_count(), load_avg_end=round(os.getloadavg()[0], 2)))
    META.write_text(json.dumps(meta, indent=1) + '\n')


# ---------------------------------------------------------------- report

def fmt(m, s): return f"{m:.2f} ± {s:.2f}" if s == s else f"{m:.2f}"

def table(df, ds):
    "Markdown table of one dataset: rows methods, columns sparsities, accuracy mean ± std over seeds"
    d = df[df.dataset == ds]
    dense = d[d.method == 'dense'].acc * 100
    sps = sorted(d[d.method != 'dense'].sparsity.unique())
    lines = ['| method | ' + ' | '.join(f'{100 * s:g} %' for s in sps) + ' | CPU s per fit (median) |', '|---' * (len(sps) + 2) + '|']
    lines.append(f"| dense | " + ' | '.join(fmt(dense.mean(), dense.std()) for _ in sps) + f" | {d[d.method == 'dense'].cpu_s.median():.1f} |")
    for m in METHODS:
        r = d[d.method == m]
        if not len(r): continue
        best = {s: max(METHODS, key=lambda k: d[(d.method == k) & (d.sparsity == s)].acc.mean() if len(d[(d.method == k) & (d.sparsity == s)]) else -1) for s in sps}
        cells = []
        for s in sps:
            a = r[r.sparsity == s].acc * 100
            c = fmt(a.mean(), a.std()) + f" (n={len(a)})" if len(a) else '–'
            cells.append(f"**{c}**" if best[s] == m and len(a) else c)
        lines.append(f"| {NAMES[m]} | " + ' | '.join(cells) + f" | {r.cpu_s.median():.1f} |")
    return '\n'.join(lines)

def paired(df, ds, a, b):
    "a minus b, paired by seed, per sparsity: (mean points, std, seeds a won, n)"
    d = df[df.dataset == ds]
    out = {}
    for s in sorted(d[d.method != 'dense'].sparsity.unique()):
        x = d[(d.method == a) & (d.sparsity == s)].set_index('seed').acc
        y = d[(d.method == b) & (d.sparsity == s)].set_index('seed').acc
        diff = (x - y).dropna() * 100
        if len(diff): out[s] = (diff.mean(), diff.std(), int((diff > 0).sum()), len(diff))
    return out

def verdict(p, a, b):
    "One claim's outcome from its paired differences `(mean, std, won, n)`"
    m, sd, won, n = p
    if won == n: return f"{NAMES[a]} above {NAMES[b]} on every seed ({m:+.2f})"
    if won == 0: return f"{NAMES[a]} below {NAMES[b]} on every seed ({m:+.2f})"
    if abs(m) < sd: return f"{NAMES[a]} and {NAMES[b]} within the spread ({m:+.2f} ± {sd:.2f}, {won}/{n})"
    return f"{NAMES[a]} {'above' if m > 0 else 'below'} {NAMES[b]} on average, not on every seed ({m:+.2f} ± {sd:.2f}, {won}/{n})"

def report(args):
    df = pd.read_csv(CSV)
    meta = json.loads(META.read_text()) if META.exists() else {}
    cmds = sorted({r['command'] for r in meta.get('runs', [])})
    lines = [SECTION, '',
             "Dynamic sparse training against static sparse training and gradual pruning, on one training budget per dataset "
             "(`benchmarks/regrow.py`; the One-Cycle reproduction's data, models, learning rates and seeds; only the conv "
             "layers pruned, each at the target, 'weight' granularity). Final validation accuracy (%), mean ± std over seeds, "
             "best pruned method in bold. ΔT = total steps / 40, rounded (MNIST 9, CIFAR 16 steps: 30 and 29 mask updates before "
             "75 % for SET and RigL, 41 and 39 for GraNet, which moves masks to the end); see the script's docstring for the protocol and why.", '']
    for ds, desc in (('mnist', 'MNIST-5k, small CNN, 6 epochs'), ('cifar', 'CIFAR-10 subset, ResNet-8, 8 epochs')):
        if not len(df[df.dataset == ds]): continue
        lines += [f"**{desc}** (steps per fit: {int(df[df.dataset == ds].steps.iloc[0])}):", '', table(df, ds), '']
        for a, b in (('rigl', 'static'), ('set', 'static'), ('rigl', 'set'), ('rigl', 'one_cycle'), ('granet', 'one_cycle')):
            p = paired(df, ds, a, b)
            if p: lines.append(f"- {NAMES[a]} − {NAMES[b]}, paired by seed: " + '; '.join(
                f"{100 * s:g} %: {m:+.2f} ± {sd:.2f} points ({w}/{n} seeds)" for s, (m, sd, w, n) in p.items()))
        ex = df[(df.dataset == ds) & df.method.isin(['set', 'rigl'])].groupby(['method', 'sparsity']).explored.median()
        lines.append("- share of the conv weights ever active (median over seeds; a static mask stays at 1 − sparsity; GraNet "
                     "starts dense, so 100 %): " + '; '.join(
            f"{NAMES[m]} {100 * s:g} %: {100 * v:.1f} %" for (m, s), v in ex.items()))
        lines.append('')
    lines += ["The literature's claims (Evci et al. 2020): RigL beats static sparse training, and matches or beats gradual "
              "pruning at an equal budget. What this run says (\"within the spread\": the mean paired difference is smaller "
              "than its standard deviation over the seeds):", '']
    for ds, title in (('mnist', 'MNIST'), ('cifar', 'CIFAR-10')):
        for s in sorted(df[(df.dataset == ds) & (df.method != 'dense')].sparsity.unique()):
            lines.append(f"- {title}, {100 * s:g} %: " + '; '.join(verdict(paired(df, ds, a, b)[s], a, b) for a, b in
                                                              (('rigl', 'static'), ('rigl', 'one_cycle'), ('set', 'static'))))
    lines += ['', "The docs page `nbs/15_regrow_repro.ipynb` discusses why CIFAR-10 differs from the paper (fits 50-250x "
              "shorter than RigL's, one 64-image minibatch as the growth score, One-Cycle rather than uniform gradual "
              "pruning, conv layers only at one sparsity each) and plots the mask turnover.", '',
              'Commands: ' + '; '.join(f'`{c}`' for c in cmds) + f". CPU time is `time.process_time()` per fit on one torch thread "
              "(the 2-core machine was shared with other jobs: wall times are not comparable, CPU times roughly)."]
    write_section(SECTION, '\n'.join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('cmd', choices=['run', 'report'])
    p.add_argument('--datasets', nargs='+', default=['mnist', 'cifar'])
    p.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    p.add_argument('--sparsities', nargs='+', type=float, default=SPARSITIES)
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--data', default=None, help='the CIFAR-10 subset (.npz or its folder); default: settings.ini data_path')
    args = p.parse_args()
    run(args) if args.cmd == 'run' else report(args)


if __name__ == '__main__': main()
