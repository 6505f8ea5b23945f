"""MAConv: the multi-layer asymmetric convolution (paper, section 3, Eq. 8–11).

Not to be confused with MANet's "MAConv" (a mutual-affine convolution for super-resolution): this is Luo & Zhan's
layer, a static k×k conv expanded into a k×k → 1×1 branch beside a k×k bypass, each followed by BN during
training, and fused back into one static ``nn.Conv2d`` after training.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fusion
from ._common import _check_choice, conv_bias_init_, kaiming_conv_init_
from ._multilayer import MultiLayerConv

ACTS = (None, 'relu')


class MAConv2d(MultiLayerConv):
    """Multi-layer asymmetric convolution, a drop-in for ``nn.Conv2d`` (Eq. 8).

    Training (expanding) form: ``y = BN2(W2 · BN1(W1 ⊛ x)) + BN0(W0 ⊛ x)`` with W1 m×p×k×k and W2 q×m×1×1.
    After training, Eq. 10–11 give one static kernel and bias: :meth:`fuse` returns a plain ``nn.Conv2d``, so the
    deployed network has the parameters and MACs of the static one.

    Args (beyond ``nn.Conv2d``'s):
        m: intermediate channels of the multi-layer branch (paper: 20; Table 11 varies it).
        bypass: keep the static W0 branch (Table 8 "w/o" turns it off).
        norm: ``'branch'`` BN after each conv (the paper's form); ``'sum'`` one BN after the two branches are
            added (Table 9 "expanding w/o BN"); ``'none'`` no BN at all (Table 9 "compact training").  The
            ``bias`` flag only matters for ``'none'``: otherwise the BNs supply the bias.
        act: ``'relu'`` puts a ReLU between W1 and W2 (Table 8 "ReLU" row); such a layer cannot be fused.
        deploy: build the compact (fused) form directly, e.g. to load a compact checkpoint.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, m: int = 20,
                 bypass: bool = True, norm: str = 'branch', act: Optional[str] = None, deploy: bool = False,
                 device=None, dtype=None) -> None:
        _check_choice(type(self).__name__, 'act', act, ACTS)
        if act is not None and deploy:
            raise ValueError(f"MAConv2d: act={act!r} puts a nonlinearity between W1 and W2, so the layer has no "
                             f"compact form; deploy=True is not possible")
        self.act = act
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, m=m, bypass=bypass, norm=norm, path='auto', deploy=deploy, device=device,
                         dtype=dtype)

    def _build_compact(self) -> None:
        p, q, f = self.in_channels, self.out_channels, self._factory
        self.weight = nn.Parameter(torch.empty(q, p, *self.kernel_size, **f))
        self.bias = nn.Parameter(torch.zeros(q, **f)) if self._compact_has_bias() else None
        self.deploy = True
        self._reset_compact()

    def _reset_compact(self) -> None:
        kaiming_conv_init_(self.weight)
        if self.bias is not None:
            conv_bias_init_(self.bias, self.in_channels * self.kernel_size[0] * self.kernel_size[1])

    def _check_fusable(self) -> None:
        if self.act is not None:
            raise ValueError(f"MAConv2d(act={self.act!r}) cannot be fused: the nonlinearity between W1 and W2 "
                             f"breaks Eq. 10 (paper, Table 8 'ReLU' row); keep the expanding form for inference")

    def get_equivalent_kernel_bias(self, x: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Eq. 10–11: the static kernel (q×p×k×k) and bias (q,) equal to this layer in eval mode.

        ``x`` is accepted for a uniform interface with the dynamic layers and ignored.
        """
        if self.deploy:
            return self.weight.detach(), None if self.bias is None else self.bias.detach()
        self._check_fusable()
        fb = self.folded_branches()
        return fusion.maconv_kernel_bias(fb['w0'], fb['b0'], fb['w1'], fb['b1'], fb['w2'], fb['b2'])

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the branches by the fused static kernel and bias (Eq. 10–11), in place; idempotent."""
        if self.deploy:
            return
        weight, bias = self.get_equivalent_kernel_bias()
        training = self.training
        self._rebuild_compact()
        self.weight.copy_(weight)
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
        self.train(training)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The compact form: a plain ``nn.Conv2d`` with the fused kernel and bias (zero extra inference cost)."""
        weight, bias = self.get_equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    @property
    def fused_mix(self) -> Optional[str]:
        return 'identity' if self.act is None else None

    def _mix(self, h: Tensor, x: Tensor) -> Tensor:
        return F.relu(h) if self.act == 'relu' else h

    def forward_compact(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    _compact_symbolic = forward_compact

    def _scriptable_compact(self) -> nn.Module:
        from . import _script
        return _script.shared_conv(self)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', act={self.act!r}' if self.act else '')
