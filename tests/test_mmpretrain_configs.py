"""Every config under configs/ loads, its model builds and runs forward; its data_root can be overridden."""
import glob
import os.path as osp

import pytest
import torch

pytest.importorskip('mmpretrain')
from mmengine.config import Config  # noqa: E402

import mdplug.mmpretrain  # noqa: E402,F401
from mdplug.mmpretrain import runtime  # noqa: E402
from mdplug.nn import LAYERS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
                 if '_base_' not in p)
SMALL_IMAGENET = 64  # ImageNet models run at 64x64 to keep the test fast


pytestmark = pytest.mark.usefixtures('one_thread')


def test_one_config_per_table_row():
    names = {osp.relpath(p, osp.join(ROOT, 'configs')) for p in CONFIGS}
    assert len(names) >= 130
    for expected in ('imagenet/mobilenet_v2_x05_mdconv.py', 'imagenet/shufflenet_v2_x15_dyconv.py',
                     'imagenet/resnet18_maconv.py', 'imagenet/mobilenet_v2_x10_dcd_data10.py',
                     'imagenet/mobilenet_v2_x10_se.py', 'cifar10/mobilenet_v2_cifar_x01_dcd.py',
                     'cifar100/mobilenet_v2_cifar_x035_mdconv.py', 'svhn/mobilenet_v2_cifar_x035_maconv.py',
                     'ablation/smallnet_x6_mdconv.py', 'ablation/smallnet_x1_mdconv_softmax_t30.py',
                     'ablation/mobilenet_v2_cifar_x035_relu_nobypass.py', 'fashion_mnist/smallnet_x1_dcd.py'):
        assert expected in names


def test_generated_configs_are_up_to_date(tmp_path, monkeypatch):
    """configs/ is what tools/gen_configs.py writes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('gen_configs', osp.join(ROOT, 'tools', 'gen_configs.py'))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, 'ROOT', str(tmp_path))
    writer = gen.Writer()
    for section in (gen.imagenet, gen.cifar, gen.ablation, gen.fashion_mnist):
        section(writer)
    gen.write_index(writer)
    for rel in writer.written + ['README.md']:
        with open(tmp_path / rel) as fresh, open(osp.join(ROOT, 'configs', rel)) as committed:
            assert fresh.read() == committed.read(), f'configs/{rel} is stale: run tools/gen_configs.py'


def pretrained_parts(model_cfg):
    """The parts of a model config with an ``init_cfg=dict(type='Pretrained')`` (the fine-tuning configs)."""
    parts = [model_cfg.get('backbone'), model_cfg.get('head'), (model_cfg.get('backbone') or {}).get('backbone')]
    return [p for p in parts if isinstance(p, dict) and (p.get('init_cfg') or {}).get('type') == 'Pretrained']


def point_pretrained_at_a_written_checkpoint(cfg, tmp_path):
    """Write the static model's checkpoint that the config's ``Pretrained`` init_cfgs load, and point them at it."""
    parts = pretrained_parts(cfg.model)
    if not parts:
        return
    static_cfg = mdplug.mmpretrain.unwrap_converted(cfg.model)
    for part in pretrained_parts(static_cfg):
        part.pop('init_cfg')
    path = str(tmp_path / 'static.pth')
    torch.save({'state_dict': runtime.build_model(Config(dict(cfg.to_dict(), model=static_cfg))).state_dict()}, path)
    for part in parts:
        part['init_cfg']['checkpoint'] = path


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, osp.join(ROOT, 'configs')))
def test_config_builds_and_runs_forward(path, tmp_path):
    cfg = Config.fromfile(path)
    point_pretrained_at_a_written_checkpoint(cfg, tmp_path)
    channels, height, width = runtime.input_shape(cfg)
    if height > SMALL_IMAGENET:
        height = width = SMALL_IMAGENET
        if cfg.model.backbone.type == 'mdplug.Converted':
            cfg.model.backbone.input_shape = (channels, height, width)  # the conversion pass traces at this size
    model = runtime.build_model(cfg)
    model.init_weights()
    backbone = cfg.model.backbone
    if backbone.type == 'mdplug.Converted':
        layer = LAYERS[backbone.kind]
        assert any(isinstance(m, layer) for m in model.backbone.modules())
        assert type(model.backbone).__name__ == backbone.backbone.type  # the backbone keeps its class
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, height, width))
    assert logits.shape == (2, cfg.model.head.num_classes)
    assert torch.isfinite(logits).all()

    runtime.set_data_root(cfg, '/elsewhere')
    roots = [dataset['data_root'] for _, dataset in runtime.dataset_cfgs(cfg)]
    assert roots and all(root == '/elsewhere' for root in roots)
