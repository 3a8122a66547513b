"""Cost of pruning while training (issues 3, 14): `SparsifyCallback`'s fit time against the dense fit, and the memory it holds.

Main figure: the CPU time of this process (`time.process_time()`) for one `fit_one_cycle(2, 1e-3)` with the callback,
divided by the same for the dense fit; the wall-time ratio beside it. On a shared machine other jobs disturb CPU time far
less than wall time. One torch thread by default (`--threads`). Every run of every kind happens in this one process,
interleaved in a rotating order (rep r starts at kind r), median of `--reps` each, after one untimed dense warm-up fit.

Models: torchvision's resnet18 (num_classes=10, standard stem) and `fasterprune.demo.small_cnn(3, 10, 32)`, on 25
synthetic batches of 64 3x32x32 images (one validation batch), fastai's default Adam, data loaded in this process.

Runs (`--kinds`): `dense`; `local`/`global`: `SparsifyCallback(0.9, one_cycle, 'weight', large_final, scope)` at the
default update cadence; `local_every1`/`global_every1`: the same with `update_every=1` (exact masks at every step);
`filter` (0.5, large_final, local), `2:4` (0.5), `lookahead_local`/`lookahead_global`, `taylor`, `movement` ('weight',
0.9, local), all at the default cadence; `fasterai_local`/`fasterai_global`: fasterai 0.4.1's
`SparsifyCallback(0.9, 'weight', scope, large_final, one_cycle, layer_type=(nn.Conv2d, nn.Linear))`, when
`import fasterai` works. Memory: bytes the callback holds (masks, criterion state, weight copies) / parameter bytes.

Engine profile: milliseconds of process CPU time per call of `Sparsifier.update` / `mask_grads` / `apply`, and of the
first global `update(1.)` from dense weights (median of 5 fresh `Sparsifier`s), also on torchvision's resnet50 (`--resnet50`).

    python benchmarks/overhead.py                  # prints the markdown section
    python benchmarks/overhead.py --write          # also replaces the "Callback overhead" section of RESULTS.md

fasterai (the `bench` extra) needs its own environment that sees this one, e.g.
`python -m venv --system-site-packages /tmp/fa && /tmp/fa/bin/pip install fasterai==0.4.1`; run this script with
`/tmp/fa/bin/python` to measure both side by side.
"""
import argparse, contextlib, copy, io, os, platform, re, statistics, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section, RESULTS  # noqa: E402

import torch, torchvision
from torch import nn
from fastai.torch_core import set_seed
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)

from fasterprune.callback import SparsifyCallback
from fasterprune.schedules import one_cycle
from fasterprune.criteria import large_final
from fasterprune.demo import small_cnn
from fasterprune.sparsifier import Sparsifier

try:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import fasterai
        from fasterai.sparse.all import SparsifyCallback as FaSparsify, large_final as fa_large_final, one_cycle as fa_one_cycle
except ImportError: fasterai = None

MODELS = dict(small_cnn=lambda: small_cnn(3, 10, 32), resnet18=lambda: torchvision.models.resnet18(num_classes=10))
SECTION, OLD_SECTIONS = '## Callback overhead (issues 3, 14)', ['## Callback overhead (issue 3)']
LONG_SECTION = '## Callback overhead on longer fits (issue 14)' # `--epochs` other than 2: where the default cadence ranks less often

# kind: (what the table says, SparsifyCallback arguments); None for dense and fasterai
KINDS = {
    'dense': ('no callback', None),
    'local': ("'weight' 0.9 large_final local, default cadence", dict(sparsity=0.9, scope='local')),
    'global': ("'weight' 0.9 large_final global, default cadence", dict(sparsity=0.9, scope='global')),
    'local_every1': ("'weight' 0.9 large_final local, `update_every=1`", dict(sparsity=0.9, scope='local', update_every=1)),
    'global_every1': ("'weight' 0.9 large_final global, `update_every=1`", dict(sparsity=0.9, scope='global', update_every=1)),
    'filter': ("'filter' 0.5 large_final local", dict(sparsity=0.5, granularity='filter')),
    '2:4': ("'2:4' 0.5 large_final local", dict(sparsity=0.5, granularity='2:4')),
    'lookahead_local': ("'weight' 0.9 lookahead local", dict(sparsity=0.9, criterion='lookahead')),
    'lookahead_global': ("'weight' 0.9 lookahead global", dict(sparsity=0.9, criterion='lookahead', scope='global')),
    'taylor': ("'weight' 0.9 taylor local", dict(sparsity=0.9, criterion='taylor')),
    'movement': ("'weight' 0.9 movement local", dict(sparsity=0.9, criterion='movement')),
    'fasterai_local': ("fasterai 0.4.1, 'weight' 0.9 large_final local", None),
    'fasterai_global': ("fasterai 0.4.1, 'weight' 0.9 large_final global", None),
}
FA_KINDS = ('fasterai_local', 'fasterai_global')

def synthetic_dls(n_batches=25, bs=64):
    "Random 3x32x32 images and labels: `n_batches` training batches, one validation batch (loaded in this process)"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn((n_batches + 1) * bs, 3, 32, 32, generator=g), torch.randint(0, 10, ((n_batches + 1) * bs,), generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items[:n_batches * bs], bs=bs, shuffle=False, num_workers=0),
                       DataLoader(items[n_batches * bs:], bs=bs, num_workers=0))

FA_BUFFERS = ('_mask', '_init_weights', '_init_biases', '_old_weights')

class FaProbe(Callback):
    "Counts fasterai's mask recomputes (its `before_batch` runs them when the schedule value changed) and the buffers it holds"
    order = FaSparsify.order + 1 if fasterai is not None else 1
    def __init__(self, fa_cb): self.fa_cb, self.n_updates, self.held = fa_cb, 0, 0
    def before_batch(self):
        if self.training and self.fa_cb.schedule.changed: self.n_updates += 1
    def after_epoch(self): # fasterai removes its buffers in `after_fit`
        self.held = sum(b.numel() * b.element_size() for m in self.learn.model.modules()
                        for k, b in m._buffers.items() if k in FA_BUFFERS and b is not None)

CB_CPU = [0.] # process CPU seconds spent in the pruning callback's events during the current fit

def _timed(cls):
    "Make every event of `cls` add the process CPU time it takes to `CB_CPU`: the pruning callback's own work, measured in the fit"
    call = cls.__call__
    def timed(self, event_name):
        t = time.process_time()
        try: return call(self, event_name)
        finally: CB_CPU[0] += time.process_time() - t
    cls.__call__ = timed

_timed(SparsifyCallback)
if fasterai is not None: _timed(FaSparsify)

def make_cbs(kind):
    if kind == 'dense': return []
    if kind in FA_KINDS:
        fa = FaSparsify(0.9, 'weight', kind.split('_')[1], fa_large_final, fa_one_cycle, layer_type=(nn.Conv2d, nn.Linear))
        return [fa, FaProbe(fa)]
    kw = dict(granularity='weight', criterion=large_final, scope='local') | KINDS[kind][1]
    return [SparsifyCallback(kw.pop('sparsity'), one_cycle, **kw)]

def held_bytes(cb):
    "Bytes the callback holds: masks, criterion state, lottery-ticket weights, any queue or indices the engine kept"
    sp = cb.sparsifier
    ts = list(sp.masks.values()) + [t for s in sp.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    ts += [t for p in sp.plans.values() for v in p.values() for t in (v.values() if isinstance(v, dict) else [v]) if isinstance(t, torch.Tensor)]
    ts += [t for t in sp.pruned_now.values() if isinstance(t, torch.Tensor)]
    ts += [t for t in (cb.snapshot or {}).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)

def fit_once(model_name, kind, dls, epochs=2):
    "CPU seconds and wall seconds of one `fit_one_cycle`, and what the callback reports after it"
    set_seed(0)
    learn = Learner(dls, MODELS[model_name](), loss_func=CrossEntropyLossFlat(), cbs=make_cbs(kind))
    with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(): # fasterai prints
        warnings.simplefilter('ignore')
        CB_CPU[0], c, w = 0., time.process_time(), time.perf_counter()
        learn.fit_one_cycle(epochs, 1e-3)
        cpu, wall, in_cb = time.process_time() - c, time.perf_counter() - w, CB_CPU[0]
    params = sum(p.numel() * p.element_size() for p in learn.model.parameters())
    out = dict(cpu=cpu, wall=wall, cb_share=in_cb / (cpu - in_cb), cadence=None, n_updates=None, max_gap=None, mem=None)
    cb = next((cb for cb in learn.cbs if isinstance(cb, SparsifyCallback)), None)
    if cb is not None:
        out.update(cadence=getattr(cb, 'cadence', None), n_updates=getattr(cb, 'n_updates', None),
                   max_gap=getattr(cb, 'max_gap', None), mem=held_bytes(cb) / params)
    probe = next((cb for cb in learn.cbs if isinstance(cb, FaProbe)), None)
    if probe is not None: out.update(n_updates=probe.n_updates, mem=probe.held / params)
    return out

def bench(reps, models, kinds, epochs=2):
    dls, rows = synthetic_dls(), []
    for m in models:
        fit_once(m, 'dense', dls) # warm-up, not timed
        runs = {k: [] for k in kinds}
        for r in range(reps):
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                o = fit_once(m, k, dls, epochs)
                runs[k].append(o)
                print(f"{m:9s} {k:16s} rep {r}: cpu {o['cpu']:6.2f} s wall {o['wall']:6.2f} s  in callback {100 * o['cb_share']:5.2f} %  cadence {o['cadence']} "
                      f"updates {o['n_updates']} max_gap {o['max_gap']}", file=sys.stderr, flush=True)
        med = {k: {t: statistics.median(o[t] for o in runs[k]) for t in ('cpu', 'wall', 'cb_share')} for k in kinds}
        d = med.get('dense')
        for k in kinds:
            last = runs[k][-1]
            rows.append(dict(model=m, run=k, cpu=med[k]['cpu'], wall=med[k]['wall'], cb_share=med[k]['cb_share'] if k != 'dense' else None,
                             cpu_ratio=med[k]['cpu'] / d['cpu'] if d else None, wall_ratio=med[k]['wall'] / d['wall'] if d else None,
                             cadence=last['cadence'], n_updates=last['n_updates'], max_gap=last['max_gap'], mem=last['mem'],
                             all_cpu=[o['cpu'] for o in runs[k]]))
    return rows

def ancestors():
    "This process and the processes that started it (a shell or `timeout` whose command line names this script)"
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try: pid = int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): break
    return pids

def other_benchmarks():
    "Other processes running a script from benchmarks/ (the machine is shared)"
    out, mine = [], ancestors()
    for p in Path('/proc').glob('[0-9]*'):
        try: cmd = (p/'cmdline').read_bytes().replace(b'\0', b' ').decode()
        except OSError: continue
        if int(p.name) not in mine and 'benchmarks/' in cmd and 'python' in cmd: out.append(cmd)
    return out

def wait_for_load(limit, max_wait):
    "Wait (up to `max_wait` s) until the 1-minute load average is below `limit` and no other benchmark runs"
    t0 = time.time()
    while time.time() - t0 < max_wait:
        if os.getloadavg()[0] <= limit and not other_benchmarks():
            time.sleep(5 + 10 * (os.getpid() % 7) / 7) # stagger, then check again: others may be waiting too
            if os.getloadavg()[0] <= limit and not other_benchmarks(): break
        time.sleep(10)
    return os.getloadavg()[0]

def cpu_ms(f, n, setup=None):
    "Median milliseconds of process CPU time of `f(i)` (after an untimed `setup(i)`, when given) over `i` in range(n)"
    ts = []
    for i in range(n):
        a = setup(i) if setup else None
        t = time.process_time(); f(i) if a is None else f(a); ts.append(time.process_time() - t)
    return 1e3 * statistics.median(ts)

FIRST = 'first global update from dense weights (fresh Sparsifier, `update(1.)`), median of 5'

def first_global(model, n=5):
    "CPU ms of a fresh `Sparsifier(model, 0.9, 'weight', large_final, 'global').update(1.)` on a dense copy of `model`"
    def setup(i):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return Sparsifier(copy.deepcopy(model), 0.9, 'weight', large_final, 'global')
    return cpu_ms(lambda sp: sp.update(1.), n, setup)

def profile(model_name, n_steps=50):
    "Milliseconds of CPU time per call of the engine calls the callback makes, on a fresh model"
    set_seed(0)
    model = MODELS[model_name]()
    out = {FIRST: first_global(model)}
    for scope in ('local', 'global'): # each on fresh weights (not those the other scope pruned)
        set_seed(0)
        model = MODELS[model_name]()
        for p in model.parameters(): p.grad = torch.randn_like(p)
        sp = Sparsifier(model, 0.9, 'weight', large_final, scope)
        shares = [one_cycle(i / (n_steps - 1)) for i in range(n_steps)]
        out[f'update ({scope}, counts change)'] = cpu_ms(lambda i: sp.update(shares[i]), n_steps)
    out['update (counts unchanged)'] = cpu_ms(lambda i: sp.update(1.), 20)
    out['mask_grads'] = cpu_ms(lambda i: sp.mask_grads(), 20)
    out['apply'] = cpu_ms(lambda i: sp.apply(), 20)
    return out

def _f(v, fmt='.2f'): return '—' if v is None else format(v, fmt)

def _mem(v): return '—' if v is None else f'{v:.3f}' if v >= 0.01 or v == 0 else f'{v:.1e}'

def _gap(v): return '—' if v is None else f'{v:.4f}' if v >= 1e-4 or v == 0 else f'{v:.1e}'

def table(rows):
    out = ['| model | run | CPU s | CPU ÷ dense | in callback | wall s | wall ÷ dense | cadence | rankings | max gap | memory ÷ params | CPU s, all runs |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        cb = '—' if r['cb_share'] is None else f"{100 * r['cb_share']:.1f} %"
        out.append(f"| {r['model']} | {r['run']} | {r['cpu']:.2f} | **{_f(r['cpu_ratio'])}** | {cb} | {r['wall']:.2f} | {_f(r['wall_ratio'])} | "
                   f"{_f(r['cadence'], '')} | {_f(r['n_updates'], '')} | {_gap(r['max_gap'])} | {_mem(r['mem'])} | "
                   f"{', '.join(f'{t:.2f}' for t in r['all_cpu'])} |")
    return '\n'.join(out)

def kinds_legend(kinds):
    return '\n'.join(f'- `{k}`: {KINDS[k][0]}' for k in kinds)

# issue 14's targets, CPU-time ratio to the dense fit
TARGETS = [('default cadence', ('local', 'global'), ('small_cnn', 'resnet18'), 1.05),
           ('`update_every=1`', ('local_every1', 'global_every1'), ('resnet18',), 1.15),
           ('filter, 2:4, lookahead, taylor, movement', ('filter', '2:4', 'lookahead_local', 'lookahead_global', 'taylor', 'movement'),
            ('resnet18',), 1.10)]
R50_TARGET = 0.10 # s, the first global update from dense weights on resnet50

def verdict(rows, prof):
    "The issue's targets, met or not, from this run"
    out = []
    for what, kinds, models, target in TARGETS:
        got = [r for r in rows if r['run'] in kinds and r['model'] in models and r['cpu_ratio'] is not None]
        if not got: continue
        ok = all(r['cpu_ratio'] <= target for r in got)
        ok_in = all(r['cb_share'] is not None and 1 + r['cb_share'] <= target for r in got)
        vals = ', '.join(f"{r['model']} {r['run']} {r['cpu_ratio']:.2f}, in callback {100 * r['cb_share']:.1f} %" for r in got)
        out.append(f"{what} ≤ {target:.2f}: {'met' if ok else 'NOT met'} by the CPU-time ratio, {'met' if ok_in else 'NOT met'} by the time "
                   f"in the callback ({vals})")
    info = [r for r in rows if r['model'] == 'small_cnn' and r['run'] in TARGETS[2][1] and r['cpu_ratio'] is not None]
    if info: out.append('(small_cnn, no target: ' + ', '.join(f"{r['run']} {r['cpu_ratio']:.2f}" for r in info) + ')')
    if prof and 'resnet50' in prof:
        s = prof['resnet50'][FIRST] / 1e3
        out.append(f"resnet50 first global update ≤ {R50_TARGET:.2f} s: {'met' if s <= R50_TARGET else 'NOT met'} ({s:.3f} s)")
    mems = [r['mem'] for r in rows if r['run'] in ('local', 'global', 'local_every1', 'global_every1') and r['mem'] is not None]
    if mems: out.append(f"large_final memory ≤ 0.26 × parameter bytes (issue 3): {'met' if max(mems) <= 0.26 else 'NOT met'} (at most {max(mems):.3f})")
    return 'Targets (issue 14, CPU-time ratio to the dense fit; issue 3 for memory): ' + '; '.join(out) + '.'

def prof_table(prof):
    keys = list(dict.fromkeys(k for p in prof.values() for k in p))
    out = ['| call | ' + ' | '.join(f'{m} ms' for m in prof) + ' |', '|---|' + '---|' * len(prof)]
    for k in keys: out.append(f'| {k} | ' + ' | '.join(_f(prof[m].get(k)) for m in prof) + ' |')
    return '\n'.join(out)

def write(text, path=RESULTS):
    "Replace this benchmark's section of `path`, under its new title or an old one (never leaving both)"
    md = path.read_text() if path.exists() else ''
    has = lambda t: re.search(rf'^{re.escape(t)}$', md, re.M) is not None
    for old in OLD_SECTIONS:
        if not has(old): continue
        if not has(SECTION): return write_section(old, text, path) # in the old section's place, under the new title
        md = re.sub(rf'^{re.escape(old)}\n.*?(?=^## |\Z)', '', md, flags=re.S | re.M)
        path.write_text(md.rstrip('\n') + '\n')
    write_section(SECTION, text, path)

FA_RULE = ("fasterai's callback recomputes every mask in `before_batch` whenever its schedule's value at "
           "`round(pct_train, 3)` changes, i.e. at every training batch of a fit shorter than 1,000 batches (here all 50), and "
           "multiplies the weights by the masks after every optimizer step (it does not mask gradients). By default it prunes "
           "only `nn.Conv2d` layers (`layer_type=nn.Conv2d`); it is given `layer_type=(nn.Conv2d, nn.Linear)` here so that it "
           "prunes the same layers as fasterprune's default selection. It holds float masks and a copy of every weight and bias "
           "of every layer with a weight, BatchNorm included (`_init_weights`, `_init_biases`, kept for lottery tickets even "
           "when `lth=False`), which its memory column counts; its 'rankings' column counts its recomputes")

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--reps', type=int, default=3, help='timed runs of each kind (median reported)')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--kinds', nargs='+', default=list(KINDS), choices=list(KINDS), help='runs to measure (dense is always added)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (the main ratio is CPU time on one thread)')
    p.add_argument('--resnet50', action=argparse.BooleanOptionalAction, default=True,
                   help="profile the first global update from dense weights on torchvision's resnet50")
    p.add_argument('--no-fasterai', action='store_true', help='skip fasterai even if it is importable')
    p.add_argument('--write', action='store_true', help='replace the section of RESULTS.md')
    p.add_argument('--results', type=Path, default=RESULTS, help='the markdown file --write updates')
    p.add_argument('--wait-load', type=float, default=1.0, help='wait (up to --max-wait s) for the 1-min load to drop below this')
    p.add_argument('--max-wait', type=float, default=1800)
    p.add_argument('--epochs', type=int, default=2, help=f"epochs of 25 batches; other than 2: no profile, the section {LONG_SECTION!r}")
    args = p.parse_args()
    if args.epochs != 2: return long_fits(args)
    torch.set_num_threads(args.threads)
    with_fa = fasterai is not None and not args.no_fasterai
    kinds = ['dense'] + [k for k in dict.fromkeys(args.kinds) if k != 'dense' and (with_fa or k not in FA_KINDS)]
    load0 = wait_for_load(args.wait_load, args.max_wait)
    start = time.perf_counter()
    prof = {m: profile(m) for m in args.models}
    if args.resnet50:
        set_seed(0)
        prof['resnet50'] = {FIRST: first_global(torchvision.models.resnet50())}
    rows = bench(args.reps, args.models, kinds)
    load1 = os.getloadavg()[0]
    cmd = ' '.join([Path(sys.executable).as_posix() if with_fa else 'python', 'benchmarks/overhead.py', *sys.argv[1:]])
    fa = (f'fasterai {fasterai.__version__} was measured in the same process: {FA_RULE}.' if with_fa else
          'fasterai was not measured (not importable here, or `--no-fasterai`; see the module docstring for its environment).')
    text = (f"{SECTION}\n\n"
            f"What it costs to prune while training. Each run is one `fit_one_cycle(2, 1e-3)` over 25 synthetic batches of 64 "
            f"3×32×32 images (50 optimizer steps, plus one validation batch per epoch), fastai's default Adam, data loaded in "
            f"the process, {args.threads} torch thread{'s' if args.threads > 1 else ''}. All runs of one model happen in one "
            f"process, interleaved in a rotating order (repetition r starts at the r-th kind), after one untimed dense warm-up "
            f"fit; each figure is the median of {args.reps}. small_cnn is `fasterprune.demo.small_cnn(3, 10, 32)` (four 3×3 "
            f"convs and a linear head); resnet18 is torchvision's (num_classes=10, standard stem). Every fasterprune run is "
            f"`SparsifyCallback(sparsity, one_cycle, granularity, criterion, scope)`:\n\n{kinds_legend(kinds)}\n\n"
            f"Columns: **CPU ÷ dense**, the main figure, is the CPU time of the whole process during the fit "
            f"(`time.process_time()`: forward, backward, optimizer, callback, data loading, fastai's loop) divided by the dense "
            f"fit's; on a shared machine other jobs disturb it far less than wall time. **in callback** is the process CPU "
            f"time spent inside the pruning callback's events (fasterprune's `SparsifyCallback`, or fasterai's), divided by the "
            f"rest of the same fit's CPU time (median of the repetitions): the overhead measured within one run, which the load "
            f"of other jobs cannot shift from one run to another as it shifts the ratio of two runs; it misses any cost that "
            f"lands outside the callback's events (such as caches it cools), so the ratio stays the main figure. CPU s and wall s are the medians; "
            f"wall ÷ dense is `time.perf_counter()`'s ratio. cadence is `cb.cadence` (optimizer steps between two rankings "
            f"of the weights; under the default the counts still follow the schedule at every step, from the ranking's queue), "
            f"rankings is `cb.n_updates` (rankings in the fit; with `update_every=1`, every step), max gap is "
            f"`cb.max_gap` (largest |target − achieved| sparsity over the fit's training batches, in the Recorder column's "
            f"units); these three come from the last repetition, — where the callback does not report them. memory ÷ params "
            f"is the bytes the callback holds after the fit (bool masks, criterion state, any weight copy, any queue of groups or indices the engine kept) divided by the "
            f"model's parameter bytes. {fa}\n\n{table(rows)}\n\n"
            f"Where the time goes: milliseconds of process CPU time per call of the engine calls the callback makes, "
            f"{args.threads} torch thread{'s' if args.threads > 1 else ''}, on a fresh model with random gradients: `update` "
            f"when the counts change is the median over the 50 steps of the one_cycle schedule; the others are medians of 20 "
            f"calls; the first row is `Sparsifier(model, 0.9, 'weight', large_final, 'global').update(1.)` on dense weights "
            f"(a fresh copy each time, median of 5){', on torchvision resnet50 (num_classes=1000) too' if args.resnet50 else ''}.\n\n"
            f"{prof_table(prof)}\n\n{verdict(rows, prof)} {SHORT_FIT}\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
            f"torch {torch.__version__}; 1-min load average {load0:.2f} at the start, {load1:.2f} at the end; total "
            f"{time.perf_counter() - start:.0f} s. Run: `{cmd.strip()}`\n")
    print(text)
    if args.write: write(text, args.results)

SHORT_FIT = ("On a 50-step fit the default's time budget would rank every few steps, but a queue older than a 32nd of the fit "
             "was measured to cost accuracy (section \"Mask-update cadence and accuracy\"), so it ranks once in each 32nd of "
             "the fit (`min_rankings`): 32 rankings in 50 steps, against 50 for `update_every=1`; where the time budget "
             "decides, the figures are in the section on longer fits.")

def long_fits(args):
    "The same fits over `args.epochs` epochs: on a longer fit the default cadence may rank less often than at every step"
    torch.set_num_threads(args.threads)
    kinds = ['dense'] + [k for k in dict.fromkeys(args.kinds) if k != 'dense' and k not in FA_KINDS]
    load0, start = wait_for_load(args.wait_load, args.max_wait), time.perf_counter()
    rows = bench(args.reps, args.models, kinds, args.epochs)
    cmd = ' '.join(['python', 'benchmarks/overhead.py', *sys.argv[1:]])
    text = (f"{LONG_SECTION}\n\nThe runs of the section above over `fit_one_cycle({args.epochs}, 1e-3)`: {25 * args.epochs} optimizer "
            f"steps instead of 50, everything else the same ({args.threads} torch thread{'s' if args.threads > 1 else ''}, "
            f"runs interleaved in one process, median of {args.reps}). The default ranks once in each 32nd of the fit "
            f"(`min_rankings`) where its time budget (2 % of the step time) would rank less often, so 32 times on 50 steps; "
            f"on a longer fit the budget decides. The columns are those of the section above (in callback: CPU "
            f"time inside the callback's events ÷ the rest of the same fit).\n\n{kinds_legend(kinds)}\n\n{table(rows)}\n\n{verdict(rows, {})}\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
            f"torch {torch.__version__}; 1-min load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; total "
            f"{time.perf_counter() - start:.0f} s. Run: `{cmd.strip()}`\n")
    print(text)
    if args.write: write_section(LONG_SECTION, text, args.results)

if __name__ == '__main__': main()
