"""Reproduce the paper's comparisons on Fashion-MNIST: ``python tools/reproduce.py [--suite default] [--jobs 2]``.

Every run goes through the user's path: ``tools/train.py CONFIG`` (the project's config, its recipe set to
``--epochs`` on ``--train-size`` images with ``--cfg-options``), ``tools/test.py`` on the last checkpoint, and for a
re-parameterisable model ``tools/deploy.py`` then ``tools/test.py`` on the compact checkpoint (with the *static*
config for MAConv, ``--deployed`` otherwise).

Records. A finished run writes one JSON record, ``--records DIR/<name>.json`` (default ``docs/results/runs``):
its identity (experiment key, config path and a hash of the config as mmengine reads it -- the file and its
``_base_`` files, so an edited config is a new run --, seed, epochs, train/test size, batch size, the pretraining
run of a fine-tuning run, the version ``RECIPE`` of the options this script sets), and what it measured (test
accuracy per epoch, final accuracy, compact accuracy and form, wall seconds, training images/s, device, torch
threads, git commit with a dirty flag, dates). A run whose identity is recorded is skipped, whatever machine or
commit recorded it; an interrupted one resumes from the last checkpoint in its work dir (``--work-dir``, scratch).
``--commit`` commits each record (that file only) as it is written, so that a session that stops loses at most
the runs in progress. A run longer than a session (each session may start on a fresh machine, without the work
dir) is carried over by ``--park [--commit]`` at the session's end: the last checkpoint and curve of each unfinished
run, and the final checkpoint of a pretraining run that pending fine-tuning runs need, under ``--park-dir``
(default ``docs/results/parked``); the next call restores them into the work dir and resumes, and a run's parked
state is removed (and the removal committed) with its record. The report (``docs/results.md`` between its
``reproduce:begin/end`` markers, and the PNG plots) is made from the records alone: ``--report-only`` works on a
fresh clone. Its tables hold the records of one budget, the one the command line names (``--epochs``,
``--train-size``, ``--test-size``, ``--batch-size``).

Suites (``--suite``; or ``--keys K1 K2 ...``): ``table5``, ``deploy`` (the expanding models of ``table5``),
``table8`` .. ``table13``, ``default`` (Table 5 first, then Tables 8, 9, 11, 12, 13, 10), ``table5_mbv2``
(MobileNetV2-CIFAR x0.35), ``tiny`` (MAConv and MDConv, the smoke test) and ``pilot`` (static SmallNet, seed 0,
trained for each of ``--pilot-epochs``: where its test accuracy flattens sets ``--epochs``). Seeds: 0-4 for the
Table 5 rows, 0-2 for the others, unless ``--seeds`` says otherwise; a suite runs seed-major (every row gets seed 0
before any gets seed 1).

``finetune`` / ``finetune_mbv2`` (issue 16: does MAConv/MDConv help a model that is already trained?): the static
model trained for ``--pretrain-epochs`` (seed 0; the very run ``--keys static`` makes with that many epochs, reused
with its checkpoint when it is recorded), then ``configs/fashion_mnist/finetune/`` fine-tunes it for
``--finetune-epochs`` (default ``--epochs``) more as static, MAConv and MDConv with ``init='preserve'``, each
deployed and re-tested like the others.
"""
import argparse
import datetime
import hashlib
import json
import os
import os.path as osp
import statistics
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FM = 'configs/fashion_mnist'
AB = 'configs/fashion_mnist/ablation'
FT = 'configs/fashion_mnist/finetune'
PRETRAIN_SEED = PILOT_SEED = 0
#: the last epochs of a curve the reports list (pilot, pretraining) and the fine-tuning plot zooms on
LAST_EPOCHS = 5
FULL_TRAIN, FULL_TEST = 60000, 10000  # Fashion-MNIST
#: version of what :func:`cfg_options` makes of a config: part of every record's identity (bump it when a change
#: there changes what a run trains, so that older records are not taken for the new recipe)
RECIPE = 1
IDENTITY = ('key', 'config', 'config_hash', 'seed', 'epochs', 'train_size', 'test_size', 'batch_size', 'pretrain',
            'recipe')


class Experiment:
    """One config of a table: its training config, and how its trained model is deployed and re-evaluated.

    ``deploy`` is ``'static'`` (MAConv: the compact checkpoint is the static model of ``static_config``),
    ``'compact'`` (dynamic kinds: evaluated with ``--deployed``) or None (nothing to fold).
    ``pretrain``: the key of the run (seed ``PRETRAIN_SEED``, ``--pretrain-epochs``) whose last checkpoint this run
    fine-tunes, loaded through the ``Pretrained`` init_cfgs of the config parts ``init_cfgs`` (e.g. ``model.head``).
    """

    def __init__(self, key, config, label, deploy=None, static_config=None, pretrain=None, init_cfgs=()):
        self.key, self.config, self.label = key, config, label
        self.deploy, self.static_config = deploy, static_config
        self.pretrain, self.init_cfgs = pretrain, tuple(init_cfgs)

    @property
    def net(self):
        """The network of the config, e.g. ``SmallNet ×1``."""
        name = osp.basename(self.config)
        if name.startswith('mobilenet_v2_cifar_x035'):
            return 'MobileNetV2-CIFAR ×0.35'
        return f'SmallNet ×{name.split("_")[1][1:]}'


def _experiments():
    static = f'{FM}/smallnet_x1_static.py'
    exps = [
        Experiment('static', static, 'Static'),
        Experiment('dyconv', f'{FM}/smallnet_x1_dyconv.py', 'DYConv', 'compact'),
        Experiment('dcd', f'{FM}/smallnet_x1_dcd.py', 'DCD', 'compact'),
        Experiment('maconv', f'{FM}/smallnet_x1_maconv.py', 'MAConv', 'static', static),
        Experiment('mdconv', f'{FM}/smallnet_x1_mdconv.py', 'MDConv', 'compact'),
        Experiment('maconv_nobypass', f'{AB}/smallnet_x1_maconv_nobypass.py', 'MAConv w/o bypass', 'static', static),
        Experiment('mdconv_nobypass', f'{AB}/smallnet_x1_mdconv_nobypass.py', 'MDConv w/o bypass', 'compact'),
        Experiment('relu_bypass', f'{AB}/smallnet_x1_relu_bypass.py', 'ReLU w/ bypass'),
        Experiment('relu_nobypass', f'{AB}/smallnet_x1_relu_nobypass.py', 'ReLU w/o bypass'),
        Experiment('maconv_compact', f'{AB}/smallnet_x1_maconv_compact.py', 'MAConv compact', 'static', static),
        Experiment('maconv_nobn', f'{AB}/smallnet_x1_maconv_nobn.py', 'MAConv expanding w/o BN', 'static', static),
        Experiment('mdconv_compact', f'{AB}/smallnet_x1_mdconv_compact.py', 'MDConv compact', 'compact'),
        Experiment('mdconv_nobn', f'{AB}/smallnet_x1_mdconv_nobn.py', 'MDConv expanding w/o BN', 'compact'),
    ]
    for width in (2, 4):
        wide = f'{AB}/smallnet_x{width}_static.py'
        exps += [
            Experiment(f'x{width}_static', wide, f'Static x{width}'),
            Experiment(f'x{width}_maconv', f'{AB}/smallnet_x{width}_maconv.py', f'MAConv x{width}', 'static', wide),
            Experiment(f'x{width}_mdconv', f'{AB}/smallnet_x{width}_mdconv.py', f'MDConv x{width}', 'compact'),
        ]
    for m in (40, 60):
        exps += [Experiment(f'maconv_m{m}', f'{AB}/smallnet_x1_maconv_m{m}.py', f'MAConv m = {m}', 'static', static),
                 Experiment(f'mdconv_m{m}', f'{AB}/smallnet_x1_mdconv_m{m}.py', f'MDConv m = {m}', 'compact')]
    exps += [
        Experiment('mdconv_hidden1', f'{AB}/smallnet_x1_mdconv_hidden1.py', 'MDConv hidden 1 × input', 'compact'),
        Experiment('mdconv_hidden4', f'{AB}/smallnet_x1_mdconv_hidden4.py', 'MDConv hidden 4 × input', 'compact'),
        Experiment('mdconv_softmax', f'{AB}/smallnet_x1_mdconv_softmax.py', 'MDConv softmax', 'compact'),
        Experiment('mdconv_softmax_t30', f'{AB}/smallnet_x1_mdconv_softmax_t30.py', 'MDConv softmax T = 30',
                   'compact'),
    ]
    for kind, label in (('static', 'Static'), ('dyconv', 'DYConv'), ('dcd', 'DCD'), ('maconv', 'MAConv'),
                        ('mdconv', 'MDConv')):
        exps.append(Experiment(
            f'mbv2_{kind}', f'{FM}/mobilenet_v2_cifar_x035_{kind}.py', f'MobileNetV2 x0.35 {label}',
            {'static': None, 'maconv': 'static'}.get(kind, 'compact'),
            f'{FM}/mobilenet_v2_cifar_x035_static.py' if kind == 'maconv' else None))
    for prefix, stem in (('', 'smallnet_x1'), ('mbv2_', 'mobilenet_v2_cifar_x035')):
        pre = f'{prefix}static'  # the static row itself, trained for --pretrain-epochs
        static_parts = ('model.backbone', 'model.head')
        converted_parts = ('model.backbone.backbone', 'model.head')
        exps += [
            Experiment(f'{prefix}ft_static', f'{FT}/{stem}_static.py', 'Static, fine-tuned', pretrain=pre,
                       init_cfgs=static_parts),
            Experiment(f'{prefix}ft_maconv', f'{FT}/{stem}_maconv.py', "MAConv (init='preserve'), fine-tuned",
                       'static', f'{FM}/{stem}_static.py', pretrain=pre, init_cfgs=converted_parts),
            Experiment(f'{prefix}ft_mdconv', f'{FT}/{stem}_mdconv.py', "MDConv (init='preserve'), fine-tuned",
                       'compact', pretrain=pre, init_cfgs=converted_parts),
        ]
    return {e.key: e for e in exps}


EXPERIMENTS = _experiments()
TABLE5 = ['static', 'dyconv', 'dcd', 'maconv', 'mdconv']
TABLE5_MBV2 = [f'mbv2_{k}' for k in TABLE5]
TABLE8 = ['maconv', 'maconv_nobypass', 'mdconv', 'mdconv_nobypass', 'relu_bypass', 'relu_nobypass']
TABLE9 = ['maconv', 'maconv_compact', 'maconv_nobn', 'mdconv', 'mdconv_compact', 'mdconv_nobn']
TABLE10 = ['static', 'maconv', 'mdconv', 'x2_static', 'x2_maconv', 'x2_mdconv', 'x4_static', 'x4_maconv',
           'x4_mdconv']
TABLE11 = ['static', 'maconv', 'maconv_m40', 'maconv_m60', 'mdconv', 'mdconv_m40', 'mdconv_m60']
TABLE12 = ['mdconv', 'mdconv_hidden1', 'mdconv_hidden4']
TABLE13 = ['mdconv', 'mdconv_softmax', 'mdconv_softmax_t30']
SUITES = {
    'table5': TABLE5,
    'deploy': [k for k in TABLE5 if EXPERIMENTS[k].deploy],
    'table8': TABLE8,
    'table9': TABLE9,
    'table10': TABLE10,
    'table11': TABLE11,
    'table12': TABLE12,
    'table13': TABLE13,
    'table5_mbv2': TABLE5_MBV2,
    'tiny': ['maconv', 'mdconv'],
    'finetune': ['ft_static', 'ft_maconv', 'ft_mdconv'],
    'finetune_mbv2': ['mbv2_ft_static', 'mbv2_ft_maconv', 'mbv2_ft_mdconv'],
    'pilot': ['static'],  # (at each of --pilot-epochs, seed PILOT_SEED)
}
# most important first: Table 5 (with the deploy check of its expanding models), then the ablations
SUITES['default'] = list(dict.fromkeys(TABLE5 + TABLE8 + TABLE9 + TABLE11 + TABLE12 + TABLE13 + TABLE10))
#: seeds of a row unless --seeds is given: 5 for the core comparison, 3 for the others
DEFAULT_SEEDS = {k: (0, 1, 2, 3, 4) for k in TABLE5}

#: the paper's numbers (CIFAR-10) for the same comparisons; Table 5 is MobileNetV2 x0.35 (mean, STD over 5 runs)
PAPER_TABLE5 = {'static': (91.240, 0.268), 'dyconv': (91.614, 0.249), 'dcd': (87.286, 2.265),
                'maconv': (91.738, 0.198), 'mdconv': (92.118, 0.225)}
#: SmallNet on CIFAR-10: Tables 8-13 (x1 MAConv / MDConv are the same numbers in each)
PAPER_SMALLNET = {'static': 73.936, 'maconv': 74.458, 'mdconv': 77.998, 'maconv_nobypass': 73.276,
                  'mdconv_nobypass': 76.164, 'relu_bypass': 78.500, 'relu_nobypass': 75.250,
                  'maconv_compact': 73.260, 'maconv_nobn': 74.092, 'mdconv_compact': 77.024, 'mdconv_nobn': 77.500,
                  'x2_static': 81.010, 'x2_maconv': 81.452, 'x2_mdconv': 84.204,
                  'x4_static': 85.650, 'x4_maconv': 85.872, 'x4_mdconv': 87.424,
                  'maconv_m40': 74.216, 'maconv_m60': 74.156, 'mdconv_m40': 78.026, 'mdconv_m60': 78.330,
                  'mdconv_hidden1': 78.550, 'mdconv_hidden4': 78.472,
                  'mdconv_softmax': 78.148, 'mdconv_softmax_t30': 76.326}
PAPER_MBV2_ABLATION = {'maconv': 91.110, 'maconv_nobypass': 85.450, 'mdconv': 91.352, 'mdconv_nobypass': 86.332,
                       'relu_bypass': 91.742, 'relu_nobypass': 87.986, 'maconv_compact': 90.768,
                       'maconv_nobn': 90.564, 'mdconv_compact': 88.474, 'mdconv_nobn': 91.096}


# ------------------------------------------------------------------------------------------------------ identity
class Run:
    """One training of an experiment: ``exp`` with ``seed`` for ``epochs`` (the rest of the budget is ``args``)."""

    def __init__(self, exp, seed, epochs):
        self.exp, self.seed, self.epochs = exp, seed, epochs

    def __eq__(self, other):
        return (self.exp.key, self.seed, self.epochs) == (other.exp.key, other.seed, other.epochs)

    def __hash__(self):
        return hash((self.exp.key, self.seed, self.epochs))

    def __repr__(self):
        return f'{self.exp.key} seed {self.seed} ({epochs_text(self.epochs)})'


_HASHES = {}


def config_hash(config):
    """sha256 (16 hex digits) of ``config`` as mmengine reads it: the file merged with its ``_base_`` files, so an
    edit of the file or of a base it inherits is a new run; comments and formatting are not part of it."""
    if config not in _HASHES:
        from mmengine.config import Config

        path = osp.join(ROOT, config)
        if not osp.isfile(path):
            raise FileNotFoundError(f'config {config} of an experiment does not exist under {ROOT}')
        text = json.dumps(Config.fromfile(path, import_custom_modules=False).to_dict(), sort_keys=True, default=repr)
        _HASHES[config] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _HASHES[config]


def pretrain_run(args, exp):
    """The run whose last checkpoint the fine-tuning experiment ``exp`` starts from."""
    return Run(EXPERIMENTS[exp.pretrain], PRETRAIN_SEED, args.pretrain_epochs)


def identity(args, run):
    """What makes two runs the same run: everything but where, when and with which code it ran."""
    exp = run.exp
    pretrain = None
    if exp.pretrain:
        pre = pretrain_run(args, exp)
        pretrain = dict(key=pre.exp.key, config=pre.exp.config, config_hash=config_hash(pre.exp.config),
                        seed=pre.seed, epochs=pre.epochs)
    return dict(key=exp.key, config=exp.config, config_hash=config_hash(exp.config), seed=run.seed,
                epochs=run.epochs, train_size=args.train_size, test_size=args.test_size, batch_size=args.batch_size,
                pretrain=pretrain, recipe=RECIPE)


def digest(ident):
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]


def run_name(args, run):
    """``<key>-e<epochs>[-pre<pretraining epochs>]-n<train>-t<test>-b<batch>-s<seed>-<identity digest>``."""
    ident = identity(args, run)
    pre = f'-pre{ident["pretrain"]["epochs"]}' if ident['pretrain'] else ''
    return (f'{run.exp.key}-e{run.epochs}{pre}-n{args.train_size}-t{args.test_size}-b{args.batch_size}'
            f'-s{run.seed}-{digest(ident)}')


def run_dir(args, run):
    return osp.join(args.work_dir, run_name(args, run))


def record_path(args, run):
    return osp.join(args.records, run_name(args, run) + '.json')


def last_checkpoint(args, run):
    return osp.join(run_dir(args, run), f'epoch_{run.epochs}.pth')


def pretrained_checkpoint(args, exp):
    """The last checkpoint of the pretraining run that ``exp`` fine-tunes."""
    return last_checkpoint(args, pretrain_run(args, exp))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_records(folder):
    """Every record under ``folder`` (``*.json``), newest last; a file that is not a record is an error."""
    records = []
    if not osp.isdir(folder):
        return records
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.json'):
            continue
        path = osp.join(folder, name)
        try:
            record = read_json(path)
        except ValueError as e:
            raise SystemExit(f'{path}: not a JSON record ({e}); move it out of {folder}') from e
        missing = [k for k in IDENTITY + ('accuracy', ) if k not in record]
        if missing:
            raise SystemExit(f'{path}: not a run record of tools/reproduce.py (no {", ".join(missing)})')
        records.append(record)
    return sorted(records, key=lambda r: r.get('finished', ''))


def identity_of(record):
    return {k: record[k] for k in IDENTITY}


def is_recorded(args, run, records=None):
    ident = identity(args, run)
    if records is None:
        path = record_path(args, run)
        return osp.isfile(path) and identity_of(read_json(path)) == ident
    return any(identity_of(r) == ident for r in records)


# ------------------------------------------------------------------------------------------------------ running
def cfg_options(args, run=None, train=True):
    """``--cfg-options`` that set the config's recipe to ``run.epochs`` on ``args.train_size`` images."""
    opts = [f'train_dataloader.batch_size={args.batch_size}']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.num_workers={args.num_workers}', f'{loader}.persistent_workers={args.num_workers > 0}']
    if args.test_size < FULL_TEST:
        opts += [f'{loader}.dataset.indices={args.test_size}' for loader in ('val_dataloader', 'test_dataloader')]
    exp = run.exp if run is not None else None
    if exp is not None and exp.pretrain:  # (a converted backbone loads it when it is built, by every tool)
        opts += [f'{part}.init_cfg.checkpoint={pretrained_checkpoint(args, exp)}' for part in exp.init_cfgs]
    if not train:
        return opts
    e = run.epochs
    iters = -(-args.train_size // args.batch_size)  # per epoch
    opts += [f'train_cfg.max_epochs={e}', f'param_scheduler.T_max={e}', f'param_scheduler.end={e}',
             f'randomness.seed={run.seed}', 'default_hooks.checkpoint.max_keep_ckpts=1',
             f'default_hooks.logger.interval={max(1, min(50, iters))}']
    if args.train_size < FULL_TRAIN:
        opts.append(f'train_dataloader.dataset.indices={args.train_size}')
    if exp.key.endswith('dyconv'):
        # DYConv's temperature anneals over the first 10 of 200 epochs: keep that fraction
        opts.append(f'custom_hooks.0.epochs={e * 10 / 200:g}')
    return opts


def call_tool(argv):
    """Run ``tools/NAME.py``'s ``main()`` in this process with ``sys.argv = argv`` (what the command line does)."""
    import importlib.util

    name = osp.splitext(osp.basename(argv[0]))[0]
    spec = importlib.util.spec_from_file_location(f'mdplug_tools_{name}', osp.join(ROOT, argv[0]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved, sys.argv = sys.argv, list(argv)
    try:
        print(f'$ python {" ".join(argv)}', flush=True)
        module.main()
    finally:
        sys.argv = saved
        time.sleep(1.1)  # mmengine names a Runner's logger and visualizer by the second it starts


def read_scalars(work_dir):
    """The records of mmengine's ``vis_data/scalars.json`` of every (resumed) run in ``work_dir``, in order."""
    records = []
    for stamp in sorted(os.listdir(work_dir)):
        path = osp.join(work_dir, stamp, 'vis_data', 'scalars.json')
        if osp.isfile(path):
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
    return records


def read_curve(work_dir):
    """Test accuracy of epoch 1, 2, ... from mmengine's ``vis_data/scalars.json`` of every (resumed) run.

    None for an epoch whose validation was interrupted (its checkpoint is saved first, so a resumed job skips it).
    """
    curve = {int(r['step']): r['accuracy/top1'] for r in read_scalars(work_dir) if 'accuracy/top1' in r}
    return [curve.get(e) for e in range(1, max(curve, default=0) + 1)]


def mean_iteration_time(work_dir):
    """Mean of the training iterations' ``time`` mmengine logged (each the mean of its last iterations), or None."""
    times = [r['time'] for r in read_scalars(work_dir) if 'loss' in r and 'time' in r]
    return statistics.mean(times) if times else None


def device_name():
    """What the runs of this process train on: the GPU's name, or 'cpu'."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        model = None
    return f'{model or "unknown CPU"} ({os.cpu_count()} logical cores)'


def git_state(args):
    """``(commit, dirty, changed paths)`` of the checkout the runs use; the report's outputs are not changes."""
    def git(*argv):
        return subprocess.run(['git', '-C', ROOT, *argv], capture_output=True, text=True, check=True).stdout

    outputs = [osp.abspath(p) for p in (args.records, args.docs, args.plots_dir, args.work_dir, args.park_dir)]
    excluded = [f':(exclude){osp.relpath(p, ROOT)}' for p in outputs if not osp.relpath(p, ROOT).startswith('..')]
    try:
        commit = git('rev-parse', 'HEAD').strip()
        changes = git('status', '--porcelain', '--', '.', *excluded).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None, None, []
    return commit, bool(changes), changes[:20]


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def write_json(path, data):
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=1)
        f.write('\n')
    os.replace(path + '.tmp', path)


def run_experiment(args, run):
    """Train, test, deploy and re-test one run in this process; writes its record."""
    import torch

    exp, wd = run.exp, run_dir(args, run)
    commit, dirty, changes = git_state(args)
    started, start = now(), time.time()
    record = dict(name=run_name(args, run), **identity(args, run), label=exp.label)
    train = ['tools/train.py', exp.config, '--work-dir', wd]
    if args.data_root:
        train += ['--data-root', args.data_root]
    resumed_from = 0
    newest = _newest_checkpoint(wd)
    if newest:
        train.append('--resume')
        stem = osp.splitext(osp.basename(newest))[0]
        resumed_from = int(stem.split('_')[1]) if stem.startswith('epoch_') else 0
    if exp.pretrain:
        checkpoint = pretrained_checkpoint(args, exp)
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'{exp.key}: the pretraining checkpoint {checkpoint} is missing')
        pre = pretrain_run(args, exp)
        record['pretrain_record'] = run_name(args, pre)
        if osp.isfile(record_path(args, pre)):
            record['pretrain_accuracy'] = read_json(record_path(args, pre))['accuracy']
    call_tool(train + ['--cfg-options'] + cfg_options(args, run))
    train_seconds = time.time() - start
    checkpoint = last_checkpoint(args, run)
    iteration = mean_iteration_time(wd)
    test_opts = ['--cfg-options'] + cfg_options(args, run, train=False)
    data_root = ['--data-root', args.data_root] if args.data_root else []
    out = osp.join(wd, 'test_expanding.json')
    call_tool(['tools/test.py', exp.config, checkpoint, '--work-dir', osp.join(wd, 'test'), '--out', out]
              + data_root + test_opts)
    record['accuracy'] = read_json(out)['accuracy/top1']
    record['curve'] = read_curve(wd)
    if exp.deploy:
        compact = osp.join(wd, 'compact.pth')
        call_tool(['tools/deploy.py', exp.config, checkpoint, compact] + test_opts)
        out = osp.join(wd, 'test_compact.json')
        if exp.deploy == 'static':  # (the static config loads no pretrained checkpoint)
            test = ['tools/test.py', exp.static_config, compact, '--cfg-options'] + cfg_options(args, train=False)
        else:
            test = ['tools/test.py', exp.config, compact, '--deployed'] + test_opts
        call_tool(test + ['--work-dir', osp.join(wd, 'test_compact'), '--out', out] + data_root)
        record.update(compact_accuracy=read_json(out)['accuracy/top1'], compact_form=exp.deploy,
                      compact_config=exp.static_config if exp.deploy == 'static' else exp.config)
    images = (run.epochs - resumed_from) * args.train_size
    record.update(
        seconds=round(time.time() - start, 1), train_seconds=round(train_seconds, 1), resumed_from_epoch=resumed_from,
        iteration_seconds=None if iteration is None else round(iteration, 5),
        images_per_s=None if not iteration else round(args.batch_size / iteration, 1),
        images_per_s_wall=round(images / train_seconds, 1) if images else None,
        device=device_name(), cpu=cpu_name(), torch_threads=torch.get_num_threads(), num_workers=args.num_workers,
        torch=torch.__version__, git_commit=commit, git_dirty=dirty, git_changes=changes, started=started,
        finished=now())
    write_json(record_path(args, run), record)
    return record


def running_elsewhere(args, run):
    """Whether another ``tools/reproduce.py`` is running ``run`` now (its ``worker.pid`` lives)."""
    try:
        with open(osp.join(run_dir(args, run), 'worker.pid')) as f:
            os.kill(int(f.read()), 0)
        return True
    except (OSError, ValueError):
        return False


def spawn_experiment(args, run):
    """Run :func:`run_experiment` in a child process (``--worker``), its output in the run's ``reproduce.log``."""
    wd = run_dir(args, run)
    os.makedirs(wd, exist_ok=True)
    log_path = osp.join(wd, 'reproduce.log')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    # glibc: keep freed activation blocks instead of unmapping them (each step would page-fault them back in;
    # SmallNet's training step ran ~2x faster here with these, see README "Numbers")
    env.setdefault('MALLOC_MMAP_THRESHOLD_', '1073741824')
    env.setdefault('MALLOC_TRIM_THRESHOLD_', '1073741824')
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # mmengine's runner takes a visible GPU by itself
    argv = [sys.executable, osp.abspath(__file__), '--worker', run.exp.key, str(run.seed), str(run.epochs)]
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(argv + args.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(osp.join(wd, 'worker.pid'), 'w') as f:
            f.write(str(proc.pid))
        proc.wait()
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f'{run} failed (exit {proc.returncode}); see {log_path}:\n{tail}')
    return read_json(record_path(args, run))



# ------------------------------------------------------------------------------------------------------ parking
# A run longer than a session (MobileNetV2 on this CPU) never finishes when every session starts on a fresh
# machine: the work dir is scratch. ``--park`` keeps what resuming needs in the repository instead: per unfinished
# run its last checkpoint and mmengine's per-run scalars (the learning curve), per recorded pretraining run that
# pending fine-tuning runs start from its last checkpoint. A later session on another machine restores them into
# the work dir and resumes; a run's parked state is removed once its record is written.
def park_path(args, run):
    return osp.join(args.park_dir, run_name(args, run))


def _newest_checkpoint(work_dir):
    """The checkpoint mmengine's ``last_checkpoint`` file in ``work_dir`` names, or None."""
    last = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(last):
        return None
    with open(last) as f:
        path = f.read().strip()
    path = path if osp.isfile(path) else osp.join(work_dir, osp.basename(path))
    return path if osp.isfile(path) else None


def park_runs(args, runs):
    """Park every unfinished run of ``runs`` that has a checkpoint (a pretraining run that pending fine-tuning runs
    of ``runs`` need included), and the last checkpoint of each recorded such pretraining run; drop parked state
    nothing needs any more. Returns the parked folders (written or removed). A run whose worker still lives is
    refused by name."""
    records = load_records(args.records)
    plan = pretraining_plan(args, runs, records)
    # (a pretraining run still training is an unfinished run like the others: its progress is parked too)
    pending = [r for r in runs if not is_recorded(args, r, records)] + [pre for pre, action in plan
                                                                         if action == 'train']
    live = [r for r in pending if running_elsewhere(args, r)]
    if live:
        raise SystemExit(f'--park: {", ".join(map(str, live))} still running (worker.pid alive): stop the '
                         f'campaign first, so that no checkpoint is parked half-written')
    keep, changed = {}, []
    for run in pending:
        checkpoint = _newest_checkpoint(run_dir(args, run))
        if checkpoint:
            keep[run_name(args, run)] = (run, checkpoint, False)
    for pre, action in plan:
        if action == 'reuse':  # (recorded, and its last checkpoint is here)
            keep[run_name(args, pre)] = (pre, last_checkpoint(args, pre), True)
    # parked state of this plan's runs that nothing needs any more (finished, or a pretraining run nothing pending
    # fine-tunes); what other suites parked stays, and so does that of a pending run with no checkpoint here (a
    # fresh machine that has not resumed it yet: its parked state is still its only progress)
    scope = {run_name(args, r) for r in runs} | {run_name(args, pretrain_run(args, r.exp)) for r in runs
                                                  if r.exp.pretrain}
    for name in sorted(scope - set(keep) - {run_name(args, r) for r in pending}):
        if osp.isdir(osp.join(args.park_dir, name)):
            shutil.rmtree(osp.join(args.park_dir, name))
            changed.append(osp.join(args.park_dir, name))
            print(f'park: dropped {name} (nothing pending needs it)', flush=True)
    for name, (run, checkpoint, final) in keep.items():
        src, dst = run_dir(args, run), park_path(args, run)
        tmp = dst + '.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copy2(checkpoint, osp.join(tmp, osp.basename(checkpoint)))
        stamps = []
        for stamp in sorted(os.listdir(src)):
            scalars = osp.join(src, stamp, 'vis_data', 'scalars.json')
            if not final and osp.isfile(scalars):
                os.makedirs(osp.join(tmp, stamp, 'vis_data'))
                shutil.copy2(scalars, osp.join(tmp, stamp, 'vis_data', 'scalars.json'))
                stamps.append(stamp)
        write_json(osp.join(tmp, 'parked.json'), dict(
            run=str(run), checkpoint=osp.basename(checkpoint), finished=final, scalars=stamps, parked=now(),
            git_commit=git_state(args)[0]))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        changed.append(dst)
        print(f'park: {run} -> {dst} ({osp.basename(checkpoint)}'
              f'{", its final checkpoint, for the fine-tuning runs" if final else ""})', flush=True)
    return changed


def unpark(args, run):
    """Restore ``run``'s parked state into its work dir when the work dir lacks it; True when restored."""
    src, wd = park_path(args, run), run_dir(args, run)
    info_path = osp.join(src, 'parked.json')
    if not osp.isfile(info_path):
        return False
    info = read_json(info_path)
    target = osp.join(wd, info['checkpoint'])
    if info['finished'] and osp.isfile(target):
        return False
    if not info['finished'] and _newest_checkpoint(wd):
        return False  # (this machine's own progress is newer or equal)
    os.makedirs(wd, exist_ok=True)
    shutil.copy2(osp.join(src, info['checkpoint']), target)
    for stamp in info['scalars']:
        os.makedirs(osp.join(wd, stamp, 'vis_data'), exist_ok=True)
        shutil.copy2(osp.join(src, stamp, 'vis_data', 'scalars.json'), osp.join(wd, stamp, 'vis_data', 'scalars.json'))
    if not info['finished']:
        with open(osp.join(wd, 'last_checkpoint'), 'w') as f:
            f.write(target)
    print(f'park: restored {run} from {src} ({info["checkpoint"]}, parked {info["parked"]})', flush=True)
    return True


def commit_paths(paths, message):
    """Stage ``paths`` (additions and removals) and commit exactly them; a failure is a warning."""
    paths = [osp.abspath(p) for p in paths]
    repo = osp.dirname(paths[0])
    while not osp.isdir(repo):
        repo = osp.dirname(repo)
    def tracked(path):  # (a folder made and removed between two commits is neither here nor known to git)
        return subprocess.run(['git', '-C', repo, 'ls-files', '--', path], capture_output=True, text=True).stdout

    paths = [p for p in paths if osp.exists(p) or tracked(p)]
    if not paths:
        return True
    try:
        # (-f: parked checkpoints are *.pth, which a project's .gitignore may well ignore)
        subprocess.run(['git', '-C', repo, 'add', '-A', '-f', '--', *paths], capture_output=True, text=True,
                       check=True)
        subprocess.run(['git', '-C', repo, 'commit', '-q', '-m', message, '--', *paths], capture_output=True,
                       text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, 'stderr', None) or getattr(e, 'stdout', None) or str(e)
        print(f'warning: could not commit {", ".join(paths)}: {detail.strip()}', file=sys.stderr, flush=True)
        return False
    return True

def seeds_of(args, key):
    return tuple(args.seeds) if args.seeds else DEFAULT_SEEDS.get(key, (0, 1, 2))


def run_epochs(args, exp):
    """Epochs of a run of ``exp``: ``--finetune-epochs`` for a fine-tuning row, ``--epochs`` for the others."""
    return args.finetune_epochs if exp.pretrain else args.epochs


def planned_runs(args):
    """The runs of ``--keys`` / ``--suite`` in order: Table 5's rows first (and so the deploy check), then the
    ablations of Tables 8, 9 and 11-13, then the wider networks of Table 10 (the costliest, and not among the
    ablations issue 18 asks seeds of); seed-major within each, so a suite cut short still has every row with fewer
    seeds."""
    if args.suite == 'pilot' and not args.keys:
        return [Run(EXPERIMENTS['static'], PILOT_SEED, e) for e in args.pilot_epochs]
    keys = args.keys or SUITES[args.suite]
    wide = [k for k in keys if k in TABLE10 and k not in TABLE5]
    runs = []
    for group in ([k for k in keys if k in TABLE5], [k for k in keys if k not in TABLE5 and k not in wide], wide):
        seeds = sorted({s for k in group for s in seeds_of(args, k)})
        runs += [Run(EXPERIMENTS[k], s, run_epochs(args, EXPERIMENTS[k])) for s in seeds for k in group
                 if s in seeds_of(args, k)]
    return runs


def pretraining_plan(args, runs, records):
    """``[(pretraining run, action)]`` for the fine-tuning runs of ``runs`` that are not recorded yet: ``'train'``
    (not recorded), ``'reuse'`` (recorded, its last checkpoint still in the work dir) or ``'retrain'`` (recorded,
    but the checkpoint the fine-tuning needs is gone)."""
    pending = [r for r in runs if r.exp.pretrain and not is_recorded(args, r, records)]
    plan = []
    for pre in dict.fromkeys(pretrain_run(args, r.exp) for r in pending):
        if not is_recorded(args, pre, records):
            plan.append((pre, 'train'))
        else:
            plan.append((pre, 'reuse' if osp.isfile(last_checkpoint(args, pre)) else 'retrain'))
    return plan


def run_suite(args, runs):
    """Run every run of ``runs`` that is not recorded yet, ``args.jobs`` at a time; first the pretraining runs the
    pending fine-tuning runs start from (each reused when it is recorded and its checkpoint is still there)."""
    records = load_records(args.records)
    pending = [r for r in runs if not is_recorded(args, r, records)]
    for run in dict.fromkeys(pending + [pretrain_run(args, r.exp) for r in pending if r.exp.pretrain]):
        if not running_elsewhere(args, run):
            unpark(args, run)
    plan = pretraining_plan(args, runs, records)
    for pre, action in plan:
        checkpoint = last_checkpoint(args, pre)
        print({'train': f'pretraining: {pre} is not recorded yet: training it first',
               'reuse': f'pretraining: reusing {pre}, record {record_path(args, pre)} and checkpoint {checkpoint}',
               'retrain': f'pretraining: {pre} is recorded ({record_path(args, pre)}) but its checkpoint '
                          f'{checkpoint} is gone: retraining it for fine-tuning (its record is replaced)'}[action],
              flush=True)
    if plan:
        failed = run_runs(args, [pre for pre, _ in plan], {pre for pre, action in plan if action == 'retrain'})
        if failed:
            return failed
        # a pretraining run that another process is still training: its fine-tuning runs wait for a later call
        # (they would otherwise each fail on the missing checkpoint)
        waiting = {pre for pre, _ in plan if not is_recorded(args, pre)}
        held = [r for r in runs if r.exp.pretrain and pretrain_run(args, r.exp) in waiting]
        for run in held:
            if not is_recorded(args, run, records):
                print(f'  wait   {run}: its pretraining {pretrain_run(args, run.exp)} is still running in another '
                      'process; run this suite again when it is recorded', flush=True)
        runs = [r for r in runs if r not in held]
    return run_runs(args, runs)


def run_runs(args, runs, force=()):
    """Run each of ``runs`` that is not recorded yet (or is in ``force``), ``args.jobs`` at a time."""
    records = load_records(args.records)
    todo = [r for r in runs if r in force or not is_recorded(args, r, records)]
    elsewhere = [r for r in todo if running_elsewhere(args, r)]
    todo = [r for r in todo if r not in elsewhere]
    total = len(runs)
    print(f'{total - len(todo) - len(elsewhere)}/{total} runs already recorded, {len(elsewhere)} running in another '
          f'process; {len(todo)} to run with {args.jobs} job(s) (records {args.records}, work dir {args.work_dir})',
          flush=True)
    lock, done, failed, start = threading.Lock(), [0], [], time.time()

    def one(run):
        if (run not in force and is_recorded(args, run)) or running_elsewhere(args, run):
            print(f'  skip   {run}: recorded or running in another process', flush=True)
            return
        print(f'  start  {run}', flush=True)
        try:
            r = spawn_experiment(args, run)
            msg = f'acc {r["accuracy"]:.2f}' + (f', compact {r["compact_accuracy"]:.2f}'
                                                 if 'compact_accuracy' in r else '')
            paths = [record_path(args, run)]
            if osp.isdir(park_path(args, run)):  # (resumed from parked state: done with it)
                shutil.rmtree(park_path(args, run))
                paths.append(park_path(args, run))
            if args.commit:
                with lock:
                    committed = commit_paths(paths, f'results: {r["name"]} {msg}')
                msg += ' (committed)' if committed else ' (NOT committed)'
            msg += f' in {r["seconds"]:.0f}s'
        except Exception as e:  # noqa: BLE001  (keep going; the report lists what is missing)
            failed.append((run, str(e)))
            msg = f'FAILED: {str(e).splitlines()[0]}'
        with lock:
            done[0] += 1
            elapsed = time.time() - start
            eta = elapsed / done[0] * (len(todo) - done[0])
            print(f'[{done[0]}/{len(todo)}] {run}: {msg} (elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min)',
                  flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    for run, err in failed:
        print(f'failed: {run}\n{err}', file=sys.stderr)
    return failed


# ------------------------------------------------------------------------------------------------------ report
def is_current(record):
    """Whether ``record`` is a run of an experiment as its config reads now (same config, hash and recipe; for a
    fine-tuning run, the same pretraining config)."""
    exp = EXPERIMENTS.get(record['key'])
    if exp is None or exp.config != record['config'] or record['recipe'] != RECIPE:
        return False
    try:
        if config_hash(exp.config) != record['config_hash']:
            return False
        pre = record['pretrain']
        if exp.pretrain:
            return bool(pre) and pre['key'] == exp.pretrain and \
                pre['config_hash'] == config_hash(EXPERIMENTS[exp.pretrain].config)
    except FileNotFoundError:
        return False
    return not pre


def budget(record):
    return record['epochs'], record['train_size'], record['test_size'], record['batch_size']


def epochs_text(n):
    return f'{n} epoch' + ('' if n == 1 else 's')


def budget_text(b):
    e, n, t, bs = b
    return f'{epochs_text(e)}, {n} training / {t} test images, batch {bs}'


class Records:
    """The records of ``--records`` split for the report: ``current`` (one per identity, the newest) and
    ``stale`` (of configs edited since, or of experiments that are gone)."""

    def __init__(self, args):
        latest = {}
        for r in load_records(args.records):
            latest[digest(identity_of(r))] = r
        self.all = list(latest.values())
        self.current = [r for r in self.all if is_current(r)]
        self.stale = [r for r in self.all if not is_current(r)]
        self.sizes = (args.train_size, args.test_size, args.batch_size)

    def select(self, epochs, pretrain_epochs=None):
        """``{key: [record, ...]}`` (by seed) at ``epochs`` and the command line's sizes; ``pretrain_epochs``: the
        fine-tuning runs from that pretraining instead of the runs from scratch."""
        out = {}
        for r in sorted(self.current, key=lambda r: r['seed']):
            if budget(r) != (epochs, *self.sizes):
                continue
            if (r['pretrain'] or {}).get('epochs') != pretrain_epochs:
                continue
            out.setdefault(r['key'], []).append(r)
        return out

    def one(self, key, seed, epochs):
        return next((r for r in self.select(epochs).get(key, []) if r['seed'] == seed), None)


def mean_std(values):
    """Mean and sample STD (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    if not values:
        return 'pending'
    m, s = mean_std(values)
    return f'{m:.2f} ± {s:.2f} (n={len(values)})'


def difference(results, key, ref):
    """``mean(key) - mean(ref)`` ± its standard error ``sqrt(s1²/n1 + s2²/n2)`` over seeds and the ratio, as
    text; bold at 2 SE or more (read as a detectable difference). The SE needs two seeds of each."""
    a, b = accs(results, key), accs(results, ref)
    if not a or not b or key == ref:
        return ''
    d = statistics.mean(a) - statistics.mean(b)
    if min(len(a), len(b)) < 2:
        return f'{d:+.2f} (SE n/a)'
    se = (mean_std(a)[1] ** 2 / len(a) + mean_std(b)[1] ** 2 / len(b)) ** 0.5
    if se == 0:
        return f'{d:+.2f} ± 0.00'
    text = f'{d:+.2f} ± {se:.2f} ({abs(d) / se:.1f} SE)'
    return f'**{text}**' if abs(d) >= 2 * se else text


SIGNIFICANCE = ('Differences are ours − reference ± SE (`sqrt(s1²/n1 + s2²/n2)` over seeds); **bold**: at least '
                '2 SE, read as a detectable difference, otherwise within the seed noise.')


def accs(results, key, field='accuracy'):
    return [r[field] for r in results.get(key, []) if r.get(field) is not None]


def paper(value):
    return '–' if value is None else (f'{value[0]:.3f} ± {value[1]:.3f}' if isinstance(value, tuple) else
                                       f'{value:.3f}')


def pending_note(results, keys, suite, args):
    if any(results.get(k) for k in keys):
        return ''
    return (f'\n\nRuns pending: `python tools/reproduce.py --suite {suite} --epochs {args.epochs}'
            f'{size_options(args)}`.')


def size_options(args):
    opts = ''
    if args.train_size != FULL_TRAIN:
        opts += f' --train-size {args.train_size}'
    if args.test_size != FULL_TEST:
        opts += f' --test-size {args.test_size}'
    if args.batch_size != 128:
        opts += f' --batch-size {args.batch_size}'
    return opts


def table5_md(args, results):
    lines = ['| | ours: SmallNet ×1, Fashion-MNIST, mean ± STD / % | ours − static ± SE / pp '
             '| paper Table 5: MobileNetV2 ×0.35, CIFAR-10 / % | paper − static / pp '
             '| paper: SmallNet ×1, CIFAR-10 (Table 10) / % |', '|---|---|---|---|---|---|']
    for key in TABLE5:
        paper_delta = f'{PAPER_TABLE5[key][0] - PAPER_TABLE5["static"][0]:+.2f}' if key != 'static' else ''
        lines.append(f'| {EXPERIMENTS[key].label} | {fmt(accs(results, key))} | {difference(results, key, "static")} '
                     f'| {paper(PAPER_TABLE5[key])} | {paper_delta} | {paper(PAPER_SMALLNET.get(key))} |')
    text = '\n'.join(lines) + pending_note(results, TABLE5, 'table5', args)
    lines = ['', '', '| MobileNetV2-CIFAR ×0.35 | ours: Fashion-MNIST, mean ± STD / % | ours − static ± SE / pp '
             '| paper Table 5: CIFAR-10 / % | paper − static / pp |', '|---|---|---|---|---|']
    for key in TABLE5_MBV2:
        kind = key[5:]
        paper_delta = f'{PAPER_TABLE5[kind][0] - PAPER_TABLE5["static"][0]:+.2f}' if kind != 'static' else ''
        lines.append(f'| {EXPERIMENTS[kind].label} | {fmt(accs(results, key))} | '
                     f'{difference(results, key, "mbv2_static")} | {paper(PAPER_TABLE5[kind])} | {paper_delta} |')
    text += '\n'.join(lines) + pending_note(results, TABLE5_MBV2, 'table5_mbv2', args)
    return text


def rows_md(results, rows, first, papers):
    """Rows of (label, key, reference key): ours, ours − reference ± SE, then one column per (title, numbers) of
    ``papers``."""
    lines = [f'| {first} | ours: SmallNet, Fashion-MNIST, mean ± STD / % | ours − reference ± SE / pp | '
             + ' | '.join(title for title, _ in papers) + ' |', '|---' * (3 + len(papers)) + '|']
    labels = {key: label for label, key, _ in rows}
    for label, key, ref in rows:
        delta = difference(results, key, ref)
        delta = f'{delta} (vs {labels[ref]})' if delta else ''
        lines.append(f'| {label} | {fmt(accs(results, key))} | {delta} | '
                     + ' | '.join(paper(numbers.get(key)) for _, numbers in papers) + ' |')
    return '\n'.join(lines)


BOTH_PAPERS = (('paper: SmallNet, CIFAR-10 / %', PAPER_SMALLNET),
               ('paper: MobileNetV2 ×0.35, CIFAR-10 / %', PAPER_MBV2_ABLATION))


def table8_md(args, results):
    rows = [('MAConv w/', 'maconv', 'maconv'), ('MAConv w/o', 'maconv_nobypass', 'maconv'),
            ('MDConv w/', 'mdconv', 'maconv'), ('MDConv w/o', 'mdconv_nobypass', 'mdconv'),
            ('ReLU w/', 'relu_bypass', 'mdconv'), ('ReLU w/o', 'relu_nobypass', 'relu_bypass')]
    return (rows_md(results, rows, 'bypass', BOTH_PAPERS) + pending_note(results, TABLE8, 'table8', args)
)


def table9_md(args, results):
    rows = [('MAConv expanding', 'maconv', 'maconv'), ('MAConv compact', 'maconv_compact', 'maconv'),
            ('MAConv expanding w/o BN', 'maconv_nobn', 'maconv'), ('MDConv expanding', 'mdconv', 'mdconv'),
            ('MDConv compact', 'mdconv_compact', 'mdconv'), ('MDConv expanding w/o BN', 'mdconv_nobn', 'mdconv')]
    return (rows_md(results, rows, 'training', BOTH_PAPERS) + pending_note(results, TABLE9, 'table9', args)
)


def table10_md(args, results):
    lines = ['| width | ours: Static / % | ours: MAConv / % | ours: MDConv / % | ours: gain MAConv / MDConv ± SE / pp '
             '| paper (SmallNet, CIFAR-10): Static / MAConv / MDConv / % | paper: gain MAConv / MDConv / pp |',
             '|---|---|---|---|---|---|---|']
    for width in (1, 2, 4):
        keys = [k if width == 1 else f'x{width}_{k}' for k in ('static', 'maconv', 'mdconv')]
        values = [accs(results, k) for k in keys]
        gains = ' / '.join(difference(results, k, keys[0]) or '–' for k in keys[1:])
        paper_cells = ' / '.join(f'{PAPER_SMALLNET[k]:.3f}' for k in keys)
        paper_gains = ' / '.join(f'{PAPER_SMALLNET[k] - PAPER_SMALLNET[keys[0]]:+.2f}' for k in keys[1:])
        lines.append(f'| ×{width} | ' + ' | '.join(fmt(v) for v in values) + f' | {gains} | {paper_cells} | '
                     f'{paper_gains} |')
    return '\n'.join(lines) + pending_note(results, TABLE10, 'table10', args)


def ablation_md(args, results, rows, what, paper_title, keys, suite, not_run):
    """A SmallNet ablation table beside the paper's SmallNet CIFAR-10 column, the pending note, and the paper's
    rows that are not run here."""
    return (rows_md(results, rows, what, ((paper_title, PAPER_SMALLNET), )) + pending_note(results, keys, suite, args)
            + f'\n\nThe paper also has {not_run}, not run here.')


def table11_md(args, results):
    rows = [('Static', 'static', 'static'), ('MAConv m = 20', 'maconv', 'maconv'),
            ('MAConv m = 40', 'maconv_m40', 'maconv'), ('MAConv m = 60', 'maconv_m60', 'maconv'),
            ('MDConv m = 20', 'mdconv', 'mdconv'), ('MDConv m = 40', 'mdconv_m40', 'mdconv'),
            ('MDConv m = 60', 'mdconv_m60', 'mdconv')]
    return ablation_md(args, results, rows, 'intermediate channels m', 'paper Table 11: SmallNet ×1, CIFAR-10 / %',
                       TABLE11, 'table11', 'm = 30 (MAConv 74.924, MDConv 77.798 %) and m = 50 (74.294, 77.970 %)')


def table12_md(args, results):
    rows = [('1/4 × input channels', 'mdconv', 'mdconv'), ('1 × input channels', 'mdconv_hidden1', 'mdconv'),
            ('4 × input channels', 'mdconv_hidden4', 'mdconv')]
    return ablation_md(args, results, rows, 'MDConv, attention hidden units',
                       'paper Table 12: SmallNet ×1 MDConv, CIFAR-10 / %', TABLE12, 'table12',
                       '1/2 × (78.096 %) and 2 × (79.074 %)')


def table13_md(args, results):
    rows = [('Sigmoid', 'mdconv', 'mdconv'), ('Softmax', 'mdconv_softmax', 'mdconv'),
            ('Softmax T = 30', 'mdconv_softmax_t30', 'mdconv')]
    return ablation_md(args, results, rows, 'MDConv, gate function',
                       'paper Table 13: SmallNet ×1 MDConv, CIFAR-10 / %', TABLE13, 'table13',
                       'softmax T = 5 (77.160 %), 10 (76.612 %) and 20 (76.486 %)')


def deploy_md(args, results, keys):
    """One row per foldable experiment: every run's compact accuracy against its expanding accuracy."""
    lines = ['| model | runs | compact = expanding | largest difference / pp | expanding / compact, per seed / % '
             '| compact form (evaluated with) |', '|---|---|---|---|---|---|']
    equal = total = 0
    worst = 0.0
    for key in keys:
        runs = [r for r in results.get(key, []) if r.get('compact_accuracy') is not None]
        if not runs:
            continue
        same = sum(r['compact_accuracy'] == r['accuracy'] for r in runs)
        diff = max(abs(r['compact_accuracy'] - r['accuracy']) for r in runs)
        equal, total, worst = equal + same, total + len(runs), max(worst, diff)
        seeds = '; '.join(f's{r["seed"]}: {r["accuracy"]:.2f} / {r["compact_accuracy"]:.2f}' for r in runs)
        form = ('static model (`' + osp.basename(runs[0]['compact_config']) + '`)' if runs[0]['compact_form'] ==
                'static' else 'compact mdplug layers (`tools/test.py --deployed`)')
        lines.append(f'| {EXPERIMENTS[key].net} {EXPERIMENTS[key].label} | {len(runs)} | {same} of {len(runs)} | '
                     f'{diff:.2f} | {seeds} | {form} |')
    if not total:
        return 'Runs pending: every foldable run of the tables is listed here once it is recorded.'
    lines += ['', f'Compact accuracy equals expanding accuracy exactly in **{equal} of {total}** deployed runs '
              f'(largest difference {worst:.2f} pp). Each MAConv compact checkpoint is evaluated by loading it '
              "strictly into the *static* config's model."]
    return '\n'.join(lines)


def seeds_text(results):
    """``seeds 0-4 (n = 5): 5 rows; seeds 0-2 (n = 3): 20 rows``."""
    groups = {}
    for key, runs in results.items():
        groups.setdefault(tuple(r['seed'] for r in runs), []).append(key)
    parts = []
    for seeds, keys in sorted(groups.items(), key=lambda g: -len(g[0])):
        listed = (f'{seeds[0]}–{seeds[-1]}' if seeds == tuple(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2
                  else ', '.join(map(str, seeds)))
        parts.append(f'seed{"s" if len(seeds) > 1 else ""} {listed} (n = {len(seeds)}): {len(keys)} '
                     f'row{"s" if len(keys) > 1 else ""}')
    return '; '.join(parts)


def speed_md(runs):
    """Training images/s per network and kind (mean over its runs, per device)."""
    rows = {}
    for r in runs:
        rows.setdefault((r['key'], r['device']), []).append(r)
    lines = ['| network | kind | device | runs | training images/s (batch / mean iteration time) '
             '| images/s (images / training wall time, incl. per-epoch test) |', '|---|---|---|---|---|---|']
    order = list(EXPERIMENTS)
    for (key, device), rs in sorted(rows.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
        exp = EXPERIMENTS[key]
        cells = []
        for field in ('images_per_s', 'images_per_s_wall'):
            values = [r[field] for r in rs if r.get(field)]
            cells.append(f'{statistics.mean(values):.0f}' if values else '–')
        lines.append(f'| {exp.net} | {exp.label} | {device} | {len(rs)} | {cells[0]} | {cells[1]} |')
    return '\n'.join(lines)


def setup_md(args, recs, results, extra):
    """The budget of the tables and what it cost; ``extra``: the pilot and fine-tuning records also reported."""
    runs = [r for v in results.values() for r in v]
    used = runs + [r for r in extra if r not in runs]
    data = (f'the first {args.train_size} of the {FULL_TRAIN:,} training images' if args.train_size < FULL_TRAIN
            else f'all {FULL_TRAIN:,} training images').replace(',', ' ')
    test = (f'the first {args.test_size} test images' if args.test_size < FULL_TEST
            else f'all {FULL_TEST:,} test images').replace(',', ' ')
    lines = [f'- Data: Fashion-MNIST, {data}; evaluated on {test}; images zero-padded to 32×32, then the paper\'s '
             'CIFAR augmentation (pad 4 + random crop, horizontal flip).',
             f'- Recipe: the configs\' CIFAR recipe (SGD 0.1, momentum 0.9, weight decay 5e-4, cosine to zero) over '
             f'**{epochs_text(args.epochs)}**, batch {args.batch_size}; DYConv\'s temperature annealed 30 → 1 over '
             'the same fraction of training as in its 200-epoch recipe (10/200).']
    if not used:
        lines.append(f'- Runs pending: no record of this budget in `{osp.relpath(args.records)}` yet.')
    else:
        minutes = sum(r.get('seconds') or 0 for r in used) / 60
        devices = {}
        for r in used:
            device = f'CPU {r.get("cpu")}' if r['device'] == 'cpu' else r['device']
            devices[device] = devices.get(device, 0) + 1
        where = ', '.join(f'{d} ({n} runs)' for d, n in sorted(devices.items()))
        threads = sorted({r.get('torch_threads') for r in used if r.get('torch_threads')})
        commits = {r.get('git_commit') for r in used}
        dirty = sum(bool(r.get('git_dirty')) for r in used)
        more = len(used) - len(runs)
        lines += [f'- Records: **{len(runs)} run{"" if len(runs) == 1 else "s"} in the tables** '
                  f'({seeds_text(results)})' + (f', and {more} pilot / pretraining / fine-tuning runs' if more else '')
                  + '.',
                  f'- Cost: {minutes:.0f} job minutes in all (each run\'s wall time: train + test + deploy + test, as '
                  f'measured, whatever else the machine ran), on {where}; torch threads per run: '
                  f'{", ".join(map(str, threads)) or "?"}; code: {len(commits)} commit(s), {dirty} run(s) from a '
                  'checkout with uncommitted changes.']
    others = {}
    for r in recs.current:
        if r not in used and (budget(r)[1:] != recs.sizes or r['epochs'] != args.epochs):
            others[budget(r)] = others.get(budget(r), 0) + 1
    if others:
        lines.append('- Other budgets on record, **not** in these tables (`--epochs`, `--train-size`, `--test-size`, '
                     '`--batch-size` choose): ' + '; '.join(f'{budget_text(b)}: {n} runs'
                                                             for b, n in sorted(others.items())) + '.')
    if recs.stale:
        lines.append(f'- {len(recs.stale)} record(s) of configs edited since (or of experiments that are gone) are '
                     'ignored.')
    lines.append(f'- Command: `python tools/reproduce.py --suite default --epochs {args.epochs}{size_options(args)}` '
                 '(records in `docs/results/runs/`; `--report-only` rewrites this file from them).')
    lines.append(f'- Reading: mean ± sample STD over seeds. {SIGNIFICANCE}')
    if used:
        lines += ['', 'Training throughput of the runs in this report:', '', speed_md(used)]
    return '\n'.join(lines)


def pilot_md(args, recs):
    """Static SmallNet, seed PILOT_SEED, at each recorded epoch count of the command line's sizes."""
    pilots = sorted((r for r in recs.current if r['key'] == 'static' and r['seed'] == PILOT_SEED
                     and budget(r)[1:] == recs.sizes), key=lambda r: r['epochs'])
    if not pilots:
        return (f'Runs pending: `python tools/reproduce.py --suite pilot --pilot-epochs '
                f'{" ".join(map(str, args.pilot_epochs))}{size_options(args)}`.'), pilots
    lines = ['| epochs | final test accuracy / % | best epoch (accuracy / %) | last 5 epochs / % | wall minutes |',
             '|---|---|---|---|---|']
    for r in pilots:
        curve = [(i + 1, c) for i, c in enumerate(r['curve']) if c is not None]
        best = max(curve, key=lambda ec: ec[1]) if curve else None
        tail = ', '.join(f'{c:.2f}' for _, c in curve[-LAST_EPOCHS:])
        lines.append(f'| {r["epochs"]} | {r["accuracy"]:.2f} | ' + (f'{best[0]} ({best[1]:.2f})' if best else '–')
                     + f' | {tail} | {(r.get("seconds") or 0) / 60:.1f} |')
    lines += ['', f'Static SmallNet ×1, seed {PILOT_SEED}, one run per epoch count (cosine schedule over each); '
              f'the tables use **{epochs_text(args.epochs)}**.']
    return '\n'.join(lines), pilots


FINETUNE_ROWS = (('smallnet_x1', ''), ('mobilenet_v2_cifar_x035', 'mbv2_'))


def finetune_md(args, recs):
    """Issue 16's experiment: the pretraining run (where its curve ends), then static / MAConv / MDConv fine-tuned
    from it: mean ± STD over seeds, the difference to static fine-tuning ± SE, and the deploy check."""
    lines, used = [], []
    results = recs.select(args.finetune_epochs, pretrain_epochs=args.pretrain_epochs)
    for stem, prefix in FINETUNE_ROWS:
        pre = recs.one(f'{prefix}static', PRETRAIN_SEED, args.pretrain_epochs)
        if not any(results.get(f'{prefix}ft_{k}') for k in ('static', 'maconv', 'mdconv')):
            continue
        if pre:
            used.append(pre)
            curve = [c for c in pre['curve'] if c is not None]
            tail = ', '.join(f'{c:.2f}' for c in curve[-LAST_EPOCHS:])
            lines.append(f'**{stem}**: static model trained for {epochs_text(pre["epochs"])} (seed {pre["seed"]}), '
                         f'test accuracy {pre["accuracy"]:.2f} %; its last epochs: {tail} %.')
        else:
            lines.append(f'**{stem}**: the pretraining run ({args.pretrain_epochs} epochs) is not recorded.')
        lines += ['', f'| fine-tuned for {args.finetune_epochs} epochs from it | test accuracy, mean ± STD / % '
                  '| − static fine-tuning ± SE / pp | compact / % (deploy check) |', '|---|---|---|---|']
        for kind in ('static', 'maconv', 'mdconv'):
            key = f'{prefix}ft_{kind}'
            used += results.get(key, [])
            compact = accs(results, key, 'compact_accuracy')
            same = sum(r['compact_accuracy'] == r['accuracy'] for r in results.get(key, [])
                       if r.get('compact_accuracy') is not None)
            deploy = f'{fmt(compact)}; equal in {same} of {len(compact)} runs' if compact else '–'
            lines.append(f'| {EXPERIMENTS[key].label} | {fmt(accs(results, key))} | '
                         f'{difference(results, key, f"{prefix}ft_static")} | {deploy} |')
        lines.append('')
    if not lines:
        return (f'Runs pending: `python tools/reproduce.py --suite finetune --pretrain-epochs {args.pretrain_epochs} '
                f'--finetune-epochs {args.finetune_epochs}{size_options(args)}` (and `--suite finetune_mbv2`).',
                used, results)
    lines.append(f'Command: `python tools/reproduce.py --suite finetune --pretrain-epochs {args.pretrain_epochs} '
                 f'--finetune-epochs {args.finetune_epochs}{size_options(args)}` (SmallNet; `--suite finetune_mbv2` '
                 f'for MobileNetV2); the pretraining run is the network\'s static seed-{PRETRAIN_SEED} run of '
                 f'{args.pretrain_epochs} epochs; the MAConv compact checkpoint is evaluated as the static model.')
    return '\n'.join(lines), used, results


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def mean_curve(curves):
    """(epochs, per-epoch values) over ``curves``, skipping the epochs no curve has."""
    epochs, per_epoch = [], []
    for i in range(max(len(c) for c in curves)):
        values = [c[i] for c in curves if i < len(c) and c[i] is not None]
        if values:
            epochs.append(i + 1), per_epoch.append(values)
    return epochs, per_epoch


def plot_band(ax, x, per_epoch, label, alpha=0.2, **line_kw):
    """The mean over seeds of each epoch's values ``per_epoch`` (from :func:`mean_curve`) at positions ``x``,
    with the min–max band in the line's colour; returns the line."""
    line, = ax.plot(x, [statistics.mean(v) for v in per_epoch], label=label, **line_kw)
    ax.fill_between(x, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=line.get_color(),
                    alpha=alpha)
    return line


def epoch_axes(ax, title, fontsize=None, legend_size=None):
    """Labels, title, grid and (when anything is drawn) the legend of a test-accuracy-per-epoch plot."""
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy / %')
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=legend_size)


def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_finetune(args, recs, results, path):
    """Per network, the pretraining curve and each fine-tuning curve after it (mean over seeds); below it the
    same on a zoomed scale: the pretraining's last epochs and the fine-tuning epochs, each row's mean with its
    min–max band over seeds, the y range fitted to the pretraining's tail and the last two fine-tuning epochs
    (where the differences the table reports are; the first epochs' dip runs off it)."""
    plt = _pyplot()
    rows = [(stem, prefix) for stem, prefix in FINETUNE_ROWS
            if any(results.get(f'{prefix}ft_{kind}') for kind in ('static', 'maconv', 'mdconv'))]
    fig, axes = plt.subplots(2, len(rows), figsize=(5.5 * len(rows) + 0.5, 7.5), squeeze=False)
    for col, (stem, prefix) in enumerate(rows):
        whole, zoom = axes[0][col], axes[1][col]
        pre = recs.one(f'{prefix}static', PRETRAIN_SEED, args.pretrain_epochs)
        start, seen = 0, []
        if pre:
            points = [(i + 1, c) for i, c in enumerate(pre['curve']) if c is not None]
            start = len(pre['curve'])
            whole.plot(*zip(*points), color='grey', label='static, pretraining')
            tail = [(e, c) for e, c in points if e > start - LAST_EPOCHS]
            if tail:
                zoom.plot(*zip(*tail), color='grey', marker='.', label='static, pretraining (last epochs)')
                seen += [c for _, c in tail]
        for kind in ('static', 'maconv', 'mdconv'):
            key = f'{prefix}ft_{kind}'
            curves = [r['curve'] for r in results.get(key, []) if r.get('curve')]
            if not curves:
                continue
            epochs, per_epoch = mean_curve(curves)
            x = [start + e for e in epochs]
            label = f'{EXPERIMENTS[key].label} (n={len(curves)})'
            line = plot_band(zoom, x, per_epoch, label, alpha=0.15, marker='o')
            whole.plot(x, [statistics.mean(v) for v in per_epoch], marker='o', color=line.get_color(), label=label)
            seen += [c for v in per_epoch[-2:] for c in v]
        if seen:
            margin = max(0.1, 0.15 * (max(seen) - min(seen)))
            zoom.set_ylim(min(seen) - margin, max(seen) + margin)
        epoch_axes(whole, f'{stem}, Fashion-MNIST', legend_size=8)
        epoch_axes(zoom, f'{stem}: fine-tuning, zoomed (min–max band)', fontsize=10, legend_size=7)
    save(plt, fig, path)


def plot_curves(args, results, path):
    """Test accuracy vs epoch, mean over seeds with the min-max band (cf. the paper's Fig. 2): SmallNet ×1's Table 5
    rows, and MobileNetV2-CIFAR's beside them when it has records."""
    plt = _pyplot()
    panels = [('SmallNet ×1', TABLE5)] + ([('MobileNetV2-CIFAR ×0.35', TABLE5_MBV2)]
                                         if any(results.get(k) for k in TABLE5_MBV2) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (net, keys) in zip(axes[0], panels):
        for key in keys:
            curves = [r['curve'] for r in results.get(key, []) if r.get('curve')]
            if not curves:
                continue
            epochs, per_epoch = mean_curve(curves)
            plot_band(ax, epochs, per_epoch, f'{EXPERIMENTS[key.removeprefix("mbv2_")].label} (n={len(curves)})',
                      marker='o' if len(epochs) < 25 else None)
        ax.xaxis.get_major_locator().set_params(integer=True)
        epoch_axes(ax, f'{net} on Fashion-MNIST, {args.epochs} epochs (mean, min–max over seeds)', fontsize=9)
    save(plt, fig, path)


def plot_pilot(pilots, path):
    """The pilot's curves, one per epoch count, in one plot: where static SmallNet's test accuracy flattens."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pilots:
        points = [(i + 1, c) for i, c in enumerate(r['curve']) if c is not None]
        if points:
            ax.plot(*zip(*points), label=f'{r["epochs"]} epochs: {r["accuracy"]:.2f} %')
    epoch_axes(ax, f'Pilot: static SmallNet ×1 on Fashion-MNIST, seed {PILOT_SEED}')
    save(plt, fig, path)


def plot_widths(results, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ('static', 'maconv', 'mdconv'):
        xs, ys, es = [], [], []
        for width in (1, 2, 4):
            values = accs(results, kind if width == 1 else f'x{width}_{kind}')
            if values:
                m, s = mean_std(values)
                xs.append(width), ys.append(m), es.append(s)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=EXPERIMENTS[kind].label)
    ax.set_xscale('log', base=2)
    ax.set_xticks([1, 2, 4], labels=['×1', '×2', '×4'])
    ax.set_xlabel('width multiplier')
    ax.set_ylabel('test accuracy / %')
    ax.set_title('SmallNet width on Fashion-MNIST (mean ± STD)')
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    save(plt, fig, path)


SECTIONS = (('setup', 'Set-up'), ('pilot', 'Pilot: how many epochs'),
            ('table5', 'Table 5 analogue: static vs dynamic convolutions'),
            ('curves', 'Learning curves (cf. Fig. 2)'), ('deploy', 'Deploy check: compact accuracy equals expanding '
                                                                    'accuracy'),
            ('table8', 'Table 8 analogue: bypass shortcut'), ('table9', 'Table 9 analogue: expanding vs compact '
                                                                         'training'),
            ('table11', 'Table 11 analogue: intermediate channels m'),
            ('table12', 'Table 12 analogue: hidden units of the attention network'),
            ('table13', 'Table 13 analogue: gate function of the attention network'),
            ('table10', 'Table 10 analogue: width'), ('finetune', 'Fine-tuning a trained model'))
TEMPLATE_HEAD = """# Reproducing the paper's comparisons on Fashion-MNIST

Generated by `tools/reproduce.py` from the run records in `docs/results/runs/`, between the `reproduce:begin/end`
markers; the text outside them is written by hand and kept when the tables are regenerated.
"""


def marked(name, body):
    return f'<!-- reproduce:begin {name} -->\n{body}\n<!-- reproduce:end {name} -->'


def write_report(args):
    """Write the tables and plots of every suite from the records into ``args.docs``."""
    recs = Records(args)
    results = recs.select(args.epochs)
    plots = args.plots_dir
    os.makedirs(plots, exist_ok=True)
    rel = osp.relpath(plots, osp.dirname(osp.abspath(args.docs)))
    has_curves = any(results.get(k) for k in TABLE5 + TABLE5_MBV2)
    if has_curves:
        plot_curves(args, results, osp.join(plots, 'learning_curves.png'))
    has_widths = any(results.get(k) for k in TABLE10)
    if has_widths:
        plot_widths(results, osp.join(plots, 'width.png'))
    pilot, pilots = pilot_md(args, recs)
    if pilots:
        plot_pilot(pilots, osp.join(plots, 'pilot.png'))
        pilot += f'\n\n![pilot: test accuracy vs epoch]({rel}/pilot.png)'
    finetune, finetune_runs, finetune_results = finetune_md(args, recs)
    if finetune_runs:
        plot_finetune(args, recs, finetune_results, osp.join(plots, 'finetune.png'))
        finetune += f'\n\n![pretraining, then fine-tuning]({rel}/finetune.png)'
    curves = (f'![test accuracy vs epoch]({rel}/learning_curves.png)' if has_curves else
              'Runs pending (`--suite table5`).')
    bodies = dict(
        setup=setup_md(args, recs, results, pilots + finetune_runs), pilot=pilot, table5=table5_md(args, results),
        curves=curves, deploy=deploy_md(args, results, [k for k, e in EXPERIMENTS.items() if e.deploy]),
        table8=table8_md(args, results), table9=table9_md(args, results),
        table10=table10_md(args, results) + (f'\n\n![accuracy vs width]({rel}/width.png)' if has_widths else ''),
        table11=table11_md(args, results), table12=table12_md(args, results), table13=table13_md(args, results),
        finetune=finetune)
    text = (open(args.docs).read() if osp.isfile(args.docs) else
            TEMPLATE_HEAD + ''.join(f'\n## {title}\n{marked(name, "")}\n' for name, title in SECTIONS))
    for name, title in SECTIONS:
        begin, end = f'<!-- reproduce:begin {name} -->', f'<!-- reproduce:end {name} -->'
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + marked(name, bodies[name]) + rest.split(end, 1)[1]
        else:
            print(f'note: {args.docs} had no "{name}" markers: the section is appended at its end', flush=True)
            text = text.rstrip('\n') + f'\n\n## {title}\n{marked(name, bodies[name])}\n'
    os.makedirs(osp.dirname(osp.abspath(args.docs)), exist_ok=True)
    with open(args.docs, 'w') as f:
        f.write(text)
    print(f'wrote {args.docs} and the plots in {plots} from {len(recs.all)} record(s) in {args.records} '
          f'({sum(map(len, results.values()))} in the tables of {args.epochs} epochs)', flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--suite', choices=sorted(SUITES), help='which experiments (default: default)')
    parser.add_argument('--keys', nargs='+', metavar='KEY', help='run these experiments instead of a suite')
    parser.add_argument('--seeds', type=int, nargs='+',
                        help='seeds of every row (default: 0-4 for the Table 5 rows, 0-2 for the others)')
    parser.add_argument('--epochs', type=int, default=20,
                        help='epochs of each run (fine-tuning: the extra budget); the tables show this budget')
    parser.add_argument('--pilot-epochs', type=int, nargs='+', default=[10, 20, 40],
                        help='--suite pilot: the epoch counts of its static runs')
    parser.add_argument('--pretrain-epochs', type=int,
                        help='finetune suites: epochs of the static run they start from (default: --epochs)')
    parser.add_argument('--finetune-epochs', type=int,
                        help='finetune suites: epochs of the fine-tuning runs, the extra budget (default: --epochs); '
                             'the fine-tuning table shows this budget')
    parser.add_argument('--train-size', type=int, default=0,
                        help=f'train on the first N training images (0: all {FULL_TRAIN})')
    parser.add_argument('--test-size', type=int, default=0,
                        help=f'evaluate on the first N test images (0: all {FULL_TEST})')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--num-workers', type=int, default=0,
                        help='dataloader workers of every loader (persistent_workers when above 0)')
    parser.add_argument('--jobs', type=int, default=2, help='runs at once')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='where the runs train')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--data-root', help='Fashion-MNIST folder (default: the configs\')')
    parser.add_argument('--work-dir', default='work_dirs/reproduce', help='scratch: checkpoints and logs of runs')
    parser.add_argument('--records', default='docs/results/runs', help='one JSON record per finished run')
    parser.add_argument('--commit', action='store_true',
                        help='git-commit each record as it is written (that file only; a failure is a warning)')
    parser.add_argument('--docs', default='docs/results.md')
    parser.add_argument('--plots-dir', default='docs/results')
    parser.add_argument('--report-only', action='store_true', help='only rewrite docs and plots from the records')
    parser.add_argument('--park', action='store_true',
                        help='save what resuming the unfinished runs of --suite/--keys needs (last checkpoints, '
                             'curves; the final checkpoint of a pretraining run pending fine-tuning runs need) under '
                             '--park-dir, for a later session on another machine; with --commit, commit it')
    parser.add_argument('--park-dir', default='docs/results/parked',
                        help='parked runs (restored into --work-dir when a run starts there without its state)')
    parser.add_argument('--worker', nargs=3, metavar=('KEY', 'SEED', 'EPOCHS'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keys and args.suite:
        parser.error('give --suite or --keys, not both')
    unknown = [k for k in args.keys or () if k not in EXPERIMENTS]
    if unknown:
        parser.error(f'unknown experiment key(s) {", ".join(unknown)}; known: {", ".join(EXPERIMENTS)}')
    args.suite = args.suite or (None if args.keys else 'default')
    for name, full in (('train_size', FULL_TRAIN), ('test_size', FULL_TEST)):
        value = getattr(args, name)
        if not 0 <= value <= full:
            parser.error(f'--{name.replace("_", "-")} {value}: must be between 0 (all) and {full}')
        setattr(args, name, value or full)
    for name in ('epochs', 'batch_size', 'jobs', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.pretrain_epochs is None:
        args.pretrain_epochs = args.epochs
    if args.finetune_epochs is None:
        args.finetune_epochs = args.epochs
    for name in ('work_dir', 'records', 'docs', 'plots_dir', 'park_dir'):
        setattr(args, name, osp.abspath(getattr(args, name)))
    recipe = ['--epochs', args.epochs, '--pretrain-epochs', args.pretrain_epochs, '--finetune-epochs',
              args.finetune_epochs, '--train-size', args.train_size,
              '--test-size', args.test_size, '--batch-size', args.batch_size, '--num-workers', args.num_workers,
              '--work-dir', args.work_dir, '--records', args.records, '--docs', args.docs, '--plots-dir',
              args.plots_dir, '--park-dir', args.park_dir, '--device', args.device]
    args.argv = [str(a) for a in recipe] + (['--data-root', osp.abspath(args.data_root)] if args.data_root else [])
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not args.report_only:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f'--device cuda: torch {torch.__version__} sees no CUDA device')
    if args.worker:
        os.chdir(ROOT)
        key, seed, epochs = args.worker
        run_experiment(args, Run(EXPERIMENTS[key], int(seed), int(epochs)))
        return 0
    if args.park:
        changed = park_runs(args, planned_runs(args))
        if args.commit and changed:
            commit_paths(changed, f'results: park {len(changed)} unfinished run(s) for a later session')
        return 0
    failed = []
    if not args.report_only:
        failed = run_suite(args, planned_runs(args))
    write_report(args)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
