"""BatchNorms put in eval mode while the model trains (mmpretrain's ``norm_eval=True``, ``bn.eval()``): the layers
honour each BN's own mode exactly as ``nn.BatchNorm2d`` does (running statistics used and left unchanged), the
fused training path included."""
import copy

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from mdplug.nn import MAConv2d, MDConv2d

pytestmark = pytest.mark.usefixtures('one_thread')


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def _plain(model):
    """The same model with every fused training path turned off (plain autograd through the BN modules)."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, (MAConv2d, MDConv2d)):
            m.fuse_training_tail = False
    return plain


def _step(model, x):
    y = model(x)
    y = y[-1] if isinstance(y, (tuple, list)) else y
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('cls', [MDConv2d, MAConv2d])
@pytest.mark.parametrize('k,p,q', [(1, 8, 24), (1, 12, 8), (3, 8, 12)])
@pytest.mark.parametrize('which', ['expand_bn', 'project_bn', 'both'])
def test_a_bn_in_eval_mode_is_honoured_in_train_mode(cls, k, p, q, which):
    layer = randomize_bn(cls(p, q, k, padding=k // 2, m=6)).double().train()
    for name in (['expand_bn', 'project_bn'] if which == 'both' else [which]):
        getattr(layer, name).eval()
    plain = _plain(layer)
    before = _bn_state(layer)
    x = torch.randn(4, p, 6, 6, dtype=torch.float64)
    y, grads = _step(layer, x)
    y_ref, grads_ref = _step(plain, x)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-10, atol=1e-12), n
    after, after_ref = _bn_state(layer), _bn_state(plain)
    for key in before:
        assert torch.equal(after[key], after_ref[key]), key
        frozen = which == 'both' or key.startswith(which)
        assert torch.equal(after[key], before[key]) == frozen, key


def _mmpretrain_registry():
    """mmpretrain's model registry with mdplug's modules registered, in its default scope."""
    pytest.importorskip('mmpretrain')
    import mdplug.mmpretrain  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS


def _mmpretrain_models():
    MODELS = _mmpretrain_registry()
    resnet = MODELS.build(dict(type='ResNet', depth=18, conv_cfg=dict(type='MDConv2d'), norm_eval=True))
    mobilenet = MODELS.build(dict(type='mdplug.Converted', kind='maconv', select='pointwise', input_shape=(3, 32, 32),
                                  backbone=dict(type='MobileNetV2', widen_factor=0.35, norm_eval=True)))
    return {'resnet18-mdconv': resnet, 'mobilenetv2-maconv': mobilenet}


@pytest.mark.parametrize('name', ['resnet18-mdconv', 'mobilenetv2-maconv'])
def test_mmpretrain_norm_eval_keeps_running_statistics_and_uses_them(name):
    model = randomize_bn(_mmpretrain_models()[name])
    model.train()
    layers = [m for m in model.modules() if isinstance(m, (MAConv2d, MDConv2d))]
    assert len(layers) >= 20 and all(m.training and not m.expand_bn.training for m in layers)
    before = _bn_state(model)
    x = torch.randn(2, 3, 32, 32)
    y, grads = _step(model, x)
    assert all(torch.equal(v, before[k]) for k, v in _bn_state(model).items())
    # the BNs normalise by running statistics: what the eval-mode model computes, and the plain path's gradients
    model.eval()  # (mmpretrain's backbones' train() returns None)
    with torch.no_grad():
        y_eval = model(x)[-1]
    assert torch.allclose(y, y_eval, rtol=1e-5, atol=1e-6)
    plain = _plain(model)
    plain.train()
    y_ref, grads_ref = _step(plain, x)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for n in grads_ref:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6), n
    # without norm_eval the same layers train their BNs (the fused path runs and moves the statistics)
    model.norm_eval = False
    model.train()
    _step(model, x)
    assert not all(torch.equal(v, before[k]) for k, v in _bn_state(model).items() if 'expand_bn' in k)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_bns_without_running_statistics_use_batch_statistics_in_either_mode(mode):
    """``track_running_stats=False``: nn.BatchNorm2d normalises by the batch's statistics in train and eval mode;
    the fused path does not take such BNs, the plain path calls them."""
    layer = MDConv2d(8, 24, 1, m=6).double().train()
    for bn in (layer.expand_bn, layer.project_bn):
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        bn.train(mode == 'train')
    assert not layer._use_fused_tail()
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    y, grads = _step(layer, x)
    y_ref, grads_ref = _step(_plain(layer), x)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    reference = nn.BatchNorm2d(24, track_running_stats=False).double()
    z0 = layer.expand(x)[:, :24]
    assert not torch.allclose(y, reference(z0))  # (the dynamic branch adds to BN0's output)


def test_fused_path_still_runs_when_bns_train():
    layer = MDConv2d(8, 24, 1, m=6).train()
    assert layer._use_fused_tail()
    layer.expand_bn.eval()
    assert not layer._use_fused_tail()
    nn.Module.train(layer)  # both BNs back in train mode
    assert layer._use_fused_tail()


@pytest.mark.parametrize('kind', ['mdconv', 'maconv'])
def test_mmpretrain_frozen_stages_freeze_the_converted_layers_in_them(kind):
    """mmpretrain's ``frozen_stages`` runs in the backbone's ``train()``, after the conversion: the new layers of
    the frozen stages get no gradients and keep their BN statistics; the later stages train."""
    model = randomize_bn(_mmpretrain_registry().build(dict(
        type='mdplug.Converted', kind=kind, select='pointwise', input_shape=(3, 32, 32),
        backbone=dict(type='MobileNetV2', widen_factor=0.35, frozen_stages=2))))
    model.train()
    frozen = [m for stage in (model.layer1, model.layer2) for m in stage.modules()
              if isinstance(m, (MAConv2d, MDConv2d))]
    later = [m for m in model.layer3.modules() if isinstance(m, (MAConv2d, MDConv2d))]
    assert len(frozen) >= 3 and later
    before = {id(m): _bn_state(m) for m in frozen}
    _step(model, torch.randn(2, 3, 32, 32))
    for m in frozen:
        assert not m.training and all(p.grad is None and not p.requires_grad for p in m.parameters())
        assert all(torch.equal(v, before[id(m)][k]) for k, v in _bn_state(m).items())
    assert all(m.training and all(p.grad is not None for p in m.parameters() if p.requires_grad) for m in later)
