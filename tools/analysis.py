"""Parameters and MACs of a config's model in its expanding (training) and compact (deployed) forms.

``python tools/analysis.py CONFIG [--shape [C] H W]``. Counted by :mod:`mdplug.profile` on one image of the
config's input shape (``input_shape`` of its ``mdplug.Converted`` backbone or of the config, else the test
pipeline's crop; :func:`mdplug.mmpretrain.runtime.input_shape_and_source`): parameters (BN statistics excluded)
and multiply-accumulates of what actually runs, the compact dynamic layers' weight generation and attention
included (the paper's "FLOPs"). A model with no compact form (MAConv ``act='relu'``, Table 8's "ReLU" rows) is
reported in its training form, with the reason.
"""
import argparse
import copy

from mmengine.config import Config, DictAction

from mdplug.mmpretrain import compact_classifier, runtime
from mdplug.profile import count_macs, count_params


def parse_args():
    parser = argparse.ArgumentParser(description='Params and MACs of the expanding and compact forms')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', metavar='N',
                        help='input size H W (channels from the config) or C H W (default: from the config)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return parser.parse_args()


def shape_of(cfg, shape_arg):
    """``((C, H, W), where)`` from ``--shape`` (2 or 3 numbers) and the config."""
    if shape_arg and len(shape_arg) not in (2, 3):
        raise SystemExit(f'--shape takes H W or C H W, got {len(shape_arg)} numbers')
    if shape_arg and len(shape_arg) == 3:
        return tuple(shape_arg), '--shape'
    try:
        shape, where = runtime.input_shape_and_source(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if shape_arg:
        return (shape[0], *shape_arg), f'--shape (channels from {where})'
    return shape, where


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    shape, where = shape_of(cfg, args.shape)

    expanding = runtime.build_model(cfg).eval()
    try:
        runtime.check_input_shape(expanding, shape, where, args.config)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    forms = [('expanding', expanding)]
    try:
        forms.append(('compact', compact_classifier(copy.deepcopy(expanding)).eval()))
        why_not = None
    except ValueError as e:  # a layer without a compact form (MAConv act='relu')
        why_not = str(e)
    print(f'{args.config}  input {"x".join(map(str, shape))} (from {where})')
    print(f'{"form":<10} {"params":>14} {"MACs":>16}')
    for form, model in forms:
        params, macs = count_params(model), count_macs(model, shape)
        print(f'{form:<10} {params:>14,} {macs:>16,}  ({params / 1e6:.2f} M params, {macs / 1e6:.0f} M MACs)')
    if why_not:
        print(f'compact    none: {why_not}')


if __name__ == '__main__':
    main()
