"""Shared helpers for the conversion tests: build real timm/torchvision models with random weights."""
import torch
from torch import nn

from mdplug.convert.check import calibrate_bn, first_tensor  # noqa: F401 - used by the tests
from mdplug.convert.checkpoint import build_model

SMALL = (3, 64, 64)


def build(name, **kw):
    torch.manual_seed(0)
    return build_model(name, **kw)


def small_input(batch=2, size=SMALL, seed=0):
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def relative_diff(a, b):
    a, b = first_tensor(a), first_tensor(b)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def exact_convs(model):
    return {n for n, m in model.named_modules() if type(m) is nn.Conv2d}
