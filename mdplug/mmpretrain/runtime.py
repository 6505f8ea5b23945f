"""What ``tools/*.py`` share: config fix-ups, CPU distributed set-up, checkpoint loading, deployment.

Kept here (not in the tools) so the tools stay thin and the pieces are testable.
"""
import copy
import os.path as osp

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine.logging import HistoryBuffer


from .layers import LAYER_TYPES
from .transform import CONVERTED, compact_classifier, unwrap_converted

DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


# --------------------------------------------------------------------------------------------------- checkpoints
def allow_mmengine_checkpoints():
    """Allow-list the few non-tensor globals of mmengine checkpoints for ``torch.load(weights_only=True)``.

    Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``; mmengine 0.10.7 calls it without the
    argument, so ``--resume`` and ``tools/test.py`` fail on mmengine's own checkpoints: their ``message_hub``
    holds ``HistoryBuffer`` objects of numpy arrays and scalars (``numpy.dtypes.*DType``), and a
    ``HistoryBuffer`` pickles its statistics methods as ``getattr(buffer, 'min')``. Allow-listing exactly these
    keeps the restricted unpickler (it still calls no other global) instead of turning ``weights_only`` off.
    """
    multiarray = (getattr(np, '_core', None) or np.core).multiarray
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    torch.serialization.add_safe_globals(
        [HistoryBuffer, np.ndarray, np.dtype, *dtype_classes, multiarray._reconstruct, multiarray.scalar, getattr])


def read_checkpoint(path):
    """``(state_dict, meta)`` of an mmengine checkpoint (or of a bare state dict), without DDP's ``module.``."""
    from mmengine.runner.checkpoint import _load_checkpoint

    allow_mmengine_checkpoints()
    checkpoint = _load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}, meta


def load_state_dict(path):
    """The ``state_dict`` of an mmengine checkpoint (or of a bare state dict), without DDP's ``module.`` prefix."""
    return read_checkpoint(path)[0]


#: the forms a checkpoint of a config can hold (``meta['mdplug_form']`` of ``tools/deploy.py``, else its keys)
FORMS = ('expanding', 'compact', 'static')


def checkpoint_form(state, meta=None):
    """``'compact'``, ``'static'`` (``tools/deploy.py``'s MAConv output) or ``'expanding'``, or None when the keys
    do not tell (a static model, or DYConv / SE, whose two forms have the same keys).

    ``meta['mdplug_form']`` decides when present; otherwise compact MDConv / DCD layers hold ``weight1`` and
    expanding MDConv / MAConv / DCD layers ``expand.weight`` (mmpretrain's ``reparameterize_model.py`` keeps the
    training checkpoint's meta).
    """
    form = (meta or {}).get('mdplug_form')
    if form in FORMS:
        return form
    if any(k.endswith('.weight1') for k in state):
        return 'compact'
    if any(k.endswith('.expand.weight') for k in state):
        return 'expanding'
    return None


def load_strictly(model: nn.Module, state: dict, checkpoint: str, config: str, hint: str = ''):
    """Load ``state`` into ``model``; a checkpoint of another model fails with the keys that differ.

    mdplug layers adopt the checkpoint's form while loading (:mod:`mdplug.nn._state`): an expanding model takes a
    compact checkpoint and becomes the compact model. ``hint`` ends the error message.
    """
    from mdplug.nn._state import CheckpointFormError

    head = f'{checkpoint} is not a checkpoint of the model of {config}:'
    tail = f'\n  {hint}' if hint else ''
    try:
        result = model.load_state_dict(state, strict=False)
    except CheckpointFormError as e:
        raise ValueError(f'{head}\n  {e}{tail}') from e
    except RuntimeError as e:  # shape mismatches
        lines = [line.strip() for line in str(e).splitlines() if 'size mismatch' in line]
        shown = '\n    '.join(lines[:5]) + ('\n    ...' if len(lines) > 5 else '')
        raise ValueError(f'{head}\n  {len(lines)} shape mismatches:\n    {shown}{tail}') from e
    if result.missing_keys or result.unexpected_keys:
        lines = [head]
        for title, keys in (('missing keys', result.missing_keys), ('unexpected keys', result.unexpected_keys)):
            if keys:
                shown = ', '.join(keys[:5]) + (', ...' if len(keys) > 5 else '')
                lines.append(f'  {len(keys)} {title}: {shown}')
        raise ValueError('\n'.join(lines) + tail)


# --------------------------------------------------------------------------------------------------- configs
def dataset_cfgs(cfg):
    """Yield every (innermost) dataset config of the config's dataloaders, through wrappers such as
    ``PerClassSubset``."""
    for key in DATALOADERS:
        loader = cfg.get(key)
        if not loader:
            continue
        dataset = loader['dataset']
        while 'dataset' in dataset:
            dataset = dataset['dataset']
        yield key, dataset


def set_data_root(cfg, data_root):
    """Point every dataloader's dataset at ``data_root`` (what ``--data-root`` does)."""
    for _, dataset in dataset_cfgs(cfg):
        dataset['data_root'] = data_root


def check_data_roots(cfg, keys=DATALOADERS):
    """Fail early, naming the option to set, when a dataloader's ``data_root`` does not exist."""
    for key, dataset in dataset_cfgs(cfg):
        if key not in keys:
            continue
        root = dataset.get('data_root')
        if not root or not osp.isdir(root):
            raise FileNotFoundError(
                f'{key}: data_root {root!r} of dataset {dataset.get("type")!r} does not exist; pass '
                f'--data-root DIR (all dataloaders) or --cfg-options {key}.dataset.data_root=DIR')


def fix_dataloaders(cfg):
    """``persistent_workers`` needs worker processes: turn it off for ``num_workers=0`` loaders."""
    for key in DATALOADERS:
        loader = cfg.get(key)
        if loader and loader.get('num_workers', 0) == 0:
            loader['persistent_workers'] = False


def apply_common_args(cfg, args):
    """What ``tools/train.py`` and ``tools/test.py`` both take: ``--launcher``, ``--cfg-options``, ``--data-root``,
    ``--work-dir`` (default ``work_dirs/<config name>``)."""
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.data_root:
        set_data_root(cfg, args.data_root)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(args.config))[0])


def setup_distributed(cfg, launcher):
    """Run a ``--launcher pytorch`` job on CPU processes with gloo when there is no CUDA device.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and wraps the model with ``device_ids=[LOCAL_RANK]``;
    on CPU we start the gloo process group ourselves (torchrun's environment) and wrap without device ids.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    cfg.env_cfg.setdefault('dist_cfg', {})['backend'] = 'gloo'
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel', broadcast_buffers=False)
    wrapper['device_ids'] = None
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def teardown_distributed():
    """End a multi-process job cleanly: wait for every rank, then destroy the process group.

    Without this a gloo rank can exit while the group's threads still run, and the C++ runtime aborts the
    process ('terminate called without an active exception', SIGABRT) after the work itself succeeded.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        if not torch.cuda.is_available():
            # CPU/gloo ranks still abort now and then while the interpreter shuts down (C++ 'terminate called
            # without an active exception') after all work is done: flush what the run wrote and leave directly
            import logging
            import os
            import sys
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def set_trained_temperature(model, cfg):
    """Give ``model`` the softmax temperature its training ended with: ``TemperatureAnnealHook``'s ``end``.

    For checkpoints written before the temperature became a buffer of the layers (``attention.temperature``, saved
    with the weights): they do not carry it, and a model built from the config starts at the layers' initial
    temperature (DYConv: 30) -- evaluating a trained DYConv there gives near-chance accuracy. Returns how many layers were set (0 when the config has no such hook). A
    checkpoint saved before the annealing finished is evaluated at ``end`` too.
    """
    from .hooks import TemperatureAnnealHook

    hooks = [h for h in cfg.get('custom_hooks') or [] if str(h.get('type', '')).endswith('TemperatureAnnealHook')]
    if not hooks:
        return 0
    return TemperatureAnnealHook.set_temperature(model, float(hooks[-1].get('end', 1.0)))


SHAPE_FIX = ('set input_shape=(C, H, W) at the top of the config (or in its mdplug.Converted backbone), or pass '
             '--shape')


#: transform type -> (its size key, whether a pair is (w, h)) of the transforms that fix the image size
SIZING = {'CenterCrop': ('crop_size', True), 'Resize': ('scale', True), 'RandomCrop': ('crop_size', False),
          'RandomResizedCrop': ('scale', False), 'CenterPad': ('size', False), 'ResizeEdge': (None, False)}


def _pipeline_size(pipeline):
    """``(H, W)`` the last sizing transform of a test pipeline gives, else None."""
    size = None
    for t in pipeline or []:
        key, wh = SIZING.get(t.get('type'), ('', False))
        if key is None:  # ResizeEdge: the other side depends on the image
            size = None
        elif key and t.get(key) is not None:
            value = t[key]
            size = (value, value) if isinstance(value, int) else (value[1], value[0]) if wh else tuple(value)
    return size


def input_shape_and_source(cfg):
    """``((C, H, W), where)`` of the images the config's model reads, or ValueError naming the options.

    In order: the ``input_shape`` of an ``mdplug.Converted`` backbone, the config's top-level ``input_shape``
    (the dataset base configs of ``configs/`` set it), or the test pipeline's last crop / resize / pad with the
    channels of the data preprocessor's ``mean``.
    """
    backbone = cfg.model.get('backbone') if isinstance(cfg.model, dict) else None
    if isinstance(backbone, dict) and backbone.get('type') == CONVERTED and backbone.get('input_shape'):
        return tuple(backbone['input_shape']), 'model.backbone.input_shape (mdplug.Converted)'
    if cfg.get('input_shape'):
        return tuple(cfg.input_shape), 'input_shape of the config'
    preprocessor = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader') or {}
    dataset = loader.get('dataset') or {}
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    size = _pipeline_size(dataset.get('pipeline'))
    if size is not None and preprocessor.get('mean') is not None:
        return (len(preprocessor['mean']), *size), 'the test pipeline and data_preprocessor.mean'
    raise ValueError(f'the input shape of the model cannot be told from the config (no input_shape, and no fixed '
                     f'crop size in the test pipeline with a data_preprocessor mean); {SHAPE_FIX}')


def input_shape(cfg):
    """``(C, H, W)`` of the config's images (:func:`input_shape_and_source`)."""
    return input_shape_and_source(cfg)[0]


def check_input_shape(model, shape, where, config):
    """Run ``model`` once on a ``shape`` input; an input it cannot take is an error naming the shape's source."""
    with torch.no_grad():
        try:
            model(torch.zeros(1, *shape))
        except RuntimeError as e:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d) or isinstance(m, LAYER_TYPES)),
                         None)
            expects = f' (its first conv takes {first.in_channels} channels)' if first is not None else ''
            raise ValueError(f'{config}: the model{expects} does not run on a {"x".join(map(str, shape))} input '
                             f'(from {where}): {" ".join(str(e).split())[:200]}; {SHAPE_FIX}') from e


# --------------------------------------------------------------------------------------------------- models
def build_model(cfg):
    """Build ``cfg.model`` in mmpretrain's scope."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    return MODELS.build(copy.deepcopy(cfg.model))


def has_mdplug_layers(model):
    return any(isinstance(m, LAYER_TYPES) for m in model.modules())


def is_converted(cfg):
    return any(isinstance(cfg.model.get(k), dict) and cfg.model[k].get('type') == CONVERTED
               for k in ('backbone', 'neck', 'head'))


def deploy(cfg, config_path, checkpoint):
    """Load ``checkpoint`` into ``cfg``'s model and re-parameterise it; returns ``(expanding, deployed, static)``.

    ``deployed`` is :func:`mdplug.compact` of the model (part by part, :func:`compact_classifier`). When it has no
    mdplug layer left (MAConv) and the config converts a backbone, ``static`` is the *static* config's model
    (``mdplug.Converted`` unwrapped) holding the compact weights (each fused bias folded into the BN that follows);
    otherwise ``static`` is None.
    """
    expanding = build_model(cfg)
    load_strictly(expanding, load_state_dict(checkpoint), checkpoint, config_path)
    expanding.eval()
    deployed = compact_classifier(copy.deepcopy(expanding)).eval()
    static = None
    if is_converted(cfg) and not has_mdplug_layers(deployed):
        static_cfg = copy.deepcopy(cfg)
        static_cfg.model = unwrap_converted(cfg.model)
        static = build_model(static_cfg).eval()
        load_strictly(static, deployed.state_dict(), checkpoint + ' (compacted)', config_path + ' (static)')
    return expanding, deployed, static


def max_output_difference(a, b, inputs):
    """Largest absolute difference of the logits of two classifiers on ``inputs``."""
    with torch.no_grad():
        return (a(inputs) - b(inputs)).abs().max().item()
