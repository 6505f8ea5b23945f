"""Training images/s of the reproduce suite's path against a plain PyTorch loop over the same model and data.

    python tools/throughput.py [--models smallnet_x1 mobilenet_v2_cifar_x035] [--kinds static maconv ...]
                               [--iters 30] [--rounds 3] [--batch-size 128] [--out docs/throughput.md]

For each ``configs/fashion_mnist/<model>_<kind>.py``, alternately (``--rounds`` times, same process, torch threads as
set by ``OMP_NUM_THREADS``):

- **mmengine**: a Runner built from the config (what ``tools/train.py`` builds: preloaded dataset, the batch
  augmentation of ``mdplug.AugmentClsDataPreprocessor``, mmpretrain's ``ImageClassifier`` and loss, the optim
  wrapper, the hooks), ``runner.train()`` over ``--iters`` batches of the training set; timed from the end of
  iteration 3 to the end of the last (dataloading, hooks, data preprocessor, forward, loss, backward, SGD step);
- **plain**: the same model class built from the same config, the same preloaded tensor, the same per-batch crop
  and flip (``mdplug.mmpretrain.preprocessor.crop_flip``) and normalisation, ``F.cross_entropy`` and
  ``torch.optim.SGD`` with the config's settings, in a bare Python loop, timed the same way.

The ratio of the two medians is the overhead of the project's training path; the issue's bar is ≤ 1.3×.
"""
import argparse
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
WARMUP = 3


def build_cfg(config, batch_size, iters, work_dir):
    from mmengine.config import Config

    from mdplug.mmpretrain import runtime

    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.work_dir = work_dir
    cfg.train_dataloader.batch_size = batch_size
    cfg.train_dataloader.dataset.indices = batch_size * iters
    cfg.train_cfg.max_epochs = 1
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 10 ** 6
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=0)
    runtime.fix_dataloaders(cfg)
    return cfg


def clock_hook():
    """An mmengine hook recording the time at the end of each training iteration in its ``stamps``."""
    from mmengine.hooks import Hook

    class ThroughputClock(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.stamps = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.stamps.append(time.perf_counter())

    return ThroughputClock()


def images_per_s(stamps, batch_size):
    """Images/s from the end of iteration ``WARMUP`` to the end of the last one."""
    steps = len(stamps) - WARMUP
    return batch_size * steps / (stamps[-1] - stamps[WARMUP - 1])


def run_mmengine(cfg, round_):
    from mmengine.runner import Runner

    clock = clock_hook()
    cfg = cfg.copy()
    cfg.experiment_name = f'throughput_{round_}_{time.time_ns()}'
    runner = Runner.from_cfg(cfg)
    runner.register_hook(clock, priority='LOWEST')
    runner.train()
    return images_per_s(clock.stamps, cfg.train_dataloader.batch_size), runner


def run_plain(cfg, dataset, iters):
    """The same model, data and augmentation in a bare loop (no mmengine, no DataSample)."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    from mdplug.mmpretrain.preprocessor import crop_flip

    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    pre = cfg.data_preprocessor
    mean = torch.tensor(pre['mean']).view(-1, 1, 1)
    std = torch.tensor(pre['std']).view(-1, 1, 1)
    crop = dict(pre.get('random_crop') or {})
    flip = (pre.get('random_flip') or {}).get('prob', 0.0)
    images = dataset._preloaded['inputs']
    labels = torch.cat(dataset._preloaded['labels'])
    opt = cfg.optim_wrapper.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=opt['lr'], momentum=opt.get('momentum', 0),
                                weight_decay=opt.get('weight_decay', 0))
    batch_size = cfg.train_dataloader.batch_size
    order = torch.randperm(len(images))
    stamps = []
    for i in range(iters):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = crop_flip(images[idx], flip_prob=flip, **crop).float()
        x = (x - mean) / std
        loss = F.cross_entropy(model(x, mode='tensor'), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return images_per_s(stamps, batch_size)


def measure(config, args):
    work_dir = tempfile.mkdtemp(prefix='mdplug_throughput_')
    cfg = build_cfg(config, args.batch_size, args.iters, work_dir)
    rounds = []
    for r in range(args.rounds):
        mm, runner = run_mmengine(cfg, r)
        plain = run_plain(cfg, runner.train_dataloader.dataset, args.iters)
        rounds.append((mm, plain))
        print(f'  {config} round {r}: mmengine {mm:.0f} img/s, plain {plain:.0f} img/s, ratio {plain / mm:.3f}',
              flush=True)
    mm = statistics.median(m for m, _ in rounds)
    plain = statistics.median(p for _, p in rounds)
    ratios = [p / m for m, p in rounds]
    return dict(config=config, mmengine=mm, plain=plain, ratio=statistics.median(ratios), ratios=ratios)


def write_md(rows, args, path, load=None):
    threads = torch.get_num_threads()
    load = os.getloadavg() if load is None else load
    lines = [
        '# Training throughput: the reproduce suite\'s path against a plain PyTorch loop',
        '',
        f'Generated by `python tools/throughput.py {" ".join(args.argv)}` on {time.strftime("%Y-%m-%d")} '
        f'({"CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}, {os.cpu_count()} '
        f'cores, {threads} torch thread(s)), batch {args.batch_size}, {args.iters} iterations per measurement '
        f'(the first {WARMUP} not timed), {args.rounds} alternating rounds; medians of the images/s and of the '
        f'per-round ratios (the ratio of two runs next to each other in time is what a shared machine can measure; '
        f'load average {load[0]:.1f} on {os.cpu_count()} cores when the table was written).',
        '',
        'mmengine: `tools/train.py`\'s Runner from the config (preloaded Fashion-MNIST, batch crop + flip in '
        '`mdplug.AugmentClsDataPreprocessor`, mmpretrain\'s classifier and loss, hooks). plain: the same model, '
        'tensor and augmentation in a bare loop with `F.cross_entropy` and `torch.optim.SGD`. Bar: ≤ 1.3×.',
        '',
        '| config | mmengine / img/s | plain / img/s | plain ÷ mmengine: median (per round) |',
        '|---|---|---|---|',
    ]
    for r in rows:
        per = ', '.join(f'{x:.2f}' for x in r['ratios'])
        lines.append(f'| `{r["config"]}` | {r["mmengine"]:.0f} | {r["plain"]:.0f} | **{r["ratio"]:.2f}×** ({per}) |')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['smallnet_x1', 'mobilenet_v2_cifar_x035'])
    parser.add_argument('--kinds', nargs='+', default=['static', 'dyconv', 'dcd', 'maconv', 'mdconv'])
    parser.add_argument('--iters', type=int, default=30)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--out', default='docs/throughput.md', help='markdown table (relative to the repo)')
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.iters <= WARMUP:
        parser.error(f'--iters must be more than {WARMUP}')
    return args


def main(argv=None):
    args = parse_args(argv)
    import mdplug.mmpretrain  # noqa: F401  (registers the datasets, preprocessor, layers)

    rows = [measure(f'configs/fashion_mnist/{model}_{kind}.py', args) for model in args.models for kind in args.kinds]
    write_md(rows, args, osp.join(ROOT, args.out) if not osp.isabs(args.out) else args.out)
    for r in rows:
        print(f'{r["config"]}: mmengine {r["mmengine"]:.0f} img/s, plain {r["plain"]:.0f}, ×{r["ratio"]:.2f}')


if __name__ == '__main__':
    main()
