"""``--amp`` without CUDA: an optimizer wrapper that runs forward and loss under CPU bfloat16 autocast.

mmengine's ``AmpOptimWrapper`` refuses to start without a GPU (it is built around ``torch.cuda.amp``'s loss
scaling).  bfloat16 has float32's exponent range, so no loss scaling is needed; everything else is the plain
``OptimWrapper``.
"""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` also enables ``torch.autocast('cpu', dtype)`` (bfloat16)."""

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        super().__init__(**kwargs)
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f"CPUAmpOptimWrapper: dtype={dtype!r}; CPU autocast takes 'bfloat16' or 'float16'")
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
