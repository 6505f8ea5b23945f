"""Parameters and multiply-accumulates (MACs) of a model, counted by running it.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, linear layers, whatever
actually executes, including a compact MDConv's per-sample weight generation and its attention network) and are
reported as FLOPs / 2, the multiply-adds the paper's tables call "FLOPs". Element-wise work (BN, activations,
the broadcast multiply by the attention) is not counted, as in the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_macs', 'profile']


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once); buffers such as BN running statistics are not counted."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch: int = 1) -> int:
    """Multiply-accumulates per sample of one eval-mode forward pass on a random ``batch × input_size`` input."""
    p = next(iter(model.parameters()), None)
    kw = dict(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else {}
    x = torch.randn(batch, *input_size, **kw)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, t in flags.items():
            m.training = t
    return counter.get_total_flops() // 2 // batch


def profile(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict:
    """``{'params': int, 'macs': int}``."""
    return dict(params=count_params(model), macs=count_macs(model, input_size))
