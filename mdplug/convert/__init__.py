"""The conversion pass: find the convs of any model with torch.fx, swap in mdplug layers, compact them.

``plan`` (dry run) → ``convert`` (expanding form, for training) → ``compact`` (inference form);
``load`` rebuilds a model from a checkpoint written by the ``mdplug`` CLI or :func:`save`.

This package is itself callable: ``mdplug.convert(model, ...)`` is :func:`convert`, while ``mdplug.convert.passes``
and friends stay importable (a plain ``from .convert import convert`` in ``mdplug/__init__`` would hide them).
"""
import sys
import types

from mdplug.convert.checkpoint import build_model, load, save
from mdplug.convert.passes import NothingToConvert, compact, convert
from mdplug.convert.planner import Decision, Plan, plan

__all__ = ['plan', 'convert', 'compact', 'load', 'save', 'build_model', 'Plan', 'Decision', 'NothingToConvert']


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
