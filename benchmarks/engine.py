"""Engine benchmark (issue 2): one mask update on torchvision's resnet50, and the memory the sparsifier holds.

Run from the repository root:  python benchmarks/engine.py  [--repeats 9] [--wait-load 1.0] [--no-write]

(1) Time of one `Sparsifier(model, s, scope=...).update(1., force=True)` with `large_final` and 'weight' granularity,
    median over `--repeats` updates, global and local, at a few sparsities; both from dense weights (the weights are
    restored, untimed, before each update) and in the steady state (weights already pruned at that sparsity, as on
    every batch of a training run). Compared with fasterai's method: `torch.kthvalue` over one concatenation of every
    |W|, then a float mask per layer and applying it.
(2) Memory the sparsifier holds (masks + criterion state) divided by the model's parameter bytes, counted three ways,
    each in a fresh process: from the masks and state themselves, by walking every tensor reachable from the
    sparsifier (minus the model's own), and as the drop in resident memory (RSS) when it is deleted; plus the
    transient peak RSS during one update.

Writes the section "## Engine (issue 2)" of benchmarks/RESULTS.md (other sections are left as they are).
"""
import argparse, gc, os, platform, re, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fasterprune.sparsifier import Sparsifier, select_smallest  # noqa: E402

SECTION = '## Engine (issue 2)'
RESULTS = ROOT / 'benchmarks' / 'RESULTS.md'
TIME_TARGET, MEM_TARGET = 0.10, 0.26


def rss_bytes():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def reset_peak_rss():
    "Linux: writing 5 to clear_refs resets VmHWM, the peak RSS"
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False


def peak_rss_bytes():
    with open('/proc/self/status') as f:
        return int(re.search(r'VmHWM:\s+(\d+) kB', f.read()).group(1)) * 1024


def malloc_trim():
    "Give freed heap memory back to the OS (glibc), so that RSS counts what is still allocated"
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError): pass


def wait_for_load(limit, max_wait):
    t0 = time.time()
    while os.getloadavg()[0] > limit and time.time() - t0 < max_wait: time.sleep(10)
    return os.getloadavg()


def storage_bytes(tensors):
    "Bytes of the distinct storages behind `tensors`"
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def reachable_tensors(obj, skip_ptrs):
    "Every tensor reachable from `obj` through attributes and containers, without entering nn.Modules"
    out, seen, todo = [], set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen: continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.untyped_storage().data_ptr() not in skip_ptrs: out.append(o)
        elif isinstance(o, torch.nn.Module): continue  # the model (and the traced graph module sharing its weights)
        elif isinstance(o, dict): todo += list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)): todo += list(o)
        elif hasattr(o, '__dict__') and not isinstance(o, type): todo += list(vars(o).values())
    return out


def timed(fn, repeats, before=None):
    ts = []
    for _ in range(repeats):
        if before: before()
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return ts


def fasterai_global_update(weights, s):
    "fasterai's global magnitude step: kthvalue over one concatenation of every |W|, a float mask per layer, apply"
    allw = torch.cat([w.abs().flatten() for w in weights])
    k = max(1, int(s * allw.numel()))
    thr = allw.kthvalue(k).values
    for w in weights:
        m = (w.abs() >= thr).float()
        w.mul_(m)


def make_model():
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def probe(kind, s):
    "Memory of one configuration, in a fresh process so that earlier allocations do not blur it (prints one JSON line)"
    import json
    torch.set_num_threads(2)
    model = make_model()
    model_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    out = {}
    with torch.no_grad():
        if kind == 'fasterai':
            weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            gc.collect(); malloc_trim(); rss0 = rss_bytes(); reset_peak_rss()
            fasterai_global_update(weights, s)
            out['peak'] = peak_rss_bytes() - rss0
        else:
            scope, criterion = kind.split('-')
            gc.collect(); malloc_trim(); rss0 = rss_bytes()
            sp = Sparsifier(model, s, scope=scope, criterion=criterion)
            if criterion != 'movement':
                reset_peak_rss()
                sp.update(1., force=True)
                out['peak'] = peak_rss_bytes() - rss0
            out['held'] = storage_bytes(list(sp.masks.values()) + [t for st in sp.state.values() for t in st.values()])
            out['walked'] = storage_bytes(reachable_tensors(sp, model_ptrs))
            gc.collect(); malloc_trim(); rss1 = rss_bytes()
            del sp; gc.collect(); malloc_trim()
            out['freed'] = rss1 - rss_bytes()
    print(json.dumps(out))


def run_probe(kind, s):
    import json, subprocess
    r = subprocess.run([sys.executable, __file__, '--probe', kind, str(s)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeats', type=int, default=9)
    ap.add_argument('--sparsities', type=float, nargs='+', default=[0.5, 0.7, 0.9])
    ap.add_argument('--wait-load', type=float, default=1.0, help='wait (up to --max-wait s) for the 1-min load to drop below this')
    ap.add_argument('--max-wait', type=float, default=600)
    ap.add_argument('--no-write', action='store_true')
    ap.add_argument('--probe', nargs=2, metavar=('KIND', 'SPARSITY'), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe: return probe(args.probe[0], float(args.probe[1]))
    torch.set_num_threads(2)
    model = make_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    def restore(): model.load_state_dict(dense)

    # (2) memory first: it does not depend on the load
    mems = {(kind, s): run_probe(kind, s) for kind, s in
            [('global-large_final', 0.5), ('global-large_final', 0.9), ('local-large_final', 0.5), ('local-large_final', 0.9),
             ('global-movement', 0.9), ('fasterai', 0.5), ('fasterai', 0.9)]}

    # (1) time: each row waits for a quiet machine (up to --max-wait s) and records the 1-min load around it
    rows = []
    def row(name, s, fn, before):
        l0 = wait_for_load(args.wait_load, args.max_wait)[0]
        restore(); fn()  # warm-up, and the weights pruned at s for the steady runs below
        t_steady = timed(fn, args.repeats)
        t_dense = timed(fn, args.repeats, before=before)
        rows.append((name, s, t_dense, t_steady, (l0, os.getloadavg()[0])))
    # layers a plain global ranking would empty: there the sparsifier selects a second time, each layer's best group set aside
    named = [(n, m.weight.detach().abs().flatten()) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    n_all = sum(w.numel() for _, w in named)
    emptied = {s: [n for (n, _), p in zip(named, select_smallest([w for _, w in named], round(s * n_all))) if bool(p.all())]
               for s in args.sparsities}
    del named
    load0 = os.getloadavg()
    with torch.no_grad():
        for scope in ('global', 'local'):
            for s in args.sparsities:
                sp = Sparsifier(model, s, scope=scope)
                row(f'fasterprune {scope}', s, lambda: sp.update(1., force=True), restore)
        n_pruned = sum(l.weight.numel() for l in sp.layers)
        n_conv = sum(isinstance(l.module, torch.nn.Conv2d) for l in sp.layers); n_lin = len(sp.layers) - n_conv
        del sp
        weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        for s in args.sparsities:
            row('kthvalue over cat(all abs(W)) (fasterai)', s, lambda: fasterai_global_update(weights, s), restore)
        restore()
        def kth_only():  # the selection step alone, without masks
            allw = torch.cat([w.abs().flatten() for w in weights]); allw.kthvalue(int(0.5 * allw.numel()))
        wait_for_load(args.wait_load, args.max_wait)
        t_kth = timed(kth_only, args.repeats)
    load1 = os.getloadavg()

    med = statistics.median
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    lines = [SECTION, '',
             f'Command: `{" ".join(["python", "benchmarks/engine.py"] + sys.argv[1:])}` (settings: `--repeats {args.repeats} '
             f'--sparsities {" ".join(f"{s:g}" for s in args.sparsities)} --wait-load {args.wait_load:g} --max-wait {args.max_wait:g}`). torchvision resnet50, random init (seed 0), CPU '
             f'({cpu}, {os.cpu_count()} cores), `torch.set_num_threads(2)`, torch {torch.__version__}, '
             f'{n_pruned:,} prunable weights ({n_conv} Conv2d + {n_lin} Linear), `large_final`, granularity `weight`. '
             f'1-min load average {load0[0]:.2f} when timing started, {load1[0]:.2f} when it ended; each row waits '
             f'(up to {args.max_wait:g} s) for a load below {args.wait_load:g} and shows the load before and after it. '
             'The machine is shared: figures are medians of the runs, with min and max.', '',
             f'### One mask update, `Sparsifier(model, s, scope=...).update(1., force=True)` (target <= {TIME_TARGET:.2f} s global)', '',
             '"dense": the update starts from the dense weights (restored, untimed, before each run), as the first '
             'update at a new sparsity does. "steady": the weights are already pruned at that sparsity, as on every '
             'later batch of a training run (a share s of the scores is then tied at zero).', '',
             '| method | sparsity | dense: median s (min-max) | steady: median s (min-max) | load before, after |',
             '|---|---|---|---|---|']
    for name, s, td, ts, (la, lb) in rows:
        lines.append(f'| {name} | {s:g} | {med(td):.3f} ({min(td):.3f}-{max(td):.3f}) | {med(ts):.3f} ({min(ts):.3f}-{max(ts):.3f}) | {la:.2f}, {lb:.2f} |')
    lines += ['', f'`torch.kthvalue` alone over the concatenation (no masks, no apply): median {med(t_kth):.3f} s '
              f'({min(t_kth):.3f}-{max(t_kth):.3f}).', '',
              'Layers that a plain global ranking of the dense weights would empty (the sparsifier then selects a second '
              'time with each layer\'s best group set aside, which costs a copy of every score and a second pass): '
              + '; '.join(f's={s:g}: ' + (', '.join(f'`{n}`' for n in e) if e else 'none') for s, e in emptied.items()) + '.', '',
              f'### Memory, as a multiple of the model\'s parameter bytes ({param_bytes:,} B; target held <= {MEM_TARGET:.2f})', '',
              'Each line runs in a fresh process. "held": the masks and criterion state (sum of their storages); '
              '"reachable": every tensor reachable from the sparsifier, minus the model\'s own; "freed on del": the '
              'drop in resident memory (RSS, after `gc` and `malloc_trim`) when the sparsifier is deleted, an '
              'independent cross-check; "transient peak": the peak RSS during the first update above the RSS before '
              'the sparsifier was built (scores, candidates and masks being built; given back afterwards).', '',
              '| configuration | sparsity | held | reachable | freed on del | transient peak during update |',
              '|---|---|---|---|---|---|']
    f = lambda v: f'{v / param_bytes:.3f}' if v is not None else 'n/a'
    for (kind, s), m in mems.items():
        name = {'fasterai': 'fasterai method: cat + kthvalue + float masks (transient only)'}.get(kind, kind.replace('-', ', '))
        if kind == 'global-movement': name += ' (state allocated at construction; no update)'
        lines.append(f'| {name} | {s:g} | {f(m.get("held"))} | {f(m.get("walked"))} | {f(m.get("freed"))} | {f(m.get("peak"))} |')
    lines += ['', 'Masks are `bool` (1 byte per weight: 1/4 of a float32 weight) and `large_final` keeps no state. '
              'fasterai 0.4.1 holds a float32 mask plus a copy of every weight: 2.0x (issue 2).', '']
    text = '\n'.join(lines)
    print(text)
    if not args.no_write: write_section(SECTION, text, RESULTS)


if __name__ == '__main__': main()
