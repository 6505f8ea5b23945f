"""mmpretrain's ``PreciseBNHook`` (its ``update_bn_stats``: under ``no_grad``, momentum 1.0 for every training
BatchNorm, one forward per batch, the averages assigned as new buffer tensors) on converted models: the statistics
it computes are those of torch's own ``nn.BatchNorm2d.forward`` (the reference runs with a global no-op forward
hook, which turns off every shortcut of the layers), and the model compacts exactly afterwards."""
import copy

import pytest
import torch

pytest.importorskip('mmpretrain')
import mdplug.mmpretrain  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.engine.hooks.precise_bn_hook import update_bn_stats  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402
from torch.nn.modules.module import register_module_forward_hook  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from _models import relative_diff  # noqa: E402
from mdplug.convert import compact  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('kind', ['mdconv', 'maconv'])
def test_precise_bn_recomputes_the_statistics_of_converted_layers(kind):
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(f'configs/fashion_mnist/smallnet_x1_{kind}.py').model)
    model.init_weights()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    images = [dict(inputs=torch.randint(0, 256, (1, 32, 32), generator=g, dtype=torch.uint8)) for _ in range(64)]
    loader = DataLoader(images, batch_size=16, collate_fn=pseudo_collate)
    before = copy.deepcopy(model.state_dict())
    model.train(), plain.train()
    update_bn_stats(model, loader, num_samples=64, logger='silent')
    hook = register_module_forward_hook(lambda *args: None)
    try:
        update_bn_stats(plain, loader, num_samples=64, logger='silent')
    finally:
        hook.remove()
    ours, ref = model.state_dict(), plain.state_dict()
    stats = [k for k in ours if k.endswith(('running_mean', 'running_var')) and ('expand_bn' in k or 'project_bn' in k)]
    assert stats and all(not torch.equal(ours[k], before[k]) for k in stats)
    for k in stats:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    model.eval()
    x = torch.rand(8, 1, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert relative_diff(compact(copy.deepcopy(model))(x), y) < 1e-5
