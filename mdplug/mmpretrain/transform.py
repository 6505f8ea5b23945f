"""Model transforms for configs: ``mdplug.Converted`` and ``mdplug.Compacted``.

``backbone=dict(type='mdplug.Converted', backbone=dict(type='MobileNetV2'), kind='mdconv', select='pointwise', m=20)``
builds the inner backbone and converts it in place when the model is built, i.e. before the Runner wraps the model
in DDP and builds the optimizer. The result *is* the inner backbone (same class, same state_dict keys for the
layers that were not converted).
"""
import copy
import os.path as osp
import types
import warnings

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from torch.nn.modules.batchnorm import _BatchNorm

from mdplug.convert import compact, convert
from mdplug.convert.passes import ORIG_BIAS_ATTR, compact_with_notes, fold_bias_into_bn
from mdplug.nn import LAYERS
from mdplug.nn._common import check_init

from .layers import LAYER_TYPES
from .registry import MODELS

CONVERTED = 'mdplug.Converted'


def reset_mdplug_layers(module: nn.Module) -> int:
    """Re-run ``reset_parameters()`` of every mdplug layer inside ``module``; returns how many were reset."""
    layers = [m for m in module.modules() if isinstance(m, LAYER_TYPES)]
    for layer in layers:
        layer.reset_parameters()
    return len(layers)


def _init_weights_then_reset_mdplug(self):
    """``init_weights`` of a converted backbone: the class's own, then mdplug layers' own initialisation.

    Backbones such as ShuffleNetV2 walk ``named_modules()`` and re-initialise every ``nn.Conv2d`` and BN they find,
    which reaches the branches inside mdplug layers (their BN scales, their zero-initialised convs); resetting the
    mdplug layers afterwards restores the initialisation each layer is designed with.
    """
    type(self).init_weights(self)
    reset_mdplug_layers(self)


def _pretrained_cfg(backbone: nn.Module):
    """The ``Pretrained`` entry of ``backbone.init_cfg`` (a dict or a list of them), else None."""
    cfgs = getattr(backbone, 'init_cfg', None)
    for cfg in [cfgs] if isinstance(cfgs, dict) else list(cfgs or ()):
        if isinstance(cfg, dict) and cfg.get('type') in ('Pretrained', 'PretrainedInit'):
            return cfg
    return None


def _initialised(self):
    """``init_weights`` of a backbone initialised before conversion: nothing left to do (mmengine's ``is_init``
    makes the Runner skip it; a direct call must not re-initialise the converted layers either)."""


@MODELS.register_module(name='Converted')
def Converted(backbone: dict, kind: str, input_shape=(3, 224, 224), init: str = 'preserve',
              **convert_kwargs) -> nn.Module:
    """Build ``backbone`` (an mmpretrain config dict) and convert it with ``mdplug.convert(kind=kind, ...)``.

    ``input_shape`` ``(C, H, W)``: the image size the conversion pass traces the backbone with (it tells the stem,
    the head and pooled 1x1 maps apart). ``convert_kwargs`` go to :func:`mdplug.convert` (``select``, ``exclude``,
    ``keep_stem``, ``keep_head``) and on to the layers (``m``, ``hidden_ratio``, ``bypass``, ``norm``, ...).

    ``init='fresh'`` (from-scratch recipes, every config in ``configs/``): converted at build time; the Runner's
    ``init_weights`` runs the backbone's own initialisation, then each mdplug layer's own (:func:`reset_mdplug_layers`).
    ``init='preserve'`` (default), or an inner ``init_cfg=dict(type='Pretrained', ...)``: the static backbone is
    initialised first, at build time (its ``init_weights``: a ``Pretrained`` init_cfg loads its checkpoint there),
    then converted with ``init``, so the converted model starts as the static one (``'preserve'``: computes what it
    computes); the Runner's later ``init_weights`` leaves it as it is. Returns the built backbone itself.
    """
    if kind not in LAYERS:
        raise KeyError(f'{CONVERTED}: unknown kind {kind!r} for backbone {backbone.get("type")!r}; '
                       f'choose one of {sorted(LAYERS)}')
    check_init(init, f'{CONVERTED}: init')
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
    model = MMPRETRAIN_MODELS.build(copy.deepcopy(backbone))
    pretrained = _pretrained_cfg(model)
    ckpt = str((pretrained or {}).get('checkpoint', ''))
    if pretrained is not None and '://' not in ckpt and not osp.isfile(ckpt):
        raise FileNotFoundError(
            f"{CONVERTED}: the inner backbone {backbone.get('type')!r} has init_cfg=dict(type='Pretrained', "
            f"checkpoint={ckpt!r}), which does not exist; a converted backbone loads it when it is built, before it "
            f"is converted. Point it at the static model's checkpoint (--cfg-options "
            f"model.backbone.backbone.init_cfg.checkpoint=PATH), or drop it where a checkpoint of the converted "
            f"model is loaded afterwards (model.backbone.backbone.init_cfg=None)")
    first = init == 'preserve' or pretrained is not None
    if first and hasattr(model, 'init_weights'):
        model.init_weights()
    example_inputs = torch.randn(1, *input_shape)
    model = convert(model, kind=kind, inplace=True, example_inputs=example_inputs, init=init, **convert_kwargs)
    if hasattr(model, 'init_weights'):
        wrapper = _initialised if first else _init_weights_then_reset_mdplug
        model.init_weights = types.MethodType(wrapper, model)
    return model


def _norm_after_conv(module: ConvModule):
    """The BN an mmcv ``ConvModule`` applies right after its conv, else None."""
    order = list(module.order)
    if not module.with_norm or order.index('norm') != order.index('conv') + 1:
        return None
    return module.norm if isinstance(module.norm, _BatchNorm) else None


def compact_part(part: nn.Module) -> nn.Module:
    """:func:`mdplug.compact` of one traceable-or-not module, in place.

    ``mdplug.compact`` folds a fused MAConv bias into the BN that reads the conv's output when torch.fx shows that
    BN is its only user. Backbones that do not trace (ShuffleNetV2: ``x.size()`` unpacking, ``chunk``) leave the
    graph unknown; there a conv that is the ``conv`` of an mmcv ``ConvModule`` still feeds only the module's BN, so
    the bias is folded into that BN here. Layers that a ``conv_cfg=dict(type=...)`` built stand for a conv with
    their own ``bias`` flag (``ConvModule`` and ResNet build convs before a norm without one), so their fused bias
    is folded the same way. Any other kept bias is reported as ``mdplug.compact`` reports it.
    """
    for layer in part.modules():  # a conv_cfg-built layer stands for a conv built with its own bias flag
        if isinstance(layer, LAYER_TYPES) and not hasattr(layer, ORIG_BIAS_ATTR) and hasattr(layer, 'use_bias'):
            setattr(layer, ORIG_BIAS_ATTR, layer.use_bias)
    pending = {}
    for name, module in part.named_modules():
        if isinstance(module, ConvModule) and isinstance(module.conv, LAYER_TYPES) \
                and getattr(module.conv, ORIG_BIAS_ATTR, True) is False and _norm_after_conv(module) is not None:
            pending[f'{name}.conv' if name else 'conv'] = module
    _, _, notes = compact_with_notes(part, inplace=True)
    fixed = set()
    for name, module in pending.items():
        conv = module.conv
        if type(conv) is nn.Conv2d and conv.bias is not None:
            fold_bias_into_bn(conv, _norm_after_conv(module))
            fixed.add(name)
    for note in notes:
        if note.split(':', 1)[0] not in fixed:
            warnings.warn(note, stacklevel=2)
    return part


def compact_backbone(backbone: nn.Module) -> None:
    """``backbone.switch_to_deploy()``, mmpretrain's re-parameterisation convention (``reparameterize_model.py``):
    every mdplug layer inside becomes its compact form, in place (:func:`compact_part`, MAConv biases folded)."""
    compact_part(backbone)


def compact_classifier(model: nn.Module) -> nn.Module:
    """:func:`mdplug.compact` of an mmpretrain classifier, in place, part by part (:func:`compact_part`).

    The classifier's own ``forward`` (modes, data samples) does not trace with torch.fx, its backbone may;
    compacting ``backbone``, ``neck`` and ``head`` separately lets the pass see which BN reads each fused MAConv and
    fold the bias into it, so a compact MAConv classifier has the static classifier's exact state_dict keys.
    """
    for name in ('backbone', 'neck', 'head'):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module) and any(isinstance(m, LAYER_TYPES) for m in part.modules()):
            compact_part(part)
    if any(isinstance(m, LAYER_TYPES) for m in model.modules()):
        compact(model, inplace=True)
    return model


@MODELS.register_module(name='Compacted')
def Compacted(model: dict, data_preprocessor=None) -> nn.Module:
    """Build ``model`` and re-parameterise it into its compact (deploy) form (:func:`compact_classifier`).

    Lets ``tools/test.py --deployed`` build the structure that a compact checkpoint of ``tools/deploy.py`` loads
    into. ``data_preprocessor`` (which the Runner passes to every model it builds) goes to the inner model.
    """
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
    model = copy.deepcopy(model)
    if data_preprocessor is not None:
        model.setdefault('data_preprocessor', data_preprocessor)
    built = MMPRETRAIN_MODELS.build(model)
    built.eval()
    return compact_classifier(built)


def unwrap_converted(model_cfg: dict) -> dict:
    """The static model's config: ``model_cfg`` with every ``mdplug.Converted`` backbone replaced by its inner one."""
    cfg = copy.deepcopy(model_cfg)
    for key in ('backbone', 'neck', 'head'):
        part = cfg.get(key)
        if isinstance(part, dict) and part.get('type') == CONVERTED:
            cfg[key] = part['backbone']
    return cfg
