"""tools/reproduce.py end to end on tiny budgets: train, test, deploy, re-test, one record per run, tables and plots
from the records; skipping recorded runs, committing records, the pilot and the fine-tuning suite."""
import functools
import importlib.util
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('mmpretrain')
pytest.importorskip('matplotlib')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA = '/usr/share/datasets/fashion-mnist'


def reproduce(tmp_path, *extra, suite='tiny', cwd=ROOT, script=osp.join(ROOT, 'tools', 'reproduce.py'), paths=True):
    """Run tools/reproduce.py on a tiny budget; ``paths``: records, work dir, docs and plots under ``tmp_path``."""
    argv = [sys.executable, script] + (['--suite', suite] if suite else []) + [
        '--seeds', '0', '--epochs', '1', '--train-size', '256', '--test-size', '256']
    if paths:
        argv += ['--work-dir', str(tmp_path / 'work'), '--records', str(tmp_path / 'records'),
                 '--docs', str(tmp_path / 'results.md'), '--plots-dir', str(tmp_path / 'plots')]
    # (argparse keeps the last of a repeated option: ``extra`` overrides the defaults above)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run(argv + list(extra), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def records(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob('*.json'))}


RECORD_FIELDS = {'name', 'key', 'config', 'config_hash', 'seed', 'epochs', 'train_size', 'test_size', 'batch_size',
                 'pretrain', 'recipe', 'curve', 'accuracy', 'seconds', 'train_seconds', 'images_per_s',
                 'images_per_s_wall', 'iteration_seconds', 'device', 'torch_threads', 'git_commit', 'git_dirty',
                 'started', 'finished'}


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_tiny_suite_trains_deploys_evaluates_records_and_reports(tmp_path):
    out = reproduce(tmp_path)
    assert '0/2 runs already recorded' in out and '2 to run' in out

    recs = records(tmp_path / 'records')
    assert sorted(r['key'] for r in recs.values()) == ['maconv', 'mdconv']
    head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    for name, r in recs.items():
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert name == r['name'] + '.json' and name.startswith(f'{r["key"]}-e1-n256-t256-b128-s0-')
        assert (r['seed'], r['epochs'], r['train_size'], r['test_size'], r['batch_size']) == (0, 1, 256, 256, 128)
        assert r['config'] == f'configs/fashion_mnist/smallnet_x1_{r["key"]}.py' and len(r['config_hash']) == 16
        assert r['pretrain'] is None and len(r['curve']) == 1 and r['curve'][0] == r['accuracy']
        # compact equals expanding
        assert r['compact_accuracy'] == r['accuracy']
        assert r['device'] == 'cpu' and r['torch_threads'] == 1 and r['images_per_s'] > 0
        assert r['git_commit'] == head and isinstance(r['git_dirty'], bool)
    maconv = next(r for r in recs.values() if r['key'] == 'maconv')
    mdconv = next(r for r in recs.values() if r['key'] == 'mdconv')
    # MAConv's compact checkpoint is evaluated as the static model
    assert maconv['compact_form'] == 'static'
    assert maconv['compact_config'].endswith('fashion_mnist/smallnet_x1_static.py')
    assert mdconv['compact_form'] == 'compact'
    assert maconv['config_hash'] != mdconv['config_hash']

    text = (tmp_path / 'results.md').read_text()
    assert 'Compact accuracy equals expanding accuracy' in text and '**2 of 2**' in text
    assert '| MAConv | ' in text and 'pending' in text  # rows of the tiny suite filled, the others marked
    assert '**2 runs in the tables**' in text and '| SmallNet ×1 | MDConv | cpu | 1 |' in text  # budget and img/s
    for png in ('learning_curves.png', 'width.png'):
        assert (tmp_path / 'plots' / png).read_bytes()[:4] == b'\x89PNG'

    # resumable: a second call finds every run recorded and only rewrites the report, keeping hand-written text
    (tmp_path / 'results.md').write_text(text.replace('## Set-up', 'A hand-written note.\n\n## Set-up'))
    out = reproduce(tmp_path)
    assert '2/2 runs already recorded, 0 running in another process; 0 to run' in out
    assert 'A hand-written note.' in (tmp_path / 'results.md').read_text()
    assert records(tmp_path / 'records') == recs


def git(repo, *argv):
    return subprocess.run(['git', '-C', str(repo), *argv], capture_output=True, text=True, check=True).stdout


def throwaway_repo(tmp_path):
    """A git repository under ``tmp_path`` holding a copy of tools/ and configs/, one commit."""
    repo = tmp_path / 'repo'
    repo.mkdir()
    for folder in ('tools', 'configs'):
        shutil.copytree(osp.join(ROOT, folder), repo / folder, ignore=shutil.ignore_patterns('__pycache__'))
    (repo / '.gitignore').write_text('work_dirs/\n__pycache__/\n*.pth\n')  # (checkpoints ignored, as in the project)
    git(repo, 'init', '-q')
    git(repo, 'config', 'user.email', 'test@example.invalid')
    git(repo, 'config', 'user.name', 'test')
    git(repo, 'add', '-A')
    git(repo, 'commit', '-q', '-m', 'init')
    return repo


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_records_are_committed_edited_configs_rerun_and_a_fresh_clone_reports_from_records(tmp_path):
    """In a throwaway git repository holding tools/ and configs/: ``--commit`` commits exactly the new record; an
    edited config (not a comment) is a new run; a clone without work dirs rebuilds the tables from the records."""
    repo = throwaway_repo(tmp_path)
    init = git(repo, 'rev-parse', 'HEAD').strip()
    run = functools.partial(reproduce, tmp_path, '--keys', 'static', suite=None, cwd=repo,
                            script=str(repo / 'tools' / 'reproduce.py'), paths=False)

    out = run('--commit')
    assert '0/1 runs already recorded' in out and '(committed)' in out
    (first, record), = records(repo / 'docs/results/runs').items()
    assert record['git_commit'] == init and record['git_dirty'] is False
    assert git(repo, 'show', '--name-only', '--format=%s', 'HEAD').split() == [
        'results:', record['name'], 'acc', f'{record["accuracy"]:.2f}', f'docs/results/runs/{first}']
    assert git(repo, 'rev-list', '--count', 'HEAD').strip() == '2'
    assert git(repo, 'status', '--porcelain', '--', 'docs/results.md') == '?? docs/results.md\n'  # not committed

    # an edited config is a new run: the record no longer counts for it (neither to skip nor in the tables)
    def recorded():
        rp = load_reproduce(repo)  # (a fresh module: config hashes computed anew)
        args = rp.parse_args(['--keys', 'static', '--seeds', '0', '--epochs', '1', '--train-size', '256',
                              '--test-size', '256', '--records', str(repo / 'docs/results/runs')])
        run_, = rp.planned_runs(args)
        by_name, by_identity = rp.is_recorded(args, run_), rp.is_recorded(args, run_, rp.load_records(args.records))
        assert by_name == by_identity
        return by_name, rp.run_name(args, run_) + '.json', rp.config_hash(record['config'])

    assert recorded() == (True, first, record['config_hash'])
    static = repo / 'configs' / 'fashion_mnist' / 'smallnet_x1_static.py'
    static.write_text(static.read_text() + '# a comment is not an edit\n')
    assert recorded() == (True, first, record['config_hash'])
    static.write_text(static.read_text() + 'optim_wrapper = dict(optimizer=dict(lr=0.05))\n')
    found, name, digest = recorded()
    assert not found and name != first and digest != record['config_hash']
    run('--report-only')
    text = (repo / 'docs' / 'results.md').read_text()
    assert '| Static | pending |' in text and '1 record(s) of configs edited since' in text

    # a fresh clone (the config as committed, no work dirs): the tables come from the record alone
    clone = tmp_path / 'clone'
    subprocess.run(['git', 'clone', '-q', str(repo), str(clone)], check=True)
    assert not (clone / 'work_dirs').exists()
    reproduce(tmp_path, '--report-only', suite=None, cwd=clone, script=str(clone / 'tools' / 'reproduce.py'),
              paths=False)
    text = (clone / 'docs' / 'results.md').read_text()
    assert f'| Static | {record["accuracy"]:.2f} ± 0.00 (n=1) |' in text and 'edited since' not in text
    assert '**1 run in the tables**' in text
    assert (clone / 'docs' / 'results' / 'learning_curves.png').is_file()


def test_cuda_without_a_gpu_is_refused_clearly(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is visible: the refusal cannot happen here')
    argv = [sys.executable, osp.join(ROOT, 'tools', 'reproduce.py'), '--suite', 'tiny', '--device', 'cuda',
            '--work-dir', str(tmp_path / 'runs'), '--records', str(tmp_path / 'records'),
            '--docs', str(tmp_path / 'r.md')]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert '--device cuda' in proc.stderr and 'sees no CUDA device' in proc.stderr
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'records').exists()


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


def load_reproduce(root=ROOT):
    """tools/reproduce.py of ``root`` as a fresh module (its config hashes are computed anew)."""
    spec = importlib.util.spec_from_file_location('reproduce_under_test', osp.join(root, 'tools', 'reproduce.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_pilot_then_finetune_reuses_the_static_run_as_its_pretraining(tmp_path):
    """The pilot trains static SmallNet (seed 0) once per epoch count; the finetune suite's pretraining run is the
    static run of the same settings, so it is reused (record and checkpoint), then static / MAConv / MDConv
    (init='preserve') are fine-tuned from that checkpoint, deployed and reported; resumable like the others."""
    sizes = ['--test-size', '128', '--train-size', '128']
    out = reproduce(tmp_path, '--suite', 'pilot', '--pilot-epochs', '1', *sizes)
    assert '0/1 runs already recorded' in out
    pilots = records(tmp_path / 'records')
    assert [(r['key'], r['seed'], r['epochs'], len(r['curve'])) for r in pilots.values()] == [('static', 0, 1, 1)]
    text = (tmp_path / 'results.md').read_text()
    pilot = text.split('reproduce:begin pilot')[1].split('reproduce:end pilot')[0]
    for r in pilots.values():
        assert f'| {r["epochs"]} | {r["accuracy"]:.2f} |' in pilot
    assert (tmp_path / 'plots' / 'pilot.png').read_bytes()[:4] == b'\x89PNG'

    argv = ['--suite', 'finetune', '--pretrain-epochs', '1', *sizes]
    out = reproduce(tmp_path, *argv)
    pre = next(r for r in pilots.values() if r['epochs'] == 1)
    checkpoint = str(tmp_path / 'work' / pre['name'] / 'epoch_1.pth')
    assert f'pretraining: reusing static seed 0 (1 epoch), record {tmp_path / "records" / (pre["name"] + ".json")}' \
        in out and '1/1 runs already recorded' in out and '0/3 runs already recorded' in out
    recs = records(tmp_path / 'records')
    assert len(recs) == 4 and recs[pre['name'] + '.json'] == pre  # the pretraining run not trained again
    for kind in ('static', 'maconv', 'mdconv'):
        r = next(r for r in recs.values() if r['key'] == f'ft_{kind}')
        assert r['epochs'] == 1 and r['pretrain_record'] == pre['name'] and r['pretrain_accuracy'] == pre['accuracy']
        assert r['pretrain'] == dict(key='static', config=pre['config'], config_hash=pre['config_hash'], seed=0,
                                     epochs=1)
        assert '-e1-pre1-n128-t128-b128-s0-' in r['name']
        log = (tmp_path / 'work' / r['name'] / 'reproduce.log').read_text()
        assert f'init_cfg.checkpoint={checkpoint}' in log and 'load backbone. in model from' in log
        if kind != 'static':
            assert r['compact_accuracy'] == r['accuracy']
    text = (tmp_path / 'results.md').read_text()
    assert "| MAConv (init='preserve'), fine-tuned | " in text and 'static model trained for 1 epoch (seed 0)' in text
    assert (tmp_path / 'plots' / 'finetune.png').read_bytes()[:4] == b'\x89PNG'
    out = reproduce(tmp_path, *argv)
    assert '3/3 runs already recorded' in out and 'pretraining:' not in out

    # a recorded pretraining run whose checkpoint is gone is retrained before a pending fine-tuning run needs it
    reproduce_module = load_reproduce()
    args = reproduce_module.parse_args(['--keys', 'ft_static', 'ft_mdconv', '--seeds', '1', '--epochs', '1',
                                        '--pretrain-epochs', '1', *sizes, '--work-dir', str(tmp_path / 'work'),
                                        '--records', str(tmp_path / 'records')])
    runs = reproduce_module.planned_runs(args)
    found = reproduce_module.load_records(args.records)
    assert [(str(p), a) for p, a in reproduce_module.pretraining_plan(args, runs, found)] == [
        ('static seed 0 (1 epoch)', 'reuse')]
    os.remove(checkpoint)
    assert [a for _, a in reproduce_module.pretraining_plan(args, runs, found)] == ['retrain']
    args.seeds = [0]  # nothing pending: nothing needs the checkpoint
    assert reproduce_module.pretraining_plan(args, reproduce_module.planned_runs(args), found) == []


def test_keys_seeds_and_loader_options(capsys):
    """``--keys`` picks experiments (an unknown one is named), suites run seed-major with 5 seeds for Table 5's
    rows and 3 for the others, and ``--num-workers`` sets persistent_workers of all three loaders with it."""
    rp = load_reproduce()
    with pytest.raises(SystemExit):
        rp.parse_args(['--keys', 'mdconv', 'mdconv_m50'])
    assert 'unknown experiment key(s) mdconv_m50' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rp.parse_args(['--keys', 'mdconv', '--suite', 'table5'])
    assert 'give --suite or --keys, not both' in capsys.readouterr().err

    runs = [(r.exp.key, r.seed) for r in rp.planned_runs(rp.parse_args(['--suite', 'default']))]
    assert runs[:6] == [('static', 0), ('dyconv', 0), ('dcd', 0), ('maconv', 0), ('mdconv', 0), ('static', 1)]
    assert runs[:25] == [(k, s) for s in range(5) for k in rp.TABLE5]  # Table 5 first, 5 seeds
    rest = runs[25:]
    wide = [i for i, (k, _) in enumerate(rest) if k.startswith(('x2_', 'x4_'))]
    assert len(wide) == 6 * 3 and wide == list(range(len(rest) - 18, len(rest)))  # Table 10's wider nets last
    ablations, rest_wide = rest[:-18], rest[-18:]
    for part in (ablations, rest_wide):  # seed-major within each group
        assert {s for _, s in part} == {0, 1, 2} and [s for _, s in part] == sorted(s for _, s in part)
    order = [k for k, s in ablations if s == 0]
    assert order.index('relu_nobypass') < order.index('mdconv_m40') < order.index('mdconv_hidden4') \
        < order.index('mdconv_softmax_t30')  # Tables 8/9, 11, 12, 13
    assert [k for k, s in rest_wide if s == 0] == ['x2_static', 'x2_maconv', 'x2_mdconv', 'x4_static', 'x4_maconv',
                                                    'x4_mdconv']
    assert [(r.exp.key, r.seed) for r in rp.planned_runs(rp.parse_args(['--keys', 'mdconv_softmax', 'static']))] \
        == [('static', s) for s in range(5)] + [('mdconv_softmax', s) for s in range(3)]
    assert [(r.seed, r.epochs) for r in rp.planned_runs(rp.parse_args(['--suite', 'pilot', '--seeds', '3']))] == [
        (0, 10), (0, 20), (0, 40)]
    # fine-tuning rows take --finetune-epochs (default --epochs), the other rows --epochs
    mixed = rp.parse_args(['--keys', 'static', 'ft_mdconv', '--seeds', '0', '--epochs', '20', '--finetune-epochs', '5'])
    assert [(r.exp.key, r.epochs) for r in rp.planned_runs(mixed)] == [('static', 20), ('ft_mdconv', 5)]
    assert {r.epochs for r in rp.planned_runs(rp.parse_args(['--suite', 'finetune', '--epochs', '7']))} == {7}

    for workers, persistent in ((0, False), (2, True)):
        args = rp.parse_args(['--num-workers', str(workers)])
        opts = rp.cfg_options(args, rp.Run(rp.EXPERIMENTS['mdconv'], 0, 3))
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            assert f'{loader}.num_workers={workers}' in opts and f'{loader}.persistent_workers={persistent}' in opts
        assert not any('indices' in o for o in opts)  # the full training and test sets by default


@pytest.mark.skipif(not osp.isdir(DATA), reason=f"no Fashion-MNIST in {DATA} (apt-get install dataset-fashion-mnist)")
def test_park_carries_unfinished_runs_and_pretraining_checkpoints_to_a_fresh_work_dir(tmp_path):
    """``--park`` keeps what resuming needs in the repository (sessions start on fresh machines, the work dir is
    scratch): an unfinished run's last checkpoint and curve, the final checkpoint of a recorded pretraining run
    that pending fine-tuning runs start from. A later call on an empty work dir restores them, resumes the run
    from its epoch and drops its parked state with the record (committed together with ``--commit``)."""
    repo = throwaway_repo(tmp_path)
    rp = load_reproduce(repo)
    work, recs, park = repo / 'work_dirs' / 'r', repo / 'docs' / 'results' / 'runs', repo / 'docs' / 'parked'
    common = ['--pretrain-epochs', '1', '--finetune-epochs', '1', '--test-size', '128', '--train-size', '128',
              '--seeds', '0', '--work-dir', str(work), '--records', str(recs), '--park-dir', str(park),
              '--docs', str(repo / 'docs' / 'results.md'), '--plots-dir', str(repo / 'docs' / 'results')]
    run = functools.partial(reproduce, tmp_path, suite=None, cwd=repo, script=str(repo / 'tools' / 'reproduce.py'),
                            paths=False)
    run('--keys', 'static', '--epochs', '1', *common)
    (one, first), = records(recs).items()
    one = one[:-len('.json')]

    # the recorded static run is the pretraining of a pending fine-tuning run: its final checkpoint is parked
    out = run('--keys', 'ft_static', '--park', *common)
    assert f'park: static seed 0 (1 epoch) -> {park / one} (epoch_1.pth, its final checkpoint' in out
    info = json.loads((park / one / 'parked.json').read_text())
    assert info['finished'] is True and info['checkpoint'] == 'epoch_1.pth' and info['scalars'] == []
    args = rp.parse_args(['--keys', 'ft_static', *common])
    pre = rp.pretrain_run(args, rp.EXPERIMENTS['ft_static'])
    os.remove(work / one / 'epoch_1.pth')  # a fresh machine: restored, then reused, not retrained
    assert rp.unpark(args, pre) and (work / one / 'epoch_1.pth').is_file()
    assert [a for _, a in rp.pretraining_plan(args, rp.planned_runs(args), rp.load_records(args.records))] == ['reuse']

    # a 2-epoch run interrupted after epoch 1 (its work dir: the 1-epoch run's; no record): parked as unfinished
    two_args = rp.parse_args(['--keys', 'static', '--epochs', '2', *common])
    two_run, = rp.planned_runs(two_args)
    two = rp.run_name(two_args, two_run)
    shutil.copytree(work / one, work / two)
    (work / two / 'last_checkpoint').write_text(str(work / two / 'epoch_1.pth'))
    out = run('--keys', 'static', '--epochs', '2', '--park', '--commit', *common)
    assert f'park: static seed 0 (2 epochs) -> {park / two} (epoch_1.pth)' in out
    info = json.loads((park / two / 'parked.json').read_text())
    assert info['finished'] is False and info['checkpoint'] == 'epoch_1.pth' and len(info['scalars']) == 1
    assert sorted(p.name for p in (park / two).iterdir()) == sorted(['epoch_1.pth', 'parked.json'] + info['scalars'])
    assert (park / one / 'parked.json').is_file()  # another plan's parked state stays
    assert git(repo, 'status', '--porcelain', '--', str(park / two)) == ''  # committed
    assert f'docs/parked/{two}/epoch_1.pth' in git(repo, 'show', '--name-only', '--format=%s', 'HEAD')

    # a fresh machine: no work dir; the run is restored, resumes at epoch 2, its parked state goes with the record
    shutil.rmtree(work)
    out = run('--keys', 'static', '--epochs', '2', '--commit', *common)
    assert f'park: restored static seed 0 (2 epochs) from {park / two} (epoch_1.pth' in out and '(committed)' in out
    resumed = records(recs)[f'{two}.json']
    assert resumed['resumed_from_epoch'] == 1 and len(resumed['curve']) == 2 and None not in resumed['curve']
    assert resumed['curve'][0] == first['curve'][0]  # epoch 1: the parked curve
    assert not (park / two).exists()
    assert git(repo, 'status', '--porcelain', '--', str(park / two), str(recs / f'{two}.json')) == ''
    changed = git(repo, 'show', '--name-status', '--format=', 'HEAD').splitlines()
    assert f'D\tdocs/parked/{two}/epoch_1.pth' in changed and f'A\tdocs/results/runs/{two}.json' in changed

    # a run whose worker lives is not parked
    os.remove(recs / f'{two}.json')
    (work / two / 'worker.pid').write_text(str(os.getpid()))
    with pytest.raises(SystemExit, match=r'static seed 0 \(2 epochs\) still running'):
        rp.park_runs(two_args, [two_run])


def test_finetuning_runs_wait_while_another_process_trains_their_pretraining(tmp_path, capsys):
    """Two campaign processes on one worktree: while one trains the pretraining run (its ``worker.pid`` lives), the
    other's fine-tuning suite does not start the fine-tuning runs (each would fail on the missing checkpoint): it
    says they wait, fails nothing and writes no record."""
    rp = load_reproduce()
    args = rp.parse_args(['--suite', 'finetune', '--seeds', '0', '1', '--pretrain-epochs', '1', '--finetune-epochs',
                          '1', '--train-size', '128', '--test-size', '128', '--work-dir', str(tmp_path / 'work'),
                          '--records', str(tmp_path / 'records')])
    runs = rp.planned_runs(args)
    pre, = {rp.pretrain_run(args, r.exp) for r in runs}
    os.makedirs(rp.run_dir(args, pre))
    Path(rp.run_dir(args, pre), 'worker.pid').write_text(str(os.getpid()))  # "another process": this one, alive
    assert rp.run_suite(args, runs) == []
    out = capsys.readouterr().out
    assert 'pretraining: static seed 0 (1 epoch) is not recorded yet' in out
    assert '0/1 runs already recorded, 1 running in another process' in out
    for run in runs:
        assert f'wait   {run}: its pretraining {pre} is still running in another process' in out
    assert len(runs) == 6 and '  start ' not in out and not (tmp_path / 'records').exists()


def test_park_keeps_an_unfinished_pretraining_run(tmp_path):
    """A fine-tuning suite stopped while its pretraining run trains (hours for MobileNetV2 on a CPU): ``--park``
    keeps that run's newest checkpoint and curve like any unfinished run's, and a fresh work dir gets it back."""
    rp = load_reproduce()
    args = rp.parse_args(['--suite', 'finetune', '--seeds', '0', '--pretrain-epochs', '4', '--finetune-epochs', '1',
                          '--train-size', '128', '--test-size', '128', '--work-dir', str(tmp_path / 'work'),
                          '--records', str(tmp_path / 'records'), '--park-dir', str(tmp_path / 'parked')])
    runs = rp.planned_runs(args)
    pre, = {rp.pretrain_run(args, r.exp) for r in runs}
    wd = Path(rp.run_dir(args, pre))
    (wd / '20261203_120000' / 'vis_data').mkdir(parents=True)
    (wd / '20261203_120000' / 'vis_data' / 'scalars.json').write_text('{"accuracy/top1": 80.0, "step": 1}\n')
    for epoch in (1, 2):
        (wd / f'epoch_{epoch}.pth').write_bytes(b'checkpoint %d' % epoch)
    (wd / 'last_checkpoint').write_text(str(wd / 'epoch_2.pth'))
    assert rp.park_runs(args, runs) == [rp.park_path(args, pre)]
    info = json.loads(Path(rp.park_path(args, pre), 'parked.json').read_text())
    assert info['finished'] is False and info['checkpoint'] == 'epoch_2.pth' and info['scalars'] == ['20261203_120000']
    shutil.rmtree(tmp_path / 'work')  # a fresh machine
    # parking again there before the run resumed keeps the parked state (its only progress), unchanged
    assert rp.park_runs(args, runs) == [] and Path(rp.park_path(args, pre), 'epoch_2.pth').is_file()
    assert rp.unpark(args, pre) and (wd / 'epoch_2.pth').read_bytes() == b'checkpoint 2'
    (wd / 'worker.pid').write_text(str(os.getpid()))  # still training: refused by name
    with pytest.raises(SystemExit, match=r'static seed 0 \(4 epochs\) still running'):
        rp.park_runs(args, runs)
