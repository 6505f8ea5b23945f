"""mmpretrain / mmengine integration of mdplug.

Importing this module (``custom_imports=dict(imports=['mdplug.mmpretrain'])``) registers:

- the layers ``MDConv2d``, ``MAConv2d``, ``DYConv2d``, ``DCDConv2d``, ``SEConv2d`` in mmengine's root ``MODELS``
  (so ``build_conv_layer`` and ``ConvModule(conv_cfg=...)`` find them);
- the model transforms ``mdplug.Converted`` (convert a backbone when it is built) and ``mdplug.Compacted``
  (build a model and re-parameterise it into its compact form);
- the backbones ``MobileNetV2CIFAR`` and ``SmallNet`` and the head ``DropoutLinearClsHead``;
- the datasets ``SVHN``, ``FashionMNISTIDX``, ``LocalCIFAR10``, ``LocalCIFAR100`` (each with ``preload=True``: the
  pipeline run once, the samples kept as one tensor), the wrapper ``PerClassSubset``, the transform ``CenterPad``
  and the data preprocessor ``mdplug.AugmentClsDataPreprocessor`` (random crop and flip of the whole batch);
- the hook ``TemperatureAnnealHook`` and the optimizer wrapper ``CPUAmpOptimWrapper`` (``--amp`` without CUDA);
- the few non-tensor globals of mmengine checkpoints as safe for ``torch.load``'s ``weights_only`` default
  (:func:`~mdplug.mmpretrain.runtime.allow_mmengine_checkpoints`), so mmpretrain's own tools read them;
- mmengine FLOP-counter handles for the compact layers' products (:mod:`~mdplug.mmpretrain.complexity`), and
  ``switch_to_deploy()`` on every backbone that holds mdplug layers (``reparameterize_model.py``'s convention).
"""
from .layers import LAYER_TYPES, register_layers
from .transform import Compacted, Converted, compact_classifier, reset_mdplug_layers, unwrap_converted
from .backbones import MobileNetV2CIFAR, SmallNet
from .heads import DropoutLinearClsHead
from .datasets import (SVHN, CenterPad, FashionMNISTIDX, LocalCIFAR10, LocalCIFAR100, PerClassSubset,
                       per_class_indices)
from .preprocessor import AugmentClsDataPreprocessor
from .hooks import TemperatureAnnealHook
from .optim import CPUAmpOptimWrapper
from .complexity import register_complexity_handles  # noqa: F401 - registers mmengine FLOP handles
from .runtime import allow_mmengine_checkpoints

allow_mmengine_checkpoints()

__all__ = [
    'LAYER_TYPES', 'register_layers', 'Converted', 'Compacted', 'compact_classifier', 'reset_mdplug_layers',
    'unwrap_converted',
    'MobileNetV2CIFAR', 'SmallNet', 'DropoutLinearClsHead', 'SVHN', 'FashionMNISTIDX', 'LocalCIFAR10', 'LocalCIFAR100',
    'PerClassSubset', 'AugmentClsDataPreprocessor',
    'per_class_indices', 'CenterPad', 'TemperatureAnnealHook', 'CPUAmpOptimWrapper',
]
