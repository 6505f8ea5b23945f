"""MDConv: the multi-layer dynamic convolution (paper, section 2, Eq. 1–7).

Not to be confused with MixNet's "MDConv" (mixed depthwise convolution): this is Luo & Zhan's layer, which puts a
sigmoid channel attention A(x) between a k×k conv and a 1×1 conv, beside a static bypass conv.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fusion
from ._common import (Attention, _check_choice, calls_forward, is_channels_last, no_global_module_hooks,
                      tracing_for_export)
from ._multilayer import MultiLayerConv


def _sigmoid_scale(h: Tensor, z: Tensor) -> Tensor:
    """``h · sigmoid(z)``, the (B, m) logits z broadcast over the pixels of h (B, m, H, W), as one ``glu`` over
    ``[h; z]`` (z expanded to h's shape, in h's layout).  The same values as ``sigmoid`` then ``mul``; autograd
    records a cat, the glu and, backward, ``glu_backward`` and the sum over the pixels: four ops where sigmoid,
    mul and their backward (sigmoid_backward, two muls, a sum) are six, two GPU launches less per layer."""
    if is_channels_last(h):  # glu over the channels of the (B, H, W, m) view: the result stays channels-last
        b, m, hh, ww = h.shape
        rows = torch.cat([h.permute(0, 2, 3, 1), z[:, None, None, :].expand(b, hh, ww, m)], 3)
        return F.glu(rows, 3).permute(0, 3, 1, 2)
    return F.glu(torch.cat([h, z[:, :, None, None].expand_as(h)], 1), 1)


class MDConv2d(MultiLayerConv):
    """Multi-layer dynamic convolution, a drop-in for ``nn.Conv2d``.

    Expanding form (training, Eq. 3): ``y = BN2(W2 · A(x) · BN1(W1 ⊛ x)) + BN0(W0 ⊛ x)`` with
    ``A(x) = diag(gate(F(GAP(x))))`` (Eq. 1–2), F = Linear(p, h) → ReLU → Linear(h, m).  The diagonal matrix is
    never built: A scales the m intermediate channels by broadcasting.

    Compact form (inference, Eq. 5–7): one conv per sample with ``W(x) = W2'·A(x)·W1' + W0'`` and
    ``b(x) = W2'·A(x)·b1' + b'`` (exact, not approximate).  It runs as either

    * ``path='weight'``: generate the (B, q, p, k, k) kernels and run them in one batched call; or
    * ``path='factorized'``: W0' and W1' as one conv over the batch, then ``+ W2'·A(x)·(W1' ⊛ x)`` as one
      batched matmul-add (no kernel formed, no BN left); a 1×1 layer with more outputs than inputs instead runs
      ``[W0' | W2'] ⊛ [x; A(x)·(W1' ⊛ x + b1')] + b'``, one static conv over the stacked channels;

    ``path='auto'`` picks by multiply-accumulate count for the input's spatial size and batch
    (:meth:`~mdplug.nn._multilayer.MultiLayerConv.choose_path`).

    Args (beyond ``nn.Conv2d``'s):
        m: intermediate channels (paper: 20).
        hidden_ratio: hidden units of F per input channel (paper: 1/4; Table 12 varies it).
        gate: ``'sigmoid'`` (Eq. 2) or ``'softmax'`` (Table 13), applied to logits divided by ``temperature``.
        bypass, norm: as for :class:`~mdplug.nn.MAConv2d` (Tables 8 and 9).
        path: compact execution, ``'auto' | 'weight' | 'factorized'``.
        deploy: build the compact form directly.
    """

    gates = ('sigmoid', 'softmax')
    fused_mix = 'diag'

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, m: int = 20,
                 hidden_ratio: float = 0.25, gate: str = 'sigmoid', temperature: float = 1.0, bypass: bool = True,
                 norm: str = 'branch', path: str = 'auto', deploy: bool = False, device=None, dtype=None) -> None:
        _check_choice(type(self).__name__, 'gate', gate, self.gates)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, m=m, bypass=bypass, norm=norm, path=path, deploy=deploy, device=device,
                         dtype=dtype)
        self.attention = Attention(in_channels, self._attention_size(), hidden_ratio, gate, temperature,
                                   device=device, dtype=dtype)

    def _attention_size(self) -> int:
        return self.m

    def dynamic_coefficients(self, x: Tensor) -> Tensor:
        """The diagonal of A(x), (B, m) (Eq. 1–2)."""
        return self.attention(x)

    def _mix(self, h: Tensor, x: Tensor) -> Tensor:
        att = self.attention
        if (att.gate == 'sigmoid' and torch.is_grad_enabled() and type(self).dynamic_coefficients is
                MDConv2d.dynamic_coefficients and calls_forward(att, Attention) and no_global_module_hooks()
                and not tracing_for_export()):
            return _sigmoid_scale(h, att.logits(x, False))
        return self._apply_coefficients(h, self.dynamic_coefficients(x))

    def _mix_symbolic(self, h: Tensor, x: Tensor) -> Tensor:
        return self._apply_coefficients(h, self.dynamic_coefficients(x))

    def _apply_coefficients(self, h: Tensor, coeff: Tensor) -> Tensor:
        """``A(x)·h``: the (B, m) diagonal scales the m channels of h (B, m, H, W)."""
        return h * coeff[:, :, None, None]

    def _kernel_bias(self, fb: dict, coeff: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return fusion.mdconv_kernel_bias(fb['w0'], fb['b0'], fb['w1'], fb['b1'], fb['w2'], fb['b2'], coeff)

    def get_equivalent_kernel_bias(self, x: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Eq. 6–7 for input ``x``: per-sample kernels (B, q, p, k, k) and biases (B, q), eval-mode BN."""
        if x is None:
            raise ValueError(f'{type(self).__name__}.get_equivalent_kernel_bias needs the input x: the kernel '
                             f'W2\'·A(x)·W1\' + W0\' of Eq. 6 depends on it')
        return self._kernel_bias(self.folded_branches(), self.dynamic_coefficients(x))

    def forward_compact(self, x: Tensor) -> Tensor:
        tracing = tracing_for_export()
        if self._runs_one_sample(x, tracing):
            return self._one_sample_pointwise(x, self._one_sample_coefficients(x))
        coeff = self.dynamic_coefficients(x)
        path = self.compact_path(x, tracing)
        if path == 'weight':
            weight, bias = self._compact_kernel_bias(coeff)
            return self.per_sample_conv(x, weight, bias)
        if self._stacks_input():
            return self._stacked_factorized(x, coeff)
        return self._factorized(x, self._left(coeff))

    def _one_sample_coefficients(self, x: Tensor) -> Tensor:
        """The attention output for the batch-1 path (untraced): :meth:`Attention.coefficients` directly when
        calling the attention network would run exactly its forward (:func:`calls_forward`; saves the module
        call), else :meth:`dynamic_coefficients`."""
        att = self.attention
        if calls_forward(att, Attention) and no_global_module_hooks():
            return att.coefficients(x, False)
        return self.dynamic_coefficients(x)

    def _left(self, coeff: Tensor) -> Tensor:
        """``W2'·A(x)``, (B, q, m): A scales the columns of W2' by broadcasting."""
        return self.weight2.reshape(self.out_channels, self.m) * coeff.unsqueeze(1)

    def _left_one(self, w2: Tensor, coeff: Tensor) -> Tensor:
        return w2 * coeff  # (q, m) · (1, m): A scales the columns of W2'

    def _left_and_bias(self, coeff: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``W2'·A(x)`` (B, q, m) (A scales the columns of W2' by broadcasting) and the bias of Eq. 7,
        ``W2'·A(x)·b1' + b'`` (B, q) or None."""
        left = self._left(coeff)
        return left, self._left_bias(left)

    def _compact_kernel_bias(self, coeff: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Eq. 6–7 from the stored compact parameters with few ops."""
        return self._dynamic_kernel_bias(*self._left_and_bias(coeff))

    def _scriptable_compact(self):
        from ._script import ScriptedDynamicCompact
        return ScriptedDynamicCompact(self, full=False)

    def set_temperature(self, t: float) -> None:
        """Set the attention's softmax/sigmoid temperature (for annealing schedules)."""
        self.attention.assign_temperature(t)
