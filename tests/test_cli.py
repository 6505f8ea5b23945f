"""The ``mdplug`` command, run as a subprocess, and the checkpoints it writes."""
import json
import re
import os
import subprocess
import sys

import pytest
import timm
import torch

import mdplug.convert.checkpoint as ckpt
from mdplug.nn import MAConv2d

ENV = dict(os.environ, PYTHONWARNINGS='ignore')


def mdplug(*args):
    return subprocess.run([sys.executable, '-m', 'mdplug.cli', *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_convert_prints_a_table():
    r = mdplug('convert', '--model', 'mobilenetv2_050', '--input-size', '3', '96', '96', '-v')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'mobilenetv2_050 -> mdconv' in out and '33 convs replaced' in out
    for form in ('static', 'expanding', 'compact'):
        assert form in out
    assert 'blocks.1.0.conv_pw' in out and 'keep_head=True' in out  # -v lists every conv
    assert '-> OK' in out


def test_convert_json():
    r = mdplug('convert', '--model', 'resnet18', '--kind', 'maconv', '--select', 'spatial', '--m', '8',
               '--input-size', '3', '64', '64', '--json')
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {'model', 'kind', 'replaced', 'params', 'macs', 'max_abs_diff'} <= set(d)
    assert d['model'] == 'resnet18' and d['kind'] == 'maconv' and len(d['replaced']) == 16
    assert set(d['params']) == set(d['macs']) == {'static', 'expanding', 'compact'}
    assert d['params']['compact'] == d['params']['static'] and d['macs']['compact'] == d['macs']['static']
    assert d['params']['expanding'] > d['params']['static']
    assert d['max_abs_diff'] <= 1e-4 * d['max_abs_out']


def test_torchvision_model():
    r = mdplug('convert', '--model', 'torchvision:shufflenet_v2_x0_5', '--input-size', '3', '64', '64', '--json')
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)['replaced']) == 35


@pytest.mark.parametrize('args,message', [
    (('--model', 'mobilenetv2_10'), "unknown model 'mobilenetv2_10'.*close matches: .*mobilenetv2_100"),
    (('--model', 'torchvision:resnet1'), "unknown torchvision model 'resnet1'.*resnet18"),
    (('--model', 'vit_tiny_patch16_224'), r'nothing matched select=.*patch_embed\.proj.*nn\.Linear'),
    (('--model', 'configs/does_not_exist.py'), 'does not exist'),
    (('--model', 'resnet18', '--checkpoint', 'missing.pth'), "checkpoint 'missing.pth' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = mdplug('convert', *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('mdplug convert: error:')
    import re
    assert re.search(message, lines[0]), lines[0]


def test_checkpoint_that_does_not_match(tmp_path):
    bad = tmp_path / 'other.pth'
    torch.save(timm.create_model('resnet10t').state_dict(), bad)
    r = mdplug('convert', '--model', 'resnet18', '--checkpoint', str(bad))
    assert r.returncode == 2 and 'does not match resnet18' in r.stderr


def test_out_compact_and_load(tmp_path):
    """convert --out (expanding) → compact --checkpoint → mdplug.load; MAConv compact loads into timm's model."""
    static = tmp_path / 'static.pth'
    torch.save(timm.create_model('mobilenetv2_050').state_dict(), static)
    exp, comp = tmp_path / 'exp.pth', tmp_path / 'comp.pth'
    r = mdplug('convert', '--model', 'mobilenetv2_050', '--kind', 'maconv', '--m', '8', '--checkpoint', str(static),
               '--input-size', '3', '64', '64', '--out', str(exp))
    assert r.returncode == 0, r.stderr
    raw = torch.load(exp, weights_only=True)
    assert raw['meta']['form'] == 'expanding' and raw['meta']['kind'] == 'maconv'
    assert raw['meta']['options']['layer_kwargs'] == {'m': 8}

    expanding = ckpt.load(str(exp))
    assert isinstance(expanding.blocks[1][0].conv_pw, MAConv2d) and not expanding.training

    r = mdplug('compact', '--checkpoint', str(exp), '--out', str(comp), '--json')
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d['folded_bias'] == 33 and d['notes'] == []

    compacted = ckpt.load(str(comp))
    plain = timm.create_model('mobilenetv2_050').eval()
    plain.load_state_dict(torch.load(comp, weights_only=True)['state_dict'], strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = expanding(x)
        assert (compacted(x) - y).abs().max() <= 1e-4 * y.abs().max()
        assert torch.equal(compacted(x), plain(x))

    r = mdplug('compact', '--checkpoint', str(comp), '--out', str(tmp_path / 'again.pth'))
    assert r.returncode == 2 and 'already' in r.stderr
    r = mdplug('compact', '--checkpoint', str(static), '--out', str(tmp_path / 'x.pth'))
    assert r.returncode == 2 and 'not an mdplug checkpoint' in r.stderr


def test_compact_form_out_for_mdconv(tmp_path):
    out = tmp_path / 'md.pth'
    r = mdplug('convert', '--model', 'mobilenetv3_small_050', '--form', 'compact', '--input-size', '3', '64', '64',
               '--out', str(out))
    assert r.returncode == 0, r.stderr
    model = ckpt.load(str(out))
    assert all(getattr(m, 'deploy', True) for m in model.modules() if type(m).__name__ == 'MDConv2d')
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_load_rejects_a_tampered_checkpoint(tmp_path):
    out = tmp_path / 'x.pth'
    model = timm.create_model('mobilenetv2_050')
    ckpt.save(model, str(out), dict(model='mobilenetv2_050', kind='maconv', form='expanding',
                                    options=dict(select='pointwise')))
    with pytest.raises(ckpt.CheckpointError, match='does not match mobilenetv2_050'):
        ckpt.load(str(out))


def test_mobilenetv2_100_default_command():
    """The README's main job (its speed is measured by tools/benchmark.py, not asserted here)."""
    r = subprocess.run([sys.executable, '-m', 'mdplug.cli', 'convert', '--model', 'mobilenetv2_100'],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert '33 convs replaced' in r.stdout and '-> OK' in r.stdout
    # the paper's Table 1 row (3.5M / 300M static; MDConv 5.0M / 335M counted with a per-sample kernel everywhere)
    assert re.search(r'static\s+3\.50M\s+300\.77M', r.stdout)
    assert re.search(r'compact\s+5\.06M\s+320\.49M', r.stdout)
    assert re.search(r"336\.45M\s+\(compact, path='weight' everywhere: the paper's accounting", r.stdout)
