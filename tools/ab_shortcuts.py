"""A/B of the eager shortcuts in mdplug/nn against removing each (issue 17, item 4), in one process.

Each shortcut is switched off by patching the code it replaces back in (the plain Python it shortcuts), on the
whole converted model; every round times the model with the shortcut and without it back to back, in alternating
order, and the report gives the median of the per-round ratios (without / with: above 1, the shortcut wins) and
the launch counts of both.  A shortcut earns its place when it wins ≥ 3 % at some batch size.

    python tools/ab_shortcuts.py                                   # mobilenetv2_100, batch 1 8 32, training 32
    python tools/ab_shortcuts.py --batch 1 --rounds 60 --train-batch

Shortcuts (inference, compact MDConv model): ``calls_forward`` (the attention's linears as ``F.linear`` instead
of module calls; removing it also removes ``addmm_relu``, which it gates), ``one_sample`` (the batch-1 matmul
path instead of the batched compact paths), ``addmm_relu`` (fc1 + ReLU as one ``_addmm_activation``); training
(expanding MDConv model): ``fused`` (the fused training functions instead of plain autograd).  Deleted after
their A/B (docs/benchmarks.md): ``member`` and the batch-1 parameter-view cache.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import force_training_path, launches, set_malloc, train_step  # noqa: E402

from mdplug.convert import compact, convert  # noqa: E402
from mdplug.convert.checkpoint import build_model  # noqa: E402
from mdplug.nn import _common, _multilayer, mdconv  # noqa: E402


@contextlib.contextmanager
def patched(*swaps) -> Iterator[None]:
    """Set ``(obj, name, value)`` attributes for the block, then restore them."""
    old = [(obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name))
           for obj, name, _ in swaps]
    try:
        for obj, name, value in swaps:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def _no_addmm_activation(bias, mat1, mat2):
    return torch.relu(torch.addmm(bias, mat1, mat2))


#: inference shortcuts: name -> the patches that remove it
REMOVALS: Dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    'calls_forward': lambda: patched((_common, 'calls_forward', lambda mod, cls: False),
                                     (mdconv, 'calls_forward', lambda mod, cls: False)),
    'one_sample': lambda: patched((_multilayer.MultiLayerConv, '_runs_one_sample', lambda self, x, tracing: False)),
    'addmm_relu': lambda: patched((torch, '_addmm_activation', _no_addmm_activation)),
}


def ab(fn: Callable[[], object], removal: Callable[[], contextlib.AbstractContextManager], rounds: int) -> dict:
    """Per-round ratio (without / with the shortcut), alternating which runs first; launches of both."""
    def timed(off: bool) -> float:
        with removal() if off else contextlib.nullcontext():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    timed(False), timed(True)
    ratios = []
    for r in range(rounds):
        if r % 2:
            off, on = timed(True), timed(False)
        else:
            on, off = timed(False), timed(True)
        ratios.append(off / on)
    with removal():
        n_off = sum(launches(fn).values())
    return dict(ratio=statistics.median(ratios), lo=min(ratios), hi=max(ratios), rounds=rounds,
                launches_with=sum(launches(fn).values()), launches_without=n_off)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='mobilenetv2_100')
    p.add_argument('--select', default='pointwise')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--batch', type=int, nargs='*', default=[1, 8, 32])
    p.add_argument('--train-batch', type=int, nargs='*', default=[32])
    p.add_argument('--rounds', type=int, default=40, help='rounds at batch 1 (batch b: rounds / b, at least 6)')
    p.add_argument('--only', nargs='*', help='shortcuts to measure (default all)')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    set_malloc('retain')
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    static = build_model(args.model)
    model = compact(convert(copy.deepcopy(static), kind='mdconv', select=args.select)).eval()
    names = [n for n in REMOVALS if not args.only or n in args.only]
    print(f'# A/B of the eager shortcuts: {args.model}, select={args.select}, {args.size}², torch '
          f'{torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}\n')
    print('| shortcut | batch | without / with (median of per-round ratios; min–max) | launches with → without |')
    print('|---|---|---|---|')
    for b in args.batch:
        x = torch.randn(b, 3, args.size, args.size)
        rounds = max(6, args.rounds // b)
        with torch.inference_mode():
            for name in names:
                if name == 'one_sample' and b != 1:
                    continue  # batch-1 only
                r = ab(lambda: model(x), REMOVALS[name], rounds)
                print(f"| {name} | {b} | {r['ratio']:.3f} ({r['lo']:.2f}–{r['hi']:.2f}, {rounds} rounds) | "
                      f"{r['launches_with']} → {r['launches_without']} |", flush=True)
    if not args.only or 'fused' in args.only:
        for b in args.train_batch:
            x, target = torch.randn(b, 3, args.size, args.size), torch.randint(0, 1000, (b,))
            md = convert(copy.deepcopy(static), kind='mdconv', select=args.select).train()
            step = train_step(md, x, target)
            r = ab(step, lambda: _forced(md, False), max(6, args.rounds // b))
            print(f"| fused (training step) | {b} | {r['ratio']:.3f} ({r['lo']:.2f}–{r['hi']:.2f}, {r['rounds']} "
                  f"rounds) | {r['launches_with']} → {r['launches_without']} |", flush=True)
    print(f'\nload {os.getloadavg()[0]:.2f} at the end')
    return 0


@contextlib.contextmanager
def _forced(model: nn.Module, fused: bool) -> Iterator[None]:
    force_training_path(model, fused)
    try:
        yield
    finally:
        force_training_path(model, None)


if __name__ == '__main__':
    sys.exit(main())
