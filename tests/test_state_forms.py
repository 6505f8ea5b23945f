"""``load_state_dict`` of a compact layer's state into an expanding layer (``mdplug.nn._state``): the layer takes the
compact form and computes exactly what was saved, for every option that changes the compact parameters."""
import pytest
import torch
from conftest import randomize_bn

from mdplug.nn import DCDConv2d, MAConv2d, MDConv2d
from mdplug.nn._state import CheckpointFormError


@pytest.mark.parametrize('cls, kwargs', [
    (MDConv2d, {}), (MDConv2d, dict(bypass=False)), (MDConv2d, dict(norm='sum')),
    (MDConv2d, dict(norm='none', bias=False)), (DCDConv2d, {}), (DCDConv2d, dict(bypass=False)),
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


@pytest.mark.parametrize('kwargs', [{}, dict(act='relu'), dict(bias=False)])
def test_maconv_refuses_a_plain_conv_a_compact_or_a_static_one_alike(kwargs):
    """A compacted MAConv *is* a plain conv, as a static model's conv is: which one a checkpoint holds is unknown."""
    layer = MAConv2d(8, 12, 3, padding=1, m=5, **kwargs)
    with pytest.raises(CheckpointFormError, match=r"MAConv2d '<root>' received a plain conv's state \(weight\): a "
                                                  r"compact MAConv checkpoint .* or a static model's, which cannot "
                                                  r"be told apart. Load it into the static model"):
        layer.load_state_dict(randomize_bn(MAConv2d(8, 12, 3, padding=1, m=5)).eval().fuse().state_dict())
    assert not layer.deploy
    compact = MAConv2d(8, 12, 3, padding=1, m=5, deploy=True)  # the compact MAConv takes it
    compact.load_state_dict(torch.nn.Conv2d(8, 12, 3, padding=1).state_dict())


def test_mdconv_refuses_a_static_conv():
    """mmengine loads non-strictly: without the refusal the layer would stay randomly initialised."""
    for layer in (MDConv2d(8, 12, 1, m=5), MDConv2d(8, 12, 1, m=5, deploy=True)):
        with pytest.raises(CheckpointFormError, match=r"MDConv2d '<root>' received a plain conv's state \(weight\): "
                                                      r"a static model's checkpoint. Load it into the static model"):
            layer.load_state_dict(torch.nn.Conv2d(8, 12, 1).state_dict(), strict=False)


def test_a_layer_that_switched_while_loading_refuses_a_training_step_until_accepted():
    """An optimizer built before the load (the Runner's, for ``load_from``) lacks the compact parameters."""
    import mdplug
    compact = randomize_bn(MDConv2d(8, 12, 1, m=5)).eval().fuse()
    layer = MDConv2d(8, 12, 1, m=5)  # training mode
    layer.load_state_dict(compact.state_dict())
    with pytest.raises(RuntimeError, match='an optimizer built before the load does not hold its new parameters'):
        layer(torch.randn(2, 8, 4, 4))
    with pytest.raises(RuntimeError, match=r'call mdplug.accept_loaded\(model\) first'):
        layer(torch.randn(2, 8, 4, 4))
    assert mdplug.accept_loaded(layer) is layer
    layer(torch.randn(2, 8, 4, 4)).sum().backward()
    assert layer.weight1.grad is not None

    inferred = MDConv2d(8, 12, 1, m=5)
    inferred.load_state_dict(compact.state_dict())
    inferred.eval()(torch.randn(1, 8, 4, 4))  # inference first: the guard goes
    inferred.train()(torch.randn(2, 8, 4, 4))


def test_a_compact_layer_refuses_a_partial_compact_state():
    state = MDConv2d(8, 12, 1, m=5, deploy=True).state_dict()
    del state['weight2']
    with pytest.raises(CheckpointFormError, match=r"MDConv2d '<root>': the checkpoint holds a compact form that does "
                                                  r"not match this layer \(weight2 is missing\)"):
        MDConv2d(8, 12, 1, m=5, deploy=True).load_state_dict(state, strict=False)
