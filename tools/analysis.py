"""Parameters and MACs of a config's model in its expanding (training) and compact (deployed) forms.

``python tools/analysis.py CONFIG [--shape H W]``. MACs are counted by mmengine's jit-based analyzer on one image of
the config's ``input_shape`` (a multiply-add counts once).
"""
import argparse
import copy

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.config import Config, DictAction

from mdplug.convert import compact
from mdplug.mmpretrain import runtime


def parse_args():
    parser = argparse.ArgumentParser(description='Params and MACs of the expanding and compact forms')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), help='input size (default: config)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return parser.parse_args()


def complexity(model, inputs):
    """``(params, MACs)`` of ``model`` on ``inputs``."""
    params = sum(p.numel() for p in model.parameters())
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return params, analyzer.total()


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    channels, height, width = runtime.input_shape(cfg)
    if args.shape:
        height, width = args.shape
    inputs = torch.randn(1, channels, height, width)

    expanding = runtime.build_model(cfg).eval()
    compact_model = compact(copy.deepcopy(expanding), inplace=True).eval()
    rows = [('expanding', *complexity(expanding, inputs)), ('compact', *complexity(compact_model, inputs))]
    print(f'{args.config}  input {channels}x{height}x{width}')
    print(f'{"form":<10} {"params":>14} {"MACs":>16}')
    for form, params, macs in rows:
        print(f'{form:<10} {params:>14,} {macs:>16,}  ({params / 1e6:.3f} M params, {macs / 1e6:.1f} M MACs)')


if __name__ == '__main__':
    main()
