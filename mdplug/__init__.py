"""mdplug: multi-layer dynamic (MDConv) and asymmetric (MAConv) convolutions for existing PyTorch models.

Reference implementation of Luo & Zhan, "Multi-layer dynamic and asymmetric convolutions" (2022).
"""
__version__ = '0.1.0'

from . import fusion, nn  # noqa: F401
from .nn import DCDConv2d, DYConv2d, LAYERS, MAConv2d, MDConv2d, SEConv2d  # noqa: F401
# after loading a compact checkpoint into a training model and building the optimizer: allow its training steps
from .nn import CheckpointFormError, accept_loaded  # noqa: F401
# the conversion pass; the package ``mdplug.convert`` is callable: ``mdplug.convert(model, ...)``
from . import convert  # noqa: F401,E402
from .convert import compact, load, plan  # noqa: F401,E402
from . import timm as _timm_entry_points  # noqa: F401,E402 - registers mobilenetv2_100_mdconv, ... with timm
