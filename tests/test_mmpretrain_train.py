"""A short real training on Fashion-MNIST learns: SmallNet with MDConv, 10 % of the training set, one epoch.

The paper's CIFAR recipe (SGD 0.1, momentum 0.9, cosine to zero) with the cosine compressed into the one epoch:
at a constant lr of 0.1 the BN running statistics after ~190 iterations still lag the weights, and the eval-mode
accuracy swings between runs.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

pytest.importorskip('mmpretrain')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


needs_fashion_mnist = pytest.mark.skipif(
    not osp.isfile(osp.join(FASHION_MNIST, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist '
           '(files in /usr/share/datasets/fashion-mnist)')


def _short_config(tmp_path, fraction, val_fraction=0.2):
    config = tmp_path / 'short.py'
    config.write_text(
        f"_base_ = '{ROOT}/configs/fashion_mnist/smallnet_x1_mdconv.py'\n"
        "train_dataloader = dict(batch_size=32, num_workers=0, persistent_workers=False, dataset=dict(\n"
        f"    _delete_=True, type='PerClassSubset', fraction={fraction}, seed=0,\n"
        "    dataset={{_base_.train_dataloader.dataset}}))\n"
        "val_dataloader = dict(batch_size=500, num_workers=0, persistent_workers=False, dataset=dict(\n"
        f"    _delete_=True, type='PerClassSubset', fraction={val_fraction}, seed=0,\n"
        "    dataset={{_base_.val_dataloader.dataset}}))\n"
        "test_dataloader = val_dataloader\n"
        "train_cfg = dict(max_epochs=1)\n"
        "param_scheduler = dict(T_max=1, end=1)\n"
        "randomness = dict(seed=0)\n")
    return config


def _train(config, work, *extra):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir', work, *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = next(osp.join(d, f) for d, _, files in os.walk(work) for f in files
               if f.endswith('.json') and f != 'scalars.json')
    with open(log) as f:
        return [json.loads(line) for line in f], proc.stdout + proc.stderr


@needs_fashion_mnist
def test_smallnet_mdconv_learns_fashion_mnist_in_one_epoch(tmp_path):
    records, _ = _train(_short_config(tmp_path, 0.1), str(tmp_path / 'work'))
    top1 = [s['accuracy/top1'] for s in records if 'accuracy/top1' in s][-1]
    assert top1 > 50, f'accuracy {top1} % after one epoch on 6000 images (2000 evaluated); chance is 10 %'


@needs_fashion_mnist
def test_amp_without_cuda_trains_under_bfloat16_autocast(tmp_path):
    """``--amp`` on a machine without CUDA: mmengine's AmpOptimWrapper refuses, mdplug's CPU wrapper runs."""
    records, out = _train(_short_config(tmp_path, 0.002, 0.02), str(tmp_path / 'work'), '--amp')  # 4 steps
    assert 'CPUAmpOptimWrapper' in out
    losses = [s['loss'] for s in records if 'loss' in s]
    assert losses and all(l == l and l < 1e3 for l in losses)
