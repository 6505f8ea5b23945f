"""torch.fx tracing of the layers and of converted models: plain ``torch.fx.symbolic_trace``, torchvision's and
timm's feature extraction (timm keeps the layers as leaf modules, as it does for its CondConv2d), timm's own fx
test recipe, ``features_only=True`` + convert.  Every traced graph computes what the eager model computes."""
import copy

import pytest
import torch
import torch.fx
from torch import nn

import mdplug
from conftest import randomize_bn
from mdplug.nn import LAYERS, MDPLUG_LAYERS, DYConv2d, SEConv2d

pytestmark = pytest.mark.usefixtures('one_thread')

MULTI = ('mdconv', 'maconv', 'dcd')
# (kind, constructor keywords): every kind, 1×1 and k×k, strided, and the variants of the multi-layer structure
CASES = [(kind, dict(kernel_size=k, stride=s, padding=k // 2)) for kind in LAYERS for k, s in ((1, 1), (3, 1), (3, 2),
                                                                                                (1, 2))]
CASES += [(kind, dict(kernel_size=3, padding=1, **v)) for kind in MULTI
          for v in (dict(bypass=False), dict(norm='sum'), dict(norm='none', bias=True), dict(norm='none', bias=False))]
CASES += [('dyconv', dict(kernel_size=3, padding=1, groups=2)), ('se', dict(kernel_size=3, padding=1, groups=4)),
          ('dyconv', dict(kernel_size=3, padding=1, path='factorized', bias=False)),
          ('mdconv', dict(kernel_size=3, padding=1, gate='softmax', temperature=7.0)),
          ('mdconv', dict(kernel_size=3, padding=1, path='weight')), ('dcd', dict(kernel_size=1, path='weight')),
          ('maconv', dict(kernel_size=3, padding=1, act='relu'))]


def _layer(kind, kw, compact):
    layer = randomize_bn(LAYERS[kind](8, 12, **kw))
    if compact:
        layer.switch_to_deploy()
    return layer


def _ids(case):
    kind, kw = case
    return kind + '-' + ','.join(f'{k}={v}' for k, v in kw.items())


# (MAConv(act='relu') has no compact form)
FORMS = [(case, compact) for case in CASES for compact in (False, True) if not (compact and case[1].get('act'))]


@pytest.mark.parametrize('case,compact', FORMS,
                         ids=[_ids(c) + ('-compact' if compact else '-expanding') for c, compact in FORMS])
def test_symbolic_trace_computes_the_eager_function(case, compact):
    kind, kw = case
    layer = _layer(kind, kw, compact).eval()
    graph = torch.fx.symbolic_trace(layer)
    assert isinstance(graph, torch.fx.GraphModule)
    x = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), layer(x), rtol=1e-5, atol=1e-5)
        # batch 1 (the eager batch-1 path), channels-last (the eager layout-keeping paths), another size
        for t in (x[:1], x.contiguous(memory_format=torch.channels_last), torch.randn(2, 8, 5, 7)):
            torch.testing.assert_close(graph(t), layer(t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('k', [1, 3])
def test_traced_expanding_form_trains_like_the_eager_layer(kind, k):
    """In train mode the graph runs the modules (BNs in train mode) where the eager layer may take its fused
    path: same output, gradients and running statistics."""
    layer = _layer(kind, dict(kernel_size=k, padding=k // 2), False).double().train()
    graph = torch.fx.symbolic_trace(copy.deepcopy(layer)).train()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), graph(x2)
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    (y2 * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-9, atol=1e-9)
    grads = {n: p.grad for n, p in graph.named_parameters()}
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-9)
    buffers = dict(graph.named_buffers())
    for n, b in layer.named_buffers():
        torch.testing.assert_close(buffers[n], b, rtol=1e-10, atol=1e-12)


def test_timm_registers_every_layer_as_a_leaf_module():
    from timm.layers import get_notrace_modules
    assert set(MDPLUG_LAYERS) <= set(get_notrace_modules())


@pytest.mark.parametrize('name', ['mobilenetv2_050_mdconv', 'mobilenetv2_050_dcd', 'resnet18_dyconv',
                                  'resnet18_se', 'mobilenetv2_050_maconv'])
def test_timm_fx_test_recipe(name):
    """timm's tests/test_models.py ``test_model_forward_fx`` / ``backward_fx`` (torchvision's feature extraction
    with timm's leaf modules and autowrapped functions), on the entry points mdplug registers, in the expanding
    and the compact form; and timm's own ``create_feature_extractor``."""
    import timm
    from timm.layers import get_notrace_functions, get_notrace_modules
    from timm.models._features_fx import create_feature_extractor as timm_extractor
    from timm.utils import reparameterize_model
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    model = randomize_bn(timm.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    for form in ('expanding', 'compact'):
        if form == 'compact':
            model = reparameterize_model(model)
        model.eval()
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
        layer_names = [n for n, m in model.named_modules() if isinstance(m, MDPLUG_LAYERS)]
        if form == 'expanding' or 'maconv' not in name:  # (compact MAConv is a plain nn.Conv2d)
            assert layer_names and set(layer_names) <= set(eval_nodes)  # leaves: one node each, nothing inside
            assert not any(n.startswith(layer_names[0] + '.') for n in eval_nodes)
        fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                            eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
        with torch.no_grad():
            expected = model(x)
            (out,) = fx_model(x).values()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            (out,) = timm_extractor(model, [eval_nodes[-1]])(x).values()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        fx_model.train()
        (out,) = fx_model(x).values()
        out.mean().backward()
        assert all(p.grad is not None for p in fx_model.parameters())


def test_timm_feature_graph_net_and_features_only_convert():
    import timm
    from timm.models import FeatureGraphNet, FeatureListNet

    x = torch.randn(2, 3, 32, 32)
    model = randomize_bn(timm.create_model('resnet18_mdconv')).eval()
    graph_net = FeatureGraphNet(copy.deepcopy(model), out_indices=(1, 2, 3, 4))
    list_net = FeatureListNet(copy.deepcopy(model), out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        for a, b in zip(graph_net(x), list_net(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # features_only=True (FeatureListNet, and the fx FeatureGraphNet) then convert: the features of the converted
    # network, eager and traced alike
    for cls in (None, 'fx'):
        kwargs = {} if cls is None else dict(feature_cls=cls)
        features = timm.create_model('resnet18', features_only=True, **kwargs)
        converted = mdplug.convert(features, 'mdconv', select='spatial', example_inputs=x, inplace=False)
        randomize_bn(converted).eval()
        assert sum(isinstance(m, mdplug.MDConv2d) for m in converted.modules()) == 16
        traced = FeatureGraphNet(copy.deepcopy(converted), out_indices=tuple(range(5))) if cls is None else None
        with torch.no_grad():
            outs = converted(x)
            assert [o.shape[1] for o in outs] == [64, 64, 128, 256, 512]
            if traced is not None:
                for a, b in zip(traced(x), outs):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_torchvision_feature_extraction_traces_into_the_layers(kind):
    """torchvision's create_feature_extractor knows no leaf registry: it traces through the layers (train and
    eval graphs), and the extracted features equal the eager model's."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = torchvision.models.resnet18(num_classes=10)
    mdplug.convert(model, kind, select='spatial', example_inputs=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # running statistics of a batch (random ones overflow DCD's ungated matrices)
        model.train()(torch.randn(4, 3, 32, 32))
    for form in ('expanding', 'compact'):
        if form == 'compact':
            model = mdplug.compact(model)
        model.eval()
        train_nodes, eval_nodes = get_graph_node_names(model)
        if form == 'expanding':  # traced into: the layer's inner operations are nodes
            assert any(n.startswith('layer2.0.conv1.') for n in eval_nodes)
        extractor = create_feature_extractor(model, return_nodes={'layer2': 'mid', 'fc': 'out'})
        with torch.no_grad():
            out = extractor(x)
            torch.testing.assert_close(out['out'], model(x), rtol=1e-4, atol=1e-5)
            mid = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)(x)
            torch.testing.assert_close(out['mid'], mid, rtol=1e-4, atol=1e-5)


def test_symbolic_check_is_on_the_input_only():
    """A graph traced once serves any batch and layout; the eager layers are untouched by tracing."""
    layer = DYConv2d(8, 8, 3, padding=1).eval()
    graph = torch.fx.symbolic_trace(layer)
    code = graph.code
    assert 'einsum' in code and 'is_channels_last' not in code
    se = torch.fx.symbolic_trace(SEConv2d(8, 8, 1))
    assert 'attention.fc1' in se.code and 'mean' in se.code
