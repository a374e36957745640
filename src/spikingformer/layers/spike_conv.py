"""The tokenizer's convolutions of spike maps and their route (``spike_conv``).

The switch, the per-ISA limit (:data:`~spikingformer.layers.routes.SPIKE_CONV_MIN_CHANNELS`) and
the route's description are in :mod:`spikingformer.layers.routes`; the arithmetic is in
:mod:`spikingformer.kernels.spike_conv`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from spikingformer.cpu_features import native_int8
from spikingformer.kernels import spike_conv as kernels
from spikingformer.layers import routes

# conv module -> (its weight's version and address when packed, the packed pieces); weak, so a
# dropped model frees its pieces
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    on, inference (no autograd, not under ``torch.compile`` or CPU autocast), a plain 3x3 convolution
    (:func:`_plain_3x3`) of float32 CPU maps with at least ``SPIKE_CONV_MIN_CHANNELS`` input
    channels, a CPU with 8-bit dot products (:func:`~spikingformer.cpu_features.native_int8`), and
    no global module hooks (which would miss the call)."""
    return (routes.enabled("spike_conv") and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not torch.is_autocast_enabled("cpu") and x.shape[1] >= routes._spike_conv_min_channels
            and _plain_3x3(conv) and native_int8()
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


def _pieces(conv: nn.Conv2d) -> kernels.PackedPieces:
    """The weight's packed pieces, made again whenever the weight changed (its version counter or
    storage) or is not finite (then ``None``: the plain convolution propagates NaN and inf)."""
    key = (conv.weight._version, conv.weight.data_ptr())
    held = _packed.get(conv)
    if held is None or held[0] != key:
        pieces = kernels.PackedPieces(conv.weight) if bool(torch.isfinite(conv.weight).all()) else None
        held = _packed[conv] = (key, pieces)
    return held[1]


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for spike maps ``x``: with ``spike_conv`` where :func:`takes` says so, in integer
    arithmetic (:func:`~spikingformer.kernels.spike_conv.spike_conv2d`; float32 values differ from
    the float32 convolution's by rounding), else the module call."""
    if takes(conv, x):
        pieces = _pieces(conv)
        if pieces is not None:
            return kernels.spike_conv2d(x, pieces, conv.bias)
    return conv(x)
