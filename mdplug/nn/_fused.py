"""The training-time tail of the expanding form as one autograd function that saves one tensor.

After the shared conv ``z = [W0; W1] ⊛ x`` (q + m channels) the expanding form computes (paper, Eq. 3 / 8)::

    y = BN2(W2 · (a ⊙ BN1(z)[q:])) + BN1(z)[:q]          (a: MDConv's A(x), (B, m); MAConv: a = 1)

Autograd would keep z, BN1(z), a ⊙ BN1(z)[q:] and W2·(…) alive until backward (about 3q + 3m channels per layer
beyond what a static conv keeps).  This function keeps only z and the batch statistics and recomputes the cheap
rest in backward (an elementwise BN, a product and a 1×1 conv with m input channels), so the layer holds about
q + m extra channels; the BN running statistics are updated exactly once, as ``nn.BatchNorm2d`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _bn_factor(bn: nn.BatchNorm2d) -> float:
    """The running-average factor ``nn.BatchNorm2d.forward`` uses, counting this batch (train mode)."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def can_fuse(bn: nn.Module) -> bool:
    """Plain affine BatchNorm2d with running statistics (the layers' own BNs, unless someone replaced them)."""
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.running_mean is not None


class _ExpandingTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, coeff: Optional[Tensor], w2: Tensor, g1: Tensor, b1: Tensor, g2: Tensor,
                b2: Tensor, q: int, bn1: tuple, bn2: tuple) -> Tensor:
        rm1, rv1, f1, eps1 = bn1
        rm2, rv2, f2, eps2 = bn2
        zn, mean1, invstd1 = torch.native_batch_norm(z, g1, b1, rm1, rv1, True, f1, eps1)
        z0n, h = zn.split([q, zn.shape[1] - q], 1)
        g = h * coeff[:, :, None, None] if coeff is not None else h
        u = F.conv2d(g, w2)
        y, mean2, invstd2 = torch.native_batch_norm(u, g2, b2, rm2, rv2, True, f2, eps2)
        y.add_(z0n)
        ctx.save_for_backward(z, coeff, w2, g1, b1, g2, mean1, invstd1, mean2, invstd2)
        ctx.q, ctx.eps1, ctx.eps2 = q, eps1, eps2
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        z, coeff, w2, g1, b1, g2, mean1, invstd1, mean2, invstd2 = ctx.saved_tensors
        q = ctx.q
        # recompute g = coeff ⊙ BN1(z)[q:] from z in one op: BN1 is a per-channel affine (scale, shift) there
        z1 = z[:, q:]
        scale = (invstd1 * g1)[q:]
        shift = b1[q:] - mean1[q:] * scale
        if coeff is not None:
            g = torch.addcmul((coeff * shift)[:, :, None, None], z1, (coeff * scale)[:, :, None, None])
        else:
            g = torch.addcmul(shift[None, :, None, None], z1, scale[None, :, None, None])
        u = F.conv2d(g, w2)
        du, dg2, db2 = torch.ops.aten.native_batch_norm_backward(
            dy, u, g2, None, None, mean2, invstd2, True, ctx.eps2, [True, True, True])
        del u
        dg, dw2, _ = torch.ops.aten.convolution_backward(
            du, g, w2, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        del du, g
        dcoeff = None
        if coeff is not None:
            if ctx.needs_input_grad[1]:  # d/da of a ⊙ (scale·z1 + shift), summed over H, W
                dcoeff = scale * (dg * z1).sum((2, 3)) + shift * dg.sum((2, 3))
            dg = dg * coeff[:, :, None, None]
        dzn = torch.cat([dy, dg], 1)
        dz, dg1, db1 = torch.ops.aten.native_batch_norm_backward(
            dzn, z, g1, None, None, mean1, invstd1, True, ctx.eps1, [True, True, True])
        return dz, dcoeff, dw2, dg1, db1, dg2, db2, None, None, None


def expanding_tail(z: Tensor, coeff: Optional[Tensor], project: nn.Conv2d, bn1: nn.BatchNorm2d,
                   bn2: nn.BatchNorm2d, q: int) -> Tensor:
    """``BN2(W2 · (coeff ⊙ BN1(z)[q:])) + BN1(z)[:q]`` in train mode, saving only z for backward.

    ``z``: (B, q + m, H, W); ``coeff``: (B, m) or None (identity); returns (B, q, H, W).
    """
    s1 = (bn1.running_mean, bn1.running_var, _bn_factor(bn1), bn1.eps)
    s2 = (bn2.running_mean, bn2.running_var, _bn_factor(bn2), bn2.eps)
    return _ExpandingTail.apply(z, coeff, project.weight, bn1.weight, bn1.bias, bn2.weight, bn2.bias, q, s1, s2)
