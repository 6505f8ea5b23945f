"""Re-parameterisation algebra of the paper, as pure tensor functions.

Every function here takes and returns plain tensors (``None`` stands for an absent bias), builds no module and
keeps the dtype of its inputs.  The layers in :mod:`mdplug.nn` only compose them.

Notation (paper, section 2): ``p`` input channels, ``q`` output channels, ``m`` intermediate channels, ``k``
kernel size, ``B`` batch.  ``W0`` is the static bypass kernel (q×p×k×k), ``W1`` the first kernel of the multi-layer
branch (m×p×k×k), ``W2`` the pointwise kernel that follows it (q×m×1×1).  After BN folding a kernel ``W/σ`` and its
bias ``-μ/σ`` (plus the BN's affine terms) are written ``W'`` and ``b'``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    'fold_bn', 'fold_bn_scale', 'compose_1x1', 'add_branches', 'maconv_kernel_bias', 'mdconv_kernel_bias',
    'dcd_kernel_bias', 'dyconv_kernel_bias', 'se_kernel_bias',
]

KernelBias = Tuple[Tensor, Optional[Tensor]]


def fold_bn(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
            gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv: ``W/σ`` and ``-μ/σ`` of Eq. 4.

    A thin wrapper over :func:`torch.nn.utils.fusion.fuse_conv_bn_weights` returning plain tensors.
    ``weight``: (q, p, kh, kw); ``bias``: (q,) or None; BN tensors: (q,).  Returns (q, p, kh, kw), (q,).
    """
    w, b = fuse_conv_bn_weights(weight, bias, running_mean, running_var, eps, gamma, beta)
    return w.detach(), b.detach()


def fold_bn_scale(weight: Tensor, bias: Optional[Tensor], running_var: Tensor, eps: float,
                  gamma: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Apply only the per-channel scale ``γ/σ`` of a BatchNorm to a conv (its shift is folded elsewhere).

    Used when one BN follows a sum of branches (``norm='sum'``): the shift ``β - γμ/σ`` must be added once, so
    it goes with one branch (:func:`fold_bn`) and the other branches get the scale alone.
    Shapes as in :func:`fold_bn`; ``bias`` None stays None.
    """
    zeros = torch.zeros_like(running_var)
    had_bias = bias is not None
    w, b = fuse_conv_bn_weights(weight, bias, zeros, running_var, eps, gamma, zeros)
    return w.detach(), (b.detach() if had_bias else None)


def compose_1x1(w_kxk: Tensor, b_kxk: Optional[Tensor], w_1x1: Tensor, b_1x1: Optional[Tensor]) -> KernelBias:
    """A 1×1 conv applied after a k×k conv is one k×k conv (the ``W2·W1`` product of Eq. 10–11).

    ``w_kxk``: (m, p, kh, kw), ``b_kxk``: (m,) or None; ``w_1x1``: (q, m, 1, 1), ``b_1x1``: (q,) or None.
    Returns (q, p, kh, kw) and (q,) (None only when both biases are None).  Exact for any stride, padding,
    dilation: the 1×1 conv acts on each output position alone, so the bias of the first conv passes forward.
    """
    w2 = w_1x1.reshape(w_1x1.shape[0], w_1x1.shape[1])
    weight = torch.einsum('qm,mpij->qpij', w2, w_kxk)
    bias = None
    if b_kxk is not None:
        bias = w2 @ b_kxk
    if b_1x1 is not None:
        bias = b_1x1 if bias is None else bias + b_1x1
    return weight, bias


def add_branches(*branches: KernelBias) -> KernelBias:
    """Parallel convs of one shape whose outputs are added are one conv with summed kernels and biases.

    Each branch is ``(weight, bias)`` with weights of one shape (also batched, B×q×p×k×k) and biases of the
    matching leading shape or None.  Branches that are ``None`` (an absent bypass) are skipped.
    """
    branches = [br for br in branches if br is not None]
    if not branches:
        raise ValueError('add_branches needs at least one branch')
    weight, bias = branches[0]
    for w, b in branches[1:]:
        weight = weight + w
        if b is not None:
            bias = b if bias is None else bias + b
    return weight, bias


def maconv_kernel_bias(w0: Optional[Tensor], b0: Optional[Tensor], w1: Tensor, b1: Optional[Tensor],
                       w2: Tensor, b2: Optional[Tensor]) -> KernelBias:
    """Paper Eq. 10–11: ``W = W2'·W1' + W0'`` and ``b = W2'·b1' + b2' + b0'`` (MAConv, static).

    Inputs are the BN-folded kernels and biases; ``w0``/``b0`` None when the bypass is off.
    Returns (q, p, k, k) and (q,) or None.
    """
    multi = compose_1x1(w1, b1, w2, b2)
    return add_branches(multi, (w0, b0) if w0 is not None else None)


def mdconv_kernel_bias(w0: Optional[Tensor], b0: Optional[Tensor], w1: Tensor, b1: Optional[Tensor],
                       w2: Tensor, b2: Optional[Tensor], attention: Tensor) -> KernelBias:
    """Paper Eq. 6–7: the per-sample kernel ``W(x) = W2'·A(x)·W1' + W0'`` and bias ``W2'·A(x)·b1' + b2' + b0'``.

    ``attention``: (B, m), the diagonal of A (Eq. 1); A is never built, it scales the rows of W1' by broadcasting.
    Returns (B, q, p, k, k) and (B, q) (or None when every bias is None).
    """
    w2m = w2.reshape(w2.shape[0], w2.shape[1])
    weight = torch.einsum('qm,bm,mpij->bqpij', w2m, attention, w1)
    bias = None
    if b1 is not None:
        bias = (attention * b1) @ w2m.t()
    return _add_static(weight, bias, w0, _sum_bias(b0, b2))


def dcd_kernel_bias(w0: Optional[Tensor], b0: Optional[Tensor], w1: Tensor, b1: Optional[Tensor],
                    w2: Tensor, b2: Optional[Tensor], phi: Tensor) -> KernelBias:
    """DCD baseline: Eq. 6–7 with the diagonal A replaced by a full dynamic matrix Φ(x).

    ``phi``: (B, m, m).  ``W(x) = W2'·Φ(x)·W1' + W0'``, ``b(x) = W2'·Φ(x)·b1' + b2' + b0'``.
    Returns (B, q, p, k, k) and (B, q) or None.
    """
    w2m = w2.reshape(w2.shape[0], w2.shape[1])
    left = torch.matmul(w2m, phi)                                   # (B, q, m)
    weight = torch.einsum('bqm,mpij->bqpij', left, w1)
    bias = None
    if b1 is not None:
        bias = torch.matmul(left, b1)
    return _add_static(weight, bias, w0, _sum_bias(b0, b2))


def dyconv_kernel_bias(weight: Tensor, bias: Optional[Tensor], pi: Tensor) -> KernelBias:
    """DYConv baseline: ``W(x) = Σ_k π_k(x) W_k`` and ``b(x) = Σ_k π_k(x) b_k``.

    ``weight``: (K, q, p/g, kh, kw); ``bias``: (K, q) or None; ``pi``: (B, K).  Returns (B, q, p/g, kh, kw), (B, q).
    """
    k = weight.shape[0]
    w = (pi @ weight.reshape(k, -1)).reshape((pi.shape[0],) + tuple(weight.shape[1:]))
    return w, (pi @ bias if bias is not None else None)


def se_kernel_bias(weight: Tensor, bias: Optional[Tensor], scale: Tensor) -> KernelBias:
    """SE baseline as a dynamic conv: output channel scaling ``s(x)`` moved onto the kernel and bias.

    ``weight``: (q, p/g, kh, kw); ``bias``: (q,) or None; ``scale``: (B, q).  Returns (B, q, p/g, kh, kw), (B, q).
    """
    w = scale[:, :, None, None, None] * weight
    return w, (scale * bias if bias is not None else None)


def _sum_bias(*biases: Optional[Tensor]) -> Optional[Tensor]:
    present = [b for b in biases if b is not None]
    if not present:
        return None
    out = present[0]
    for b in present[1:]:
        out = out + b
    return out


def _add_static(weight: Tensor, bias: Optional[Tensor], w0: Optional[Tensor],
                b0: Optional[Tensor]) -> KernelBias:
    """Add a static (q, p, k, k) kernel and (q,) bias to a batched dynamic one."""
    if w0 is not None:
        weight = weight + w0
    if b0 is not None:
        bias = b0.expand(weight.shape[0], -1) if bias is None else bias + b0
    return weight, bias
