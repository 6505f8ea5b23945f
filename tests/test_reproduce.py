"""tools/reproduce.py end to end on a tiny suite: train, test, deploy, re-test, tables and plots; then resume."""
import json
import os.path as osp
import subprocess
import sys

import pytest

pytest.importorskip('mmpretrain')
pytest.importorskip('matplotlib')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA = '/usr/share/datasets/fashion-mnist'


def reproduce(tmp_path, *extra):
    argv = [sys.executable, osp.join(ROOT, 'tools', 'reproduce.py'), '--suite', 'tiny', '--seeds', '0',
            '--epochs', '1', '--train-size', '256', '--test-size', '256', '--work-dir', str(tmp_path / 'runs'),
            '--docs', str(tmp_path / 'results.md'), '--plots-dir', str(tmp_path / 'plots'), *extra]
    # (argparse keeps the last of a repeated option: ``extra`` overrides the defaults above)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_tiny_suite_trains_deploys_evaluates_and_reports(tmp_path):
    out = reproduce(tmp_path)
    assert '2 to run' in out

    runs = tmp_path / 'runs' / 'e1_n256_t256'
    maconv = json.loads((runs / 'maconv' / 'seed0' / 'result.json').read_text())
    mdconv = json.loads((runs / 'mdconv' / 'seed0' / 'result.json').read_text())
    # compact equals expanding; MAConv's compact checkpoint is evaluated as the static model
    for result in (maconv, mdconv):
        assert len(result['curve']) == 1
        assert result['compact_accuracy'] == result['accuracy']
        assert result['device'] == 'cpu'
    assert maconv['compact_form'] == 'static'
    assert maconv['compact_config'].endswith('fashion_mnist/smallnet_x1_static.py')
    assert mdconv['compact_form'] == 'compact'

    text = (tmp_path / 'results.md').read_text()
    assert 'Compact accuracy equals expanding accuracy' in text and '**2 of 2**' in text
    assert '| MAConv | ' in text and 'not run' in text  # rows of the tiny suite filled, the others marked
    for png in ('learning_curves.png', 'width.png'):
        assert (tmp_path / 'plots' / png).read_bytes()[:4] == b'\x89PNG'

    # resumable: a second call finds every run finished and only rewrites the report, keeping hand-written text
    (tmp_path / 'results.md').write_text(text.replace('## Set-up', 'A hand-written note.\n\n## Set-up'))
    out = reproduce(tmp_path)
    assert '2/2 runs already finished, 0 running in another process; 0 to run' in out
    assert 'A hand-written note.' in (tmp_path / 'results.md').read_text()


def test_cuda_without_a_gpu_is_refused_clearly(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is visible: the refusal cannot happen here')
    argv = [sys.executable, osp.join(ROOT, 'tools', 'reproduce.py'), '--suite', 'tiny', '--device', 'cuda',
            '--work-dir', str(tmp_path / 'runs'), '--docs', str(tmp_path / 'r.md')]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert '--device cuda' in proc.stderr and 'sees no CUDA device' in proc.stderr
    assert not (tmp_path / 'runs').exists()


def test_evaluation_uses_the_temperature_training_ended_with():
    """A DYConv checkpoint written before the temperature was a buffer does not carry it; tools/test.py then sets
    the hook's ``end``."""
    from mmengine.config import Config

    from mdplug.mmpretrain import runtime

    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'fashion_mnist', 'smallnet_x1_dyconv.py'))
    model = runtime.build_model(cfg)
    temperatures = lambda: {float(m.attention.temperature) for m in model.modules() if hasattr(m, 'set_temperature')}  # noqa
    assert temperatures() == {30.0}
    assert runtime.set_trained_temperature(model, cfg) == 3
    assert temperatures() == {1.0}
    static = Config.fromfile(osp.join(ROOT, 'configs', 'fashion_mnist', 'smallnet_x1_static.py'))
    assert runtime.set_trained_temperature(runtime.build_model(static), static) == 0


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_finetune_suite_pretrains_once_then_fine_tunes_from_its_checkpoint(tmp_path):
    """Issue 16's recipe: the static pretraining run first, then static / MAConv / MDConv (init='preserve') fine-tuned
    from its last checkpoint, deployed and reported; resumable like the others."""
    argv = ['--suite', 'finetune', '--pretrain-epochs', '1', '--test-size', '128', '--train-size', '128']
    out = reproduce(tmp_path, *argv)
    assert '0/1 runs already finished' in out and '0/3 runs already finished' in out
    runs = tmp_path / 'runs' / 'e1_n128_t128'
    pre = runs / 'pretrain_static_e1' / 'seed0'
    checkpoint = str(pre / 'epoch_1.pth')
    for kind in ('static', 'maconv', 'mdconv'):
        result = json.loads((runs / f'ft_{kind}_from_e1' / 'seed0' / 'result.json').read_text())
        assert result['epochs'] == 1
        log = (runs / f'ft_{kind}_from_e1' / 'seed0' / 'reproduce.log').read_text()
        assert f'init_cfg.checkpoint={checkpoint}' in log and 'load backbone. in model from' in log
        if kind != 'static':
            assert result['compact_accuracy'] == result['accuracy']
    text = (tmp_path / 'results.md').read_text()
    assert "| MAConv (init='preserve'), fine-tuned | " in text and 'static model trained for 1 epochs' in text
    assert (tmp_path / 'plots' / 'finetune.png').read_bytes()[:4] == b'\x89PNG'
    out = reproduce(tmp_path, *argv)
    assert '1/1 runs already finished' in out and '3/3 runs already finished' in out
