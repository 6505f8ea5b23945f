"""Convert every timm architecture under a size limit, compact it, check compact vs expanding; write a report.

    python tools/timm_sweep.py [--max-params 30e6] [--kind mdconv] [--limit N] [--budget SECONDS]
                               [--input-size 3 64 64] [--filter GLOB] [--out docs/timm_coverage.md]

For each model (random weights, nothing downloaded): build it, skip it if it has no ``nn.Conv2d`` or more
parameters than ``--max-params``, ``mdplug.convert`` it (select='pointwise'), then compare the expanding model
(eval, BN statistics calibrated on the input, ``mdplug.convert.check.calibrate_bn``) with its compact form on a
random input, as ``mdplug convert`` does. A model passes when the relative max |Δ| (max |Δ| / max |y|) is
≤ 1e-4; a mismatch is re-checked in float64, and the float32 noise of the expanding model itself (float32 vs
float64, no conversion involved) is measured, so rounding is told apart from a conversion error. A model the pass
refuses (nothing matched, a layer refused) is listed with the reason. The report is rewritten after every model,
so a run stopped by ``--budget`` or ``--limit`` leaves partial results.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import sys
import time
import traceback
import warnings

import torch
from torch import nn

TOLERANCE = 1e-4
#: a mismatch is float32 rounding when float64 agrees to this and the float32 difference is within
#: ROUNDING_FACTOR × the expanding model's own float32-vs-float64 difference
FLOAT64_EXACT = 1e-6
ROUNDING_FACTOR = 3.0


def _family(name: str) -> str:
    import timm.models._registry as reg
    return reg._model_to_module.get(name, '?')


def _one_line(e: BaseException) -> str:
    return ' '.join(f'{type(e).__name__}: {e}'.split())[:240]


def _out_of_scope(model: nn.Module, max_params: float) -> str:
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        return f'{params / 1e6:.1f}M params > limit'
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return 'no nn.Conv2d'
    return ''


def sweep_one(name: str, kind: str, size, max_params: float) -> dict:
    """One model's row: status is pass | mismatch | refused | skipped | error."""
    import timm

    from mdplug.convert.check import equivalence
    from mdplug.convert.passes import NothingToConvert, convert_with_plan
    row = dict(model=name, family=_family(name), status='', replaced=0, max_abs_diff=None, rel=None, reason='')
    t = time.perf_counter()
    try:  # size the model on the meta device first: no memory, no init time
        with torch.device('meta'):
            shell = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - some models need real tensors to build
        shell = None
    if shell is not None:
        verdict = _out_of_scope(shell, max_params)
        if verdict:
            return dict(row, status='skipped', reason=verdict)
    torch.manual_seed(0)  # reproducible random weights (the model's and the new layers')
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as e:  # noqa: BLE001
        return dict(row, status='skipped', reason=f'does not build: {_one_line(e)}')
    verdict = _out_of_scope(model, max_params)
    if verdict:
        return dict(row, status='skipped', reason=verdict)
    row['params'] = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    fixed = cfg.get('fixed_input_size', False)
    input_size = tuple(cfg.get('input_size', (3, 224, 224))) if fixed else tuple(size)
    model.eval()
    sizes = [input_size] + ([tuple(cfg['input_size'])] if 'input_size' in cfg and
                            tuple(cfg['input_size']) != input_size else [])
    # some models only run at their own input size (halo attention blocks): convert with an example input that
    # runs, so the pass sees the conv input shapes (globally pooled 1×1 maps)
    if len(sizes) > 1 and not _runs(model, sizes[0]):
        sizes.reverse()
    x = torch.randn(1, *sizes[0])
    p, refusal = None, ''
    # the paper's rule first; a model without pointwise convs (a ViT's patch embedding) tries the wider rules
    for select, keep in (('pointwise', True), ('all', True), ('all', False)):
        try:
            # (random weights: init='fresh' keeps every branch live for the check)
            model, p = convert_with_plan(model, kind, select=select, keep_stem=keep, keep_head=keep, example_inputs=x,
                                         init='fresh')
            break
        except NothingToConvert as e:
            refusal = refusal or ' '.join(str(e).split())[:300]
        except ValueError as e:
            return dict(row, status='refused', reason=' '.join(str(e).split())[:300])
        except Exception as e:  # noqa: BLE001
            return dict(row, status='error', reason=f'convert: {_one_line(e)}')
    if p is None:
        return dict(row, status='refused', reason=refusal)
    row['replaced'] = len(p.replace)
    row['select'] = select if keep else f'{select}, stem+head'
    row['analysis'] = 'fx' if p.traced else 'walk'
    r = None
    for size in sizes:
        try:
            r = equivalence(model, size)
            break
        except Exception as e:  # noqa: BLE001
            err = e
    if r is None:
        return dict(row, status='error', reason=f'check: {_one_line(err)}')
    rel = r['max_abs_diff'] / max(r['max_abs_out'], 1e-12)
    row.update(max_abs_diff=r['max_abs_diff'], rel=rel)
    ok = rel <= TOLERANCE and r['max_abs_out'] == r['max_abs_out']
    row['status'] = 'pass' if ok else 'mismatch'
    notes = []
    if not ok:  # float32 rounding through a deep random-weight net, or a real error? float64 tells them apart
        notes.append(_recheck(model, size, rel, row))
    if not p.traced:
        notes.append('fx trace failed; module walk')
    if r['notes']:
        notes.append(f'{len(r["notes"])} biases kept')
    row['reason'] = '; '.join(notes)
    row['seconds'] = round(time.perf_counter() - t, 1)
    return row


def _runs(model: nn.Module, size) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, *size))
        return True
    except Exception:  # noqa: BLE001
        return False


def _recheck(model: nn.Module, size, rel: float, row: dict) -> str:
    """The float64 re-check of a float32 mismatch, and the model's own float32 noise; fills row['rel64'],
    row['noise32'] and row['rounding'] (True: exact in float64 and within the model's float32 noise)."""
    from mdplug.convert.check import equivalence, float32_noise
    try:
        noise = float32_noise(model, size)
        r64 = equivalence(copy.deepcopy(model).double(), size)
    except Exception as e:  # noqa: BLE001
        return f'float64 re-check failed: {_one_line(e)}'
    rel64 = r64['max_abs_diff'] / max(r64['max_abs_out'], 1e-300)
    row.update(rel64=rel64, noise32=noise,
               rounding=bool(rel64 <= FLOAT64_EXACT and rel <= ROUNDING_FACTOR * noise))
    verdict = ' → float32 rounding' if row['rounding'] else ''
    return (f'float64: relative {rel64:.1e}; the expanding model alone, float32 vs float64: {noise:.1e}'
            f'{verdict}')


def write_report(rows, path: str, args, elapsed: float, total: int) -> None:
    counted = [r for r in rows if r['status'] in ('pass', 'mismatch', 'refused', 'error')]
    passed = [r for r in counted if r['status'] == 'pass']
    lines = [
        '# timm coverage of the mdplug conversion pass',
        '',
        'Select: the paper\'s `pointwise` rule; a model with no pointwise `nn.Conv2d` is retried with `all` '
        '(groups=1 convs of any size), then with `all` including its stem and head convs.',
        '',
        f'Generated by `python tools/timm_sweep.py {" ".join(sys.argv[1:])}` (timm {_timm_version()}, '
        f'torch {torch.__version__}, CPU). Kind `{args.kind}`, select `pointwise`, random weights, input '
        f'{"×".join(map(str, args.input_size))} (models with a fixed input size use their own), tolerance: '
        f'relative max |Δ| (max |Δ| / max |y|) ≤ {TOLERANCE:g} between the expanding model and its compact form, '
        'in eval mode on 2 random images, after giving every BN random affine parameters (weight ~ U(0.8, 1.2), '
        'bias ~ N(0, 0.1)) and running statistics calibrated on those images plus random ones '
        '(`mdplug.convert.check.calibrate_bn`, the check `mdplug convert` runs). A mismatch is re-checked in '
        'float64; its note also gives the expanding model\'s own float32-vs-float64 difference (no conversion '
        f'involved). "float32 rounding": float64 relative ≤ {FLOAT64_EXACT:g} and the float32 difference within '
        f'{ROUNDING_FACTOR:g}× that noise.',
        '',
        f'Models examined: {len(rows)} of {total} timm architectures ({elapsed / 60:.1f} min'
        f'{", stopped by the time budget / limit: partial" if len(rows) < total else ""}).',
        f'In scope (≤ {args.max_params / 1e6:g}M params, containing an nn.Conv2d): {len(counted)}; '
        f'**convert and stay exact: {len(passed)}** '
        f'({100 * len(passed) / max(len(counted), 1):.1f} %); refused with a reason: '
        f'{sum(r["status"] == "refused" for r in counted)}; mismatch: {sum(r["status"] == "mismatch" for r in counted)} '
        f'(float32 rounding: {sum(bool(r.get("rounding")) for r in counted if r["status"] == "mismatch")}); '
        f'error: {sum(r["status"] == "error" for r in counted)}; skipped (out of scope): '
        f'{sum(r["status"] == "skipped" for r in rows)}.',
        '',
        '| model | family | status | select | convs replaced | max abs diff | relative | note |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if r['status'] == 'skipped':
            continue
        diff = f'{r["max_abs_diff"]:.2e}' if r['max_abs_diff'] is not None else ''
        rel = f'{r["rel"]:.1e}' if r['rel'] is not None else ''
        note = r['reason'].replace('|', '\\|')
        lines.append(f'| {r["model"]} | {r["family"]} | {r["status"]} | {r.get("select", "")} | {r["replaced"]} | {diff} | {rel} | {note} |')
    skipped = [r for r in rows if r['status'] == 'skipped']
    if skipped:
        lines += ['', f'Out of scope ({len(skipped)}): ' + ', '.join(
            f'{r["model"]} ({r["reason"]})' for r in skipped)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def _timm_version() -> str:
    import timm
    return timm.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--kind', default='mdconv')
    ap.add_argument('--max-params', type=float, default=30e6)
    ap.add_argument('--input-size', type=int, nargs=3, default=(3, 64, 64))
    ap.add_argument('--limit', type=int, default=None, help='examine at most N models')
    ap.add_argument('--budget', type=float, default=None, help='stop after this many seconds (partial report)')
    ap.add_argument('--filter', default='*', help='glob on model names')
    ap.add_argument('--out', default='docs/timm_coverage.md')
    ap.add_argument('--jsonl', default=None, help='also append one JSON line per model to this file')
    ap.add_argument('--resume', action='store_true', help='skip the models already in --jsonl')
    args = ap.parse_args(argv)

    import timm
    import mdplug.timm  # noqa: F401
    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.filter)
             and not n.endswith(tuple(f'_{k}' for k in ('mdconv', 'maconv', 'dyconv', 'dcd', 'se')))]
    rows = []
    if args.resume and args.jsonl and os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {r['model'] for r in rows}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    for name in names:
        if name in done:
            continue
        if args.limit is not None and len(rows) >= args.limit:
            break
        if args.budget is not None and time.perf_counter() - start > args.budget:
            break
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            try:
                row = sweep_one(name, args.kind, args.input_size, args.max_params)
            except Exception as e:  # noqa: BLE001 - the sweep must go on
                row = dict(model=name, family=_family(name), status='error', replaced=0, max_abs_diff=None,
                           rel=None, reason=_one_line(e))
                traceback.print_exc()
        rows.append(row)
        print(f'{row["status"]:8s} {name} {row["replaced"]} {row.get("rel")} {row["reason"][:100]}', flush=True)
        if args.jsonl:
            with open(args.jsonl, 'a') as f:
                f.write(json.dumps(row) + '\n')
        write_report(rows, args.out, args, time.perf_counter() - start, len(names))
    write_report(rows, args.out, args, time.perf_counter() - start, len(names))
    return 0


if __name__ == '__main__':
    sys.exit(main())
