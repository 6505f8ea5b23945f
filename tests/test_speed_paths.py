"""Every execution path computes the same function (correctness only; speed is tools/benchmark.py's business)."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from conftest import randomize_bn, rel_err
from mdplug.nn import DCDConv2d, DYConv2d, MAConv2d, MDConv2d
from mdplug.nn._common import Attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
from peers import AttentionFloor, PeerDYConv2d, TimmCondConv, swap_convs  # noqa: E402

GEOMETRIES = [  # (p, q, k, stride, padding)
    (8, 12, 1, 1, 0),   # 1×1 with q > p: the factorized form stacks the input channels
    (8, 12, 1, 2, 0),
    (12, 8, 1, 2, 0),   # 1×1 with q ≤ p: one conv for W0'/W1', one batched matmul-add
    (6, 10, 3, 1, 1),
    (6, 10, 3, 2, 1),
]


def _autograd_nodes(t: torch.Tensor) -> set:
    """Names of every node in the autograd graph behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def _compact(layer: nn.Module) -> nn.Module:
    layer = randomize_bn(layer).eval()
    layer.switch_to_deploy()
    return layer


@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d])
@pytest.mark.parametrize('p,q,k,s,pad', GEOMETRIES)
@pytest.mark.parametrize('norm,bypass,bias', [('branch', True, True), ('sum', True, True), ('none', False, True),
                                               ('none', True, False), ('none', False, False)])
def test_compact_paths_equal_expanding(cls, p, q, k, s, pad, norm, bypass, bias):
    """'weight', 'factorized' and 'auto' all give the expanding form's eval output, at batch 1 (1×1 layers: the
    one-sample matmuls) and 5."""
    expanding = randomize_bn(cls(p, q, k, s, pad, m=7, norm=norm, bypass=bypass, bias=bias)).eval()
    if norm == 'none' and bias:
        nn.init.normal_(expanding.bias)
    compact = _compact(copy.deepcopy(expanding))
    for b in (1, 5):
        x = torch.randn(b, p, 9, 9)
        with torch.no_grad():
            want = expanding(x)
            for path in ('weight', 'factorized', 'auto'):
                compact.path = path
                assert rel_err(compact(x), want) < 1e-5, (path, b)


@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d])
@pytest.mark.parametrize('path', ['weight', 'factorized'])
@pytest.mark.parametrize('stride', [1, 2])
def test_one_sample_pointwise_path_has_the_batched_gradients(cls, path, stride):
    """Training the compact form (Table 8's "compact training"): at batch 1 a 1×1 layer runs as plain matmuls;
    its output and parameter gradients equal the batched code's on two copies of the sample (halved)."""
    layer = _compact(cls(6, 10, 1, stride, m=5)).train()
    layer.path = path
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    layer.double()
    one = layer(x)
    (one * torch.arange(one.numel(), dtype=one.dtype).view_as(one)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    two = layer(torch.cat([x, x]))
    assert torch.allclose(two[:1], one) and torch.allclose(two[1:], one)
    (two * torch.arange(one.numel(), dtype=one.dtype).view_as(one).expand_as(two)).sum().backward()
    for n, p in layer.named_parameters():
        assert torch.allclose(p.grad / 2, grads[n]), n


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


_LAYOUT_CASES = [(cls, dict(m=7, norm=norm, bypass=bypass, bias=bias)) for cls in (MDConv2d, DCDConv2d)
                 for norm, bypass, bias in [('branch', True, True), ('branch', False, True), ('sum', True, True),
                                            ('none', True, False), ('none', False, False)]]
_LAYOUT_CASES += [(DYConv2d, dict(bias=True)), (DYConv2d, dict(bias=False))]


@pytest.mark.parametrize('cls,kwargs', _LAYOUT_CASES)
@pytest.mark.parametrize('p,q,k,s,pad', GEOMETRIES)
def test_compact_paths_keep_channels_last(cls, kwargs, p, q, k, s, pad):
    """Like ``nn.Conv2d``, every compact path returns a channels-last output for a channels-last input (1×1
    products run on its (B, H·W, C) rows) and an NCHW one for an NCHW input, with the same values (with and
    without each bias and the bypass)."""
    layer = _compact(cls(p, q, k, s, pad, **kwargs))
    for b in (1, 5):
        x = torch.randn(b, p, 9, 9)
        x_cl = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            for path in ('weight', 'factorized', 'auto'):
                layer.path = path
                want, got = layer(x), layer(x_cl)
                assert want.is_contiguous() and _is_nhwc(got), (path, b)
                assert rel_err(got, want) < 1e-5, (path, b)


@pytest.mark.parametrize('cls,fused', [(MDConv2d, True), (MDConv2d, False), (DCDConv2d, False), (DYConv2d, False)])
def test_training_gradient_of_a_channels_last_input_stays_channels_last(cls, fused):
    """In a model the layer's input is computed (not a leaf): its gradient, which sums the attention's (GAP) and
    the convolutions' parts, must come back channels-last for a channels-last input (an NCHW one makes the
    producer's BatchNorm backward mix layouts), with the NCHW gradient's values."""
    torch.manual_seed(0)
    layer = cls(6, 10, 1) if cls is DYConv2d else cls(6, 10, 1, m=5)
    layer = randomize_bn(layer).double().train()
    if hasattr(layer, 'fuse_training_tail'):
        layer.fuse_training_tail = fused
    x0 = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    grads = []
    for leaf in (x0, x0.to(memory_format=torch.channels_last)):
        leaf = leaf.detach().requires_grad_()
        x = torch.relu(leaf)
        y = layer(x)
        grads.append(torch.autograd.grad(y, x, torch.ones_like(y))[0])
    assert _is_nhwc(grads[1]) and torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d])
@pytest.mark.parametrize('path', ['weight', 'factorized'])
@pytest.mark.parametrize('batch', [1, 3])
def test_channels_last_compact_paths_have_the_nchw_gradients(cls, path, batch):
    """The channels-last (row) products of the compact form give the NCHW code's gradients, in float64."""
    layer = _compact(cls(6, 10, 1, 2, m=5)).train().double()
    layer.path = path
    x = torch.randn(batch, 6, 7, 7, dtype=torch.float64)
    grads = []
    for inp in (x, x.to(memory_format=torch.channels_last)):
        inp = inp.detach().requires_grad_()
        layer.zero_grad()
        y = layer(inp)
        (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape[0], y.shape[2], y.shape[3], y.shape[1])
         .permute(0, 3, 1, 2)).sum().backward()
        grads.append([inp.grad] + [prm.grad for prm in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('p,q,k,s,pad', GEOMETRIES)
@pytest.mark.parametrize('groups', [1, 2])
def test_dyconv_paths_equal(p, q, k, s, pad, groups):
    layer = DYConv2d(p, q, k, s, pad, groups=groups).eval()
    x = torch.randn(3, p, 9, 9)
    with torch.no_grad():
        layer.path = 'weight'
        want = layer(x)
        layer.path = 'factorized'
        assert rel_err(layer(x), want) < 1e-5


def test_expanding_split_has_reference_gradients():
    """The expanding form (one conv for W0 and W1, one split) has the gradients of separate convs and BNs."""
    layer = MDConv2d(6, 10, 3, 1, 1, m=5).train()
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    layer(x).square().sum().backward()
    q = layer.out_channels
    w = layer.expand.weight.detach()
    w0 = w[:q].clone().requires_grad_()
    w1 = w[q:].clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bn = layer.expand_bn
    bn0 = nn.functional.batch_norm(nn.functional.conv2d(x2, w0, None, 1, 1), None, None, bn.weight[:q].detach(),
                                   bn.bias[:q].detach(), True)
    h = nn.functional.batch_norm(nn.functional.conv2d(x2, w1, None, 1, 1), None, None, bn.weight[q:].detach(),
                                 bn.bias[q:].detach(), True)
    a = layer.attention(x2)
    u = nn.functional.conv2d(h * a[:, :, None, None], layer.project.weight.detach())
    pb = layer.project_bn
    y = nn.functional.batch_norm(u, None, None, pb.weight.detach(), pb.bias.detach(), True) + bn0
    y.square().sum().backward()
    assert rel_err(layer.expand.weight.grad[:q], w0.grad) < 1e-5
    assert rel_err(layer.expand.weight.grad[q:], w1.grad) < 1e-5
    assert rel_err(x.grad, x2.grad) < 1e-5


def _through_modules(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` whose plain training forward calls its submodules as modules: a no-op forward hook on
    each BN, linear and attention network turns off the shortcuts that would bypass them."""
    ref = copy.deepcopy(layer)
    for m in ref.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Linear, Attention)):
            m.register_forward_hook(lambda *args: None)
    return ref


@pytest.mark.parametrize('cls', [MDConv2d, MAConv2d])
@pytest.mark.parametrize('k,s', [(1, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_plain_training_shortcuts_equal_the_modules_in_float64(cls, k, s, momentum, fmt):
    """Plain autograd (CUDA's training default) takes three shortcuts that dispatch fewer ops: BN1 and BN2 count
    their batch with one ``_foreach_add_`` and run as ``F.batch_norm``; fc1 + ReLU is one ``_addmm_activation``
    with autograd's backward (``_LinearReLU``); MDConv's ``h·sigmoid(z)`` is one ``glu``.  Over three steps they
    give the modules' output, input and parameter gradients, running statistics and batch counters to float64
    rounding, in the input's layout."""
    torch.manual_seed(4)
    fast = randomize_bn(cls(6, 10, k, s, k // 2, m=4)).double().train()
    fast.fuse_training_tail = False
    for bn in (fast.expand_bn, fast.project_bn):
        bn.momentum = momentum
    ref = _through_modules(fast)
    x0 = torch.randn(3, 6, 7, 7, dtype=torch.float64).to(memory_format=fmt)
    xf, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    for _ in range(3):
        yf, yr = fast(torch.relu(xf)), ref(torch.relu(xr))  # (a computed input, as in a model)
        g = torch.randn_like(yr)
        yf.backward(g)
        yr.backward(g)
    shortcuts = {'GluBackward0', '_LinearReLUBackward'} if cls is MDConv2d else set()
    assert shortcuts <= _autograd_nodes(yf) and not shortcuts & _autograd_nodes(yr)
    assert (yf - yr).abs().max() < 1e-12 and (xf.grad - xr.grad).abs().max() < 1e-12
    assert yf.stride() == yr.stride() and xf.grad.stride() == xr.grad.stride()
    for (name, pf), pr in zip(fast.named_parameters(), ref.parameters()):
        assert (pf.grad - pr.grad).abs().max() < 1e-11 * max(1.0, pr.grad.abs().max().item()), name
    for (name, bf), br in zip(fast.named_buffers(), ref.buffers()):
        assert torch.equal(bf, br) if name.endswith('num_batches_tracked') else (bf - br).abs().max() < 1e-12, name
    assert fast.project_bn.num_batches_tracked == 3


def test_plain_training_shortcuts_keep_double_backward():
    """The gradient of a gradient (a gradient penalty) through the shortcuts is the modules'."""
    torch.manual_seed(5)
    fast = randomize_bn(MDConv2d(6, 10, 3, 1, 1, m=4)).double().train()
    fast.fuse_training_tail = False
    grads = []
    for layer in (fast, _through_modules(fast)):
        x = torch.randn(3, 6, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        gx, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-11 * max(1.0, b.abs().max().item())


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit.trace is deprecated; the exporter still uses it
@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d, DYConv2d])
def test_trace_is_batch_agnostic(cls):
    """While tracing, a k×k per-sample conv takes the batch-agnostic path: a trace at batch 2 runs at batch 5."""
    layer = cls(6, 10, 3, 1, 1)
    if layer.__class__ is not DYConv2d:
        layer = _compact(layer)
        layer.path = 'weight'
    else:
        layer.eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(2, 6, 9, 9), check_trace=False)
        x = torch.randn(5, 6, 9, 9)
        assert rel_err(traced(x), layer(x)) < 1e-5


def test_maconv_compact_is_a_conv():
    layer = randomize_bn(MAConv2d(8, 12, 3, 1, 1)).eval()
    conv = layer.fuse()
    assert type(conv) is nn.Conv2d
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert rel_err(conv(x), layer(x)) < 1e-5


# -- the benchmark's reference layers (tools/peers.py) ---------------------------------------------------------
@pytest.mark.parametrize('k,groups', [(1, 1), (3, 1), (3, 2)])
def test_peer_dyconv_matches_mdplug_dyconv(k, groups):
    """The peer-style DYConv (grouped conv with groups=B) computes what mdplug's DYConv2d computes."""
    conv = nn.Conv2d(6, 8, k, 1, k // 2, groups=groups)
    peer = PeerDYConv2d(conv).eval()
    ours = DYConv2d.from_conv(conv).eval()
    with torch.no_grad():
        ours.experts.copy_(peer.weight)
        ours.bias.copy_(peer.bias)
        ours.attention.fc1.load_state_dict(peer.fc1.state_dict())
        ours.attention.fc2.load_state_dict(peer.fc2.state_dict())
        x = torch.randn(3, 6, 9, 9)
        assert rel_err(peer(x), ours(x)) < 1e-5


def test_attention_floor_returns_the_static_output_and_runs_mdconvs_attention():
    """The benchmark's floor row: the static conv's output, exactly, and MDConv's attention network (same sizes
    as MDConv2d's defaults) run on the conv's input."""
    conv = nn.Conv2d(16, 24, 1)
    floor = AttentionFloor(copy.deepcopy(conv)).eval()
    layer = MDConv2d.from_conv(conv)
    assert [t.shape for t in floor.attention.parameters()] == [t.shape for t in layer.attention.parameters()]
    seen = []
    floor.attention.register_forward_hook(lambda mod, args, out: seen.append((args[0], out.shape)))
    x = torch.randn(3, 16, 7, 7)
    with torch.no_grad():
        assert torch.equal(floor(x), conv(x))
    assert len(seen) == 1 and seen[0][0] is x and seen[0][1] == (3, 20)


def test_timm_condconv_wrapper_runs():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    swap_convs(model, ['0', '2'], TimmCondConv)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize('cls,kwargs', [(MDConv2d, {}), (MAConv2d, {}), (MDConv2d, dict(gate='softmax'))])
@pytest.mark.parametrize('k,s,p,q', [(1, 1, 4, 10), (1, 2, 4, 10), (1, 1, 6, 10), (1, 1, 10, 6), (1, 2, 10, 6),
                                     (3, 2, 6, 10)])
def test_fused_training_tail_equals_autograd(cls, kwargs, k, s, p, q):
    """The fused training paths (1×1: the whole layer in one function, all BNs folded where q ≥ 2p; k×k: the
    tail after the shared conv) give the plain autograd path's output, gradients and BN statistics."""
    torch.manual_seed(0)
    fused = randomize_bn(cls(p, q, k, s, k // 2, m=5, **kwargs)).train()
    plain = copy.deepcopy(fused)
    plain.fuse_training_tail = False
    assert fused._use_fused_tail() and not plain._use_fused_tail()
    x = torch.randn(4, p, 9, 9)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: running statistics and num_batches_tracked advance alike
        yf, yp = fused(xf), plain(xp)
        expected = ('_ExpandingTailBackward' if k > 1 else
                    '_PointwiseFoldedBackward' if q >= 2 * p else '_PointwiseExpandingBackward')
        assert expected in _autograd_nodes(yf)
        assert rel_err(yf, yp) < 1e-5
        g = torch.randn_like(yf)
        yf.backward(g)
        yp.backward(g)
    assert rel_err(xf.grad, xp.grad) < 1e-4
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        assert rel_err(pf.grad, pp.grad) < 1e-4, name
    for (name, bf), bp in zip(fused.named_buffers(), plain.buffers()):
        assert rel_err(bf.float(), bp.float()) < 1e-6, name


@pytest.mark.parametrize('cls', [MDConv2d, MAConv2d])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('k,p,q,s', [(1, 12, 7, 1), (1, 5, 12, 1), (1, 5, 12, 2), (3, 12, 7, 1), (3, 12, 7, 2)])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_fused_training_paths_are_exact_in_float64(cls, momentum, k, p, q, s, fmt):
    """The fused training paths derive BN2's statistics and backward from the m×m covariance instead of running
    a BatchNorm: in float64 they must agree with plain autograd to rounding, in NCHW and channels-last (which
    they compute in, keeping the layout), strided, and with a cumulative-average BN (momentum=None)."""
    torch.manual_seed(1)
    fused = randomize_bn(cls(p, q, k, s, padding=k // 2, m=4)).double().train()
    for bn in (fused.expand_bn, fused.project_bn):
        bn.momentum = momentum
    plain = copy.deepcopy(fused)
    plain.fuse_training_tail = False
    x = torch.randn(3, p, 5, 6, dtype=torch.float64).to(memory_format=fmt)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(3):
        yf, yp = fused(xf), plain(xp)
        assert (yf - yp).abs().max() < 1e-12
        g = torch.randn_like(yp)
        yf.backward(g)
        yp.backward(g)
    assert (xf.grad - xp.grad).abs().max() < 1e-12
    for t in (yf, xf.grad, yp, xp.grad):  # the layouts plain autograd (and nn.Conv2d) give
        assert _is_nhwc(t) if fmt == torch.channels_last else t.is_contiguous()
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        assert (pf.grad - pp.grad).abs().max() < 1e-11 * max(1.0, pp.grad.abs().max().item()), name
    for (name, bf), bp in zip(fused.named_buffers(), plain.buffers()):
        assert (bf.double() - bp.double()).abs().max() < 1e-12, name


@pytest.mark.parametrize('p,q', [(10, 6), (4, 10)])
def test_pointwise_training_path_with_frozen_kernel_and_input_without_grad(p, q):
    """A frozen expand conv (fine-tuning the rest) and an input that needs no gradient: the fused 1×1 paths
    skip those products and still give plain autograd's gradients for everything else."""
    torch.manual_seed(3)
    fused = randomize_bn(MDConv2d(p, q, 1, m=4)).train()
    fused.expand.weight.requires_grad_(False)
    plain = copy.deepcopy(fused)
    plain.fuse_training_tail = False
    x = torch.randn(4, p, 5, 5)
    yf, yp = fused(x), plain(x)
    g = torch.randn_like(yp)
    yf.backward(g)
    yp.backward(g)
    assert fused.expand.weight.grad is None and plain.expand.weight.grad is None
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        if pp.requires_grad:
            assert rel_err(pf.grad, pp.grad) < 1e-4, name


def test_bfloat16_layer_trains_through_plain_autograd():
    """The fused functions keep m×m statistics in the input's dtype, so they run for float32/float64 only; a
    bfloat16 layer trains through the modules (and gives their result)."""
    torch.manual_seed(2)
    layer = randomize_bn(MDConv2d(8, 6, 1, m=4)).train()
    low = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(4, 8, 5, 5)
    y = low(x.to(torch.bfloat16))
    nodes = _autograd_nodes(y)
    assert not any('Expanding' in n for n in nodes) and 'NativeBatchNormBackward0' in nodes
    y.float().square().sum().backward()
    assert low.expand.weight.grad is not None
    assert rel_err(y.float(), layer(x)) < 3e-2


@pytest.mark.parametrize('k', [1, 3])
def test_fused_training_paths_refuse_one_value_per_channel_like_batchnorm(k):
    """Batch 1 with a 1×1 output map: train-mode BatchNorm has no variance to use; the fused paths say so as
    nn.BatchNorm2d does instead of normalising by eps."""
    layer = MDConv2d(4, 6, k, padding=k // 2).train()
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        layer(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize('p,q', [(8, 12), (12, 8)])
def test_every_compact_path_counts_its_macs(p, q):
    """mdplug.profile counts what runs (torch's FlopCounterMode sees mm/addmm/bmm/baddbmm/conv, not in-place or
    matrix-vector variants): each path of a compact 1×1 MDConv at batch 1 and 2 costs its analytic MACs."""
    from mdplug.profile import count_macs
    m, hw = 5, 36
    layer = _compact(MDConv2d(p, q, 1, m=m)).eval()
    hidden = layer.attention.fc1.out_features
    attention = p * hidden + hidden * m
    want = {  # per sample, beyond the attention network
        (1, 'weight'): q * m * p + q * m + q * p * hw,                 # kernel, bias (Eq. 7), conv
        (1, 'factorized'): m * p * hw + q * p * hw + q * m * hw,
        (2, 'weight'): q * m * p + q * m + q * p * hw,
        (2, 'factorized'): (m * p * hw + q * (p + m) * hw) if q > p     # stacked: W1' conv, [W0'|W2'] conv
        else ((q + m) * p * hw + q * m * hw),                           # [W0'; W1'] conv, W2'·A matmul-add
    }
    for (batch, path), macs in want.items():
        layer.path = path
        assert count_macs(layer, (p, 6, 6), batch=batch) == attention + macs, (batch, path)


@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d])
def test_one_sample_matrices_follow_the_parameters(cls):
    """The batch-1 path's parameter views never go stale: after ``.data`` is replaced, a parameter
    is swapped for a new one, ``torch.func.functional_call`` lends other parameters for a call, weights are
    loaded in place, or the layer changes dtype, its output is the batched path's (which reads the parameters
    afresh) on the same sample."""
    layer = _compact(cls(6, 10, 1, m=5))
    x = torch.randn(1, 6, 7, 7)

    def agrees() -> bool:
        with torch.inference_mode():
            one = layer(x)
            two = layer(torch.cat([x, x]))
        return one.dtype == x.dtype and rel_err(one, two[:1]) < 1e-5

    assert agrees()
    layer.weight.data = torch.randn_like(layer.weight)
    assert agrees()
    layer.weight1 = nn.Parameter(torch.randn_like(layer.weight1))
    assert agrees()
    other = _compact(cls(6, 10, 1, m=5))
    with torch.inference_mode():  # torch.func swaps the parameters for one call
        assert torch.equal(torch.func.functional_call(layer, dict(other.named_parameters()), (x,)), other(x))
    assert agrees()
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.equal(layer(x), other(x))
    class Scale(nn.Module):  # a parametrization whose value changes without any parameter changing
        factor = 1.0

        def forward(self, w):
            return w * self.factor

    scale = Scale()
    torch.nn.utils.parametrize.register_parametrization(layer, 'weight1', scale)
    assert agrees()
    with torch.inference_mode():
        before = layer(x)
    scale.factor = 3.0
    assert agrees()
    with torch.inference_mode():
        assert not torch.allclose(layer(x), before)
    torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight1')
    layer.double()
    x = x.double()
    assert agrees()


@pytest.mark.filterwarnings('ignore:torch.quantize_per_tensor')  # (torch deprecates its quantized tensors)
@pytest.mark.parametrize('cls', [MDConv2d, DCDConv2d])
def test_one_sample_path_respects_hooks_and_swapped_linears(cls):
    """The batch-1 path skips the attention network's module calls only where nothing could tell: hooks on the
    attention network or its linears still fire, and a dynamically quantized network (its nn.Linear swapped for
    quantized ones) is called as such."""
    layer = _compact(cls(8, 12, 1, m=5))
    x = torch.randn(1, 8, 5, 5)
    calls = []
    with torch.inference_mode():
        want = layer(x)
        for mod in (layer.attention, layer.attention.fc1, layer.attention.fc2):
            handle = mod.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
            assert torch.equal(layer(x), want)
            handle.remove()
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append('global'))
        layer(x)
        handle.remove()
    assert calls[:3] == ['Attention', 'Linear', 'Linear'] and 'global' in calls[3:], calls
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(layer), {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.attention.fc1) is not nn.Linear
    with torch.inference_mode():
        assert rel_err(quantized(x), want) < 0.05


def test_one_sample_path_under_fake_tensors():
    """Under FakeTensorMode (memory estimates, tracing tools) the batch-1 path runs without reading data
    pointers and remembers nothing, and the MAC count still sees its products."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mdplug.profile import count_macs
    layer = _compact(MDConv2d(8, 12, 1, m=5))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(1, 8, 5, 5))
        with torch.inference_mode():
            y = layer(x)
    assert y.shape == (1, 12, 5, 5) and '_matrices_cache' not in layer.__dict__
    assert count_macs(layer, (8, 5, 5)) > 12 * 8 * 25
