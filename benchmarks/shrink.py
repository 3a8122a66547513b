"""Training that gets cheaper as it prunes (issue 19): `SparsifyCallback(..., granularity='filter', links=coupled, shrink=0.1)`
removes the pruned channels from the model during the fit, against the same fit with masks only and the dense fit.

Main figure: the CPU time of this process (`time.process_time()`, one torch thread) of one whole `fit_one_cycle` (training,
validation, the callback, every shrink with its equivalence check), divided by the dense fit's and by the masked fit's; wall
time beside it. Then the final model's latency (median of many forward passes, eval mode, no gradients, one thread) divided by
the dense model's, at batch 1 and 32, and the final accuracy.

Two parts:
- `time`: torchvision's resnet18 (num_classes=10, standard stem) at 32x32 on the first 1600 images of the CIFAR-10 subset
  (25 batches of 64, validation on 256 images), `fit_one_cycle(3, 1e-3)`, one seed: dense; 50 % and 75 % of filters masked;
  the same shrinking (`shrink=0.1`); and 50 % with `round_to=8`.
- `acc`: the CIFAR ResNet-8 of the One-Cycle reproduction (benchmarks/schedules.py: data, model, epochs, lr, random flips),
  3 seeds, dense / masked / shrinking at 50 % and 75 % of filters.

Pruning: 'filter' granularity, `large_final`, local scope, `links=coupled` (a residual stream's writers drop the same
channels, so they can be removed), one-cycle schedule, the classifier left dense (the default selection protects output
layers). Usage: python benchmarks/shrink.py [--part time|acc|all] [--data PATH]
"""
import argparse, contextlib, io, os, sys, time, warnings, statistics
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path
import torch, pandas as pd
from torch import nn
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import schedules as S  # noqa: E402 (the reproduction's data, models and settings)

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent
CSV, RESULTS = OUT / 'shrink.csv', OUT / 'RESULTS.md'
SECTION = '## Shrinking during the fit (issue 19)'
KINDS = ['dense', 'masked', 'shrink']

def make_cb(kind, sparsity, round_to=None):
    from fasterprune.callback import SparsifyCallback
    from fasterprune.compact import coupled
    if kind == 'dense': return None
    return SparsifyCallback(sparsity, granularity='filter', links=coupled, shrink=0.1 if kind == 'shrink' else None, round_to=round_to)

def latency(model, bs, runs):
    "Median seconds of a forward pass at batch `bs` (eval mode, no gradients)"
    model = model.eval(); x = torch.randn(bs, 3, 32, 32); ts = []
    with torch.no_grad():
        for i in range(runs + 5):
            t = time.perf_counter(); model(x); ts.append(time.perf_counter() - t)
    return statistics.median(ts[5:])

def fit(part, kind, sparsity, seed, data, round_to=None):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    import torchvision
    if part == 'time': model_name, epochs, lr, bs = 'resnet18', 3, 1e-3, 64
    else: s = S.SETUPS['cifar']; model_name, epochs, lr, bs = s['model'], s['epochs'], s['lr'], s['bs']
    set_seed(seed)
    model = torchvision.models.resnet18(num_classes=10) if part == 'time' else S.resnet8()
    dls = S.make_dls(data, bs, torch.device('cpu'))
    cb = make_cb(kind, sparsity, round_to)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=[S.random_flip_cb()] + ([cb] if cb else []))
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        t0, c0 = time.perf_counter(), time.process_time()
        learn.fit_one_cycle(epochs, lr)
        fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        acc = float(learn.validate()[1])
    final = learn.model
    if kind == 'masked': # what the masked fit leaves is a dense-size model; its compact version is what it would ship
        final = learn.compact()
    params = sum(p.numel() for p in final.parameters())
    lat = {b: latency(final, b, runs) for b, runs in ((1, 60), (32, 15))} if seed == 0 else {}
    return dict(part=part, model=model_name, kind=kind, sparsity=sparsity if cb else 0., round_to=round_to, seed=seed,
                epochs=epochs, acc=round(acc, 5), cpu_s=round(cpu_s, 2), fit_s=round(fit_s, 2),
                achieved=round(cb._measure(), 5) if cb else 0., n_shrinks=len(getattr(cb, 'shrinks', []) or []) if cb else 0,
                params=params, lat1_ms=round(1e3 * lat[1], 3) if lat else None, lat32_ms=round(1e3 * lat[32], 3) if lat else None)

def runs(part):
    if part == 'time':
        yield from [('dense', 0., 0, None), ('masked', .5, 0, None), ('shrink', .5, 0, None), ('masked', .75, 0, None),
                    ('shrink', .75, 0, None), ('shrink', .5, 0, 8)]
    else:
        for seed in range(3):
            for kind, sp in (('dense', 0.), ('masked', .5), ('shrink', .5), ('masked', .75), ('shrink', .75)): yield kind, sp, seed, None

def key(r): return (r['part'], r['kind'], float(r['sparsity']), int(r['seed']), None if pd.isna(r['round_to']) else int(r['round_to']))

def table(df):
    out = []
    for part, g in df.groupby('part', sort=False):
        dense = g[g.kind == 'dense']
        d_cpu, d_wall, d_acc = dense.cpu_s.median(), dense.fit_s.median(), dense.acc
        d0 = dense[dense.seed == 0].iloc[0]
        out += [f"**{g.model.iloc[0]}** ({'1 seed, 3 epochs, 1600 images' if part == 'time' else f'{g.seed.nunique()} seeds, {g.epochs.iloc[0]} epochs, CIFAR-10 subset'}):", '',
                '| fit | filters pruned (target → achieved) | CPU s (median) | ÷ dense | ÷ masked | wall s | ÷ dense | shrinks | acc % (mean ± std) | final params | latency b1 ms | ÷ dense | latency b32 ms | ÷ dense |',
                '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
        for (kind, sp, rt), h in g.groupby(['kind', 'sparsity', g.round_to.fillna(0)], sort=False):
            m = g[(g.kind == 'masked') & (g.sparsity == sp)]
            cpu, wall = h.cpu_s.median(), h.fit_s.median()
            h0 = h[h.seed == 0].iloc[0]
            name = kind + (f', round_to={int(rt)}' if rt else '')
            acc = f"{100 * h.acc.mean():.2f} ± {100 * h.acc.std():.2f}" if len(h) > 1 else f"{100 * h.acc.mean():.2f}"
            out.append(f"| {name} | {sp:.2f} → {h.achieved.mean():.3f} | {cpu:.1f} | {cpu / d_cpu:.3f} | "
                       f"{(cpu / m.cpu_s.median()) if len(m) and kind != 'masked' else float('nan'):.3f} | {wall:.1f} | {wall / d_wall:.3f} | "
                       f"{int(h.n_shrinks.median())} | {acc} | {int(h0.params):,} | {h0.lat1_ms:.2f} | {h0.lat1_ms / d0.lat1_ms:.3f} | "
                       f"{h0.lat32_ms:.2f} | {h0.lat32_ms / d0.lat32_ms:.3f} |")
        out.append('')
    return '\n'.join(out)

def write(text):
    old = RESULTS.read_text() if RESULTS.exists() else ''
    if SECTION in old:
        a = old.index(SECTION); b = old.find('\n## ', a + len(SECTION))
        old = old[:a] + old[b + 1:] if b >= 0 else old[:a]
    RESULTS.write_text(old.rstrip('\n') + '\n\n' + text + '\n')

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--part', default='all', choices=['time', 'acc', 'all'])
    ap.add_argument('--data', default=None)
    ap.add_argument('--report-only', action='store_true')
    args = ap.parse_args()
    full = S.cifar_tensors(args.data)
    (xt, yt), (xv, yv) = full
    small = ((xt[:1600], yt[:1600]), (xv[:256], yv[:256]))
    done = {key(r) for r in pd.read_csv(CSV).to_dict('records')} if CSV.exists() else set()
    t_start = time.process_time()
    for part in (['time', 'acc'] if args.part == 'all' else [args.part]):
        if args.report_only: break
        for kind, sp, seed, rt in runs(part):
            if (part, kind, float(sp), seed, rt) in done: continue
            row = fit(part, kind, sp, seed, small if part == 'time' else full, rt)
            print(row, flush=True)
            S.append_row(row, CSV)
    df = pd.read_csv(CSV)
    cmd = 'python benchmarks/shrink.py' + (f' --part {args.part}' if args.part != 'all' else '')
    text = '\n'.join([SECTION, '', f'Command: `{cmd}` (rows in benchmarks/shrink.csv; an interrupted run resumes). One torch thread, '
                      'on the shared 2-core machine. CPU s: `time.process_time()` of the whole `fit_one_cycle` (training, validation, '
                      'the callback, each shrink with its equivalence check). "masked": the same pruning with masks only; its '
                      'params and latency are those of `learn.compact()` after the fit. "shrink": `shrink=0.1` (channels removed '
                      'whenever the pruned share of filters grew by 0.1, and at the end). Latency: the final model, eval mode, median '
                      'of 60 passes at batch 1 and 15 at batch 32, seed 0. Pruning: \'filter\', `large_final`, local, `links=coupled`, '
                      'one-cycle schedule; the classifier stays dense.', '', table(df)])
    write(text)
    print(text)

if __name__ == '__main__': main()
