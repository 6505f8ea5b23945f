"""Re-parameterise a trained model into its compact form: ``python tools/deploy.py CONFIG CHECKPOINT OUT``.

- MAConv (every mdplug layer folds into a plain conv): OUT is a checkpoint of the *static* config's model
  (``mdplug.Converted`` unwrapped), which loads strictly into it; evaluate it with the static config.
- Dynamic kinds (MDConv, DYConv, DCD, SE): OUT holds the compact model; evaluate it with
  ``tools/test.py CONFIG OUT --deployed``.

The compact model's logits are checked against the expanding model's on a random batch before OUT is written.
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
    return parser.parse_args()


def main():
    args = parse_args()
    logger = MMLogger.get_instance('mdplug_deploy', log_level='INFO')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    expanding, deployed, static = runtime.deploy(cfg, args.config, args.checkpoint)
    compact = static if static is not None else deployed

    inputs = torch.randn(4, *runtime.input_shape(cfg))
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
