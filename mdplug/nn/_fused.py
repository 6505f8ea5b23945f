"""Training-time execution of the expanding form (paper, Eq. 3 / 8) as autograd functions that save little and
pass over memory few times.  Both compute the modules' function, gradients and BN running statistics
(tests/test_speed_paths.py, float64 to rounding)::

    y = BN2(W2 · g) + BN1(W0 ⊛ x),   g = a ⊙ BN1(W1 ⊛ x)     (a: MDConv's A(x), (B, m); MAConv: a = 1)

BN2 is an affine map of ``u = W2·g`` whose batch mean and variance follow from the m channels of g:
``mean(u) = W2·mean(g)`` and ``var(u) = diag(W2·Cov(g)·W2ᵀ)``.  So u (q channels) is never formed: BN2 folds
into the rows of W2, and the output is one batched matmul-add onto BN1's q channels.  Its backward is taken the
same way, from the (q, m) matrix Σ dy·gᵀ (which is also W2's gradient) and Cov(g).  Plain autograd keeps
BN1(z), g, u and BN2(u) for backward and passes over the q output channels about five more times.

Both work in the input's layout, NCHW or channels-last, and keep it (output and input gradient): the channel
algebra runs as batched matmuls on (B, C, H·W) views of NCHW tensors and as one matmul over the (B·H·W, C) rows
of channels-last ones; convs and BatchNorm kernels take either layout.

* :func:`pointwise_expanding` -- a whole 1×1 layer.  With at least twice as many outputs
  as inputs (q ≥ 2p, e.g. inverted-residual expansions) BN0 folds too, from the p×p covariance of x: the output
  is one conv over [x; g] with the two folded kernels side by side, and nothing of q channels is formed besides
  y and dy (saves [x; g] and W1·x).
  Otherwise W0·x and W1·x run as two 1×1 convs (on CPU cheaper than slicing one product of q + m channels),
  their backward as one conv backward, the rest as batched matmuls with m = 20 on one side (saves x, W0·x and
  W1·x).
* :func:`expanding_tail` -- everything after the shared conv ``z = [W0; W1] ⊛ x`` of a k×k layer; saves z.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import channel_matmul, channel_rows, is_channels_last


def _bn_factor(bn: nn.BatchNorm2d) -> float:
    """The running-average factor ``nn.BatchNorm2d.forward`` uses, counting this batch (train mode)."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _check_batch(shape) -> None:
    """The check ``F.batch_norm`` makes in train mode (these functions call the kernels directly), for a
    (B, C, H, W) tensor."""
    if shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {tuple(shape)}')


# -- channel algebra on (B, C, H, W) tensors of either layout -----------------------------------------------------
# NCHW: on (B, C, H·W) views, batched matmuls; channels-last: on the (B·H·W, C) rows, one matmul for the whole
# batch.  Either way nothing is copied to change layout, and results keep the layout.
def _gram(a: Tensor, b: Tensor) -> Tensor:
    """``Σ over samples and pixels of a·bᵀ``, (Ca, Cb), for a (B, Ca, H, W) and b (B, Cb, H, W) of one layout."""
    if is_channels_last(a):
        return channel_rows(a).t() @ channel_rows(b)
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)).sum(0)


def _mix_shared_(y: Tensor, mat: Tensor, t: Tensor) -> Tensor:
    """``y += mat·t`` at every pixel, in place on ``y``, which must be contiguous in t's layout (``view`` refuses
    anything else rather than writing into a copy)."""
    b, c, h, w = y.shape
    if is_channels_last(t):
        y.permute(0, 2, 3, 1).view(b * h * w, c).addmm_(channel_rows(t), mat.t())
    else:
        y.view(b, c, h * w).baddbmm_(mat.expand(b, -1, -1), t.flatten(2))
    return y


def _layout(t: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def can_fuse(bn: nn.Module) -> bool:
    """Plain affine BatchNorm2d with running statistics, in train mode (the layers' own BNs, unless someone
    replaced them).  A BN put in eval mode on its own (mmpretrain's ``norm_eval``, ``bn.eval()``) normalises by its
    running statistics and leaves them as they are: the plain path, which calls the BN, does exactly that."""
    return (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            and bn.running_mean is not None)


#: dtypes the fused functions run in (their m×m statistics want at least float32; others use plain autograd)
DTYPES = (torch.float32, torch.float64)
#: devices where a layer's default training forward (``fuse_training_tail=None``) takes these functions: where
#: they were measured faster than plain autograd (docs/benchmarks.md).  Not CUDA: they dispatch about 4× the ops
#: of plain autograd (launch-bound on a GPU up to large batches) and no GPU has measured them yet
DEVICES = ('cpu',)


def _folded_bn_forward(g: Tensor, w2: Tensor, gamma2: Tensor, beta2: Tensor, bn2: tuple):
    """Batch statistics of ``u = W·g`` from g (B, c, H, W) and the train-mode BN of u folded into W (BN2 with g,
    W2; BN0 with x, W0).

    Returns ``(w_scaled, shift, saved)``: ``BN(u) = w_scaled·g + shift``; ``saved`` is what
    :func:`_folded_bn_terms` needs.  Updates the running statistics as ``native_batch_norm`` would (unbiased
    variance)."""
    rm, rv, factor, eps = bn2
    n = g.shape[0] * g.shape[2] * g.shape[3]
    mean_g = g.sum((0, 2, 3)) / n
    centred = g - mean_g[:, None, None]
    cov_g = _gram(centred, centred) / n                                            # (m, m), biased
    del centred
    mean2 = w2 @ mean_g
    var2 = ((w2 @ cov_g) * w2).sum(1)
    invstd2 = torch.rsqrt(var2 + eps)
    scale2 = gamma2 * invstd2
    if rm is not None:
        rm.mul_(1 - factor).add_(mean2, alpha=factor)
        rv.mul_(1 - factor).add_(var2 * (n / max(n - 1, 1)), alpha=factor)
    return w2 * scale2[:, None], beta2 - mean2 * scale2, (mean_g, cov_g, mean2, invstd2)


def _folded_bn_terms(gram: Tensor, w2: Tensor, gamma2: Tensor, sum_dy: Tensor, n: int, saved):
    """The small matrices of a folded BN's backward (:func:`_folded_bn_forward`; written for BN2) from
    ``gram = Σ dy·gᵀ`` (q, m).

    With ``û = (u - mean2)·invstd2`` and ``k = mean(dy ⊙ û)``, BN's backward is
    ``du = s2 ⊙ (dy - mean(dy) - û ⊙ k)``; then ``dg = W2ᵀ·du = (s2 ⊙ W2)ᵀ·dy + R·g + c`` and
    ``dW2 = du·gᵀ`` follows from Σ dy·gᵀ and Σ g·gᵀ.  Returns ``(dW2, dγ2, R, c)``; ``R`` (m, m) and ``c`` (m)
    complete dg."""
    mean_g, cov_g, mean2, invstd2 = saved
    scale2 = gamma2 * invstd2
    dgamma2 = invstd2 * ((w2 * gram).sum(1) - mean2 * sum_dy)                   # Σ dy ⊙ û
    k = dgamma2 / n
    mean_dy = sum_dy / n
    sum_g = mean_g * n
    second_g = cov_g * n + torch.outer(sum_g, mean_g)                           # Σ g·gᵀ
    dw2 = scale2[:, None] * (gram - torch.outer(mean_dy, sum_g)
                             - (k * invstd2)[:, None] * (w2 @ second_g - torch.outer(mean2, sum_g)))
    kk = scale2 * k * invstd2
    r_mat = -(w2.t() * kk) @ w2
    c_vec = w2.t() @ (kk * mean2 - scale2 * mean_dy)
    return dw2, dgamma2, r_mat, c_vec


def _bn2_backward(dy: Tensor, g: Tensor, w2: Tensor, gamma2: Tensor, sum_dy: Tensor, saved):
    """Gradients of ``BN2(W2·g)`` (train mode) for output gradient dy (B, q, H, W), u never formed
    (:func:`_folded_bn_terms`).  Returns ``(dg, dW2, dγ2)``."""
    gram = _gram(dy, g)                                                             # Σ dy·gᵀ, (q, m)
    n = g.shape[0] * g.shape[2] * g.shape[3]
    dw2, dgamma2, r_mat, c_vec = _folded_bn_terms(gram, w2, gamma2, sum_dy, n, saved)
    invstd2 = saved[3]
    dg = channel_matmul(r_mat, g).add_(c_vec[:, None, None])
    return _mix_shared_(dg, (w2 * (gamma2 * invstd2)[:, None]).t(), dy), dw2, dgamma2


def _mix(h: Tensor, coeff: Optional[Tensor]) -> Tensor:
    """``g = coeff ⊙ h`` for h (B, m, H, W) and coeff (B, m) or None (identity)."""
    return h * coeff[:, :, None, None] if coeff is not None else h


def _mix_backward(dg: Tensor, h: Tensor, coeff: Optional[Tensor], need_dcoeff: bool):
    """Through ``g = coeff ⊙ h``: ``(dh, dcoeff)``."""
    if coeff is None:
        return dg, None
    dcoeff = (dg * h).sum((2, 3)) if need_dcoeff else None
    return dg * coeff[:, :, None, None], dcoeff


def _bn_affine(z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """Recompute train-mode BN's output from its input and saved statistics, (B, C, H, W)."""
    scale = gamma * invstd
    return torch.addcmul((beta - mean * scale)[:, None, None], z, scale[:, None, None])


class _ExpandingTail(torch.autograd.Function):
    """``BN2(W2·(a ⊙ BN1(z)[q:])) + BN1(z)[:q]`` for z (B, q + m, H, W), the shared conv's output."""

    @staticmethod
    def forward(ctx, z: Tensor, coeff: Optional[Tensor], w2: Tensor, g1: Tensor, b1: Tensor, g2: Tensor,
                b2: Tensor, q: int, bn1: tuple, bn2: tuple) -> Tensor:
        rm1, rv1, f1, eps1 = bn1
        fmt = _layout(z)
        batch, m, hh, ww = z.shape[0], z.shape[1] - q, z.shape[2], z.shape[3]
        zn, mean1, invstd1 = torch.native_batch_norm(z, g1, b1, rm1, rv1, True, f1, eps1)
        h = zn[:, q:]
        # [g; 1]: BN2's shift added by the matmul
        g = torch.empty((batch, m + 1, hh, ww), dtype=z.dtype, device=z.device, memory_format=fmt)
        if coeff is not None:
            torch.mul(h, coeff[:, :, None, None], out=g[:, :m])
        else:
            g[:, :m].copy_(h)
        g[:, m].fill_(1)
        w2s, shift, saved = _folded_bn_forward(g[:, :m], w2, g2, b2, bn2)
        y = channel_matmul(torch.cat([w2s, shift[:, None]], 1), g, add=zn[:, :q])
        ctx.save_for_backward(z, coeff, w2, g1, b1, g2, mean1, invstd1, *saved)
        ctx.q, ctx.eps1, ctx.fmt = q, eps1, fmt
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        z, coeff, w2, g1, b1, g2, mean1, invstd1, *saved = ctx.saved_tensors
        q = ctx.q
        dy = dy.contiguous(memory_format=ctx.fmt)
        h = _bn_affine(z[:, q:], g1[q:], b1[q:], mean1[q:], invstd1[q:])
        g = _mix(h, coeff)
        sum_dy = dy.sum((0, 2, 3))
        dg, dw2, dg2 = _bn2_backward(dy, g, w2, g2, sum_dy, saved)
        del g
        dh, dcoeff = _mix_backward(dg, h, coeff, ctx.needs_input_grad[1])
        del dg, h
        dz, dg1, db1 = torch.ops.aten.native_batch_norm_backward(
            torch.cat([dy, dh], 1), z, g1, None, None, mean1, invstd1, True, ctx.eps1, [True, True, True])
        return dz, dcoeff, dw2, dg1, db1, dg2, sum_dy, None, None, None


def expanding_tail(z: Tensor, coeff: Optional[Tensor], project: nn.Conv2d, bn1: nn.BatchNorm2d,
                   bn2: nn.BatchNorm2d, q: int) -> Tensor:
    """``BN2(W2 · (coeff ⊙ BN1(z)[q:])) + BN1(z)[:q]`` in train mode, saving only z for backward.

    ``z``: (B, q + m, H, W), NCHW or channels-last (the result and z's gradient keep its layout); ``coeff``:
    (B, m) or None (identity); returns (B, q, H, W).
    """
    z = z.contiguous(memory_format=_layout(z))
    _check_batch(z.shape)
    s1 = (bn1.running_mean, bn1.running_var, _bn_factor(bn1), bn1.eps)
    s2 = (bn2.running_mean, bn2.running_var, _bn_factor(bn2), bn2.eps)
    return _ExpandingTail.apply(z, coeff, project.weight.reshape(q, -1), bn1.weight, bn1.bias,
                                bn2.weight, bn2.bias, q, s1, s2)


# -- the whole 1×1 layer ------------------------------------------------------------------------------------------
def _conv1x1(x: Tensor, w: Tensor) -> Tensor:
    """``w·x`` for x (B, p, H, W) and w (q, p) as a 1×1 conv: the library's conv kernels (oneDNN on CPU, cuDNN)
    run this product over the whole batch faster than a batched matmul with a broadcast weight; the result keeps
    x's layout."""
    return torch.nn.functional.conv2d(x, w[:, :, None, None])


def _conv1x1_backward(dz: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool):
    """Gradients of :func:`_conv1x1` for its output gradient dz (B, q, H, W): ``(wᵀ·dz, Σ dz·xᵀ)``, each None
    when not needed."""
    if not (need_x or need_w):
        return None, None
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz, x, w[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_w, False])
    return (dx if need_x else None), (dw.flatten(1) if need_w else None)


class _PointwiseExpanding(torch.autograd.Function):
    """``BN1(W0·x) + BN2(W2·(a ⊙ BN1(W1·x)))`` on x (B, p, H, W); BN1 given as its q and m halves."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: Optional[Tensor], w0: Tensor, w1: Tensor, w2: Tensor, g0: Tensor,
                b0: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, bn0: tuple, bn1: tuple,
                bn2: tuple) -> Tensor:
        (rm0, rv0, f0, eps0), (rm1, rv1, f1, eps1) = bn0, bn1
        z0, z1 = _conv1x1(x, w0), _conv1x1(x, w1)
        y, mean0, invstd0 = torch.native_batch_norm(z0, g0, b0, rm0, rv0, True, f0, eps0)
        h, mean1, invstd1 = torch.native_batch_norm(z1, g1, b1, rm1, rv1, True, f1, eps1)
        g = _mix(h, coeff)
        w2s, shift, saved = _folded_bn_forward(g, w2, g2, b2, bn2)
        _mix_shared_(y.add_(shift[:, None, None]), w2s, g)
        ctx.save_for_backward(x, coeff, w0, w1, w2, g0, g1, b1, g2, z0, z1, mean0, invstd0, mean1, invstd1, *saved)
        ctx.eps, ctx.fmt = (eps0, eps1), _layout(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, coeff, w0, w1, w2, g0, g1, b1, g2, z0, z1, mean0, invstd0, mean1, invstd1, *saved = ctx.saved_tensors
        eps0, eps1 = ctx.eps
        dy = dy.contiguous(memory_format=ctx.fmt)
        dz0, dg0, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, z0, g0, None, None, mean0, invstd0, True, eps0, [True, True, True])
        h = _bn_affine(z1, g1, b1, mean1, invstd1)
        g = _mix(h, coeff)
        dg, dw2, dg2 = _bn2_backward(dy, g, w2, g2, sum_dy, saved)
        del g
        dh, dcoeff = _mix_backward(dg, h, coeff, ctx.needs_input_grad[1])
        del dg, h
        dz1, dg1, db1 = torch.ops.aten.native_batch_norm_backward(
            dh, z1, g1, None, None, mean1, invstd1, True, eps1, [True, True, True])
        need_x, need_w0, need_w1 = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        # skipped when not needed (a frozen layer, the network's input)
        dx, dw = _conv1x1_backward(torch.cat([dz0, dz1], 1), x, torch.cat([w0, w1]), need_x, need_w0 or need_w1)
        dw0, dw1 = (None, None) if dw is None else (dw[:w0.shape[0]] if need_w0 else None,
                                                     dw[w0.shape[0]:] if need_w1 else None)
        return dx, dcoeff, dw0, dw1, dw2, dg0, sum_dy, dg1, db1, dg2, sum_dy.clone(), None, None, None


class _PointwiseFolded(torch.autograd.Function):
    """``BN0(W0·x) + BN2(W2·(a ⊙ BN1(W1·x)))`` on x (B, p, H, W) for q ≥ 2p, with BN0 folded like BN2.

    BN0 normalises ``W0·x``; its batch mean and variance are ``W0·mean(x)`` and ``diag(W0·Cov(x)·W0ᵀ)`` from the
    p×p covariance of x, just as BN2's come from g.  With both folded, the output is one conv over the stacked
    channels, ``y = [s0 ⊙ W0 | s2 ⊙ W2] ⊛ [x; g] + c`` (written once), and its backward is that conv's backward
    (which also yields Σ dy·xᵀ and Σ dy·gᵀ) plus p×p and m×m corrections.  No tensor of q channels is formed
    besides y and dy.  Cov(x) and its backward counterpart cost p/q of the conv each, so it is used where
    q ≥ 2p (mobilenetv2_100's expansion layers, q = 6p: step 1.77× → 1.61× static).  BN1 (m channels) runs as is.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coeff: Optional[Tensor], w0: Tensor, w1: Tensor, w2: Tensor, g0: Tensor,
                b0: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, bn0: tuple, bn1: tuple,
                bn2: tuple) -> Tensor:
        rm1, rv1, f1, eps1 = bn1
        z1 = _conv1x1(x, w1)
        h, mean1, invstd1 = torch.native_batch_norm(z1, g1, b1, rm1, rv1, True, f1, eps1)
        g = _mix(h, coeff)
        del h
        w0s, shift0, saved0 = _folded_bn_forward(x, w0, g0, b0, bn0)
        w2s, shift2, saved2 = _folded_bn_forward(g, w2, g2, b2, bn2)
        stacked_x = torch.cat([x, g], 1)
        stacked_w = torch.cat([w0s, w2s], 1)
        y = torch.nn.functional.conv2d(stacked_x, stacked_w[:, :, None, None], shift0 + shift2)
        ctx.save_for_backward(stacked_x, stacked_w, z1, coeff, w0, w1, w2, g0, g1, b1, g2, mean1, invstd1,
                              *saved0, *saved2)
        ctx.eps1, ctx.fmt = eps1, _layout(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        stacked_x, stacked_w, z1, coeff, w0, w1, w2, g0, g1, b1, g2, mean1, invstd1, *saved = ctx.saved_tensors
        saved0, saved2 = saved[:4], saved[4:]
        p = w0.shape[1]
        n = dy.shape[0] * dy.shape[2] * dy.shape[3]
        dy = dy.contiguous(memory_format=ctx.fmt)
        sum_dy = dy.sum((0, 2, 3))
        d_stacked, dw_stacked = _conv1x1_backward(dy, stacked_x, stacked_w, True, True)
        x, g = stacked_x[:, :p], stacked_x[:, p:]
        dw0, dg0, r0, c0 = _folded_bn_terms(dw_stacked[:, :p], w0, g0, sum_dy, n, saved0)
        dw2, dg2, r2, c2 = _folded_bn_terms(dw_stacked[:, p:], w2, g2, sum_dy, n, saved2)
        dg = channel_matmul(r2, g, add=d_stacked[:, p:]).add_(c2[:, None, None])
        h = _bn_affine(z1, g1, b1, mean1, invstd1)
        dh, dcoeff = _mix_backward(dg, h, coeff, ctx.needs_input_grad[1])
        del dg, h
        dz1, dg1, db1 = torch.ops.aten.native_batch_norm_backward(
            dh, z1, g1, None, None, mean1, invstd1, True, ctx.eps1, [True, True, True])
        need_x, need_w1 = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx1, dw1 = _conv1x1_backward(dz1, x, w1, need_x, need_w1)
        dx = None
        if need_x:
            dx = channel_matmul(r0, x, add=d_stacked[:, :p]).add_(c0[:, None, None]).add_(dx1)
        if not ctx.needs_input_grad[2]:
            dw0 = None
        return dx, dcoeff, dw0, dw1, dw2, dg0, sum_dy, dg1, db1, dg2, sum_dy.clone(), None, None, None


def pointwise_expanding(x: Tensor, coeff: Optional[Tensor], weight: Tensor, project: nn.Conv2d,
                        bn1: nn.BatchNorm2d, bn2: nn.BatchNorm2d, q: int) -> Tensor:
    """The expanding form of a 1×1 layer in train mode: ``BN2(W2·(coeff ⊙ BN1(W1·x))) + BN1(W0·x)``.

    ``x``: (B, p, H, W), already subsampled by the conv's stride, NCHW or channels-last (the result and x's
    gradient keep its layout); ``weight``: the shared (q + m, p, 1, 1) kernel [W0; W1]; ``coeff``: (B, m) or
    None.  Returns (B, q, H, W).  Same output, gradients and running statistics as the modules, in fewer passes
    (:class:`_PointwiseFolded` where q ≥ 2p, :class:`_PointwiseExpanding` otherwise).
    """
    p = x.shape[1]
    x = x.contiguous(memory_format=_layout(x))
    _check_batch(x.shape)
    w2d = weight.reshape(weight.shape[0], p)
    f1, f2 = _bn_factor(bn1), _bn_factor(bn2)

    def stats(lo, hi):
        rm, rv = bn1.running_mean, bn1.running_var
        return rm[lo:hi], rv[lo:hi], f1, bn1.eps

    fn = _PointwiseFolded if q >= 2 * p else _PointwiseExpanding
    return fn.apply(
        x, coeff, w2d[:q], w2d[q:], project.weight.reshape(q, -1), bn1.weight[:q], bn1.bias[:q],
        bn1.weight[q:], bn1.bias[q:], bn2.weight, bn2.bias, stats(0, q), stats(q, None),
        (bn2.running_mean, bn2.running_var, f2, bn2.eps))
