import copy, math, numbers, warnings
import torch
from torch import nn
from fastcore.foundation import L
from .granularities import Grouping
from .compact import weight_layers
from .sparsifier import Sparsifier, unwrap_model, _torch_opts
from .checkpoints import layer_layout
from .compact import _require_tp, _output_nodes, _dead_channels, _inputs, _outputs

def _ops(DG, tp, group, names):
    "The handler calls Torch-Pruning's `group.prune()` makes on named modules: (module name, handler, pruning dim, indices)"
    out = []
    for dep, idxs in group:
        m = dep.target.module
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:
            raise ValueError("`shrink` cannot follow a bare `nn.Parameter` used outside a layer (Torch-Pruning replaces it); leave its layer out")
        if m not in names: continue # an operation without parameters (add, concat): nothing of its own to cut
        out.append((names[m], dep.handler, dep.target.pruning_dim, _plain_idxs(idxs)))
    return out

def _plain_idxs(idxs):
    from torch_pruning import _helpers
    if len(idxs) and isinstance(idxs[0], _helpers._HybridIndex): return _helpers.to_plain_idxs(idxs)
    return list(idxs)

def plan_surgery(model:nn.Module, # the masked model (pruned channels zero), left unchanged
                 xs, # its inputs, as `_inputs` returns them
                )->tuple: # (the compacted copy, the operations that made it)
    "On a copy of `model`, remove the zero channels as `compact` does, and list the operations (to replay them on `model` and on an index map)"
    tp = _require_tp()
    new, was = copy.deepcopy(model), model.training
    for p in new.parameters(): p.grad = None
    names = {m: n for n, m in new.named_modules()}
    new.eval()
    with torch.enable_grad(): DG = tp.DependencyGraph().build_dependency(new, example_inputs=xs, verbose=False)
    reach_out, ops = _output_nodes(DG), []
    for group in DG.get_all_groups(root_module_types=weight_layers):
        dead = _dead_channels(DG, tp, group, reach_out)
        if dead is None or not dead.any(): continue
        g = DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, dead.nonzero().flatten().tolist())
        ops += _ops(DG, tp, g, names)
        g.prune()
    new.train(was)
    return new, ops

def replay(model:nn.Module, ops:list):
    "Make the Torch-Pruning calls `ops` on the modules of `model` with those names, in place"
    mods = dict(model.named_modules())
    for name, handler, dim, idxs in ops:
        handler.__self__.pruning_dim = dim
        handler(mods[name], idxs)

def _tensors_of(model):
    "`{qualified name: (module, key, tensor)}` of the parameters and buffers of `model`"
    return {f"{mn}.{k}" if mn else k: (m, k, t) for mn, m in model.named_modules()
            for d in (m._parameters, m._buffers) for k, t in d.items() if t is not None}

@torch.no_grad()
def index_maps(model:nn.Module, ops:list)->dict:
    "`{name: flat indices}`: for each parameter and buffer that `ops` cut, where each entry left comes from in the old flat tensor"
    ids = copy.deepcopy(model)
    for name, (m, k, t) in _tensors_of(ids).items():
        if t.is_floating_point():
            v = torch.arange(t.numel(), dtype=torch.float64, device=t.device).view(t.shape)
            if isinstance(t, nn.Parameter): m._parameters[k] = nn.Parameter(v, requires_grad=False)
            else: m._buffers[k] = v
    replay(ids, ops)
    before = {n: tuple(t.shape) for n, (_, _, t) in _tensors_of(model).items()}
    return {n: t.reshape(-1).long() for n, (_, _, t) in _tensors_of(ids).items() if tuple(t.shape) != before.get(n)}

def _max_diff(ref, out)->float:
    if len(ref) != len(out): return math.inf
    return max(((a - b).abs().max().item() if a.shape == b.shape else math.inf for a, b in zip(ref, out)), default=0.)

@torch.no_grad()
def shrink_model(model:nn.Module, # a model whose pruned channels are zero (masks applied); cut in place
                 example_inputs, # a batch to trace and check with
                 atol:float=1e-4, # the largest output difference the check accepts
                )->dict: # `{old parameter: (new parameter, flat indices)}` for each parameter cut, and `maps` under key None
    "Remove the zero channels of `model` in place (its modules stay, their parameters are replaced); checked against the masked outputs first"
    model, xs = unwrap_model(model), _inputs(example_inputs)
    small, ops = plan_surgery(model, xs)
    if not ops: return {}
    ref = _outputs(model, xs)
    diff, scale = _max_diff(ref, _outputs(small, xs)), max([1.] + [a.abs().max().item() for a in ref if a.numel()])
    if diff > atol * scale:
        raise RuntimeError(f"`shrink`: the model with its pruned channels removed differs from the masked model by up to {diff:.3g} "
                           f"on a batch (> atol={atol}, times the largest output when above 1); the model is left as it was. Please report the model")
    maps, old = index_maps(model, ops), _tensors_of(model)
    replay(model, ops)
    new, out = _tensors_of(model), {}
    for n, ids in maps.items():
        o, t = old[n][2], new[n][2]
        if isinstance(o, nn.Parameter): out[o] = (t, ids.to(t.device))
    return out

def _cut(t, old_shape, new_shape, ids):
    "`t` cut as a parameter of `old_shape` was cut to `new_shape` (flat `ids`); any other tensor or value as it is"
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(old_shape): return t
    return t.reshape(-1)[ids.to(t.device)].view(new_shape).clone()

def cut_optimizer(opt, # a fastai `Optimizer`, `OptimWrapper` or `Lookahead`, or a PyTorch optimizer
                  cuts:dict, # `{old parameter: (new parameter, flat indices)}`, as `shrink_model` returns
                 ):
    "Point `opt` at the new parameters, and cut its state for each (momentum, Adam's moments, a `Lookahead`'s slow weights) to the units kept"
    new = lambda p: cuts[p][0] if p in cuts else p
    for o in _torch_opts(opt):
        if getattr(o, 'slow_weights', None) is not None: # a `Lookahead`'s (it comes before the optimizer it wraps: the lists are the old ones)
            o.slow_weights = L(L(_cut(s, p.shape, cuts[p][0].shape, cuts[p][1]) if p in cuts else s for s, p in zip(sg, pg))
                               for sg, pg in zip(o.slow_weights, o.param_lists))
        if isinstance(getattr(o, 'param_groups', None), list): # PyTorch's
            for pg in o.param_groups: pg['params'] = [new(p) for p in pg['params']]
        elif 'param_lists' in vars(o): o.param_lists = L(L(new(p) for p in pg) for pg in o.param_lists) # fastai's
        st = getattr(o, 'state', None)
        if isinstance(st, dict):
            for p in [p for p in st if p in cuts]:
                q, ids = cuts[p]
                st[q] = {k: _cut(v, p.shape, q.shape, ids) for k, v in st.pop(p).items()}

@torch.no_grad()
def cut_sparsifier(sp:Sparsifier, # the sparsifier whose model `shrink_model` cut
                   maps:dict, # `{parameter name: flat indices}`
                  ):
    "Carry the masks, criterion state and counts of `sp` over to its cut layers; the groups removed are counted in `sp.removed`"
    for l in sp.layers:
        ids, old = maps.get(f"{l.name}.weight"), l.grouping
        if ids is None: continue
        new = Grouping(l.module, sp.granularity, l.name)
        sp.numel0.setdefault(l.name, old.numel)
        sp.removed[l.name] = sp.removed.get(l.name, 0) + old.n_groups - new.n_groups
        if (m := sp.masks.get(l.name)) is not None: # the mask spread over the weight, cut like it, then reduced to the groups again
            full = torch.ones(old.shape, device=m.device)
            old.apply(full, m)
            cut = new.view(full.reshape(-1)[ids.to(m.device)].view(new.shape))
            sp.masks[l.name] = (cut.amax(dim=new.dims, keepdim=True) > 0).reshape(new.mask_shape)
        for s in [sp.state.get(l.name, {})]:
            for k, t in s.items(): s[k] = _cut(t, old.shape, new.shape, ids)
        l.grouping = new
    pools = sp._pools() # the counts now: the groups the masks prune in the layers left
    sp.counts = {k: sum(int((~sp.masks[u[0].name]).sum()) for u in us) for k, us in pools.items() if k in sp.counts}
    sp.plans, sp.pruned_now = {}, {}

def check_shrink(shrink, # None, or a share of the groups in (0, 1]
                 granularity:str, # the callback's granularity
                 lth:bool=False, # the callback's `lth`
                )->float|None:
    "`shrink` as a float (or None), or a clear error"
    if shrink is None or shrink is False: return None
    if isinstance(shrink, bool) or not isinstance(shrink, numbers.Real) or not 0 < shrink <= 1:
        raise ValueError(f"`shrink` must be a share of the groups in (0, 1] (remove the pruned channels whenever the pruned share has "
                         f"grown by it, and at the end of the fit), or None; got {shrink!r}")
    if granularity not in ('filter', 'channel'):
        raise ValueError(f"`shrink`={shrink} removes the channels of 'filter' or 'channel' masks; with {granularity!r} nothing can be removed")
    if lth: raise ValueError(f"`shrink`={shrink} cannot be used with `lth=True`: the rewind snapshot holds the weights at their full size")
    return float(shrink)

def _state_problem(sp)->str|None:
    "Why the criterion state of `sp` cannot be cut with its layers, or None"
    for l in sp.layers:
        for k, t in (sp.state.get(l.name) or {}).items():
            if isinstance(t, torch.Tensor) and t.numel() > 1 and tuple(t.shape) != l.grouping.shape:
                return f"criterion {sp.criterion!r} keeps `{k}` of shape {tuple(t.shape)} for layer `{l.name}`, not one value per weight"

class Shrinking:
    "Mixed into `SparsifyCallback`: with `shrink`, remove the pruned channels from `learn.model` during the fit and carry on with the smaller model"
    shrink, shrink_atol = None, 1e-4 # the largest difference between the masked and the cut model's outputs (relative to the largest output, when above 1)

    def _start_shrinking(self):
        "In `before_fit`: check that the fit can shrink (every error before any weight changes)"
        self.shrinks = []
        if not self.shrink: return
        from fastai.callback.fp16 import NonNativeMixedPrecision
        from .sparsifier import world_size
        why = ("it runs under torch.distributed (each rank would cut its own copy)" if world_size() > 1 else
               "`NonNativeMixedPrecision` keeps fp32 master copies of the weights" if any(isinstance(c, NonNativeMixedPrecision) for c in self.learn.cbs) else
               _state_problem(self.sparsifier))
        if why: raise ValueError(f"SparsifyCallback: `shrink`={self.shrink} cannot shrink this fit: {why}; use `shrink=None` "
                                 "(masks only) and `learn.compact()` after the fit")
        self._shrunk_at = self._measure()

    def _maybe_shrink(self, end:bool=False):
        "Shrink when the pruned share has grown by `shrink` since the last time (or, at the `end` of the fit, if anything is left to remove)"
        if not self.shrink or self._hold: return
        if end or self._measure() - self._shrunk_at >= self.shrink - 1e-9: self.shrink_now()

    def shrink_now(self)->dict:
        "Remove the channels the masks prune from `learn.model` now, checked against the masked model on a batch; the optimizer, masks and counts follow"
        sp, model = self.sparsifier, unwrap_model(self.learn.model)
        sp.apply()
        try: xb = tuple(x[:8] if isinstance(x, torch.Tensor) else x for x in self._sample_xb()) # a few samples: the check's cost stays small
        finally: self._xb = None
        before = sum(p.numel() for p in model.parameters())
        cuts = shrink_model(model, xb, self.shrink_atol)
        self._shrunk_at = self._measure()
        if not cuts: return {}
        names = {id(p): n for n, p in model.named_parameters()}
        cut_sparsifier(sp, {names[id(q)]: ids for q, ids in cuts.values()})
        if self.learn.opt is not None: cut_optimizer(self.learn.opt, cuts)
        self._layout = layer_layout(model, self.include, self.exclude)
        rec = dict(step=self.step, epoch=self.epoch, sparsity=self._shrunk_at, params_before=before, params=sum(p.numel() for p in model.parameters()))
        self.shrinks.append(rec)
        return rec
