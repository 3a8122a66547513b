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
    lat = {b: latency(final, b, runs) for b, runs in ((1, 60), (32, 15))} if seed == 0 else {} # right after the fit, under whatever load: see `latency_table`
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
    "Per part: each fit's CPU and wall time against the dense and the masked fit, its shrinks and final accuracy"
    out = []
    for part, g in df.groupby('part', sort=False):
        dense = g[g.kind == 'dense']
        d_cpu, d_wall = dense.cpu_s.median(), dense.fit_s.median()
        out += [f"**{g.model.iloc[0]}** ({'1 seed, 3 epochs, 1600 images of 32x32' if part == 'time' else f'{g.seed.nunique()} seeds, {g.epochs.iloc[0]} epochs, CIFAR-10 subset'}), "
                "whole-fit times (medians over seeds):", '',
                '| fit | filters pruned: target → achieved | CPU s | ÷ dense | ÷ masked | wall s | ÷ dense | shrinks | accuracy % (mean ± std) | final params |',
                '|---|---|---|---|---|---|---|---|---|---|']
        for (kind, sp, rt), h in g.groupby(['kind', 'sparsity', g.round_to.fillna(0)], sort=False):
            m = g[(g.kind == 'masked') & (g.sparsity == sp)]
            cpu, wall = h.cpu_s.median(), h.fit_s.median()
            vs_masked = f"{cpu / m.cpu_s.median():.3f}" if len(m) and kind == 'shrink' else '—'
            name = kind + (f', round_to={int(rt)}' if rt else '')
            acc = f"{100 * h.acc.mean():.2f} ± {100 * h.acc.std():.2f}" if len(h) > 1 else f"{100 * h.acc.mean():.2f}"
            out.append(f"| {name} | {sp:.2f} → {h.achieved.mean():.4f} | {cpu:.1f} | {cpu / d_cpu:.3f} | {vs_masked} | {wall:.1f} | "
                       f"{wall / d_wall:.3f} | {int(h.n_shrinks.median())} | {acc} | {int(h.params.iloc[0]):,} |")
        out.append('')
    return '\n'.join(out)

def final_arch(part, sparsity, round_to):
    "The final model's architecture for a setting, rebuilt without training: local-scope counts do not depend on the weights"
    import torchvision
    from fasterprune.sparsifier import Sparsifier
    from fasterprune.compact import compact, coupled
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if part == 'time' else S.resnet8()
    x = torch.randn(2, 3, 32, 32)
    if sparsity:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            Sparsifier(model, sparsity, 'filter', links=coupled, sample_input=x, round_to=round_to).prune()
            model = compact(model, x)
    return model.eval()

def latency_table(df):
    "Dense and final models timed in shuffled interleaved order (compact benchmark's `interleaved_latency`), one thread"
    import compact as BC
    out = ['Final model latency (eval mode, median of interleaved forward passes: 300 at batch 1, 30 at batch 32, shuffled order; the final '
           'architecture rebuilt from the setting, its parameter count checked against the fits\' final models):', '',
           '| model | filters pruned (round_to) | params | ÷ dense | latency batch 1 ms | ÷ dense | latency batch 32 ms | ÷ dense |',
           '|---|---|---|---|---|---|---|---|']
    rows = {}
    for part, g in df.groupby('part', sort=False):
        sets = g[g.kind == 'shrink'][['sparsity', 'round_to']].drop_duplicates()
        models = {(0., None): final_arch(part, 0., None)}
        for sp, rt in sets.itertuples(index=False):
            rt = None if pd.isna(rt) else int(rt)
            models[(sp, rt)] = final_arch(part, sp, rt)
            fit_params = set(g[(g.kind == 'shrink') & (g.sparsity == sp) & (g.round_to.fillna(0) == (rt or 0))].params)
            assert fit_params == {sum(p.numel() for p in models[(sp, rt)].parameters())}, (part, sp, rt, fit_params)
        lat = {bs: BC.interleaved_latency(models, torch.randn(bs, 3, 32, 32), runs)[0] for bs, runs in ((1, 300), (32, 30))}
        n0 = sum(p.numel() for p in models[(0., None)].parameters())
        for k in models: rows[(g.model.iloc[0], k[0])] = rows.get((g.model.iloc[0], k[0])) or (lat[1][k] / lat[1][(0., None)], lat[32][k] / lat[32][(0., None)])
        for k, mdl in models.items():
            n = sum(p.numel() for p in mdl.parameters())
            name = 'dense' if not k[0] else f"{k[0]:.2f}" + (f" ({k[1]})" if k[1] else '')
            out.append(f"| {g.model.iloc[0]} | {name} | {n:,} | {n / n0:.3f} | {1e3 * lat[1][k]:.2f} | {lat[1][k] / lat[1][(0., None)]:.3f} | "
                       f"{1e3 * lat[32][k]:.2f} | {lat[32][k] / lat[32][(0., None)]:.3f} |")
    return '\n'.join(out + ['']), rows

def verdict(df, rows):
    "The issue's targets at 50 % of filters: whole-fit CPU time ÷ dense <= 0.75, final latency ÷ dense <= 0.40"
    out = []
    for part, g in df.groupby('part', sort=False):
        name = g.model.iloc[0]
        cpu = g[(g.kind == 'shrink') & (g.sparsity == .5) & g.round_to.isna()].cpu_s.median() / g[g.kind == 'dense'].cpu_s.median()
        l1, l32 = rows[(name, .5)]
        ok = lambda v, t: f"{v:.3f} ({'met' if v <= t else 'not met'})"
        out.append(f"- {name}, 50 % of filters: shrinking fit CPU ÷ dense {ok(cpu, .75)} (target ≤ 0.75); final latency ÷ dense "
                   f"{ok(l1, .40)} at batch 1, {ok(l32, .40)} at batch 32 (target ≤ 0.40).")
    return '\n'.join(out)

def write(text):
    from results import write_section
    write_section(SECTION, text, RESULTS)

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
    text = '\n'.join([SECTION, '', f'Command: `{cmd}` (rows in benchmarks/shrink.csv; an interrupted run resumes; '
                      '`--report-only` rewrites this section from them). One torch thread, on the shared 2-core machine (other jobs '
                      'ran beside it: wall times are inflated, CPU times much less). CPU s: `time.process_time()` of the whole '
                      '`fit_one_cycle` (training, validation, the callback, each shrink with its equivalence check). "masked": the '
                      'same pruning with masks only. "shrink": `shrink=0.1` (channels removed whenever the pruned share of filters '
                      'grew by 0.1, and at the end). Pruning: \'filter\', `large_final`, local, `links=coupled`, one-cycle '
                      'schedule; the classifier stays dense. Accuracy is on the validation images (256 for resnet18, the 1017 test '
                      'images of the subset for ResNet-8).', '', table(df)])
    lat, rows = latency_table(df)
    text += '\n' + lat + '\n' + verdict(df, rows)
    write(text)
    print(text)

if __name__ == '__main__': main()
