"""``nn.SyncBatchNorm.convert_sync_batchnorm`` (what mmengine's ``sync_bn='torch'`` and timm's ``--sync-bn`` run
before DDP) reaches the BatchNorms inside the converted layers, and training then calls each of them: no fast path
normalises with their parameters while skipping the synchronising module. (Its cross-process reduction needs CUDA
tensors; without a process group SyncBatchNorm computes what BatchNorm2d does, which the test compares against.)"""
import copy

import pytest
import timm
import torch
from torch import nn

from _models import relative_diff, small_input
from mdplug.convert import compact, convert


@pytest.mark.parametrize('kind', ['maconv', 'mdconv', 'dcd'])
def test_sync_batchnorm_inside_converted_layers_is_called_in_training(kind, monkeypatch):
    torch.manual_seed(0)
    model = convert(timm.create_model('resnet18', num_classes=10), kind, init='fresh')
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    calls = []
    forward = nn.SyncBatchNorm.forward

    def counting(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(nn.SyncBatchNorm, 'forward', counting)
    x = small_input(4)
    model.train(), synced.train()
    out, out_synced = model(x), synced(x)
    bns = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert {id(m) for m in calls} == {id(m) for m in bns} and len(calls) == len(bns)
    assert relative_diff(out_synced, out) < 1e-5
    out_synced.sum().backward()
    synced.eval(), model.eval()
    with torch.no_grad():
        assert relative_diff(synced(x), model(x)) < 1e-5
        assert relative_diff(compact(synced)(x), model(x)) < 1e-4
