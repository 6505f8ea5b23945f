"""Register mdplug's layers in mmengine's root ``MODELS`` registry.

mmcv's ``build_conv_layer`` looks a ``conv_cfg['type']`` up in the registry of the current default scope, which falls
back to its ancestors; registering in the root therefore makes ``dict(type='MDConv2d', m=20)`` work in every scope.
The layers carry what mmcv's ``ConvModule`` reads of a conv (``transposed``, ``output_padding``, and an
``init_weights`` that runs the layer's own initialisation instead of ``ConvModule``'s Kaiming).
"""
from mmengine.registry import MODELS as MMENGINE_MODELS

from mdplug.nn import LAYERS

#: the layer classes of mdplug ('mdconv', 'maconv', 'dyconv', 'dcd', 'se'); subclasses are instances too
LAYER_TYPES = tuple(LAYERS.values())


def register_layers(registry=MMENGINE_MODELS):
    """Register every mdplug layer under its class name (``'MDConv2d'``, ...); idempotent."""
    for cls in LAYERS.values():
        if registry.module_dict.get(cls.__name__) is not cls:
            registry.register_module(name=cls.__name__, module=cls)


register_layers()
