"""Pieces shared by the layers: conv hyper-parameters, the attention network, the per-sample conv."""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules import module as _module_impl

_size_2 = Union[int, Tuple[int, int]]
GATES = ('sigmoid', 'softmax', 'none')
PATHS = ('auto', 'weight', 'factorized')
NORMS = ('branch', 'sum', 'none')
#: how ``from_conv`` / :func:`mdplug.convert` initialise a converted layer: ``'preserve'`` (it computes what the conv
#: did) or ``'fresh'`` (its new parameters as freshly built, for training from scratch)
INITS = ('preserve', 'fresh')


def tracing_for_export() -> bool:
    """True while a model is being traced for export or compilation (ONNX, ``torch.export``, ``torch.compile``,
    ``torch.jit.trace``).

    The layers then avoid executions that bake the batch size into the graph (a grouped conv with
    ``groups = B``) and take a batch-agnostic one that computes the same function.
    """
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or _in_onnx_export())


_onnx_flags: Optional[tuple] = None


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its cost: it imports the two modules holding the exporters'
    flags at every call (1 µs, paid by every compact layer at every forward); here they are looked up once.
    Where they are not found (another torch version), the public function answers."""
    global _onnx_flags
    if _onnx_flags is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
            _onnx_flags = (_flags, GLOBALS)
        except ImportError:
            _onnx_flags = ()
    if not _onnx_flags:
        return torch.onnx.is_in_onnx_export()
    flags, state = _onnx_flags
    return bool(state.in_onnx_export or flags._is_onnx_exporting)


def no_global_module_hooks() -> bool:
    """No global module hooks are registered (``nn.modules.module.register_module_forward_hook`` and kin)."""
    return not (_module_impl._global_forward_hooks or _module_impl._global_forward_pre_hooks
                or _module_impl._global_backward_hooks or _module_impl._global_backward_pre_hooks)


def calls_forward(mod: nn.Module, cls: type) -> bool:
    """Whether calling ``mod`` runs exactly ``cls.forward``, given :func:`no_global_module_hooks`: its type is
    ``cls`` itself (not a subclass, a parametrized or quantized swap), it has no hooks of its own and is not
    compiled on its own (the conditions under which ``nn.Module.__call__`` goes straight to ``forward``)."""
    d = mod.__dict__
    return (type(mod) is cls and d.get('_compiled_call_impl') is None
            and not (d['_forward_hooks'] or d['_forward_pre_hooks'] or d['_backward_hooks']
                     or d['_backward_pre_hooks']))


def is_channels_last(x: Tensor) -> bool:
    """Whether the channels of ``x`` (B, C, H, W) are its innermost dimension in memory (channels-last, or a
    channel slice of such a tensor) and ``x`` is not also NCHW-contiguous.

    The 1×1 products of the compact forms then run on its (B, H·W, C) rows (:func:`channel_matmul`): no layout
    copy on the way in, and the output comes back channels-last, as ``F.conv2d`` returns it for such an input
    (with NCHW products every layer would copy its input to NCHW and hand the next layer an NCHW tensor).
    """
    return x.dim() == 4 and x.stride(1) == 1 and not x.is_contiguous()


def channel_rows(t: Tensor) -> Tensor:
    """The (B·H·W, C) rows of a (B, C, H, W) tensor, one per pixel: a view when ``t`` is channels-last (or a
    channel slice of such a tensor, :func:`is_channels_last`), a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def channel_matmul(mat: Tensor, t: Tensor, add: Optional[Tensor] = None) -> Tensor:
    """Channels mixed by a matrix at every pixel: ``y[b] = mat[b]·t[b] + add``.

    ``mat`` (B, q, c), each sample's own, or (q, c), shared by all samples; ``t`` (B, c, H, W); ``add``
    broadcastable to the (B, q, H, W) result or None (a bias as (1 or B, q, 1, 1), or a full tensor).  One
    batched matmul on the (B, c, H·W) view of an NCHW ``t``; on the (B, H·W, c) rows of a channels-last one
    (:func:`is_channels_last`), or with a shared matrix one matmul over the rows of the whole batch.  The result
    keeps t's layout.
    """
    b, c, h, w = t.shape
    q = mat.shape[-2]
    if is_channels_last(t):
        if mat.dim() == 2:
            rows, mat_t = channel_rows(t), mat.t()
            y = rows @ mat_t if add is None else torch.addmm(channel_rows(add), rows, mat_t)
        else:
            rows, mat_t = t.permute(0, 2, 3, 1).reshape(b, h * w, c), mat.transpose(1, 2)
            y = torch.bmm(rows, mat_t) if add is None else torch.baddbmm(add.permute(0, 2, 3, 1).flatten(1, 2),
                                                                          rows, mat_t)
        return y.view(b, h, w, q).permute(0, 3, 1, 2)
    if mat.dim() == 2:
        mat = mat.expand(b, -1, -1)
    flat = t.reshape(b, c, h * w)
    y = torch.bmm(mat, flat) if add is None else torch.baddbmm(add.flatten(2), mat, flat)
    return y.view(b, q, h, w)


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f'expected an int or a pair, got {v!r}')
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _check_choice(layer: str, option: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f'{layer}: unknown {option}={value!r}; expected one of {", ".join(map(repr, choices))}')


def check_init(init, where: str = 'init') -> None:
    """Refuse an ``init`` that is not one of :data:`INITS`, naming the option and both choices."""
    if init not in INITS:
        raise ValueError(f"{where}={init!r} is unknown; use 'preserve' (the converted layer computes what the conv "
                         f"did: fine-tuning a trained model) or 'fresh' (new parameters as freshly built: training "
                         f"from scratch)")


def _copy_param(dst: Tensor, src: Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.detach().to(dtype=dst.dtype, device=dst.device))


class ConvBase(nn.Module):
    """Holds the ``nn.Conv2d`` hyper-parameters every mdplug layer shares and the deploy protocol.

    The deploy protocol is the one ``timm.utils.reparameterize_model`` and mmpretrain's converters call:
    ``fuse()`` returns the compact module, ``switch_to_deploy()`` / ``reparameterize()`` convert in place.
    """

    supports_groups = False
    #: ``nn.Conv2d`` attributes that wrappers such as mmcv's ``ConvModule`` read
    transposed = False
    output_padding = (0, 0)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size_2, stride: _size_2 = 1,
                 padding: Union[str, _size_2] = 0, dilation: _size_2 = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros') -> None:
        super().__init__()
        name = type(self).__name__
        if padding_mode != 'zeros':
            raise ValueError(f"{name}: padding_mode={padding_mode!r} is not supported, only 'zeros'")
        if groups != 1 and not self.supports_groups:
            raise ValueError(f'{name}: groups={groups} is not supported (the multi-layer branch needs a dense '
                             f'W1 and W2); convert only convs with groups=1: mdplug.convert(model, select='
                             f"'pointwise') or, in an mmpretrain config, backbone=dict(type='mdplug.Converted', "
                             f"backbone=..., kind=..., select='pointwise') instead of conv_cfg=dict(type="
                             f"'{name}'), which reaches every conv of the backbone, depthwise ones included")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{name}: in_channels={in_channels} and out_channels={out_channels} must be '
                             f'divisible by groups={groups}')
        if isinstance(padding, str):
            if padding not in ('same', 'valid'):
                raise ValueError(f"{name}: padding={padding!r}; expected an int, a pair, 'same' or 'valid'")
            if padding == 'same' and _pair(stride) != (1, 1):
                raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.deploy = False

    # -- conv helpers -------------------------------------------------------------------------------------------
    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int = 1) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _out_hw(self, h: int, w: int) -> Tuple[int, int]:
        if self.padding == 'same':
            return h, w
        pad = (0, 0) if self.padding == 'valid' else self.padding
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, pad, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def _is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and (self.padding in ('valid', 'same') or self.padding == (0, 0))

    def _pointwise_input(self, x: Tensor) -> Tensor:
        """What a 1×1 conv with this stride reads of ``x``: every stride-th row and column (no padding); a
        channels-last ``x`` gives a channels-last copy (a strided slice of it would be neither layout, and convs
        and reshapes of it would fall back to NCHW)."""
        sh, sw = self.stride
        if sh == 1 and sw == 1:
            return x
        if is_channels_last(x):
            return x[:, :, ::sh, ::sw].contiguous(memory_format=torch.channels_last)
        return x[:, :, ::sh, ::sw]

    def per_sample_conv_is_batch_agnostic(self) -> bool:
        """Whether :meth:`per_sample_conv` runs as a ``bmm`` (any batch) rather than a conv with groups=B."""
        return self._is_pointwise() and self.groups == 1

    def per_sample_conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Convolve each sample with its own kernel in one batched call (the compact form's execution).

        ``x``: (B, p, H, W); ``weight``: (B, q, p/g, kh, kw); ``bias``: (B, q) or None.  1×1 kernels run as one
        batched matmul (strides by slicing; :func:`channel_matmul`, which keeps a channels-last layout); other
        kernels as one grouped conv over the batch.  The batch size is read from ``x`` at every call, never stored.
        """
        b, q = weight.shape[0], weight.shape[1]
        if self.per_sample_conv_is_batch_agnostic():
            return channel_matmul(weight.reshape(b, q, -1), self._pointwise_input(x),
                                  None if bias is None else bias[:, :, None, None])
        groups = self.groups
        y = F.conv2d(x.reshape(1, -1, x.shape[-2], x.shape[-1]), weight.reshape((-1,) + tuple(weight.shape[2:])),
                     None if bias is None else bias.reshape(-1), self.stride, self.padding, self.dilation,
                     groups * b)
        y = y.reshape(b, q, y.shape[-2], y.shape[-1])
        # (the batch folded into the channels cannot stay channels-last; the output goes back to x's layout)
        return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y

    def init_weights(self) -> None:
        """The initialisation hook of mmengine/mmcv (``ConvModule`` calls it): the layer's own ``reset_parameters``."""
        self.reset_parameters()

    # -- deploy protocol ----------------------------------------------------------------------------------------
    def switch_to_deploy(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def reparameterize(self) -> None:
        """Same as :meth:`switch_to_deploy` (timm's name for it)."""
        self.switch_to_deploy()

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """Return the compact form as a new module (this one is left as it is)."""
        new = copy.deepcopy(self)
        new.switch_to_deploy()
        return new

    @classmethod
    def _ctor_kwargs_from_conv(cls, conv: nn.Conv2d) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}'
        if self.padding != (0, 0):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        return s + (', deploy=True' if self.deploy else '')


def global_avg_pool(x: Tensor) -> Tensor:
    """GAP, (B, C, H, W) → (B, C).  A channels-last input that needs a gradient is pooled by ``avg_pool2d`` over
    the whole map, whose backward hands back a channels-last gradient: ``mean``'s is NCHW, and summed with the
    conv's channels-last gradient of the same input it turns the whole backward pass of a channels-last model
    NCHW, where BatchNorm's backward then meets mixed layouts (measured: 4× slower on CPU)."""
    if x.requires_grad and is_channels_last(x):
        return F.avg_pool2d(x, (x.shape[-2], x.shape[-1])).flatten(1)
    return x.mean((2, 3))


class _LinearReLU(torch.autograd.Function):
    """``relu(x·Wᵀ + b)`` for a (B, p) input as one op, ``torch._addmm_activation``, with the backward autograd
    records for ``relu(F.linear(x, W, b))``: ``threshold_backward`` and the linear's two mms and sum, the same
    ops on the same tensors (so the same gradients), one forward op less.  The backward is made of
    differentiable ops on the saved inputs and output, so double backward works as through the plain ops."""

    # (forward with ctx, not ``setup_context``: ``apply`` then skips binding the arguments by signature, which
    # costs more than the op)
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        out = torch._addmm_activation(bias, x, weight.t())
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        need_x, need_w, need_b = ctx.needs_input_grad
        return (grad.mm(weight) if need_x else None, grad.t().mm(x) if need_w else None,
                grad.sum(0) if need_b else None)


class Attention(nn.Module):
    """The attention network F of Eq. 2: GAP → Linear(p, h) → ReLU → Linear(h, n) → gate.

    ``h = max(1, round(p · hidden_ratio))`` (the paper: 1/4 of the input channels; Table 12 varies it).
    ``gate``: ``'sigmoid'`` (Eq. 2), ``'softmax'`` over the n outputs (Table 13, DYConv), or ``'none'`` (DCD);
    the logits are divided by ``temperature`` first.  Input (B, p, H, W), output (B, n).
    """

    def __init__(self, in_channels: int, out_features: int, hidden_ratio: float = 0.25, gate: str = 'sigmoid',
                 temperature: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        _check_choice('Attention', 'gate', gate, GATES)
        if not hidden_ratio > 0:
            raise ValueError(f'Attention: hidden_ratio must be > 0, got {hidden_ratio}')
        if not temperature > 0:
            raise ValueError(f'Attention: temperature must be > 0, got {temperature}')
        hidden = max(1, int(round(in_channels * hidden_ratio)))
        self.fc1 = nn.Linear(in_channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, device=device, dtype=dtype)
        self.gate = gate
        # model state (annealed during training, saved and loaded with the weights): a 0-dim buffer
        self.register_buffer('temperature', torch.empty((), device=device, dtype=dtype))
        self.assign_temperature(temperature)

    def assign_temperature(self, t: float) -> None:
        """Set the temperature buffer to ``t`` (in place, so replicas and references keep the same tensor)."""
        buf = self.temperature
        with torch.no_grad():
            buf.fill_(float(t))
        self._remember_temperature(float(t))

    # The eager forward divides by a Python float: reading the buffer's value at every call would synchronise
    # with the device.  The float is remembered with the buffer and its version counter, so any write to the
    # buffer (load_state_dict, DDP's broadcast, an in-place edit) is noticed; until it is read again on the host
    # (at once for a CPU buffer) the forward divides by the buffer itself, which needs no synchronisation.
    def _remember_temperature(self, value: float) -> None:
        """Remember ``value``, rounded to the buffer's dtype as the buffer holds it, for the current buffer."""
        buf = self.__dict__['_buffers']['temperature']
        try:
            self.__dict__['_temperature_seen'] = (buf, buf._version, torch.tensor(value, dtype=buf.dtype).item())
        except RuntimeError:  # an inference tensor has no version counter: the buffer is read at every call
            self.__dict__.pop('_temperature_seen', None)

    def _known_temperature(self) -> Optional[float]:
        """The remembered value if the buffer is still the tensor it was remembered for, unwritten since."""
        buf = self.__dict__['_buffers']['temperature']
        seen = self.__dict__.get('_temperature_seen')
        if seen is None or seen[0] is not buf:
            return None
        try:
            return seen[2] if seen[1] == buf._version else None
        except RuntimeError:  # inference tensor
            return None

    def _temperature_divisor(self) -> Union[float, Tensor]:
        """The temperature for an eager forward: the remembered float, a CPU buffer's value, or the buffer."""
        d = self.__dict__
        buf = d['_buffers']['temperature']
        seen = d.get('_temperature_seen')
        if seen is not None and seen[0] is buf:  # (:meth:`_known_temperature`, inlined: every forward asks)
            try:
                if seen[1] == buf._version:
                    return seen[2]
            except RuntimeError:  # inference tensor
                pass
        if buf.device.type == 'cpu':
            value = float(buf)
            self._remember_temperature(value)
            return value
        return buf

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'temperature'
        known = self._known_temperature()
        given = state_dict.get(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if given is None:
            # a checkpoint written before the temperature was saved with the model: the layer keeps its value
            # (the constructor's, unless set since)
            if key in missing_keys:
                missing_keys.remove(key)
            if known is not None:
                self._remember_temperature(known)
        elif isinstance(given, Tensor) and given.numel() == 1 and not error_msgs:
            self._remember_temperature(float(given))  # (a checkpoint's CPU tensor; read once)

    def _apply(self, fn, recurse=True):
        known = self._known_temperature()
        out = super()._apply(fn, recurse)
        if known is not None:  # (``.cuda()``, ``.half()``: a new buffer holding the same value, rounded)
            self._remember_temperature(known)
        return out

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('_temperature_seen', None)
        state['_temperature_value'] = self._known_temperature()
        return state

    def __setstate__(self, state):
        known = state.pop('_temperature_value', None)
        super().__setstate__(state)
        if known is not None:  # (deepcopy, pickling: the copy's buffer holds the same value)
            self._remember_temperature(known)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: no branch on the input (mean is the same GAP)
            return self._gate(self.fc2(F.relu(self.fc1(x.mean((2, 3))))) / self.temperature)
        return self.coefficients(x, tracing_for_export())

    def coefficients(self, x: Tensor, tracing: bool) -> Tensor:
        """The forward computation, ``tracing`` being :func:`tracing_for_export`: the gate of :meth:`logits`."""
        return self._gate(self.logits(x, tracing))

    def logits(self, x: Tensor, tracing: bool) -> Tensor:
        """The forward computation before the gate, ``F(GAP(x)) / temperature``, (B, n).

        When calling ``fc1`` and ``fc2`` would run exactly ``nn.Linear.forward`` (:func:`calls_forward`) and
        nothing is traced, their ``F.linear`` runs directly (the same computation without two module calls), and
        outside autocast fc1 and its ReLU are one op, ``relu(b + x·Wᵀ)`` (``torch._addmm_activation``; one kernel
        launch less per layer on a GPU, where cuBLASLt applies the ReLU in the GEMM's epilogue; CUDA's autocast
        does not list the op).  It has no derivative: with grad mode on it runs as :class:`_LinearReLU`, which
        gives it autograd's backward of ``relu(F.linear(…))``.  Traces keep the module structure.
        """
        pooled = global_avg_pool(x)
        fc1, fc2 = self.fc1, self.fc2
        if (not tracing and calls_forward(fc1, nn.Linear) and calls_forward(fc2, nn.Linear)
                and no_global_module_hooks()):
            w1, b1 = fc1.weight, fc1.bias
            if (b1 is not None and pooled.dtype == w1.dtype and b1.dtype == w1.dtype
                    and not torch.is_autocast_enabled(x.device.type)):
                hidden = (_LinearReLU.apply(pooled, w1, b1) if torch.is_grad_enabled()
                          else torch._addmm_activation(b1, pooled, w1.t()))
            else:
                hidden = torch.relu(F.linear(pooled, w1, b1))
            z = F.linear(hidden, fc2.weight, fc2.bias)
        else:
            z = fc2(F.relu(fc1(pooled)))
        if tracing:  # (graphs read the buffer, whatever its value)
            z = z / self.temperature
        else:
            t = self._temperature_divisor()
            if type(t) is not float or t != 1.0:
                z = z / t
        return z

    def _gate(self, z: Tensor) -> Tensor:
        if self.gate == 'sigmoid':
            return torch.sigmoid(z)
        if self.gate == 'softmax':
            return torch.softmax(z, dim=1)
        return z

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def extra_repr(self) -> str:
        return f'gate={self.gate!r}, temperature={float(self.temperature):g}'


def kaiming_conv_init_(weight: Tensor) -> None:
    """``nn.Conv2d``'s default weight initialisation, for a kernel that is not held by an ``nn.Conv2d``."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def conv_bias_init_(bias: Tensor, fan_in: int) -> None:
    """``nn.Conv2d``'s default bias initialisation."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    nn.init.uniform_(bias, -bound, bound)
