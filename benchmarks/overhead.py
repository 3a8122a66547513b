"""Fit-time overhead of `SparsifyCallback` (issue 3), and the memory it holds.

Fit time with `SparsifyCallback(0.9, one_cycle, 'weight', large_final)` divided by the dense fit time, in one process,
runs alternated (dense, local, global, local with `update_every=10`, and fasterai's callback when it is importable, in
a rotating order), median of `--reps` runs each, on (a) `small_cnn(3, 10, 32)`, a 4-conv CNN, and (b) torchvision's
resnet18 (num_classes=10, its standard stem), both on 3x32x32 inputs: `fit_one_cycle(2)` over 25 synthetic batches of 64 (one validation batch),
fastai's default Adam, `bench_threads` torch threads (settings.ini, 2). Memory: the bytes the callback holds (masks,
criterion state, any weight copy) divided by the model's parameter bytes.

    python benchmarks/overhead.py                 # prints the markdown table
    python benchmarks/overhead.py --write         # also replaces the "Callback overhead (issue 3)" section of RESULTS.md

fasterai (the `bench` extra) is measured when `import fasterai` works; install it beside fastai 2.8 in a separate
environment that sees this one, e.g. `python -m venv --system-site-packages /tmp/fa && /tmp/fa/bin/pip install fasterai`,
then run this script with `/tmp/fa/bin/python`.
"""
import argparse, contextlib, io, os, platform, statistics, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import torch, torchvision
from fastai.torch_core import set_seed
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.schedule import fit_one_cycle

from fasterprune.config import fp_config
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
SECTION = '## Callback overhead (issue 3)'

def synthetic_dls(n_batches=25, bs=64):
    "Random 3x32x32 images and labels: `n_batches` training batches, one validation batch"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn((n_batches + 1) * bs, 3, 32, 32, generator=g), torch.randint(0, 10, ((n_batches + 1) * bs,), generator=g)
    items = list(zip(x, y))
    return DataLoaders(DataLoader(items[:n_batches * bs], bs=bs, shuffle=False), DataLoader(items[n_batches * bs:], bs=bs))

def make_cbs(kind):
    if kind == 'dense': return []
    if kind in ('local', 'global'): return [SparsifyCallback(0.9, one_cycle, 'weight', large_final, kind)]
    if kind == 'local_every10': return [SparsifyCallback(0.9, one_cycle, 'weight', large_final, 'local', update_every=10)]
    return [FaSparsify(0.9, 'weight', kind.split('_')[1], fa_large_final, fa_one_cycle)] # fasterai_local, fasterai_global

def held_bytes(cb):
    "Bytes the callback holds: masks, criterion state, lottery-ticket weights"
    sp = cb.sparsifier
    ts = list(sp.masks.values()) + [t for s in sp.state.values() for t in s.values()] + list((cb.snapshot or {}).values())
    return sum(t.numel() * t.element_size() for t in ts)

def fit_once(model_name, kind, dls, epochs=2):
    "Seconds for one `fit_one_cycle`, and the bytes the callback holds after it"
    set_seed(0)
    learn = Learner(dls, MODELS[model_name](), loss_func=CrossEntropyLossFlat(), cbs=make_cbs(kind))
    with learn.no_bar(), learn.no_logging(), contextlib.redirect_stdout(io.StringIO()): # fasterai prints
        start = time.perf_counter()
        learn.fit_one_cycle(epochs, 1e-3)
        secs = time.perf_counter() - start
    cb = first_sparsify(learn)
    return secs, (held_bytes(cb) if cb is not None else None), sum(p.numel() * p.element_size() for p in learn.model.parameters())

def first_sparsify(learn): return next((cb for cb in learn.cbs if isinstance(cb, SparsifyCallback)), None)

def bench(reps, models, with_fasterai):
    kinds = ['dense', 'local', 'global', 'local_every10'] + (['fasterai_local', 'fasterai_global'] if with_fasterai else [])
    dls, rows = synthetic_dls(), []
    for m in models:
        fit_once(m, 'dense', dls) # warm-up, not timed
        times, mem = {k: [] for k in kinds}, {}
        for r in range(reps):
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                secs, held, params = fit_once(m, k, dls)
                times[k].append(secs)
                if held is not None: mem[k] = held / params
                print(f'{m:9s} {k:16s} rep {r}: {secs:6.2f} s', file=sys.stderr, flush=True)
        dense = statistics.median(times['dense'])
        for k in kinds:
            med = statistics.median(times[k])
            rows.append(dict(model=m, run=k, median_s=med, ratio=med / dense, mem=mem.get(k), all_s=times[k]))
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

def ms(f, n):
    "Median milliseconds of `f(i)` over `i` in range(n)"
    ts = []
    for i in range(n):
        t = time.perf_counter(); f(i); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)

def profile(model_name, n_steps=50):
    "Milliseconds per optimizer step of the engine calls the callback makes, on a fresh model"
    set_seed(0)
    model = MODELS[model_name]()
    for p in model.parameters(): p.grad = torch.randn_like(p)
    out = {}
    for scope in ('local', 'global'):
        sp = Sparsifier(model, 0.9, 'weight', large_final, scope)
        shares = [one_cycle(i / (n_steps - 1)) for i in range(n_steps)]
        out[f'update ({scope}, counts change)'] = ms(lambda i: sp.update(shares[i]), n_steps)
    out['update (counts unchanged)'] = ms(lambda i: sp.update(1.), 20)
    out['mask_grads'] = ms(lambda i: sp.mask_grads(), 20)
    out['apply'] = ms(lambda i: sp.apply(), 20)
    return out

def table(rows):
    out = ['| model | run | median fit s | ÷ dense | callback memory ÷ parameter bytes | all runs (s) |', '|---|---|---|---|---|---|']
    for r in rows:
        mem = '' if r['mem'] is None else f"{r['mem']:.3f}"
        out.append(f"| {r['model']} | {r['run']} | {r['median_s']:.2f} | {r['ratio']:.2f} | {mem} | {', '.join(f'{t:.2f}' for t in r['all_s'])} |")
    return '\n'.join(out)

TARGETS = dict(small_cnn=1.03, resnet18=1.10)

def verdict(rows):
    "The issue's targets, met or not, from this run"
    out = []
    for m, target in TARGETS.items():
        got = {r['run']: r for r in rows if r['model'] == m and r['run'] in ('local', 'global')}
        if not got: continue
        ratios = ', '.join(f"{k} {r['ratio']:.2f}" for k, r in got.items())
        out.append(f"{m} ≤ {target:.2f}: {'met' if all(r['ratio'] <= target for r in got.values()) else 'not met'} ({ratios})")
    mems = [r['mem'] for r in rows if r['mem'] is not None]
    if mems: out.append(f"memory ≤ 0.26 × parameter bytes: {'met' if max(mems) <= 0.26 else 'not met'} (at most {max(mems):.3f})")
    return 'Targets (issue 3): ' + '; '.join(out) + '.'

def prof_table(prof):
    keys = list(next(iter(prof.values())))
    out = ['| call | ' + ' | '.join(f'{m} ms' for m in prof) + ' |', '|---|' + '---|' * len(prof)]
    for k in keys: out.append(f'| {k} | ' + ' | '.join(f'{prof[m][k]:.2f}' for m in prof) + ' |')
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--reps', type=int, default=3, help='timed runs of each kind (median reported)')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--no-fasterai', action='store_true', help='skip fasterai even if it is importable')
    p.add_argument('--write', action='store_true', help='replace the section of benchmarks/RESULTS.md')
    p.add_argument('--wait-load', type=float, default=1.0, help='wait (up to --max-wait s) for the 1-min load to drop below this')
    p.add_argument('--max-wait', type=float, default=1800)
    args = p.parse_args()
    cfg = fp_config(Path(__file__).parent)
    torch.set_num_threads(cfg.bench_threads)
    with_fa = fasterai is not None and not args.no_fasterai
    load0 = wait_for_load(args.wait_load, args.max_wait)
    start = time.perf_counter()
    prof = {m: profile(m) for m in args.models}
    rows = bench(args.reps, args.models, with_fa)
    load1 = os.getloadavg()[0]
    cmd = 'python benchmarks/overhead.py ' + ' '.join(sys.argv[1:])
    fa = (f'fasterai {fasterai.__version__} measured in the same process.' if with_fa else
          'fasterai not measured: it is not importable here (see the module docstring for the `bench` environment).')
    text = (f"{SECTION}\n\n`SparsifyCallback(0.9, one_cycle, 'weight', large_final, scope)` fit time ÷ dense fit time: "
            f"`fit_one_cycle(2, 1e-3)` over 25 synthetic batches of 64 3×32×32 images (plus one validation batch), "
            f"fastai's Adam, {cfg.bench_threads} torch threads, runs alternated in one process, median of {args.reps}. "
            f"small_cnn is `fasterprune.demo.small_cnn(3, 10, 32)` (four 3×3 convs); resnet18 is torchvision's "
            f"(num_classes=10, standard stem). Memory: bytes the callback holds (bool masks; `large_final` keeps no "
            f"state, no weight copy) ÷ the model's parameter bytes. `local_every10` adds `update_every=10` (masks recomputed "
            f"every 10 optimizer steps and at the last, held in between), for comparison. {fa}\n\n{table(rows)}\n\n"
            f"Where the time goes: milliseconds per optimizer step of the engine calls the callback makes (median over the "
            f"50 steps of the schedule, on a fresh model, same threads). With `'weight'` granularity every step of a smooth "
            f"schedule changes the group counts, so every step pays an `update`; the other two run at every step.\n\n"
            f"{prof_table(prof)}\n\n{verdict(rows)}\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
            f"1-min load average {load0:.2f} at the start, {load1:.2f} at the end (the machine is shared); total "
            f"{time.perf_counter() - start:.0f} s. Run: `{cmd.strip()}`\n")
    print(text)
    if args.write: write_section(SECTION, text)

if __name__ == '__main__': main()
