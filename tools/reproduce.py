"""Reproduce the paper's comparisons on Fashion-MNIST: ``python tools/reproduce.py [--suite default] [--jobs 2]``.

Every run goes through the user's path: ``tools/train.py CONFIG`` (the project's config, shortened with
``--cfg-options``), ``tools/test.py`` on the last checkpoint, and for a re-parameterisable model ``tools/deploy.py``
then ``tools/test.py`` on the compact checkpoint (with the *static* config for MAConv, ``--deployed`` otherwise).
A run is finished when its ``result.json`` exists; finished runs are skipped, an interrupted one resumes from its
last checkpoint. ``--report-only`` rewrites ``docs/results.md`` (between its ``reproduce:begin/end`` markers) and
the PNG plots from the results on disk.

Suites (``--suite``): ``table5``, ``deploy`` (the expanding models of ``table5``), ``table8``, ``table9``,
``table10``, ``default`` (all of them, most important first), ``table5_mbv2`` (MobileNetV2-CIFAR x0.35, slow on a CPU)
and ``tiny`` (the smoke test: MAConv and MDConv).

``finetune`` / ``finetune_mbv2`` (issue 16: does MAConv/MDConv help a model that is already trained?): first the
static model is trained for ``--pretrain-epochs`` (one run, seed 0; its curve shows whether it has converged), then
``configs/fashion_mnist/finetune/`` fine-tunes it for ``--epochs`` more as static, MAConv and MDConv with
``init='preserve'`` (every seed starts from that one checkpoint), each deployed and re-tested like the others.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FM = 'configs/fashion_mnist'
AB = 'configs/fashion_mnist/ablation'
FT = 'configs/fashion_mnist/finetune'
PRETRAIN_SEED = 0


class Experiment:
    """One config of a table: its training config, and how its trained model is deployed and re-evaluated.

    ``deploy`` is ``'static'`` (MAConv: the compact checkpoint is the static model of ``static_config``),
    ``'compact'`` (dynamic kinds: evaluated with ``--deployed``) or None (nothing to fold).
    ``pretrain``: the key of the pretraining run whose last checkpoint this run fine-tunes, loaded through the
    ``Pretrained`` init_cfgs of the config parts ``init_cfgs`` (e.g. ``model.head``); ``pretraining``: this run
    trains for ``--pretrain-epochs`` instead of ``--epochs``.
    """

    def __init__(self, key, config, label, deploy=None, static_config=None, pretrain=None, init_cfgs=(),
                 pretraining=False):
        self.key, self.config, self.label = key, config, label
        self.deploy, self.static_config = deploy, static_config
        self.pretrain, self.init_cfgs, self.pretraining = pretrain, tuple(init_cfgs), pretraining


def _experiments():
    exps = [
        Experiment('static', f'{FM}/smallnet_x1_static.py', 'Static'),
        Experiment('dyconv', f'{FM}/smallnet_x1_dyconv.py', 'DYConv', 'compact'),
        Experiment('dcd', f'{FM}/smallnet_x1_dcd.py', 'DCD', 'compact'),
        Experiment('maconv', f'{FM}/smallnet_x1_maconv.py', 'MAConv', 'static', f'{FM}/smallnet_x1_static.py'),
        Experiment('mdconv', f'{FM}/smallnet_x1_mdconv.py', 'MDConv', 'compact'),
        Experiment('maconv_nobypass', f'{AB}/smallnet_x1_maconv_nobypass.py', 'MAConv w/o bypass', 'static',
                   f'{FM}/smallnet_x1_static.py'),
        Experiment('mdconv_nobypass', f'{AB}/smallnet_x1_mdconv_nobypass.py', 'MDConv w/o bypass', 'compact'),
        Experiment('relu_bypass', f'{AB}/smallnet_x1_relu_bypass.py', 'ReLU w/ bypass'),
        Experiment('relu_nobypass', f'{AB}/smallnet_x1_relu_nobypass.py', 'ReLU w/o bypass'),
        Experiment('maconv_compact', f'{AB}/smallnet_x1_maconv_compact.py', 'MAConv compact', 'static',
                   f'{FM}/smallnet_x1_static.py'),
        Experiment('maconv_nobn', f'{AB}/smallnet_x1_maconv_nobn.py', 'MAConv expanding w/o BN', 'static',
                   f'{FM}/smallnet_x1_static.py'),
        Experiment('mdconv_compact', f'{AB}/smallnet_x1_mdconv_compact.py', 'MDConv compact', 'compact'),
        Experiment('mdconv_nobn', f'{AB}/smallnet_x1_mdconv_nobn.py', 'MDConv expanding w/o BN', 'compact'),
    ]
    for width in (2, 4):
        static = f'{AB}/smallnet_x{width}_static.py'
        exps += [
            Experiment(f'x{width}_static', static, f'Static x{width}'),
            Experiment(f'x{width}_maconv', f'{AB}/smallnet_x{width}_maconv.py', f'MAConv x{width}', 'static', static),
            Experiment(f'x{width}_mdconv', f'{AB}/smallnet_x{width}_mdconv.py', f'MDConv x{width}', 'compact'),
        ]
    for kind, label in (('static', 'Static'), ('dyconv', 'DYConv'), ('dcd', 'DCD'), ('maconv', 'MAConv'),
                        ('mdconv', 'MDConv')):
        exps.append(Experiment(
            f'mbv2_{kind}', f'{FM}/mobilenet_v2_cifar_x035_{kind}.py', f'MobileNetV2 x0.35 {label}',
            {'static': None, 'maconv': 'static'}.get(kind, 'compact'),
            f'{FM}/mobilenet_v2_cifar_x035_static.py' if kind == 'maconv' else None))
    for prefix, stem in (('', 'smallnet_x1'), ('mbv2_', 'mobilenet_v2_cifar_x035')):
        pre = f'{prefix}pretrain_static'
        exps.append(Experiment(pre, f'{FM}/{stem}_static.py', f'{stem} static, pretraining', pretraining=True))
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
TABLE8 = ['maconv', 'maconv_nobypass', 'mdconv', 'mdconv_nobypass', 'relu_bypass', 'relu_nobypass']
TABLE9 = ['maconv', 'maconv_compact', 'maconv_nobn', 'mdconv', 'mdconv_compact', 'mdconv_nobn']
TABLE10 = ['static', 'maconv', 'mdconv', 'x2_static', 'x2_maconv', 'x2_mdconv', 'x4_static', 'x4_maconv',
           'x4_mdconv']
SUITES = {
    'table5': TABLE5,
    'deploy': [k for k in TABLE5 if EXPERIMENTS[k].deploy],
    'table8': TABLE8,
    'table9': TABLE9,
    'table10': TABLE10,
    'table5_mbv2': [f'mbv2_{k}' for k in TABLE5],
    'tiny': ['maconv', 'mdconv'],
    'finetune': ['ft_static', 'ft_maconv', 'ft_mdconv'],
    'finetune_mbv2': ['mbv2_ft_static', 'mbv2_ft_maconv', 'mbv2_ft_mdconv'],
}
# most important first: Table 5 (with the deploy check of its expanding models), then the ablations
SUITES['default'] = list(dict.fromkeys(TABLE5 + TABLE8 + TABLE9 + TABLE10))

#: the paper's numbers (CIFAR-10) for the same comparisons; Table 5 is MobileNetV2 x0.35 (mean, STD over 5 runs)
PAPER_TABLE5 = {'static': (91.240, 0.268), 'dyconv': (91.614, 0.249), 'dcd': (87.286, 2.265),
                'maconv': (91.738, 0.198), 'mdconv': (92.118, 0.225)}
PAPER_SMALLNET = {'static': 73.936, 'maconv': 74.458, 'mdconv': 77.998, 'maconv_nobypass': 73.276,
                  'mdconv_nobypass': 76.164, 'relu_bypass': 78.500, 'relu_nobypass': 75.250,
                  'maconv_compact': 73.260, 'maconv_nobn': 74.092, 'mdconv_compact': 77.024, 'mdconv_nobn': 77.500,
                  'x2_static': 81.010, 'x2_maconv': 81.452, 'x2_mdconv': 84.204,
                  'x4_static': 85.650, 'x4_maconv': 85.872, 'x4_mdconv': 87.424}
PAPER_MBV2_ABLATION = {'maconv': 91.110, 'maconv_nobypass': 85.450, 'mdconv': 91.352, 'mdconv_nobypass': 86.332,
                       'relu_bypass': 91.742, 'relu_nobypass': 87.986, 'maconv_compact': 90.768,
                       'maconv_nobn': 90.564, 'mdconv_compact': 88.474, 'mdconv_nobn': 91.096}


# ------------------------------------------------------------------------------------------------------ running
def run_epochs(args, exp):
    """How many epochs ``exp`` trains: ``--pretrain-epochs`` for a pretraining run, else ``--epochs``."""
    return args.pretrain_epochs if exp.pretraining else args.epochs


def run_folder(args, exp):
    """The folder of ``exp``'s runs under the work dir: pretraining and fine-tuning runs name the pretraining length
    (results of different pretraining never mix)."""
    if exp.pretraining:
        return f'{exp.key}_e{args.pretrain_epochs}'
    if exp.pretrain:
        return f'{exp.key}_from_e{args.pretrain_epochs}'
    return exp.key


def run_dir(args, exp, seed):
    return osp.join(args.work_dir, run_folder(args, exp), f'seed{seed}')


def pretrained_checkpoint(args, exp):
    """The last checkpoint of the pretraining run that ``exp`` fine-tunes."""
    pre = EXPERIMENTS[exp.pretrain]
    return osp.join(run_dir(args, pre, PRETRAIN_SEED), f'epoch_{run_epochs(args, pre)}.pth')


def cfg_options(args, exp, seed=None, train=True):
    """``--cfg-options`` that shorten the config's recipe to ``args.epochs`` on ``args.train_size`` images."""
    opts = [f'train_dataloader.batch_size={args.batch_size}']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts.append(f'{loader}.num_workers={args.num_workers}')
    if args.test_size:
        opts += [f'{loader}.dataset.indices={args.test_size}' for loader in ('val_dataloader', 'test_dataloader')]
    if exp is not None and exp.pretrain:  # (a converted backbone loads it when it is built, by every tool)
        opts += [f'{part}.init_cfg.checkpoint={pretrained_checkpoint(args, exp)}' for part in exp.init_cfgs]
    if not train:
        return opts
    e = run_epochs(args, exp)
    opts += [f'train_cfg.max_epochs={e}', f'param_scheduler.T_max={e}', f'param_scheduler.end={e}',
             f'randomness.seed={seed}', 'default_hooks.checkpoint.max_keep_ckpts=1',
             'default_hooks.logger.interval=50']
    if args.train_size:
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


def read_curve(work_dir):
    """Test accuracy of epoch 1, 2, ... from mmengine's ``vis_data/scalars.json`` of every (resumed) run.

    None for an epoch whose validation was interrupted (its checkpoint is saved first, so a resumed job skips it).
    """
    curve = {}
    for stamp in sorted(os.listdir(work_dir)):
        path = osp.join(work_dir, stamp, 'vis_data', 'scalars.json')
        if not osp.isfile(path):
            continue
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if 'accuracy/top1' in record:
                    curve[int(record['step'])] = record['accuracy/top1']
    return [curve.get(e) for e in range(1, max(curve, default=0) + 1)]


def device_name():
    """What the runs of this process train on: the GPU's name, or 'cpu'."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_experiment(args, exp, seed):
    """Train, test, deploy and re-test one (experiment, seed) in this process; writes its ``result.json``."""
    wd = run_dir(args, exp, seed)
    start = time.time()
    train = ['tools/train.py', exp.config, '--work-dir', wd]
    if args.data_root:
        train += ['--data-root', args.data_root]
    if osp.isfile(osp.join(wd, 'last_checkpoint')):
        train.append('--resume')
    if exp.pretrain and not osp.isfile(pretrained_checkpoint(args, exp)):
        raise FileNotFoundError(f'{exp.key}: the pretraining checkpoint {pretrained_checkpoint(args, exp)} is missing')
    call_tool(train + ['--cfg-options'] + cfg_options(args, exp, seed))
    checkpoint = osp.join(wd, f'epoch_{run_epochs(args, exp)}.pth')
    result = dict(key=exp.key, config=exp.config, seed=seed, epochs=run_epochs(args, exp),
                  train_size=args.train_size, test_size=args.test_size, batch_size=args.batch_size,
                  curve=read_curve(wd), device=device_name())
    test_opts = ['--cfg-options'] + cfg_options(args, exp, train=False)
    data_root = ['--data-root', args.data_root] if args.data_root else []
    out = osp.join(wd, 'test_expanding.json')
    call_tool(['tools/test.py', exp.config, checkpoint, '--work-dir', osp.join(wd, 'test'), '--out', out]
              + data_root + test_opts)
    result['accuracy'] = read_json(out)['accuracy/top1']
    if exp.deploy:
        compact = osp.join(wd, 'compact.pth')
        call_tool(['tools/deploy.py', exp.config, checkpoint, compact] + test_opts)
        out = osp.join(wd, 'test_compact.json')
        if exp.deploy == 'static':  # (the static config loads no pretrained checkpoint)
            test = ['tools/test.py', exp.static_config, compact, '--cfg-options'] + cfg_options(args, None, train=False)
        else:
            test = ['tools/test.py', exp.config, compact, '--deployed'] + test_opts
        call_tool(test + ['--work-dir', osp.join(wd, 'test_compact'), '--out', out] + data_root)
        result.update(compact_accuracy=read_json(out)['accuracy/top1'], compact_form=exp.deploy,
                      compact_config=exp.static_config if exp.deploy == 'static' else exp.config)
    result['seconds'] = round(time.time() - start, 1)
    with open(osp.join(wd, 'result.json.tmp'), 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(osp.join(wd, 'result.json.tmp'), osp.join(wd, 'result.json'))
    return result


def running_elsewhere(args, key, seed):
    """Whether another ``tools/reproduce.py`` is running this (experiment, seed) now (its ``worker.pid`` lives)."""
    path = osp.join(run_dir(args, EXPERIMENTS[key], seed), 'worker.pid')
    try:
        with open(path) as f:
            os.kill(int(f.read()), 0)
        return True
    except (OSError, ValueError):
        return False


def spawn_experiment(args, exp, seed):
    """Run :func:`run_experiment` in a child process (``--worker``), its output in the run's ``reproduce.log``."""
    wd = run_dir(args, exp, seed)
    os.makedirs(wd, exist_ok=True)
    log_path = osp.join(wd, 'reproduce.log')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # mmengine's runner takes a visible GPU by itself
    with open(log_path, 'a') as log:
        proc = subprocess.Popen([sys.executable, osp.abspath(__file__), '--worker', exp.key, str(seed)] + args.argv,
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(osp.join(wd, 'worker.pid'), 'w') as f:
            f.write(str(proc.pid))
        proc.wait()
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f'{exp.key} seed {seed} failed (exit {proc.returncode}); see {log_path}:\n{tail}')
    return read_json(osp.join(wd, 'result.json'))


def result_path(args, key, seed):
    return osp.join(run_dir(args, EXPERIMENTS[key], seed), 'result.json')


def run_suite(args, keys):
    """Run every (experiment, seed) of ``keys`` that has no ``result.json`` yet, ``args.jobs`` at a time.

    Order: the pretraining runs that fine-tuning runs of ``keys`` start from (seed 0, to the end, before any of
    them), then Table 5's rows (and so the deploy check), then the rest; seed-major within each, so a suite cut
    short still has every row with fewer seeds.
    """
    pretraining = list(dict.fromkeys(EXPERIMENTS[k].pretrain for k in keys if EXPERIMENTS[k].pretrain))
    if pretraining:
        failed = run_runs(args, [(EXPERIMENTS[k], PRETRAIN_SEED) for k in pretraining])
        if failed:
            return failed
    groups = [[k for k in keys if k in TABLE5], [k for k in keys if k not in TABLE5]]
    return run_runs(args, [(EXPERIMENTS[k], s) for group in groups for s in args.seeds for k in group])


def run_runs(args, runs):
    """Run each (experiment, seed) of ``runs`` that has no ``result.json`` yet, ``args.jobs`` at a time."""
    todo = [(e, s) for e, s in runs if not osp.isfile(result_path(args, e.key, s))]
    elsewhere = [(e, s) for e, s in todo if running_elsewhere(args, e.key, s)]
    todo = [item for item in todo if item not in elsewhere]
    total = len(runs)
    print(f'{total - len(todo) - len(elsewhere)}/{total} runs already finished, {len(elsewhere)} running in another '
          f'process; {len(todo)} to run with {args.jobs} job(s) (work dir {args.work_dir})', flush=True)
    lock, done, failed, start = threading.Lock(), [0], [], time.time()

    def one(item):
        exp, seed = item
        if osp.isfile(result_path(args, exp.key, seed)) or running_elsewhere(args, exp.key, seed):
            print(f'  skip   {exp.key} seed {seed}: finished or running in another process', flush=True)
            return
        print(f'  start  {exp.key} seed {seed}', flush=True)
        try:
            r = spawn_experiment(args, exp, seed)
            msg = f'acc {r["accuracy"]:.2f}' + (f', compact {r["compact_accuracy"]:.2f}'
                                                 if 'compact_accuracy' in r else '') + f' in {r["seconds"]:.0f}s'
        except Exception as e:  # noqa: BLE001  (keep going; the report lists what is missing)
            failed.append((exp.key, seed, str(e)))
            msg = f'FAILED: {str(e).splitlines()[0]}'
        with lock:
            done[0] += 1
            elapsed = time.time() - start
            eta = elapsed / done[0] * (len(todo) - done[0])
            print(f'[{done[0]}/{len(todo)}] {exp.key} seed {seed}: {msg} (elapsed {elapsed / 60:.1f} min, '
                  f'eta {eta / 60:.1f} min)', flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    for key, seed, err in failed:
        print(f'failed: {key} seed {seed}\n{err}', file=sys.stderr)
    return failed


# ------------------------------------------------------------------------------------------------------ report
def load_results(args, keys):
    """``{key: [result, ...]}`` of the finished runs of ``keys`` (any seed found on disk)."""
    results = {}
    for key in keys:
        folder = osp.join(args.work_dir, run_folder(args, EXPERIMENTS[key]))
        if not osp.isdir(folder):
            continue
        for seed_dir in sorted(os.listdir(folder)):
            path = osp.join(folder, seed_dir, 'result.json')
            if osp.isfile(path):
                results.setdefault(key, []).append(read_json(path))
    return results


def mean_std(values):
    """Mean and sample STD (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    if not values:
        return 'not run'
    m, s = mean_std(values)
    return f'{m:.2f} ± {s:.2f} (n={len(values)})'


def difference(results, key, ref):
    """``mean(key) - mean(ref)`` ± its standard error ``sqrt(s1²/n1 + s2²/n2)`` over seeds, as text.

    The standard error needs two seeds of each; with one it reads ``(SE n/a)``.
    """
    a, b = accs(results, key), accs(results, ref)
    if not a or not b or key == ref:
        return ''
    delta = f'{statistics.mean(a) - statistics.mean(b):+.2f}'
    if min(len(a), len(b)) < 2:
        return delta + ' (SE n/a)'
    se = (mean_std(a)[1] ** 2 / len(a) + mean_std(b)[1] ** 2 / len(b)) ** 0.5
    return f'{delta} ± {se:.2f}'


def accs(results, key, field='accuracy'):
    return [r[field] for r in results.get(key, []) if field in r]


def paper(value):
    return '–' if value is None else (f'{value[0]:.3f} ± {value[1]:.3f}' if isinstance(value, tuple) else
                                       f'{value:.3f}')


def table5_md(results):
    lines = ['| | ours: SmallNet ×1, Fashion-MNIST, mean ± STD / % | ours − static ± SE / pp '
             '| paper Table 5: MobileNetV2 ×0.35, CIFAR-10 / % | paper − static / pp '
             '| paper: SmallNet ×1, CIFAR-10 (Table 10) / % |', '|---|---|---|---|---|---|']
    for key in TABLE5:
        values = accs(results, key)
        delta = difference(results, key, 'static')
        paper_delta = f'{PAPER_TABLE5[key][0] - PAPER_TABLE5["static"][0]:+.2f}' if key != 'static' else ''
        lines.append(f'| {EXPERIMENTS[key].label} | {fmt(values)} | {delta} | {paper(PAPER_TABLE5[key])} | '
                     f'{paper_delta} | {paper(PAPER_SMALLNET.get(key))} |')
    mbv2 = [f'mbv2_{k}' for k in TABLE5]
    if any(results.get(k) for k in mbv2):
        lines += ['', '| MobileNetV2-CIFAR ×0.35 | ours, Fashion-MNIST / % | paper, CIFAR-10 / % |', '|---|---|---|']
        lines += [f'| {EXPERIMENTS[k].label} | {fmt(accs(results, k))} | {paper(PAPER_TABLE5[k[5:]])} |'
                  for k in mbv2]
    return '\n'.join(lines)


def rows_md(results, rows, header):
    """Rows of (label, key, reference key): ours, ours − reference ± SE, the paper's SmallNet and MobileNetV2."""
    lines = [header, '|---|---|---|---|---|']
    labels = {key: label for label, key, _ in rows}
    for label, key, ref in rows:
        delta = difference(results, key, ref)
        delta = f'{delta} (vs {labels[ref]})' if delta else ''
        lines.append(f'| {label} | {fmt(accs(results, key))} | {delta} | '
                     f'{paper(PAPER_SMALLNET.get(key))} | {paper(PAPER_MBV2_ABLATION.get(key))} |')
    return '\n'.join(lines)


def table8_md(results):
    rows = [('MAConv w/', 'maconv', 'maconv'), ('MAConv w/o', 'maconv_nobypass', 'maconv'),
            ('MDConv w/', 'mdconv', 'maconv'), ('MDConv w/o', 'mdconv_nobypass', 'mdconv'),
            ('ReLU w/', 'relu_bypass', 'mdconv'), ('ReLU w/o', 'relu_nobypass', 'relu_bypass')]
    return rows_md(results, rows, '| bypass | ours: SmallNet, Fashion-MNIST / % | ours − reference ± SE / pp '
                   '| paper: SmallNet, CIFAR-10 / % | paper: MobileNetV2, CIFAR-10 / % |')


def table9_md(results):
    rows = [('MAConv expanding', 'maconv', 'maconv'), ('MAConv compact', 'maconv_compact', 'maconv'),
            ('MAConv expanding w/o BN', 'maconv_nobn', 'maconv'), ('MDConv expanding', 'mdconv', 'mdconv'),
            ('MDConv compact', 'mdconv_compact', 'mdconv'), ('MDConv expanding w/o BN', 'mdconv_nobn', 'mdconv')]
    return rows_md(results, rows, '| training | ours: SmallNet, Fashion-MNIST / % | ours − expanding ± SE / pp '
                   '| paper: SmallNet, CIFAR-10 / % | paper: MobileNetV2, CIFAR-10 / % |')


def table10_md(results):
    lines = ['| width | ours: Static / % | ours: MAConv / % | ours: MDConv / % | ours: gain MAConv / MDConv ± SE / pp '
             '| paper (CIFAR-10): Static / MAConv / MDConv / % | paper: gain MAConv / MDConv / pp |',
             '|---|---|---|---|---|---|---|']
    for width in (1, 2, 4):
        keys = [k if width == 1 else f'x{width}_{k}' for k in ('static', 'maconv', 'mdconv')]
        values = [accs(results, k) for k in keys]
        gains = ' / '.join(difference(results, k, keys[0]) or '–' for k in keys[1:])
        paper_cells = ' / '.join(f'{PAPER_SMALLNET[k]:.3f}' for k in keys)
        paper_gains = ' / '.join(f'{PAPER_SMALLNET[k] - PAPER_SMALLNET[keys[0]]:+.2f}' for k in keys[1:])
        lines.append(f'| ×{width} | ' + ' | '.join(fmt(v) for v in values) + f' | {gains} | {paper_cells} | '
                     f'{paper_gains} |')
    return '\n'.join(lines)


def deploy_md(results, keys):
    lines = ['| model | seed | expanding / % | compact / % | compact form (evaluated with) |', '|---|---|---|---|---|']
    equal = total = 0
    worst = 0.0
    for key in keys:
        for r in results.get(key, []):
            if 'compact_accuracy' not in r:
                continue
            total += 1
            equal += r['compact_accuracy'] == r['accuracy']
            worst = max(worst, abs(r['compact_accuracy'] - r['accuracy']))
            form = ('static model (`' + osp.basename(r['compact_config']) + '`)' if r['compact_form'] == 'static'
                    else 'compact mdplug layers (`tools/test.py --deployed`)')
            lines.append(f'| {EXPERIMENTS[key].label} | {r["seed"]} | {r["accuracy"]:.2f} | '
                         f'{r["compact_accuracy"]:.2f} | {form} |')
    lines.append('')
    lines.append(f'Compact accuracy equals expanding accuracy exactly in **{equal} of {total}** deployed runs '
                 f'(largest difference {worst:.2f} pp). Each MAConv compact checkpoint is evaluated by loading it '
                 f'strictly into the *static* config\'s model.')
    return '\n'.join(lines)


def setup_md(args, results):
    runs = sum(len(v) for v in results.values())
    seconds = sum(r.get('seconds', 0) for v in results.values() for r in v)
    devices = sorted({r.get('device', 'cpu') for v in results.values() for r in v})
    where = ' and '.join('a 2-core CPU machine' if d == 'cpu' else f'one {d} GPU' for d in devices) or 'no machine'
    data = (f'the first {args.train_size} of the 60 000 training images' if args.train_size
            else 'all 60 000 training images')
    test = f'the first {args.test_size} test images' if args.test_size else 'all 10 000 test images'
    return (f'- Data: Fashion-MNIST, {data}; evaluated on {test}; images zero-padded to 32×32, then the paper\'s '
            f'CIFAR augmentation (pad 4 + random crop, horizontal flip).\n'
            f'- Recipe: the configs\' CIFAR recipe (SGD 0.1, momentum 0.9, weight decay 5e-4, cosine to zero) '
            f'shortened to **{args.epochs} epoch(s)**, batch {args.batch_size}, '
            f'seeds {", ".join(map(str, args.seeds))}.\n'
            f'- {runs} finished runs on {where}; their run times (train + test + deploy + test, each as '
            f'measured, whatever else the machine ran) add up to {seconds / 60:.0f} minutes.\n'
            f'- Command: `python tools/reproduce.py --suite {args.suite} --epochs {args.epochs} '
            f'--train-size {args.train_size} --seeds {" ".join(map(str, args.seeds))}'
            f'{" --device cuda" if args.device == "cuda" else ""}`')


FINETUNE_ROWS = (('smallnet_x1', ''), ('mobilenet_v2_cifar_x035', 'mbv2_'))


def finetune_md(args, results):
    """Issue 16's experiment: the pretraining run (where its curve ends), then static / MAConv / MDConv fine-tuned
    from it: mean ± STD over seeds, the difference to static fine-tuning ± SE, and the deploy check."""
    lines = []
    for stem, prefix in FINETUNE_ROWS:
        pre = results.get(f'{prefix}pretrain_static', [])
        if not pre and not any(results.get(f'{prefix}ft_{k}') for k in ('static', 'maconv', 'mdconv')):
            continue
        if pre:
            curve = [c for c in pre[0]['curve'] if c is not None]
            tail = ', '.join(f'{c:.2f}' for c in curve[-5:])
            lines.append(f'**{stem}**: static model trained for {pre[0]["epochs"]} epochs (seed {pre[0]["seed"]}), '
                         f'test accuracy {pre[0]["accuracy"]:.2f} %; its last epochs: {tail} %.')
        else:
            lines.append(f'**{stem}**: pretraining run not on disk.')
        lines += ['', f'| fine-tuned for {args.epochs} epochs from it | test accuracy, mean ± STD / % '
                  '| − static fine-tuning ± SE / pp | compact / % (deploy check) |', '|---|---|---|---|']
        for kind in ('static', 'maconv', 'mdconv'):
            key = f'{prefix}ft_{kind}'
            compact = accs(results, key, 'compact_accuracy')
            same = sum(r['compact_accuracy'] == r['accuracy'] for r in results.get(key, [])
                       if 'compact_accuracy' in r)
            deploy = f'{fmt(compact)}; equal in {same} of {len(compact)} runs' if compact else '–'
            lines.append(f'| {EXPERIMENTS[key].label} | {fmt(accs(results, key))} | '
                         f'{difference(results, key, f"{prefix}ft_static")} | {deploy} |')
        lines.append('')
    if not lines:
        return (f'Not run yet: `python tools/reproduce.py --suite finetune --pretrain-epochs {args.pretrain_epochs} '
                f'--epochs {args.epochs} --train-size 0` (and `--suite finetune_mbv2`).')
    lines.append(f'Command: `python tools/reproduce.py --suite finetune --pretrain-epochs {args.pretrain_epochs} '
                 f'--epochs {args.epochs} --train-size {args.train_size} --seeds {" ".join(map(str, args.seeds))}`; '
                 f'the MAConv compact checkpoint is evaluated as the static model.')
    return '\n'.join(lines)


def plot_finetune(results, path):
    """The pretraining curve, then each fine-tuning curve after it (mean over seeds)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FINETUNE_ROWS), figsize=(11, 4))
    for ax, (stem, prefix) in zip(axes, FINETUNE_ROWS):
        pre = results.get(f'{prefix}pretrain_static', [])
        start = 0
        if pre:
            curve = pre[0]['curve']
            ax.plot([i + 1 for i, c in enumerate(curve) if c is not None], [c for c in curve if c is not None],
                    color='grey', label='static, pretraining')
            start = len(curve)
        for kind in ('static', 'maconv', 'mdconv'):
            key = f'{prefix}ft_{kind}'
            curves = [r['curve'] for r in results.get(key, []) if r.get('curve')]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            means = [statistics.mean(c[i] for c in curves if c[i] is not None) for i in range(n)
                     if any(c[i] is not None for c in curves)]
            ax.plot(range(start + 1, start + 1 + len(means)), means, marker='o', label=f'{EXPERIMENTS[key].label} '
                    f'(n={len(curves)})')
        ax.set_title(f'{stem}, Fashion-MNIST')
        ax.set_xlabel('epoch')
        ax.set_ylabel('test accuracy / %')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(results, path, keys=('static', 'maconv', 'mdconv', 'dcd')):
    """Test accuracy vs epoch, mean over seeds with the min-max band (cf. the paper's Fig. 2)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        curves = [r['curve'] for r in results.get(key, []) if r.get('curve')]
        if not curves:
            continue
        epochs, per_epoch = [], []
        for i in range(max(len(c) for c in curves)):
            values = [c[i] for c in curves if i < len(c) and c[i] is not None]
            if values:
                epochs.append(i + 1), per_epoch.append(values)
        ax.plot(epochs, [statistics.mean(v) for v in per_epoch], marker='o',
                label=f'{EXPERIMENTS[key].label} (n={len(curves)})')
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], alpha=0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy / %')
    ax.set_title('SmallNet ×1 on Fashion-MNIST (mean, min–max over seeds)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_widths(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SECTIONS = ('setup', 'table5', 'curves', 'deploy', 'table8', 'table9', 'table10', 'finetune')
TEMPLATE = """# Reproducing the paper's comparisons on Fashion-MNIST

Generated by `tools/reproduce.py` between the `reproduce:begin/end` markers; the text outside them is written by
hand and kept when the tables are regenerated.

## Set-up
{setup}

## Table 5 analogue: static vs dynamic convolutions
{table5}

## Learning curves (cf. Fig. 2)
{curves}

## Deploy check: compact accuracy equals expanding accuracy
{deploy}

## Table 8 analogue: bypass shortcut
{table8}

## Table 9 analogue: expanding vs compact training
{table9}

## Table 10 analogue: width
{table10}

## Fine-tuning a trained model
{finetune}
"""


def marked(name, body):
    return f'<!-- reproduce:begin {name} -->\n{body}\n<!-- reproduce:end {name} -->'


def write_report(args):
    """Write the tables and plots of every suite from the results on disk into ``args.docs``."""
    results = load_results(args, list(EXPERIMENTS))
    plots = args.plots_dir
    os.makedirs(plots, exist_ok=True)
    rel = osp.relpath(plots, osp.dirname(osp.abspath(args.docs)))
    curves_png, widths_png = osp.join(plots, 'learning_curves.png'), osp.join(plots, 'width.png')
    plot_curves(results, curves_png)
    plot_widths(results, widths_png)
    finetune_png = osp.join(plots, 'finetune.png')
    plot_finetune(results, finetune_png)
    finetune = finetune_md(args, results)
    bodies = dict(
        setup=setup_md(args, results), table5=table5_md(results),
        curves=f'![test accuracy vs epoch]({rel}/learning_curves.png)',
        deploy=deploy_md(results, [k for k, e in EXPERIMENTS.items() if e.deploy and not e.pretrain]),
        table8=table8_md(results), table9=table9_md(results),
        table10=table10_md(results) + f'\n\n![accuracy vs width]({rel}/width.png)',
        finetune=finetune + (f'\n\n![pretraining, then fine-tuning]({rel}/finetune.png)'
                             if not finetune.startswith('Not run') else ''))
    text = (open(args.docs).read() if osp.isfile(args.docs)
            else TEMPLATE.format(**{k: marked(k, '') for k in SECTIONS}))
    for name, body in bodies.items():
        begin, end = f'<!-- reproduce:begin {name} -->', f'<!-- reproduce:end {name} -->'
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + marked(name, body) + rest.split(end, 1)[1]
    os.makedirs(osp.dirname(osp.abspath(args.docs)), exist_ok=True)
    with open(args.docs, 'w') as f:
        f.write(text)
    print(f'wrote {args.docs}, {curves_png}, {widths_png}')
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--suite', default='default', choices=sorted(SUITES))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=5, help='epochs of each run (fine-tuning: the extra budget)')
    parser.add_argument('--pretrain-epochs', type=int, default=30,
                        help='finetune suites: epochs of the static pretraining run they start from')
    parser.add_argument('--train-size', type=int, default=10000,
                        help='train on the first N training images (0: all 60 000)')
    parser.add_argument('--test-size', type=int, default=0, help='evaluate on the first N test images (0: all)')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--num-workers', type=int, default=0, help='dataloader workers of every run')
    parser.add_argument('--jobs', type=int, default=2, help='runs at once')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='where the runs train (cuda: results in their own work dir and report)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--data-root', help='Fashion-MNIST folder (default: the configs\')')
    parser.add_argument('--work-dir', default='work_dirs/reproduce')
    parser.add_argument('--docs', default='docs/results.md')
    parser.add_argument('--plots-dir', default='docs/results')
    parser.add_argument('--report-only', action='store_true', help='only rewrite docs and plots from the results')
    parser.add_argument('--worker', nargs=2, metavar=('KEY', 'SEED'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    recipe = ['--epochs', args.epochs, '--pretrain-epochs', args.pretrain_epochs, '--train-size', args.train_size,
              '--test-size', args.test_size, '--batch-size', args.batch_size, '--num-workers', args.num_workers,
              '--work-dir', osp.abspath(args.work_dir), '--device', args.device]
    args.argv = [str(a) for a in recipe] + (['--data-root', osp.abspath(args.data_root)] if args.data_root else [])
    # results of different recipes never mix: one folder per (epochs, train size, test size)
    tag = f'e{args.epochs}_n{args.train_size}_t{args.test_size}' + ('_cuda' if args.device == 'cuda' else '')
    args.work_dir = osp.join(osp.abspath(args.work_dir), tag)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cuda' and not args.report_only:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f'--device cuda: torch {torch.__version__} sees no CUDA device')
    if args.worker:
        os.chdir(ROOT)
        run_experiment(args, EXPERIMENTS[args.worker[0]], int(args.worker[1]))
        return 0
    failed = []
    if not args.report_only:
        failed = run_suite(args, SUITES[args.suite])
    write_report(args)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
