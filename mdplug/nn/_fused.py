"""Training-time execution of the expanding form as autograd functions that save little and pass over memory few
times.  Two of them, both the same function and gradients as plain autograd (tests/test_speed_paths.py):

* :func:`pointwise_expanding` -- a whole 1×1 layer, batched matmuls on (B, C, H·W) views, BN2 never materialised
  (its batch statistics come from the m×m covariance of its input); the fastest form on CPU.
* :func:`expanding_tail` -- everything after the shared conv of a k×k layer.

The tail, in detail:

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


def _check_batch(shape) -> None:
    """The check ``F.batch_norm`` makes in train mode (these functions call the kernels directly)."""
    if shape[0] * (shape[2] if len(shape) == 3 else shape[2] * shape[3]) == 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {tuple(shape)}')


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
    _check_batch(z.shape)
    s1 = (bn1.running_mean, bn1.running_var, _bn_factor(bn1), bn1.eps)
    s2 = (bn2.running_mean, bn2.running_var, _bn_factor(bn2), bn2.eps)
    return _ExpandingTail.apply(z, coeff, project.weight, bn1.weight, bn1.bias, bn2.weight, bn2.bias, q, s1, s2)


# -- the whole 1×1 layer ------------------------------------------------------------------------------------------
class _PointwiseExpanding(torch.autograd.Function):
    """``y = BN1(W0·x) + BN2(W2·(a ⊙ BN1(W1·x)))`` on x of shape (B, p, N), train-mode BNs.

    BN2 is an affine map of ``u = W2·g`` (``g = a ⊙ BN1(W1·x)``, m channels) whose batch mean and variance follow
    from g's: ``mean(u) = W2·mean(g)``, ``var(u) = diag(W2·Cov(g)·W2ᵀ)``.  So u is never formed: BN2 folds into
    the rows of W2 and the output is one batched matmul-add on BN1's q channels.  The backward of BN2 is taken
    the same way, from the (q, m) matrix Σ dy·gᵀ (also W2's gradient) and Cov(g).  Saved: x, W0·x, W1·x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coeff: Optional[Tensor], w0: Tensor, w1: Tensor, w2: Tensor, g0: Tensor,
                b0: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, bn0: tuple, bn1: tuple,
                bn2: tuple) -> Tensor:
        batch = x.shape[0]
        n = batch * x.shape[2]
        (rm0, rv0, f0, eps0), (rm1, rv1, f1, eps1), (rm2, rv2, f2, eps2) = bn0, bn1, bn2
        z0 = torch.bmm(w0.expand(batch, -1, -1), x)
        z1 = torch.bmm(w1.expand(batch, -1, -1), x)
        y, mean0, invstd0 = torch.native_batch_norm(z0, g0, b0, rm0, rv0, True, f0, eps0)
        h, mean1, invstd1 = torch.native_batch_norm(z1, g1, b1, rm1, rv1, True, f1, eps1)
        g = h * coeff[:, :, None] if coeff is not None else h
        mean_g = g.sum((0, 2)) / n
        centred = g - mean_g[:, None]
        cov_g = torch.bmm(centred, centred.transpose(1, 2)).sum(0) / n          # (m, m), biased
        del centred
        mean2 = w2 @ mean_g
        var2 = ((w2 @ cov_g) * w2).sum(1)
        invstd2 = torch.rsqrt(var2 + eps2)
        scale2 = g2 * invstd2
        if rm2 is not None:  # what native_batch_norm does to its running statistics (unbiased variance)
            rm2.mul_(1 - f2).add_(mean2, alpha=f2)
            rv2.mul_(1 - f2).add_(var2 * (n / max(n - 1, 1)), alpha=f2)
        y.add_((b2 - mean2 * scale2)[:, None]).baddbmm_((w2 * scale2[:, None]).expand(batch, -1, -1), g)
        ctx.save_for_backward(x, coeff, w0, w1, w2, g0, g1, b1, g2, z0, z1, mean0, invstd0, mean1, invstd1,
                              mean_g, cov_g, mean2, invstd2)
        ctx.eps = (eps0, eps1)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (x, coeff, w0, w1, w2, g0, g1, b1, g2, z0, z1, mean0, invstd0, mean1, invstd1, mean_g, cov_g, mean2,
         invstd2) = ctx.saved_tensors
        eps0, eps1 = ctx.eps
        batch = x.shape[0]
        n = batch * x.shape[2]
        dy = dy.contiguous()
        dz0, dg0, db0 = torch.ops.aten.native_batch_norm_backward(
            dy, z0, g0, None, None, mean0, invstd0, True, eps0, [True, True, True])
        sum_dy = db0
        # recompute h = BN1(W1·x) and g = a ⊙ h (m channels)
        scale1 = g1 * invstd1
        h = torch.addcmul((b1 - mean1 * scale1)[:, None], z1, scale1[:, None])
        g = h * coeff[:, :, None] if coeff is not None else h
        # BN2 backward with u = W2·g not materialised; du = s2 ⊙ (dy - mean(dy) - û ⊙ k),  û = (u - mean2)·invstd2
        gram = torch.bmm(dy, g.transpose(1, 2)).sum(0)                          # Σ dy·gᵀ, (q, m)
        scale2 = g2 * invstd2
        dgamma2 = invstd2 * ((w2 * gram).sum(1) - mean2 * sum_dy)               # Σ dy ⊙ û
        k = dgamma2 / n
        mean_dy = sum_dy / n
        sum_g = mean_g * n
        second_g = cov_g * n + torch.outer(sum_g, mean_g)                       # Σ g·gᵀ
        dw2 = scale2[:, None] * (gram - torch.outer(mean_dy, sum_g)
                                 - (k * invstd2)[:, None] * (w2 @ second_g - torch.outer(mean2, sum_g)))
        # dg = W2ᵀ·du = P·dy + R·g + c
        kk = scale2 * k * invstd2
        p_mat = (w2 * scale2[:, None]).t()
        r_mat = -(w2.t() * kk) @ w2
        c_vec = w2.t() @ (kk * mean2 - scale2 * mean_dy)
        dg = torch.baddbmm(c_vec[None, :, None], r_mat.expand(batch, -1, -1), g)
        dg.baddbmm_(p_mat.expand(batch, -1, -1), dy)
        dcoeff = None
        if coeff is not None:
            if ctx.needs_input_grad[1]:
                dcoeff = (dg * h).sum(2)
            dg = dg * coeff[:, :, None]
        dz1, dg1, db1 = torch.ops.aten.native_batch_norm_backward(
            dg, z1, g1, None, None, mean1, invstd1, True, eps1, [True, True, True])
        dx = torch.bmm(w0.t().expand(batch, -1, -1), dz0).baddbmm_(w1.t().expand(batch, -1, -1), dz1)
        xt = x.transpose(1, 2)
        dw0 = torch.bmm(dz0, xt).sum(0)
        dw1 = torch.bmm(dz1, xt).sum(0)
        return dx, dcoeff, dw0, dw1, dw2, dg0, db0, dg1, db1, dgamma2, sum_dy, None, None, None


def pointwise_expanding(x: Tensor, coeff: Optional[Tensor], weight: Tensor, project: nn.Conv2d,
                        bn1: nn.BatchNorm2d, bn2: nn.BatchNorm2d, q: int, stride) -> Tensor:
    """The expanding form of a 1×1 layer in train mode: ``BN2(W2·(coeff ⊙ BN1(W1·x))) + BN1(W0·x)``.

    ``x``: (B, p, H, W); ``weight``: the shared (q + m, p, 1, 1) kernel [W0; W1]; ``coeff``: (B, m) or None.
    Returns (B, q, H', W').  Same output, gradients and running statistics as the modules, in fewer passes.
    """
    sh, sw = stride
    if sh > 1 or sw > 1:
        x = x[:, :, ::sh, ::sw]
    b, p, h, w = x.shape
    flat = x.reshape(b, p, h * w)
    _check_batch(flat.shape)
    w2d = weight.reshape(weight.shape[0], p)
    f1, f2 = _bn_factor(bn1), _bn_factor(bn2)

    def stats(lo, hi):
        rm, rv = bn1.running_mean, bn1.running_var
        return rm[lo:hi], rv[lo:hi], f1, bn1.eps

    y = _PointwiseExpanding.apply(
        flat, coeff, w2d[:q], w2d[q:], project.weight.reshape(q, -1), bn1.weight[:q], bn1.bias[:q],
        bn1.weight[q:], bn1.bias[q:], bn2.weight, bn2.bias, stats(0, q), stats(q, None),
        (bn2.running_mean, bn2.running_var, f2, bn2.eps))
    return y.view(b, q, h, w)
