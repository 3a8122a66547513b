"""Where the pruning callback's process CPU time goes in one fit of `overhead.py` (same data, model and loop, 1 thread).

Usage: python benchmarks/callback_split.py KIND [MODEL [EPOCHS]]   (KIND and MODEL as in overhead.py: local, global, 2:4, ...;
resnet18, small_cnn; EPOCHS of 25 batches, default 2)

Wraps the engine's methods with timers: `_select` (a full selection), `_rank_left` (a ranking over the groups left),
`_queue` (its queue), `_from_plan` (a step that takes queued groups), `mask_grads`, `clean_state` (optimizer state of
what was pruned), `_apply_new` (zeroing the newly pruned weights), `_measure` (the Recorder's column). Nested calls
count in both (a `_rank_left` includes its `_queue`). Prints one line per method: seconds, calls, ms per call, share of
the dense fit's CPU time. Not written to RESULTS.md: a diagnostic."""
import sys, time, collections
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import torch
import overhead as O
from fasterprune import sparsifier as S, callback as C, cadence as CA

T, N = collections.Counter(), collections.Counter()

def wrap(cls, name):
    f = getattr(cls, name)
    def timed(self, *a, **k):
        t = time.process_time()
        try: return f(self, *a, **k)
        finally: T[name] += time.process_time() - t; N[name] += 1
    setattr(cls, name, timed)

if __name__ == '__main__':
    torch.set_num_threads(1)
    kind, model = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else 'resnet18')
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    for n in ('_select', '_rank_left', '_queue', '_from_plan', '_apply_new', 'clean_state', 'mask_grads', 'accumulate'): wrap(S.Sparsifier, n)
    wrap(C.SparsifyCallback, '_measure'); wrap(CA.Pacer, 'prune_at')
    dls = O.synthetic_dls()
    O.fit_once(model, 'dense', dls, epochs) # warm-up
    d = O.fit_once(model, 'dense', dls, epochs)
    T.clear(); N.clear()
    o = O.fit_once(model, kind, dls, epochs)
    print(f"{kind} {model}: CPU {o['cpu']:.2f} s, dense {d['cpu']:.2f} s, ratio {o['cpu'] / d['cpu']:.3f}, in callback "
          f"{100 * o['cb_share']:.1f} %, rankings {o['n_updates']}, cadence {o['cadence']}")
    for k, v in T.most_common():
        print(f"  {k:12s} {v:7.3f} s  {N[k]:5d} calls  {1e3 * v / max(N[k], 1):7.2f} ms/call  {100 * v / d['cpu']:5.2f} % of the dense fit")
