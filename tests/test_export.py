"""Export of the compact form: ONNX with a dynamic batch axis, torch.export with a dynamic batch, torch.compile."""
import copy
import json

import pytest
import torch
from torch import nn

from conftest import randomize_bn, rel_err
from mdplug.convert import compact, convert
from mdplug.export import check_onnx, export_onnx, export_program, onnx_op_counts, prepare

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

SIZE = (3, 16, 16)


def small_net() -> nn.Module:
    """A stem, a 1×1 conv with BN, a strided 3×3 conv, a 1×1 conv with bias, a head: every case of the layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def converted(kind: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(convert(small_net(), kind=kind, select='all', init='fresh', **kwargs)).eval()


class _Probe(nn.Module):
    """Records, at each forward, what mdplug's and torch's ONNX-export checks answer."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        from mdplug.nn._common import _in_onnx_export
        self.seen.append((_in_onnx_export(), torch.onnx.is_in_onnx_export()))
        return x + 1


def test_onnx_export_state_is_read_like_torch_reads_it(tmp_path):
    """The layers' cheap ONNX-export check agrees with ``torch.onnx.is_in_onnx_export`` outside and during an
    export (the TorchScript-based exporter mdplug.export uses)."""
    probe = _Probe()
    probe(torch.zeros(1))
    torch.onnx.export(probe, (torch.zeros(1),), str(tmp_path / 'p.onnx'), dynamo=False)
    probe(torch.zeros(1))
    assert probe.seen[0] == (False, False) and probe.seen[-1] == (False, False)
    assert (True, True) in probe.seen[1:-1], probe.seen


@pytest.mark.parametrize('kind', ['mdconv', 'maconv', 'dyconv', 'dcd', 'se'])
def test_onnx_round_trip_at_several_batch_sizes(kind, tmp_path):
    """One ONNX file (exported at batch 2) matches PyTorch at batch 1, 3 and 16."""
    model = converted(kind)
    path = export_onnx(model, str(tmp_path / f'{kind}.onnx'), SIZE)
    errors = check_onnx(path, model, (1, 3, 16), SIZE)
    assert set(errors) == {1, 3, 16}
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize('path', ['weight', 'factorized'])
def test_onnx_mdconv_every_path(path, tmp_path):
    model = compact(converted('mdconv'))
    for m in model.modules():
        if hasattr(m, 'compact_path'):
            m.path = path
    out = export_onnx(model, str(tmp_path / 'm.onnx'), SIZE)
    assert max(check_onnx(out, model, (1, 3, 16), SIZE).values()) <= 1e-4


def test_maconv_compact_exports_as_the_static_model(tmp_path):
    """MAConv's compact form is the static network: its ONNX graph has the static one's ops, all plain Conv."""
    torch.manual_seed(0)
    static = randomize_bn(small_net()).eval()
    ma = randomize_bn(convert(copy.deepcopy(static), kind='maconv', select='all')).eval()
    ops_static = onnx_op_counts(export_onnx(static, str(tmp_path / 's.onnx'), SIZE))
    ops_ma = onnx_op_counts(export_onnx(ma, str(tmp_path / 'a.onnx'), SIZE))
    assert ops_ma == ops_static
    assert set(ops_ma) <= {'Conv', 'Relu', 'GlobalAveragePool', 'Flatten', 'Gemm', 'Identity', 'Constant'}


@pytest.mark.parametrize('kind', ['mdconv', 'maconv', 'dcd', 'dyconv'])
def test_torch_export_dynamic_batch(kind):
    model = converted(kind)
    ep = export_program(model, SIZE)
    ref = prepare(model)
    run = ep.module()
    for b in (1, 3, 6):
        x = torch.randn(b, *SIZE)
        with torch.no_grad():
            assert rel_err(run(x), ref(x)) < 1e-5, b


def test_export_accepts_mobilenetv2(tmp_path):
    """A real network (timm mobilenetv2_050, MDConv on its pointwise convs) round-trips at batch 1, 3, 16."""
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = randomize_bn(convert(timm.create_model('mobilenetv2_050'), kind='mdconv')).eval()
    size = (3, 32, 32)
    path = export_onnx(model, str(tmp_path / 'mnv2.onnx'), size)
    assert max(check_onnx(path, model, (1, 3, 16), size).values()) <= 1e-4


def test_cli_export(tmp_path, capsys):
    from mdplug.cli import main
    out = tmp_path / 'cli.onnx'
    rc = main(['export', '--model', 'mobilenetv2_050', '--kind', 'maconv', '--onnx', str(out),
               '--input-size', '3', '32', '32', '--check-batch', '1', '3', '--json'])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r['ok'] and out.exists()
    assert set(r['rel_err']) == {'1', '3'}
    assert 'MatMul' not in r['ops'] and r['ops']['Conv'] > 0


# -- torch.compile (kept tiny: compiling is slow on small CPUs) -----------------------------------------------
def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    return convert(net, kind=kind, select='all', keep_stem=False, keep_head=False, init='fresh',  # every branch live
                   example_inputs=torch.randn(1, 4, 8, 8))  # a 4-channel net: the default 3-channel image cannot run


@pytest.mark.filterwarnings('ignore')
def test_compile_compact_matches_eager():
    model = compact(randomize_bn(tiny('mdconv')).eval())
    compiled = torch.compile(model)
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


@pytest.mark.filterwarnings('ignore')
def test_compile_expanding_matches_eager():
    """Training-mode forward (batch statistics) and input gradient of the compiled expanding form."""
    model = tiny('mdconv').train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = compiled(x), twin(x2)
    assert rel_err(y, y2) < 1e-5
    y.square().sum().backward()
    y2.square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-4
