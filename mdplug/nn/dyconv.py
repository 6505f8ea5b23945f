"""DYConv baseline (dynamic convolution, Chen et al. 2020): attention over K parallel kernels.

The paper's setting (section 4.1): K = 4 experts, attention F = GAP → FC(p, p/4) → ReLU → FC(p/4, K), softmax
with temperature 30.  ``set_temperature`` supports DYConv's temperature annealing.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import fusion
from ._common import (PATHS, Attention, ConvBase, Proxy, _check_choice, _copy_param, check_init, conv_bias_init_,
                      is_channels_last, kaiming_conv_init_, tracing_for_export)


class DYConv2d(ConvBase):
    """Dynamic convolution baseline, a drop-in for ``nn.Conv2d``.

    ``y = (Σ_k π_k(x) W_k) ⊛ x + Σ_k π_k(x) b_k`` with ``π(x) = softmax(F(GAP(x)) / T)``.
    It has no BN inside, so its expanding and compact forms coincide; ``path`` chooses how it runs:
    ``'weight'`` aggregates the kernels per sample and runs one batched call (bmm for 1×1, a grouped conv
    otherwise), ``'factorized'`` runs the K kernels as one conv and mixes the K outputs, ``'auto'`` is
    ``'weight'`` (the cheaper one whenever H'·W' ≥ 1).

    Args (beyond ``nn.Conv2d``'s): ``num_experts`` (K, paper 4), ``temperature`` (paper 30), ``hidden_ratio``
    (paper 1/4), ``path``; ``deploy`` is accepted for the common interface and changes nothing.

    The K kernels are stored flat, ``weight`` (K, q·p/g·kh·kw) as timm's ``CondConv2d`` keeps them, so that
    ``model.to(memory_format=torch.channels_last)`` (which refuses 5-D tensors) works on converted models;
    :attr:`experts` is the (K, q, p/g, kh, kw) view.  Checkpoints holding the 5-D form load as well.
    """

    supports_groups = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, num_experts: int = 4,
                 temperature: float = 30.0, hidden_ratio: float = 0.25, path: str = 'auto', deploy: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f'DYConv2d: num_experts must be an integer >= 1, got {num_experts!r}')
        _check_choice('DYConv2d', 'path', path, PATHS)
        f = dict(device=device, dtype=dtype)
        self.num_experts = num_experts
        self.path = path
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels * (in_channels // groups) * kh * kw, **f))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **f)) if bias else None
        self.attention = Attention(in_channels, num_experts, hidden_ratio, 'softmax', temperature, **f)
        self.deploy = bool(deploy)
        self.reset_parameters()

    @property
    def experts(self) -> Tensor:
        """The K kernels as a (K, q, p/g, kh, kw) view of :attr:`weight`."""
        return self.weight.view((self.num_experts, self.out_channels, self.in_channels // self.groups)
                                + self.kernel_size)

    def reset_parameters(self) -> None:
        experts = self.experts
        for k in range(self.num_experts):
            kaiming_conv_init_(experts[k])
        if self.bias is not None:
            conv_bias_init_(self.bias, experts[0, 0].numel())
        self.attention.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'weight'
        w = state_dict.get(key)
        if isinstance(w, Tensor) and w.dim() == 5 and tuple(w.shape) == tuple(self.experts.shape):
            state_dict[key] = w.reshape(self.num_experts, -1)  # the (K, q, p/g, kh, kw) form
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = 'preserve', output_stats=None, **kwargs) -> 'DYConv2d':
        """Build the layer in place of ``conv`` (same geometry, device, dtype and mode).

        ``init='fresh'``: the K experts (and biases) drawn independently, as DYConv is built (the paper's baseline).
        ``init='preserve'``: ``W_k = W + δ_k`` (and ``b_k = b + ε_k``) where δ_k are the fresh draws minus their
        mean (Σ_k δ_k = 0), and the attention's last layer starts at zero, so π(x) = 1/K and the layer computes
        ``W ⊛ x + b``, the conv's function: the initial deviation is float rounding only (measured ≤ 1e-6
        relative in tests/test_init.py).  The experts differ by δ_k, whose spread is that of fresh experts, so the
        attention's gradient is non-zero from the first step and the experts separate as π(x) moves away from
        uniform.  ``output_stats`` is unused (DYConv has no BN).
        """
        check_init(init)
        layer = cls(**cls._ctor_kwargs_from_conv(conv), **kwargs)
        layer.train(conv.training)
        if init == 'preserve':
            with torch.no_grad():
                w = layer.weight
                w.sub_(w.mean(0, keepdim=True)).add_(conv.weight.detach().reshape(1, -1).to(w))
                if conv.bias is not None:
                    b = layer.bias
                    b.sub_(b.mean(0, keepdim=True)).add_(conv.bias.detach().unsqueeze(0).to(b))
                nn.init.zeros_(layer.attention.fc2.weight)
                nn.init.zeros_(layer.attention.fc2.bias)
        return layer

    def set_temperature(self, t: float) -> None:
        """Set the softmax temperature T (annealed from 30 towards 1 in DYConv's recipe)."""
        self.attention.assign_temperature(t)

    def dynamic_coefficients(self, x: Tensor) -> Tensor:
        """π(x), (B, K)."""
        return self.attention(x)

    def get_equivalent_kernel_bias(self, x: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-sample aggregated kernels (B, q, p/g, k, k) and biases (B, q) for input ``x``."""
        if x is None:
            raise ValueError('DYConv2d.get_equivalent_kernel_bias needs the input x: the kernel Σ π_k(x) W_k '
                             'depends on it')
        return fusion.dyconv_kernel_bias(self.experts, self.bias, self.dynamic_coefficients(x))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: the factorized path, no shape or layout read
            return self._factorized(x, self.dynamic_coefficients(x), symbolic=True)
        pi = self.dynamic_coefficients(x)
        # while tracing for export, a k×k per-sample conv (groups=B) would bake the batch into the graph
        if self.path == 'factorized' or (not self.per_sample_conv_is_batch_agnostic() and tracing_for_export()):
            return self._factorized(x, pi)
        weight, bias = fusion.dyconv_kernel_bias(self.experts, self.bias, pi)
        return self.per_sample_conv(x, weight, bias)

    def _factorized(self, x: Tensor, pi: Tensor, symbolic: bool = False) -> Tensor:
        """The K kernels as one conv (per group of experts with groups > 1), their outputs mixed by π(x)."""
        k, q = self.num_experts, self.out_channels
        bias = None if self.bias is None else self.bias.reshape(-1)
        experts = self.experts
        y = self._conv(x, self.weight.reshape((k * q, self.in_channels // self.groups) + self.kernel_size), bias,
                       self.groups) if self.groups == 1 else torch.cat(
            [self._conv(x, experts[i], None if self.bias is None else self.bias[i], self.groups)
             for i in range(k)], 1)
        if not symbolic and is_channels_last(y):  # mix the (B, H'·W', K, q) rows: the output stays channels-last
            b, _, oh, ow = y.shape
            rows = y.permute(0, 2, 3, 1).reshape(b, oh * ow, k, q)
            return torch.einsum('bk,bnkq->bnq', pi, rows).view(b, oh, ow, q).permute(0, 3, 1, 2)
        return torch.einsum('bk,bkqhw->bqhw', pi, y.unflatten(1, (k, q)))

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in place of this layer: its TorchScript twin (same parameters)."""
        from . import _script
        return _script.ScriptedDYConv(self)

    def switch_to_deploy(self) -> None:
        """DYConv has no training-only branches: marks the layer deployed, changes nothing else."""
        self.deploy = True

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'
