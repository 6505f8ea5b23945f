"""Clear refusals and small gaps of the mmpretrain seam: ``conv_cfg`` reaching depthwise convs, the input shape of
``tools/deploy.py`` / ``tools/analysis.py``, models without a compact form, an empty data root, and a config that
inherits one of mmpretrain's own (``_base_ = 'mmpretrain::...'``) training for an iteration."""
import os
import os.path as osp
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain')
from conftest import randomize_bn  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

from mdplug.mmpretrain import runtime  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('one_thread')


def tool(name, monkeypatch, *args):
    """``tools/NAME.py ARGS`` in this process; returns (exit message or None)."""
    monkeypatch.setattr(sys, 'argv', [f'tools/{name}.py', *args])
    try:
        runpy.run_path(osp.join(ROOT, f'tools/{name}.py'), run_name='__main__')
    except SystemExit as e:
        return str(e.code)
    return None


def test_conv_cfg_reaching_depthwise_convs_points_to_converted():
    init_default_scope('mmpretrain')
    with pytest.raises(ValueError, match=r"MDConv2d: groups=\d+ is not supported .* backbone=dict\(type="
                                         r"'mdplug.Converted', backbone=..., kind=..., select='pointwise'\) "
                                         r"instead of conv_cfg=dict\(type='MDConv2d'\)"):
        MODELS.build(dict(type='MobileNetV2', widen_factor=0.35, conv_cfg=dict(type='MDConv2d')))


def test_analysis_reports_the_training_form_of_the_relu_ablation(monkeypatch, capsys):
    assert tool('analysis', monkeypatch, osp.join(ROOT, 'configs/ablation/smallnet_x1_relu_bypass.py')) is None
    out = capsys.readouterr().out
    assert 'input 3x32x32 (from model.backbone.input_shape (mdplug.Converted))' in out
    assert 'expanding ' in out and "compact    none: MAConv2d(act='relu') cannot be fused" in out


def test_deploy_of_the_relu_ablation_says_why_there_is_no_compact_form(monkeypatch, tmp_path):
    config = osp.join(ROOT, 'configs/ablation/smallnet_x1_relu_bypass.py')
    checkpoint = str(tmp_path / 'relu.pth')
    torch.save({'meta': {}, 'state_dict': runtime.build_model(Config.fromfile(config)).state_dict()}, checkpoint)
    message = tool('deploy', monkeypatch, config, checkpoint, str(tmp_path / 'out.pth'))
    assert "MAConv2d(act='relu') cannot be fused" in message and not osp.exists(tmp_path / 'out.pth')


def write_config(tmp_path, base, body):
    path = tmp_path / 'cfg.py'
    path.write_text(f"_base_ = '{osp.join(ROOT, base)}'\n{body}\n")
    return str(path)


def test_the_input_shape_comes_from_the_config_or_its_pipeline(tmp_path):
    static = Config.fromfile(osp.join(ROOT, 'configs/cifar10/mobilenet_v2_cifar_x035_static.py'))
    assert runtime.input_shape_and_source(static) == ((3, 32, 32), 'input_shape of the config')
    # no input_shape: Fashion-MNIST's test pipeline pads to 32x32, its mean has one channel
    fashion = Config.fromfile(write_config(tmp_path, 'configs/fashion_mnist/smallnet_x1_static.py',
                                           'input_shape = None'))
    assert runtime.input_shape_and_source(fashion) == ((1, 32, 32), 'the test pipeline and data_preprocessor.mean')
    imagenet = Config.fromfile(write_config(tmp_path, 'configs/imagenet/mobilenet_v2_x05_static.py',
                                            'input_shape = None'))
    assert runtime.input_shape(imagenet) == (3, 224, 224)  # ResizeEdge 256, CenterCrop 224


def test_a_config_that_does_not_tell_its_input_shape_is_an_error_naming_the_options(tmp_path, monkeypatch):
    config = write_config(tmp_path, 'configs/ablation/smallnet_x1_static.py', 'input_shape = None')  # CIFAR: no crop
    message = tool('analysis', monkeypatch, config)
    assert 'the input shape of the model cannot be told from the config' in message
    assert 'set input_shape=(C, H, W) at the top of the config' in message and '--shape' in message


def test_a_shape_the_model_cannot_read_names_its_first_conv(monkeypatch):
    message = tool('analysis', monkeypatch, osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_mdconv.py'),
                   '--shape', '3', '32', '32')
    assert 'the model (its first conv takes 1 channels) does not run on a 3x32x32 input (from --shape)' in message


def test_deploy_checks_at_the_configs_own_size(monkeypatch, tmp_path, capsys):
    """A 1-channel 32x32 model deploys (its check batch is 1x32x32, not ImageNet's 3x224x224)."""
    config = osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_mdconv.py')
    checkpoint, out = str(tmp_path / 'm.pth'), str(tmp_path / 'c.pth')
    model = randomize_bn(runtime.build_model(Config.fromfile(config)))
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, checkpoint)
    assert tool('deploy', monkeypatch, config, checkpoint, out) is None
    assert torch.load(out, weights_only=True)['meta']['mdplug_form'] == 'compact'
    message = tool('deploy', monkeypatch, config, out, str(tmp_path / 'again.pth'))
    assert 'is already a compact checkpoint' in message


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_tools_test_on_an_empty_data_root_gives_the_install_hint(tmp_path):
    config = osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_static.py')
    checkpoint = str(tmp_path / 'static.pth')
    torch.save({'meta': {}, 'state_dict': runtime.build_model(Config.fromfile(config)).state_dict()}, checkpoint)
    empty = tmp_path / 'empty'
    empty.mkdir()
    proc = run([sys.executable, 'tools/test.py', config, checkpoint, '--data-root', str(empty), '--work-dir',
                str(tmp_path), '--cfg-options', 'test_dataloader.num_workers=0'])
    assert proc.returncode != 0
    assert f"in data_root '{empty}'; install the Debian package with `apt-get install dataset-fashion-mnist`" \
        in proc.stderr


def test_a_config_inheriting_mmpretrains_mobilenet_v2_trains_an_iteration(tmp_path):
    """``_base_ = 'mmpretrain::...'`` needs pkg_resources (setuptools < 81, pinned in the extras)."""
    import mmcv
    for label in ('a', 'b'):
        image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        mmcv.imwrite(image, str(tmp_path / 'data' / label / f'{label}.png'))
    config = tmp_path / 'inherits.py'
    config.write_text(
        "_base_ = ['mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py']\n"
        "custom_imports = dict(imports=['mdplug.mmpretrain'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(_delete_=True, type='mdplug.Converted', kind='mdconv', input_shape=(3, 64, 64),\n"
        "                           backbone=dict(type='MobileNetV2', widen_factor=0.35)),\n"
        "             head=dict(num_classes=2))\n"
        f"train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(\n"
        f"    _delete_=True, type='CustomDataset', data_root={str(tmp_path / 'data')!r},\n"
        "    pipeline=[dict(type='LoadImageFromFile'), dict(type='RandomResizedCrop', scale=64),\n"
        "              dict(type='PackInputs')]))\n"
        "train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)\n"
        "val_dataloader = None\nval_cfg = None\nval_evaluator = None\n"
        "test_dataloader = None\ntest_cfg = None\ntest_evaluator = None\n"
        "default_hooks = dict(logger=dict(interval=1))\n")
    proc = run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(tmp_path / 'work')])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'Epoch(train) [1][1/1]' in log and 'loss:' in log
    assert osp.isfile(tmp_path / 'work' / 'epoch_1.pth')
