"""Re-parameterise a trained model into its compact form: ``python tools/deploy.py CONFIG CHECKPOINT OUT``.

- MAConv (every mdplug layer folds into a plain conv): OUT is a checkpoint of the *static* config's model
  (``mdplug.Converted`` unwrapped), which loads strictly into it; evaluate it with the static config.
- Dynamic kinds (MDConv, DYConv, DCD, SE): OUT holds the compact model; evaluate it with
  ``tools/test.py CONFIG OUT --deployed``.

The compact model's logits are checked against the expanding model's on a random batch of the config's input
shape (:func:`mdplug.mmpretrain.runtime.input_shape_and_source`, or ``--shape C H W``) before OUT is written.
"""
import argparse
import os.path as osp
import time

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import MMLogger

from mdplug.mmpretrain import runtime


def parse_args():
    parser = argparse.ArgumentParser(description='Compact (re-parameterise) a trained mdplug model')
    parser.add_argument('config', help='config file the checkpoint was trained with')
    parser.add_argument('checkpoint', help='checkpoint of the expanding model')
    parser.add_argument('out', help='where to write the compact checkpoint')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    parser.add_argument('--atol', type=float, default=1e-3, help='tolerated logit difference (default 1e-3)')
    parser.add_argument('--shape', type=int, nargs=3, metavar=('C', 'H', 'W'),
                        help='input shape of the check batch (default: from the config)')
    return parser.parse_args()


def main():
    args = parse_args()
    logger = MMLogger.get_instance('mdplug_deploy', log_level='INFO')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        shape, where = (tuple(args.shape), '--shape') if args.shape else runtime.input_shape_and_source(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    form = runtime.checkpoint_form(*runtime.read_checkpoint(args.checkpoint))
    if form in ('compact', 'static'):
        raise SystemExit(f'{args.checkpoint} is already a {form} checkpoint (tools/deploy.py output); deploy the '
                         f'training checkpoint it came from, or evaluate this one with tools/test.py')
    try:
        expanding, deployed, static = runtime.deploy(cfg, args.config, args.checkpoint)
    except ValueError as e:  # another model's checkpoint; a layer without a compact form (MAConv act='relu')
        raise SystemExit(f'tools/deploy.py {args.config}: {e}') from e
    compact = static if static is not None else deployed

    try:
        runtime.check_input_shape(expanding, shape, where, args.config)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    inputs = torch.randn(4, *shape)
    diff = runtime.max_output_difference(expanding, compact, inputs)
    logger.info(f'max |logits(expanding) - logits(compact)| = {diff:.3g} on a random batch')
    if diff > args.atol:
        raise RuntimeError(f'the compact model differs from the expanding one by {diff:.3g} > --atol {args.atol}')

    params = [sum(p.numel() for p in m.parameters()) for m in (expanding, compact)]
    meta = dict(config=osp.abspath(args.config), source=osp.abspath(args.checkpoint),
                time=time.strftime('%Y%m%d_%H%M%S'), mdplug_form='static' if static is not None else 'compact')
    torch.save(dict(meta=meta, state_dict=compact.state_dict()), args.out)
    if static is not None:
        how = 'a checkpoint of the static model (mdplug.Converted unwrapped); evaluate it with the static config'
    else:
        how = f'a compact checkpoint; evaluate it with tools/test.py {args.config} {args.out} --deployed'
    logger.info(f'params {params[0]:,} (expanding) -> {params[1]:,} (compact); wrote {args.out}: {how}')


if __name__ == '__main__':
    main()
