"""``mdplug.Converted`` with ``init`` and an inner ``init_cfg=dict(type='Pretrained')`` (issues 15.11 and 16): the
pretrained weights reach the static backbone first, then it is converted, so it computes what the trained one did."""
import copy
import importlib.util
import os.path as osp
import sys

import pytest
import torch
from conftest import randomize_bn, rel_err

pytest.importorskip('mmpretrain')
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import HOOKS, init_default_scope  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

import mdplug.mmpretrain  # noqa: E402,F401
from mdplug.mmpretrain import runtime, unwrap_converted  # noqa: E402
from mdplug.nn import MAConv2d, MDConv2d  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FINETUNE = osp.join(ROOT, 'configs', 'fashion_mnist', 'finetune')


@pytest.fixture(autouse=True)
def _scope():
    init_default_scope('mmpretrain')


def trained_static(tmp_path, config='smallnet_x1_maconv.py'):
    """The static model of a fine-tuning config with trained-looking weights, and the checkpoint holding them."""
    cfg = Config.fromfile(osp.join(FINETUNE, config))
    static_cfg = unwrap_converted(cfg.model)
    static_cfg.backbone.pop('init_cfg')
    static_cfg.head.pop('init_cfg')
    static = randomize_bn(MODELS.build(static_cfg)).eval()
    path = str(tmp_path / 'static.pth')
    torch.save({'state_dict': static.state_dict(), 'meta': {}}, path)
    return cfg, static, path


def point_at(cfg, path):
    backbone = cfg.model.backbone.get('backbone', cfg.model.backbone)
    backbone.init_cfg.checkpoint = path
    cfg.model.head.init_cfg.checkpoint = path


@pytest.mark.parametrize('config, layer', [('smallnet_x1_maconv.py', MAConv2d), ('smallnet_x1_mdconv.py', MDConv2d),
                                           ('mobilenet_v2_cifar_x035_mdconv.py', MDConv2d)])
def test_pretrained_backbone_is_loaded_then_converted_with_preserve(tmp_path, config, layer):
    cfg, static, path = trained_static(tmp_path, config)
    point_at(cfg, path)
    model = runtime.build_model(cfg)
    model.init_weights()
    convs = [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, layer)]
    assert convs
    state = static.state_dict()
    for name, conv in convs:  # the pretrained kernels are W0
        torch.testing.assert_close(conv.W0, state[f'backbone.{name}.weight'])
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert rel_err(model.eval()(x), static(x)) <= 1e-5


def test_init_weights_after_the_build_keeps_the_preserved_layers(tmp_path):
    cfg, static, path = trained_static(tmp_path)
    point_at(cfg, path)
    model = runtime.build_model(cfg)
    model.init_weights()
    layer = next(m for m in model.backbone.modules() if isinstance(m, MAConv2d))
    before = copy.deepcopy(layer.state_dict())
    model.backbone.init_weights()  # a second call (mmengine warns and does nothing) must not reset them either
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert torch.all(layer.project_bn.weight == 0)


def test_preserve_without_pretrained_starts_from_the_backbones_own_initialisation():
    model = MODELS.build(dict(type='mdplug.Converted', backbone=dict(type='SmallNet'), kind='maconv',
                              input_shape=(3, 32, 32)))
    layer = next(m for m in model.modules() if isinstance(m, MAConv2d))
    assert torch.all(layer.project_bn.weight == 0) and model.is_init
    fresh = MODELS.build(dict(type='mdplug.Converted', backbone=dict(type='SmallNet'), kind='maconv',
                              input_shape=(3, 32, 32), init='fresh'))
    fresh.init_weights()
    layer = next(m for m in fresh.modules() if isinstance(m, MAConv2d))
    assert torch.all(layer.project_bn.weight == 1)


def test_unknown_init_of_converted_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mdplug.Converted: init='keep' is unknown; use 'preserve'"):
        MODELS.build(dict(type='mdplug.Converted', backbone=dict(type='SmallNet'), kind='maconv',
                          input_shape=(3, 32, 32), init='keep'))


SEEN = {}


@HOOKS.register_module(force=True)
class RecordStartHook(Hook):
    """Records the model's eval-mode logits on a fixed input, and its state, when training starts."""

    def before_train(self, runner):
        model = runner.model
        model.eval()
        with torch.no_grad():
            SEEN['logits'] = model(SEEN['input'], mode='tensor')
        SEEN['state'] = copy.deepcopy(model.state_dict())
        model.train()


def test_runner_loads_the_pretrained_static_model_into_the_converted_one(tmp_path):
    """tools/train.py (an mmengine Runner) on the fine-tuning config: when training starts, the converted model is
    the static checkpoint's model."""
    cfg, static, path = trained_static(tmp_path)
    SEEN.clear()
    SEEN['input'] = torch.randn(2, 1, 32, 32)
    spec = importlib.util.spec_from_file_location('mdplug_tools_train', osp.join(ROOT, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    loaders = [f'{loader}.{opt}' for loader in ('train_dataloader', 'val_dataloader')
               for opt in ('dataset.indices=16', 'num_workers=0', 'persistent_workers=False')]
    opts = [f'model.backbone.backbone.init_cfg.checkpoint={path}', f'model.head.init_cfg.checkpoint={path}',
            'train_dataloader.batch_size=16', 'train_cfg.max_epochs=1', 'param_scheduler.T_max=1',
            'param_scheduler.end=1'] + loaders
    config = tmp_path / 'finetune_recorded.py'
    config.write_text(f"_base_ = {osp.join(FINETUNE, 'smallnet_x1_maconv.py')!r}\n"
                      "custom_hooks = [dict(type='RecordStartHook')]\n")
    saved = sys.argv
    sys.argv = ['tools/train.py', str(config), '--work-dir', str(tmp_path / 'work'), '--cfg-options'] + opts
    try:
        train.main()
    finally:
        sys.argv = saved
    with torch.no_grad():
        assert rel_err(SEEN['logits'], static(SEEN['input'])) <= 1e-5
    kernel = static.state_dict()['backbone.layer1.pointwise.conv.weight']
    w0 = SEEN['state']['backbone.layer1.pointwise.conv.expand.weight'][:kernel.shape[0]]
    torch.testing.assert_close(w0, kernel)


def test_a_missing_pretrained_checkpoint_is_a_clear_error(tmp_path):
    cfg = Config.fromfile(osp.join(FINETUNE, 'smallnet_x1_mdconv.py'))
    point_at(cfg, str(tmp_path / 'nowhere.pth'))
    with pytest.raises(FileNotFoundError, match=r"mdplug.Converted: .*'SmallNet'.*nowhere.pth.*does not exist.*"
                                                 r"model.backbone.backbone.init_cfg.checkpoint=PATH"):
        runtime.build_model(cfg)
    cfg.model.backbone.backbone.init_cfg = None  # what a tool loading a checkpoint of the converted model may do
    assert runtime.build_model(cfg) is not None
