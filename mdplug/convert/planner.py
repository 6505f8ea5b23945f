"""Decide which convs of a model a conversion replaces, and say why for every conv (the dry run)."""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mdplug.convert._layers import layer_class, mdplug_layer_types
from mdplug.convert.graph import ConvSite, ModelGraph, analyse, default_example_input

__all__ = ['Decision', 'Plan', 'plan', 'SELECT_RULES', 'describe_conv']

SELECT_RULES = ('pointwise', 'spatial', 'all')
_SUBCLASS_REASON = 'is a subclass of nn.Conv2d; only exact nn.Conv2d is converted'
_OURS_REASON = 'already an mdplug layer'
Select = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def describe_conv(m: nn.Module) -> str:
    """``'32→16 1×1 s1 g1'``: channels, kernel, stride, groups of a conv-like module."""
    kh, kw = _pair(getattr(m, 'kernel_size', '?'))
    s = _pair(getattr(m, 'stride', 1))
    stride = f's{s[0]}' if s[0] == s[1] else f's{s[0]}×{s[1]}'
    return f'{m.in_channels}→{m.out_channels} {kh}×{kw} {stride} g{getattr(m, "groups", 1)}'


def _pair(v) -> Tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclasses.dataclass
class Decision:
    """One conv of the model: its qualified name, type, shape, whether it is replaced, and why."""
    name: str
    type: str
    shape: str
    selected: bool
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Plan:
    """The result of :func:`plan`: convs to replace and convs kept, each with a reason."""
    kind: str
    select: str
    decisions: List[Decision]
    traced: bool
    notes: List[str]
    stem: Optional[str] = None
    head: Optional[str] = None
    num_linear: int = 0

    @property
    def replace(self) -> List[Decision]:
        """The convs to replace, in execution order."""
        return [d for d in self.decisions if d.selected]

    @property
    def skip(self) -> List[Decision]:
        """The convs kept, in execution order, each with its reason."""
        return [d for d in self.decisions if not d.selected]

    @property
    def names(self) -> List[str]:
        return [d.name for d in self.replace]

    def __len__(self) -> int:
        return len(self.replace)

    def as_dict(self) -> dict:
        return dict(kind=self.kind, select=self.select, traced=self.traced, notes=list(self.notes),
                    stem=self.stem, head=self.head, replace=[d.as_dict() for d in self.replace],
                    skip=[d.as_dict() for d in self.skip])

    def table(self, verbose: bool = True) -> str:
        """A readable table; with ``verbose=False`` only the summary line and the notes."""
        how = 'fx graph' if self.traced else 'module walk'
        lines = [f'{self.kind}, select={self.select}: {len(self.replace)} convs to replace, '
                 f'{len(self.skip)} kept (analysis: {how})']
        lines += [f'  note: {n}' for n in self.notes]
        if verbose:
            rows = [('replace' if d.selected else 'keep', d.name, d.type, d.shape, d.reason)
                    for d in self.decisions]
            if rows:
                w = [max(len(r[i]) for r in rows) for i in range(4)]
                lines += ['  ' + '  '.join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(r)) for r in rows]
        return '\n'.join(lines)

    def __str__(self) -> str:
        return self.table()

    def nothing_matched(self, verbose: bool = False) -> str:
        """The message for a plan that replaces nothing: why the convs were kept, counted by reason with one example
        each (``verbose``: every conv with its reason)."""
        msg = f'nothing matched select={self.select}'
        ours = collections.Counter(d.type for d in self.skip if d.reason.startswith(_OURS_REASON))
        if ours:
            types = ', '.join(f'{t} ×{n}' for t, n in ours.most_common())
            msg = (f'the model is already converted: it holds {sum(ours.values())} mdplug layers ({types}), and a '
                   f'conversion never looks inside them; compact it (mdplug.compact / `mdplug compact`) instead of '
                   f'converting it again; {msg}')
        subclasses = collections.Counter(d.type for d in self.skip if d.reason.endswith(_SUBCLASS_REASON))
        if subclasses:
            types = ', '.join(f'{t} ×{n}' for t, n in subclasses.most_common())
            n = sum(subclasses.values())
            which = 'every conv of the model is' if n == len(self.skip) else f'{n} of its {len(self.skip)} convs are'
            msg += (f': {which} an nn.Conv2d subclass ({types}) with its own forward, and only exact nn.Conv2d '
                    'is converted')
        if not self.skip:
            msg += ': the model has no nn.Conv2d'
        elif verbose:
            msg += '; convs present: ' + '; '.join(f'{d.name} ({d.type} {d.shape}: {d.reason})' for d in self.skip)
        else:
            groups: dict = {}
            for d in self.skip:
                groups.setdefault(_reason_key(d.reason), []).append(d)
            shown = ', '.join(f'{key} ×{len(ds)} (e.g. {ds[0].name} ({ds[0].type} {ds[0].shape}))'
                              for key, ds in list(groups.items())[:6])
            more = f', {len(groups) - 6} more reasons' if len(groups) > 6 else ''
            msg += f'; its {len(self.skip)} convs were kept: {shown}{more} (the full list: plan(...).table(), or -v)'
        if self.num_linear:
            msg += (f'; its {self.num_linear} nn.Linear layers (e.g. the pointwise projections of an MLP) '
                    'are not convs and are not converted')
        return msg


def _reason_key(reason: str) -> str:
    """The kind of a keep reason without its particulars: ``'depthwise (groups=32); ...'`` → ``'depthwise'``."""
    cut = min((i for i in (reason.find(' ('), reason.find(':'), reason.find(';')) if i > 0), default=len(reason))
    return reason[:cut].strip()


def _rule_reason(rule: str, m: nn.Conv2d) -> Tuple[bool, str]:
    kh, kw = _pair(m.kernel_size)
    if m.groups != 1:
        what = 'depthwise' if m.groups == m.in_channels else 'grouped'
        return False, f'{what} (groups={m.groups}); the rules take groups=1 only'
    if rule == 'pointwise' and (kh, kw) != (1, 1):
        return False, f'not pointwise ({kh}×{kw})'
    if rule == 'spatial' and (kh, kw) == (1, 1):
        return False, 'not spatial (1×1)'
    if m.padding_mode != 'zeros':
        return False, f'padding_mode={m.padding_mode!r} (the layers support zeros only)'
    return True, {'pointwise': 'pointwise 1×1, groups=1', 'spatial': f'spatial {kh}×{kw}, groups=1',
                  'all': f'{kh}×{kw}, groups=1'}[rule]


def _pooled(site: ConvSite) -> bool:
    """The conv reads a globally pooled map (an SE gate, a post-pool head): 1×1 for the example input and still
    1×1 for an input of twice the size (when the model runs at that size)."""
    def one_by_one(shape):
        return shape is not None and len(shape) == 4 and tuple(shape[2:]) == (1, 1)
    return one_by_one(site.in_shape) and (site.in_shape_2x is None or one_by_one(site.in_shape_2x))


def _decide(site: ConvSite, graph: ModelGraph, select: Select, exclude: Sequence[str],
            keep_stem: bool, keep_head: bool) -> Decision:
    m, name = site.module, site.name
    d = Decision(name, type(m).__name__, describe_conv(m), False, '')
    ours = mdplug_layer_types()
    if ours and isinstance(m, ours):
        d.reason = f'{_OURS_REASON} ({type(m).__name__})'
        return d
    if type(m) is not nn.Conv2d:
        d.reason = f'{type(m).__name__} {_SUBCLASS_REASON}'
        return d
    if site.params_read:
        d.reason = (f'the model reads its {"/".join(sorted(set(site.params_read)))} directly, not only by calling '
                    f'it; an mdplug layer in its place would break that code')
        return d
    hit = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
    if hit is not None:
        d.reason = f'excluded by {hit!r}'
        return d
    if isinstance(select, frozenset):  # a list of qualified names: exactly those, stem and head included
        d.selected = name in select
        d.reason = 'named in select' if d.selected else 'not named in select'
        return d
    if callable(select):
        ok = bool(select(name, m))
        reason = 'selected by the callable' if ok else 'not selected by the callable'
    else:
        ok, reason = _rule_reason(select, m)
        if ok and _pooled(site):
            ok, reason = False, 'reads a globally pooled 1×1 map (attention gate / FC-like head)'
    if not ok:
        d.reason = reason
        return d
    if keep_stem and name == graph.stem:
        d.reason = 'stem: first conv reading the model input (keep_stem=True)'
        return d
    if keep_head and name == graph.head:
        why = ('last conv in registration order (no graph)' if not graph.traced
               else 'last conv, on the trunk (not inside a residual block)')
        d.reason = f'head: {why} (keep_head=True)'
        return d
    d.selected, d.reason = True, reason
    return d


def _as_globs(exclude: Union[str, Iterable[str], None]) -> Tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    return tuple(exclude)


def _names(select, graph: ModelGraph) -> frozenset:
    """A list of qualified conv names given as ``select``, checked against the convs of the model."""
    names = list(select)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f'select lists {bad[0]!r} ({type(bad[0]).__name__}); a list select holds qualified conv '
                         f'names (str)')
    unknown = [n for n in names if n not in graph.sites]
    if unknown:
        import difflib
        hits = difflib.get_close_matches(unknown[0], list(graph.sites), n=3, cutoff=0.6)
        close = f' (close: {", ".join(hits)})' if hits else ''
        raise ValueError(f'select names {len(unknown)} module(s) that are not convs of the model: '
                         f'{", ".join(map(repr, unknown[:5]))}{close}; the convs are listed by mdplug.plan(model)')
    return frozenset(names)


def _check_select(select) -> None:
    if isinstance(select, str):
        if select not in SELECT_RULES:
            raise ValueError(f'unknown select={select!r}; use one of {", ".join(SELECT_RULES)}, a list of qualified '
                             f'conv names or a callable (name, conv) -> bool')
    elif not callable(select) and not isinstance(select, (list, tuple, set, frozenset)):
        raise ValueError(f'select={select!r} ({type(select).__name__}) is not accepted; use one of '
                         f'{", ".join(SELECT_RULES)}, a list of qualified conv names or a callable (name, conv) -> bool')


def _shape_text(example_inputs) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return '×'.join(map(str, example_inputs.shape))
    return type(example_inputs).__name__


def _example_run_failed(model: nn.Module, graph: ModelGraph, example_inputs) -> ValueError:
    first = graph.ordered()[0].module if graph.sites else None
    channels = f'; its first conv takes {first.in_channels} input channels' if first is not None else ''
    return ValueError(f'the example input {_shape_text(example_inputs)} does not run through '
                      f'{type(model).__name__} ({graph.run_error}){channels}: the rules need the feature-map shapes '
                      f'(to tell pooled 1×1 maps from feature maps); give example_inputs (Converted: input_shape, '
                      f'CLI: --input-size) of the size the model takes')


def _too_small(model: nn.Module, graph: ModelGraph, example_inputs) -> Optional[ValueError]:
    """An input so small that a strided conv receives a 1×1 map: the model's downsampling ran out of pixels and
    its trunk would look globally pooled. Returns the error to raise, or None."""
    for site in graph.ordered():
        shape, stride = site.in_shape, _pair(getattr(site.module, 'stride', 1))
        if shape is not None and len(shape) == 4 and any(n == 1 and s > 1 for n, s in zip(shape[2:], stride)):
            cfg = getattr(model, 'pretrained_cfg', None) or {}
            default = cfg.get('input_size') if isinstance(cfg, dict) else None
            hint = f" (the model's default is {'×'.join(map(str, default))})" if default else ''
            return ValueError(f'the example input {_shape_text(example_inputs)} is too small for '
                              f'{type(model).__name__}: {site.name} (stride {stride[0]}) receives a 1×1 map, so its '
                              f'trunk convs would look like ones reading a globally pooled map; give a larger example '
                              f'input (Converted: input_shape, CLI: --input-size){hint}')
    return None


def plan(model: nn.Module, kind: str = 'mdconv', select: Select = 'pointwise',
         exclude: Union[str, Iterable[str]] = (), keep_stem: bool = True, keep_head: bool = True,
         example_inputs=None) -> Plan:
    """Dry run of :func:`mdplug.convert`: which ``nn.Conv2d`` would be replaced by the layer of ``kind``.

    select: ``'pointwise'`` (1×1, groups=1), ``'spatial'`` (k×k with k>1, groups=1), ``'all'`` (groups=1), a list
    of qualified conv names (exactly those; keep_stem / keep_head do not apply), or a callable
    ``(qualified_name, conv) -> bool``. The rules skip convs that read a globally pooled 1×1 map (SE gates,
    post-pool heads), found by running ``example_inputs`` once (default: one random image of the model's
    ``pretrained_cfg['input_size']``, else 3×224×224); an example input that does not run, or is so small that a
    strided conv receives a 1×1 map, is a ``ValueError``.
    exclude: fnmatch globs on qualified names. keep_stem / keep_head: see :mod:`mdplug.convert.graph`.
    Matching is by exact type, so ``nn.Conv2d`` subclasses (``Conv2dSame``, ``StdConv2d``) are listed as kept.
    A model that already holds mdplug layers keeps them (a conversion never looks inside one).
    """
    layer_class(kind)  # unknown kind: ValueError now, before any work
    _check_select(select)
    globs = _as_globs(exclude)
    rules = isinstance(select, str)
    graph = analyse(model, example_inputs=example_inputs, shapes=rules)
    if rules and graph.sites:
        shown = example_inputs if example_inputs is not None else default_example_input(model)
        if graph.run_error:
            raise _example_run_failed(model, graph, shown)
        err = _too_small(model, graph, shown)
        if err is not None:
            raise err
    chosen = select if rules or callable(select) else _names(select, graph)
    decisions = [_decide(s, graph, chosen, globs, keep_stem, keep_head) for s in graph.ordered()]
    if isinstance(chosen, frozenset):
        refused = [d for d in decisions if d.name in chosen and not d.selected]
        if refused:
            raise ValueError(f'select names {len(refused)} conv(s) that cannot be converted: '
                             + '; '.join(f'{d.name} ({d.type} {d.shape}: {d.reason})' for d in refused[:5]))
        label = f'[{len(chosen)} names]'
    else:
        label = repr(select) if rules else getattr(select, '__name__', 'callable')
    notes = [graph.note] if graph.note else []
    unused = [g for g in globs if not any(fnmatch.fnmatchcase(d.name, g) for d in decisions)]
    if unused:
        notes.append(f'exclude globs that matched no conv: {", ".join(map(repr, unused))}')
    return Plan(kind, label, decisions, traced=graph.traced, notes=notes, stem=graph.stem, head=graph.head,
                num_linear=graph.num_linear)
