"""Edit a model's module tree: ``convert`` (static → expanding form) and ``compact`` (expanding → compact form).

Both passes swap modules through their parents (``setattr``), so the model keeps its class, its attributes
(``pretrained_cfg``, ...) and the state_dict keys of every layer they do not touch. New modules inherit
``.training`` from the modules they replace.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Dict, Iterable, List, Tuple, Union

import torch
from torch import nn

from mdplug.convert._layers import layer_class, layer_keywords, mdplug_layer_types
from mdplug.convert.graph import analyse
from mdplug.convert.planner import Plan, Select, plan

__all__ = ['convert', 'compact', 'NothingToConvert', 'ORIG_BIAS_ATTR', 'CONVERTED_ATTR']

ORIG_BIAS_ATTR = '_mdplug_orig_bias'
"""Set by :func:`convert` on each new layer: whether the static conv it replaced had a bias."""
CONVERTED_ATTR = '_mdplug_converted'
"""Set by :func:`convert` on the model: the qualified names of the convs it replaced, which
:func:`mdplug.save` records so that :func:`mdplug.load` converts exactly those."""


class NothingToConvert(ValueError):
    """No conv of the model matched the selection; the message lists the convs that exist."""


def _references(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) that holds it (a module shared by two parents has two)."""
    refs: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, attr))
    return refs


def _swap(model: nn.Module, refs, name: str, old: nn.Module, new: nn.Module) -> None:
    holders = refs.get(id(old))
    if not holders:
        raise ValueError(f'{name} ({type(old).__name__}) is the model itself, not a submodule; nothing to swap')
    for parent, attr in holders:
        setattr(parent, attr, new)


def _check_layer_kwargs(kind: str, layer_kwargs: dict) -> None:
    cls = layer_class(kind)
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = layer_keywords(kind)
    bad = sorted(set(layer_kwargs) - allowed)
    if bad:
        raise ValueError(f'{cls.__name__} (kind={kind!r}) takes no keyword {", ".join(map(repr, bad))}; '
                         f'it takes {", ".join(sorted(allowed))}')


def _output_stats(model: nn.Module, names: List[str]) -> Tuple[Dict[str, tuple], List[str]]:
    """For ``init='preserve'``: the running (mean, var) of the BatchNorm that alone reads each conv's output, and
    the convs whose output no BatchNorm alone reads (for them BN0's train-mode batch statistics are not cancelled)."""
    sites = analyse(model, shapes=False).sites
    stats, unmatched = {}, []
    for name in names:
        bn, _ = _sole_bn_user(model, sites, name)
        if bn is None:
            unmatched.append(name)
        elif bn.running_mean is not None:
            stats[name] = (bn.running_mean, bn.running_var)
    return stats, unmatched


def _has_bn0(cls, layer_kwargs: dict) -> bool:
    """Whether layers of ``cls`` built with ``layer_kwargs`` normalise the static branch (BN0 or one BN after the
    sum): the multi-layer layers unless ``norm='none'``."""
    from mdplug.nn._multilayer import MultiLayerConv
    return issubclass(cls, MultiLayerConv) and layer_kwargs.get('norm', 'branch') != 'none'


def convert_with_plan(model: nn.Module, kind: str = 'mdconv', select: Select = 'pointwise',
                      exclude: Union[str, Iterable[str]] = (), keep_stem: bool = True, keep_head: bool = True,
                      inplace: bool = True, example_inputs=None, init: str = 'preserve',
                      **layer_kwargs) -> Tuple[nn.Module, Plan]:
    """:func:`convert` that also returns the :class:`~mdplug.convert.planner.Plan` it carried out."""
    from mdplug.nn._common import check_init
    check_init(init)
    _check_layer_kwargs(kind, layer_kwargs)
    p = plan(model, kind, select, exclude, keep_stem, keep_head, example_inputs)
    if not p.replace:
        raise NothingToConvert(f'{type(model).__name__}: {p.nothing_matched()}')
    if not inplace:
        model = copy.deepcopy(model)
    cls = layer_class(kind)
    stats, unmatched = {}, []
    if init == 'preserve' and _has_bn0(cls, layer_kwargs):
        stats, unmatched = _output_stats(model, p.names)
    refs = _references(model)
    for d in p.replace:
        conv = model.get_submodule(d.name)
        try:
            new = cls.from_conv(conv, init=init, output_stats=stats.get(d.name), **layer_kwargs)
        except ValueError as e:
            raise ValueError(f'cannot convert {d.name} ({type(conv).__name__} {d.shape}) to {cls.__name__}: {e}; '
                             f'leave it out with exclude={d.name!r}') from e
        new.train(conv.training)
        setattr(new, ORIG_BIAS_ATTR, conv.bias is not None)
        _swap(model, refs, d.name, conv, new)
    try:
        object.__setattr__(model, CONVERTED_ATTR, list(getattr(model, CONVERTED_ATTR, ())) + p.names)
    except AttributeError:  # a model class that forbids new attributes: save() then needs meta['converted']
        pass
    if unmatched:
        shown = ', '.join(unmatched[:5]) + (f' and {len(unmatched) - 5} more' if len(unmatched) > 5 else '')
        note = (f"init='preserve': {len(unmatched)} converted convs ({shown}) are not known to feed a BatchNorm "
                f"alone: in eval mode the model computes what it did, but in train mode BN0 normalises their outputs "
                f"with batch statistics, so training starts from a different function there")
        p.notes.append(note)
        warnings.warn(note, stacklevel=3)
    return model, p


def convert(model: nn.Module, kind: str = 'mdconv', select: Select = 'pointwise',
            exclude: Union[str, Iterable[str]] = (), keep_stem: bool = True, keep_head: bool = True,
            inplace: bool = True, example_inputs=None, init: str = 'preserve', **layer_kwargs) -> nn.Module:
    """Replace the selected ``nn.Conv2d`` of ``model`` by the mdplug layer of ``kind`` (the expanding form).

    kind: ``'mdconv' | 'maconv' | 'dyconv' | 'dcd' | 'se'``. ``init``: ``'preserve'`` (default; the converted
    model computes what ``model`` did, in eval mode within float rounding, for fine-tuning a trained model) or
    ``'fresh'`` (the layers' new parameters as freshly built, for training from scratch); the static conv's
    weight goes into the layer's static branch W0 in both (``Layer.from_conv`` says what each layer does).
    ``select``, ``exclude``, ``keep_stem``, ``keep_head``, ``example_inputs``: as in :func:`mdplug.plan`.
    ``layer_kwargs`` go to the layer (e.g. ``m=20``).
    Raises :class:`NothingToConvert` (a ``ValueError``) when nothing matched, naming the convs that exist, and
    ``ValueError`` naming the conv (qualified name and type) that a layer refuses, or an unknown ``init``.
    """
    return convert_with_plan(model, kind, select, exclude, keep_stem, keep_head, inplace, example_inputs, init,
                             **layer_kwargs)[0]


def _bn_types() -> tuple:
    types = [nn.BatchNorm2d, nn.SyncBatchNorm]
    try:
        from timm.layers import BatchNormAct2d, SyncBatchNormAct
        types += [BatchNormAct2d, SyncBatchNormAct]
    except ImportError:
        pass
    return tuple(types)


@torch.no_grad()
def fold_bias_into_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Move ``conv``'s bias into the BatchNorm that reads its output: ``running_mean -= bias``, bias removed.

    Exact in eval mode (BN subtracts running_mean after the bias was added) and in training mode (batch
    statistics cancel a per-channel constant; the running mean keeps tracking the same value minus the bias).
    This is the paper's section 2 remark that the fused bias passes forward into the next layer.
    """
    if bn.running_mean is not None:
        bn.running_mean.sub_(conv.bias.to(bn.running_mean.dtype))
    conv.register_parameter('bias', None)


def _sole_bn_user(model: nn.Module, sites, name: str):
    """The BatchNorm module that is the only user of conv ``name``'s output, or (None, reason)."""
    site = sites.get(name)
    if site is None or site.users is None:
        return None, 'its users are unknown (the model did not trace)'
    if site.calls != 1:
        return None, f'it is called {site.calls} times'
    if len(site.users) != 1:
        return None, f'its output has {len(site.users)} users ({", ".join(site.users)})'
    user = site.users[0]
    try:
        mod = model.get_submodule(user)
    except AttributeError:
        return None, f'its only user is {user}, not a BatchNorm'
    if type(mod) not in _bn_types():
        return None, f'its only user is {user} ({type(mod).__name__}), not a BatchNorm'
    return mod, ''


def compact_with_notes(model: nn.Module, inplace: bool = True) -> Tuple[nn.Module, List[str], List[str]]:
    """:func:`compact` that also returns (names whose bias was folded into a BN, notes on kept biases)."""
    if not inplace:
        model = copy.deepcopy(model)
    ours = mdplug_layer_types()
    layers = [(n, m) for n, m in model.named_modules() if ours and isinstance(m, ours)]
    if not layers:
        return model, [], []
    sites = analyse(model, shapes=False).sites
    refs = _references(model)
    folded, notes = [], []
    for name, layer in layers:
        fused = layer.fuse()
        fused.train(layer.training)
        had_bias = getattr(layer, ORIG_BIAS_ATTR, None)
        if type(fused) is nn.Conv2d and fused.bias is not None and had_bias is False:
            bn, why = _sole_bn_user(model, sites, name)
            if bn is not None:
                fold_bias_into_bn(fused, bn)
                folded.append(name)
            else:
                notes.append(f'{name}: kept the fused bias in the conv because {why}')
        _swap(model, refs, name, layer, fused)
    return model, folded, notes


def compact(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every mdplug layer by its compact form (``layer.fuse()``), the paper's inference model.

    A fused MAConv is a plain ``nn.Conv2d``; when the static conv it came from had no bias and its output's
    only user is a BatchNorm, the fused bias is folded into that BN (:func:`fold_bias_into_bn`), so the
    compacted model has exactly the parameters and state_dict keys of the original static model. Where that is
    not possible the bias stays in the conv and a warning names the conv and the reason.
    """
    model, _, notes = compact_with_notes(model, inplace)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return model
