"""mmengine's FLOP counter (``get_model_complexity_info``) on compact models counts what :mod:`mdplug.profile`
counts: the per-sample products (``baddbmm`` / ``bmm`` / ``mm``) and the attention included, so a compact MDConv
no longer looks cheaper than the static model."""
import copy
import os.path as osp

import pytest
import torch

pytest.importorskip('mmpretrain')
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info  # noqa: E402
from mmengine.config import Config  # noqa: E402

import mdplug.mmpretrain  # noqa: E402,F401 - registers the handles
from mdplug.mmpretrain import compact_classifier, runtime  # noqa: E402
from mdplug.profile import count_macs  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: what mmengine counts and the paper's MACs leave out (BN folds into the convs; pooling is element-wise)
NOT_MACS = ('batch_norm', 'adaptive_avg_pool2d')

pytestmark = pytest.mark.usefixtures('one_thread')


def compact_model(config, **cfg_options):
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.merge_from_dict(cfg_options)
    return compact_classifier(runtime.build_model(cfg).eval()).eval(), runtime.input_shape(cfg)


def mmengine_macs(model, shape):
    """``get_model_complexity_info``'s total, and that total without the ops the paper does not count."""
    total = get_model_complexity_info(model, input_shape=shape, show_table=False, show_arch=False)['flops']
    analyzer = FlopAnalyzer(model, (torch.randn(1, *shape),))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    by_op = analyzer.by_operator()
    assert analyzer.total() == total
    return total, total - sum(by_op.get(op, 0) for op in NOT_MACS), by_op


@pytest.mark.parametrize('config, options', [
    ('configs/ablation/smallnet_x1_mdconv.py', {}),
    ('configs/ablation/smallnet_x1_mdconv_nobypass.py', {}),
    ('configs/cifar10/mobilenet_v2_cifar_x035_dcd.py', {}),
    ('configs/fashion_mnist/smallnet_x1_dyconv.py', {}),
    ('configs/imagenet/resnet18_mdconv.py', {'model.backbone.input_shape': (3, 64, 64)}),  # 3x3 layers
], ids=['smallnet-mdconv', 'smallnet-mdconv-nobypass', 'mobilenetv2cifar-dcd', 'smallnet-dyconv',
        'resnet18-mdconv-3x3'])
def test_mmengine_counts_the_compact_layers_as_mdplug_profile_does(config, options):
    model, shape = compact_model(config, **options)
    total, macs, by_op = mmengine_macs(model, shape)
    ours = count_macs(model, shape)
    assert abs(macs - ours) <= 0.02 * ours, f'mmengine {macs:,} (of {total:,}) vs mdplug.profile {ours:,}; {by_op}'


def test_compact_mdconv_is_not_cheaper_than_static_in_mmengines_count():
    static, shape = compact_model('configs/ablation/smallnet_x1_static.py')
    mdconv, _ = compact_model('configs/ablation/smallnet_x1_mdconv.py')
    (static_total, static_macs, _), (total, macs, by_op) = mmengine_macs(static, shape), mmengine_macs(mdconv, shape)
    assert total > static_total and macs > static_macs, by_op
    assert by_op.get('addmm', 0) + by_op.get('baddbmm', 0) > 0.3 * macs  # the per-sample weight generation


def test_counting_leaves_the_layers_export_paths_alone():
    """The counter's trace sees the eager executions; a ``torch.jit.trace`` afterwards still takes the export ones."""
    model, shape = compact_model('configs/ablation/smallnet_x1_mdconv.py')
    mmengine_macs(model, shape)
    backbone = copy.deepcopy(model.backbone)
    x = torch.randn(3, *shape)
    traced = torch.jit.trace(backbone, torch.randn(1, *shape), check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)[0], backbone(x)[0], atol=1e-5, rtol=1e-4)  # batch 3 from a batch-1 trace
