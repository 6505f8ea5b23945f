"""The conversion pass: find the convs of any model with torch.fx, swap in mdplug layers, compact them.

``plan`` (dry run) → ``convert`` (expanding form, for training) → ``compact`` (inference form);
``load`` rebuilds a model from a checkpoint written by the ``mdplug`` CLI or :func:`save`.
"""
from mdplug.convert.checkpoint import build_model, load, save
from mdplug.convert.passes import NothingToConvert, compact, convert
from mdplug.convert.plan import Decision, Plan, plan

__all__ = ['plan', 'convert', 'compact', 'load', 'save', 'build_model', 'Plan', 'Decision', 'NothingToConvert']
