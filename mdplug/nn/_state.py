"""Loading a checkpoint of the other form: an expanding layer that receives compact-form keys becomes compact.

A compact checkpoint (``tools/deploy.py``, :func:`mdplug.compact`, mmpretrain's ``reparameterize_model.py``) holds
``weight``, ``bias``, ``weight1``, ``bias1``, ``weight2`` (MDConv, DCD) or a plain conv's ``weight`` [``bias``]
(MAConv, Eq. 10–11); a model built from a training config holds ``expand.*``, ``project.*`` and BNs instead. Both
``torch.nn.Module.load_state_dict`` and mmengine's ``load_state_dict`` call each layer's ``_load_from_state_dict``
before its children's, so the layer switches its own form there, in place, and the load then fills the compact
parameters exactly. Anything that is neither form whole is refused with the layer's name and the fix, so a
non-strict load (mmengine's) never leaves a layer half random. A layer that switched refuses a training step
until :func:`accept` (an optimizer built before the load does not hold its new parameters).
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import torch
from torch import Tensor, nn

EXPANDING_CHILDREN = ('expand', 'project', 'expand_bn', 'project_bn', 'sum_bn')


class CheckpointFormError(ValueError):
    """A layer got a state that is neither its expanding nor its compact form (or a mix of both)."""


def _own_keys(state_dict: Dict[str, Tensor], prefix: str) -> List[str]:
    """The keys of ``state_dict`` under ``prefix``, without the prefix."""
    return [k[len(prefix):] for k in state_dict if k.startswith(prefix)]


def _label(layer: nn.Module, prefix: str) -> str:
    return f"{type(layer).__name__} '{prefix[:-1] or '<root>'}'"


def _is_maconv(layer: nn.Module) -> bool:
    from .maconv import MAConv2d
    return isinstance(layer, MAConv2d)


def _compact_signature(layer: nn.Module, keys: List[str]) -> bool:
    """Whether ``keys`` (the layer's, prefix removed) are its compact form's."""
    if _is_maconv(layer):
        return 'weight' in keys
    return 'weight1' in keys or 'weight2' in keys


def _expanding_signature(keys: List[str]) -> bool:
    return any(k.split('.', 1)[0] in EXPANDING_CHILDREN for k in keys)


def adopt_checkpoint_form(layer: nn.Module, state_dict: Dict[str, Tensor], prefix: str) -> None:
    """Before ``layer`` (a :class:`~mdplug.nn._multilayer.MultiLayerConv`) loads its part of ``state_dict``:
    switch an expanding layer to its compact form when the part is a compact one; refuse mixed or partial parts.

    MAConv's compact form is a plain conv (``weight``, ``bias`` only when the checkpoint has one: a bias folded into
    the next BN is absent), which a static model's conv also is; the layer then *is* that conv, exactly, and a
    warning says that it no longer trains in the expanding form.
    """
    keys = _own_keys(state_dict, prefix)
    if not keys:
        return
    compact, expanding = _compact_signature(layer, keys), _expanding_signature(keys)
    label = _label(layer, prefix)
    if compact and expanding:
        raise CheckpointFormError(
            f'{label}: the checkpoint holds both compact ({", ".join(k for k in keys if "." not in k)}) and '
            f'expanding ({", ".join(k for k in keys if "." in k and k.split(".", 1)[0] in EXPANDING_CHILDREN)[:3]}'
            f'...) keys for this layer; it is not a checkpoint of one form of this model')
    if layer.deploy:
        if expanding:
            raise CheckpointFormError(
                f'{label} is in its compact (deploy) form but the checkpoint holds its expanding (training) form '
                f'({prefix}expand.weight, ...): load it into the training config\'s model (then compact it with '
                f'tools/deploy.py or mdplug.compact), or drop --deployed / mdplug.Compacted')
        return
    if not compact:
        return
    if _is_maconv(layer) and layer.act is not None:
        raise CheckpointFormError(
            f"{label} has act={layer.act!r}, so no compact form, but the checkpoint holds a plain conv's weight "
            f"for it (a static model's checkpoint?): load it into the static config's model")
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
            f'mdplug.nn._state.accept(model) first')
    accept(layer)


def accept(model: nn.Module) -> nn.Module:
    """Allow training steps of layers that switched form while loading (the optimizer was built afterwards)."""
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
    if _is_maconv(layer):
        # the checkpoint's conv decides whether there is a bias (a fused bias folded into the next BN is absent)
        if 'bias' not in keys:
            layer.register_parameter('bias', None)
        elif layer.bias is None:
            layer.bias = nn.Parameter(layer.weight.new_zeros(layer.out_channels))
        warnings.warn(
            f'{label} received a plain conv\'s weight (a compact checkpoint of tools/deploy.py, or a static '
            f'model\'s): the layer became that conv (its compact form) and computes exactly the checkpoint\'s '
            f'model, but no longer trains in the expanding form. To train MAConv starting from static weights, '
            f'load them into the static backbone before converting (init_cfg=dict(type=\'Pretrained\', ...) on '
            f'the inner backbone of mdplug.Converted, or mdplug.convert after loading)', stacklevel=4)


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
