"""DCD baseline (dynamic convolution decomposition, Li et al. 2021) in the paper's form: MDConv with a full matrix.

The paper compares MDConv with DCD by replacing the diagonal attention A(x) with a dense dynamic m×m matrix Φ(x)
(section 4.1, Table 3; m = 20), i.e. ``W(x) = W2'·Φ(x)·W1' + W0'``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import fusion
from ._common import GATES, channel_matmul
from .mdconv import MDConv2d


class DCDConv2d(MDConv2d):
    """DCD baseline, a drop-in for ``nn.Conv2d``: ``y = BN2(W2 · Φ(x) · BN1(W1 ⊛ x)) + BN0(W0 ⊛ x)``.

    Φ(x) is an m×m matrix from the attention network F (output m², no gate by default, as DCD's dynamic
    branch).  Its compact form is exact like MDConv's (Eq. 6–7 with A replaced by Φ), with the same two paths.
    Same keywords as :class:`~mdplug.nn.MDConv2d`; ``gate`` defaults to ``'none'``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, m: int = 20,
                 hidden_ratio: float = 0.25, gate: str = 'none', temperature: float = 1.0, bypass: bool = True,
                 norm: str = 'branch', path: str = 'auto', deploy: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, m=m, hidden_ratio=hidden_ratio, gate=gate, temperature=temperature,
                         bypass=bypass, norm=norm, path=path, deploy=deploy, device=device, dtype=dtype)

    gates = GATES
    fused_mix = None  # Φ(x) is a full matrix: plain autograd

    def _attention_size(self) -> int:
        return self.m * self.m

    def dynamic_coefficients(self, x: Tensor) -> Tensor:
        """Φ(x), (B, m, m)."""
        phi = self.attention(x)
        return phi.reshape(phi.shape[0], self.m, self.m)

    def _mix(self, h: Tensor, x: Tensor) -> Tensor:
        return self._apply_coefficients(h, self.dynamic_coefficients(x))

    def _apply_coefficients(self, h: Tensor, phi: Tensor) -> Tensor:
        """``Φ(x)·h`` for h (B, m, H, W), in h's layout."""
        return channel_matmul(phi, h)

    def _mix_symbolic(self, h: Tensor, x: Tensor) -> Tensor:
        """``Φ(x)·h`` on NCHW semantics (no layout read, for torch.fx)."""
        return torch.einsum('bnm,bmhw->bnhw', self.dynamic_coefficients(x), h)

    def _scriptable_compact(self):
        from ._script import ScriptedDynamicCompact
        return ScriptedDynamicCompact(self, full=True)

    def _left(self, phi: Tensor) -> Tensor:
        """``W2'·Φ(x)``, (B, q, m)."""
        return torch.matmul(self.weight2.reshape(self.out_channels, self.m), phi)

    def _left_one(self, w2: Tensor, phi: Tensor) -> Tensor:
        return torch.mm(w2, phi.view(self.m, self.m))

    def _left_and_bias(self, phi: Tensor):
        """``W2'·Φ(x)`` (B, q, m) and the bias ``W2'·Φ(x)·b1' + b'`` (B, q) or None."""
        left = self._left(phi)
        return left, self._left_bias(left)

    def _kernel_bias(self, fb: dict, phi: Tensor):
        return fusion.dcd_kernel_bias(fb['w0'], fb['b0'], fb['w1'], fb['b1'], fb['w2'], fb['b2'], phi)

    def _path_macs(self, out_pixels: int):
        """As MDConv's, plus the m×m mixing: q·m·(m + p·k²) per sample vs (m·p·k² + m² + q·m)·H'·W'."""
        p, q, m = self.in_channels, self.out_channels, self.m
        kk = self.kernel_size[0] * self.kernel_size[1]
        return q * m * (m + p * kk), (m * p * kk + m * m + q * m) * out_pixels
