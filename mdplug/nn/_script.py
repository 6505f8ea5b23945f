"""TorchScript twins of the compact forms, returned by the layers' ``__prepare_scriptable__`` (which
``torch.jit.script`` calls), so the eager layers carry no TorchScript constraint.

Each twin holds the layer's own parameters, buffers and ``nn.Linear``/``nn.Conv2d`` modules (same tensors, same
state_dict keys) and computes the compact function on one batch-agnostic path: the factorized Eq. 6–7 for
MDConv/DCD, DYConv's K kernels as one conv mixed by π(x), SE's gated conv.  Eager-only fast paths (the batch-1
matmuls, the remembered path choice, channels-last row products) are not part of it.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EXPORT_HINT = ('TorchScript is deprecated in PyTorch; the supported export routes are torch.export.export and '
                'torch.onnx.export (README, "feature extraction / tracing / export")')


def not_scriptable(layer: nn.Module, why: str) -> RuntimeError:
    """The error ``torch.jit.script`` raises for a layer without a TorchScript twin."""
    return RuntimeError(f'torch.jit.script: {type(layer).__name__}({layer.extra_repr()}) {why}. {_EXPORT_HINT}.')


def _geometry(layer) -> Tuple[List[int], Union[str, List[int]], List[int]]:
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    return list(layer.stride), padding, list(layer.dilation)


def _keep_alive(twin: nn.Module, layer: nn.Module) -> None:
    """Hold a reference to the layer a twin replaces: ``torch.jit.script`` remembers prepared modules by ``id``,
    and the layer, once replaced in its parent, could be freed and its id given to a module made later (which the
    script would then take for the replaced layer).  Not an attribute TorchScript compiles."""
    twin.__dict__['_replaces'] = (layer,)


def _param(t: Optional[Tensor]) -> Optional[nn.Parameter]:
    return t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad)


class ScriptedAttention(nn.Module):
    """:class:`~mdplug.nn.Attention`: ``gate(F(GAP(x)) / T)``, (B, p, H, W) → (B, n)."""

    gate: str

    def __init__(self, attention) -> None:
        super().__init__()
        self.fc1, self.fc2 = attention.fc1, attention.fc2
        self.register_buffer('temperature', attention.temperature)
        self.gate = attention.gate
        self.train(attention.training)

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(torch.relu(self.fc1(x.mean((2, 3))))) / self.temperature
        if self.gate == 'sigmoid':
            return torch.sigmoid(z)
        if self.gate == 'softmax':
            return torch.softmax(z, dim=1)
        return z


class ScriptedDynamicCompact(nn.Module):
    """Compact MDConv / DCD (Eq. 6–7, factorized): ``W0'⊛x + b' + left·(W1'⊛x + b1')``, ``left = W2'·A(x)``
    (diagonal A, MDConv) or ``W2'·Φ(x)`` (DCD, ``full``), (B, q, m)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    bias1: Optional[Tensor]
    full: bool
    m: int
    q: int

    def __init__(self, layer, full: bool) -> None:
        super().__init__()
        for name in ('weight', 'bias', 'weight1', 'bias1', 'weight2'):
            self.register_parameter(name, _param(getattr(layer, name)))
        self.attention = ScriptedAttention(layer.attention)
        self.stride, self.padding, self.dilation = _geometry(layer)
        self.full, self.m, self.q = full, layer.m, layer.out_channels
        self.train(layer.training)
        _keep_alive(self, layer)

    def forward(self, x: Tensor) -> Tensor:
        coeff = self.attention(x)
        w2 = self.weight2.reshape(self.q, self.m)
        if self.full:
            left = torch.matmul(w2, coeff.reshape(-1, self.m, self.m))
        else:
            left = w2 * coeff.unsqueeze(1)
        h = F.conv2d(x, self.weight1, self.bias1, self.stride, self.padding, self.dilation)
        y = torch.einsum('bqm,bmhw->bqhw', left, h)
        w0 = self.weight
        b0 = self.bias
        if w0 is not None:
            return y + F.conv2d(x, w0, b0, self.stride, self.padding, self.dilation)
        if b0 is not None:
            return y + b0.view(1, -1, 1, 1)
        return y


class ScriptedDYConv(nn.Module):
    """:class:`~mdplug.nn.DYConv2d`: the K kernels as convs over the batch, their outputs mixed by π(x)."""

    bias: Optional[Tensor]
    k: int
    q: int
    groups: int

    def __init__(self, layer) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.attention = ScriptedAttention(layer.attention)
        self.stride, self.padding, self.dilation = _geometry(layer)
        self.k, self.q, self.groups = layer.num_experts, layer.out_channels, layer.groups
        self.shape = [layer.in_channels // layer.groups, layer.kernel_size[0], layer.kernel_size[1]]
        self.train(layer.training)
        _keep_alive(self, layer)

    def forward(self, x: Tensor) -> Tensor:
        pi = self.attention(x)
        experts = self.weight.reshape([self.k, self.q] + self.shape)
        b = self.bias
        if self.groups == 1:
            y = F.conv2d(x, experts.reshape([self.k * self.q] + self.shape), None if b is None else b.reshape(-1),
                         self.stride, self.padding, self.dilation, 1)
        else:
            outs: List[Tensor] = []
            for i in range(self.k):
                outs.append(F.conv2d(x, experts[i], None if b is None else b[i], self.stride, self.padding,
                                     self.dilation, self.groups))
            y = torch.cat(outs, 1)
        return torch.einsum('bk,bkqhw->bqhw', pi, y.unflatten(1, [self.k, self.q]))


class ScriptedSE(nn.Module):
    """:class:`~mdplug.nn.SEConv2d`: ``s(x) ⊙ (W ⊛ x + b)``."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.conv = layer.conv
        self.attention = ScriptedAttention(layer.attention)
        self.train(layer.training)
        _keep_alive(self, layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * self.attention(x)[:, :, None, None]


def shared_conv(layer) -> nn.Conv2d:
    """Compact MAConv as the ``nn.Conv2d`` it is, holding the layer's own weight and bias."""
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, bias=False, device='meta')
    conv.weight = layer.weight
    conv.bias = layer.bias
    _keep_alive(conv, layer)
    return conv.train(layer.training)
