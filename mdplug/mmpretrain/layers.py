"""Register mdplug's layers in mmengine's root ``MODELS`` registry.

mmcv's ``build_conv_layer`` looks a ``conv_cfg['type']`` up in the registry of the current default scope, which falls
back to its ancestors; registering in the root therefore makes ``dict(type='MDConv2d', m=20)`` work in every scope.

``ConvModule`` reads two more attributes of ``nn.Conv2d`` (``transposed``, ``output_padding``) and initialises a conv
without an ``init_weights`` method with Kaiming, which would overwrite a layer's own initialisation (DYConv's expert
bank, the branches' BN). Where a layer class lacks these, the registered class is a subclass of the same name that
adds them (``init_weights`` runs the layer's ``reset_parameters``); it is an instance of the mdplug layer, so
``mdplug.compact`` and ``mdplug.convert`` treat it as one.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS

from mdplug.nn import LAYERS

#: the layer classes of mdplug ('mdconv', 'maconv', 'dyconv', 'dcd', 'se'); subclasses are instances too
LAYER_TYPES = tuple(LAYERS.values())

_CONV_MODULE_API = ('transposed', 'output_padding', 'init_weights')


def _init_weights(self):
    """mmcv/mmengine's initialisation hook: the layer's own ``reset_parameters``."""
    self.reset_parameters()


def mmcv_compatible(cls):
    """``cls`` itself if it has the ``nn.Conv2d`` API ``ConvModule`` uses, else a same-named subclass adding it."""
    if all(hasattr(cls, attr) for attr in _CONV_MODULE_API):
        return cls
    return type(cls.__name__, (cls, ), {
        '__module__': __name__,
        '__qualname__': cls.__name__,
        '__doc__': cls.__doc__,
        'transposed': False,
        'output_padding': (0, 0),
        'init_weights': _init_weights,
    })


#: the registered classes, by kind
REGISTERED = {kind: mmcv_compatible(cls) for kind, cls in LAYERS.items()}


def register_layers(registry=MMENGINE_MODELS):
    """Register every layer of ``REGISTERED`` under its class name (``'MDConv2d'``, ...); idempotent."""
    for cls in REGISTERED.values():
        if registry.module_dict.get(cls.__name__) is not cls:
            registry.register_module(name=cls.__name__, module=cls)


register_layers()
