"""The attention's temperature is model state: a buffer in the state_dict, written by the annealing hook, saved by
training and restored by mmpretrain's own ``init_model`` / ``ImageClassificationInferencer`` (old checkpoints
without it still load, with the layer's value)."""
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from mdplug.nn import Attention, DYConv2d, MDConv2d, SEConv2d

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'

pytestmark = pytest.mark.usefixtures('one_thread')


def _temperatures(model):
    return [float(t) for n, t in model.named_buffers() if n.endswith('attention.temperature')]


@pytest.mark.parametrize('cls', [DYConv2d, MDConv2d, SEConv2d])
def test_temperature_is_a_buffer_that_loads_and_old_checkpoints_keep_the_value(cls):
    kwargs = {} if cls is SEConv2d else dict(temperature=30.0)
    layer = cls(8, 8, 3, padding=1, **kwargs).eval()
    x = torch.randn(2, 8, 6, 6)
    if cls is not SEConv2d:
        layer.set_temperature(2.5)
    state = layer.state_dict()
    assert 'attention.temperature' in state and state['attention.temperature'].dim() == 0
    fresh = cls(8, 8, 3, padding=1, **kwargs).eval()
    assert fresh.load_state_dict(state) is not None
    assert float(fresh.attention.temperature) == float(layer.attention.temperature)
    assert torch.equal(fresh(x), layer(x))
    # a checkpoint of before the buffer: loads strictly, the layer keeps the constructor's value
    old = {k: v for k, v in state.items() if not k.endswith('temperature')}
    legacy = cls(8, 8, 3, padding=1, **kwargs).eval()
    reference = legacy(x)
    result = legacy.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert float(legacy.attention.temperature) == (1.0 if cls is SEConv2d else 30.0)
    if cls is not SEConv2d:
        assert not torch.allclose(legacy(x), layer(x))
    assert legacy.load_state_dict(state) is not None and torch.equal(legacy(x), layer(x))
    assert not torch.equal(reference, layer(x)) or cls is SEConv2d


def test_every_write_to_the_buffer_reaches_the_forward():
    """The eager forward divides by a remembered float; writes to the buffer by any route are seen."""
    layer = DYConv2d(8, 8, 1, temperature=30.0).eval()
    x = torch.randn(2, 8, 5, 5)
    at = {}
    for t in (30.0, 4.0):
        layer.set_temperature(t)
        at[t] = layer(x)
    layer.set_temperature(30.0)
    layer.attention.temperature.fill_(4.0)                     # in place
    assert torch.equal(layer(x), at[4.0])
    layer.attention.temperature = torch.tensor(30.0)           # replaced
    assert torch.equal(layer(x), at[30.0])
    layer.load_state_dict({**layer.state_dict(), 'attention.temperature': torch.tensor(4.0)}, assign=True)
    assert torch.equal(layer(x), at[4.0])
    copy = torch.nn.Sequential(layer).double()[0]              # new buffers, rounded to the new dtype
    assert float(copy.attention.temperature) == 4.0
    torch.testing.assert_close(copy(x.double()).float(), at[4.0])


def test_traced_graphs_read_the_buffer():
    layer = DYConv2d(8, 8, 1, temperature=30.0).eval()
    x = torch.randn(2, 8, 5, 5)
    traced = torch.jit.trace(layer, x)
    layer.set_temperature(3.0)
    expected = layer(x)
    assert torch.equal(traced(x), expected)  # (the traced graph holds the same buffer)
    assert isinstance(layer.attention, Attention)


needs_fashion_mnist = pytest.mark.skipif(
    not osp.isfile(osp.join(FASHION_MNIST, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist '
           '(files in /usr/share/datasets/fashion-mnist)')


@pytest.fixture(scope='module')
def annealed_checkpoint(tmp_path_factory):
    """tools/train.py, 4 iterations of SmallNet-DYConv with DYConv's annealing (30 → 1 over 10 epochs)."""
    pytest.importorskip('mmpretrain')
    tmp = tmp_path_factory.mktemp('anneal')
    config = tmp / 'short.py'
    config.write_text(
        f"_base_ = '{ROOT}/configs/fashion_mnist/smallnet_x1_dyconv.py'\n"
        "train_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False, dataset=dict(\n"
        "    _delete_=True, type='PerClassSubset', fraction=0.001, seed=0,\n"
        "    dataset={{_base_.train_dataloader.dataset}}))\n"
        "val_dataloader = dict(batch_size=50, num_workers=0, persistent_workers=False, dataset=dict(\n"
        "    _delete_=True, type='PerClassSubset', fraction=0.005, seed=0,\n"
        "    dataset={{_base_.val_dataloader.dataset}}))\n"
        "train_cfg = dict(max_epochs=1)\n"
        "param_scheduler = dict(T_max=1, end=1)\n"
        "randomness = dict(seed=0)\n")
    work = tmp / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return str(config), str(work / 'epoch_1.pth')


@needs_fashion_mnist
def test_annealed_temperature_reaches_mmpretrain_init_model_and_inferencer(annealed_checkpoint):
    from mmengine.config import Config
    from mmpretrain.apis import ImageClassificationInferencer, init_model

    from mdplug.mmpretrain import runtime

    config, checkpoint = annealed_checkpoint
    runtime.allow_mmengine_checkpoints()  # (mmengine's checkpoints hold a HistoryBuffer; see issue 15, item 6)
    state = runtime.load_state_dict(checkpoint)
    saved = [float(v) for k, v in state.items() if k.endswith('attention.temperature')]
    # 4 iterations of 1 epoch into a 10-epoch schedule from 30 to 1: the last one ran at 30 - 29·(3/4)/10
    assert saved == [pytest.approx(30 - 29 * 0.075)] * 3
    trained = saved[0]

    model = init_model(config, checkpoint, device='cpu')
    assert _temperatures(model) == [trained] * 3
    reference = runtime.build_model(Config.fromfile(config))
    assert _temperatures(reference) == [30.0] * 3
    reference.load_state_dict(state, strict=True)
    reference.eval()

    inferencer = ImageClassificationInferencer(config, pretrained=checkpoint, device='cpu')
    assert _temperatures(inferencer.model) == [trained] * 3
    images = [(np.random.RandomState(i).rand(28, 28, 1) * 255).astype(np.uint8) for i in range(3)]
    results = inferencer(images)
    x = torch.stack([torch.from_numpy(np.pad(im[:, :, 0], 2)).float()[None] for im in images])
    with torch.no_grad():
        inputs = model.data_preprocessor({'inputs': list(x)}, False)['inputs']  # (the config's normalisation)
        logits, logits_init = reference(inputs, mode='tensor'), model(inputs, mode='tensor')
    expected = torch.softmax(logits, 1)
    torch.testing.assert_close(logits_init, logits)
    for r, e in zip(results, expected):
        np.testing.assert_allclose(r['pred_scores'], e.numpy(), rtol=1e-5, atol=1e-6)
