"""mdplug.fusion on its own: each identity against the convs it replaces."""
import pytest
import torch
import torch.nn.functional as F

from mdplug import fusion
from conftest import rel_err


def test_fold_bn_matches_conv_then_bn():
    w, x = torch.randn(6, 4, 3, 3), torch.randn(2, 4, 8, 8)
    rm, rv, g, b = torch.randn(6), torch.rand(6) + 0.5, torch.randn(6), torch.randn(6)
    ref = F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, g, b, False, 0.0, 1e-5)
    fw, fb = fusion.fold_bn(w, None, rm, rv, 1e-5, g, b)
    assert rel_err(F.conv2d(x, fw, fb, padding=1), ref) < 1e-6
    assert not isinstance(fw, torch.nn.Parameter) and fw.dtype == w.dtype


def test_fold_bn_scale_leaves_the_shift_out():
    w = torch.randn(5, 3, 1, 1)
    rv, g = torch.rand(5) + 0.5, torch.randn(5)
    fw, fb = fusion.fold_bn_scale(w, None, rv, 1e-5, g)
    assert fb is None
    torch.testing.assert_close(fw, w * (g / torch.sqrt(rv + 1e-5)).view(-1, 1, 1, 1))


@pytest.mark.parametrize('stride,padding,dilation', [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_compose_1x1_after_kxk(stride, padding, dilation):
    w1, b1, w2, b2 = torch.randn(7, 4, 3, 3), torch.randn(7), torch.randn(5, 7, 1, 1), torch.randn(5)
    x = torch.randn(3, 4, 10, 9)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride, padding, dilation), w2, b2)
    w, b = fusion.compose_1x1(w1, b1, w2, b2)
    assert w.shape == (5, 4, 3, 3) and b.shape == (5,)
    assert rel_err(F.conv2d(x, w, b, stride, padding, dilation), ref) < 1e-5


def test_compose_1x1_without_biases():
    w, b = fusion.compose_1x1(torch.randn(3, 2, 1, 1), None, torch.randn(4, 3, 1, 1), None)
    assert b is None and w.shape == (4, 2, 1, 1)


def test_add_branches_sums_parallel_convs_and_skips_absent():
    x = torch.randn(2, 3, 6, 6)
    (wa, ba), (wb, bb) = (torch.randn(4, 3, 3, 3), torch.randn(4)), (torch.randn(4, 3, 3, 3), None)
    w, b = fusion.add_branches((wa, ba), None, (wb, bb))
    ref = F.conv2d(x, wa, ba, padding=1) + F.conv2d(x, wb, None, padding=1)
    assert rel_err(F.conv2d(x, w, b, padding=1), ref) < 1e-6
    with pytest.raises(ValueError):
        fusion.add_branches(None)


def _branches(p=4, q=6, m=5, k=3):
    return dict(w0=torch.randn(q, p, k, k), b0=torch.randn(q), w1=torch.randn(m, p, k, k), b1=torch.randn(m),
                w2=torch.randn(q, m, 1, 1), b2=torch.randn(q))


def test_maconv_eq10_11():
    t, x = _branches(), torch.randn(2, 4, 7, 7)
    ref = F.conv2d(F.conv2d(x, t['w1'], t['b1'], padding=1), t['w2'], t['b2']) + F.conv2d(x, t['w0'], t['b0'],
                                                                                          padding=1)
    w, b = fusion.maconv_kernel_bias(**t)
    assert rel_err(F.conv2d(x, w, b, padding=1), ref) < 1e-5
    w, b = fusion.maconv_kernel_bias(None, None, t['w1'], t['b1'], t['w2'], t['b2'])
    ref = F.conv2d(F.conv2d(x, t['w1'], t['b1'], padding=1), t['w2'], t['b2'])
    assert rel_err(F.conv2d(x, w, b, padding=1), ref) < 1e-5


def test_mdconv_eq6_7_per_sample():
    t, x = _branches(), torch.randn(3, 4, 7, 7)
    a = torch.rand(3, 5)
    w, b = fusion.mdconv_kernel_bias(**t, attention=a)
    assert w.shape == (3, 6, 4, 3, 3) and b.shape == (3, 6)
    mid = F.conv2d(x, t['w1'], t['b1'], padding=1) * a[:, :, None, None]
    ref = F.conv2d(mid, t['w2'], t['b2']) + F.conv2d(x, t['w0'], t['b0'], padding=1)
    for i in range(3):
        out = F.conv2d(x[i:i + 1], w[i], b[i], padding=1)
        assert rel_err(out, ref[i:i + 1]) < 1e-5


def test_dcd_full_matrix():
    t, x = _branches(), torch.randn(2, 4, 6, 6)
    phi = torch.randn(2, 5, 5)
    w, b = fusion.dcd_kernel_bias(**t, phi=phi)
    mid = torch.einsum('bij,bjhw->bihw', phi, F.conv2d(x, t['w1'], t['b1'], padding=1))
    ref = F.conv2d(mid, t['w2'], t['b2']) + F.conv2d(x, t['w0'], t['b0'], padding=1)
    for i in range(2):
        assert rel_err(F.conv2d(x[i:i + 1], w[i], b[i], padding=1), ref[i:i + 1]) < 1e-5


def test_dyconv_and_se_kernels():
    wk, bk, pi = torch.randn(4, 6, 3, 3, 3), torch.randn(4, 6), torch.softmax(torch.randn(2, 4), 1)
    w, b = fusion.dyconv_kernel_bias(wk, bk, pi)
    torch.testing.assert_close(w[1], sum(pi[1, k] * wk[k] for k in range(4)))
    torch.testing.assert_close(b[1], sum(pi[1, k] * bk[k] for k in range(4)))
    s = torch.rand(2, 6)
    w, b = fusion.se_kernel_bias(wk[0], None, s)
    assert b is None
    torch.testing.assert_close(w[0], s[0].view(-1, 1, 1, 1) * wk[0])


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    t = {k: v.to(dtype) for k, v in _branches().items()}
    w, b = fusion.maconv_kernel_bias(**t)
    assert w.dtype == dtype and b.dtype == dtype
    w, b = fusion.mdconv_kernel_bias(**t, attention=torch.rand(2, 5, dtype=dtype))
    assert w.dtype == dtype and b.dtype == dtype
    fw, fb = fusion.fold_bn(t['w0'], None, t['b0'], t['b0'].abs() + 1, 1e-5, t['b0'], t['b0'])
    assert fw.dtype == dtype and fb.dtype == dtype
