"""Read a model's structure with torch.fx: which convs run, in what order, who uses their outputs.

The graph is used for analysis only; the model itself is never replaced by a ``GraphModule``. Every ``nn.Conv2d``
(and subclass), every mdplug layer and timm's registered no-trace modules and functions are leaves, so a conv is
one node and ``BatchNormAct2d`` is one node. Models that do not trace fall back to a module walk
(:func:`walk_model`), which knows the order of the convs but not who uses their outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx
from torch import nn

__all__ = ['ConvSite', 'ModelGraph', 'analyse', 'trace', 'walk_model']


def _leaf_types() -> tuple:
    """Module types to keep whole when tracing: timm's no-trace registry and the mdplug layers."""
    types: list = []
    try:
        from timm.layers._fx import get_notrace_modules
        types += list(get_notrace_modules())
    except ImportError:  # timm is a dependency, but the analysis itself does not need it
        pass
    try:
        from mdplug.nn import MDPLUG_LAYERS
        types += list(MDPLUG_LAYERS)
    except (ImportError, AttributeError):
        pass
    return tuple(t for t in types if isinstance(t, type))


def _leaf_functions() -> tuple:
    try:
        from timm.layers._fx import get_notrace_functions
    except ImportError:
        return ()
    return tuple(f for f in get_notrace_functions() if callable(f))


class LeafTracer(torch.fx.Tracer):
    """An fx tracer that stops at convs, mdplug layers and timm's no-trace modules."""

    def __init__(self):
        super().__init__(autowrap_functions=_leaf_functions())
        self._leaves = _leaf_types()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Conv2d) or isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _defaults(model: nn.Module) -> dict:
    """``forward``'s keyword defaults after its first argument, e.g. mmpretrain's ``mode='tensor'``."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace(model: nn.Module) -> torch.fx.Graph:
    """Symbolically trace ``model`` with :class:`LeafTracer`; raises whatever fx raises.

    A forward that branches on an optional argument (``mode='tensor'``, ``data_samples=None``) is traced a
    second time with those arguments fixed at their defaults.
    """
    try:
        return LeafTracer().trace(model)
    except Exception:
        concrete = _defaults(model)
        if not concrete:
            raise
        return LeafTracer().trace(model, concrete_args=concrete)


@dataclasses.dataclass
class ConvSite:
    """One conv-like module of the model, as the analysis sees it.

    ``users`` are the qualified names of the modules that read the conv's output (``'<op:add>'`` for a
    function or method); ``None`` when unknown (module walk). ``on_trunk``: every path from the model input
    to its output passes through this conv (``None`` when unknown, computed only for the head candidate).
    """
    name: str
    module: nn.Module
    order: float
    calls: int = 1
    reads_input: bool = False
    users: Optional[List[str]] = None
    on_trunk: Optional[bool] = None
    in_shape: Optional[tuple] = None
    #: input shape when the example input's height and width are doubled (recorded only for convs that read a
    #: 1×1 map, to tell a globally pooled map from a feature map that striding shrank to 1×1); None if unknown
    in_shape_2x: Optional[tuple] = None
    #: parameters of the conv the model's code reads directly (``conv.weight.dtype``, ``F.conv2d(x, conv.weight)``)
    params_read: Tuple[str, ...] = ()


@dataclasses.dataclass
class ModelGraph:
    """The convs of a model in execution order plus where the model's stem and head are."""
    sites: Dict[str, ConvSite]
    traced: bool
    note: str = ''
    stem: Optional[str] = None
    head: Optional[str] = None
    num_linear: int = 0
    #: why the example input did not run through the model (shapes unknown); None when it ran or was not run
    run_error: Optional[str] = None

    def ordered(self) -> List[ConvSite]:
        return sorted(self.sites.values(), key=lambda s: s.order)


def _is_conv(m: nn.Module) -> bool:
    from mdplug.convert._layers import mdplug_layer_types
    return isinstance(m, nn.Conv2d) or isinstance(m, mdplug_layer_types())


def _user_label(node: torch.fx.Node) -> str:
    if node.op == 'call_module':
        return str(node.target)
    if node.op == 'output':
        return '<output>'
    return f'<{node.op}:{getattr(node.target, "__name__", node.target)}>'


def _reachable(starts, succ, blocked=None) -> Set[torch.fx.Node]:
    seen: Set[torch.fx.Node] = set()
    stack = [n for n in starts if n is not blocked]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(s for s in succ(n) if s is not blocked and s not in seen)
    return seen


def _graph_sites(model: nn.Module, graph: torch.fx.Graph) -> ModelGraph:
    """Collect the conv nodes of ``graph``; find stem (first conv reading the input) and head.

    *Stem*: the first conv in execution order whose input is computed from a placeholder without passing
    through another conv.

    *Head*: the last conv in execution order, taken only when it is on the model's *trunk*, i.e. it dominates
    the output: deleting its node disconnects every placeholder from the output. This is how "not inside a
    residual block" is read off the graph without knowing the block classes: a conv inside a residual block
    (``y = x + f(x)``), a dense block (``cat([x, f(x)])``), a ghost/inception-style parallel branch or an
    attention gate (``x * g(x)``) always has a bypass path around it, so it does not dominate the output;
    MobileNetV2's ``conv_head`` (or a 1×1 conv applied after global pooling, as in MobileNetV3) does.
    """
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    sites: Dict[str, ConvSite] = {}
    conv_nodes: Dict[torch.fx.Node, str] = {}
    for i, node in enumerate(nodes):
        if node.op != 'call_module':
            continue
        mod = modules.get(str(node.target))
        if mod is None or not _is_conv(mod):
            continue
        name = str(node.target)
        conv_nodes[node] = name
        users = [_user_label(u) for u in node.users]
        if name in sites:
            sites[name].calls += 1
            sites[name].users = (sites[name].users or []) + users
        else:
            sites[name] = ConvSite(name, mod, order=i, users=users)

    for node in nodes:  # the model's code reading a conv's weight/bias itself, not through calling the conv
        if node.op == 'get_attr' and '.' in str(node.target):
            owner, attr = str(node.target).rsplit('.', 1)
            if owner in sites:
                sites[owner].params_read += (attr,)

    placeholders = [n for n in nodes if n.op == 'placeholder']
    for node, name in conv_nodes.items():
        if sites[name].reads_input:
            continue
        # walk back from the conv's inputs, stopping at other convs
        seen, stack = set(), list(node.all_input_nodes)
        while stack:
            n = stack.pop()
            if n in seen or n in conv_nodes:
                continue
            seen.add(n)
            if n.op == 'placeholder':
                sites[name].reads_input = True
                break
            stack.extend(n.all_input_nodes)

    g = ModelGraph(sites, traced=True, num_linear=_count_linear(model))
    ordered = g.ordered()
    readers = [s for s in ordered if s.reads_input]
    if readers:
        g.stem = readers[0].name
    if ordered:
        last = ordered[-1]
        outputs = [n for n in nodes if n.op == 'output']
        last_nodes = [n for n, nm in conv_nodes.items() if nm == last.name]
        on_trunk = len(last_nodes) == 1 and bool(outputs) and bool(placeholders)
        if on_trunk:
            reach = _reachable(placeholders, lambda n: n.users, blocked=last_nodes[0])
            on_trunk = not any(o in reach for o in outputs)
        last.on_trunk = on_trunk
        if on_trunk:
            g.head = last.name
    _add_hidden_convs(model, g, {str(n.target): i for i, n in enumerate(nodes) if n.op == 'call_module'})
    return g


def _add_hidden_convs(model: nn.Module, g: ModelGraph, leaf_order: Dict[str, int]) -> None:
    """Add convs the graph does not show: those inside leaf modules (timm's no-trace list) or never called.

    They are still convertible (a module swap), but who reads their output is unknown, so ``compact`` keeps
    a fused bias in them. They are ordered right after the leaf that contains them, or after everything.
    """
    end = max([s.order for s in g.sites.values()] + [0]) + 1
    inner = _inside_mdplug_layers(model)
    for name, mod in model.named_modules():
        if name in g.sites or name in inner or not _is_conv(mod):
            continue
        parts = name.split('.')
        owner = next(('.'.join(parts[:k]) for k in range(len(parts) - 1, 0, -1)
                      if '.'.join(parts[:k]) in leaf_order), None)
        order = leaf_order[owner] + 0.5 if owner is not None else end + len(g.sites)
        g.sites[name] = ConvSite(name, mod, order=order)


def _inside_mdplug_layers(model: nn.Module) -> Set[str]:
    """Qualified names of every module inside an mdplug layer (its branch convs, BNs): never convs of the model."""
    from mdplug.convert._layers import mdplug_layer_types
    ours = mdplug_layer_types()
    if not ours:
        return set()
    inner: Set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, ours):
            prefix = f'{name}.' if name else ''
            inner.update(prefix + sub for sub, _ in mod.named_modules() if sub)
    return inner


def _count_linear(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear))


def walk_model(model: nn.Module, note: str = '') -> ModelGraph:
    """Fallback analysis without a graph: convs in registration order.

    The stem is the first conv, the head the last one; whether the last conv sits inside a residual block
    cannot be known without a graph, so it is kept (conservative). Users of conv outputs are unknown.
    """
    sites: Dict[str, ConvSite] = {}
    inner = _inside_mdplug_layers(model)
    for i, (name, mod) in enumerate(model.named_modules()):
        if _is_conv(mod) and name not in sites and name not in inner:
            sites[name] = ConvSite(name, mod, order=i)
    g = ModelGraph(sites, traced=False, note=note, num_linear=_count_linear(model))
    ordered = g.ordered()
    if ordered:
        ordered[0].reads_input = True
        g.stem = ordered[0].name
        g.head = ordered[-1].name
    return g


class _ParamReadSpy(nn.Conv2d):
    """The class an ``nn.Conv2d`` wears during the example run: it notes reads of its ``weight``/``bias`` made
    from outside its own ``forward`` (model code such as ``conv.weight.dtype``, hidden even inside fx leaves)."""

    def forward(self, x):
        self.__dict__['_mdplug_in_forward'] = True
        try:
            return super().forward(x)
        finally:
            self.__dict__['_mdplug_in_forward'] = False

    def __getattr__(self, name):
        if name in ('weight', 'bias') and not self.__dict__.get('_mdplug_in_forward', False):
            self.__dict__.setdefault('_mdplug_reads', set()).add(name)
        return super().__getattr__(name)


def _record_shapes(model: nn.Module, g: ModelGraph, example_inputs, field: str = 'in_shape',
                   spy: bool = True) -> Optional[str]:
    """Run ``example_inputs`` once (eval, no grad) and store each conv's input shape in ``site.<field>`` and, if
    ``spy``, whether model code reads its parameters directly (:class:`_ParamReadSpy`); returns an error or None."""
    handles = []
    spied = [site for site in g.sites.values() if type(site.module) is nn.Conv2d] if spy else []
    for site in spied:
        site.module.__class__ = _ParamReadSpy

    def hook(name):
        def fn(mod, args):
            if args and isinstance(args[0], torch.Tensor) and getattr(g.sites[name], field) is None:
                setattr(g.sites[name], field, tuple(args[0].shape))
        return fn

    for name, site in g.sites.items():
        handles.append(site.module.register_forward_pre_hook(hook(name)))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    except Exception as e:  # noqa: BLE001 - any model error only means: shapes unknown
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
        for site in spied:
            site.module.__class__ = nn.Conv2d
            site.module.__dict__.pop('_mdplug_in_forward', None)
            reads = site.module.__dict__.pop('_mdplug_reads', ())
            site.params_read += tuple(sorted(set(reads) - set(site.params_read)))
    return None


def default_example_input(model: nn.Module) -> torch.Tensor:
    """One random image of the model's pretrained_cfg input size (3×224×224 when it has none)."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    size = tuple(cfg.get('input_size', (3, 224, 224))) if isinstance(cfg, dict) else (3, 224, 224)
    p = next(iter(model.parameters()), None)
    kw = dict(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else {}
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(**kw)


def analyse(model: nn.Module, example_inputs=None, shapes: bool = True) -> ModelGraph:
    """Trace ``model`` (falling back to a module walk) and, if ``shapes``, record conv input shapes (an example input
    that does not run leaves them unknown and sets ``run_error``, which :func:`mdplug.plan` raises). Modules inside
    mdplug layers are never sites."""
    try:
        g = _graph_sites(model, trace(model))
    except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        g = walk_model(model, note=f'fx trace failed ({type(e).__name__}: {msg[:160]}); used a module walk: '
                                   'stem/head are the first/last conv in registration order')
    if shapes and g.sites:
        if example_inputs is None:
            example_inputs = default_example_input(model)
        err = _record_shapes(model, g, example_inputs)
        if err:
            g.run_error = err[:160]
        elif isinstance(example_inputs, torch.Tensor) and example_inputs.dim() == 4 and any(
                s.in_shape is not None and tuple(s.in_shape[2:]) == (1, 1) for s in g.sites.values()):
            # a 1×1 input map: global pooling (an SE gate, a post-pool head) stays 1×1 on a larger image, a feature
            # map that striding shrank to 1×1 (resnet18's last stage on 32×32 images) grows; a model that only
            # runs at its own size keeps in_shape_2x None and the map counts as pooled
            n, c, h, w = example_inputs.shape
            larger = torch.randn(n, c, 2 * h, 2 * w, generator=torch.Generator().manual_seed(1)).to(example_inputs)
            _record_shapes(model, g, larger, field='in_shape_2x', spy=False)
    return g
