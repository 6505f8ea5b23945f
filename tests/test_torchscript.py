"""``torch.jit.script`` of converted models: the compact forms (and DYConv, SE) script through the layers'
``__prepare_scriptable__`` twins and compute the eager function; the expanding forms refuse with an error that
names the layer and the routes that work.  Also timm's own TorchScript test recipe."""
import copy
import warnings

import pytest
import torch

import mdplug
from conftest import randomize_bn
from mdplug.nn import LAYERS, MDPLUG_LAYERS

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.filterwarnings('ignore::FutureWarning')]

GEOMETRIES = [dict(kernel_size=1), dict(kernel_size=1, stride=2), dict(kernel_size=3, padding=1),
              dict(kernel_size=3, padding=1, stride=2, dilation=1), dict(kernel_size=3, padding='same'),
              dict(kernel_size=3, padding=2, dilation=2)]
VARIANTS = [('mdconv', dict(bypass=False)), ('mdconv', dict(norm='none', bias=False)), ('dcd', dict(norm='sum')),
            ('mdconv', dict(gate='softmax', temperature=5.0)), ('dyconv', dict(groups=2, bias=False)),
            ('se', dict(groups=4)), ('dyconv', dict(path='factorized'))]


def _compact_layer(kind, kw, p=8):
    layer = randomize_bn(LAYERS[kind](p, 12, **kw))
    layer.switch_to_deploy()
    return layer.eval()


@pytest.mark.parametrize('kind,kw', [(k, g) for k in LAYERS for g in GEOMETRIES]
                         + [(k, dict(kernel_size=3, padding=1, **v)) for k, v in VARIANTS])
def test_compact_layers_script_and_compute_the_eager_function(kind, kw, tmp_path):
    layer = _compact_layer(kind, kw)
    scripted = torch.jit.script(copy.deepcopy(layer))
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert set(scripted.state_dict()) == set(layer.state_dict())
    path = tmp_path / 'layer.pt'
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        for t in (x, x[:1], x.contiguous(memory_format=torch.channels_last)):
            expected = layer(t)
            torch.testing.assert_close(scripted(t), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['mdconv', 'maconv', 'dcd'])
def test_expanding_forms_refuse_naming_the_layer_and_the_supported_routes(kind):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), LAYERS[kind](8, 8, 3, padding=1))
    with pytest.raises(RuntimeError) as err:
        torch.jit.script(model)
    message = str(err.value)
    assert type(model[1]).__name__ in message and 'expanding (training) form' in message
    assert 'mdplug.compact(model)' in message and 'torch.export.export' in message and 'torch.onnx.export' in message


def test_scripting_a_model_keeps_its_parameters():
    """TorchScript's protocol puts the twins into the scripted model itself; they hold the same tensors, so the
    eager model computes what it did and a state_dict of either loads into the other."""
    model = torch.nn.Sequential(_compact_layer('mdconv', dict(kernel_size=3, padding=1)),
                                _compact_layer('dyconv', dict(kernel_size=1), p=12))
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(model(x), expected)
    for n, p in model.named_parameters():
        assert p is params[n]
    fresh = torch.nn.Sequential(_compact_layer('mdconv', dict(kernel_size=3, padding=1)),
                                _compact_layer('dyconv', dict(kernel_size=1), p=12))
    fresh.load_state_dict(scripted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


@pytest.mark.parametrize('name', ['mobilenetv2_050_mdconv', 'mobilenetv2_050_dcd', 'mobilenetv2_050_maconv',
                                  'resnet18_dyconv', 'resnet18_se'])
def test_timm_torchscript_recipe_on_compact_models(name):
    """timm's tests/test_models.py ``test_model_forward_torchscript`` (``torch.jit.script`` of the model in eval
    mode), after ``timm.utils.reparameterize_model``."""
    import timm
    from timm.utils import reparameterize_model

    model = reparameterize_model(randomize_bn(timm.create_model(name, num_classes=10))).eval().double()
    assert any(isinstance(m, MDPLUG_LAYERS) for m in model.modules()) or 'maconv' in name
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # (exact to rounding; float32 amplifies DCD's through 17 layers)
    with torch.no_grad():
        expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scripted = torch.jit.script(copy.deepcopy(model))
        torch.testing.assert_close(scripted(x), expected, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(scripted(x[:1]), expected[:1], rtol=1e-9, atol=1e-10)
    assert mdplug.MDConv2d not in {type(m) for m in model.modules()} or 'mdconv' in name
