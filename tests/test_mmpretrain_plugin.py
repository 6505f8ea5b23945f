"""The mmpretrain plug-in: registered layers, ``mdplug.Converted``, initialisation, backbones, the temperature hook."""
import pytest
import torch
from torch import nn

pytest.importorskip('mmpretrain')
from mmcv.cnn import ConvModule, build_conv_layer  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

import mdplug.mmpretrain  # noqa: E402,F401
from mdplug.mmpretrain import TemperatureAnnealHook, compact_classifier  # noqa: E402
from mdplug.nn import LAYERS, DYConv2d, MAConv2d, MDConv2d  # noqa: E402


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(autouse=True)
def _scope():
    init_default_scope('mmpretrain')


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_build_conv_layer_and_conv_module_find_the_layers(kind):
    cls = LAYERS[kind]
    conv = build_conv_layer(dict(type=cls.__name__), 16, 24, 1)
    assert isinstance(conv, cls)
    module = ConvModule(16, 24, 1, conv_cfg=dict(type=cls.__name__), norm_cfg=dict(type='BN'))
    assert isinstance(module.conv, cls)
    assert module(torch.randn(2, 16, 8, 8)).shape == (2, 24, 8, 8)


def test_layer_keywords_pass_through_conv_cfg():
    conv = build_conv_layer(dict(type='MDConv2d', m=12, gate='softmax'), 16, 24, 1)
    assert conv.m == 12


def converted(backbone, kind='mdconv', **kwargs):
    return MODELS.build(dict(type='mdplug.Converted', backbone=backbone, kind=kind, **kwargs))


def test_converted_backbone_keeps_its_class_and_unconverted_keys():
    static = MODELS.build(dict(type='MobileNetV2', widen_factor=0.5))
    model = converted(dict(type='MobileNetV2', widen_factor=0.5), 'maconv', m=8)
    assert type(model).__name__ == 'MobileNetV2'
    assert any(isinstance(m, MAConv2d) for m in model.modules())
    keys = set(model.state_dict())
    # the stem, depthwise convs, BNs and the head conv are untouched
    for key in ('conv1.conv.weight', 'layer2.0.conv.1.conv.weight', 'layer2.0.conv.1.bn.weight', 'conv2.conv.weight'):
        assert key in keys and key in static.state_dict()
    # the pointwise convs (expansion and projection) were replaced
    assert isinstance(model.layer2[0].conv[0].conv, MAConv2d)
    assert isinstance(model.layer2[0].conv[2].conv, MAConv2d)


@pytest.mark.parametrize('backbone, select', [
    (dict(type='MobileNetV2', widen_factor=0.5), 'pointwise'),
    (dict(type='ShuffleNetV2', widen_factor=0.5), 'pointwise'),
    (dict(type='ResNet', depth=18), 'spatial'),
])
def test_init_weights_leaves_mdplug_layers_as_they_initialise_themselves(backbone, select, monkeypatch):
    """The backbones' ``init_weights`` walk every ``nn.Conv2d``/BN (ShuffleNetV2 sets BN bias 1e-4, normal conv
    init); afterwards every mdplug layer has been reset by its own ``reset_parameters``."""
    model = converted(backbone, 'mdconv', select=select, m=8, init='fresh')
    layers = [m for m in model.modules() if isinstance(m, MDConv2d)]
    assert layers
    calls = []
    original = MDConv2d.reset_parameters
    monkeypatch.setattr(MDConv2d, 'reset_parameters', lambda self: (calls.append(self), original(self))[1])
    model.init_weights()
    assert {id(m) for m in calls} == {id(m) for m in layers}
    for layer in layers:
        for bn in layer.modules():
            if isinstance(bn, nn.BatchNorm2d):
                assert torch.all(bn.bias == 0) and torch.all(bn.weight == 1)


def test_init_weights_of_a_converted_copy_resets_the_copy():
    import copy
    model = converted(dict(type='ShuffleNetV2', widen_factor=0.5), 'mdconv', m=8, init='fresh')
    clone = copy.deepcopy(model)
    clone.init_weights()
    layer = next(m for m in clone.modules() if isinstance(m, MDConv2d))
    assert all(torch.all(bn.bias == 0) for bn in layer.modules() if isinstance(bn, nn.BatchNorm2d))


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(KeyError, match=r"unknown kind 'mdconvv'.*choose one of"):
        converted(dict(type='SmallNet'), 'mdconvv', input_shape=(3, 32, 32))


def test_mobilenet_v2_cifar_ends_at_4x4_down_to_width_0_1():
    for width in (0.1, 0.35, 1.0):
        net = MODELS.build(dict(type='MobileNetV2CIFAR', widen_factor=width))
        assert net(torch.randn(2, 3, 32, 32))[0].shape[-2:] == (4, 4)
    grey = MODELS.build(dict(type='MobileNetV2CIFAR', widen_factor=0.35, in_channels=1))
    assert grey(torch.randn(2, 1, 32, 32))[0].shape == (2, 1280, 4, 4)


def test_smallnet_matches_section_4_5():
    net = MODELS.build(dict(type='SmallNet', widen_factor=2))
    assert net.stem.conv.out_channels == 16  # the width multiplier spares the stem
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    shapes = [(c.out_channels, c.kernel_size, c.stride, c.groups) for c in convs]
    assert shapes == [(16, (3, 3), (1, 1), 1),
                      (32, (1, 1), (1, 1), 1), (32, (3, 3), (2, 2), 32),
                      (64, (1, 1), (1, 1), 1), (64, (3, 3), (2, 2), 64),
                      (128, (1, 1), (1, 1), 1), (128, (3, 3), (2, 2), 128)]
    assert all(isinstance(m.bn, nn.BatchNorm2d) and isinstance(m.activate, nn.ReLU)
               for m in net.modules() if isinstance(m, ConvModule))
    assert net(torch.randn(2, 3, 32, 32))[0].shape == (2, 128, 4, 4)


def test_compact_maconv_classifier_has_the_static_keys():
    cfg = dict(type='ImageClassifier', backbone=dict(type='SmallNet'), neck=dict(type='GlobalAveragePooling'),
               head=dict(type='LinearClsHead', num_classes=10, in_channels=64))
    static = MODELS.build(cfg)
    model = MODELS.build(dict(cfg, backbone=dict(type='mdplug.Converted', backbone=cfg['backbone'], kind='maconv',
                                                 input_shape=(3, 32, 32))))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    compact_classifier(model)
    assert set(model.state_dict()) == set(static.state_dict())
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class _Runner:
    def __init__(self, model, iters_per_epoch):
        from mmengine.logging import MessageHub
        self.model = model
        self.train_dataloader = range(iters_per_epoch)
        self.iter = 0
        self.message_hub = MessageHub.get_instance('test_temperature')


def test_temperature_anneals_linearly_then_holds():
    model = nn.Sequential(DYConv2d(8, 8, 1, temperature=30.0), DYConv2d(8, 8, 1, temperature=30.0))
    seen = []
    for layer in model:
        layer.set_temperature = lambda t, seen=seen: seen.append(t)
    hook = TemperatureAnnealHook(start=30, end=1, epochs=10)
    runner = _Runner(model, iters_per_epoch=4)
    for it, expected in ((0, 30.0), (20, 30 - 29 * 0.5), (40, 1.0), (400, 1.0)):
        runner.iter = it
        seen.clear()
        hook.before_train_iter(runner, 0)
        assert seen == [pytest.approx(expected)] * 2


def test_temperature_hook_reaches_real_dyconv_layers():
    model = MODELS.build(dict(type='mdplug.Converted', backbone=dict(type='SmallNet'), kind='dyconv',
                              input_shape=(3, 32, 32), temperature=30.0, init='fresh'))
    assert TemperatureAnnealHook.set_temperature(model, 7.0) == 3
    layer = next(m for m in model.modules() if isinstance(m, DYConv2d)).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        before = layer(x)
        TemperatureAnnealHook.set_temperature(model, 30.0)
        assert not torch.allclose(before, layer(x))
