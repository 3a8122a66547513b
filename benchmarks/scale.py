"""Scale (issue 6): peak memory and time of one global mask update over a synthetic model of ~200M weights.

The model is a stack of `Linear(d, d, bias=False)` layers (default d=2000: 4M weights each, 50 of them = 200M weights,
800 MB of float32), allocated with `torch.empty` and filled in place with `uniform_` (no temporary copies). Each
scenario runs in a fresh Python process so that its baseline is clean:

- `first`: `Sparsifier(model, s, scope='global').prune()` from dense weights: the masks are created by this update;
- `steady`: the model is first pruned at 90 % of the target, then `update(1.)` recomputes the masks at the full target,
  as every later step of a training run does (old masks held while the new ones are computed).

Memory is the process's peak resident set during the update (`VmHWM` in /proc/self/status, reset just before the
update by writing 5 to /proc/self/clear_refs), minus the resident set just before it (gc and `malloc_trim` first): the
extra memory the update needs. The masks it creates count (they are 1 byte per weight, `bool`); in `steady` the old masks
are already in the baseline. The issue's bound is a peak extra of 1.5 bytes per weight. Also reported: the peak over the
model and sparsifier alone (no masks), and what stays held after the update.

    python benchmarks/scale.py                     # 200M weights, prints the table
    python benchmarks/scale.py --weights 4e7       # smaller
    python benchmarks/scale.py --write             # also replaces the "Scale (issue 6)" section of RESULTS.md
    python benchmarks/scale.py --json              # one JSON list of the scenarios' numbers, nothing else
"""
import argparse, ctypes, gc, json, os, platform, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

SECTION = '## Scale (issue 6)'
BOUND = 1.5 # bytes per weight


def status(key):
    "A /proc/self/status field in bytes (VmRSS, VmHWM)"
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'): return int(line.split()[1]) * 1024
    raise KeyError(key)


def settle():
    "Collect garbage and give freed heap back to the OS, so the resident set is what is really held"
    gc.collect()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError: pass


def reset_peak():
    "Reset VmHWM to the current resident set (Linux >= 4.0); False where not permitted"
    try: Path('/proc/self/clear_refs').write_text('5'); return True
    except OSError: return False


def child(args):
    import torch
    from torch import nn
    from fasterprune.sparsifier import Sparsifier
    torch.set_num_threads(args.threads)
    d = args.d
    n_layers = max(1, round(args.weights / (d * d)))
    t0 = time.perf_counter()
    model = nn.Sequential(*[nn.Linear(d, d, bias=False, device='meta') for _ in range(n_layers)]).to_empty(device='cpu')
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model: m.weight.uniform_(-1, 1, generator=g)
    build_s = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    sp = Sparsifier(model, args.sparsity, args.granularity, args.criterion, 'global')
    settle()
    base = status('VmRSS') # model + sparsifier, no masks yet
    if args.scenario == 'steady':
        sp.update(0.9)
        settle()
    resettable = reset_peak()
    before = status('VmRSS')
    t0 = time.perf_counter()
    changed = sp.update(1.) if args.scenario == 'steady' else (sp.prune() is sp)
    secs = time.perf_counter() - t0
    peak = status('VmHWM') if resettable else None
    settle()
    after = status('VmRSS')
    masks = sum(m.numel() * m.element_size() for m in sp.masks.values())
    pruned = sum(int((~m).sum()) for m in sp.masks.values())
    n_groups = sum(l.grouping.n_groups for l in sp.layers)
    assert changed and pruned == min(round(args.sparsity * n_groups), n_groups - len(sp.layers)), (pruned, n_groups)
    return dict(scenario=args.scenario, weights=n, layers=n_layers, d=d, threads=args.threads, sparsity=args.sparsity,
                granularity=args.granularity, criterion=args.criterion, build_s=round(build_s, 2), update_s=round(secs, 2),
                base_rss=base, rss_before=before, peak=peak, rss_after=after, mask_bytes=masks,
                peak_extra=None if peak is None else peak - before, peak_over_model=None if peak is None else peak - base,
                held_after=after - base, peak_extra_per_weight=None if peak is None else round((peak - before) / n, 3),
                peak_over_model_per_weight=None if peak is None else round((peak - base) / n, 3),
                held_per_weight=round((after - base) / n, 3), resettable=resettable)


def run(scenario, args):
    "One scenario in a fresh interpreter"
    cmd = [sys.executable, __file__, '--child', scenario, '--weights', str(args.weights), '--d', str(args.d),
           '--sparsity', str(args.sparsity), '--granularity', args.granularity, '--criterion', args.criterion,
           '--threads', str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    if r.returncode: raise RuntimeError(f'{scenario} failed:\n{r.stderr[-4000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows, cmd, load):
    mb = lambda b: f'{b / 2**20:,.0f}'
    out = [f"{SECTION}\n",
           f"Command: `{cmd}`. One global mask update of `Sparsifier(model, {rows[0]['sparsity']}, "
           f"'{rows[0]['granularity']}', '{rows[0]['criterion']}', 'global')` over {rows[0]['layers']} `Linear({rows[0]['d']}, "
           f"{rows[0]['d']}, bias=False)` layers: {rows[0]['weights']:,} weights ({mb(4 * rows[0]['weights'])} MiB of float32), "
           f"each scenario in a fresh process, {rows[0]['threads']} torch threads, torch {rows[0].get('torch', '?')}, "
           f"{platform.machine()} {os.cpu_count()} cores (shared; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after). "
           "*first*: `prune()` from dense weights; *steady*: `update(1.)` on a model already pruned at 90 % of the target "
           "(as on every later step of a fit). Peak extra = peak resident set during the update (VmHWM, reset just before "
           "it) minus the resident set just before it: the new masks count (1 byte per weight), old masks are in the "
           f"baseline. Bound: {BOUND} bytes per weight. Peak over model = the same peak minus the resident set of the model "
           "and sparsifier alone, before any mask.\n",
           '| scenario | update s | peak extra MiB (bytes/weight) | peak over model MiB (bytes/weight) | held after MiB (bytes/weight) | masks MiB | within bound |',
           '|---|---|---|---|---|---|---|']
    for r in rows:
        ok = r['peak_extra_per_weight'] is not None and r['peak_extra_per_weight'] < BOUND
        out.append(f"| {r['scenario']} | {r['update_s']:.2f} | {mb(r['peak_extra'])} ({r['peak_extra_per_weight']:.3f}) | "
                   f"{mb(r['peak_over_model'])} ({r['peak_over_model_per_weight']:.3f}) | "
                   f"{mb(r['held_after'])} ({r['held_per_weight']:.3f}) | {mb(r['mask_bytes'])} | {'yes' if ok else '**no**'} |")
    return '\n'.join(out) + '\n'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--weights', type=float, default=2e8, help='total weights (rounded to whole layers)')
    p.add_argument('--d', type=int, default=2000, help='layer width: d*d weights per layer')
    p.add_argument('--sparsity', type=float, default=0.5)
    p.add_argument('--granularity', default='weight')
    p.add_argument('--criterion', default='large_final')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--scenarios', nargs='+', default=['first', 'steady'])
    p.add_argument('--write', action='store_true', help='replace the section of benchmarks/RESULTS.md')
    p.add_argument('--json', action='store_true', help='print only the JSON list of results')
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()
    args.weights = int(args.weights)
    if args.child:
        import torch
        args.scenario = args.child
        print(json.dumps({**child(args), 'torch': torch.__version__}))
        return
    load0 = os.getloadavg()[0]
    rows = [run(s, args) for s in args.scenarios]
    load1 = os.getloadavg()[0]
    if args.json:
        print(json.dumps(rows))
        return
    cmd = 'python benchmarks/scale.py' + ''.join(f' {a}' for a in sys.argv[1:] if a not in ('--write', '--json'))
    text = table(rows, cmd, (load0, load1))
    print(text)
    print(json.dumps(rows, indent=1))
    if args.write: write_section(SECTION, text)


if __name__ == '__main__': main()
