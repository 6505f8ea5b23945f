"""The paper's layers (MAConv, MDConv) and its baselines (DYConv, DCD, SE), each a drop-in for ``nn.Conv2d``."""
from ._common import Attention
from .dcd import DCDConv2d
from .dyconv import DYConv2d
from .maconv import MAConv2d
from .mdconv import MDConv2d
from .seconv import SEConv2d
from ._state import CheckpointFormError, accept as accept_loaded

#: kind name (as used by :func:`mdplug.convert`, configs and the CLI) -> layer class
LAYERS = {
    'mdconv': MDConv2d,
    'maconv': MAConv2d,
    'dyconv': DYConv2d,
    'dcd': DCDConv2d,
    'se': SEConv2d,
}
MDPLUG_LAYERS = tuple(LAYERS.values())

__all__ = ['Attention', 'DCDConv2d', 'DYConv2d', 'MAConv2d', 'MDConv2d', 'SEConv2d', 'LAYERS', 'MDPLUG_LAYERS',
           'CheckpointFormError', 'accept_loaded']
