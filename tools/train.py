"""Train a model of a config: ``python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] ...``.

Multi-process: ``tools/dist_train.sh CONFIG GPUS``; without CUDA the processes run on CPU with gloo.
"""
import argparse
import os

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from mdplug.mmpretrain import runtime


def parse_args():
    parser = argparse.ArgumentParser(description='Train a classifier (mdplug + mmpretrain)')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/CONFIG_NAME)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CHECKPOINT, or from the latest checkpoint of the work dir if none is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (CUDA fp16 with loss scaling; bfloat16 autocast on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by total batch size / auto_scale_lr.base_batch_size')
    parser.add_argument('--data-root', help='data_root of every dataloader of the config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_cfg.max_epochs=1 train_dataloader.batch_size=8')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def merge_args(cfg, args):
    runtime.apply_common_args(cfg, args)
    if args.amp and torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    elif args.amp:  # no GPU: bfloat16 autocast on the CPU (mdplug.mmpretrain.optim)
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    runtime.fix_dataloaders(cfg)
    runtime.setup_distributed(cfg, args.launcher)
    return cfg


def main():
    args = parse_args()
    cfg = merge_args(Config.fromfile(args.config), args)
    runtime.check_data_roots(cfg)
    runtime.allow_mmengine_checkpoints()
    Runner.from_cfg(cfg).train()
    runtime.teardown_distributed()


if __name__ == '__main__':
    main()
