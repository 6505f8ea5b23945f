"""timm integration: registered entry points and timm's reparameterize_model on converted models."""
import copy

import timm
import torch
from timm.utils import reparameterize_model

import mdplug.timm as mt
from _models import calibrate_bn, relative_diff, small_input
from mdplug.convert import convert
from mdplug.nn import LAYERS, MAConv2d, MDConv2d


def test_entry_points_are_registered():
    names = mt.registered_names()
    assert {'mobilenetv2_100_mdconv', 'mobilenetv2_050_maconv', 'resnet18_dyconv'} <= set(names)
    assert set(timm.list_models('*_mdconv')) >= {'mobilenetv2_050_mdconv', 'mobilenetv2_100_mdconv', 'resnet18_mdconv'}
    assert len(names) == len(mt.PAPER_ARCHS) * len(LAYERS)
    assert all(timm.is_model(n) for n in names)


def test_create_model_builds_the_paper_variants():
    m = timm.create_model('mobilenetv2_050_mdconv', num_classes=10, m=12)
    assert type(m).__name__ == 'EfficientNet' and m.num_classes == 10
    layers = [x for x in m.modules() if isinstance(x, MDConv2d)]
    assert len(layers) == 33 and all(x.m == 12 for x in layers)
    r = timm.create_model('resnet18_maconv')
    assert sum(isinstance(x, MAConv2d) for x in r.modules()) == 16 and isinstance(r.layer1[0].conv2, MAConv2d)


def test_reparameterize_model_gives_the_compact_form():
    x = small_input()
    for kind in ('maconv', 'mdconv'):
        m = convert(timm.create_model('mobilenetv2_050'), kind, m=8, example_inputs=x[:1])
        calibrate_bn(m, x)
        m.eval()
        r = reparameterize_model(m)  # a deep copy, fused through each layer's fuse()
        assert not any(isinstance(t, MAConv2d) for t in r.modules())
        assert all(t.deploy for t in r.modules() if isinstance(t, MDConv2d))
        with torch.no_grad():
            assert relative_diff(m(x), r(x)) <= 1e-4


def test_every_kind_runs_a_channels_last_model_like_timm_scripts_do():
    """timm's train/validate ``--channels-last`` call ``model.to(memory_format=torch.channels_last)``: it works on
    every converted model (DYConv's experts are stored flat: the call refuses 5-D tensors), and the expanding
    (train mode) and compact forms give the NCHW outputs, the compact one in channels-last layout (float64: train
    mode normalises by the statistics of a batch of two, which amplifies float32 rounding)."""
    x = small_input().double()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for kind in sorted(LAYERS):
        kwargs = dict(m=8) if kind in ('maconv', 'mdconv', 'dcd') else {}
        m = convert(timm.create_model('mobilenetv2_050'), kind, example_inputs=x[:1].float(), init='fresh',
                    **kwargs)
        calibrate_bn(m, x.float())
        m.double()
        with torch.no_grad():  # (train-mode forwards on copies: they update the running statistics)
            want_train = copy.deepcopy(m).train()(x)
            want = m.eval()(x)
        m.to(memory_format=torch.channels_last)
        with torch.no_grad():
            assert relative_diff(want_train, copy.deepcopy(m).train()(x_cl)) <= 1e-9, kind
            assert relative_diff(want, m(x_cl)) <= 1e-9, kind
            compact = reparameterize_model(m)
            layers = [t for t in compact.modules() if isinstance(t, tuple(LAYERS.values()))]
            outs = []
            hooks = [t.register_forward_hook(lambda mod, inp, out: outs.append(out)) for t in layers]
            assert relative_diff(want, compact(x_cl)) <= 1e-9, kind
            for h in hooks:
                h.remove()
            assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs), kind


def test_import_mdplug_registers_and_exports():
    import subprocess
    import sys
    code = ("import mdplug, timm; assert 'resnet18_dyconv' in timm.list_models('*_dyconv'); "
            "assert all(callable(f) for f in (mdplug.plan, mdplug.convert, mdplug.compact, mdplug.load))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_halonet_converts_exactly_in_float64():
    """halonet_h1 (halo attention, 79 convs incl. its q/kv convs) is no conversion error: compact equals expanding
    in float64. Its float32 check fails only because the random net amplifies rounding (float32 vs float64 of
    the expanding model alone differ by 1e-2 to 1e-1; the same net unconverted, by ~1e-4)."""
    from mdplug.convert.check import equivalence
    from mdplug.convert.passes import convert_with_plan
    m = timm.create_model('halonet_h1').eval()
    size = m.pretrained_cfg['input_size']  # 256: its halo blocks need maps divisible by 8 down to stride 32
    m, p = convert_with_plan(m, 'mdconv', example_inputs=torch.randn(1, *size), init='fresh')
    assert len(p.replace) == 79 and not p.notes
    r = equivalence(m.double(), size, batch=1)
    assert r['max_abs_diff'] <= 1e-6 * r['max_abs_out']  # measured 3e-11; a conversion error gives > 1e-3
