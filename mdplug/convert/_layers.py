"""Late access to the layer classes of :mod:`mdplug.nn` (imported on first use, not at import time)."""
from __future__ import annotations

import inspect
from typing import Dict, FrozenSet, Tuple, Type

from torch import nn


def layers() -> Dict[str, Type[nn.Module]]:
    """``{'mdconv': MDConv2d, 'maconv': MAConv2d, ...}``."""
    from mdplug.nn import LAYERS
    return dict(LAYERS)


def mdplug_layer_types() -> Tuple[type, ...]:
    try:
        from mdplug.nn import MDPLUG_LAYERS
    except (ImportError, AttributeError):
        return ()
    return tuple(MDPLUG_LAYERS)


def layer_class(kind: str) -> Type[nn.Module]:
    known = layers()
    if kind not in known:
        raise ValueError(f'unknown kind {kind!r}; choose one of {", ".join(sorted(known))}')
    return known[kind]


def layer_keywords(kind: str) -> FrozenSet[str]:
    """The keyword arguments the layer of ``kind`` takes beyond ``nn.Conv2d``'s."""
    sig = inspect.signature(layer_class(kind).__init__)
    conv = set(inspect.signature(nn.Conv2d.__init__).parameters)
    return frozenset(n for n, p in sig.parameters.items()
                     if n not in conv and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def kind_of(layer: nn.Module) -> str:
    for kind, cls in layers().items():
        if type(layer) is cls:
            return kind
    raise ValueError(f'{type(layer).__name__} is not an mdplug layer')
