"""Build a model from a name, and save / load converted models as self-describing checkpoints.

A checkpoint is ``{'state_dict': ..., 'meta': {...}}`` with plain Python values only, so it loads with
``torch.load(path, weights_only=True)``. ``meta`` holds what rebuilds the model: ``model`` (the name given to
:func:`build_model`), ``model_kwargs``, ``kind``, ``options`` (select, exclude, keep_stem, keep_head,
layer_kwargs) and ``form`` (``'expanding'`` or ``'compact'``).
"""
from __future__ import annotations

import difflib
import os
from typing import Optional

import torch
from torch import nn

__all__ = ['build_model', 'save', 'load', 'CheckpointError', 'FORMS']

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
    """Write ``{'state_dict', 'meta'}``; ``meta`` must name ``model``, ``kind``, ``options`` and ``form``."""
    missing = [k for k in ('model', 'kind', 'options', 'form') if k not in meta]
    if missing:
        raise ValueError(f'checkpoint meta lacks {", ".join(missing)}')
    if meta['form'] not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, not {meta["form"]!r}')
    if not isinstance(meta['options'].get('select', 'pointwise'), str):
        raise ValueError('a callable select cannot be stored in a checkpoint; save the state_dict yourself')
    from mdplug.convert._layers import layers
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({'state_dict': state, 'meta': dict(meta, mdplug_kinds=sorted(layers()))}, path)


def read(path: str) -> dict:
    """The raw checkpoint dict, checked to be an mdplug checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f'{path}: not a readable torch checkpoint ({type(e).__name__}: {e})') from e
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
    convert(model, meta['kind'], init='fresh', **opts, **layer_kwargs)  # (the state_dict overwrites the weights)
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
