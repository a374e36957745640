"""The tokenizer's dense 3x3 convolutions by Winograd's F(2x2, 3x3) (route ``winograd``).

The switch, the per-ISA limit (:data:`~spikingformer.layers.routes.WINOGRAD_MIN_CHANNELS`) and the
route's description are in :mod:`spikingformer.layers.routes`; the arithmetic, with its PyTorch
twin, in :mod:`spikingformer.kernels.winograd`. The convolutions the ``spike_conv`` route does not
sum (maps above its firing-rate limits, or that route off) come here through :func:`convolve`,
and ``spike_conv``'s operators run their dense convolutions (the training forward above the
accumulation's limit, the input gradient) by F(2x2, 3x3) where :func:`takes` says so.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.kernels import winograd
from spikingformer.kernels.finite import all_finite
from spikingformer.layers import routes


def _dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``winograd`` computes ``conv(x)`` in: float32 for float32 maps outside autocast;
    bfloat16 for float32 or bfloat16 maps under CPU bf16 autocast where the route has a bf16 limit
    on this CPU (:data:`~spikingformer.layers.routes.WINOGRAD_MIN_CHANNELS_BF16`); else None."""
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return torch.bfloat16 if bf16 and routes._winograd_min_channels_bf16 is not None else None


def operands(conv: nn.Module, x: torch.Tensor) -> tuple:
    """``(x, weight, bias)`` as the module call's convolution gets them: under CPU autocast, autocast's
    bf16 casts (the routes take no other autocast dtype); else ``conv``'s own."""
    if not torch.is_autocast_enabled("cpu"):
        return x, conv.weight, conv.bias
    bias = conv.bias.to(torch.bfloat16) if conv.bias is not None else None
    return x.to(torch.bfloat16), conv.weight.to(torch.bfloat16), bias


def plain_3x3(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` as :class:`~spikingformer.layers.blocks.ConvBN` makes it (3x3, stride 1,
    padding 1, no groups or dilation; a bias after ConvBN fusion), float32 on the CPU, with no hooks
    of its own nor global module hooks (which would miss a call that is not the module's)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and (conv.bias is None or conv.bias.dtype == torch.float32)
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu" and not (conv._forward_hooks or conv._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``winograd`` computes ``conv(x)`` for maps ``x`` ``(N, C_in, H, W)``: the route on, a
    plain 3x3 convolution (:func:`plain_3x3`) with a finite weight and at least
    :data:`~spikingformer.layers.routes.WINOGRAD_MIN_CHANNELS` input and output channels (this ISA's;
    under bf16 autocast :data:`~spikingformer.layers.routes.WINOGRAD_MIN_CHANNELS_BF16`'s, see
    :func:`_dtype`), non-empty channels-last CPU maps, outside ``torch.compile`` (whose compiler
    picks its own convolution) and ``torch.jit.trace`` (which cannot see the C++ passes)."""
    dtype = _dtype(x) if x.device.type == "cpu" else None
    least = routes._winograd_min_channels if dtype == torch.float32 else routes._winograd_min_channels_bf16
    return (routes.enabled("winograd") and dtype is not None and least is not None and plain_3x3(conv)
            and x.dim() == 4 and x.numel() > 0 and winograd.channels_last(x)
            and min(x.shape[1], conv.out_channels) >= least and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and all_finite(conv.weight.detach()))


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``: by F(2x2, 3x3) (:func:`~spikingformer.kernels.winograd.conv2d`, differentiable)
    where :func:`takes` says so, else the module call; of :func:`operands` (under bf16 autocast,
    autocast's casts). Values differ from the module's by rounding."""
    return winograd.conv2d(*operands(conv, x)) if takes(conv, x) else conv(x)
