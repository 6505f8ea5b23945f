"""The equivalence check: a converted model's compact form computes what its expanding form computes in eval mode."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ['randomise_bn', 'equivalence', 'first_tensor']


def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomise_bn(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every BatchNorm statistics and affine parameters like a trained model's, so the check is not trivial.

    Affine weight ~ U(0.7, 1.3), bias ~ N(0, 0.1); running statistics are first measured on ``x`` (one train-mode
    pass with a cumulative average), then perturbed (mean ± 0.1 std, variance × U(0.8, 1.25), floored at 5 % of the layer's mean variance). Measuring keeps
    activations at a realistic scale through deep residual stacks, where arbitrary statistics overflow.
    """
    g = torch.Generator().manual_seed(seed)
    bns = _bns(model)
    for bn in bns:
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) * 0.6 + 0.7)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
    tracked = [bn for bn in bns if bn.running_mean is not None]
    flags = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in tracked}
    try:
        for bn in tracked:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        model(x)
    except Exception:  # noqa: BLE001 - a model that cannot run in train mode on x keeps default statistics
        for bn in tracked:
            bn.reset_running_stats()
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        for m, t in flags.items():
            m.training = t
    for bn in tracked:
        std = bn.running_var.sqrt()
        bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=g).to(std) * 0.1 * std)
        bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=g).to(std) * 0.45 + 0.8)
        # dead channels (variance ≈ 0) would turn BN into a ×300 amplifier of float32 rounding noise
        bn.running_var.clamp_(min=0.05 * float(bn.running_var.mean().clamp_min(1e-3)))
    return model


def first_tensor(y) -> torch.Tensor:
    """The first tensor of a model output (a tensor, or a tuple / list / dict of them)."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    return first_tensor(y[0])


@torch.no_grad()
def equivalence(model: nn.Module, input_size: Sequence[int], seed: int = 0, batch: int = 2) -> dict:
    """Compare a copy of the expanding ``model`` (eval, :func:`randomise_bn`) with its compact form.

    Returns ``max_abs_diff``, ``max_abs_out``, the compacted copy as ``compact``, the names whose bias was folded
    into a BN as ``folded`` and the notes on kept biases as ``notes``. ``model`` itself is not changed.
    """
    from mdplug.convert.passes import compact_with_notes
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point():
        x = x.to(p)
    probe = copy.deepcopy(model)
    randomise_bn(probe, x, seed)
    probe.eval()
    expanding = first_tensor(probe(x))
    probe, folded, notes = compact_with_notes(probe)
    compact = first_tensor(probe(x))
    return dict(max_abs_diff=float((expanding - compact).abs().max()), max_abs_out=float(expanding.abs().max()),
                compact=probe, folded=folded, notes=notes)
