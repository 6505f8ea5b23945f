"""tools/benchmark.py on a tiny setting: every variant runs, the report, plot and JSON are written (no timing
is asserted: the numbers are the tool's output, not a test)."""
import json
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'benchmark.py')


def run(*args, timeout=600):
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin', 'PYTHONPATH': ROOT})


def test_tiny_benchmark_writes_report_plot_and_json(tmp_path):
    out, png, raw = tmp_path / 'bench.md', tmp_path / 'bench.png', tmp_path / 'bench.json'
    out.write_text('# old report\n\n<!-- notes:begin -->\nA hand-written reading.\n<!-- notes:end -->\n')
    proc = run('--model', 'resnet18', '--size', '64', '--batch', '1', '2', '--train-batch', '2', '--warmup', '0',
               '--repeats', '1', '--train-warmup', '0', '--train-repeats', '1', '--threads', '1',
               '--out', str(out), '--plot', str(png), '--json', str(raw))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert '## resnet18 (select=spatial: 16 convs replaced' in text
    for variant in ('static', 'static + attention (floor)', 'maconv compact', 'mdconv compact (auto)',
                    'dyconv peer-style (groups=B)', 'dcd compact (auto)', 'condconv timm', 'mdconv expanding'):
        assert f'| {variant} |' in text
    assert 'Allocator: glibc with freed memory kept in the process' in text  # --malloc retain, the default
    assert '# old report' not in text and 'A hand-written reading.' in text  # regenerated, notes kept
    assert png.read_bytes()[:4] == b'\x89PNG'
    data = json.loads(raw.read_text())
    assert data['info']['device'] == 'cpu' and data['info']['dtype'] == 'float32'
    assert data['info']['malloc'].startswith('glibc with freed memory kept')
    res = data['results'][0]
    assert set(res['infer']) == {'1', '2'}
    assert res['infer']['2']['static']['n'] == 1
    assert res['infer']['1']['static']['n'] == 2  # half the batch, twice the rounds
    assert res['train']['2']['mdconv expanding']['peak_bytes'] > res['train']['2']['static']['peak_bytes'] > 0
    # launch counts beside the times: MAConv's compact model is the static network, MDConv adds its attention
    inf = res['infer']['2']
    assert inf['maconv compact']['launches'] == inf['static']['launches'] < inf['mdconv compact (auto)']['launches']
    assert 'Launches per forward' in text and '| launches | ×static |' in text
    train = res['train']['2']
    assert train['mdconv expanding (fused)']['launches'] > train['mdconv expanding (plain autograd)']['launches']
    assert train['mdconv expanding']['launches'] == train['mdconv expanding (fused)']['launches']  # CPU default
    walls = [res['infer']['1'][v]['walls'] for v in ('static', 'mdconv compact (auto)')]
    assert len(walls[0]) == len(walls[1]) == 2 and min(walls[0] + walls[1]) > 0  # every round kept, in order


def test_channels_last_run_says_so_in_report_and_json(tmp_path):
    out, raw = tmp_path / 'cl.md', tmp_path / 'cl.json'
    proc = run('--model', 'mobilenetv2_100', '--size', '64', '--batch', '1', '2', '--train-batch', '2',
               '--variants', 'static', 'mdconv compact (auto)', 'dcd compact (auto)', '--train-variants', 'static',
               'mdconv expanding', '--warmup', '0', '--repeats', '1', '--train-warmup', '0', '--train-repeats', '1',
               '--threads', '1', '--channels-last', '--out', str(out), '--plot', '', '--json', str(raw))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith('# Benchmarks, channels-last') and 'channels-last (NHWC) models and inputs' in text
    assert '| mdconv compact (auto) |' in text and '| mdconv expanding |' in text
    assert json.loads(raw.read_text())['info']['channels_last'] is True


def test_torchcompile_run_compiles_every_model_and_says_so(tmp_path):
    """``--torchcompile BACKEND`` (timm's flag): the models run through torch.compile (here its 'eager' backend,
    Dynamo without code generation, to keep the test short), the warm-up calls compile even when --warmup 0 was
    asked, and the report and JSON say so."""
    out, raw = tmp_path / 'tc.md', tmp_path / 'tc.json'
    proc = run('--model', 'mobilenetv2_100', '--size', '32', '--batch', '1', '--train-batch', '2',
               '--variants', 'static', 'mdconv compact (auto)', '--train-variants', 'mdconv expanding',
               '--warmup', '0', '--repeats', '1', '--train-warmup', '0', '--train-repeats', '1', '--threads', '1',
               '--torchcompile', 'eager', '--out', str(out), '--plot', '', '--json', str(raw))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith('# Benchmarks, torch.compile')
    assert 'every model `torch.compile`d (backend eager)' in text and 'this run is compiled' in text
    data = json.loads(raw.read_text())
    assert data['info']['torchcompile'] == 'eager'
    assert data['results'][0]['infer']['1']['mdconv compact (auto)']['n'] == 1
    assert data['results'][0]['train']['2']['mdconv expanding']['n'] == 1
    assert data['results'][0]['train']['2']['mdconv expanding']['launches'] is None  # counted in eager runs only


def test_variant_lists_static_first_and_no_floor_when_compiled():
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    args = benchmark.parse_args(['--variants', 'mdconv compact (auto)', 'static'])
    assert args.variants == ['static', 'mdconv compact (auto)'] and args.train_variants is None
    assert benchmark.parse_args([]).variants is None  # every variant, the floor included
    compiled = benchmark.parse_args(['--torchcompile']).variants
    assert benchmark.FLOOR not in compiled and compiled == [v for v in benchmark.INFER if v != benchmark.FLOOR]


def refusal(capsys, *args):
    """``tools/benchmark.py ARGS`` in this process (its refusals come before any work or global setting): the
    exit status and stderr."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        benchmark.main(list(args))
    return e.value.code, capsys.readouterr().err


def test_bad_device_and_dtype_are_refused_with_the_option_named(tmp_path, capsys):
    import torch
    if not torch.cuda.is_available():
        code, err = refusal(capsys, '--device', 'cuda', '--out', str(tmp_path / 'b.md'))
        assert code == 2 and '--device cuda' in err and 'no CUDA device' in err
    code, err = refusal(capsys, '--dtype', 'float16', '--out', str(tmp_path / 'b.md'))
    assert code == 2 and '--dtype float16 needs --device cuda' in err
    code, err = refusal(capsys, '--variants', 'static', 'mdconv compact', '--out', str(tmp_path / 'b.md'))
    assert code == 2 and "--variants: unknown 'mdconv compact'" in err
    assert 'mdconv compact (auto)' in err  # the known names are listed
    code, err = refusal(capsys, '--variants', 'static + attention (floor)', '--torchcompile', '--out',
                        str(tmp_path / 'b.md'))
    assert code == 2 and 'means nothing with --torchcompile' in err
    assert not (tmp_path / 'b.md').exists()


FAULTS = r'''
import resource, sys, torch
sys.path.insert(0, 'tools')
import benchmark
print(benchmark.set_malloc(sys.argv[1]))
for _ in range(2):  # the first block is faulted in under any setting
    torch.ones(2 ** 24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(2 ** 24)  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def test_malloc_retain_stops_page_faulting_fresh_outputs():
    """--malloc retain: a freed 64 MiB block is reused without faulting its pages in again; glibc's default maps
    and unmaps it every time (4 KiB pages: 16384 faults per block; retained, at most one of the five blocks lands
    where the heap has to grow)."""
    faults = {}
    for mode in ('default', 'retain'):
        proc = subprocess.run([sys.executable, '-c', FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        desc, n = proc.stdout.split('\n')[:2]
        faults[mode] = int(n)
    assert faults['default'] >= 5 * 16384 * 0.9, faults
    assert faults['retain'] <= 16384 + 1000, faults


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Round i of two variants ran back to back; the paired ratio is the median of their per-round ratios (here
    1.1, where the ratio of the medians says 4.4 / 3 = 1.47), and there is none for runs of unequal length."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    ref = benchmark.summarise(dict(wall=[1.0, 2.0, 3.0, 4.0, 10.0], cpu=[1.0] * 5))
    var = benchmark.summarise(dict(wall=[2.0, 2.2, 4.5, 4.4, 10.0], cpu=[1.0] * 5))  # ratios 2, 1.1, 1.5, 1.1, 1
    assert abs(benchmark.paired_ratio(var, ref) - 1.1) < 1e-12
    assert abs(var['median'] / ref['median'] - 4.4 / 3.0) < 1e-12
    assert benchmark.paired_ratio(var, benchmark.summarise(dict(wall=[1.0], cpu=[1.0]))) is None
