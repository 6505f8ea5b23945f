"""Parameters and MACs of a config's model in its expanding (training) and compact (deployed) forms.

``python tools/analysis.py CONFIG [--shape H W]``. Counted by :mod:`mdplug.profile` on one image of the config's
``input_shape``: parameters (BN statistics excluded) and multiply-accumulates of what actually runs, the compact
dynamic layers' weight generation and attention included (the paper's "FLOPs").
"""
import argparse
import copy

from mmengine.config import Config, DictAction

from mdplug.mmpretrain import compact_classifier, runtime
from mdplug.profile import count_macs, count_params


def parse_args():
    parser = argparse.ArgumentParser(description='Params and MACs of the expanding and compact forms')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), help='input size (default: config)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    channels, height, width = runtime.input_shape(cfg)
    if args.shape:
        height, width = args.shape
    shape = (channels, height, width)

    expanding = runtime.build_model(cfg).eval()
    compact = compact_classifier(copy.deepcopy(expanding)).eval()
    print(f'{args.config}  input {channels}x{height}x{width}')
    print(f'{"form":<10} {"params":>14} {"MACs":>16}')
    for form, model in (('expanding', expanding), ('compact', compact)):
        params, macs = count_params(model), count_macs(model, shape)
        print(f'{form:<10} {params:>14,} {macs:>16,}  ({params / 1e6:.2f} M params, {macs / 1e6:.0f} M MACs)')


if __name__ == '__main__':
    main()
