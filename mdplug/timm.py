"""timm entry points for the paper's architectures: ``timm.create_model('mobilenetv2_100_mdconv')`` and friends.

Importing this module (``import mdplug`` does) registers ``<arch>_<kind>`` for the paper's ImageNet models
(MobileNetV2 x0.5 / x1.0 with the pointwise convs of the inverted bottlenecks replaced, ResNet18 with the 3×3
convs of its residual blocks replaced) and every kind in :data:`mdplug.nn.LAYERS`, so a timm training script
that only takes ``--model NAME`` trains the paper's variants. Keyword arguments that the layer takes (``m``,
``hidden_ratio``, ``num_experts``, ...) go to the layer; ``init`` (``'fresh'`` by default: these are from-scratch
recipes; ``'preserve'`` to fine-tune ``pretrained=True`` weights) goes to :func:`mdplug.convert`; the rest go to
the timm model.
``timm.utils.reparameterize_model`` turns such a model into its compact form.

It also registers every mdplug layer with ``timm.layers.register_notrace_module`` (as timm does for its
``CondConv2d``): timm's fx feature extraction (``create_feature_extractor``, ``FeatureGraphNet``,
``features_only=True, feature_cls='fx'``) keeps them as leaf modules, which run their eager forward.
"""
from __future__ import annotations

import timm
from timm.layers import register_notrace_module
from timm.models import register_model

from mdplug.convert._layers import layer_keywords, layers
from mdplug.convert.passes import convert
from mdplug.nn import MDPLUG_LAYERS
from mdplug.nn._common import check_init

__all__ = ['PAPER_ARCHS', 'registered_names']

#: timm architecture -> the paper's select rule for it (section 4.1)
PAPER_ARCHS = {
    'mobilenetv2_050': 'pointwise',
    'mobilenetv2_100': 'pointwise',
    'resnet18': 'spatial',
}


def _make_entry(arch: str, kind: str, select: str):
    def entry(pretrained: bool = False, init: str = 'fresh', **kwargs):
        keys = layer_keywords(kind)
        layer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        check_init(init, f'{arch}_{kind}: init')
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        return convert(model, kind, select=select, init=init, **layer_kwargs)

    entry.__name__ = entry.__qualname__ = f'{arch}_{kind}'
    entry.__module__ = __name__
    entry.__doc__ = (f'timm {arch} with its {select} convs replaced by {layers()[kind].__name__} (expanding form); '
                     f"init='fresh' (default, training from scratch) or 'preserve' (with pretrained=True: the "
                     f'converted model computes what the pretrained {arch} does).')
    return entry


def registered_names() -> list:
    """The entry point names this module registers."""
    return [f'{a}_{k}' for a in PAPER_ARCHS for k in layers()]


for _arch, _select in PAPER_ARCHS.items():
    for _kind in layers():
        _fn = _make_entry(_arch, _kind, _select)
        globals()[_fn.__name__] = register_model(_fn)

for _cls in MDPLUG_LAYERS:
    register_notrace_module(_cls)
