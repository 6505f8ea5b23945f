"""Loading a checkpoint of the other form: an expanding layer that receives compact-form keys becomes compact.

A compact checkpoint (``tools/deploy.py``, :func:`mdplug.compact`, mmpretrain's ``reparameterize_model.py``) holds
``weight``, ``bias``, ``weight1``, ``bias1``, ``weight2`` (MDConv, DCD); a model built from a training config holds
``expand.*``, ``project.*`` and BNs instead. Both
``torch.nn.Module.load_state_dict`` and mmengine's ``load_state_dict`` call each layer's ``_load_from_state_dict``
before its children's, so the layer switches its own form there, in place, and the load then fills the compact
parameters exactly. Anything that is neither form whole is refused with the layer's name and the fix, so a
non-strict load (mmengine's) never leaves a layer half random: a static model's plain conv state is refused as
well. MAConv's compact form is a plain conv (Eq. 10–11), whose keys a static model's conv has too: which one a
checkpoint holds cannot be told, so MAConv refuses it and names the models it loads into (the static one, or the
compact one built before loading). A layer that switched refuses a training step
until :func:`accept` (an optimizer built before the load does not hold its new parameters).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

EXPANDING_CHILDREN = ('expand', 'project', 'expand_bn', 'project_bn', 'sum_bn')


class CheckpointFormError(RuntimeError):
    """A layer got a state that is neither its expanding nor its compact form (or a mix of both); a RuntimeError
    like torch's own ``load_state_dict`` errors."""


def _own_keys(state_dict: Dict[str, Tensor], prefix: str) -> List[str]:
    """The keys of ``state_dict`` under ``prefix``, without the prefix."""
    return [k[len(prefix):] for k in state_dict if k.startswith(prefix)]


def _label(layer: nn.Module, prefix: str) -> str:
    return f"{type(layer).__name__} '{prefix[:-1] or '<root>'}'"


def _is_maconv(layer: nn.Module) -> bool:
    from .maconv import MAConv2d
    return isinstance(layer, MAConv2d)


def _expanding_signature(keys: List[str]) -> bool:
    return any(k.split('.', 1)[0] in EXPANDING_CHILDREN for k in keys)


def adopt_checkpoint_form(layer: nn.Module, state_dict: Dict[str, Tensor], prefix: str) -> None:
    """Before ``layer`` (a :class:`~mdplug.nn._multilayer.MultiLayerConv`) loads its part of ``state_dict``:
    switch an expanding layer to its compact form when the part is a compact one; refuse mixed or partial parts and
    a plain conv's state (a static model's; for MAConv also its compact form's, which cannot be told apart).
    """
    keys = _own_keys(state_dict, prefix)
    if not keys:
        return
    expanding = _expanding_signature(keys)
    multi = 'weight1' in keys or 'weight2' in keys  # MDConv / DCD compact
    plain = 'weight' in keys and not multi  # a plain conv's: a static model's, or a compact MAConv's
    label = _label(layer, prefix)
    if (multi or plain) and expanding:
        raise CheckpointFormError(
            f'{label}: the checkpoint holds both compact ({", ".join(k for k in keys if "." not in k)}) and '
            f'expanding ({", ".join(k for k in keys if "." in k and k.split(".", 1)[0] in EXPANDING_CHILDREN)[:3]}'
            f'...) keys for this layer; it is not a checkpoint of one form of this model')
    if layer.deploy and expanding:
        raise CheckpointFormError(
            f'{label} is in its compact (deploy) form but the checkpoint holds its expanding (training) form '
            f'({prefix}expand.weight, ...): load it into the training config\'s model (then compact it with '
            f'tools/deploy.py or mdplug.compact), or drop --deployed / mdplug.Compacted')
    if plain and not (layer.deploy and _is_maconv(layer)):
        what = ('a compact MAConv checkpoint (tools/deploy.py, reparameterize_model.py: the static model\'s) or a '
                'static model\'s, which cannot be told apart' if _is_maconv(layer) else 'a static model\'s checkpoint')
        raise CheckpointFormError(
            f"{label} received a plain conv's state ({prefix}weight): {what}. Load it into the static model (the "
            f"config without mdplug.Converted / conv_cfg)"
            + (' or into the compact model (tools/test.py --deployed, mdplug.Compacted)' if _is_maconv(layer) else '')
            + f"; to train {type(layer).__name__} from static weights, load them before converting "
              f"(init_cfg=dict(type='Pretrained', ...) on the inner backbone of mdplug.Converted)")
    if not multi:
        return
    if not layer.deploy:
        _switch_for(layer, keys, label)
    _check_complete(layer, state_dict, prefix, keys, label)


SWITCHED = '_mdplug_switched_on_load'  # id of the guard hook of a layer that switched form while loading


def _refuse_stale_training(layer: nn.Module, args) -> None:
    """Forward pre-hook of a layer that switched form while loading: its first forward must not be a training step
    (an optimizer built before the load, as the Runner's for ``load_from``, lacks the new parameters); any other
    first forward (inference) removes the guard."""
    if layer.training and torch.is_grad_enabled():
        raise RuntimeError(
            f'{type(layer).__name__} switched to its compact form when a compact checkpoint was loaded into the '
            f'model (e.g. load_from / pretrained of a training config), so an optimizer built before the load does '
            f'not hold its new parameters and would never update them. Train from the training (expanding) '
            f'checkpoint; or, to train the compact form itself, build the optimizer after loading and call '
            f'mdplug.accept_loaded(model) first')
    accept(layer)


def accept(model: nn.Module) -> nn.Module:
    """Allow training steps of layers that switched form while loading (the optimizer was built afterwards).

    Public as :func:`mdplug.accept_loaded`; returns ``model``."""
    for module in model.modules():
        hook_id = module.__dict__.pop(SWITCHED, None)
        if hook_id is not None:
            module._forward_pre_hooks.pop(hook_id, None)
    return model


@torch.no_grad()
def _switch_for(layer: nn.Module, keys: List[str], label: str) -> None:
    """Rebuild ``layer``'s compact parameters in place (uninitialised; the load fills them)."""
    training = layer.training
    layer._rebuild_compact()
    layer.train(training)
    if SWITCHED not in layer.__dict__:
        layer.__dict__[SWITCHED] = layer.register_forward_pre_hook(_refuse_stale_training).id


def _check_complete(layer: nn.Module, state_dict: Dict[str, Tensor], prefix: str, keys: List[str],
                    label: str) -> None:
    """Every compact parameter must come from the checkpoint with its shape; else nothing half random stays."""
    problems = []
    for name, param in layer.named_parameters(recurse=False):
        value = state_dict.get(prefix + name)
        if value is None:
            problems.append(f'{prefix}{name} is missing')
        elif tuple(value.shape) != tuple(param.shape):
            problems.append(f'{prefix}{name} has shape {tuple(value.shape)}, the layer {tuple(param.shape)}')
    own = {n for n, _ in layer.named_parameters(recurse=False)} | {n for n, _ in layer.named_buffers(recurse=False)}
    extra = [prefix + k for k in keys if '.' not in k and k not in own]
    problems += [f'{k} is not a parameter of the compact form' for k in extra]
    if problems:
        raise CheckpointFormError(
            f'{label}: the checkpoint holds a compact form that does not match this layer ({"; ".join(problems)}); '
            f'build the model with the options (m, bypass, norm, ...) the checkpoint was trained with')
