"""The ``mdplug`` command: convert a model, report its cost and check that its compact form is exact.

``mdplug convert --model NAME`` builds the model (a timm name, ``torchvision:NAME`` or an mmpretrain config
path; random weights), converts it, prints params and MACs of the static, expanding and compact forms and the
largest |Δ| between the expanding model (eval mode, BN statistics calibrated on random inputs) and its compact
form.
``mdplug compact --checkpoint IN --out OUT`` turns an expanding checkpoint into a compact one.
``mdplug export --model NAME --kind K --onnx OUT.onnx`` writes the compact form as ONNX with a dynamic batch axis
and checks it with onnxruntime at batch 1, 3 and 16.
Bad input prints one line and exits with status 2. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

KINDS = ('mdconv', 'maconv', 'dyconv', 'dcd', 'se')


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mdplug', description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)

    c = sub.add_parser('convert', help='convert a model and check its compact form')
    c.add_argument('--model', required=True, help='timm name, torchvision:NAME, or an mmpretrain config path')
    c.add_argument('--kind', default='mdconv', choices=KINDS)
    c.add_argument('--select', default='pointwise', choices=('pointwise', 'spatial', 'all'))
    c.add_argument('--exclude', action='append', default=[], metavar='GLOB',
                   help='leave out convs whose qualified name matches (repeatable)')
    c.add_argument('--no-keep-stem', dest='keep_stem', action='store_false', help='also convert the stem conv')
    c.add_argument('--no-keep-head', dest='keep_head', action='store_false', help='also convert the head conv')
    c.add_argument('--form', default='expanding', choices=('expanding', 'compact'), help='form written by --out')
    c.add_argument('--m', type=int, default=None, help='intermediate channels m (mdconv, maconv, dcd)')
    c.add_argument('--num-classes', type=int, default=None)
    c.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    c.add_argument('--checkpoint', help='static weights to load into the model before converting')
    c.add_argument('--init', default='preserve', choices=('preserve', 'fresh'),
                   help="'preserve': the converted model computes what the static one did (fine-tuning trained "
                        "weights); 'fresh': new parameters as freshly built (training from scratch)")
    c.add_argument('--out', help='write a checkpoint of the converted model (see --form)')
    c.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    c.add_argument('-v', '--verbose', action='store_true', help='list every conv and why it was replaced or kept')

    e = sub.add_parser('export', help='export the compact form to ONNX (dynamic batch) and check it with onnxruntime')
    e.add_argument('--model', required=True, help='timm name, torchvision:NAME, or an mmpretrain config path')
    e.add_argument('--kind', default='mdconv', choices=KINDS)
    e.add_argument('--onnx', required=True, metavar='OUT.onnx', help='ONNX file to write')
    e.add_argument('--select', default='pointwise', choices=('pointwise', 'spatial', 'all'))
    e.add_argument('--m', type=int, default=None, help='intermediate channels m (mdconv, maconv, dcd)')
    e.add_argument('--checkpoint', help='an mdplug checkpoint (expanding or compact) to export instead')
    e.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    e.add_argument('--opset', type=int, default=17)
    e.add_argument('--check-batch', type=int, nargs='*', default=[1, 3, 16], metavar='B',
                   help='batch sizes to compare onnxruntime with PyTorch at (none: skip the check)')
    e.add_argument('--json', action='store_true')

    k = sub.add_parser('compact', help='turn an expanding checkpoint into a compact one')
    k.add_argument('--checkpoint', required=True)
    k.add_argument('--out', required=True)
    k.add_argument('--json', action='store_true')
    return p


def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


def _input_size(model, given) -> tuple:
    if given:
        return tuple(given)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size') if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def _state_dict_of(obj) -> dict:
    if isinstance(obj, dict):
        for key in ('state_dict', 'model', 'model_state_dict'):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def _load_static(model, path: str, name: str) -> None:
    import os

    import torch
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    try:
        state = _state_dict_of(torch.load(path, map_location='cpu', weights_only=True))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f'{path}: not a readable torch checkpoint ({_one_line(e)})') from e
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UsageError(f'checkpoint {path} does not match {name}: {_one_line(e)[:300]}') from e
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f'checkpoint {path} does not match {name}: {len(result.missing_keys)} missing keys '
                         f'{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys '
                         f'{result.unexpected_keys[:3]}')


def _human(n: int) -> str:
    return f'{n / 1e6:.2f}M' if n >= 1e5 else f'{n / 1e3:.1f}K'


def _table(r: dict, plan_text: Optional[str]) -> str:
    lines = [f"{r['model']} -> {r['kind']} (select={r['select']}{', m=%d' % r['m'] if r.get('m') else ''}): "
             f"{len(r['replaced'])} convs replaced, {r['kept']} kept [{r['analysis']}]"]
    lines += [f'  note: {n}' for n in r['notes']]
    if plan_text:
        lines += plan_text.splitlines()[1:]
    lines += ['', f"{'form':<10} {'params':>9} {'MACs':>9}   (input {'x'.join(map(str, r['input_size']))})"]
    for form in ('static', 'expanding', 'compact'):
        lines.append(f"{form:<10} {_human(r['params'][form]):>9} {_human(r['macs'][form]):>9}")
    if 'compact_per_sample_weights' in r['macs']:
        macs = _human(r['macs']['compact_per_sample_weights'])
        lines.append(f"{'':<10} {'':>9} {macs:>9}   (compact, path='weight' everywhere: the paper's accounting; "
                     f"'auto' takes the cheaper form per layer)")
    rel = r['max_abs_diff'] / max(r['max_abs_out'], 1e-12)
    lines += ['', f"equivalence (expanding eval vs compact, calibrated BN statistics): max |Δ| = {r['max_abs_diff']:.3g} "
                  f"(max |y| = {r['max_abs_out']:.3g}, relative {rel:.2g}) -> {'OK' if rel <= 1e-4 else 'MISMATCH'}"]
    if r.get('out'):
        lines.append(f"wrote {r['form']} checkpoint {r['out']}")
    return '\n'.join(lines)


def _macs_per_sample_weights(compact_model, size) -> Optional[int]:
    """MACs of the compact model when every dynamic layer generates its per-sample kernel (``path='weight'``),
    as the paper counts them; None when the model has no layer with a ``path`` choice."""
    from mdplug.profile import count_macs
    layers = [m for m in compact_model.modules() if isinstance(getattr(m, 'path', None), str)
              and hasattr(m, 'choose_path')]
    if not layers:
        return None
    saved = [m.path for m in layers]
    try:
        for m in layers:
            m.path = 'weight'
        return count_macs(compact_model, size)
    finally:
        for m, path in zip(layers, saved):
            m.path = path


def cmd_convert(a) -> int:
    import torch

    from mdplug.convert.checkpoint import build_model, save
    from mdplug.convert.passes import compact_with_notes, convert_with_plan
    from mdplug.profile import count_macs, count_params
    model_kwargs = {} if a.num_classes is None else {'num_classes': a.num_classes}
    try:
        model = build_model(a.model, **model_kwargs)
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    model.eval()
    if a.checkpoint:
        _load_static(model, a.checkpoint, a.model)
    size = _input_size(model, a.input_size)
    static = dict(params=count_params(model), macs=count_macs(model, size))
    layer_kwargs = {} if a.m is None else {'m': a.m}
    options = dict(select=a.select, exclude=list(a.exclude), keep_stem=a.keep_stem, keep_head=a.keep_head)
    example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    try:
        model, p = convert_with_plan(model, a.kind, example_inputs=example, init=a.init, **options, **layer_kwargs)
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    expanding = dict(params=count_params(model), macs=count_macs(model, size))
    from mdplug.convert.check import equivalence
    check = equivalence(model, size)
    check.update(params=count_params(check['compact']), macs=count_macs(check['compact'], size))
    macs_weight = _macs_per_sample_weights(check['compact'], size)
    r = dict(model=a.model, kind=a.kind, select=a.select, m=a.m, replaced=p.names, kept=len(p.skip),
             analysis='fx graph' if p.traced else 'module walk', notes=p.notes + check['notes'],
             params=dict(static=static['params'], expanding=expanding['params'], compact=check['params']),
             macs=dict(static=static['macs'], expanding=expanding['macs'], compact=check['macs'],
                       **({} if macs_weight is None else {'compact_per_sample_weights': macs_weight})),
             max_abs_diff=check['max_abs_diff'], max_abs_out=check['max_abs_out'], input_size=list(size),
             folded_bias=len(check['folded']), form=a.form, out=a.out)
    if a.out:
        if a.form == 'compact':
            compact_with_notes(model)
        save(model, a.out, dict(model=a.model, model_kwargs=model_kwargs, kind=a.kind, form=a.form,
                                options=dict(options, layer_kwargs=layer_kwargs)))
    if a.json:
        print(json.dumps(r))
    else:
        print(_table(r, p.table() if a.verbose else None))
    return 0


def cmd_compact(a) -> int:
    from mdplug.convert.checkpoint import read, rebuild, save
    from mdplug.convert.passes import compact_with_notes
    from mdplug.profile import count_params
    try:
        ckpt = read(a.checkpoint)
        meta = ckpt['meta']
        if meta.get('form') != 'expanding':
            raise UsageError(f'{a.checkpoint}: already in {meta.get("form")!r} form; nothing to compact')
        model = rebuild(meta, form='expanding')
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    try:
        result = model.load_state_dict(ckpt['state_dict'], strict=False)
    except RuntimeError as e:
        raise UsageError(f'{a.checkpoint} does not match {meta["model"]} ({meta["kind"]}): {_one_line(e)[:300]}') from e
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f'{a.checkpoint} does not match {meta["model"]} ({meta["kind"]}): missing keys '
                         f'{result.missing_keys[:3]}, unexpected keys {result.unexpected_keys[:3]}')
    before = count_params(model)
    model, folded, notes = compact_with_notes(model)
    save(model, a.out, dict(meta, form='compact'))
    r = dict(model=meta['model'], kind=meta['kind'], params=dict(expanding=before, compact=count_params(model)),
             folded_bias=len(folded), notes=notes, out=a.out)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{meta['model']} ({meta['kind']}): compacted, params {_human(before)} -> "
              f"{_human(r['params']['compact'])}, {len(folded)} biases folded into the following BN; wrote {a.out}")
        for n in notes:
            print(f'  note: {n}')
    return 0


def cmd_export(a) -> int:
    from mdplug.export import export_model
    layer_kwargs = {} if a.m is None else {'m': a.m}
    try:
        r = export_model(a.model, a.kind, a.onnx, select=a.select, input_size=a.input_size, checkpoint=a.checkpoint,
                         check_batches=a.check_batch, opset=a.opset, **layer_kwargs)
    except ImportError as e:
        raise UsageError(f'{_one_line(e)}; install the export extra: pip install -e ".[export]"') from e
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    worst = max(r['rel_err'].values(), default=0.0)
    r['ok'] = worst <= 1e-4
    if a.json:
        print(json.dumps(r))
    else:
        checks = ', '.join(f'batch {b}: {err:.2g}' for b, err in r['rel_err'].items()) or 'skipped'
        print(f"{r['model']} ({r['kind']}, compact) -> {r['onnx']} (input batch×{'×'.join(map(str, r['input_size']))},"
              f" dynamic batch); onnxruntime vs PyTorch, relative max |Δ|: {checks} -> "
              f"{'OK' if r['ok'] else 'MISMATCH'}")
    return 0 if r['ok'] else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {'convert': cmd_convert, 'compact': cmd_compact, 'export': cmd_export}[args.command](args)
    except UsageError as e:
        print(f'mdplug {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
