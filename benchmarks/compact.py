"""Compaction and 2:4 benchmark (issue 7).

Run from the repository root:  python benchmarks/compact.py  [--runs1 1000] [--runs32 200] [--wait-load 1.0] [--no-write]

(1) CPU: torchvision resnet18 (10 classes) at 32x32, 50% of the filters of every conv pruned ('filter' granularity,
    `large_final`, local scope, classifier left dense). Four models are timed, interleaved run by run in a shuffled
    order so that the shared machine's load hits them alike: the dense model, the masked model (zeros in dense
    tensors), the compact model from coupled masks (`links=coupled`), and the compact model from uncoupled masks.
    Latency = median of many single forward passes (`torch.inference_mode`, eval mode, `torch.set_num_threads(2)`)
    at batch 1 and batch 32; then the dense and the coupled compact model again, in channels_last, interleaved with
    each other. Also parameter, multiply-accumulate and `torch.save` file-size ratios, and the largest output
    difference between the compact and the masked model.
(2) GPU (only with CUDA and compute capability >= 8.0; otherwise the reason is written instead): Linear layers of a
    transformer-sized MLP in bf16, dense against the same layer with a 2:4 weight converted by `to_semi_structured`,
    for a range of token counts, median of CUDA-event timings.

Writes the section "## Compaction and 2:4 (issue 7)" of benchmarks/RESULTS.md (other sections are left as they are).
"""
import argparse, copy, io, os, platform, random, statistics, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # noqa: E402

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fasterprune.sparsifier import Sparsifier  # noqa: E402
from fasterprune.compact import compact, coupled, count_macs, semi_structured_support, to_semi_structured  # noqa: E402

SECTION = '## Compaction and 2:4 (issue 7)'
RESULTS = ROOT / 'benchmarks' / 'RESULTS.md'
TARGET = 0.40


def wait_for_load(limit, max_wait):
    t0 = time.time()
    while os.getloadavg()[0] > limit and time.time() - t0 < max_wait: time.sleep(10)
    return os.getloadavg()


def n_params(m): return sum(p.numel() for p in m.parameters())


def file_bytes(m):
    b = io.BytesIO(); torch.save(m.state_dict(), b); return b.tell()


def interleaved_latency(models, x, runs, warmup=10):
    "Median seconds of one forward pass of each model, timed in shuffled interleaved order"
    times = {k: [] for k in models}
    rng = random.Random(0)
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup): m(x)
        for _ in range(runs):
            order = list(models); rng.shuffle(order)
            for k in order:
                t = time.perf_counter(); models[k](x); times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, times


def cpu_benchmark(args):
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    masked = copy.deepcopy(dense)
    Sparsifier(masked, 0.5, 'filter', exclude='fc', links=coupled).prune()
    masked_plain = copy.deepcopy(dense)
    Sparsifier(masked_plain, 0.5, 'filter', exclude='fc').prune()
    x2 = torch.randn(2, 3, 32, 32)
    small, small_plain = compact(masked, x2).eval(), compact(masked_plain, x2).eval()
    xt = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        diff = max((masked(xt) - small(xt)).abs().max().item(), (masked_plain(xt) - small_plain(xt)).abs().max().item())
    models = {'dense': dense, 'masked (coupled)': masked, 'compact (coupled)': small, 'compact (uncoupled)': small_plain}
    stats = {k: dict(params=n_params(m), file=file_bytes(m), macs=sum(count_macs(m, x2).values())) for k, m in models.items()}
    cl = {k + ', channels_last': copy.deepcopy(models[k]).to(memory_format=torch.channels_last) for k in ('dense', 'compact (coupled)')}
    load0 = wait_for_load(args.wait_load, args.max_wait)
    lat = {}
    for bs, runs in ((1, args.runs1), (32, args.runs32)):
        x = torch.randn(bs, 3, 32, 32)
        lat[bs], _ = interleaved_latency(models, x, runs)
        lat_cl, _ = interleaved_latency(cl, x.to(memory_format=torch.channels_last), runs)
        lat[bs].update(lat_cl)
    stats.update({k: stats[k.split(',')[0]] for k in cl})
    return dict(models=list(models) + list(cl), stats=stats, lat=lat, diff=diff, load0=load0, load1=os.getloadavg())


def gpu_benchmark(args):
    ok, why = semi_structured_support()
    if not ok: return dict(skipped=why)
    torch.manual_seed(0)
    dev, dtype, rows = torch.device('cuda'), torch.bfloat16, []
    for d_in, d_out in ((4096, 4096), (4096, 16384), (16384, 4096)):
        lin = nn.Linear(d_in, d_out)
        Sparsifier(lin, 0.5, '2:4').prune()
        dense = lin.to(dev, dtype).eval()
        sparse = copy.deepcopy(dense)
        rep = to_semi_structured(sparse)
        if not rep.converted.all(): rows.append((d_in, d_out, None, None, None, rep.why_not[0])); continue
        for tokens in (1, 16, 64, 256, 1024, 4096, 16384):
            x = torch.randn(tokens, d_in, device=dev, dtype=dtype)
            res = {}
            with torch.inference_mode():
                for name, m in (('dense', dense), ('2:4', sparse)):
                    for _ in range(10): m(x)
                    ts = []
                    for _ in range(args.gpu_runs):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record(); m(x); b.record(); torch.cuda.synchronize()
                        ts.append(a.elapsed_time(b))
                    res[name] = statistics.median(ts)
            rows.append((d_in, d_out, tokens, res['dense'], res['2:4'], ''))
    return dict(device=torch.cuda.get_device_name(dev), rows=rows)


def report(args, cpu, gpu, seconds):
    cpu_name = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    st, lat = cpu['stats'], cpu['lat']
    d = st['dense']
    lines = [SECTION, '',
             f'Command: `python benchmarks/compact.py` (defaults: `--runs1 {args.runs1} --runs32 {args.runs32}`; '
             f'{seconds / 60:.1f} min). CPU ({cpu_name}, {os.cpu_count()} cores), `torch.set_num_threads(2)`, '
             f'torch {torch.__version__}. 1-min load average {cpu["load0"][0]:.2f} before timing, {cpu["load1"][0]:.2f} '
             'after (a shared machine: the models are timed interleaved, in a shuffled order each round, and '
             'the figures are medians).', '',
             '### CPU: resnet18 at 32×32, 50% of the filters pruned, then compacted', '',
             "torchvision `resnet18(num_classes=10)`, random init (seed 0), every conv at 50% 'filter' sparsity "
             '(`large_final`, local), `fc` left dense. "masked" = zeros in dense tensors; "coupled" = '
             '`Sparsifier(..., links=coupled)`, so a residual stream\'s writers drop the same channels; "uncoupled" = '
             f'each conv on its own. Largest |compact − masked| output difference on a batch of 32: {cpu["diff"]:.1e}.', '',
             f'| model | latency batch 1 (ms) | ÷ dense | latency batch 32 (ms) | ÷ dense (target ≤ {TARGET:.2f}) | params | ÷ dense | MACs/sample | ÷ dense | file bytes | ÷ dense |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for k in cpu['models']:
        s, ref = st[k], 'dense, channels_last' if 'channels_last' in k else 'dense'
        lines.append(f'| {k} | {lat[1][k] * 1e3:.2f} | {lat[1][k] / lat[1][ref]:.3f} | {lat[32][k] * 1e3:.1f} | '
                     f'{lat[32][k] / lat[32][ref]:.3f} | {s["params"]:,} | {s["params"] / d["params"]:.3f} | '
                     f'{s["macs"]:,} | {s["macs"] / d["macs"]:.3f} | {s["file"]:,} | {s["file"] / d["file"]:.3f} |')
    lines.append('')
    for suffix, fmt in (('', 'default (contiguous) memory format'), (', channels_last', 'channels_last, model and input')):
        c1, c32 = (lat[b]['compact (coupled)' + suffix] / lat[b]['dense' + suffix] for b in (1, 32))
        met = [f'batch {b}' for b, c in ((1, c1), (32, c32)) if c <= TARGET]
        lines.append(f'- {fmt}: coupled compact ÷ dense latency {c1:.3f} at batch 1, {c32:.3f} at batch 32 '
                     f'(target ≤ {TARGET:.2f}: {"met at " + " and ".join(met) if met else "not met"}).')
    lines += ['', 'Channels_last rows: the same dense and coupled compact models converted with '
              '`.to(memory_format=torch.channels_last)`, fed a channels_last input, timed interleaved with each other; '
              'their "÷ dense" is against the channels_last dense model.', '',
              '### GPU: 2:4 Linear layers (bf16) against dense', '']
    if 'skipped' in gpu:
        lines.append(f'Not run: {gpu["skipped"]}. The code path is `gpu_benchmark` in `benchmarks/compact.py`: '
                     'Linear 4096→4096, 4096→16384 and 16384→4096 in bf16, 1 to 16384 tokens, dense against '
                     '`to_semi_structured`. No 2:4 speedup is claimed here.')
    else:
        lines += [f'Device: {gpu["device"]}; median of {args.gpu_runs} CUDA-event timings per shape.', '',
                  '| in → out | tokens | dense (ms) | 2:4 (ms) | 2:4 ÷ dense |', '|---|---|---|---|---|']
        for d_in, d_out, tok, td, ts, why in gpu['rows']:
            lines.append(f'| {d_in} → {d_out} | - | - | - | not converted: {why} |' if why else
                         f'| {d_in} → {d_out} | {tok} | {td:.4f} | {ts:.4f} | {ts / td:.3f} |')
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs1', type=int, default=1000, help='timed forward passes per model at batch 1')
    ap.add_argument('--runs32', type=int, default=200, help='timed forward passes per model at batch 32')
    ap.add_argument('--gpu-runs', type=int, default=100)
    ap.add_argument('--wait-load', type=float, default=1.0, help='wait (up to --max-wait s) for the 1-min load to drop below this')
    ap.add_argument('--max-wait', type=float, default=300)
    ap.add_argument('--no-write', action='store_true')
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter('ignore', FutureWarning)
    t0 = time.time()
    cpu = cpu_benchmark(args)
    gpu = gpu_benchmark(args)
    text = report(args, cpu, gpu, time.time() - t0)
    print(text)
    if not args.no_write: write_section(SECTION, text, RESULTS)


if __name__ == '__main__': main()
