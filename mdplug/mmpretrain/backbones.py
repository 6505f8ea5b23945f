"""Backbones of the paper that mmpretrain lacks: MobileNetV2 for 32x32 inputs, and SmallNet (section 4.5).

Also gives every mmpretrain backbone that holds mdplug layers (``mdplug.Converted``, ``conv_cfg=dict(type=...)``)
the ``switch_to_deploy()`` that mmpretrain's ``tools/model_converters/reparameterize_model.py`` calls.
"""
import types
from collections import OrderedDict

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmpretrain.models.backbones import MobileNetV2
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from mmpretrain.models.utils import make_divisible
from mmpretrain.registry import MODELS

from .layers import LAYER_TYPES
from .transform import compact_backbone


class _SwitchToDeploy:
    """``BaseBackbone.switch_to_deploy`` for backbones that hold mdplug layers (:func:`compact_backbone`).

    A backbone without any has no such attribute (``hasattr`` is False, as before), so a static model still meets
    ``reparameterize_model.py``'s own check; a backbone class with its own ``switch_to_deploy`` keeps it.
    """

    def __get__(self, backbone, owner=None):
        if backbone is None:
            return self
        if not any(isinstance(m, LAYER_TYPES) for m in backbone.modules()):
            raise AttributeError(f'{type(backbone).__name__} has no mdplug layer, so no switch_to_deploy')
        return types.MethodType(compact_backbone, backbone)


if 'switch_to_deploy' not in vars(BaseBackbone):
    BaseBackbone.switch_to_deploy = _SwitchToDeploy()


@MODELS.register_module()
class MobileNetV2CIFAR(MobileNetV2):
    """MobileNetV2 adapted to 32x32 inputs: a stride-1 stem and a stride-1 second stage.

    The ImageNet network downsamples 32x (stem + 4 stages); this one 8x, so a 32x32 image ends at 4x4. Everything
    else, ``widen_factor`` (down to 0.1, channels rounded to multiples of 8) included, is mmpretrain's MobileNetV2.

    Args:
        in_channels (int): channels of the input image (1 for Fashion-MNIST). Defaults to 3.
        **kwargs: the arguments of :class:`mmpretrain.models.MobileNetV2`.
    """

    # expand_ratio, channel, num_blocks, stride; the second stage keeps stride 1
    arch_settings = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2],
                     [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                     [6, 320, 1, 1]]

    def __init__(self, widen_factor=1., in_channels=3, **kwargs):
        super().__init__(widen_factor=widen_factor, **kwargs)
        self.conv1 = ConvModule(
            in_channels=in_channels,
            out_channels=make_divisible(32 * widen_factor, 8),
            kernel_size=3,
            stride=1,
            padding=1,
            conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg,
            act_cfg=self.act_cfg)

    def switch_to_deploy(self):
        """Compact every mdplug layer inside, in place (a static network is its own compact form)."""
        compact_backbone(self)


@MODELS.register_module()
class SmallNet(BaseBackbone):
    """SmallNet of the paper's ablation study (section 4.5).

    A 3x3 stem with 16 channels, then three blocks of a 1x1 pointwise conv (stride 1, no padding) and a 3x3
    depthwise conv (stride 2, padding 1) with 16, 32, 64 channels times ``widen_factor``; every conv is followed by
    BN and ReLU. The width multiplier applies to all layers except the stem. Pair it with ``GlobalAveragePooling``
    and a ``LinearClsHead`` of ``in_channels=SmallNet.scaled(64, widen_factor)``.

    Input ``(N, in_channels, 32, 32)``; output a 1-tuple of ``(N, 64 * widen_factor, 4, 4)``.
    """

    stem_channels = 16
    block_channels = (16, 32, 64)

    def __init__(self,
                 widen_factor=1.,
                 in_channels=3,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 act_cfg=dict(type='ReLU'),
                 init_cfg=[
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])
                 ]):
        super().__init__(init_cfg)
        if widen_factor <= 0:
            raise ValueError(f'SmallNet: widen_factor must be positive, got {widen_factor}')
        self.widen_factor = widen_factor

        def conv(p, q, k, stride=1, groups=1):
            return ConvModule(p, q, k, stride=stride, padding=k // 2, groups=groups,
                              conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)

        self.stem = conv(in_channels, self.stem_channels, 3)
        p = self.stem_channels
        self.layers = []
        for i, channels in enumerate(self.block_channels):
            q = self.scaled(channels, widen_factor)
            block = nn.Sequential(OrderedDict(
                pointwise=conv(p, q, 1),
                depthwise=conv(q, q, 3, stride=2, groups=q)))
            self.add_module(f'layer{i + 1}', block)
            self.layers.append(f'layer{i + 1}')
            p = q
        self.out_channels = p

    def switch_to_deploy(self):
        """Compact every mdplug layer inside, in place (a static network is its own compact form)."""
        compact_backbone(self)

    @staticmethod
    def scaled(channels, widen_factor):
        """Channels of a block at ``widen_factor`` (at least 1)."""
        return max(1, int(round(channels * widen_factor)))

    def forward(self, x):
        x = self.stem(x)
        for name in self.layers:
            x = getattr(self, name)(x)
        return (x, )
