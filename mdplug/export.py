"""Export the compact (inference) form: ONNX with a dynamic batch axis, and ``torch.export`` programs.

The compact MDConv runs per-sample kernels; for k×k kernels eager mode may use a grouped conv with groups=B,
which would bake the batch size into a graph.  While tracing for export the layers take a batch-agnostic
execution of the same function instead (``MultiLayerConv.compact_path``), so one exported file serves every
batch size.  A compact MAConv is a plain ``nn.Conv2d`` and exports as one.

    >>> model = mdplug.convert(timm.create_model('mobilenetv2_100'), kind='mdconv')   # ... train ...
    >>> export_onnx(model, 'mdconv.onnx')            # compacts a copy first
    >>> check_onnx('mdconv.onnx', model)             # {1: rel_err, 3: ..., 16: ...}
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['prepare', 'export_onnx', 'check_onnx', 'export_program', 'export_model', 'onnx_op_counts', 'DEFAULT_OPSET']

DEFAULT_OPSET = 17
INPUT, OUTPUT = 'input', 'output'


def _has_expanding(model: nn.Module) -> bool:
    from mdplug.nn import MDPLUG_LAYERS
    return any(isinstance(m, MDPLUG_LAYERS) and not m.deploy for m in model.modules())


def prepare(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in compact form (``mdplug.compact`` when it holds expanding layers)."""
    model = copy.deepcopy(model).eval()
    if _has_expanding(model):
        from mdplug.convert import compact
        compact(model)
    return model.eval()


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_size:
        return tuple(int(s) for s in input_size)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size') if isinstance(cfg, dict) else None
    return tuple(size) if size else (3, 224, 224)


def _first_output(y):
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return _first_output(next(iter(y.values())))
    return _first_output(y[0])


def export_onnx(model: nn.Module, path: str, input_size: Optional[Sequence[int]] = None,
                opset: int = DEFAULT_OPSET, example_batch: int = 2, compact: bool = True) -> str:
    """Write ``model``'s compact form to ``path`` as ONNX with input ``'input'`` (batch, *input_size) and output
    ``'output'``, the batch axis dynamic.

    ``input_size``: (C, H, W) without the batch (default: the model's ``pretrained_cfg`` or 3×224×224).
    ``compact=False`` exports ``model`` as it is (still on a copy, in eval mode).  Uses the TorchScript-based
    exporter (``dynamo=False``), which needs only ``onnx``.  Returns ``path``.
    """
    model = prepare(model) if compact else copy.deepcopy(model).eval()
    x = torch.randn(example_batch, *_input_size(model, input_size))
    with warnings.catch_warnings(), torch.no_grad():
        # the path choice reads the (static) spatial size at trace time, which is what it should do
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=FutureWarning)
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: 'batch'}, OUTPUT: {0: 'batch'}},
                          do_constant_folding=True)
    return path


def check_onnx(path: str, model: nn.Module, batch_sizes: Sequence[int] = (1, 3, 16),
               input_size: Optional[Sequence[int]] = None, seed: int = 0) -> Dict[int, float]:
    """Run the ONNX file with onnxruntime at each batch size and compare with ``model``'s compact form in
    PyTorch: returns ``{batch: max |Δ| / max |y|}``."""
    import onnxruntime as ort
    ref = prepare(model)
    size = _input_size(ref, input_size)
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(seed)
    errors = {}
    for b in batch_sizes:
        x = torch.randn(b, *size, generator=g)
        with torch.no_grad():
            want = _first_output(ref(x)).float()
        got = torch.from_numpy(sess.run(None, {INPUT: x.numpy()})[0]).float()
        if got.shape != want.shape:
            raise ValueError(f'{path}: onnxruntime gave shape {tuple(got.shape)} at batch {b}, PyTorch '
                             f'{tuple(want.shape)}')
        errors[b] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return errors


def export_program(model: nn.Module, input_size: Optional[Sequence[int]] = None, example_batch: int = 2,
                   max_batch: int = 4096, compact: bool = True) -> 'torch.export.ExportedProgram':
    """``torch.export.export`` of the compact form with a dynamic batch dimension (2 ≤ batch ≤ ``max_batch``
    at export; the program also runs at batch 1)."""
    model = prepare(model) if compact else copy.deepcopy(model).eval()
    x = torch.randn(example_batch, *_input_size(model, input_size))
    batch = torch.export.Dim('batch', min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


def export_model(name: str, kind: str, onnx_path: str, select: Optional[str] = None,
                 input_size: Optional[Sequence[int]] = None, checkpoint: Optional[str] = None,
                 check_batches: Sequence[int] = (1, 3, 16), opset: int = DEFAULT_OPSET, **layer_kwargs) -> dict:
    """Build model ``name``, convert it to ``kind`` (or load an mdplug ``checkpoint``), export its compact form
    to ``onnx_path`` and check it with onnxruntime at ``check_batches``.  What ``mdplug export`` runs.
    With a ``checkpoint``, ``name`` and ``kind`` are the checkpoint's; a model that already holds mdplug layers is
    exported as it is (compacted), not converted again.

    Returns ``dict(model, kind, onnx, input_size, rel_err={batch: err}, ops={op_type: count}, notes)``.
    """
    from mdplug.convert import convert
    from mdplug.convert.checkpoint import build_model, load, read
    notes = []
    if checkpoint:
        meta = read(checkpoint)['meta']
        name, kind = meta['model'], meta['kind']
        model = load(checkpoint)
    else:
        model = build_model(name).eval()
        held = [m for m in model.modules() if _is_mdplug(m)]
        if held:  # a timm *_mdconv entry point, a config with mdplug layers: export it as it is
            from mdplug.convert._layers import kind_of
            kind = '+'.join(sorted({kind_of(m) for m in held}))
            notes.append(f'{name} already holds {len(held)} mdplug layers: exported their compact form, nothing '
                         f'converted')
        else:
            # random weights: 'fresh' keeps every branch live, so the onnxruntime check sees the dynamic paths work
            convert(model, kind=kind, select=select or 'pointwise', init='fresh', **layer_kwargs)
    size = _input_size(model, input_size)
    export_onnx(model, onnx_path, size, opset=opset)
    errors = check_onnx(onnx_path, model, check_batches, size) if check_batches else {}
    return dict(model=name, kind=kind, onnx=onnx_path, input_size=list(size), rel_err=errors,
                ops=onnx_op_counts(onnx_path), notes=notes)


def _is_mdplug(m: nn.Module) -> bool:
    from mdplug.nn import MDPLUG_LAYERS
    return isinstance(m, MDPLUG_LAYERS)


def onnx_op_counts(path: str) -> Dict[str, int]:
    """How many nodes of each op type the ONNX graph has (e.g. to see that MAConv exported as plain Conv)."""
    import onnx
    counts: Dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
