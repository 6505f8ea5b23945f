"""Side-by-side speed benchmark: static vs MAConv, MDConv, DYConv (peer-style and mdplug), DCD, timm CondConv.

The row "static + attention (floor)" is the static model that also runs MDConv's attention network on the input
of every conv MDConv would replace (``tools/peers.py``, AttentionFloor): no MDConv execution can be faster in eager
mode, and DYConv computes the same attention, so it shows how far apart the two can be at best.

Every variant of one model is built from the same static network and changes the same convs (the paper's choice:
pointwise convs of MobileNetV2, the 3×3 convs of ResNet's blocks; ``--select`` overrides).  All variants run in
one process and are timed round-robin (one call of each in turn, ``--repeats`` rounds after ``--warmup`` at the
largest batch, proportionally more at smaller ones so every batch size is measured for about as long), so
load from other processes falls on all of them alike; the tables give the median, the spread (min–max) and the
ratio of medians to the static model.  Training steps (forward + backward + SGD step) also report the peak
memory allocated during one step (torch profiler's allocator counter).

    python tools/benchmark.py                              # mobilenetv2_100 and resnet18, batch 1 8 32
    python tools/benchmark.py --model resnet50 --batch 8 --out /tmp/b.md --plot /tmp/b.png
    python tools/benchmark.py --quick                      # 1 model, few repeats: a smoke run
    python tools/benchmark.py --channels-last --out docs/benchmarks_channels_last.md  # NHWC models and inputs
    python tools/benchmark.py --device cuda --dtype bfloat16 --out docs/benchmarks_cuda_bf16.md  # on a GPU

On CUDA each call is timed with CUDA events (recorded around the call, then synchronised), the peak memory of a
training step comes from the caching allocator's counters, and ``--dtype float16|bfloat16`` runs every variant
under ``torch.autocast`` (the weights stay float32, as in mixed-precision training).

Writes ``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--out``, ``--plot``) and optionally ``--json``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import AttentionFloor, PeerDYConv2d, TimmCondConv, swap_convs  # noqa: E402

import mdplug  # noqa: E402
from mdplug.convert import compact, convert, plan  # noqa: E402
from mdplug.convert.checkpoint import build_model  # noqa: E402

FLOOR = 'static + attention (floor)'
INFER = ('static', FLOOR, 'maconv compact', 'mdconv compact (weight)', 'mdconv compact (factorized)',
         'mdconv compact (auto)', 'dyconv peer-style (groups=B)', 'dyconv mdplug', 'dcd compact (auto)',
         'condconv timm')
TRAIN = ('static', 'maconv expanding', 'mdconv expanding', 'maconv expanding (fused)', 'mdconv expanding (fused)',
         'maconv expanding (plain autograd)', 'mdconv expanding (plain autograd)', 'dyconv peer-style (groups=B)',
         'dyconv mdplug')
#: the training paths a ``(fused)`` / ``(plain autograd)`` variant forces (``fuse_training_tail``); the plain name
#: runs the device's default (mdplug/nn/_multilayer.py, ``FUSED_DEVICES``)
FORCED = {' (fused)': True, ' (plain autograd)': False}


#: a hand-written section of the report between these markers survives a re-run
NOTES_BEGIN, NOTES_END = '<!-- notes:begin -->', '<!-- notes:end -->'


def default_select(model_name: str) -> str:
    """The paper's placement: 3×3 convs of ResNet blocks (Table 2), pointwise convs elsewhere (Table 1)."""
    return 'spatial' if 'resnet' in model_name.lower() else 'pointwise'


def _set_path(model: nn.Module, path: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (mdplug.MDConv2d, mdplug.DCDConv2d, mdplug.DYConv2d)):
            m.path = path
    return model


def build_inference(static: nn.Module, select: str, names: Sequence[str], variants: Sequence[str]):
    """Eval-mode models by variant name, all made from (copies of) ``static``."""
    def ours(kind: str, path: Optional[str] = None) -> nn.Module:
        m = compact(convert(copy.deepcopy(static), kind=kind, select=select)).eval()
        return _set_path(m, path) if path else m

    makers = {
        'static': lambda: copy.deepcopy(static).eval(),
        FLOOR: lambda: swap_convs(copy.deepcopy(static), names, AttentionFloor).eval(),
        'maconv compact': lambda: ours('maconv'),
        'mdconv compact (weight)': lambda: ours('mdconv', 'weight'),
        'mdconv compact (factorized)': lambda: ours('mdconv', 'factorized'),
        'mdconv compact (auto)': lambda: ours('mdconv', 'auto'),
        'dyconv peer-style (groups=B)': lambda: swap_convs(copy.deepcopy(static), names, PeerDYConv2d).eval(),
        'dyconv mdplug': lambda: ours('dyconv'),
        'dcd compact (auto)': lambda: ours('dcd'),
        'condconv timm': lambda: swap_convs(copy.deepcopy(static), names, TimmCondConv).eval(),
    }
    return {v: makers[v]() for v in variants}


def to_layout(model: nn.Module, fmt: torch.memory_format) -> nn.Module:
    """``model`` with its 4-D parameters and buffers in memory format ``fmt`` (in place).  Unlike
    ``model.to(memory_format=...)``, which raises on 5-D tensors, this also takes layers that keep their expert
    kernels as one (K, q, p, k, k) parameter, as public DYConv code (the peer) does."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=fmt)
    return model


def force_training_path(model: nn.Module, fused: Optional[bool]) -> nn.Module:
    """Set ``fuse_training_tail`` of every multi-layer conv of ``model``: True (the fused functions wherever they
    apply), False (plain autograd) or None (the device's default)."""
    for m in model.modules():
        if hasattr(m, 'fuse_training_tail'):
            m.fuse_training_tail = fused
    return model


def build_train(static: nn.Module, select: str, names: Sequence[str], variants: Sequence[str]):
    def ours(variant: str) -> nn.Module:
        kind = variant.split()[0]
        model = convert(copy.deepcopy(static), kind=kind, select=select)
        return force_training_path(model, next((f for tail, f in FORCED.items() if variant.endswith(tail)), None))

    makers = {
        'static': lambda: copy.deepcopy(static),
        'dyconv peer-style (groups=B)': lambda: swap_convs(copy.deepcopy(static), names, PeerDYConv2d),
        'dyconv mdplug': lambda: convert(copy.deepcopy(static), kind='dyconv', select=select),
    }
    return {v: (makers[v]() if v in makers else ours(v)).train() for v in variants}


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               cast: Optional[contextlib.AbstractContextManager] = None,
               foreach: Optional[bool] = None) -> Callable[[], None]:
    """One SGD training step as a function.  ``foreach``: SGD's (None: its default, one multi-tensor update on
    CUDA, a loop over the parameters on the CPU; the launch counts take True everywhere, as on CUDA)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=foreach)
    cast = cast or contextlib.nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with cast:
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return step


class _LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == 'aten' and not (func.is_view or name == 'detach' or name.startswith('empty')):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def launches(fn: Callable[[], object]) -> collections.Counter:
    """The aten ops one call of ``fn`` dispatches below autograd, by name: on a GPU each is at least one kernel
    launch, so their count is a CPU-measurable proxy of the launch-bound regime.  Views (which launch nothing),
    ``detach`` and ``empty*`` (allocations) are left out, and so are other namespaces (profiler markers); a
    composite op that reaches the dispatch mode whole (``linear`` under inference mode) counts once."""
    with _LaunchCounter() as counter:
        fn()
    return counter.ops


def peak_step_memory(fn: Callable[[], None], device: str = 'cpu') -> int:
    """Peak bytes allocated (and not yet freed) during one call of ``fn``: the CUDA caching allocator's peak
    counter on a GPU, the profiler's allocator counter on the CPU."""
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    finally:
        os.remove(path)
    totals = [e['args']['Total Allocated'] for e in events if e.get('name') == '[memory]']
    return int(max(totals) - totals[0]) if totals else 0


def rounds(args, b: int) -> int:
    """Timed rounds at inference batch ``b``: ``--repeats`` at the largest batch, ×(largest / b) below it (a
    batch-1 call is short, so a few calls would give a noisy median)."""
    return max(args.repeats, args.repeats * max(args.batch) // b)


def time_round_robin(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int, bar,
                     device: str = 'cpu') -> Dict[str, dict]:
    """Seconds per call of each function, measured one call of each in turn.

    CPU: wall clock and process CPU time.  CUDA: the time between two CUDA events recorded around the call (the
    device is synchronised before each call, so no earlier work is counted), and the host's CPU time.
    """
    cuda = device.startswith('cuda')
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            bar.update(1)
    times: Dict[str, dict] = {k: dict(wall=[], cpu=[]) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                c0 = time.process_time()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k]['wall'].append(start.elapsed_time(end) / 1e3)
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k]['wall'].append(time.perf_counter() - t0)
            times[k]['cpu'].append(time.process_time() - c0)
            bar.update(1)
    return times


def summarise(t: dict) -> dict:
    """Median, min and max wall time, the median CPU time (all threads of this process), and every round's wall
    time (``walls``, in round order: round i of two variants ran back to back, see :func:`paired_ratio`)."""
    ts = t['wall']
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), n=len(ts),
                cpu_median=statistics.median(t['cpu']), walls=list(ts))


def paired_ratio(a: dict, b: dict) -> Optional[float]:
    """Median over the rounds of a's time / b's time in the same round: the two ran one right after the other,
    so drifts of the machine's speed over the run (minutes) cancel, unlike in the ratio of the two medians."""
    if not a.get('walls') or len(a['walls']) != len(b.get('walls', ())):
        return None
    return statistics.median(x / y for x, y in zip(a['walls'], b['walls']))


#: glibc ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def set_malloc(mode: str) -> str:
    """Configure the C allocator for the run; returns what the report says about it.

    ``'retain'``: glibc keeps freed memory in the process (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
    raised to 1 GiB).  With glibc's defaults every block above the mmap threshold (at most 32 MiB; activations of
    a 224² network at batch 8 and above) is mapped fresh and returned on free, and the heap top is trimmed, so
    each call page-faults its outputs back in: measured here, mobilenetv2_100 forward at batch 32 takes 3.5× as
    long, and which variant allocates what then decides its time more than its arithmetic does.  Setting the
    same thresholds through ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or running under jemalloc or
    tcmalloc (what PyTorch's CPU performance guide recommends) has the same effect.  ``'default'``: leave the
    allocator as it is.
    """
    if mode == 'default':
        return 'the C library\'s default allocator settings'
    name = ctypes.util.find_library('c')
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, 'mallopt') or platform.libc_ver()[0] != 'glibc':
        raise RuntimeError(f'--malloc retain needs glibc (found {platform.libc_ver()[0] or "another C library"});'
                           f' run with --malloc default')
    limit = 1 << 30
    if not (libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, limit)):
        raise RuntimeError('--malloc retain: glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, 1 GiB)')
    return 'glibc with freed memory kept in the process (`mallopt` M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 1 GiB)'


def machine_info(threads: int, device: str = 'cpu', dtype: str = 'float32') -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    import timm
    info = dict(cpu=cpu, logical_cpus=os.cpu_count(), threads=threads, torch=torch.__version__,
                timm=timm.__version__, mdplug=mdplug.__version__, python=platform.python_version(),
                date=datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), device=device, dtype=dtype)
    if device.startswith('cuda'):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def autocast(args) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``--dtype`` on ``--device`` (nothing for float32)."""
    if args.dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(args.device.split(':')[0], dtype=getattr(torch, args.dtype))


def wait_for_quiet(limit: float, until: Optional[str]) -> None:
    """Wait until the 1-minute load average is below ``limit`` or the clock reads ``until`` (HH:MM)."""
    if limit <= 0 or not hasattr(os, 'getloadavg'):
        return
    deadline = None
    if until:
        hh, mm = (int(v) for v in until.split(':'))
        now = datetime.datetime.now()
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if deadline < now - datetime.timedelta(hours=12):
            deadline += datetime.timedelta(days=1)
    while os.getloadavg()[0] > limit and (deadline is None or datetime.datetime.now() < deadline):
        print(f'load average {os.getloadavg()[0]:.2f} > {limit}; waiting', file=sys.stderr, flush=True)
        time.sleep(20)


def compiled(model: nn.Module, args) -> nn.Module:
    """``torch.compile(model, backend=args.torchcompile, mode=args.compile_mode)``, or the model itself without
    ``--torchcompile``."""
    if not args.torchcompile:
        return model
    return torch.compile(model, backend=args.torchcompile, mode=args.compile_mode)


def run_model(name: str, args, bar) -> dict:
    static = build_model(name)
    select = args.select or default_select(name)
    size = (3, args.size, args.size)
    example = torch.randn(1, *size)
    names = plan(static, 'dyconv', select, example_inputs=example).names
    out = dict(model=name, select=select, converted=len(names), input=list(size), infer={}, train={})
    variants = [v for v in INFER if v in args.variants] if args.variants else list(INFER)
    dev = args.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {v: compiled(to_layout(m.to(dev), fmt), args)
              for v, m in build_inference(static, select, names, variants).items()}
    for b in args.batch:
        x = torch.randn(b, *size, device=dev).contiguous(memory_format=fmt)
        with torch.inference_mode(), autocast(args):
            fns = {v: (lambda m=m: m(x)) for v, m in models.items()}
            times = time_round_robin(fns, args.warmup, rounds(args, b), bar, dev)
            out['infer'][b] = {v: summarise(t) for v, t in times.items()}
            for v, fn in fns.items():
                out['infer'][b][v]['launches'] = None if args.torchcompile else sum(launches(fn).values())
    del models
    tvariants = [v for v in TRAIN if v in args.train_variants] if args.train_variants else list(TRAIN)
    train_batches = args.train_batch if not args.train_models or name in args.train_models else []
    for b in train_batches:
        x = torch.randn(b, *size, device=dev).contiguous(memory_format=fmt)
        target = torch.randint(0, 1000, (b,), device=dev)
        models = {v: compiled(to_layout(m.to(dev), fmt), args)
                  for v, m in build_train(static, select, names, tvariants).items()}
        fns = {v: train_step(m, x, target, autocast(args)) for v, m in models.items()}
        times = time_round_robin(fns, args.train_warmup, args.train_repeats, bar, dev)
        res = {v: summarise(t) for v, t in times.items()}
        for v, fn in fns.items():
            res[v]['peak_bytes'] = peak_step_memory(fn, dev)
            res[v]['launches'] = None if args.torchcompile else sum(
                launches(train_step(models[v], x, target, autocast(args), foreach=True)).values())
            bar.update(2)
        out['train'][b] = res
    return out


# -- report -----------------------------------------------------------------------------------------------------
def _cell(s: dict, base: dict) -> str:
    ms = s['median'] * 1e3
    return (f"{ms:.1f} ({s['min'] * 1e3:.1f}–{s['max'] * 1e3:.1f}) **×{s['median'] / base['median']:.2f}** "
            f"(cpu ×{s['cpu_median'] / base['cpu_median']:.2f})")


def _launch_cell(s: dict, base: dict, converted: int) -> str:
    n = s.get('launches')
    return '–' if n is None else f"{n} ({(n - base['launches']) / max(converted, 1):+.1f})"


def targets(r: dict) -> List[str]:
    """The issue's targets that this model's results speak to, each with its measured value."""
    lines = []
    inf = r['infer']

    def ratios(v: dict, w: dict):
        return v['median'] / w['median'], v['cpu_median'] / w['cpu_median'], paired_ratio(v, w)

    def ratio(b, v, w='static'):
        if b in inf and v in inf[b] and w in inf[b]:
            return ratios(inf[b][v], inf[b][w])
        return None

    def check(label, value, limit, floor=None):
        if value is not None:
            wall, cpu, paired = value
            lines.append(f"- {label}: {wall:.3f} (target ≤ {limit}) — {'met' if wall <= limit else 'MISSED'}"
                         f" (CPU-time ratio {cpu:.3f}" + ('' if paired is None else
                                                          f'; median of per-round ratios {paired:.3f}') + ')'
                         + ('' if floor is None else f'; the floor (static + attention) gives {floor[0]:.3f}'))

    for b in (1, 32):
        check(f'MAConv compact / static, batch {b}', ratio(b, 'maconv compact'), 1.02)
    check('MDConv compact (auto) / static, batch 32', ratio(32, 'mdconv compact (auto)'), 1.15)
    check('MDConv compact (auto) / static, batch 1', ratio(1, 'mdconv compact (auto)'), 1.25)
    for b in sorted(inf):
        check(f'MDConv compact (auto) / DYConv peer-style, batch {b}',
              ratio(b, 'mdconv compact (auto)', 'dyconv peer-style (groups=B)'), 0.8,
              ratio(b, FLOOR, 'dyconv peer-style (groups=B)'))
        check(f'MDConv compact (auto) / DCD compact, batch {b}',
              ratio(b, 'mdconv compact (auto)', 'dcd compact (auto)'), 1.0)
        check(f'MDConv compact (auto) / timm CondConv, batch {b}', ratio(b, 'mdconv compact (auto)', 'condconv timm'),
              1.0)
    tr = r['train'].get(32, {})
    if 'static' in tr and 'mdconv expanding' in tr:
        md, st = tr['mdconv expanding'], tr['static']
        check('MDConv expanding train step / static, batch 32', ratios(md, st), 1.8)
        mem = md['peak_bytes'] / max(st['peak_bytes'], 1)
        lines.append(f"- MDConv expanding peak step memory / static, batch 32: {mem:.3f} (target ≤ 1.6) — "
                     f"{'met' if mem <= 1.6 else 'MISSED'}")
    return lines


def markdown(results: List[dict], info: dict, argv: List[str], load: tuple) -> str:
    cuda = info.get('device', 'cpu').startswith('cuda')
    where = (f"GPU: {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), host {info['cpu']}"
             if cuda else f"Machine: {info['cpu']}")
    layout = 'channels-last (NHWC) models and inputs' if info.get('channels_last') else 'NCHW'
    precision = (f'{layout}, float32' if info.get('dtype', 'float32') == 'float32' else
                 f"{layout}, `torch.autocast` to {info['dtype']} (float32 weights)")
    if info.get('torchcompile'):
        precision += (f"; every model `torch.compile`d (backend {info['torchcompile']}"
                      + (f", mode {info['compile_mode']}" if info.get('compile_mode') else '')
                      + '), compiled during the warm-up calls, which are not timed')
    timing = ('CUDA events around each call' if cuda else 'wall clock')
    lines = ['# Benchmarks' + (f" on {info['gpu']}, {info['dtype']}" if cuda else '')
             + (', channels-last' if info.get('channels_last') else '')
             + (', torch.compile' if info.get('torchcompile') else ''), '',
             f"Generated by `python tools/benchmark.py {' '.join(argv)}` on {info['date']}.", '',
             f"{where}, {info['logical_cpus']} logical CPUs, `torch.set_num_threads({info['threads']})`;"
             f" torch {info['torch']}, timm {info['timm']}, mdplug {info['mdplug']}, Python {info['python']}. "
             f"1-minute load average {load[0]:.2f} at the start and {load[1]:.2f} at the end. Timing: {timing}. "
             f"Allocator: {info.get('malloc', 'default')}.", '',
             'Method: every variant is built from the same randomly initialised static model and changes the same '
             'convs; all run in one process, timed round-robin (one call of each in turn; the smaller the batch, the '
             'more rounds: --repeats × largest batch / batch). Cells: median ms '
             '(min–max over the repeats), **the ratio of medians to static**, and in brackets the same ratio of the '
             f"{'host' if cuda else 'process'} CPU time (less sensitive to other processes on the machine). "
             'The target list also gives the median of the per-round ratios (the two variants of a round ran back '
             'to back, so drifts of the machine over the run cancel). '
             f'Inference: eval mode, `torch.inference_mode()`, {precision}. Training step: forward + '
             'cross-entropy + backward + SGD step, train mode; "mdconv expanding" takes the '
             "device's default training path (CPU: the fused functions; CUDA: plain autograd), the \"(fused)\" and "
             '"(plain autograd)" rows force either. Launches: the non-view aten ops one call dispatches (views, '
             '`detach`, `empty*` left out; each is at least one kernel launch on a GPU; the SGD step counted as one '
             '`foreach` update, as it runs on CUDA), counted in eager runs. '
             'Peak memory is the most bytes allocated and not '
             'yet freed during one step '
             f"({'the CUDA caching allocator' if cuda else 'torch profiler allocator'} counter; parameters and the "
             'input are allocated before the step and not counted). "dyconv peer-style (groups=B)" is '
             '`tools/peers.py`: the per-sample aggregated kernels run as one grouped conv with groups=B, as public '
             'DYConv code does; "condconv timm" is '
             "`timm.layers.CondConv2d` behind CondConv's sigmoid routing (4 experts). "
             f'"{FLOOR}" is the static model running, beside each of those convs, the attention network of '
             "MDConv on the conv's input and dropping its output: every MDConv execution computes at least that, "
             'so in eager mode none can be faster (DYConv computes the same attention before aggregating its '
             'experts).', '']
    for r in results:
        lines += [f"## {r['model']} (select={r['select']}: {r['converted']} convs replaced; input "
                  f"{'×'.join(map(str, r['input']))})", '']
        if r['infer']:
            bs = sorted(r['infer'])
            lines += ['### Inference (forward)', '', '| variant | ' + ' | '.join(f'batch {b}' for b in bs) + ' |',
                      '|---' * (len(bs) + 1) + '|']
            for v in next(iter(r['infer'].values())):
                lines.append(f'| {v} | ' + ' | '.join(_cell(r['infer'][b][v], r['infer'][b]['static']) for b in bs)
                             + ' |')
            lines.append('')
            if r['infer'][bs[0]]['static'].get('launches') is not None:
                lines += ['Launches per forward (non-view aten ops dispatched, eager; `launches` in the tool), and in '
                          'brackets the extra launches per replaced conv beyond static:', '',
                          '| variant | ' + ' | '.join(f'batch {b}' for b in bs) + ' |', '|---' * (len(bs) + 1) + '|']
                for v in r['infer'][bs[0]]:
                    lines.append(f'| {v} | ' + ' | '.join(_launch_cell(r['infer'][b][v], r['infer'][b]['static'],
                                                                       r['converted']) for b in bs) + ' |')
                lines.append('')
        for b, res in sorted(r['train'].items()):
            base = res['static']
            lines += [f'### Training step, batch {b}', '',
                      '| variant | ms (min–max) ×static | peak MB | ×static | launches | ×static |',
                      '|---|---|---|---|---|---|']
            for v, s in res.items():
                n, n0 = s.get('launches'), base.get('launches')
                count = '– | –' if n is None or not n0 else f'{n} | ×{n / n0:.2f}'
                lines.append(f"| {v} | {_cell(s, base)} | {s['peak_bytes'] / 2**20:.0f} | "
                             f"×{s['peak_bytes'] / max(base['peak_bytes'], 1):.2f} | {count} |")
            lines.append('')
        t = targets(r) if r['model'] == 'mobilenetv2_100' and not cuda and info.get('dtype') == 'float32' else []
        if t:
            stated = ('stated for mobilenetv2_100 in eager mode; this run is compiled' if info.get('torchcompile')
                      else 'stated for mobilenetv2_100')
            lines += [f'### Targets (issue 5, {stated})', ''] + t + ['']
    return '\n'.join(lines)


def plot(results: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 4 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        bs = sorted(r['infer'])
        if not bs:
            continue
        variants = list(r['infer'][bs[0]])
        width = 0.8 / len(bs)
        for i, b in enumerate(bs):
            ratios = [r['infer'][b][v]['median'] / r['infer'][b]['static']['median'] for v in variants]
            ax.bar([j + i * width for j in range(len(variants))], ratios, width, label=f'batch {b}')
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_xticks([j + width * (len(bs) - 1) / 2 for j in range(len(variants))])
        ax.set_xticklabels([v.replace(' (', '\n(') for v in variants], fontsize=7)
        ax.set_ylabel('time / static')
        ax.set_title(f"{r['model']} inference, select={r['select']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', action='append', help='timm name or torchvision:NAME (repeatable); '
                   'default mobilenetv2_100 and resnet18')
    p.add_argument('--select', choices=('pointwise', 'spatial', 'all'), help='default: the paper\'s placement')
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8, 32], help='inference batch sizes')
    p.add_argument('--train-batch', type=int, nargs='*', default=[32], help='training-step batch sizes')
    p.add_argument('--train-models', nargs='*', help='models whose training step is measured (default: all)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=9,
                   help='timed rounds at the largest inference batch (smaller batches: proportionally more)')
    p.add_argument('--train-warmup', type=int, default=1)
    p.add_argument('--train-repeats', type=int, default=4)
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    p.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32',
                   help='run under torch.autocast to this dtype (float32: no autocast)')
    p.add_argument('--channels-last', action='store_true',
                   help='models and inputs in channels-last memory format (NHWC), as timm\'s --channels-last')
    p.add_argument('--torchcompile', nargs='?', const='inductor', metavar='BACKEND',
                   help='torch.compile every model with this backend (default inductor), as timm\'s benchmark.py '
                        'takes it; compilation happens in the warm-up calls (at least one per batch size)')
    p.add_argument('--compile-mode', choices=('default', 'reduce-overhead', 'max-autotune',
                                              'max-autotune-no-cudagraphs'),
                   help="torch.compile's mode with --torchcompile (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--malloc', choices=('retain', 'default'), default='retain',
                   help="C allocator: 'retain' keeps freed memory in the process (glibc mallopt), so calls do not "
                        "page-fault their outputs back in; 'default' leaves glibc as it is (see set_malloc)")
    p.add_argument('--variants', nargs='*', help=f'inference variants (default all; static always): '
                   f'{", ".join(INFER)}')
    p.add_argument('--train-variants', nargs='*', help=f'training variants (default all; static always): '
                   f'{", ".join(TRAIN)}')
    p.add_argument('--wait-load', type=float, default=0.0, metavar='L',
                   help='first wait until the 1-minute load average is below L (or the clock reads --wait-until)')
    p.add_argument('--wait-until', metavar='HH:MM', help='stop waiting for a quiet machine at this time')
    p.add_argument('--quick', action='store_true', help='smoke run: mobilenetv2_100 at 128², few repeats')
    p.add_argument('--out', default='docs/benchmarks.md')
    p.add_argument('--plot', default='docs/benchmarks.png')
    p.add_argument('--json', help='also write the raw numbers here')
    return p


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The options, with the variant lists checked and completed: static always first (every ratio is to it);
    ``None`` means every variant; compiled runs leave the floor out (its attention feeds nothing, so a compiler
    removes it and the row would read as static) and refuse it by name."""
    args = _parser().parse_args(argv)
    for opt, chosen, known in (('--variants', args.variants, INFER), ('--train-variants', args.train_variants, TRAIN)):
        unknown = [v for v in chosen or () if v not in known]
        if unknown:
            _parser().error(f'{opt}: unknown {", ".join(map(repr, unknown))}; known: {", ".join(known)}')
    args.variants = ['static'] + [v for v in args.variants if v != 'static'] if args.variants else None
    args.train_variants = (['static'] + [v for v in args.train_variants if v != 'static']
                           if args.train_variants else None)
    if args.compile_mode and not args.torchcompile:
        _parser().error('--compile-mode needs --torchcompile')
    if args.torchcompile:  # compiling happens in the warm-up calls, which then must exist
        args.warmup, args.train_warmup = max(args.warmup, 1), max(args.train_warmup, 1)
        if args.variants and FLOOR in args.variants:
            _parser().error(f'--variants {FLOOR!r} means nothing with --torchcompile: the compiler removes its '
                            'unused attention')
        args.variants = args.variants or [v for v in INFER if v != FLOOR]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.quick:
        args.model = args.model or ['mobilenetv2_100']
        args.size, args.warmup, args.repeats, args.train_repeats = 128, 1, 3, 2
        args.batch, args.train_batch = [1, 8], [8]
    args.model = args.model or ['mobilenetv2_100', 'resnet18']
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        _parser().error(f'--device {args.device}: torch {torch.__version__} sees no CUDA device')
    if args.dtype == 'float16' and not args.device.startswith('cuda'):
        _parser().error('--dtype float16 needs --device cuda (CPU autocast runs bfloat16)')
    try:
        malloc = set_malloc(args.malloc)
    except RuntimeError as e:
        _parser().error(str(e))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    from tqdm import tqdm
    n_inf = len(args.variants or INFER) * sum(args.warmup + rounds(args, b) for b in args.batch)
    n_train = len(args.train_variants or TRAIN) * len(args.train_batch) * (args.train_warmup + args.train_repeats + 2)
    n_trained = len([m for m in args.model if not args.train_models or m in args.train_models])
    wait_for_quiet(args.wait_load, args.wait_until)
    load0 = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    results = []
    with tqdm(total=len(args.model) * n_inf + n_trained * n_train, unit='call', desc='benchmark') as bar:
        for name in args.model:
            bar.set_postfix_str(name)
            results.append(run_model(name, args, bar))
    load1 = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    info = machine_info(args.threads, args.device, args.dtype)
    info['malloc'] = malloc
    info['channels_last'] = bool(args.channels_last)
    info['torchcompile'] = args.torchcompile
    info['compile_mode'] = args.compile_mode
    text = markdown(results, info, argv, (load0, load1))
    others = sorted(f for f in os.listdir(os.path.dirname(os.path.abspath(args.out)))
                    if f.startswith('benchmarks_') and f.endswith('.md') and f != os.path.basename(args.out))
    if others:  # the same benchmark on other devices/dtypes (e.g. a lent GPU), kept beside this report
        text += '\n\nOther runs of this benchmark: ' + ', '.join(f'[{f[:-3]}]({f})' for f in others) + '.\n'
    if args.plot:
        rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
        text += f'\n![inference time relative to static]({rel})\n'
    for path in (args.out, args.plot, args.json):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isfile(args.out):  # keep the hand-written analysis of an earlier report
        with open(args.out) as f:
            old = f.read()
        if NOTES_BEGIN in old and NOTES_END in old:
            text += '\n' + NOTES_BEGIN + old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0] + NOTES_END + '\n'
    with open(args.out, 'w') as f:
        f.write(text + '\n')
    if args.plot:
        plot(results, args.plot)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(info=info, load=[load0, load1], results=results), f, indent=1)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
