"""The compiled path (issue 17, item 3): ``torch.compile(model, fullgraph=True)`` of the expanding and the compact
form of every kind traces in one graph with no host sync, does not recompile across batch sizes with a dynamic
batch (``dynamic=True`` or ``torch._dynamo.mark_dynamic``) and computes what the eager model does; timm's
``--torchcompile`` style (``torch.compile(model)`` after convert) runs under the real inductor backend; an mmengine
config with ``compile`` trains.  Graph checks use Dynamo without code generation (a recording backend) to stay
fast on a small CPU."""
import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import rel_err
from mdplug.convert import compact, convert

pytestmark = pytest.mark.usefixtures('one_thread')

KINDS = ('mdconv', 'maconv', 'dyconv', 'dcd', 'se')


def tiny() -> nn.Module:
    """A stem, then a 1×1 conv with q > p, a strided 3×3 and a 1×1 with q < p (the layers' distinct paths)."""
    def block(p, q, k, s=1):
        return [nn.Conv2d(p, q, k, s, k // 2, bias=False), nn.BatchNorm2d(q), nn.ReLU()]
    return nn.Sequential(*block(3, 8, 3), *block(8, 16, 1), *block(16, 16, 3, 2), *block(16, 8, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def model_of(kind: str, form: str, path: str = 'auto') -> nn.Module:
    torch.manual_seed(0)
    model = convert(tiny(), kind=kind, select='all')
    if form == 'compact':
        model = compact(model).eval()
        for m in model.modules():
            if hasattr(m, 'path'):
                m.path = path
    else:
        model.train()
    return model


class Recorder:
    """A Dynamo backend that keeps every graph it is handed and runs it as it is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


HOST_SYNCS = {'item', 'tolist', 'cpu', 'numpy'}


def run(model, x, form, mark=False):
    """Output and, in training, the input's and every parameter's gradient of one call; ``mark``: the batch axis
    marked dynamic."""
    x = x.clone()
    if mark:
        torch._dynamo.mark_dynamic(x, 0)
    if form == 'compact':
        with torch.no_grad():
            return [model(x)]
    x.requires_grad_()
    y = model(x)
    y.square().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [y] + grads


def close(got, want, what):
    """Equal to rounding (training: traced, the layers take plain autograd, eager on the CPU the fused functions);
    gradients that are zero in exact arithmetic (a BN's input mean) are rounding noise of about 1e-9."""
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-7, what


CASES = [(k, 'expanding', 'auto') for k in KINDS] + [(k, 'compact', 'auto') for k in KINDS] + [
    (k, 'compact', p) for k in ('mdconv', 'dcd', 'dyconv') for p in ('weight', 'factorized')]


@pytest.mark.parametrize('kind,form,path,how', [c + ('dynamic=True',) for c in CASES] + [
    ('mdconv', 'expanding', 'auto', 'mark_dynamic'), ('mdconv', 'compact', 'auto', 'mark_dynamic')])
def test_compiles_in_one_graph_without_host_syncs_or_recompiles(kind, form, path, how):
    eager = model_of(kind, form, path)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=True if how == 'dynamic=True' else None)
    for i, b in enumerate((2, 3, 5)):
        x = torch.randn(b, 3, 8, 8)
        with torch.compiler.set_stance('fail_on_recompile' if i else 'default'):
            got = run(compiled, x, form, mark=how == 'mark_dynamic')
        want = run(eager, x, form)
        close(got, want, (kind, form, path, b))
    assert len(rec.graphs) == 1
    # a tensor computed in the graph read back to the host (a float attribute such as a BN's momentum enters a
    # dynamic=True graph as an input that Dynamo reads with .item(): no device sync, allowed)
    syncs = [n.format_node() for n in rec.graphs[0].graph.nodes
             if str(n.target) in HOST_SYNCS and any(a.op != 'placeholder' for a in n.all_input_nodes)]
    assert not syncs, syncs


def test_timm_style_torch_compile_after_convert_runs_under_inductor():
    """``torch.compile(model)`` after convert, as timm's ``--torchcompile``: the real inductor backend (C++ code
    generation) on the compact MDConv model; a training step of the expanding one through AOT autograd (the
    joint forward and backward graph inductor would generate code for, here run without code generation)."""
    eager = model_of('mdconv', 'compact')
    compiled = torch.compile(copy.deepcopy(eager))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(compiled(x), eager(x)) < 1e-4
    eager = model_of('mdconv', 'expanding')
    compiled = torch.compile(copy.deepcopy(eager), backend='aot_eager')
    close(run(compiled, x, 'expanding'), run(eager, x, 'expanding'), 'aot_eager training')


def test_mmengine_config_with_compile_trains(tmp_path):
    """The Runner's ``compile`` option in a config (``compile = True`` takes inductor; here Dynamo with its eager
    backend, the same tracing without code generation) compiles ``train_step`` of a SmallNet made of MDConv
    layers and trains it through tools/train.py."""
    pytest.importorskip('mmpretrain')
    from test_mmpretrain_train import _short_config, _train, needs_fashion_mnist
    if needs_fashion_mnist.args[0]:
        pytest.skip(needs_fashion_mnist.kwargs['reason'])
    config = _short_config(tmp_path, 0.002, 0.02)  # 120 images: 3 batches of 32 and one of 24 (a new shape)
    config.write_text(config.read_text() + "compile = dict(backend='eager')\n")
    records, out = _train(config, str(tmp_path / 'work'))
    assert 'Model has been "compiled"' in out
    losses = [r['loss'] for r in records if 'loss' in r]
    assert losses and all(0 < v < 10 for v in losses)
    assert [r for r in records if 'accuracy/top1' in r]
