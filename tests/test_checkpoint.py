"""mdplug.save → mdplug.load round trips: every torchvision classification family and a timm sample read back."""
import collections
import warnings

import pytest
import timm
import torch
import torchvision

import mdplug
from mdplug.convert import build_model, save
from mdplug.convert.checkpoint import read

pytestmark = pytest.mark.usefixtures('one_thread')

#: one small member per torchvision classification family (module), with the input and the model keywords it takes
TORCHVISION = {
    'torchvision.models.alexnet': ('alexnet', 64, {'num_classes': 10}),
    'torchvision.models.convnext': ('convnext_tiny', 64, {'num_classes': 10}),
    'torchvision.models.densenet': ('densenet121', 64, {'num_classes': 10}),
    'torchvision.models.efficientnet': ('efficientnet_b0', 64, {'num_classes': 10}),
    'torchvision.models.googlenet': ('googlenet', 64, {'num_classes': 10, 'aux_logits': False,
                                                       'init_weights': False}),
    'torchvision.models.inception': ('inception_v3', 96, {'num_classes': 10, 'aux_logits': False,
                                                          'init_weights': False}),
    'torchvision.models.maxvit': ('maxvit_t', 224, {'num_classes': 10}),
    'torchvision.models.mnasnet': ('mnasnet0_5', 64, {'num_classes': 10}),
    'torchvision.models.mobilenetv2': ('mobilenet_v2', 64, {'num_classes': 10}),
    'torchvision.models.mobilenetv3': ('mobilenet_v3_small', 64, {'num_classes': 10}),
    'torchvision.models.regnet': ('regnet_x_400mf', 64, {'num_classes': 10}),
    'torchvision.models.resnet': ('resnet18', 64, {'num_classes': 10}),
    'torchvision.models.shufflenetv2': ('shufflenet_v2_x0_5', 64, {'num_classes': 10}),
    'torchvision.models.squeezenet': ('squeezenet1_1', 64, {'num_classes': 10}),
    'torchvision.models.swin_transformer': ('swin_t', 64, {'num_classes': 10}),
    'torchvision.models.vgg': ('vgg11', 64, {'num_classes': 10}),
    'torchvision.models.vision_transformer': ('vit_b_16', 64, {'num_classes': 10, 'image_size': 64}),
}
TIMM = [('resnet18', 64), ('mobilenetv3_small_050', 64), ('efficientnet_b0', 64), ('regnetx_002', 64),
        ('ghostnet_050', 64)]


def test_the_table_names_every_torchvision_classification_family():
    families = collections.defaultdict(list)
    for name in torchvision.models.list_models(module=torchvision.models):
        families[torchvision.models.get_model_builder(name).__module__].append(name)
    assert set(families) == set(TORCHVISION)
    assert all(name in families[module] for module, (name, _, _) in TORCHVISION.items())


def _round_trip(tmp_path, name, size, model_kwargs, select):
    model = build_model(name, **model_kwargs).eval()
    x = torch.randn(2, 3, size, size)
    kw = dict(select=select, keep_stem=select == 'pointwise', keep_head=select == 'pointwise')
    mdplug.convert(model, 'maconv', example_inputs=x[:1], m=4, **kw)
    names = model._mdplug_converted
    path, compact_path = tmp_path / 'e.pth', tmp_path / 'c.pth'
    save(model, str(path), dict(model=name, model_kwargs=model_kwargs, kind='maconv', form='expanding',
                                       options=dict(kw, layer_kwargs={'m': 4})))
    raw = read(str(path))
    assert raw['meta']['converted'] == names and hasattr(raw['state_dict'], '_metadata')
    loaded = mdplug.load(str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # notes on fused biases kept in convs (densenet's concatenations)
        mdplug.compact(loaded)
    save(loaded, str(compact_path), dict(raw['meta'], form='compact'))
    again = mdplug.load(str(compact_path))
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))
    return names


@pytest.mark.parametrize('module', sorted(TORCHVISION))
def test_torchvision_family_reads_back(tmp_path, module):
    name, size, kwargs = TORCHVISION[module]
    assert _round_trip(tmp_path, f'torchvision:{name}', size, kwargs, 'all')


@pytest.mark.parametrize('name,size', TIMM)
def test_timm_model_reads_back(tmp_path, name, size):
    assert _round_trip(tmp_path, name, size, {'num_classes': 10}, 'pointwise')


def test_load_converts_the_recorded_convs_not_a_new_plan(tmp_path):
    """The options say 'pointwise', the recorded list says three convs: load converts those three."""
    model = build_model('resnet18').eval()
    names = ['layer1.0.conv1', 'layer2.0.downsample.0', 'conv1']
    mdplug.convert(model, 'maconv', select=names, m=4)
    path = tmp_path / 'x.pth'
    save(model, str(path), dict(model='resnet18', kind='maconv', form='expanding',
                                       options=dict(select='pointwise', layer_kwargs={'m': 4})))
    assert sorted(read(str(path))['meta']['converted']) == sorted(names)
    loaded = mdplug.load(str(path))
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, mdplug.nn.MAConv2d)) == sorted(names)

    # a checkpoint written before the list was recorded is planned again from its options
    raw = read(str(path))
    del raw['meta']['converted']
    torch.save(raw, path)
    with pytest.raises(mdplug.convert.checkpoint.CheckpointError, match='does not match resnet18'):
        mdplug.load(str(path))


def test_select_list_names_are_checked():
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match=r"not convs of the model: 'layer1\.0\.conv9' \(close: .*layer1\.0\.conv1"):
        mdplug.plan(model, select=['layer1.0.conv9'])
    with pytest.raises(ValueError, match='a list select holds qualified conv names'):
        mdplug.plan(model, select=[3])
    with pytest.raises(ValueError, match=r"select=3 \(int\) is not accepted; use one of pointwise, spatial, all, a "
                                         r"list of qualified conv names or a callable"):
        mdplug.plan(model, select=3)
    p = mdplug.plan(model, select=('conv1', 'layer4.1.conv2'))
    assert p.names == ['conv1', 'layer4.1.conv2']  # stem and head too: a list is exactly what it names
