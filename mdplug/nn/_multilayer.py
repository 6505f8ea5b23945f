"""The two-branch structure MAConv, MDConv and DCD share (paper, Fig. 1 and Eq. 3/8).

Expanding form (training)::

    y = BN2(W2 · mix(BN1(W1 ⊛ x))) + BN0(W0 ⊛ x)

where ``mix`` is the identity (MAConv), a ReLU (Table 8's "ReLU" row), a diagonal attention A(x) (MDConv) or a
full dynamic matrix Φ(x) (DCD).  W0 and W1 read the same input with the same kernel geometry, so they are held as
one conv ``expand`` with q + m output channels (W0 first) and one BatchNorm over those channels; a BN normalises
each channel on its own, so this is the same function as two convs with two BNs, computed in one call.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fusion
from . import _fused, _state
from ._common import (NORMS, PATHS, ConvBase, Proxy, _check_choice, _copy_param, calls_forward, channel_matmul,
                      channel_rows, check_init, conv_bias_init_, is_channels_last, kaiming_conv_init_,
                      no_global_module_hooks, tracing_for_export)


def _counts_batches(bn: nn.Module) -> bool:
    """Calling ``bn`` runs ``nn.BatchNorm2d.forward`` in train mode with running statistics and a batch counter."""
    return (calls_forward(bn, nn.BatchNorm2d) and bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.num_batches_tracked is not None)


def _counted_batch_norm(bn: nn.BatchNorm2d, z: Tensor) -> Tensor:
    """``bn(z)`` for a BN that :func:`_counts_batches`, its counter already advanced for this batch: what
    ``nn.BatchNorm2d.forward`` does after its ``add_``."""
    if z.dim() != 4:
        raise ValueError(f'expected 4D input (got {z.dim()}D input)')
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps)


class MultiLayerConv(ConvBase):
    """Base of the multi-layer convs.  Subclasses define ``_mix`` (expanding) and the compact forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = 'zeros', *, m: int = 20,
                 bypass: bool = True, norm: str = 'branch', path: str = 'auto', deploy: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        name = type(self).__name__
        if not isinstance(m, int) or m < 1:
            raise ValueError(f'{name}: m (intermediate channels) must be an integer >= 1, got {m!r}')
        _check_choice(name, 'norm', norm, NORMS)
        _check_choice(name, 'path', path, PATHS)
        self.m = m
        self.bypass = bool(bypass)
        self.norm = norm
        self.path = path
        self.use_bias = bool(bias)
        self._factory = dict(device=device, dtype=dtype)
        if deploy:
            self._build_compact()
        else:
            self._build_expanding()

    # -- construction -------------------------------------------------------------------------------------------
    def _build_expanding(self) -> None:
        p, q, m, f = self.in_channels, self.out_channels, self.m, self._factory
        width = m + (q if self.bypass else 0)
        self.expand = nn.Conv2d(p, width, self.kernel_size, self.stride, self.padding, self.dilation, bias=False,
                                **f)
        self.project = nn.Conv2d(m, q, 1, bias=False, **f)
        if self.norm == 'branch':
            self.expand_bn = nn.BatchNorm2d(width, **f)
            self.project_bn = nn.BatchNorm2d(q, **f)
        elif self.norm == 'sum':
            self.sum_bn = nn.BatchNorm2d(q, **f)
        else:
            self.bias = nn.Parameter(torch.zeros(q, **f)) if self.use_bias else None

    def _compact_has_bias(self) -> bool:
        return self.norm != 'none' or self.use_bias

    def _build_compact(self) -> None:
        """Parameters of the compact form (Eq. 6–7): W0' and b' (bias of both branches), W1', b1', W2'."""
        p, q, m, f = self.in_channels, self.out_channels, self.m, self._factory
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(q, p, kh, kw, **f)) if self.bypass else None
        self.bias = nn.Parameter(torch.zeros(q, **f)) if self._compact_has_bias() else None
        self.weight1 = nn.Parameter(torch.empty(m, p, kh, kw, **f))
        self.bias1 = nn.Parameter(torch.zeros(m, **f)) if self.norm == 'branch' else None
        self.weight2 = nn.Parameter(torch.empty(q, m, 1, 1, **f))
        self.deploy = True
        self._reset_compact()

    def _reset_compact(self) -> None:
        for w in (self.weight, self.weight1, self.weight2):
            if w is not None:
                kaiming_conv_init_(w)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        for b in (self.bias, self.bias1):
            if b is not None:
                conv_bias_init_(b, fan_in)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a compact checkpoint switches an expanding layer to its compact form first (mdplug.nn._state)
        _state.adopt_checkpoint_form(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Re-initialise like freshly built (called by mmpretrain-style ``init_weights``)."""
        if self.deploy:
            self._reset_compact()
        else:
            for mod in self.children():
                if hasattr(mod, 'reset_parameters'):
                    mod.reset_parameters()
            if self.norm == 'none' and self.bias is not None:
                nn.init.zeros_(self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = 'preserve', output_stats: Optional[Tuple[Tensor, Tensor]] = None,
                  **kwargs) -> 'MultiLayerConv':
        """Build the layer in place of ``conv``: same geometry, device, dtype and mode; W0 starts as its kernel.

        ``init='fresh'``: everything else as freshly built (the paper's from-scratch training).
        ``init='preserve'``: the layer computes what ``conv`` did (Eq. 3 with the multi-layer branch silenced):
        the branch's last BN (``project_bn``; ``project`` itself for ``norm='sum' | 'none'``) starts at zero scale,
        so the branch adds exactly 0 in both modes; W1, W2 and A(x) are fresh, that scale gets a gradient at the
        first step and they do once it is non-zero (as with a zero-initialised last BN of a residual block); BN0
        starts as the identity in eval mode with the conv's bias as its shift.
        ``output_stats``: the running ``(mean, var)`` of the BatchNorm that reads ``conv``'s output, where there is
        one; BN0 then starts with them (``running_var = var``, ``weight = sqrt(var + eps)``, still the identity in
        eval mode), so that in train mode its batch normalisation keeps the scale the following BN expects.  In
        train mode a BN that follows cancels BN0's per-channel affine map up to its eps, so the first step's loss
        is the original's (measured in tests/test_init.py); without a following BN, BN0's batch statistics change
        the train-mode function (:func:`mdplug.convert` warns).
        """
        check_init(init)
        layer = cls(**cls._ctor_kwargs_from_conv(conv), **kwargs)
        layer.train(conv.training)
        if init == 'preserve' and not layer.bypass:
            raise ValueError(f"{cls.__name__}(bypass=False) has no static branch W0 to carry the conv's kernel, so "
                             f"init='preserve' cannot keep the conv's function; use init='fresh'")
        if layer.bypass:
            target = layer.weight if layer.deploy else layer.expand.weight[:layer.out_channels]
            _copy_param(target, conv.weight)
        if layer.norm == 'none' and conv.bias is not None and layer.bias is not None:
            _copy_param(layer.bias, conv.bias)
        if init == 'preserve':
            layer._preserve(conv.bias, output_stats)
        return layer

    @torch.no_grad()
    def _preserve(self, conv_bias: Optional[Tensor], output_stats: Optional[Tuple[Tensor, Tensor]]) -> None:
        """Silence the multi-layer branch and make BN0 the identity (eval) carrying ``conv_bias``; see from_conv."""
        q = self.out_channels
        if self.deploy:  # compact form: W2' = 0 silences the branch, b' is the conv's bias
            if getattr(self, 'weight2', None) is not None:
                nn.init.zeros_(self.weight2)
            if self.bias is not None:
                self.bias.copy_(torch.zeros_like(self.bias) if conv_bias is None else conv_bias.to(self.bias))
            return
        if self.norm == 'branch':
            nn.init.zeros_(self.project_bn.weight)
            nn.init.zeros_(self.project_bn.bias)
            bn, rows = self.expand_bn, slice(0, q)
        else:
            nn.init.zeros_(self.project.weight)
            bn, rows = (self.sum_bn, slice(0, q)) if self.norm == 'sum' else (None, None)
        if bn is None:
            return
        like = bn.running_var[rows]
        bias = torch.zeros_like(like) if conv_bias is None else conv_bias.detach().to(like)
        if output_stats is None:
            mean, var = bias, torch.full_like(like, 1.0 - bn.eps)
        else:
            mean, var = (t.detach().to(like) for t in output_stats)
        # eval: (z - (mean - bias)) / sqrt(var + eps) * sqrt(var + eps) + mean = z + bias
        bn.running_mean[rows] = mean - bias
        bn.running_var[rows] = var
        bn.weight[rows] = torch.sqrt(var + bn.eps)
        bn.bias[rows] = mean

    # -- paper notation views ------------------------------------------------------------------------------------
    @property
    def W0(self) -> Optional[Tensor]:
        """The static bypass kernel W0 (q×p×k×k), or None without bypass."""
        if self.deploy:
            return self.weight
        return self.expand.weight[:self.out_channels] if self.bypass else None

    @property
    def W1(self) -> Tensor:
        """The first kernel W1 (m×p×k×k) of the multi-layer branch."""
        return self.weight1 if self.deploy else self.expand.weight[self.expand.out_channels - self.m:]

    @property
    def W2(self) -> Tensor:
        """The pointwise kernel W2 (q×m×1×1)."""
        return self.weight2 if self.deploy else self.project.weight

    # -- folding ------------------------------------------------------------------------------------------------
    def folded_branches(self) -> Dict[str, Optional[Tensor]]:
        """BN-folded kernels and biases ``w0, b0, w1, b1, w2, b2`` (Eq. 4), the inputs of Eq. 6–7 / 10–11.

        In the compact form these are the stored parameters (``b0`` then carries both static biases).
        """
        if self.deploy:
            return dict(w0=self.weight, b0=self.bias, w1=self.weight1, b1=self.bias1, w2=self.weight2, b2=None)
        q = self.out_channels
        w = self.expand.weight
        if self.norm == 'branch':
            bn = self.expand_bn
            w, b = fusion.fold_bn(w, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            w2, b2 = fusion.fold_bn(self.project.weight, None, self.project_bn.running_mean,
                                    self.project_bn.running_var, self.project_bn.eps, self.project_bn.weight,
                                    self.project_bn.bias)
        elif self.norm == 'sum':
            # one BN after the sum: its shift goes with the multi-layer branch, its scale with both
            bn = self.sum_bn
            w2, b2 = fusion.fold_bn(self.project.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
            b = None
            if self.bypass:
                w0s, _ = fusion.fold_bn_scale(w[:q], None, bn.running_var, bn.eps, bn.weight)
                w = torch.cat([w0s, w[q:]])
        else:
            b, w2, b2 = None, self.project.weight, None
        w, w2 = w.detach(), w2.detach()
        if self.bypass:
            w0, w1 = w[:q], w[q:]
            b0, b1 = (b[:q], b[q:]) if b is not None else (None, None)
        else:
            w0, b0, w1, b1 = None, None, w, b
        if self.norm == 'none' and self.bias is not None:
            b0 = self.bias.detach()
        return dict(w0=w0, b0=b0, w1=w1, b1=b1, w2=w2, b2=b2)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fold every BN (Eq. 4) and keep W0', W1', W2' and the biases as the compact form; idempotent."""
        if self.deploy:
            return
        self._check_fusable()
        fb = self.folded_branches()
        training = self.training
        self._rebuild_compact()
        if fb['w0'] is not None:
            self.weight.copy_(fb['w0'])
        static_bias = fusion._sum_bias(fb['b0'], fb['b2'])
        if self.bias is not None:
            self.bias.copy_(static_bias if static_bias is not None else torch.zeros_like(self.bias))
        self.weight1.copy_(fb['w1'])
        if self.bias1 is not None:
            self.bias1.copy_(fb['b1'])
        self.weight2.copy_(fb['w2'])
        self.train(training)

    def _rebuild_compact(self) -> None:
        """Drop the expanding submodules and build the (uninitialised) compact parameters in their place, on the
        device and in the dtype the expanding tensors have now (the model may have moved since ``__init__``)."""
        self._factory = dict(device=self.expand.weight.device, dtype=self.expand.weight.dtype)
        for name in ('expand', 'project', 'expand_bn', 'project_bn', 'sum_bn', 'bias'):
            if hasattr(self, name):
                delattr(self, name)
        self._build_compact()

    def _check_fusable(self) -> None:
        pass

    # -- forward ------------------------------------------------------------------------------------------------
    def _mix(self, h: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    #: how ``_mix`` acts, for the fused training tail: ``'diag'`` (a (B, m) scale), ``'identity'``, or None
    #: (anything else: the plain autograd path)
    fused_mix: Optional[str] = None
    #: train-mode forward through :mod:`~mdplug.nn._fused` (1×1 layers: the whole layer in one function; others:
    #: the tail after the shared conv; same function and gradients, less memory, more but smaller ops): None
    #: (default) where it was measured to win, on the devices in ``_fused.DEVICES`` (the CPU; on CUDA plain
    #: autograd, docs/benchmarks.md); True wherever it applies; False never (plain autograd)
    fuse_training_tail: Optional[bool] = None

    def _use_fused_tail(self) -> bool:
        fuse = self.fuse_training_tail
        return ((fuse or (fuse is None and self.expand.weight.device.type in _fused.DEVICES))
                and self.fused_mix is not None and self.training and self.bypass
                and self.norm == 'branch' and torch.is_grad_enabled() and _fused.can_fuse(self.expand_bn)
                and _fused.can_fuse(self.project_bn) and not tracing_for_export())

    def forward_expanding(self, x: Tensor) -> Tensor:
        q = self.out_channels
        # the fused functions run in one dtype, float32 or float64: under autocast, plain autograd (mixed dtypes)
        if (self._use_fused_tail() and x.dtype in _fused.DTYPES and self.expand.weight.dtype == x.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            # (NCHW or channels-last: the fused functions compute in the input's layout and keep it)
            coeff = self.dynamic_coefficients(x) if self.fused_mix == 'diag' else None
            if self._is_pointwise():
                return _fused.pointwise_expanding(self._pointwise_input(x), coeff, self.expand.weight,
                                                  self.project, self.expand_bn, self.project_bn, q)
            return _fused.expanding_tail(self.expand(x), coeff, self.project, self.expand_bn, self.project_bn, q)
        return self._expanding_modules(x, self._mix)

    def _expanding_modules(self, x: Tensor, mix) -> Tensor:
        """The expanding form through its modules (Eq. 3 / 8), ``mix(h, x)`` between BN1 and W2."""
        q = self.out_channels
        z = self.expand(x)
        if self.norm == 'branch':
            bn1, bn2 = self._branch_norms(x)
            z = bn1(z)
        # split, not two slices: its backward is one cat instead of two zero-filled full-size gradients
        z0, h = z.split([q, self.m], 1) if self.bypass else (None, z)
        y = self.project(mix(h, x))
        if self.norm == 'branch':
            y = bn2(y)
        if z0 is not None:
            y = y + z0
        if self.norm == 'sum':
            y = self.sum_bn(y)
        elif self.norm == 'none' and self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def _branch_norms(self, x: Tensor):
        """BN1 and BN2 of the expanding forward as functions of their input: the modules, or, where both are
        plain train-mode ``nn.BatchNorm2d`` counting batches (the layer's own, unhooked) and nothing is traced,
        their forward as :func:`_counted_batch_norm` with both batch counters advanced here by one op
        (``torch._foreach_add_``; the modules advance each with an ``add_``: one GPU launch less per layer).
        The same function, running statistics and counters."""
        bn1, bn2 = self.expand_bn, self.project_bn
        if (isinstance(x, Proxy) or not (_counts_batches(bn1) and _counts_batches(bn2))
                or not no_global_module_hooks() or tracing_for_export()):
            return bn1, bn2
        torch._foreach_add_([bn1.num_batches_tracked, bn2.num_batches_tracked], 1)
        return functools.partial(_counted_batch_norm, bn1), functools.partial(_counted_batch_norm, bn2)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):
            return self.forward_symbolic(x)
        return self.forward_compact(x) if self.deploy else self.forward_expanding(x)

    def forward_symbolic(self, x: Tensor) -> Tensor:
        """The forward ``torch.fx.symbolic_trace`` records (``x`` a Proxy): one path that reads no value, shape,
        dtype or layout of ``x`` and computes the same function as the eager forward, any batch.  Expanding form:
        its modules (the BNs keep their train/eval behaviour in the traced graph); compact form:
        :meth:`_compact_symbolic`."""
        return self._compact_symbolic(x) if self.deploy else self._expanding_modules(x, self._mix_symbolic)

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in place of this layer: the compact form's TorchScript twin
        (:mod:`~mdplug.nn._script`, same parameters); the expanding form refuses."""
        from . import _script
        if not self.deploy:
            raise _script.not_scriptable(self, 'is in its expanding (training) form, which has no TorchScript '
                                               'version; compact the model first (mdplug.compact(model) or '
                                               'timm.utils.reparameterize_model(model)) to script it')
        return self._scriptable_compact()

    def _scriptable_compact(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def _mix_symbolic(self, h: Tensor, x: Tensor) -> Tensor:
        return self._mix(h, x)

    def _compact_symbolic(self, x: Tensor) -> Tensor:
        """Eq. 6–7 without forming a kernel, ``W0'⊛x + b' + left·(W1'⊛x + b1')`` with ``left = W2'·A(x)`` (MDConv)
        or ``W2'·Φ(x)`` (DCD), (B, q, m): the factorized path, on NCHW semantics."""
        left = self._left(self.dynamic_coefficients(x))
        y = torch.einsum('bqm,bmhw->bqhw', left, self._conv(x, self.weight1, self.bias1))
        if self.weight is not None:
            return y + self._conv(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def forward_compact(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- compact execution helpers ------------------------------------------------------------------------------
    #: weight of a per-sample-kernel MAC against a MAC of the factorized form for 1×1 layers once the batch is
    #: > 1 (or unknown, while tracing).  Then the factorized form's main product is one conv over the whole
    #: batch, while the per-sample path writes B kernels and runs B small matmuls; measured on CPU
    #: (mobilenetv2_100's layers at batch 8 and 32) it pays only when it saves about 8× the MACs.  At batch 1
    #: both are single products, and k×k layers run their per-sample kernels as one grouped conv: there the MACs
    #: decide as they are (resnet18 at batch 8: no gain from weighting).
    per_sample_mac_weight: float = 8.0

    def _per_sample_weight(self, x: Tensor, tracing: bool) -> float:
        if not self.per_sample_conv_is_batch_agnostic() or self._runs_one_sample(x, tracing):
            return 1.0
        return self.per_sample_mac_weight

    def choose_path(self, x: Tensor, per_sample_weight: Optional[float] = None,
                    tracing: Optional[bool] = None) -> str:
        """``'weight'`` or ``'factorized'`` for this input, by multiply-accumulate count (issue: core, 4).

        Per-sample weight generation costs q·m·p·k² per sample; the factorized form costs (m·p·k² + q·m)·H'·W'
        per sample on top of the static conv both share.  At batch 1 the MACs decide; above it a 1×1 layer's
        per-sample MACs count :attr:`per_sample_mac_weight` times (see there; ``per_sample_weight`` overrides).
        The answer depends only on the input's spatial size and that weight, so it is remembered per pair.
        ``tracing``: :func:`~mdplug.nn._common.tracing_for_export` if the caller has it already.
        """
        if self.path != 'auto':
            return self.path
        if tracing is None:
            tracing = tracing_for_export()  # (symbolic sizes are not remembered)
        weight = self._per_sample_weight(x, tracing) if per_sample_weight is None else per_sample_weight
        key = (x.shape[-2], x.shape[-1], weight)
        memo = {} if tracing else self.__dict__.setdefault('_path_memo', {})
        path = memo.get(key)
        if path is None:
            oh, ow = self._out_hw(x.shape[-2], x.shape[-1])
            per_sample, factorized = self._path_macs(oh * ow)
            path = 'weight' if weight * per_sample <= factorized else 'factorized'
            if not tracing:
                memo[key] = path
        return path

    def _path_macs(self, out_pixels: int) -> Tuple[int, int]:
        """Per-sample multiply-accumulates beyond the static conv: generating the kernel, and the factorized
        form's W1'/W2' products over ``out_pixels`` output positions."""
        p, q, m = self.in_channels, self.out_channels, self.m
        kk = self.kernel_size[0] * self.kernel_size[1]
        return q * m * p * kk, (m * p * kk + q * m) * out_pixels

    def compact_path(self, x: Tensor, tracing: Optional[bool] = None) -> str:
        """The path the compact forward takes: :meth:`choose_path`, except that while tracing for export a k×k
        ``'weight'`` path (a grouped conv with groups=B) becomes ``'factorized'``, so the graph keeps a dynamic
        batch axis.  Both compute the same function."""
        if tracing is None:
            tracing = tracing_for_export()
        path = self.choose_path(x, tracing=tracing)
        if path == 'weight' and tracing and not self.per_sample_conv_is_batch_agnostic():
            return 'factorized'
        return path

    def _runs_one_sample(self, x: Tensor, tracing: bool) -> bool:
        """Whether the compact forward takes :meth:`_one_sample_pointwise`: a 1×1 layer, one sample, and no
        export/compile trace running (a traced graph must not depend on the batch size)."""
        return not tracing and x.shape[0] == 1 and self.per_sample_conv_is_batch_agnostic()

    def _dynamic_kernel_bias(self, left: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Eq. 6: ``W(x) = left·W1' + W0'`` from ``left = W2'·A(x)`` (B, q, m), one batched matmul-add,
        reshaped to (B, q, p, kh, kw); ``bias`` (B, q) (Eq. 7, from :meth:`_left_and_bias`) passes through."""
        b, q = left.shape[0], self.out_channels
        w1 = self.weight1.reshape(self.m, -1)
        if self.weight is None:
            weight = torch.matmul(left, w1)
        else:
            weight = torch.baddbmm(self.weight.reshape(1, q, -1), left, w1.expand(b, -1, -1))
        return weight.reshape((b, q) + tuple(self.weight1.shape[1:])), None if bias is None else bias.expand(b, q)

    def _left_bias(self, left: Tensor) -> Optional[Tensor]:
        """Eq. 7's bias ``left·b1' + b'`` (B, q) from ``left`` (B, q, m) (``W2'·A(x)`` or ``W2'·Φ(x)``) in one
        op, or None without biases."""
        if self.bias1 is None:
            return self._static_bias(None)
        b, q = left.shape[0], self.out_channels
        col = self.bias1.view(1, self.m, 1).expand(b, -1, -1)
        if self.bias is None:
            return torch.bmm(left, col).view(b, q)
        return torch.baddbmm(self.bias.view(1, q, 1), left, col).view(b, q)

    def _static_bias(self, dynamic: Optional[Tensor]) -> Optional[Tensor]:
        """``dynamic + b'`` for a (B, q) dynamic bias part or None."""
        if self.bias is None:
            return dynamic
        return self.bias.unsqueeze(0) if dynamic is None else dynamic + self.bias

    def _matrices(self) -> Tuple[Optional[Tensor], ...]:
        """The compact parameters of a 1×1 layer as the matrices the batch-1 path multiplies: W0' (q, p),
        b' (q, 1), W1' (m, p), b1' (m, 1), W2' (q, m), None where absent; views, made at every call (keeping
        them between calls measured 1–2 % of mobilenetv2_100's batch-1 forward, below the 3 % a shortcut must
        win, docs/benchmarks.md; written out, not looped: 6 µs a call instead of 8.5)."""
        q, p, m = self.out_channels, self.in_channels, self.m
        w0, b0, b1 = self.weight, self.bias, self.bias1
        return (None if w0 is None else w0.view(q, p), None if b0 is None else b0.view(q, 1),
                self.weight1.view(m, p), None if b1 is None else b1.view(m, 1), self.weight2.view(q, m))

    def _left_one(self, w2: Tensor, coeff: Tensor) -> Tensor:  # pragma: no cover - overridden
        """``W2'·A(x)`` (or ``W2'·Φ(x)``) for one sample, (q, m), from the (q, m) matrix ``w2``."""
        raise NotImplementedError

    def _one_sample_pointwise(self, x: Tensor, coeff: Tensor) -> Tensor:
        """One sample through a 1×1 layer as two or three plain matmuls on its (p, H·W) view, either path::

            'weight':      y = (W0' + left·W1')·x + (b' + left·b1')       (Eq. 6–7 for this sample)
            'factorized':  y = W0'·x + b' + left·(W1'·x + b1')

        with ``left = W2'·A(x)`` (MDConv) or ``W2'·Φ(x)`` (DCD), (q, m), from the coefficients ``coeff`` of the
        sample; the path is :meth:`choose_path`'s for one sample (the MACs decide).  At batch 1 this is the
        cheapest execution of the compact form: no batch dimension, no kernel broadcast over a batch, biases added
        by the matmuls themselves (mobilenetv2_100 at batch 1 measured 5 % faster than the batched code on one
        sample).  A channels-last ``x`` runs the same products transposed on its (H·W, p) rows (a view, no
        copy), each output pixel a row of q values, and the result is channels-last.  Called only outside
        export/compile traces (:meth:`_runs_one_sample`).
        """
        nhwc = is_channels_last(x)
        path = self.choose_path(x, 1.0, tracing=False)
        if self.stride != (1, 1):
            x = self._pointwise_input(x)
        _, p, h, w = x.shape
        w0, b0, w1, b1, w2 = self._matrices()
        left = self._left_one(w2, coeff)
        data = channel_rows(x) if nhwc else x.reshape(p, h * w)  # (H·W, p) rows or the (p, H·W) matrix, views
        # (only mm/addmm, out of place: the products torch's FlopCounterMode counts, so mdplug.profile stays exact)
        if path == 'weight':
            kernel = torch.mm(left, w1) if w0 is None else torch.addmm(w0, left, w1)
            bias = b0 if b1 is None else (torch.mm(left, b1) if b0 is None else torch.addmm(b0, left, b1))
            if nhwc:
                y = torch.mm(data, kernel.t()) if bias is None else torch.addmm(bias.t(), data, kernel.t())
            else:
                y = torch.mm(kernel, data) if bias is None else torch.addmm(bias, kernel, data)
        elif nhwc:  # every product transposed: rows (H·W, ·), biases as (1, ·) rows
            inner = torch.mm(data, w1.t()) if b1 is None else torch.addmm(b1.t(), data, w1.t())
            if w0 is None:
                base = None if b0 is None else b0.t()
            else:
                base = torch.mm(data, w0.t()) if b0 is None else torch.addmm(b0.t(), data, w0.t())
            y = torch.mm(inner, left.t()) if base is None else torch.addmm(base, inner, left.t())
        else:
            inner = torch.mm(w1, data) if b1 is None else torch.addmm(b1, w1, data)
            base = b0 if w0 is None else (torch.mm(w0, data) if b0 is None else torch.addmm(b0, w0, data))
            y = torch.mm(left, inner) if base is None else torch.addmm(base, left, inner)
        q = self.out_channels
        return y.view(1, h, w, q).permute(0, 3, 1, 2) if nhwc else y.view(1, q, h, w)

    def _stacks_input(self) -> bool:
        """Whether the factorized form runs as :meth:`_stacked_factorized`: 1×1 layers with more output than
        input channels (measured on mobilenetv2_100's expansion convs at batch 8 and 32: 10–30 % faster than
        :meth:`_factorized`, which stays faster where q ≤ p)."""
        return self._is_pointwise() and self.groups == 1 and self.out_channels > self.in_channels

    def _stacked_factorized(self, x: Tensor, coeff: Tensor) -> Tensor:
        """The factorized compact form of a 1×1 layer as two static convs over the batch::

            g = A(x)·(W1' ⊛ x + b1')              (m channels; DCD: Φ(x)·(…))
            y = [W0' | W2'] ⊛ [x; g] + b'          (one conv over the p + m stacked channels)

        which is ``W0'·x + b' + W2'·A(x)·(W1'·x + b1')``, Eq. 6–7 without forming a kernel: the dynamic part
        acts on m channels only, and the output is written once by one static conv.  Any batch; exports with a
        dynamic batch axis.
        """
        x = self._pointwise_input(x)
        g = self._apply_coefficients(F.conv2d(x, self.weight1, self.bias1), coeff)
        if self.weight is None:
            return F.conv2d(g, self.weight2, self.bias)
        return F.conv2d(torch.cat([x, g], 1), torch.cat([self.weight, self.weight2], 1), self.bias)

    def _factorized(self, x: Tensor, left: Tensor) -> Tensor:
        """The factorized compact form as one static conv and one batched matmul-add::

            [z0; h] = [W0'; W1'] ⊛ x + [b'; b1']        (q + m channels, the whole batch in one conv)
            y = z0 + left·h                              (left = W2'·A(x) or W2'·Φ(x), (B, q, m))

        which is Eq. 6–7 applied without forming a kernel: left·(W1'⊛x + b1') + W0'⊛x + b'.  Any kernel size
        and batch; every shape is read from the conv's output, so it exports with a dynamic batch.  A
        channels-last input gives a channels-last conv output, and the mix keeps it (:func:`channel_matmul`).
        """
        q, m = self.out_channels, self.m
        if self.weight is None:
            return channel_matmul(left, self._conv(x, self.weight1, self.bias1),
                                  None if self.bias is None else self.bias.view(1, q, 1, 1))
        bias = None
        if self.bias is not None or self.bias1 is not None:
            bias = torch.cat([self.bias if self.bias is not None else self.weight.new_zeros(q),
                              self.bias1 if self.bias1 is not None else self.weight.new_zeros(m)])
        z = self._conv(x, torch.cat([self.weight, self.weight1]), bias)
        return channel_matmul(left, z[:, q:], z[:, :q])

    def extra_repr(self) -> str:
        s = super().extra_repr() + f', m={self.m}'
        if not self.bypass:
            s += ', bypass=False'
        if self.norm != 'branch':
            s += f', norm={self.norm!r}'
        return s
