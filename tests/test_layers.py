"""The layers: compact equals expanding (Eq. 6–7, 10–11), training works, bad options are refused."""
import io
import itertools

import pytest
import torch
from torch import nn

from mdplug.nn import LAYERS, DCDConv2d, DYConv2d, MAConv2d, MDConv2d, SEConv2d
from conftest import randomize_bn, rel_err

GEOMETRIES = [  # (k, stride, padding, dilation)
    (1, 1, 0, 1), (1, 2, 0, 1), (1, 1, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 2, 0, 1),
    (5, 1, 2, 1), (5, 2, 2, 2), (5, 1, 0, 1),
]
MULTI = [MAConv2d, MDConv2d, DCDConv2d]


def _check(layer, x, tol=1e-5):
    randomize_bn(layer)
    layer.eval()
    with torch.no_grad():
        ref = layer(x)
        compact = layer.fuse()
        paths = ('weight', 'factorized') if hasattr(compact, 'path') else (None,)
        for path in paths:
            if path is not None:
                compact.path = path
            out = compact(x)
            assert out.shape == ref.shape
            assert rel_err(out, ref) <= tol, (type(layer).__name__, path)


@pytest.mark.parametrize('cls', MULTI + [DYConv2d, SEConv2d], ids=lambda c: c.__name__)
@pytest.mark.parametrize('k,stride,padding,dilation', GEOMETRIES)
def test_compact_equals_expanding(cls, k, stride, padding, dilation):
    kw = dict(m=6) if cls in MULTI else {}
    for bias, batch in itertools.product((True, False), (1, 7)):
        layer = cls(5, 9, k, stride, padding, dilation, bias=bias, **kw)
        _check(layer, torch.randn(batch, 5, 11, 8))


@pytest.mark.parametrize('cls', MULTI, ids=lambda c: c.__name__)
@pytest.mark.parametrize('norm', ['branch', 'sum', 'none'])
@pytest.mark.parametrize('bypass', [True, False])
def test_compact_equals_expanding_ablation_switches(cls, norm, bypass):
    for k, stride, padding, dilation in [(1, 1, 0, 1), (3, 2, 1, 1)]:
        for bias in (True, False):
            layer = cls(6, 4, k, stride, padding, dilation, bias=bias, m=7, norm=norm, bypass=bypass)
            _check(layer, torch.randn(3, 6, 9, 10))


@pytest.mark.parametrize('gate,temperature', [('sigmoid', 1.0), ('softmax', 1.0), ('softmax', 30.0)])
def test_mdconv_gates(gate, temperature):
    layer = MDConv2d(8, 8, 3, padding=1, m=4, gate=gate, temperature=temperature, hidden_ratio=2.0)
    _check(layer, torch.randn(2, 8, 6, 6))
    a = layer.dynamic_coefficients(torch.randn(3, 8, 6, 6))
    assert a.shape == (3, 4)
    if gate == 'softmax':
        torch.testing.assert_close(a.sum(1), torch.ones(3))


def test_padding_strings():
    for padding in ('same', 'valid'):
        _check(MDConv2d(4, 6, 3, padding=padding, m=3), torch.randn(2, 4, 7, 9))
        _check(MAConv2d(4, 6, 3, padding=padding, m=3), torch.randn(2, 4, 7, 9))


def test_maconv_fuse_is_a_plain_conv2d():
    layer = randomize_bn(MAConv2d(8, 16, 3, 2, 1, m=20)).eval()
    fused = layer.fuse()
    assert type(fused) is nn.Conv2d
    assert (fused.stride, fused.padding, fused.kernel_size) == ((2, 2), (1, 1), (3, 3))
    x = torch.randn(4, 8, 12, 12)
    assert rel_err(fused(x), layer(x)) < 1e-5
    w, b = layer.get_equivalent_kernel_bias()
    torch.testing.assert_close(w, fused.weight)


def test_maconv_compact_parameter_count():
    p, q = 12, 20
    for bias, norm in [(True, 'branch'), (False, 'none'), (True, 'none')]:
        layer = MAConv2d(p, q, 1, bias=bias, norm=norm)
        layer.switch_to_deploy()
        n = sum(t.numel() for t in layer.parameters())
        assert n == q * p + (q if (norm != 'none' or bias) else 0)


def test_mdconv_parameter_count_follows_the_paper():
    p, q, m = 32, 48, 20
    layer = MDConv2d(p, q, 1, m=m)
    attention = p * (p // 4) + p // 4 + (p // 4) * m + m
    bn = 2 * (q + m) + 2 * q
    assert sum(t.numel() for t in layer.parameters()) == q * p + m * p + q * m + attention + bn
    layer.switch_to_deploy()
    # compact: W0', W1', W2', biases b' (q) and b1' (m), attention unchanged
    assert sum(t.numel() for t in layer.parameters()) == q * p + m * p + q * m + q + m + attention


def test_dyconv_parameter_count():
    layer = DYConv2d(16, 24, 1, bias=False)
    att = 16 * 4 + 4 + 4 * 4 + 4
    assert sum(t.numel() for t in layer.parameters()) == 4 * 24 * 16 + att


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_gradients_reach_every_parameter(kind):
    cls = LAYERS[kind]
    layer = cls(6, 8, 3, padding=1).train()
    layer(torch.randn(4, 6, 5, 5)).square().mean().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_maconv_relu_cannot_be_fused_and_says_so():
    layer = MAConv2d(4, 4, 1, act='relu')
    layer(torch.randn(2, 4, 3, 3)).sum().backward()
    with pytest.raises(ValueError, match='cannot be fused'):
        layer.fuse()
    with pytest.raises(ValueError, match='cannot be fused'):
        layer.switch_to_deploy()
    with pytest.raises(ValueError, match='deploy=True'):
        MAConv2d(4, 4, 1, act='relu', deploy=True)


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_switch_to_deploy_is_idempotent_and_state_dict_round_trips(kind, tmp_path):
    cls = LAYERS[kind]
    layer = randomize_bn(cls(6, 8, 3, padding=1)).eval()
    x = torch.randn(2, 6, 7, 7)
    ref = layer(x)
    layer.switch_to_deploy()
    layer.switch_to_deploy()
    layer.reparameterize()
    assert layer.deploy
    assert rel_err(layer(x), ref) < 1e-5
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = cls(6, 8, 3, padding=1, deploy=True).eval()
    fresh.load_state_dict(state, strict=True)
    assert rel_err(fresh(x), ref) < 1e-5


@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('p,q,k,batch', [(16, 16, 3, 2), (8, 16, 1, 2), (16, 8, 1, 2), (8, 16, 1, 1)])
def test_bf16_autocast_and_channels_last(kind, p, q, k, batch):
    """Every form takes channels_last input and bfloat16 autocast; 1×1 layers cover the stacked and the
    matmul-add factorized forms and the one-sample matmuls."""
    cls = LAYERS[kind]
    layer = randomize_bn(cls(p, q, k, padding=k // 2)).eval()
    x = torch.randn(batch, p, 8, 8)
    with torch.no_grad():
        ref = layer(x)
        out_cl = layer(x.to(memory_format=torch.channels_last))
        assert rel_err(out_cl, ref) < 1e-5
        compact = layer.fuse()
        for path in (('weight', 'factorized', 'auto') if hasattr(compact, 'path') else (None,)):
            if path:
                compact.path = path
            assert rel_err(compact(x.to(memory_format=torch.channels_last)), ref) < 1e-5, path
            with torch.autocast('cpu', dtype=torch.bfloat16):
                for mod in (layer, compact):
                    out = mod(x)
                    assert rel_err(out.float(), ref) < 5e-2, path


def test_dyconv_loads_checkpoints_with_five_dimensional_experts():
    """DYConv2d keeps its K kernels flat, (K, q·p·k·k); a state dict with the (K, q, p, k, k) form still loads."""
    layer = DYConv2d(6, 8, 3, padding=1).eval()
    assert layer.weight.shape == (4, 8 * 6 * 9) and layer.experts.shape == (4, 8, 6, 3, 3)
    state = dict(layer.state_dict(), weight=layer.experts.detach().clone())
    fresh = DYConv2d(6, 8, 3, padding=1).eval()
    fresh.load_state_dict(state)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match='weight'):
        DYConv2d(6, 8, 3, padding=1).load_state_dict(dict(state, weight=torch.zeros(4, 8, 6, 1, 1)))


def test_from_conv_carries_the_static_kernel():
    conv = nn.Conv2d(6, 10, 3, 2, 1, bias=True).eval()
    x = torch.randn(2, 6, 8, 8)
    md = MDConv2d.from_conv(conv, m=4)
    torch.testing.assert_close(md.W0, conv.weight)
    assert not md.training and md.stride == (2, 2)
    dy = DYConv2d.from_conv(conv)
    torch.testing.assert_close(dy(x), conv(x))  # init='preserve': the experts average to the static kernel
    se = SEConv2d.from_conv(conv, init='fresh')
    torch.testing.assert_close(se.conv.weight, conv.weight)
    ma = MAConv2d.from_conv(conv, norm='none', m=3)
    torch.testing.assert_close(ma.bias, conv.bias)


def test_batch_is_not_baked_in():
    layer = randomize_bn(MDConv2d(8, 8, 3, padding=1, m=4)).eval().fuse()
    for path in ('weight', 'factorized'):
        layer.path = path
        for b in (1, 3, 5):
            assert layer(torch.randn(b, 8, 5, 5)).shape == (b, 8, 5, 5)


def test_auto_path_follows_mac_count():
    layer = MDConv2d(64, 64, 1, m=20, deploy=True)
    assert layer.choose_path(torch.zeros(1, 64, 56, 56)) == 'weight'      # 64·20·64 < (20·64+64·20)·3136
    assert layer.choose_path(torch.zeros(1, 64, 1, 1)) == 'factorized'
    big = MDConv2d(512, 512, 3, padding=1, m=20, deploy=True)
    assert big.choose_path(torch.zeros(1, 512, 4, 4)) == 'factorized'


def test_auto_path_weighs_per_sample_macs_above_batch_one():
    """With a batch, the factorized form's main product is one conv over the batch; per-sample kernels must save
    per_sample_mac_weight (8) times the MACs.  mobilenetv2_100's 96→576 layer at 14×14: 576·20·96 = 1.1M per
    sample vs (20·96 + 576·20)·196 = 2.6M."""
    layer = MDConv2d(96, 576, 1, m=20, deploy=True)
    assert layer.choose_path(torch.zeros(1, 96, 14, 14)) == 'weight'
    assert layer.choose_path(torch.zeros(8, 96, 14, 14)) == 'factorized'
    assert layer.choose_path(torch.zeros(8, 96, 56, 56)) == 'weight'     # 8.8M < 42M
    layer.per_sample_mac_weight = 1.0
    assert layer.choose_path(torch.zeros(8, 96, 14, 14)) == 'weight'


@pytest.mark.parametrize('kwargs,match', [
    (dict(groups=2), 'groups=2'),
    (dict(padding_mode='reflect'), 'padding_mode'),
    (dict(norm='layer'), 'norm'),
    (dict(gate='tanh'), 'gate'),
    (dict(path='fast'), 'path'),
    (dict(m=0), 'm '),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MDConv2d(8, 8, 3, **kwargs)


def test_bad_options_other_layers():
    with pytest.raises(ValueError, match='groups'):
        MAConv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match='act'):
        MAConv2d(8, 8, 3, act='gelu')
    with pytest.raises(ValueError, match='num_experts'):
        DYConv2d(8, 8, 3, num_experts=0)
    with pytest.raises(ValueError, match='needs the input'):
        MDConv2d(8, 8, 1).get_equivalent_kernel_bias()
    # DYConv and SE support grouped convs (depthwise), like their papers
    dw = randomize_bn(DYConv2d(8, 8, 3, padding=1, groups=8)).eval()
    _check(dw, torch.randn(2, 8, 6, 6))


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_bf16_autocast_training_step(kind):
    """AMP training (``tools/train.py --amp``): forward and backward under autocast reach every parameter."""
    layer = LAYERS[kind](8, 8, 3, padding=1).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(torch.randn(3, 8, 6, 6))
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize('kind', ['mdconv', 'maconv', 'dcd'])
def test_compact_form_follows_a_dtype_change_after_construction(kind):
    """``model.double()`` after conversion, then compact: the compact tensors are float64 too."""
    layer = randomize_bn(LAYERS[kind](6, 8, 3, padding=1, m=4)).eval().double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    ref = layer(x)
    compact = layer.fuse()
    assert all(p.dtype == torch.float64 for p in compact.parameters())
    assert rel_err(compact(x), ref) < 1e-12
