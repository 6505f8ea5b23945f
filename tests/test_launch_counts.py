"""The launch count of tools/benchmark.py (non-view aten ops one call dispatches: on a GPU each is at least one
kernel launch) means what it says on tiny models, and the layers stay within the launch budgets of issue 17:
compact MDConv forward ≤ static + 8 per converted layer, and, on the path CUDA trains by default (plain
autograd), an MDConv training step ≤ 3.5× the static step (mobilenetv2_100 and resnet18).  Counts are
deterministic: no timing here."""
import copy
import os.path as osp
import sys

import pytest
import torch
from torch import nn

import mdplug
from mdplug.convert import compact, convert
from _models import build

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
import benchmark  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def total(fn):
    return sum(benchmark.launches(fn).values())


def test_one_conv_dispatches_one_op_and_views_detach_empty_count_nothing():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert benchmark.launches(lambda: conv(x)) == {'conv2d': 1}
        # views, detach and allocations launch nothing; a cat copies
        assert total(lambda: (conv(x).view(2, -1).t().detach(), torch.empty(3), x[:, :1], x.permute(0, 2, 3, 1)))\
            == 1
        assert total(lambda: torch.cat([conv(x), conv(x)[:, :1]], 1)) == 3
    assert benchmark.launches(lambda: conv(x)) == {'convolution': 1}  # grad mode: below autograd


def test_a_static_training_step_counts_forward_backward_and_one_optimizer_update():
    """conv → flatten → linear → cross-entropy, backward, SGD step: every op of the step once, the parameter
    update as one multi-tensor op (``foreach``, as SGD runs on CUDA)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    step = benchmark.train_step(model, torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)), foreach=True)
    step()
    assert benchmark.launches(step) == {
        'convolution': 1, 'addmm': 1, '_log_softmax': 1, 'nll_loss_forward': 1,       # forward
        'ones_like': 1, 'nll_loss_backward': 1, '_log_softmax_backward_data': 1,    # backward of the loss
        'mm': 2, 'sum': 1,                                                           # linear's backward
        'convolution_backward': 1, '_foreach_add_': 1}


@pytest.mark.parametrize('name,select', [('mobilenetv2_100', 'pointwise'), ('resnet18', 'spatial')])
def test_compact_mdconv_forward_stays_within_eight_launches_per_layer(name, select):
    """Every compact path (batch 1: the one-sample matmuls; batch 4: per-sample kernels and the factorized forms)
    adds at most 8 launches per converted conv to the static model's; MAConv's compact model is the static
    network, launch for launch."""
    static = build(name).eval()
    x = {b: torch.randn(b, 3, 64, 64) for b in (1, 4)}
    # (built outside inference mode, as models are: a buffer made inside it is an inference tensor, whose writes
    # cannot be tracked, so the attention would read its temperature at every call)
    maconv = compact(convert(copy.deepcopy(static), kind='maconv', select=select)).eval()
    model = compact(convert(copy.deepcopy(static), kind='mdconv', select=select)).eval()
    with torch.inference_mode():
        base = {b: total(lambda: static(x[b])) for b in x}
        assert all(total(lambda: maconv(x[b])) == base[b] for b in x)
        layers = [m for m in model.modules() if isinstance(m, mdplug.MDConv2d)]
        for path in ('auto', 'weight', 'factorized'):
            for layer in layers:
                layer.path = path
            for b in x:
                extra = (total(lambda: model(x[b])) - base[b]) / len(layers)
                assert extra <= 8, (path, b, extra)


@pytest.mark.parametrize('name,select', [('mobilenetv2_100', 'pointwise'), ('resnet18', 'spatial')])
def test_mdconv_training_step_on_the_cuda_default_path_stays_within_3_5x_static(name, select):
    """The training step of the expanding MDConv model on plain autograd, CUDA's default
    (``fuse_training_tail=None`` off the CPU), dispatches at most 3.5× the static step's ops, and at most 25 ops
    per converted layer beyond it (MAConv: 9); the fused functions (the CPU's default) dispatch more (their reason
    is memory and CPU time, not launches).  resnet18's static step has the fewer launches per converted conv, so
    the ratio binds there (×3.44 against mobilenetv2_100's ×3.08)."""
    static = build(name)
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))

    def count(model):
        step = benchmark.train_step(model.train(), x, target, foreach=True)
        step()
        return total(step)

    base = count(copy.deepcopy(static))
    md = convert(copy.deepcopy(static), kind='mdconv', select=select)
    layers = sum(isinstance(m, mdplug.MDConv2d) for m in md.modules())
    plain = count(benchmark.force_training_path(copy.deepcopy(md), False))
    fused = count(benchmark.force_training_path(copy.deepcopy(md), True))
    maconv = count(benchmark.force_training_path(convert(copy.deepcopy(static), kind='maconv', select=select), False))
    assert plain <= 3.5 * base, (plain, base)
    assert plain - base <= 25 * layers and maconv - base <= 9 * layers, (plain, maconv, base, layers)
    assert fused > plain


def test_fused_training_default_follows_the_device():
    """``fuse_training_tail=None`` (the default) takes the fused functions where ``_fused.DEVICES`` lists the
    parameters' device (the CPU, where they were measured to win) and plain autograd elsewhere (here the meta
    device stands in for CUDA); True and False force either."""
    from mdplug.nn import _fused
    assert _fused.DEVICES == ('cpu',)
    for cls in (mdplug.MDConv2d, mdplug.MAConv2d):
        cpu, meta = cls(4, 8, 1, m=3).train(), cls(4, 8, 1, m=3, device='meta').train()
        assert cpu.fuse_training_tail is None and cpu._use_fused_tail() and not meta._use_fused_tail()
        meta.fuse_training_tail, cpu.fuse_training_tail = True, False
        assert meta._use_fused_tail() and not cpu._use_fused_tail()
