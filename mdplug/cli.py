"""The ``mdplug`` command: convert a model, report its cost and check that its compact form is exact.

Bad input prints one line and exits with status 2; a compact form that is not exact exits with status 1. Heavy
imports happen inside the commands.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import List, Optional

KINDS = ('mdconv', 'maconv', 'dyconv', 'dcd', 'se')
SELECTS = ('pointwise', 'spatial', 'all')

DESCRIPTION = """\
mdplug convert --model NAME   builds the model (a timm name, torchvision:NAME or an mmpretrain config path; random
                              weights unless --checkpoint), converts it, prints params and MACs of the static,
                              expanding and compact forms, and checks that the compact form computes what the
                              expanding one computes (eval mode, BN statistics calibrated on random inputs).
mdplug compact --checkpoint IN --out OUT
                              turns an expanding checkpoint into a compact one.
mdplug export --onnx OUT.onnx (--model NAME | --checkpoint CKPT)
                              writes the compact form as ONNX with a dynamic batch axis and checks it with
                              onnxruntime (needs the export extra: pip install -e ".[export]").

Exit status: 0 OK, 1 the compact form or the ONNX file is not exact (MISMATCH), 2 bad input (one line on stderr).
Run 'mdplug COMMAND --help' for the options of each command."""


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and adds "(default: X)" where an option has a default worth printing."""

    def _get_help_string(self, action):
        if action.default in (None, True, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument('--model', required=model_required,
                   help='timm name, torchvision:NAME, or an mmpretrain config path')
    p.add_argument('--kind', default=None, choices=KINDS,
                   help='the mdplug layer the selected convs become (default: mdconv)')
    p.add_argument('--select', default=None, choices=SELECTS,
                   help="which convs: 1×1 groups=1 ('pointwise'), k×k k>1 groups=1 ('spatial'), groups=1 ('all') "
                        '(default: pointwise)')
    p.add_argument('--m', type=int, default=None,
                   help="intermediate channels m of mdconv, maconv and dcd (default: the layer's, 20)")
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help="input image size (default: the model's pretrained_cfg input size, the config's "
                        'input_shape, else 3 224 224)')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mdplug', description=DESCRIPTION, formatter_class=_Help)
    sub = p.add_subparsers(dest='command', required=True)

    c = sub.add_parser('convert', help='convert a model and check its compact form', formatter_class=_Help,
                       description='Convert a model, print params and MACs of its three forms and check that the '
                                   'compact form is exact (relative max |Δ| ≤ 1e-4 in float32).')
    _common(c)
    c.add_argument('--exclude', action='append', default=[], metavar='GLOB',
                   help='leave out convs whose qualified name matches the glob (repeatable; default: none)')
    c.add_argument('--no-keep-stem', dest='keep_stem', action='store_false',
                   help='also convert the stem conv (default: the stem is kept)')
    c.add_argument('--no-keep-head', dest='keep_head', action='store_false',
                   help='also convert the head conv (default: the head is kept)')
    c.add_argument('--form', default='expanding', choices=('expanding', 'compact'), help='form written by --out')
    c.add_argument('--num-classes', type=int, default=None,
                   help="classes of the model's classifier (default: the model's own)")
    c.add_argument('--checkpoint', help='static weights (a state_dict) to load into the model before converting '
                                        '(default: random weights)')
    c.add_argument('--init', default='preserve', choices=('preserve', 'fresh'),
                   help="'preserve': the converted model computes what the static one did (fine-tuning trained "
                        "weights); 'fresh': new parameters as freshly built (training from scratch)")
    c.add_argument('--out', help='write an mdplug checkpoint of the converted model in --form (default: nothing '
                                 'written)')
    c.add_argument('--float64', action='store_true',
                   help='run the equivalence check in float64 (tells float32 rounding from a conversion error)')
    c.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    c.add_argument('-v', '--verbose', action='store_true', help='list every conv and why it was replaced or kept')

    e = sub.add_parser('export', help='export the compact form to ONNX (dynamic batch) and check it with onnxruntime',
                       formatter_class=_Help,
                       description='Export the compact form to ONNX with a dynamic batch axis and check it with '
                                   'onnxruntime. Needs the export extra: pip install -e ".[export]". With '
                                   '--checkpoint the model, kind, select and m are the checkpoint\'s.')
    _common(e, model_required=False)
    e.add_argument('--checkpoint', help='an mdplug checkpoint (expanding or compact) to export instead of a freshly '
                                        'converted --model')
    e.add_argument('--onnx', required=True, metavar='OUT.onnx', help='ONNX file to write')
    e.add_argument('--opset', type=int, default=17, help='ONNX opset version')
    e.add_argument('--check-batch', type=int, nargs='*', default=[1, 3, 16], metavar='B',
                   help='batch sizes to compare onnxruntime with PyTorch at (given with no value: skip the check)')
    e.add_argument('--json', action='store_true', help='print one JSON object instead of a line')

    k = sub.add_parser('compact', help='turn an expanding checkpoint into a compact one', formatter_class=_Help,
                       description='Turn an expanding mdplug checkpoint (mdplug convert --out) into a compact one.')
    k.add_argument('--checkpoint', required=True, help='the expanding mdplug checkpoint')
    k.add_argument('--out', required=True, help='the compact checkpoint to write')
    k.add_argument('--force', action='store_true', help='allow --out to be the --checkpoint file itself')
    k.add_argument('--json', action='store_true', help='print one JSON object instead of a line')
    return p


def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------------------------------ checking the input
def _check_out(path: str, option: str = '--out') -> None:
    """An output path that can be written: not a directory, in a directory that exists. Checked before any work."""
    if os.path.isdir(path):
        raise UsageError(f'{option} {path} is a directory; give a file path (e.g. {os.path.join(path, "model.pth")})')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f'{option} {path}: directory {os.path.dirname(path) or parent} does not exist; create it '
                         f'first')


def _check_positive(value, option: str) -> None:
    if value is not None and value <= 0:
        raise UsageError(f'{option} must be a positive integer, not {value}')


def _check_input_size(given) -> None:
    if given and any(v <= 0 for v in given):
        raise UsageError(f'--input-size C H W must be positive integers, not {" ".join(map(str, given))}')


def _first_conv(model):
    from torch import nn
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _check_runs(model, size, name: str) -> None:
    """One forward pass at ``size``; a model that cannot run on it is a usage error naming --input-size."""
    import torch
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size))
    except Exception as e:  # noqa: BLE001 - any model error means: not an input this model takes
        conv = _first_conv(model)
        takes = f'; its first conv takes {conv.in_channels} input channels' if conv is not None else ''
        raise UsageError(f'input {"×".join(map(str, size))} does not run through {name} '
                         f'({type(e).__name__}: {_one_line(e)[:160]}){takes}: give --input-size C H W of the '
                         f'images the model takes') from None


# ------------------------------------------------------------------------------------------------ the model
def _config_input_size(path: str) -> Optional[tuple]:
    """``(C, H, W)`` of an mmpretrain config: its ``mdplug.Converted`` input_shape, else its top-level
    ``input_shape`` (the dataset base configs set it), else the crop or resize scale of its test pipeline."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    for part in ('backbone', 'neck', 'head'):
        d = cfg.model.get(part) if isinstance(cfg.get('model'), dict) else None
        if isinstance(d, dict) and d.get('type') in ('mdplug.Converted', 'Converted') and d.get('input_shape'):
            return tuple(d['input_shape'])
    if cfg.get('input_shape'):
        return tuple(cfg['input_shape'])
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader') or {}
    for step in (loader.get('dataset') or {}).get('pipeline') or []:
        for key in ('crop_size', 'scale'):
            v = step.get(key) if isinstance(step, dict) else None
            if v:
                h, w = (v, v) if isinstance(v, int) else (v[1], v[0])
                return 3, int(h), int(w)
    return None


def _input_size(model, given, name: str) -> tuple:
    if given:
        return tuple(given)
    from mdplug.convert.checkpoint import _is_config_path
    if _is_config_path(name):
        size = _config_input_size(name)
        if size:
            return size
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size') if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def _build(name: str, **kwargs):
    from mdplug.convert.checkpoint import build_model
    try:
        return build_model(name, **kwargs).eval()
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    except TypeError as e:  # e.g. a keyword the model's constructor does not take
        raise UsageError(f'cannot build {name} with {kwargs}: {_one_line(e)[:200]}') from e


def _existing_layers(model) -> dict:
    """``{kind: count}`` of the mdplug layers a model already holds (a timm *_mdconv entry point, a config)."""
    from mdplug.convert._layers import kind_of, mdplug_layer_types
    ours = mdplug_layer_types()
    counts: dict = {}
    for m in model.modules():
        if ours and isinstance(m, ours):
            counts[kind_of(m)] = counts.get(kind_of(m), 0) + 1
    return counts


def _already_converted(name: str, existing: dict, a) -> str:
    """The note for a model built with mdplug layers, or a UsageError when the options ask for another kind."""
    held = ', '.join(f'{n} {k}' for k, n in existing.items())
    asked = {'--kind': a.kind, '--select': a.select, '--m': a.m}
    if a.kind is not None and set(existing) != {a.kind}:
        raise UsageError(f'{name} already holds mdplug layers ({held}); converting it again would nest layers, and '
                         f'--kind {a.kind} cannot change them: convert the plain model (without the _mdconv/... '
                         f'suffix, or the static config) with --kind {a.kind}')
    ignored = [opt for opt, v in asked.items() if v is not None and opt != '--kind']
    also = f' ({", ".join(ignored)} not applied)' if ignored else ''
    return f'{name} already holds mdplug layers ({held}): nothing to convert{also}; checked and compacted as it is'


# ----------------------------------------------------------------------------------------------- reporting
def _human(n: int, unit: float) -> str:
    return f'{n / unit:.2f}' if unit != 1e3 else f'{n / unit:.1f}'


def _unit(values) -> tuple:
    """One unit for a column: M when its largest value is ≥ 1e5, else K."""
    return (1e6, 'M') if max(values) >= 1e5 else (1e3, 'K')


def _rounding_cases() -> set:
    """Models docs/timm_coverage.md lists as float32-rounding mismatches (empty when the docs are not there)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'timm_coverage.md')
    try:
        with open(path, encoding='utf-8') as f:
            return {line.split('|')[1].strip() for line in f
                    if line.startswith('|') and '| mismatch |' in line and 'float32 rounding |' in line}
    except OSError:
        return set()


def _verdict(r: dict) -> str:
    if r['ok']:
        return 'OK'
    if r['dtype'] == 'float64':
        return 'MISMATCH in float64: a conversion error, not rounding; please report it with this command line'
    why = ('docs/timm_coverage.md lists this model as a float32-rounding case (exact in float64, its expanding '
           'model alone differs from itself in float64 by as much)' if r.get('float32_rounding_case') else
           'in float32 this may be rounding through a deep random-weight net')
    return f'MISMATCH ({why}; re-check in float64: the same command with --float64)'


def _table(r: dict, plan_text: Optional[str]) -> str:
    if r.get('already_converted'):
        head = r['already_converted']
    else:
        head = (f"{r['model']} -> {r['kind']} (select={r['select']}{', m=%d' % r['m'] if r.get('m') else ''}): "
                f"{len(r['replaced'])} convs replaced, {r['kept']} kept [{r['analysis']}]")
    lines = [head] + [f'  note: {n}' for n in r['notes']]
    if plan_text:
        lines += plan_text.splitlines()[1:]
    forms = [f for f in ('static', 'expanding', 'compact') if r['params'].get(f) is not None]
    pu, pn = _unit([r['params'][f] for f in forms])
    mu, mn = _unit([r['macs'][f] for f in forms] + [r['macs'].get('compact_per_sample_weights') or 0])
    lines += ['', f"{'form':<10} {'params (' + pn + ')':>11} {'MACs (' + mn + ')':>11}   "
                  f"(input {'x'.join(map(str, r['input_size']))})"]
    for form in forms:
        lines.append(f"{form:<10} {_human(r['params'][form], pu):>11} {_human(r['macs'][form], mu):>11}")
    if 'compact_per_sample_weights' in r['macs']:
        macs = _human(r['macs']['compact_per_sample_weights'], mu)
        lines.append(f"{'':<10} {'':>11} {macs:>11}   (compact, path='weight' everywhere: the paper's accounting; "
                     f"'auto' takes the cheaper form per layer)")
    lines += ['', f"equivalence (expanding eval vs compact, {r['dtype']}, calibrated BN statistics): max |Δ| = "
                  f"{r['max_abs_diff']:.3g} (max |y| = {r['max_abs_out']:.3g}, relative {r['rel_err']:.2g}, "
                  f"tolerance {r['tolerance']:g}) -> {_verdict(r)}"]
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


def _load_static(model, path: str, name: str) -> None:
    from mdplug.convert.checkpoint import CheckpointError, torch_load
    try:
        state = torch_load(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if isinstance(state, dict):
        for key in ('state_dict', 'model', 'model_state_dict'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise UsageError(f'{path}: holds a {type(state).__name__}, not a state_dict')
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UsageError(f'checkpoint {path} does not match {name}: {_one_line(e)[:300]}') from e
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f'checkpoint {path} does not match {name}: {len(result.missing_keys)} missing keys '
                         f'{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys '
                         f'{result.unexpected_keys[:3]}')


# ------------------------------------------------------------------------------------------------ commands
def cmd_convert(a) -> int:
    _check_positive(a.num_classes, '--num-classes')
    _check_positive(a.m, '--m')
    _check_input_size(a.input_size)
    if a.out:
        _check_out(a.out)
    import copy

    import torch

    from mdplug.convert.check import TOLERANCE, equivalence
    from mdplug.convert.checkpoint import save
    from mdplug.convert.passes import NothingToConvert, compact_with_notes, convert_with_plan
    from mdplug.profile import count_macs, count_params
    kind, select = a.kind or 'mdconv', a.select or 'pointwise'
    model_kwargs = {} if a.num_classes is None else {'num_classes': a.num_classes}
    model = _build(a.model, **model_kwargs)
    if a.checkpoint:
        _load_static(model, a.checkpoint, a.model)
    size = _input_size(model, a.input_size, a.model)
    _check_runs(model, size, a.model)
    layer_kwargs = {} if a.m is None else {'m': a.m}
    options = dict(select=select, exclude=list(a.exclude), keep_stem=a.keep_stem, keep_head=a.keep_head)
    existing = _existing_layers(model)
    if existing:
        note = _already_converted(a.model, existing, a)
        kind = next(iter(existing)) if len(existing) == 1 else '+'.join(existing)
        static = dict(params=None, macs=None)
        names, kept, analysis, notes = [], 0, 'none', []
    else:
        note = None
        static = dict(params=count_params(model), macs=count_macs(model, size))
        example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
        try:
            model, p = convert_with_plan(model, kind, example_inputs=example, init=a.init, **options,
                                         **layer_kwargs)
        except NothingToConvert as e:
            from mdplug.convert.planner import plan
            full = plan(model, kind, example_inputs=example, **options).nothing_matched(verbose=True)
            raise UsageError(f'{type(model).__name__}: {full}' if a.verbose else _one_line(e)) from e
        except ValueError as e:
            raise UsageError(_one_line(e)) from e
        names, kept, analysis, notes = p.names, len(p.skip), 'fx graph' if p.traced else 'module walk', p.notes
    expanding = dict(params=count_params(model), macs=count_macs(model, size))
    probe = copy.deepcopy(model).double() if a.float64 else model
    check = equivalence(probe, size)
    compact = check['compact'].float() if a.float64 else check['compact']
    macs_weight = _macs_per_sample_weights(compact, size)
    rel = check['max_abs_diff'] / max(check['max_abs_out'], 1e-12)
    ok = rel <= TOLERANCE
    r = dict(model=a.model, kind=kind, select=select, m=a.m, replaced=names, kept=kept, analysis=analysis,
             notes=notes + check['notes'],
             params=dict(static=static['params'], expanding=expanding['params'], compact=count_params(compact)),
             macs=dict(static=static['macs'], expanding=expanding['macs'], compact=count_macs(compact, size),
                       **({} if macs_weight is None else {'compact_per_sample_weights': macs_weight})),
             max_abs_diff=check['max_abs_diff'], max_abs_out=check['max_abs_out'], rel_err=rel, tolerance=TOLERANCE,
             ok=ok, dtype='float64' if a.float64 else 'float32', input_size=list(size),
             folded_bias=len(check['folded']), form=a.form, out=a.out)
    if note:
        r['already_converted'] = note
    if not ok and not a.float64:
        r['float32_rounding_case'] = a.model in _rounding_cases()
    if a.out:
        if a.form == 'compact':
            compact_with_notes(model)
        save(model, a.out, dict(model=a.model, model_kwargs=model_kwargs, kind=kind, form=a.form, converted=names,
                                input_size=list(size), options=dict(options, layer_kwargs=layer_kwargs)))
    if a.json:
        print(json.dumps(r))
    else:
        print(_table(r, p.table() if a.verbose and not existing else None))
    return 0 if ok else 1


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def cmd_compact(a) -> int:
    from mdplug.convert.checkpoint import CheckpointError, read, rebuild, save
    from mdplug.convert.passes import compact_with_notes
    from mdplug.profile import count_params
    _check_out(a.out)
    if _same_file(a.out, a.checkpoint) and not a.force:
        raise UsageError(f'--out {a.out} is the --checkpoint file itself: writing would replace the expanding '
                         f'(training) checkpoint by its compact form; give another --out, or add --force')
    try:
        ckpt = read(a.checkpoint)
        meta = ckpt['meta']
        if meta.get('form') != 'expanding':
            raise UsageError(f'{a.checkpoint}: already in {meta.get("form")!r} form; nothing to compact')
        model = rebuild(meta, form='expanding')
    except (CheckpointError, ValueError) as e:
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
        unit, name = _unit([before])
        print(f"{meta['model']} ({meta['kind']}): compacted, params {_human(before, unit)}{name} -> "
              f"{_human(r['params']['compact'], unit)}{name}, {len(folded)} biases folded into the following BN; "
              f"wrote {a.out}")
        for n in notes:
            print(f'  note: {n}')
    return 0


@contextlib.contextmanager
def _quiet_stderr():
    """Hold what native code writes to file descriptor 2 (the ONNX exporter prints its whole IR graph there when
    it fails); yields a callable that returns the text held."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode='w+b') as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lambda: (held.seek(0), held.read().decode(errors='replace'))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _import_error(e: BaseException) -> Optional[ImportError]:
    """The ImportError behind ``e`` (torch wraps a missing ``onnx`` in its own exception types)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ImportError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _export_meta(a) -> Optional[dict]:
    """The checkpoint's meta, checked against --model/--kind/--select/--m."""
    from mdplug.convert.checkpoint import CheckpointError, read
    try:
        meta = read(a.checkpoint)['meta']
    except CheckpointError as e:
        raise UsageError(_one_line(e)) from e
    opts = meta.get('options') or {}
    held = dict(model=meta.get('model'), kind=meta.get('kind'), select=opts.get('select'),
                m=(opts.get('layer_kwargs') or {}).get('m'))
    for opt, given in (('model', a.model), ('kind', a.kind), ('select', a.select), ('m', a.m)):
        if given is not None and given != held[opt]:
            raise UsageError(f'--{opt} {given} conflicts with --checkpoint {a.checkpoint}, which holds '
                             f'{opt} {held[opt]}: drop --{opt} (with --checkpoint they come from the checkpoint)')
    return meta


def cmd_export(a) -> int:
    _check_input_size(a.input_size)
    _check_positive(a.m, '--m')
    for b in a.check_batch:
        _check_positive(b, '--check-batch')
    if not a.model and not a.checkpoint:
        raise UsageError('give --model NAME (converted here) or --checkpoint CKPT (an mdplug checkpoint)')
    _check_out(a.onnx, '--onnx')
    try:
        import onnx  # noqa: F401
        if a.check_batch:
            import onnxruntime  # noqa: F401
        from torch.onnx._constants import ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError as e:
        raise UsageError(f'{_one_line(e)}; install the export extra: pip install -e ".[export]"') from None
    if not ONNX_MIN_OPSET <= a.opset <= ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET:
        raise UsageError(f'--opset {a.opset} is not supported by the exporter: give {ONNX_MIN_OPSET} to '
                         f'{ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET} (default 17)')
    meta = _export_meta(a) if a.checkpoint else None
    from mdplug.convert.check import TOLERANCE
    from mdplug.export import export_model
    layer_kwargs = {} if a.m is None or meta else {'m': a.m}
    name = meta['model'] if meta else a.model
    size = a.input_size or (meta or {}).get('input_size')  # None with an old checkpoint: the rebuilt model's own
    if not a.checkpoint:
        model = _build(name)
        existing = _existing_layers(model)
        if existing:
            _already_converted(name, existing, a)
        size = tuple(size) if size else _input_size(model, None, name)
        _check_runs(model, size, name)
    existed = os.path.exists(a.onnx)
    try:
        with _quiet_stderr() as held:
            r = export_model(name, (meta or {}).get('kind') or a.kind or 'mdconv', a.onnx,
                             select=None if meta else a.select, input_size=size,
                             checkpoint=a.checkpoint, check_batches=a.check_batch, opset=a.opset, **layer_kwargs)
    except Exception as e:  # noqa: BLE001 - one line for every failure; the file is not left behind
        if not existed and os.path.exists(a.onnx):
            os.remove(a.onnx)
        missing = _import_error(e)
        if missing is not None:
            raise UsageError(f'{_one_line(missing)}; install the export extra: pip install -e ".[export]"') from None
        if isinstance(e, ValueError):
            raise UsageError(_one_line(e)[:400]) from e
        raise UsageError(f'ONNX export of {name} failed at --opset {a.opset} ({type(e).__name__}: '
                         f'{_one_line(e)[:200]}); use a higher --opset (default 17)') from None
    worst = max(r['rel_err'].values(), default=0.0)
    r['ok'] = worst <= TOLERANCE
    r['tolerance'] = TOLERANCE
    if a.json:
        print(json.dumps(r))
    else:
        checks = ', '.join(f'batch {b}: {err:.2g}' for b, err in r['rel_err'].items()) or 'skipped'
        note = ''.join(f'\n  note: {n}' for n in r.get('notes', ()))
        print(f"{r['model']} ({r['kind']}, compact) -> {r['onnx']} (input batch×{'×'.join(map(str, r['input_size']))},"
              f" dynamic batch); onnxruntime vs PyTorch, relative max |Δ|: {checks} -> "
              f"{'OK' if r['ok'] else 'MISMATCH'}{note}")
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
