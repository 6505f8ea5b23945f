"""The conversion pass on real models: plan, convert, compact; the paper's numbers."""
import functools
import warnings

import pytest
import timm
import torch
from torch import nn

from _models import build, calibrate_bn, exact_convs, relative_diff, small_input
from mdplug.convert import NothingToConvert, compact, convert, plan
from mdplug.convert.passes import compact_with_notes, convert_with_plan
from mdplug.nn import LAYERS, MAConv2d, MDConv2d
from mdplug.profile import count_macs, count_params

KINDS = tuple(LAYERS)


def test_plan_mobilenetv2_follows_the_paper():
    """33 pointwise convs of the inverted bottlenecks; stem and conv_head kept, each with its reason."""
    m = build('mobilenetv2_100')
    p = plan(m)
    assert p.traced and len(p.replace) == 33
    assert p.stem == 'conv_stem' and p.head == 'conv_head'
    assert all(n.startswith('blocks.') and (n.endswith('conv_pw') or n.endswith('conv_pwl')) for n in p.names)
    reasons = {d.name: d.reason for d in p.skip}
    assert 'head' in reasons['conv_head'] and 'keep_head' in reasons['conv_head']
    assert 'depthwise' in reasons['blocks.1.0.conv_dw']
    assert 'stem' in plan(m, select='all').skip[0].reason
    assert 'conv_head' in plan(m, keep_head=False).names
    assert 'conv_head' in str(p) and 'replace' in p.table()
    assert exact_convs(m) >= set(p.names)  # a dry run changes nothing


def test_resnet18_spatial_converts_the_16_block_convs():
    m = build('resnet18')
    p = plan(m, select='spatial')
    assert len(p.replace) == 16 and p.stem == 'conv1' and p.head is None  # layer4.1.conv2 is in a residual block
    assert all(n.startswith('layer') and n.endswith(('conv1', 'conv2')) for n in p.names)


def test_a_map_that_striding_shrank_to_1x1_is_not_taken_for_global_pooling():
    """On 32×32 images resnet18's last stage works on 1×1 maps; they grow with the image, unlike an SE gate's."""
    model = timm.create_model('resnet18')
    p = plan(model, 'mdconv', 'spatial', example_inputs=torch.randn(1, 3, 32, 32))
    assert len(p.names) == 16 and 'layer4.1.conv2' in p.names
    model = convert(model, kind='maconv', select='spatial', example_inputs=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert relative_diff(compact(model)(x), y) < 1e-5


def test_torchvision_shufflenet_35_pointwise():
    for name in ('torchvision:shufflenet_v2_x0_5', 'torchvision:shufflenet_v2_x1_5'):
        p = plan(build(name))
        assert len(p.replace) == 35 and p.stem == 'conv1.0' and p.head == 'conv5.0'


def test_convert_edits_the_model_in_place_and_keeps_everything_else():
    m = build('mobilenetv2_100')
    cfg, keys_before = m.pretrained_cfg, set(m.state_dict())
    names = plan(m).names
    m.blocks.eval()
    out = convert(m, 'mdconv', m=8)
    assert out is m and type(m).__name__ == 'EfficientNet' and m.pretrained_cfg is cfg
    layer = m.blocks[1][0].conv_pw
    assert type(layer) is MDConv2d and layer.training is False and m.conv_head.training is True
    assert layer._mdplug_orig_bias is False
    untouched = {k for k in keys_before if not any(k.startswith(n + '.') for n in names)}
    assert untouched <= set(m.state_dict())


def test_convert_not_inplace_leaves_the_original():
    m = build('resnet18')
    c = convert(m, 'maconv', select='spatial', inplace=False)
    assert c is not m and type(m.layer1[0].conv1) is nn.Conv2d and type(c.layer1[0].conv1) is MAConv2d


def test_static_weight_goes_into_the_bypass_and_training_flag_is_inherited():
    m = build('mobilenetv2_050').train()
    w = m.blocks[1][0].conv_pw.weight.clone()
    convert(m, 'maconv')
    layer = m.blocks[1][0].conv_pw
    assert layer.training
    # W0 may be stored alone or stacked with W1 along the output channels
    assert any(p.shape[1:] == w.shape[1:] and torch.equal(p[:w.shape[0]], w) for p in layer.parameters())


def test_maconv_compact_is_the_static_model():
    """Paper section 3: MAConv costs nothing at inference; the compact model loads strictly into timm's model."""
    m = build('mobilenetv2_100')
    convert(m, 'maconv')
    calibrate_bn(m, small_input())
    m.eval()
    x = small_input()
    with torch.no_grad():
        expanding = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "kept the bias" warning
        compact(m)
    static = timm.create_model('mobilenetv2_100').eval()
    static.load_state_dict(m.state_dict(), strict=True)
    assert count_params(static) == count_params(m)
    with torch.no_grad():
        assert relative_diff(expanding, static(x)) <= 1e-4
        assert torch.equal(m(x), static(x))


def test_calibrate_bn_keeps_deep_activations_order_one():
    """The check's BN calibration: every BN output of a deep converted net stays O(1) on the checked input
    (arbitrary statistics gave 1e5 and more), the training flags are kept, the affine parameters are not trivial."""
    m = convert(build('efficientnet_b2'), 'mdconv', example_inputs=small_input()[:1]).train()
    m.blocks[1].eval()
    flags = {k: v.training for k, v in m.named_modules()}
    x = small_input()
    calibrate_bn(m, x)
    assert flags == {k: v.training for k, v in m.named_modules()}
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    assert all(not torch.allclose(b.weight, torch.ones_like(b.weight)) for b in bns)
    peaks = []
    for b in bns:
        b.register_forward_hook(lambda mod, i, o: peaks.append(float(o.abs().max())))
    m.eval()
    with torch.no_grad():
        m(x)
    assert len(peaks) == len(bns) and max(peaks) < 20


def test_compact_keeps_the_bias_when_the_conv_has_several_users():
    """torchvision ResNet's conv → bn is single-user, but a conv feeding an add directly is not foldable."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Conv2d(8, 8, 1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 8, 1, bias=False)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            y = self.b(x)
            return self.head(self.bn(self.a(x)) + y + y.relu())

    net = Net().eval()
    calibrate_bn(net, torch.randn(2, 3, 8, 8))
    convert(net, 'maconv')
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y0 = net(x)
    net, folded, notes = compact_with_notes(net)
    assert folded == ['a'] and net.a.bias is None and net.b.bias is not None
    assert len(notes) == 1 and notes[0].startswith('b: kept the fused bias') and '2 users' in notes[0]
    with torch.no_grad():
        assert relative_diff(y0, net(x)) < 1e-5
    with pytest.warns(UserWarning, match='kept the fused bias'):
        net2 = Net().eval()
        compact(convert(net2, 'maconv'))


def test_select_callable_and_exclude():
    m = build('mobilenetv2_050')
    p = plan(m, select=lambda name, conv: name.startswith('blocks.2') and conv.kernel_size == (1, 1), exclude='*.conv_pwl')
    assert p.names == ['blocks.2.0.conv_pw', 'blocks.2.1.conv_pw', 'blocks.2.2.conv_pw']
    assert "excluded by '*.conv_pwl'" in {d.name: d.reason for d in p.skip}['blocks.2.0.conv_pwl']
    p = plan(m, exclude=['blocks.1.*', 'nothing.*'])
    assert len(p.replace) == 29 and any('nothing.*' in n for n in p.notes)


def test_convs_in_se_gates_are_left_alone_and_subclasses_are_not_mishandled():
    m = build('tf_efficientnet_b0')
    p = plan(m)
    reasons = {d.name: d.reason for d in p.skip}
    assert 'pooled' in reasons['blocks.1.0.se.conv_reduce']
    same = [d for d in p.skip if d.type == 'Conv2dSame']
    assert same and all('subclass' in d.reason for d in same)
    assert all(type(m.get_submodule(n)) is nn.Conv2d for n in p.names)


def test_a_model_of_conv2d_subclasses_is_refused_naming_the_type():
    """NFNets' ScaledStdConv2d standardises its weight in forward: not converted, and the refusal says so first."""
    m = build('nf_resnet26')
    with pytest.raises(NothingToConvert, match=r'every conv of the model is an nn\.Conv2d subclass '
                                               r'\(ScaledStdConv2d ×\d+\) with its own forward'):
        convert(m)


def test_errors_name_the_culprit():
    m = build('convnext_atto', conv_mlp=False)  # its MLPs are nn.Linear
    with pytest.raises(NothingToConvert, match=r'nothing matched.*stem\.0 \(Conv2d.*nn\.Linear'):
        convert(m)
    with pytest.raises(ValueError, match='unknown kind'):
        plan(m, kind='nope')
    with pytest.raises(ValueError, match='unknown select'):
        plan(m, select='pointwize')
    with pytest.raises(ValueError, match="takes no keyword 'm'"):
        convert(build('mobilenetv2_050'), 'dyconv', m=4)

    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(3, 4, 3)
            self.c1 = nn.Conv2d(4, 4, 1, padding_mode='reflect')
            self.c2 = nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.c2(self.c1(self.c0(x)))

    assert "padding_mode='reflect'" in plan(Reflect()).skip[1].reason
    with pytest.raises(ValueError, match=r'cannot convert c2 \(Conv2d 4→4 3×3 s1 g2\) to MAConv2d'):
        convert(Reflect(), 'maconv', select=lambda n, c: n == 'c2', keep_head=False)


def test_untraceable_model_falls_back_to_a_module_walk():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.mid = nn.Conv2d(8, 8, 1, bias=False)
            self.head = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            x = self.stem(x)
            if x.sum() > 0:  # data-dependent control flow does not trace
                x = self.mid(x)
            return self.head(x)

    p = plan(Dynamic())
    assert not p.traced and 'module walk' in p.notes[0] and p.names == ['mid'] and p.head == 'head'
    m = convert(Dynamic().eval(), 'maconv')
    _, folded, notes = compact_with_notes(m)
    assert folded == [] and 'unknown' in notes[0]


# (name, kind, select, model kwargs): ≥ 25 architectures from ≥ 12 families
REPRESENTATIVE = [
    ('resnet18', 'mdconv', 'spatial', {}),
    ('resnet10t', 'maconv', 'all', {}),
    ('mobilenetv2_050', 'dyconv', 'pointwise', {}),
    ('mobilenetv3_small_050', 'mdconv', 'pointwise', {}),
    ('mobilenetv3_large_100', 'maconv', 'pointwise', {}),
    ('efficientnet_b0', 'maconv', 'pointwise', {}),
    ('tf_efficientnet_b0', 'mdconv', 'all', {}),
    ('regnetx_002', 'mdconv', 'pointwise', {}),
    ('mobilenetv2_100', 'dcd', 'pointwise', {}),
    ('regnety_002', 'se', 'pointwise', {}),
    ('ghostnet_050', 'mdconv', 'pointwise', {}),
    ('mnasnet_050', 'dyconv', 'pointwise', {}),
    ('lcnet_050', 'maconv', 'pointwise', {}),
    ('densenet121', 'mdconv', 'pointwise', {}),
    ('repvgg_a0', 'maconv', 'all', {}),
    ('mobileone_s0', 'mdconv', 'pointwise', {}),
    ('convnext_atto', 'maconv', 'pointwise', {}),  # conv_mlp=True: its MLPs are 1×1 convs
    ('dla34', 'mdconv', 'pointwise', {}),
    ('cspresnet50', 'maconv', 'pointwise', {}),
    ('cs3darknet_s', 'dcd', 'pointwise', {}),
    ('lcnet_075', 'dcd', 'pointwise', {}),
    ('hrnet_w18_small', 'maconv', 'pointwise', {}),
    ('rexnet_100', 'mdconv', 'pointwise', {}),
    ('mixnet_s', 'maconv', 'pointwise', {}),
    ('efficientvit_b0', 'mdconv', 'pointwise', {}),  # LiteMLA is an fx leaf with convs inside
    ('mobilevit_xxs', 'maconv', 'pointwise', {}),
    ('resnest14d', 'se', 'pointwise', {}),
    ('ese_vovnet19b_slim_dw', 'mdconv', 'pointwise', {}),
    ('gernet_s', 'maconv', 'spatial', {}),
    ('torchvision:shufflenet_v2_x0_5', 'mdconv', 'pointwise', {}),
    ('torchvision:mobilenet_v3_small', 'dyconv', 'pointwise', {}),
    ('torchvision:resnet18', 'maconv', 'spatial', {}),
]


BN_AFTER_CONV = {'resnet10t', 'mobilenetv3_large_100', 'efficientnet_b0', 'lcnet_050', 'repvgg_a0', 'cspresnet50',
                 'hrnet_w18_small', 'mixnet_s', 'mobilevit_xxs', 'gernet_s', 'torchvision:resnet18'}


@pytest.mark.parametrize('name,kind,select,kw', REPRESENTATIVE, ids=[r[0] for r in REPRESENTATIVE])
def test_compact_equals_expanding(name, kind, select, kw):
    """Compact equals expanding (eval), with BN statistics calibrated on the input (DCD too: with arbitrary BN
    statistics its ungated m×m attention grew random-weight deep nets until float32 overflowed)."""
    model = build(name, **kw).eval()
    x = small_input()
    layer_kwargs = {'m': 8} if kind in ('mdconv', 'maconv', 'dcd') else {}
    model, p = convert_with_plan(model, kind, select=select, example_inputs=x[:1], init='fresh', **layer_kwargs)
    assert len(p.replace) > 0
    calibrate_bn(model, x)
    with torch.no_grad():
        expanding = model(x)
        model, folded, notes = compact_with_notes(model)
        compacted = model(x)
    assert not any(isinstance(m, tuple(LAYERS.values())) and not getattr(m, 'deploy', True)
                   for m in model.modules())
    assert relative_diff(expanding, compacted) <= 1e-4, (name, kind)
    if kind == 'maconv' and name in BN_AFTER_CONV:
        assert folded, 'a converted conv followed by a BN should have its bias folded'


def test_representative_set_is_broad():
    families = {r[0].split('_')[0].rstrip('0123456789').split(':')[-1] for r in REPRESENTATIVE}
    assert len(REPRESENTATIVE) >= 25 and len(families) >= 12


@functools.lru_cache(maxsize=None)
def _paper(name, kind, select='pointwise', **kw):
    m = build(name).eval()
    if kind != 'static':
        convert(m, kind, select=select, **kw)
        compact(m)
    return count_params(m) / 1e6, count_macs(m) / 1e6


def test_paper_table1_numbers():
    """Table 1 (params ×1e6 / MACs ×1e6, compact form, 224×224). MDConv's MACs are the paper's count with the
    per-sample weight generation of Eq. 6 (path='weight'); path='auto' is cheaper."""
    approx = lambda got, want, tol: abs(got - want) <= tol  # noqa: E731
    expected = {
        ('mobilenetv2_100', 'static'): (3.5, 300), ('mobilenetv2_100', 'maconv'): (3.5, 300),
        ('mobilenetv2_100', 'dyconv'): (9.8, 308), ('mobilenetv2_100', 'mdconv'): (5.0, 335),
        ('mobilenetv2_050', 'static'): (2.0, 97), ('mobilenetv2_050', 'maconv'): (2.0, 97),
        ('mobilenetv2_050', 'dyconv'): (3.6, 99), ('mobilenetv2_050', 'mdconv'): (2.4, 106),
    }
    for (name, kind), (params, macs) in expected.items():
        kw = {'path': 'weight'} if kind == 'mdconv' else {}
        got_p, got_m = _paper(name, kind, **kw)
        assert approx(got_p, params, 0.07) and approx(got_m, macs, 0.01 * macs + 1), (name, kind, got_p, got_m)
    # MAConv is exactly free at inference
    assert _paper('mobilenetv2_100', 'maconv') == _paper('mobilenetv2_100', 'static')
    # the default compact path never costs more than the paper's weight-generation count
    assert _paper('mobilenetv2_100', 'mdconv')[1] <= _paper('mobilenetv2_100', 'mdconv', path='weight')[1]


def test_mmpretrain_config_traces_with_its_default_mode():
    """An mmpretrain ImageClassifier branches on ``mode``; the analysis fixes it at its default and traces."""
    m = build('configs/imagenet/mobilenet_v2_x05_static.py')
    p = plan(m, example_inputs=small_input(1))
    assert p.traced and len(p.replace) == 33 and p.head == 'backbone.conv2.conv'


class _ReadsWeight(nn.Module):
    """A model whose code reads a conv's weight itself (as timm's XCiT/EdgeNeXt positional encodings do)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.pw(self.stem(x))
        return self.proj(x.to(self.proj.weight.dtype))


def test_a_conv_whose_weight_the_model_reads_is_kept_with_the_reason():
    model = _ReadsWeight()
    p = plan(model, 'mdconv', keep_stem=False, keep_head=False, example_inputs=torch.randn(1, 3, 8, 8))
    assert [d.name for d in p.replace] == ['pw']
    reason = next(d.reason for d in p.skip if d.name == 'proj')
    assert 'reads its weight directly' in reason
    convert(model, "mdconv", keep_stem=False, keep_head=False, example_inputs=torch.randn(1, 3, 8, 8))
    assert type(model.proj) is nn.Conv2d and model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 8, 8)


def test_converting_a_converted_model_never_looks_inside_its_layers():
    """Issue 15 item 5: the branch convs inside mdplug layers are not convs of the model."""
    model = convert(build('mobilenetv2_050'), 'maconv', m=4, example_inputs=small_input(1))
    layers = [n for n, m in model.named_modules() if isinstance(m, MAConv2d)]
    with pytest.raises(NothingToConvert, match=r'already converted: it holds 33 mdplug layers \(MAConv2d ×33\).*'
                                               r'compact it'):
        convert(model, 'mdconv', example_inputs=small_input(1))
    p = plan(model, select='all', keep_stem=False, keep_head=False, example_inputs=small_input(1))
    assert not any(d.name.startswith(tuple(f'{n}.' for n in layers)) for d in p.decisions)
    assert [n for n, m in model.named_modules() if isinstance(m, MAConv2d)] == layers
    compact(model)  # and the model still compacts
    assert not any(isinstance(m, MAConv2d) for m in model.modules())


def test_an_example_input_that_does_not_run_is_an_error():
    """Issue 15 item 4: no silent fallback to 'shapes unknown' (which converted MobileNetV3's SE gates)."""
    m = build('mobilenetv3_small_050')
    with pytest.raises(ValueError, match=r'example input 1×1×64×64 does not run through MobileNetV3 .*its first conv '
                                         r'takes 3 input channels.*input_shape'):
        plan(m, example_inputs=torch.randn(1, 1, 64, 64))
    import mdplug.mmpretrain  # noqa: F401 - registers mdplug.Converted
    from mmpretrain.registry import MODELS
    with pytest.raises(ValueError, match=r'example input 1×1×64×64 does not run through MobileNetV3'):
        MODELS.build(dict(type='mdplug.Converted', backbone=dict(type='MobileNetV3', arch='small'), kind='mdconv',
                          input_shape=(1, 64, 64)))
