"""Reference layers from other projects' style, for tools/benchmark.py only (not part of mdplug).

* :class:`PeerDYConv2d` -- a DYConv executed **the way its public implementations do**: the K expert kernels
  are aggregated per sample and the batch is folded into the channels, so one grouped conv with
  ``groups = B * groups`` runs every sample with its own kernel (for 1×1 kernels too).  Written here from the
  DYConv paper's description as a speed baseline; it is *not* mdplug's :class:`~mdplug.nn.DYConv2d`.
* :class:`TimmCondConv` -- timm's ``CondConv2d`` layer with the CondConv paper's routing function
  (GAP → Linear(p, K) → sigmoid) in front, so it can stand in for an ``nn.Conv2d``.
* :class:`AttentionFloor` -- not a layer anyone would use: the static conv plus MDConv's attention network run on
  its input, whose coefficients are dropped.  Any MDConv execution computes at least this, so its time is the
  floor under MDConv's; DYConv computes the same attention before aggregating its experts.

:func:`swap_convs` puts any of them into the convs that :func:`mdplug.convert.plan` selects, so every variant of a
benchmark changes the same convs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdplug.nn._common import Attention

__all__ = ['AttentionFloor', 'PeerDYConv2d', 'TimmCondConv', 'swap_convs']


class PeerDYConv2d(nn.Module):
    """Peer-style DYConv (K experts, softmax attention with temperature): per-sample kernels, grouped conv B·g.

    Input (B, p, H, W) → output (B, q, H', W').  The batch size is baked into the conv's ``groups``, which is why
    such layers do not export with a dynamic batch axis.
    """

    def __init__(self, conv: nn.Conv2d, num_experts: int = 4, temperature: float = 30.0,
                 hidden_ratio: float = 0.25) -> None:
        super().__init__()
        self.conv = conv  # geometry only; its weight seeds the experts
        p, q, g = conv.in_channels, conv.out_channels, conv.groups
        hidden = max(1, int(round(p * hidden_ratio)))
        self.fc1 = nn.Linear(p, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)
        self.temperature = temperature
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(0).repeat(num_experts, 1, 1, 1, 1).clone())
        with torch.no_grad():
            self.weight.add_(torch.randn_like(self.weight) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_experts, q)) if conv.bias is not None else None
        self.num_experts, self.out_channels, self.groups = num_experts, q, g

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pi = torch.softmax(self.fc2(F.relu(self.fc1(x.mean((2, 3))))) / self.temperature, dim=1)
        weight = (pi @ self.weight.view(self.num_experts, -1)).view((b * self.out_channels,)
                                                                      + tuple(self.weight.shape[2:]))
        bias = None if self.bias is None else (pi @ self.bias).view(-1)
        c_ = self.conv
        y = F.conv2d(x.reshape(1, b * c, h, w), weight, bias, c_.stride, c_.padding, c_.dilation, self.groups * b)
        return y.view(b, self.out_channels, y.shape[-2], y.shape[-1])


class TimmCondConv(nn.Module):
    """timm's ``CondConv2d`` behind CondConv's routing function r(x) = sigmoid(Linear(GAP(x))), K experts."""

    def __init__(self, conv: nn.Conv2d, num_experts: int = 4) -> None:
        super().__init__()
        from timm.layers import CondConv2d
        pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.cond = CondConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               pad[0] if isinstance(pad, tuple) else pad, conv.dilation, conv.groups,
                               conv.bias is not None, num_experts)
        with torch.no_grad():
            self.cond.weight.copy_(conv.weight.detach().reshape(1, -1).expand_as(self.cond.weight))
        self.routing = nn.Linear(conv.in_channels, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.cond(x, torch.sigmoid(self.routing(x.mean((2, 3)))))


class AttentionFloor(nn.Module):
    """The static ``conv`` and, on its input, MDConv's attention network with MDConv's default sizes (GAP →
    Linear(p, p/4) → ReLU → Linear(p/4, m) → sigmoid, m = 20); returns the conv's output, the coefficients are
    dropped.  What every MDConv execution computes at least: a lower bound of its time in eager mode (a compiler
    would remove the unused attention, so it means nothing under ``torch.compile``)."""

    def __init__(self, conv: nn.Conv2d, m: int = 20, hidden_ratio: float = 0.25) -> None:
        super().__init__()
        self.conv = conv
        self.attention = Attention(conv.in_channels, m, hidden_ratio, device=conv.weight.device,
                                   dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.attention(x)
        return self.conv(x)


def swap_convs(model: nn.Module, names: Iterable[str], make) -> nn.Module:
    """Replace each named conv by ``make(conv)`` through its parent (in place); returns ``model``."""
    for name in names:
        parent_name, _, attr = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(getattr(parent, attr)))
    return model

