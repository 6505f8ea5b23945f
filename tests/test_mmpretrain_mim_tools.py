"""mmpretrain's own tools on our checkpoints: ``torch.load`` after ``import mdplug.mmpretrain``, the ``.mim`` copies
of ``tools/test.py``, ``tools/train.py --resume`` (subprocesses) and ``tools/model_converters/reparameterize_model.py``
shipped in the installed package, and the ``switch_to_deploy`` convention that the last one asserts."""
import os
import os.path as osp
import runpy
import subprocess
import sys

import pytest
import torch

mmpretrain = pytest.importorskip('mmpretrain')
from conftest import randomize_bn  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.apis import get_model  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

from mdplug.mmpretrain import runtime  # noqa: E402
from mdplug.nn import MDPLUG_LAYERS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MIM = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools')
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
CONFIG = osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_mdconv.py')
SMALL = ['train_dataloader.dataset.indices=64', 'val_dataloader.dataset.indices=32',
         'test_dataloader.dataset.indices=32', 'train_dataloader.batch_size=32'] + [
    f'{s}_dataloader.{k}' for s in ('train', 'val', 'test') for k in ('num_workers=0', 'persistent_workers=False')]

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(not osp.isdir(FASHION_MNIST), reason='apt-get install dataset-fashion-mnist')]


def run(args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{" ".join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
    return proc


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A work dir with ``epoch_1.pth`` of our ``tools/train.py`` (2 iterations): optimizer, schedulers and the
    message hub's ``HistoryBuffer`` objects included."""
    folder = str(tmp_path_factory.mktemp('train'))
    run([sys.executable, 'tools/train.py', CONFIG, '--work-dir', folder, '--cfg-options', 'train_cfg.max_epochs=1',
         *SMALL])
    assert osp.isfile(osp.join(folder, 'epoch_1.pth'))
    return folder


def test_torch_load_reads_a_training_checkpoint_after_importing_the_plugin(work):
    checkpoint = osp.join(work, 'epoch_1.pth')
    # one fresh interpreter: torch.load before the plugin is imported (torch's default is weights_only), then after
    load = (f'import sys, torch\n'
            f'try:\n'
            f'    torch.load({checkpoint!r})\n'
            f'except Exception as e:\n'
            f'    print(e, file=sys.stderr)\n'
            f'else:\n'
            f'    sys.exit("loaded before importing mdplug.mmpretrain")\n'
            f'import mdplug.mmpretrain\n'
            f'print(sorted(torch.load({checkpoint!r})))\n')
    proc = run([sys.executable, '-c', load])
    assert 'Weights only load failed' in proc.stderr
    assert "'message_hub', 'meta', 'optimizer', 'param_schedulers', 'state_dict'" in proc.stdout


def test_mmpretrain_test_and_resume_read_our_checkpoints(work):
    checkpoint = osp.join(work, 'epoch_1.pth')
    proc = run([sys.executable, osp.join(MIM, 'test.py'), CONFIG, checkpoint, '--work-dir', work,
                '--cfg-options', *SMALL])
    assert 'Epoch(test) [1/1]' in proc.stdout + proc.stderr
    proc = run([sys.executable, osp.join(MIM, 'train.py'), CONFIG, '--work-dir', work, '--resume',
                '--cfg-options', 'train_cfg.max_epochs=2', *SMALL])
    log = proc.stdout + proc.stderr
    assert 'resumed epoch: 1, iter: 2' in log and 'Epoch(train) [2][2/2]' in log


def reparameterize(config, checkpoint, out, monkeypatch):
    """mmpretrain's ``reparameterize_model.py CONFIG CHECKPOINT OUT``, the installed script, run in this process."""
    script = osp.join(MIM, 'model_converters', 'reparameterize_model.py')
    monkeypatch.setattr(sys, 'argv', [script, config, checkpoint, out])
    runpy.run_path(script, run_name='__main__')
    return out


def images():
    return torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def test_reparameterize_model_compacts_and_its_output_loads_into_the_compact_model(work, tmp_path, monkeypatch):
    checkpoint = osp.join(work, 'epoch_1.pth')
    out = reparameterize(CONFIG, checkpoint, str(tmp_path / 'deploy.pth'), monkeypatch)
    state = torch.load(out, weights_only=True)['state_dict']
    assert 'backbone.layer1.pointwise.conv.weight1' in state and not any('.expand.' in k for k in state)
    trained = get_model(CONFIG, pretrained=checkpoint)
    compact = get_model(CONFIG, pretrained=out)  # the training config: the layers take the compact form
    assert all(m.deploy for m in compact.modules() if isinstance(m, MDPLUG_LAYERS))
    with torch.no_grad():
        torch.testing.assert_close(compact(images()), trained(images()), atol=1e-5, rtol=1e-4)


def test_reparameterized_maconv_is_the_static_model(tmp_path, monkeypatch):
    """MAConv: every layer becomes a plain conv, its bias folded into the next BN: the static config's model."""
    config = osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_maconv.py')
    trained = randomize_bn(runtime.build_model(Config.fromfile(config))).eval()
    checkpoint = str(tmp_path / 'maconv.pth')
    torch.save({'meta': {}, 'state_dict': trained.state_dict()}, checkpoint)
    out = reparameterize(config, checkpoint, str(tmp_path / 'deploy.pth'), monkeypatch)
    static = runtime.build_model(Config.fromfile(config.replace('_maconv', '_static'))).eval()
    static.load_state_dict(torch.load(out, weights_only=True)['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(static(images()), trained(images()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('backbone', [
    dict(type='mdplug.Converted', backbone=dict(type='MobileNetV2', widen_factor=0.35), kind='mdconv',
         input_shape=(3, 32, 32)),
    dict(type='ResNet', depth=18, conv_cfg=dict(type='MAConv2d')),
    dict(type='mdplug.Converted', backbone=dict(type='SmallNet'), kind='dcd', input_shape=(3, 32, 32)),
    dict(type='mdplug.Converted', backbone=dict(type='MobileNetV2CIFAR', widen_factor=0.35), kind='maconv',
         input_shape=(3, 32, 32)),
], ids=['converted-mobilenetv2', 'conv_cfg-resnet18', 'smallnet', 'mobilenetv2cifar'])
def test_backbones_with_mdplug_layers_switch_to_deploy_exactly(backbone):
    init_default_scope('mmpretrain')
    model = randomize_bn(MODELS.build(backbone))
    model.eval()  # (mmpretrain's MobileNetV2.train returns None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[-1]
        model.switch_to_deploy()
        after = model(x)[-1]
    assert all(m.deploy for m in model.modules() if isinstance(m, MDPLUG_LAYERS))
    if 'maconv' in str(backbone).lower():  # plain convs, each fused bias folded into the BN after it
        static = backbone.get('backbone') or dict(backbone, conv_cfg=None)
        assert not any(isinstance(m, MDPLUG_LAYERS) for m in model.modules())
        assert set(model.state_dict()) == set(MODELS.build(static).state_dict())  # the static backbone's keys
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_a_static_backbone_keeps_mmpretrains_own_check():
    init_default_scope('mmpretrain')
    assert not hasattr(MODELS.build(dict(type='MobileNetV2', widen_factor=0.35)), 'switch_to_deploy')
    assert hasattr(MODELS.build(dict(type='SmallNet')), 'switch_to_deploy')  # ours: a static SmallNet is compact
