"""``load_state_dict`` of a compact layer's state into an expanding layer (``mdplug.nn._state``): the layer takes the
compact form and computes exactly what was saved, for every option that changes the compact parameters."""
import pytest
import torch
from conftest import randomize_bn

from mdplug.nn import DCDConv2d, MAConv2d, MDConv2d
from mdplug.nn._state import CheckpointFormError


@pytest.mark.parametrize('cls, kwargs', [
    (MDConv2d, {}), (MDConv2d, dict(bypass=False)), (MDConv2d, dict(norm='sum')),
    (MDConv2d, dict(norm='none', bias=False)), (DCDConv2d, {}), (MAConv2d, {}), (MAConv2d, dict(norm='none')),
    (MAConv2d, dict(bypass=False, norm='sum')),
], ids=lambda v: getattr(v, '__name__', str(v)))
@pytest.mark.parametrize('kernel', [1, 3])
def test_an_expanding_layer_loads_a_compact_state_exactly(cls, kwargs, kernel):
    saved = randomize_bn(cls(8, 12, kernel, padding=kernel // 2, m=5, **kwargs)).eval()
    compact = saved.fuse().eval()
    fresh = cls(8, 12, kernel, padding=kernel // 2, m=5, **kwargs).eval()
    fresh.load_state_dict(compact.state_dict(), strict=True)
    assert fresh.deploy and set(fresh.state_dict()) == set(compact.state_dict())
    x = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), saved(x), atol=1e-5, rtol=1e-4)


def test_a_plain_conv_without_bias_makes_maconv_biasless():
    """The fused bias of a compacted MAConv sits in the next BN: the checkpoint's conv has ``weight`` alone."""
    conv = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False)
    layer = MAConv2d(8, 12, 3, padding=1, m=5)
    with pytest.warns(UserWarning, match=r"MAConv2d '<root>' received a plain conv's weight"):
        layer.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(2, 8, 6, 6)
    assert layer.bias is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))


def test_a_maconv_with_relu_refuses_a_plain_conv():
    layer = MAConv2d(8, 12, 1, m=5, act='relu')
    with pytest.raises(CheckpointFormError, match=r"MAConv2d '<root>' has act='relu', so no compact form"):
        layer.load_state_dict(torch.nn.Conv2d(8, 12, 1).state_dict())


def test_a_layer_that_switched_while_loading_refuses_a_training_step_until_accepted():
    """An optimizer built before the load (the Runner's, for ``load_from``) lacks the compact parameters."""
    from mdplug.nn import _state
    compact = randomize_bn(MDConv2d(8, 12, 1, m=5)).eval().fuse()
    layer = MDConv2d(8, 12, 1, m=5)  # training mode
    layer.load_state_dict(compact.state_dict())
    with pytest.raises(RuntimeError, match='an optimizer built before the load does not hold its new parameters'):
        layer(torch.randn(2, 8, 4, 4))
    _state.accept(layer)
    layer(torch.randn(2, 8, 4, 4)).sum().backward()
    assert layer.weight1.grad is not None

    inferred = MDConv2d(8, 12, 1, m=5)
    inferred.load_state_dict(compact.state_dict())
    inferred.eval()(torch.randn(1, 8, 4, 4))  # inference first: the guard goes
    inferred.train()(torch.randn(2, 8, 4, 4))
