"""Build a model from a name, and save / load converted models as self-describing checkpoints.

A checkpoint is ``{'state_dict': ..., 'meta': {...}}`` with plain Python values only, so it loads with
``torch.load(path, weights_only=True)``; the state_dict is the one ``model.state_dict()`` returns (its
``_metadata`` of module versions included, which some ``_load_from_state_dict`` hooks read). ``meta`` holds what
rebuilds the model: ``model`` (the name given to :func:`build_model`), ``model_kwargs``, ``kind``, ``converted``
(the qualified names of the convs the conversion replaced), ``options`` (select, exclude, keep_stem, keep_head,
layer_kwargs; informative once ``converted`` is there) and ``form`` (``'expanding'`` or ``'compact'``).
:func:`load` converts exactly the ``converted`` convs; checkpoints without that list are re-planned.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Optional

import torch
from torch import nn

__all__ = ['build_model', 'save', 'load', 'torch_load', 'CheckpointError', 'FORMS']

FORMS = ('expanding', 'compact')
TORCHVISION_PREFIX = 'torchvision:'


class CheckpointError(ValueError):
    """A checkpoint that is not an mdplug checkpoint or does not match the model it describes."""


def _close(name: str, known) -> str:
    hits = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return f'; close matches: {", ".join(hits)}' if hits else ''


def _is_config_path(name: str) -> bool:
    return name.endswith('.py') or os.path.sep in name or os.path.isfile(name)


def _build_mmpretrain(path: str, **kwargs) -> nn.Module:
    if not os.path.isfile(path):
        raise ValueError(f'mmpretrain config {path!r} does not exist')
    try:
        import mdplug.mmpretrain as mm
    except ImportError as e:
        raise ValueError(f'{path}: building an mmpretrain config needs mdplug.mmpretrain and the mmpretrain extra '
                         f'(pip install -e ".[mmpretrain]"): {e}') from e
    builder = getattr(mm, 'build_model_from_config', None)
    if builder is not None:
        return builder(path, **kwargs)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    return MODELS.build(cfg.model)


def build_model(name: str, **kwargs) -> nn.Module:
    """A model with random weights from ``name``: a timm name, ``torchvision:NAME`` or an mmpretrain config path.

    Never downloads weights. Unknown names raise ``ValueError`` with close matches.
    """
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision
        tv = name[len(TORCHVISION_PREFIX):]
        known = torchvision.models.list_models()
        if tv not in known:
            raise ValueError(f'unknown torchvision model {tv!r}{_close(tv, known)}')
        return torchvision.models.get_model(tv, weights=None, **kwargs)
    if _is_config_path(name):
        return _build_mmpretrain(name, **kwargs)
    import timm
    import mdplug.timm  # noqa: F401 - registers the *_mdconv, ... entry points
    if not timm.is_model(name.split('.')[0]):
        raise ValueError(f'unknown model {name!r} (not a timm model; use torchvision:NAME for torchvision)'
                         f'{_close(name, timm.list_models())}')
    return timm.create_model(name, pretrained=False, **kwargs)


def save(model: nn.Module, path: str, meta: dict) -> None:
    """Write ``{'state_dict', 'meta'}``; ``meta`` must name ``model``, ``kind``, ``options`` and ``form``.

    ``meta['converted']`` defaults to the names :func:`mdplug.convert` recorded on ``model``.
    """
    missing = [k for k in ('model', 'kind', 'options', 'form') if k not in meta]
    if missing:
        raise ValueError(f'checkpoint meta lacks {", ".join(missing)}')
    if meta['form'] not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, not {meta["form"]!r}')
    if callable(meta['options'].get('select', 'pointwise')):
        raise ValueError('a callable select cannot be stored in a checkpoint; give the list of qualified names it '
                         'selects (plan(...).names) as select, or save the state_dict yourself')
    from mdplug.convert.passes import CONVERTED_ATTR
    meta = dict(meta)
    if meta.get('converted') is None and getattr(model, CONVERTED_ATTR, None) is not None:
        meta['converted'] = list(getattr(model, CONVERTED_ATTR))
    if isinstance(meta['options'].get('select'), (tuple, set, frozenset)):
        meta['options'] = dict(meta['options'], select=sorted(meta['options']['select']))
    from mdplug.convert._layers import layers
    state = model.state_dict()  # an OrderedDict carrying _metadata (module versions): kept as it is
    for k, v in state.items():
        state[k] = v.detach().cpu()
    torch.save({'state_dict': state, 'meta': dict(meta, mdplug_kinds=sorted(layers()))}, path)


def torch_load(path: str):
    """``torch.load(path, weights_only=True)`` whose errors are one short line naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist' if not os.path.isdir(path)
                              else f'checkpoint {path!r} is a directory, not a file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        text = str(e)
        if 'can still be loaded' in text:  # a valid pickle holding Python objects beyond tensors
            found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text)
            what = f' ({found.group(1)})' if found else ''
            raise CheckpointError(f'{path}: holds pickled Python objects{what}, not only tensors and plain values; '
                                  f'save a state_dict (torch.save(model.state_dict(), path))') from None
        raise CheckpointError(f'{path}: not a readable torch checkpoint (corrupt, truncated, or not written by '
                              f'torch.save)') from None


def read(path: str) -> dict:
    """The raw checkpoint dict, checked to be an mdplug checkpoint."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'meta' not in ckpt:
        raise CheckpointError(f'{path}: not an mdplug checkpoint (expected keys state_dict and meta)')
    return ckpt


def rebuild(meta: dict, form: Optional[str] = None) -> nn.Module:
    """The model described by ``meta`` (random weights) in ``form`` (default: the checkpoint's own)."""
    from mdplug.convert.passes import compact_with_notes, convert
    opts = dict(meta['options'])
    layer_kwargs = opts.pop('layer_kwargs', {}) or {}
    model = build_model(meta['model'], **(meta.get('model_kwargs') or {}))
    model.eval()
    converted = meta.get('converted')
    # (random weights: the state_dict overwrites them, so 'fresh' is the cheapest construction)
    if converted is None:  # written before checkpoints recorded their convs: plan again
        convert(model, meta['kind'], init='fresh', **opts, **layer_kwargs)
    elif converted:
        convert(model, meta['kind'], select=list(converted), init='fresh', **layer_kwargs)
    if (form or meta['form']) == 'compact':
        compact_with_notes(model)
    return model


def load(path: str, strict: bool = True) -> nn.Module:
    """Rebuild the model saved in ``path`` (by the CLI or :func:`save`) and load its weights.

    The model comes back in eval mode and in the checkpoint's form. Raises :class:`CheckpointError` when the
    file is not an mdplug checkpoint or its state_dict does not match the rebuilt model.
    """
    ckpt = read(path)
    meta = ckpt['meta']
    model = rebuild(meta)
    try:
        result = model.load_state_dict(ckpt['state_dict'], strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f'{path}: state_dict does not match {meta["model"]} ({meta["kind"]}, {meta["form"]}): '
                              f'{" ".join(str(e).split())[:300]}') from e
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f'{path}: state_dict does not match {meta["model"]} ({meta["kind"]}, {meta["form"]}): '
            f'missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}')
    return model
