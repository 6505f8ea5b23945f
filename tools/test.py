"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--deployed] [--data-root DIR] ...``.

CHECKPOINT may hold either form of CONFIG's model: a training (expanding) checkpoint, or a compact one of
``tools/deploy.py`` / mmpretrain's ``reparameterize_model.py``. A compact checkpoint (``meta['mdplug_form']`` or
its keys) is loaded into the compact model (``mdplug.Compacted``), as ``--deployed`` asks; ``--deployed`` builds the
compact model whatever the checkpoint says (a MAConv output of ``reparameterize_model.py`` has the keys of a static
model and the training checkpoint's meta) and refuses a training checkpoint.
"""
import argparse
import os

from mmengine.config import Config, DictAction
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from mdplug.mmpretrain import runtime


def parse_args():
    parser = argparse.ArgumentParser(description='Evaluate a classifier (mdplug + mmpretrain)')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--deployed', action='store_true',
                        help='build the compact model before loading (CHECKPOINT from tools/deploy.py); without it '
                             'the form is read from CHECKPOINT')
    parser.add_argument('--work-dir', help='where the evaluation log goes')
    parser.add_argument('--out', help='dump the metrics to this json file')
    parser.add_argument('--data-root', help='data_root of every dataloader of the config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    runtime.apply_common_args(cfg, args)
    state, meta = runtime.read_checkpoint(args.checkpoint)
    form = runtime.checkpoint_form(state, meta)
    if args.deployed and form == 'expanding':
        raise SystemExit(f'{args.checkpoint} holds the training (expanding) form of the model, not a compact one: '
                         f'drop --deployed (or compact it first: tools/deploy.py {args.config} {args.checkpoint} OUT)')
    deployed = args.deployed or form in ('compact', 'static')  # the form the checkpoint's meta or keys say
    if deployed:
        cfg.model = dict(type='mdplug.Compacted', model=cfg.model)
        hint = ('drop --deployed if CHECKPOINT is a training checkpoint' if args.deployed else
                f'CHECKPOINT says it holds the {form} form, but it does not fit the compact model of the config')
    else:
        hint = 'if CHECKPOINT is compact (tools/deploy.py, reparameterize_model.py), use --deployed'

    cfg.load_from, cfg.resume = None, False  # loaded strictly below, not by the Runner
    runtime.fix_dataloaders(cfg)
    runtime.setup_distributed(cfg, args.launcher)
    runtime.check_data_roots(cfg, keys=('test_dataloader', ))
    runtime.allow_mmengine_checkpoints()
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    # the softmax temperature is a buffer of the layers, saved with the weights; a checkpoint written before it was
    # lacks it and is evaluated at the end of the config's annealing (TemperatureAnnealHook's ``end``)
    absent = {k: v for k, v in model.state_dict().items() if k.endswith('attention.temperature') and k not in state}
    runtime.load_strictly(model, {**state, **absent}, args.checkpoint, args.config, hint)
    if deployed and not args.deployed:
        runner.logger.info(f'{args.checkpoint} holds the {form} form: evaluated as the compact model')
    if absent:
        runtime.set_trained_temperature(model, cfg)
    metrics = runner.test()
    if args.out and runner.rank == 0:
        import json
        with open(args.out, 'w') as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)
    runtime.teardown_distributed()


if __name__ == '__main__':
    main()
