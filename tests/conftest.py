import os

import pytest
import torch
from torch import nn

# One intra-op thread in every test process (each pytest-xdist worker, see setup.cfg) and in the tools it starts:
# the models here are small, and two workers on two cores with OpenMP's spinning threads each slow everything
# down (measured: tests/test_timm.py 100 s with two threads, 39 s with one, on the busy 2-core machine).
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module of small models: on a busy 2-core machine OpenMP's spinning threads slow
    them down ~50x (``pytestmark = pytest.mark.usefixtures('one_thread')``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CLIResult:
    """What a run of the ``mdplug`` command gave: ``returncode``, ``stdout``, ``stderr`` (as a subprocess's)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def mdplug_cli(capfd):
    """``mdplug_cli('convert', ...)``: the ``mdplug`` command run in this process through ``mdplug.cli.main``
    (exit status as ``main`` returns it or argparse exits with it; what reached file descriptors 1 and 2, native
    writes included). Saves the ~5 s import of torch, timm and mmengine of a subprocess per call; the console
    script itself is run as a subprocess by tests/test_cli.py."""
    from mdplug.cli import main

    def run(*args):
        capfd.readouterr()  # only this call's output
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help (0) and bad arguments (2)
            code = 0 if e.code is None else e.code
        out, err = capfd.readouterr()
        return CLIResult(code, out, err)

    return run
