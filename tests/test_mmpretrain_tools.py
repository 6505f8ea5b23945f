"""The tools end to end: a 2-process gloo ``tools/dist_train.sh`` run, ``--resume``, ``tools/test.py``,
``tools/deploy.py`` ("compact accuracy equals expanding"), "MAConv compact is the static model", clear errors."""
import json
import os
import os.path as osp
import runpy
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmpretrain')
from conftest import randomize_bn  # noqa: E402
from mmengine.config import Config  # noqa: E402
from test_mmpretrain_data import write_cifar10  # noqa: E402

from mdplug.mmpretrain import runtime  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/ablation/smallnet_x1_mdconv.py'
LOCAL = ['{}_dataloader.dataset.type=LocalCIFAR10'.format(s) for s in ('train', 'val', 'test')]
NO_WORKERS = ['{}_dataloader.num_workers=0'.format(s) for s in ('train', 'val', 'test')]


pytestmark = pytest.mark.usefixtures('one_thread')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args, **env):
    """Run a tool from the repository root; fail with its output."""
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', **env)
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{" ".join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc.stdout + proc.stderr


def test_dist_train_resume_test_deploy(tmp_path):
    data, work = str(tmp_path / 'cifar10'), str(tmp_path / 'work')
    write_cifar10(data, per_batch=40, test=100)
    train_opts = LOCAL + NO_WORKERS + ['train_dataloader.batch_size=16', 'default_hooks.logger.interval=1']

    # 2 processes (gloo on CPU): 200 images / (16 x 2) = 7 iterations, a checkpoint
    run(['bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir', work, '--data-root', data,
         '--cfg-options', 'train_cfg.max_epochs=1', *train_opts], PORT=str(free_port()))
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))

    # --resume continues from epoch 1 (the checkpoint loads under torch.load's weights_only default)
    log = run(['bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir', work, '--data-root', data, '--resume',
               '--cfg-options', 'train_cfg.max_epochs=2', *train_opts], PORT=str(free_port()))
    assert 'resumed epoch: 1, iter: 7' in log
    assert 'Epoch(train) [2][7/7]' in log
    checkpoint = osp.join(work, 'epoch_2.pth')
    assert osp.isfile(checkpoint)

    test_opts = ['test_dataloader.dataset.type=LocalCIFAR10', 'test_dataloader.num_workers=0']
    expanding_json, compact_json = str(tmp_path / 'expanding.json'), str(tmp_path / 'compact.json')
    run([sys.executable, 'tools/test.py', CONFIG, checkpoint, '--data-root', data, '--work-dir', work,
         '--out', expanding_json, '--cfg-options', *test_opts])

    compact = str(tmp_path / 'compact.pth')
    log = run([sys.executable, 'tools/deploy.py', CONFIG, checkpoint, compact])
    assert 'evaluate it with tools/test.py' in log
    run([sys.executable, 'tools/test.py', CONFIG, compact, '--deployed', '--data-root', data, '--work-dir', work,
         '--out', compact_json, '--cfg-options', *test_opts])

    with open(expanding_json) as f, open(compact_json) as g:
        expanding_acc, compact_acc = json.load(f), json.load(g)
    assert 'accuracy/top1' in expanding_acc
    assert compact_acc == expanding_acc


def save_checkpoint(model, path):
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, path)


@pytest.mark.parametrize('config', [
    'configs/ablation/smallnet_x1_maconv.py',
    'configs/cifar10/mobilenet_v2_cifar_x035_maconv.py',
    'configs/imagenet/shufflenet_v2_x05_maconv.py',
    'configs/imagenet/resnet18_maconv.py',
])
def test_maconv_compact_is_the_static_model(config, tmp_path):
    cfg = Config.fromfile(osp.join(ROOT, config))
    model = randomize_bn(runtime.build_model(cfg)).eval()
    checkpoint = str(tmp_path / 'maconv.pth')
    save_checkpoint(model, checkpoint)

    expanding, deployed, static = runtime.deploy(cfg, config, checkpoint)
    assert static is not None
    static_cfg = Config.fromfile(osp.join(ROOT, config.replace('_maconv', '_static')))
    fresh_static = runtime.build_model(static_cfg)
    fresh_static.load_state_dict(static.state_dict(), strict=True)  # the static config's model, exactly
    fresh_static.eval()
    x = torch.randn(2, *runtime.input_shape(cfg)[:1], 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh_static(x), expanding(x), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    other = runtime.build_model(Config.fromfile(osp.join(ROOT, 'configs/ablation/smallnet_x1_static.py')))
    checkpoint = str(tmp_path / 'static.pth')
    save_checkpoint(other, checkpoint)
    cfg = Config.fromfile(osp.join(ROOT, CONFIG))
    message = (r"is not a checkpoint of the model of .*smallnet_x1_mdconv.py:\n  "
               r"MDConv2d 'backbone.layer1.pointwise.conv' received a plain conv's state .*: a static model's checkpoint")
    with pytest.raises(ValueError, match=message):
        runtime.deploy(cfg, CONFIG, checkpoint)


def test_train_tool_stops_on_a_missing_data_root(tmp_path, monkeypatch):
    """tools/train.py, the real script, run in this process: it stops before building a Runner."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('LOCAL_RANK', '0')  # (the script sets it when absent)
    monkeypatch.setattr(sys, 'argv', ['tools/train.py', CONFIG, '--work-dir', str(tmp_path),
                                      '--data-root', str(tmp_path / 'absent')])
    with pytest.raises(FileNotFoundError, match=r"data_root '.*absent' of dataset .* does not exist; pass "
                                                r"--data-root DIR"):
        runpy.run_path(osp.join(ROOT, 'tools/train.py'), run_name='__main__')
    assert not any((tmp_path).iterdir())  # no work dir content: it stopped before the Runner


def test_a_config_naming_an_unknown_kind_is_a_clear_error(tmp_path):
    config = tmp_path / 'bogus.py'
    config.write_text(f"_base_ = '{ROOT}/configs/ablation/smallnet_x1_mdconv.py'\n"
                      "model = dict(backbone=dict(kind='mdconvv'))\n")
    with pytest.raises(KeyError, match=r"mdplug.Converted: unknown kind 'mdconvv' for backbone 'SmallNet'"):
        runtime.build_model(Config.fromfile(str(config)))
