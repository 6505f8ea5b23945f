"""The equivalence check: a converted model's compact form computes what its expanding form computes in eval mode."""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

TOLERANCE = 1e-4
"""Whole-model equivalence: relative max |Δ| between the expanding model (eval) and its compact form, in float32.
Single layers are exact to 1e-5 (the layer tests); through a whole model float32 rounding adds up, and a deep
random-weight net's own float32 noise (``float32_noise``) reaches ~1e-4, so 1e-4 is the whole-model bound and a
larger difference is re-checked in float64."""

__all__ = ['TOLERANCE', 'calibrate_bn', 'calibration_batch', 'equivalence', 'float32_noise', 'first_tensor']


def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibration_batch(x: torch.Tensor, seed: int = 0, images: Optional[int] = None) -> torch.Tensor:
    """``x`` followed by random N(0, 1) images of its shape, ``images`` in all; by default enough that a feature
    map downsampled 32× still gives about 128 values per channel (32 images at 64×64, 8 at 224×224 and above)."""
    if images is None:
        area = x[0, 0].numel() if x.dim() > 2 else 1
        images = max(8, min(32, math.ceil(2 ** 17 / area)))
    extra = max(0, images - x.shape[0])
    fresh = torch.randn((extra, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x)
    return torch.cat([x, fresh])


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor, seed: int = 0, images: Optional[int] = None) -> nn.Module:
    """Give every BatchNorm moderate random affine parameters and running statistics calibrated on ``x``.

    Affine weight ~ U(0.8, 1.2), bias ~ N(0, 0.1): moderate, but not the identity. The running statistics are
    then *calibrated* on ``x`` plus random images of its shape (:func:`calibration_batch`, ``images`` in all):
    one forward pass in eval mode in which each BN, just before it runs, takes the mean and variance of the
    input it receives. BNs run in execution order, so each one is measured on what the already calibrated BNs
    before it produce in eval mode, the mode the equivalence check compares; on ``x`` every BN output is then
    normalised and activations stay O(1) through any depth, as in a trained net. Dead channels (variance ≈ 0)
    get a variance floor of 5 % of the layer's mean, so no BN is a ×300 amplifier of rounding noise. A BN the
    pass does not reach, or all of them when the model fails on the batch, keep default statistics (mean 0,
    variance 1). The training flags of all modules are kept.

    Why this and not the alternatives: arbitrary (or measured-then-perturbed) statistics compound through a
    deep random net to activations of 1e5 and more; statistics averaged from train-mode batch statistics differ
    from what eval mode then feeds each BN, by an error that also compounds with depth; and in a random net BN
    statistics generalise poorly, so images outside the calibration batch drift the same way (hence ``x`` is
    part of it), while a batch of only ``x`` makes late BNs (a few values per channel) nearly degenerate. All
    three made float32 rounding of two mathematically equal forms differ by more than 1e-4 relative.
    """
    inputs = calibration_batch(x, seed + 1, images)
    g = torch.Generator().manual_seed(seed)
    bns = _bns(model)
    for bn in bns:
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) * 0.4 + 0.8)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
    tracked = [bn for bn in bns if bn.running_mean is not None]
    if not tracked:
        return model
    for bn in tracked:
        bn.reset_running_stats()
    done = set()

    def measure(bn, args):
        if bn in done or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            return
        t = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).to(bn.running_mean.dtype)
        if t.shape[1] < 2:
            return
        var = t.var(1, unbiased=False)
        bn.running_mean.copy_(t.mean(1))
        bn.running_var.copy_(var.clamp_min(0.05 * float(var.mean().clamp_min(1e-3))))
        done.add(bn)

    handles = [bn.register_forward_pre_hook(measure) for bn in tracked]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(inputs)
    except Exception:  # noqa: BLE001 - a model that cannot run on the calibration batch keeps default statistics
        for bn in tracked:
            bn.reset_running_stats()
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
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
    """Compare a copy of the expanding ``model`` (eval) with its compact form on ``batch`` random inputs.

    The copy's BNs are first calibrated (:func:`calibrate_bn`) on those inputs plus more random images.
    Returns ``max_abs_diff`` and ``max_abs_out`` (max |y| of the expanding output; the callers report their
    ratio as the relative error), the compacted copy as ``compact``, the names whose bias was folded into a BN
    as ``folded`` and the notes on kept biases as ``notes``. ``model`` itself is not changed.
    """
    from mdplug.convert.passes import compact_with_notes
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point():
        x = x.to(p)
    probe = copy.deepcopy(model)
    calibrate_bn(probe, x, seed + 1)
    probe.eval()
    expanding = first_tensor(probe(x))
    probe, folded, notes = compact_with_notes(probe)
    compact = first_tensor(probe(x))
    return dict(max_abs_diff=float((expanding - compact).abs().max()), max_abs_out=float(expanding.abs().max()),
                compact=probe, folded=folded, notes=notes)


@torch.no_grad()
def float32_noise(model: nn.Module, input_size: Sequence[int], seed: int = 0, batch: int = 2) -> float:
    """How far the expanding ``model`` in float32 is from itself in float64: max |y32 - y64| / max |y64|.

    The same inputs and BN calibration as :func:`equivalence`, done in float64, then the model is cast to
    float32. This is the rounding noise the model has without any conversion step: a compact-vs-expanding
    difference of this size in float32 that vanishes in float64 is rounding, not a conversion error.
    """
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed)).double()
    p = next(iter(model.parameters()), None)
    if p is not None:
        x = x.to(p.device)
    probe = copy.deepcopy(model).double()
    calibrate_bn(probe, x, seed + 1)
    probe.eval()
    y64 = first_tensor(probe(x))
    y32 = first_tensor(probe.float()(x.float())).double()
    return float((y32 - y64).abs().max() / y64.abs().max().clamp_min(1e-300))
