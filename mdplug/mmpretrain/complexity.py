"""mmengine's FLOP counter (``get_model_complexity_info``, ``FlopAnalyzer``) for the ops of the compact layers.

mmengine's jit handles count one multiply-add as one "flop", as :mod:`mdplug.profile` counts MACs, but know no
``aten::baddbmm`` / ``aten::addbmm``: the per-sample products of compact MDConv / DCD / DYConv / SE
(``W(x) · x + b(x)``, Eq. 6–7) were skipped, so a compact dynamic model looked cheaper than the static one.
Importing :mod:`mdplug.mmpretrain` adds the handles to mmengine's default tables.

mmengine counts a ``torch.jit`` trace of the model. While a trace runs, the layers take the batch-agnostic
executions they keep for export (:func:`~mdplug.nn._common.tracing_for_export`), which at batch 1 are not the
cheaper ones that run eagerly; the counter's trace (which is only counted, never run) therefore sees the layers'
eager executions, so it counts what :func:`mdplug.profile.count_macs` counts.
"""
import functools
import sys
from contextlib import contextmanager
from typing import Any, List

from mmengine.analysis import complexity_analysis, jit_analysis
from mmengine.analysis.jit_handles import generic_activation_jit, get_shape

from mdplug.nn import _common


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(input, A, B)`` with A (b, n, m), B (b, m, p): b·n·m·p multiply-adds (the added input is free)."""
    (b, n, m), p = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return b * n * m * p


def addbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``addbmm(input, A, B)``: the same products as :func:`baddbmm_flop_jit`, summed over the batch."""
    return baddbmm_flop_jit(inputs, outputs)


FLOP_HANDLES = {'aten::baddbmm': baddbmm_flop_jit, 'aten::addbmm': addbmm_flop_jit}
ACTIVATION_HANDLES = {'aten::baddbmm': generic_activation_jit(), 'aten::addbmm': generic_activation_jit()}


def _not_tracing() -> bool:
    return False


@contextmanager
def eager_layer_executions():
    """Within: mdplug's layers run as they run eagerly even under ``torch.jit`` tracing (for counting only)."""
    original = _common.tracing_for_export
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith('mdplug.') and getattr(m, 'tracing_for_export', None) is original]
    for module in patched:
        module.tracing_for_export = _not_tracing
    try:
        yield
    finally:
        for module in patched:
            module.tracing_for_export = original


def _counting_trace(trace):
    @functools.wraps(trace)
    def counting_trace(*args, **kwargs):
        with eager_layer_executions():
            return trace(*args, **kwargs)
    counting_trace.mdplug_eager = True
    return counting_trace


def register_complexity_handles() -> None:
    """Add the handles to mmengine's default tables (every ``FlopAnalyzer`` built later uses them) and let its
    trace see the layers' eager executions; idempotent."""
    for table, handles in ((complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS, FLOP_HANDLES),
                           (complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS, ACTIVATION_HANDLES)):
        for op, handle in handles.items():
            table.setdefault(op, handle)
    if not getattr(jit_analysis._get_scoped_trace_graph, 'mdplug_eager', False):
        jit_analysis._get_scoped_trace_graph = _counting_trace(jit_analysis._get_scoped_trace_graph)


register_complexity_handles()
