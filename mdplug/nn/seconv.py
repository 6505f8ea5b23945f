"""SE baseline (paper, Table 4): a static conv whose output channels are scaled by a squeeze-excitation gate."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .. import fusion
from ._common import Attention, ConvBase, _copy_param, check_init


class SEConv2d(ConvBase):
    """``y = s(x) ⊙ (W ⊛ x + b)`` with ``s(x) = sigmoid(F(GAP(x)))``, F = FC(p, p·hidden_ratio) → ReLU → FC(·, q).

    The feature-attention baseline the paper compares MDConv with (Table 4): the attention reads the layer's input,
    like MDConv's, but scales the output features instead of generating weights.  It has no training-only parts;
    ``get_equivalent_kernel_bias(x)`` gives the same layer as a per-sample conv.
    """

    supports_groups = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, hidden_ratio: float = 0.25,
                 deploy: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        f = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, self.kernel_size, self.stride, self.padding,
                              self.dilation, groups, bias, **f)
        self.attention = Attention(in_channels, out_channels, hidden_ratio, 'sigmoid', 1.0, **f)
        self.deploy = bool(deploy)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.attention.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = 'preserve', output_stats=None, **kwargs) -> 'SEConv2d':
        """Build the layer in place of ``conv`` (same geometry, device, dtype and mode).

        ``init='fresh'``: the conv's kernel and bias, the attention as freshly built (s(x) near 1/2).
        ``init='preserve'``: the attention's last layer starts at zero, so s(x) = sigmoid(0) = 1/2 exactly, and the
        kernel and bias are stored doubled: ``1/2 ⊙ (2W ⊛ x + 2b)`` is the conv's function with no deviation
        (both factors are powers of two), the gate sitting where the sigmoid is steepest.  ``output_stats`` is
        unused (SE has no BN).
        """
        check_init(init)
        layer = cls(**cls._ctor_kwargs_from_conv(conv), **kwargs)
        layer.train(conv.training)
        scale = 2.0 if init == 'preserve' else 1.0
        _copy_param(layer.conv.weight, conv.weight * scale)
        if conv.bias is not None:
            _copy_param(layer.conv.bias, conv.bias * scale)
        if init == 'preserve':
            nn.init.zeros_(layer.attention.fc2.weight)
            nn.init.zeros_(layer.attention.fc2.bias)
        return layer

    def dynamic_coefficients(self, x: Tensor) -> Tensor:
        """s(x), (B, q)."""
        return self.attention(x)

    def get_equivalent_kernel_bias(self, x: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-sample kernels (B, q, p/g, k, k) and biases (B, q) for input ``x``."""
        if x is None:
            raise ValueError('SEConv2d.get_equivalent_kernel_bias needs the input x: the scale s(x) depends on it')
        return fusion.se_kernel_bias(self.conv.weight, self.conv.bias, self.dynamic_coefficients(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * self.dynamic_coefficients(x)[:, :, None, None]

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in place of this layer: its TorchScript twin (same parameters)."""
        from . import _script
        return _script.ScriptedSE(self)

    def switch_to_deploy(self) -> None:
        """SE has no training-only parts: marks the layer deployed, changes nothing else."""
        self.deploy = True
