"""``init='preserve' | 'fresh'`` (issue 16): a converted trained model computes what it did; from-scratch layers are
built fresh, DYConv's experts drawn independently."""
import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import randomize_bn, rel_err
from torch import nn

import mdplug
from mdplug.nn import DYConv2d, MAConv2d, MDConv2d, SEConv2d
from mdplug.nn._multilayer import MultiLayerConv

pytestmark = pytest.mark.usefixtures('one_thread')

KINDS = ('maconv', 'mdconv', 'dcd', 'dyconv', 'se')
#: three timm families and one torchvision model, each with the select rule that reaches most of its convs
MODELS = {
    'resnet18': (lambda: timm.create_model('resnet18', num_classes=10), 'all'),
    'mobilenetv2_050': (lambda: timm.create_model('mobilenetv2_050', num_classes=10), 'pointwise'),
    'regnetx_002': (lambda: timm.create_model('regnetx_002', num_classes=10), 'all'),
    'torchvision:mobilenet_v3_small': (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 'pointwise'),
}
SIZE = 64


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics of every BN set to those of ``x`` (one train-mode pass, cumulative average): a model whose
    BN statistics describe its data, as after training."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model


def converted(name, kind, init='preserve', **kwargs):
    build, select = MODELS[name]
    static = randomize_bn(build()).eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    model = mdplug.convert(copy.deepcopy(static), kind, select=select, init=init, example_inputs=x[:1], **kwargs)
    return static, model, x


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('name', list(MODELS))
def test_preserve_computes_what_the_trained_model_did_in_eval_mode(name, kind):
    static, model, x = converted(name, kind)
    assert sum(isinstance(m, mdplug.LAYERS[kind]) for m in model.modules()) >= 3
    with torch.no_grad():
        err = rel_err(model.eval()(x), static(x))
    assert err <= 1e-5, f'{name} {kind}: relative error {err:.2g}'


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('name', ['resnet18', 'mobilenetv2_050'])
def test_preserve_first_training_step_has_the_original_loss(name, kind):
    """Train mode: BN0's batch normalisation is undone by the BN that follows each converted conv (BN0 starts with
    that BN's running statistics); measured ≤ 1e-5 relative on a model whose BN statistics describe the data."""
    build, select = MODELS[name]
    x, target = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 10, (8,))
    static = calibrate_bn(randomize_bn(build()), x)
    model = mdplug.convert(copy.deepcopy(static), kind, select=select, example_inputs=x[:1]).train()
    static.train()
    loss = F.cross_entropy(model(x), target)
    expected = F.cross_entropy(static(x), target)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    loss.backward()  # every new parameter that can learn at step one has a gradient
    layer = next(m for m in model.modules() if isinstance(m, mdplug.LAYERS[kind]))
    if isinstance(layer, MultiLayerConv):
        assert layer.project_bn.weight.grad.abs().sum() > 0  # the silenced branch opens from the first step
    else:
        assert layer.attention.fc2.weight.grad.abs().sum() > 0


def test_preserve_bn0_starts_with_the_following_bns_statistics():
    static, model, _ = converted('mobilenetv2_050', 'mdconv')
    conv = static.blocks[1][0].conv_pw
    bn = static.blocks[1][0].bn1
    layer = model.blocks[1][0].conv_pw
    q = layer.out_channels
    torch.testing.assert_close(layer.W0, conv.weight)
    torch.testing.assert_close(layer.expand_bn.running_var[:q], bn.running_var)
    torch.testing.assert_close(layer.expand_bn.weight[:q], torch.sqrt(bn.running_var + layer.expand_bn.eps))
    assert torch.all(layer.project_bn.weight == 0) and torch.all(layer.project_bn.bias == 0)
    # W1, W2 and the attention are fresh, not zero: they learn once the branch opens
    assert layer.W1.abs().sum() > 0 and layer.W2.abs().sum() > 0


@pytest.mark.parametrize('norm', ['branch', 'sum', 'none'])
@pytest.mark.parametrize('cls', [MAConv2d, MDConv2d])
def test_preserve_is_exact_for_every_norm_and_in_compact_form(cls, norm):
    conv = nn.Conv2d(6, 10, 3, 1, 1, bias=True).eval()
    x = torch.randn(3, 6, 8, 8)
    layer = cls.from_conv(conv, norm=norm, m=4).eval()
    assert rel_err(layer(x), conv(x)) <= 1e-6
    assert rel_err(layer.fuse()(x), conv(x)) <= 1e-6
    deployed = cls.from_conv(conv, m=4, deploy=True).eval()
    assert rel_err(deployed(x), conv(x)) <= 1e-6


def test_preserve_without_a_bypass_is_refused():
    with pytest.raises(ValueError, match=r"bypass=False.*init='preserve'.*use init='fresh'"):
        MDConv2d.from_conv(nn.Conv2d(4, 4, 1), bypass=False)
    model = timm.create_model('mobilenetv2_050')
    with pytest.raises(ValueError, match=r"cannot convert blocks\..*bypass=False"):
        mdplug.convert(model, 'maconv', bypass=False)
    assert mdplug.convert(model, 'maconv', bypass=False, init='fresh') is model


@pytest.mark.parametrize('bad', ['keep', None, 'Preserve'])
def test_unknown_init_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"init=.* is unknown; use 'preserve' .* or 'fresh'"):
        mdplug.convert(timm.create_model('mobilenetv2_050'), 'mdconv', init=bad)
    with pytest.raises(ValueError, match=r"init=.* is unknown"):
        DYConv2d.from_conv(nn.Conv2d(4, 4, 1), init=bad)
    if bad is not None:  # (timm drops keyword arguments that are None)
        with pytest.raises(ValueError, match=r"mobilenetv2_050_mdconv: init=.* is unknown"):
            timm.create_model('mobilenetv2_050_mdconv', init=bad)


def pairwise_relative_distances(layer: DYConv2d):
    experts = layer.experts.detach().flatten(1)
    scale = experts.norm(dim=1).mean()
    return [float((experts[i] - experts[j]).norm() / scale) for i, j in itertools.combinations(range(len(experts)), 2)]


def test_fresh_dyconv_experts_are_drawn_independently():
    static = timm.create_model('mobilenetv2_050')
    for model in (mdplug.convert(copy.deepcopy(static), 'dyconv', init='fresh'),
                  timm.create_model('mobilenetv2_050_dyconv')):  # the timm entry points default to 'fresh'
        layers = [m for m in model.modules() if isinstance(m, DYConv2d)]
        assert len(layers) > 10
        for layer in layers:
            # independent draws of equal variance are sqrt(2) apart relative to their norm
            assert min(pairwise_relative_distances(layer)) > 1.0
    conv, layer = static.blocks[1][0].conv_pw, model.blocks[1][0].conv_pw
    assert all(not torch.allclose(expert, conv.weight) for expert in layer.experts)


def test_preserve_dyconv_experts_differ_and_average_to_the_kernel():
    conv = nn.Conv2d(16, 24, 1, bias=True)
    layer = DYConv2d.from_conv(conv)
    assert min(pairwise_relative_distances(layer)) > 0.5  # not identical experts: they can separate
    torch.testing.assert_close(layer.experts.mean(0), conv.weight)
    torch.testing.assert_close(layer.bias.mean(0), conv.bias)
    x = torch.randn(3, 16, 5, 5)
    assert rel_err(layer(x), conv(x)) <= 1e-6  # π(x) starts uniform: the deviation is float rounding
    # one step of training moves the attention off uniform, and the experts then get different gradients
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    grads = layer.weight.grad
    assert min(float((grads[i] - grads[j]).norm()) for i, j in itertools.combinations(range(4), 2)) > 0


def test_preserve_se_is_exact():
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=True)
    x = torch.randn(2, 8, 6, 6)
    layer = SEConv2d.from_conv(conv)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)


def test_fresh_keeps_w0_and_builds_the_rest_as_the_layer_does():
    conv = nn.Conv2d(8, 12, 1)
    layer = MDConv2d.from_conv(conv, init='fresh', m=4)
    torch.testing.assert_close(layer.W0, conv.weight)
    assert torch.all(layer.project_bn.weight == 1)  # a fresh BN, not silenced
    se = SEConv2d.from_conv(conv, init='fresh')
    torch.testing.assert_close(se.conv.weight, conv.weight)
    assert se.attention.fc2.weight.abs().sum() > 0


def test_timm_entry_point_with_pretrained_weights_preserves_them(tmp_path):
    static = randomize_bn(timm.create_model('mobilenetv2_050')).eval()
    path = tmp_path / 'static.pth'
    torch.save(static.state_dict(), path)
    x = torch.randn(2, 3, SIZE, SIZE)
    model = timm.create_model('mobilenetv2_050_mdconv', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              init='preserve').eval()
    with torch.no_grad():
        assert rel_err(model(x), static(x)) <= 1e-5


def test_preserved_maconv_fine_tuned_and_compacted_loads_strictly_into_the_original():
    build, select = MODELS['mobilenetv2_050']
    static = randomize_bn(build()).eval()
    x, target = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 10, (8,))
    model = mdplug.convert(copy.deepcopy(static), 'maconv', select=select, example_inputs=x[:1]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    layer = next(m for m in model.modules() if isinstance(m, MAConv2d))
    assert layer.project_bn.weight.abs().sum() > 0  # the branch has opened: the compact kernel is not W0
    # (a few steps at this rate leave the random model so ill-conditioned that float32 itself differs from float64
    # by ~1e-3: the fold is checked in float64)
    model.eval().double()
    with torch.no_grad():
        expected = model(x.double())
    compact = mdplug.compact(model)
    target_model = build().double()
    target_model.load_state_dict(compact.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(target_model.eval()(x.double()), expected) <= 1e-9


def test_cli_init_option(tmp_path, mdplug_cli):
    """``mdplug convert --init``: 'preserve' by default, 'fresh' on request (DYConv's experts then independent)."""
    from mdplug.cli import _parser
    assert _parser().parse_args(['convert', '--model', 'resnet18']).init == 'preserve'
    out = tmp_path / 'fresh.pth'
    r = mdplug_cli('convert', '--model', 'mobilenetv2_050', '--kind', 'dyconv', '--init', 'fresh', '--input-size', '3',
                   '32', '32', '--out', out, '--json')
    assert r.returncode == 0, r.stderr
    state = torch.load(out, weights_only=True)['state_dict']
    layer = DYConv2d(8, 48, 1, bias=False)
    layer.load_state_dict({k[len('blocks.1.0.conv_pw.'):]: v for k, v in state.items()
                           if k.startswith('blocks.1.0.conv_pw.')})
    assert min(pairwise_relative_distances(layer)) > 1.0
    bad = mdplug_cli('convert', '--model', 'mobilenetv2_050', '--init', 'keep')
    assert bad.returncode == 2 and "--init: invalid choice: 'keep'" in bad.stderr
