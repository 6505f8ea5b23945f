"""Weight averaging of converted models: timm's ``ModelEmaV3`` and mmengine's ``ExponentialMovingAverage`` (the
model of its ``EMAHook``) average the new layers' parameters, the averaged copy computes with them (no stale state
left from the source model), and it compacts exactly."""
import copy

import pytest
import timm
import torch
from timm.utils import ModelEmaV3, reparameterize_model

from _models import calibrate_bn, relative_diff, small_input
from mdplug.convert import compact, convert
from mdplug.nn import LAYERS


def _converted(kind):
    torch.manual_seed(0)
    model = convert(timm.create_model('resnet18', num_classes=10), kind, init='fresh')
    calibrate_bn(model, small_input(4))
    return model


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    opt.step()


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_timm_model_ema_averages_and_compacts(kind):
    x = small_input(4)
    model = _converted(kind)
    before = copy.deepcopy(model).eval()
    ema = ModelEmaV3(model, decay=0.5)
    _train_step(model, x)
    ema.update(model)
    avg = ema.module.eval()
    with torch.no_grad():
        out, out_before, out_after = avg(x), before(x), model.eval()(x)
        assert relative_diff(out, out_before) > 1e-4 and relative_diff(out, out_after) > 1e-4
        for p_avg, p0, p1 in zip(avg.parameters(), before.parameters(), model.parameters()):
            torch.testing.assert_close(p_avg, 0.5 * p0 + 0.5 * p1)
        fused = reparameterize_model(avg)  # a deep copy
        assert relative_diff(fused(x), out) < 1e-5


@pytest.mark.parametrize('kind', ['mdconv', 'maconv', 'dyconv'])
def test_mmengine_ema_model_computes_with_the_averaged_weights(kind):
    """momentum ~1: the average is the source model; momentum ~0: it keeps the weights of its first update (the
    buffers follow the source, ``update_buffers=False``), and computes with them, not with the source's."""
    from mmengine.model import ExponentialMovingAverage
    x = small_input(4)
    for momentum in (1 - 1e-12, 1e-12):
        model = _converted(kind)
        ema = ExponentialMovingAverage(model, momentum=momentum)  # (a deep copy of the model)
        _train_step(model, x)
        ema.update_parameters(model)  # step 0 copies the weights
        first = copy.deepcopy(model)
        _train_step(model, x)
        ema.update_parameters(model)  # step 1 averages
        avg = ema.module.eval()
        ref = copy.deepcopy(model)
        if momentum < 0.5:
            ref.load_state_dict({**model.state_dict(), **dict(first.named_parameters())})
        with torch.no_grad():
            out = avg(x)
            assert relative_diff(out, ref.eval()(x)) < 1e-6
            if momentum < 0.5:
                assert relative_diff(out, model.eval()(x)) > 1e-4
            assert relative_diff(compact(copy.deepcopy(avg)).eval()(x), out) < 1e-5
