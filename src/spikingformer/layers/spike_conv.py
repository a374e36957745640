"""The tokenizer's convolutions of spike maps and their route (``spike_conv``).

The switch, the per-ISA limits (:data:`~spikingformer.layers.routes.SPIKE_CONV_MIN_CHANNELS`,
:data:`~spikingformer.layers.routes.SPIKE_CONV_MAX_DENSITY`) and
the route's description are in :mod:`spikingformer.layers.routes`; the arithmetic is in
:mod:`spikingformer.kernels.spike_conv`. Inference takes either way; training the accumulation
(:class:`_Accumulated`, with its backward).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from spikingformer.cpu_features import native_int8
from spikingformer.kernels import spike_conv as kernels
from spikingformer.kernels.spike_linear import pack_spikes, packed_width, unpack_spikes
from spikingformer.layers import routes

# conv module -> what the route keeps of its weight (_Weight); weak, so a dropped model frees it
_held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Weight:
    """What the route keeps of one convolution's weight, for the version and storage it was made
    from: whether it is finite, and its packed pieces once the int8 way needs them."""

    def __init__(self, weight: torch.Tensor, key: tuple[int, int]) -> None:
        self.key, self.finite, self.pieces = key, bool(torch.isfinite(weight).all()), None


def _weight(conv: nn.Conv2d) -> _Weight:
    """The weight's :class:`_Weight`, made again whenever the weight changed (its version counter or
    storage: an optimizer step, ``load_state_dict``)."""
    key = (conv.weight._version, conv.weight.data_ptr())
    held = _held.get(conv)
    if held is None or held.key != key:
        held = _held[conv] = _Weight(conv.weight, key)
    return held


def _plain_3x3(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` as :class:`~spikingformer.layers.blocks.ConvBN` makes it (3x3, stride 1,
    padding 1, no groups or dilation; a bias after ConvBN fusion), float32 on the CPU, with no hooks
    of its own."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and (conv.bias is None or conv.bias.dtype == torch.float32)
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu" and not (conv._forward_hooks or conv._forward_pre_hooks))


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``spike_conv`` computes ``conv(x)`` for spike maps ``x`` ``(N, C_in, H, W)``: the route
    on, not under ``torch.compile`` or CPU autocast, a plain 3x3 convolution (:func:`_plain_3x3`) with
    finite weights (else the plain convolution propagates NaN and inf) of non-empty float32 CPU maps with at
    least ``SPIKE_CONV_MIN_CHANNELS`` input channels, and no global module hooks (which would miss
    the call). :func:`convolve` then picks the way."""
    return (routes.enabled("spike_conv") and not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and x.shape[1] >= routes._spike_conv_min_channels and not torch.is_autocast_enabled("cpu")
            and _plain_3x3(conv) and _weight(conv).finite
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


def _pieces(conv: nn.Conv2d) -> kernels.PackedPieces:
    """The weight's packed pieces (made once per version of the weight)."""
    held = _weight(conv)
    if held.pieces is None:
        held.pieces = kernels.PackedPieces(conv.weight)
    return held.pieces


def _first_map_rate(x: torch.Tensor) -> float:
    """The first map's firing rate, which decides the way: the accumulation lists every map's spikes
    before it knows the rate (and then declines above its limit), which costs time where the maps
    fire above it (as the event model's do, at about 0.4)."""
    first = x[0]
    return int(first.count_nonzero()) / first.numel()


ONCE_DIFFERENTIABLE = ("spike_conv: the tokenizer's convolutions of sparse spikes are differentiable once (autograd "
                       "keeps their input as bits); for second-order gradients (create_graph=True) turn the route "
                       "off: SPIKINGFORMER_ROUTES=-spike_conv")


class _Accumulated(torch.autograd.Function):
    """Training's way for spike maps: autograd keeps the spikes as bits (1/32 of the float32 maps it
    would keep). Forward: by accumulation where the maps fire at most at ``limit`` (``None``: the
    caller found the first map denser), else the float32 convolution. Backward: the input gradient by PyTorch's convolution backward (as for the module
    call, bit for bit); the weight gradient by accumulation of the output gradient at every window's
    spikes (:func:`~spikingformer.kernels.spike_conv.accumulate_conv_weight_grad`) where the maps fire
    at most at ``grad_limit``, else PyTorch's of the unpacked spikes. Differentiable once: a backward
    that builds a graph (``create_graph``) raises."""

    @staticmethod
    def forward(ctx, x, weight, bias, limit, grad_limit):
        n, c, h, w = x.shape
        y = None
        if limit is not None:
            packed = torch.empty(n * h * w, packed_width(c), dtype=torch.int64)
            y = kernels.accumulate_conv2d(x, weight, bias, limit, packed)
        if y is None:  # (the accumulation, where it declined, may not have written the bits)
            y = nn.functional.conv2d(x, weight, bias, padding=1)
            packed = pack_spikes(x.permute(0, 2, 3, 1).reshape(n * h * w, c))
        ctx.save_for_backward(packed, weight)
        ctx.shape, ctx.has_bias, ctx.grad_limit = x.shape, bias is not None, grad_limit
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward with create_graph=True: a second-order gradient is wanted
            raise RuntimeError(ONCE_DIFFERENTIABLE)
        packed, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # the input's values are not read: an empty one of its layout
            x = torch.empty(ctx.shape, memory_format=ctx.layout)
            gx = _convolution_backward(grad, x, weight, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            gw = kernels.accumulate_conv_weight_grad(packed, ctx.shape, grad, ctx.grad_limit)
            if gw is None:
                n, c, h, w = ctx.shape
                x = unpack_spikes(packed, c).view(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=ctx.layout)
                gw = _convolution_backward(grad, x, weight, (False, True, False))[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _convolution_backward(grad, x, weight, mask):
    """PyTorch's backward of ``conv2d(x, weight, padding=1)``, the gradients of ``mask``."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for spike maps ``x``. With ``spike_conv`` where :func:`takes` says so, per
    ``SPIKE_CONV_MAX_DENSITY``: in inference, by accumulation of the windows' spikes' weights where
    at most its ``"infer"`` share of ``x`` (per pass) are ones
    (:func:`~spikingformer.kernels.spike_conv.accumulate_conv2d`), else in integer arithmetic on a
    CPU with 8-bit matrix tiles (:func:`~spikingformer.kernels.spike_conv.spike_conv2d`); in
    training, :class:`_Accumulated` where the first map fires at most at its ``"weight_grad"``
    share (the forward summed up to its ``"train"`` share). Float32 values differ from the float32
    convolution's by rounding. Otherwise the module call."""
    if not takes(conv, x):
        return conv(x)
    limits, rate = routes._spike_conv_max_density, _first_map_rate(x)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters())):
        if rate <= limits["weight_grad"]:
            limit = limits["train"] if rate <= limits["train"] else None
            return _Accumulated.apply(x, conv.weight, conv.bias, limit, limits["weight_grad"])
        return conv(x)
    if rate <= limits["infer"]:
        y = kernels.accumulate_conv2d(x, conv.weight, conv.bias, limits["infer"])
        if y is not None:
            return y
    return kernels.spike_conv2d(x, _pieces(conv), conv.bias) if native_int8() else conv(x)
