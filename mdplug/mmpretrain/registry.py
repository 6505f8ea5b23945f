"""The ``mdplug`` scope of mmengine's registry tree.

``MODELS`` is a child of mmengine's root ``MODELS`` with scope ``mdplug``, so a config in any scope (mmpretrain's
included) can name ``type='mdplug.Converted'``: mmengine resolves the ``mdplug.`` prefix through the root's children.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mdplug')
