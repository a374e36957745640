"""The tokenizer's convolutions of spike maps and their route (``spike_conv``).

The switch, the per-ISA limits (:data:`~spikingformer.layers.routes.SPIKE_CONV_MIN_CHANNELS`,
:data:`~spikingformer.layers.routes.SPIKE_CONV_MAX_DENSITY`) and
the route's description are in :mod:`spikingformer.layers.routes`; the operators, which pick the
way inside, are in :mod:`spikingformer.kernels.spike_conv_ops`, the arithmetic in
:mod:`spikingformer.kernels.spike_conv`.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.kernels import spike_conv_ops as ops
from spikingformer.layers import routes, winograd


def _limits(x: torch.Tensor) -> dict | None:
    """The route's limits for maps ``x`` (``min_channels``, and the firing rates of
    :data:`~spikingformer.layers.routes.SPIKE_CONV_MAX_DENSITY`'s passes): float32 maps outside
    autocast, this ISA's; float32 or bf16 maps under CPU bf16 autocast, its bf16 limits where it has
    them (:data:`~spikingformer.layers.routes.SPIKE_CONV_BF16`); else None (the module call)."""
    if not torch.is_autocast_enabled("cpu"):
        return ({"min_channels": routes._spike_conv_min_channels, **routes._spike_conv_max_density}
                if x.dtype == torch.float32 else None)
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return routes._spike_conv_bf16 if bf16 else None


def takes(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``spike_conv`` computes ``conv(x)`` for spike maps ``x`` ``(N, C_in, H, W)``: the route
    on, limits for x's dtype and autocast (:func:`_limits`), a plain 3x3 convolution
    (:func:`~spikingformer.layers.winograd.plain_3x3`) of non-empty CPU maps with at least the
    limits' ``min_channels`` input channels. :func:`convolve` then picks the operator."""
    limits = _limits(x) if routes.enabled("spike_conv") and x.device.type == "cpu" else None
    return (limits is not None and x.dim() == 4 and x.numel() > 0 and x.shape[1] >= limits["min_channels"]
            and winograd.plain_3x3(conv))


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for spike maps ``x``. With ``spike_conv`` where :func:`takes` says so, per the
    limits of :func:`_limits` and the maps' sampled firing rate
    (:func:`~spikingformer.kernels.spike_conv_ops.sampled_rate`): in inference,
    :func:`~spikingformer.kernels.spike_conv_ops.convolve` (by accumulation up to its ``"infer"``
    rate, else in integer arithmetic on a CPU with 8-bit matrix tiles), else the module call
    (here and below: by F(2x2, 3x3) where the ``winograd`` route takes it,
    :func:`~spikingformer.layers.winograd.convolve`); in training, :func:`~spikingformer.kernels.spike_conv_ops.convolve_train` where the sample fires
    at most at the ``"weight_grad"`` rate (the forward summed up to its ``"train"`` rate) and, on a
    CPU with 8-bit matrix tiles, at any rate (the forward in integer arithmetic above the
    ``"train"`` rate), else the module call. Under ``torch.compile``, which cannot read the rate
    ahead, training always takes the operator, which reads it inside (above the ``"weight_grad"``
    rate its backward unpacks the bits for PyTorch's weight gradient). Under CPU bf16 autocast the
    operators take autocast's casts of the maps, weight and bias (bf16). Where ``winograd`` takes
    the maps (:func:`~spikingformer.layers.winograd.takes`), the operators' dense convolutions run
    by F(2x2, 3x3) (in bf16 under bf16 autocast): their forward, and in training the input gradient and
    the weight gradient where it is not summed; and the limits are at most
    :data:`~spikingformer.layers.routes.SPIKE_CONV_BESIDE_WINOGRAD`'s (this ISA's), measured against
    F(2x2, 3x3). Values differ from the dense convolution's by rounding."""
    if not takes(conv, x):
        return winograd.convolve(conv, x)
    limits, autocast = _limits(x), torch.is_autocast_enabled("cpu")
    rate = -1.0 if torch.compiler.is_compiling() else ops.sampled_rate(x)  # -1: the operator counts it
    training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))
    wino = winograd.takes(conv, x)
    if wino:  # beside F(2x2, 3x3), not the direct convolution
        limits = {p: min(v, routes._spike_conv_beside_winograd.get(p, v)) for p, v in limits.items()}
    # above the limit the module call (or winograd's), but for the int8 pieces (float32 on a CPU with AMX) in the operators
    if rate > limits["weight_grad" if training else "infer"] and (autocast or not ops.native_int8()):
        return winograd.convolve(conv, x)
    x, weight, bias = winograd.operands(conv, x)  # under autocast, what autocast hands the convolution
    if training:
        return ops.convolve_train(x, weight, bias, limits["train"], limits["weight_grad"], rate, wino)
    return ops.convolve(x, weight, bias, limits["infer"], rate, wino)
