"""A compact checkpoint of ``tools/deploy.py`` loaded through mmpretrain's own APIs (``get_model``, ``init_model``,
``ImageClassificationInferencer``) and ``tools/test.py`` is the compact model exactly, or a loud refusal naming the
layer; never a half-random model loaded non-strictly."""
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
from mmpretrain.apis import ImageClassificationInferencer, get_model, init_model  # noqa: E402

from mdplug.mmpretrain import runtime  # noqa: E402
from mdplug.nn import DCDConv2d, MAConv2d, MDConv2d  # noqa: E402
from mdplug.nn._state import CheckpointFormError  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
KINDS = {'mdconv': MDConv2d, 'dcd': DCDConv2d, 'maconv': MAConv2d}

pytestmark = pytest.mark.usefixtures('one_thread')


def config(kind):
    return osp.join(ROOT, f'configs/fashion_mnist/smallnet_x1_{kind}.py')


def trained_checkpoint(kind, path):
    """A training-form checkpoint with non-trivial BN statistics (as after training), mmengine's layout."""
    model = randomize_bn(runtime.build_model(Config.fromfile(config(kind)))).eval()
    torch.save({'meta': {'epoch': 1}, 'state_dict': model.state_dict()}, path)
    return model


def deploy(kind, checkpoint, out, monkeypatch):
    """``tools/deploy.py CONFIG CHECKPOINT OUT``, the real script, run in this process."""
    monkeypatch.setattr(sys, 'argv', ['tools/deploy.py', config(kind), checkpoint, out])
    runpy.run_path(osp.join(ROOT, 'tools/deploy.py'), run_name='__main__')
    return out


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """kind -> (training model, training checkpoint, compact checkpoint of tools/deploy.py)."""
    folder = tmp_path_factory.mktemp('forms')
    patch = pytest.MonkeyPatch()
    made = {}
    try:
        for kind in KINDS:
            torch.manual_seed(0)
            train = str(folder / f'{kind}.pth')
            model = trained_checkpoint(kind, train)
            made[kind] = (model, train, deploy(kind, train, str(folder / f'{kind}_compact.pth'), patch))
    finally:
        patch.undo()
    return made


def images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 32, 32)).astype(np.float32)


def logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x))


@pytest.mark.parametrize('kind', ['dcd', 'mdconv'])
def test_get_model_and_init_model_on_a_compact_checkpoint_are_the_compact_model(kind, checkpoints):
    trained, _, compact = checkpoints[kind]
    assert torch.load(compact, weights_only=True)['meta']['mdplug_form'] == 'compact'
    x = images()
    for model in (get_model(config(kind), pretrained=compact), init_model(config(kind), compact)):
        layers = [m for m in model.modules() if isinstance(m, KINDS[kind])]
        assert len(layers) == 3 and all(layer.deploy for layer in layers)
        torch.testing.assert_close(logits(model, x), logits(trained, x), atol=1e-5, rtol=1e-4)


def test_the_inferencer_on_a_compact_checkpoint_predicts_what_the_trained_model_does(checkpoints):
    _, train, compact = checkpoints['mdconv']
    # 28x28x1 pictures, which the config's pipeline pads to 32x32
    pictures = [img.transpose(1, 2, 0).astype(np.uint8)[2:30, 2:30] for img in images(4)]
    ours = ImageClassificationInferencer(config('mdconv'), pretrained=compact, device='cpu')(pictures)
    theirs = ImageClassificationInferencer(config('mdconv'), pretrained=train, device='cpu')(pictures)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a['pred_scores'], b['pred_scores'], atol=1e-6)


def test_a_maconv_compact_checkpoint_is_the_static_models_and_the_training_config_refuses_it(checkpoints):
    """tools/deploy.py's MAConv output is the static model's checkpoint (plain convs, biases folded into the BNs);
    into the MAConv training config it is refused (a plain conv's state is a static model's too), never half
    loaded; tools/test.py reads its meta and evaluates it as the compact model (test below)."""
    trained, _, compact = checkpoints['maconv']
    assert torch.load(compact, weights_only=True)['meta']['mdplug_form'] == 'static'
    static = get_model(osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_static.py'), pretrained=compact)
    x = images()
    torch.testing.assert_close(logits(static, x), logits(trained, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointFormError, match=r"MAConv2d 'backbone.layer1.pointwise.conv' received a plain "
                                                  r"conv's state .* Load it into the static model"):
        get_model(config('maconv'), pretrained=compact)


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize('edit, message', [
    (lambda s: without(s, 'backbone.layer2.pointwise.conv.weight2'),
     r"MDConv2d 'backbone.layer2.pointwise.conv': the checkpoint holds a compact form that does not match this "
     r"layer \(backbone.layer2.pointwise.conv.weight2 is missing\)"),
    (lambda s: dict(s, **{'backbone.layer1.pointwise.conv.weight1': torch.zeros(7, 16, 1, 1)}),
     r"backbone.layer1.pointwise.conv.weight1 has shape \(7, 16, 1, 1\), the layer \(20, 16, 1, 1\)\); build the "
     r"model with the options \(m, bypass, norm, ...\)"),
    (lambda s: dict(s, **{'backbone.layer3.pointwise.conv.expand.weight': torch.zeros(84, 32, 1, 1)}),
     r"MDConv2d 'backbone.layer3.pointwise.conv': the checkpoint holds both compact .* and expanding"),
], ids=['partial', 'other-m', 'mixed'])
def test_a_partial_or_mixed_checkpoint_is_refused_naming_the_layer(edit, message, checkpoints, tmp_path):
    _, _, compact = checkpoints['mdconv']
    ckpt = torch.load(compact, weights_only=True)
    bad = str(tmp_path / 'bad.pth')
    torch.save(dict(ckpt, state_dict=edit(ckpt['state_dict'])), bad)
    with pytest.raises(CheckpointFormError, match=message):
        get_model(config('mdconv'), pretrained=bad)  # mmengine loads non-strictly: the layer itself refuses


def test_a_compact_model_refuses_a_training_checkpoint(checkpoints):
    _, train, _ = checkpoints['mdconv']
    model = runtime.build_model(Config.fromfile(config('mdconv')))
    model.backbone.switch_to_deploy()
    with pytest.raises(CheckpointFormError, match=r"MDConv2d 'backbone.layer1.pointwise.conv' is in its compact "
                                                  r"\(deploy\) form but the checkpoint holds its expanding"):
        model.load_state_dict(torch.load(train, weights_only=True)['state_dict'])


def run_test_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    opts = ['--cfg-options', 'test_dataloader.dataset.indices=64', 'test_dataloader.num_workers=0']
    return subprocess.run([sys.executable, 'tools/test.py', *args, *opts], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not osp.isdir(FASHION_MNIST), reason='apt-get install dataset-fashion-mnist')
def test_tools_test_reads_the_form_from_the_checkpoint(checkpoints, tmp_path):
    _, train, compact = checkpoints['mdconv']
    outs = []
    for name, ckpt in (('train', train), ('compact', compact)):  # no --deployed for either
        outs.append(str(tmp_path / f'{name}.json'))
        proc = run_test_tool(config('mdconv'), ckpt, '--work-dir', str(tmp_path), '--out', outs[-1])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'holds the compact form: evaluated as the compact model' in proc.stdout + proc.stderr
    with open(outs[0]) as f, open(outs[1]) as g:
        assert f.read() == g.read()

    _, _, static = checkpoints['maconv']  # meta mdplug_form='static': the compact model of the MAConv config
    proc = run_test_tool(config('maconv'), static, '--work-dir', str(tmp_path))
    assert proc.returncode == 0 and 'holds the static form: evaluated as the compact model' in proc.stderr + \
        proc.stdout, proc.stderr[-3000:]



def test_tools_test_deployed_refuses_a_training_checkpoint(checkpoints, tmp_path, monkeypatch):
    """tools/test.py, the real script, run in this process: it refuses before building a Runner."""
    _, train, _ = checkpoints['mdconv']
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('LOCAL_RANK', '0')  # (the script sets it when absent)
    monkeypatch.setattr(sys, 'argv', ['tools/test.py', config('mdconv'), train, '--deployed', '--work-dir',
                                      str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(osp.join(ROOT, 'tools/test.py'), run_name='__main__')
    assert 'holds the training (expanding) form of the model, not a compact one: drop --deployed' in str(e.value.code)
