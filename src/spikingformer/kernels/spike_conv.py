"""A 3x3 convolution of spike maps in integer arithmetic (oneDNN's int8 convolution), and its
plain PyTorch twin.

Spikes are 0 or 1: exact as unsigned 8-bit integers. Each float32 weight of output channel ``o``
is written as three 8-bit pieces, ``w = s1 q1 + s2 q2 + s3 q3 + r`` with ``|q| <= 127`` and
float32 scales per channel and piece (:func:`weight_pieces`): every piece takes the remainder of
the ones before it, so ``|r| <= s3 / 2``, about ``2^-24`` of the channel's largest weight (half a
float32 ulp of it). oneDNN sums ``x q_k`` over a window exactly in int32 and writes
``s_k * sum`` as float32 (one rounding); the three pieces' outputs are added smallest first (two
more). The result is the exact convolution of the spikes with the pieces' weights, to three
roundings: closer to the float64 convolution than float32's own sum of hundreds of rounded terms
(docs/performance.md, "Spike convolution").

On a CPU with 8-bit dot products (AVX512-VNNI or AMX) the three int8 convolutions take less time
than one float32 convolution for wide enough inputs; without them (AVX2 alone) they take longer.
:mod:`spikingformer.layers.spike_conv` decides where it runs.
"""

from __future__ import annotations

import torch

PIECES = 3
_STRIDE, _PADDING, _DILATION = [1, 1], [1, 1], [1, 1]


def weight_pieces(weight: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The pieces ``(q_k, s_k)``, ``k = 1..3``, of float32 weights ``(C_out, C_in, kh, kw)``: ``q_k``
    int8 of the weight's shape, ``s_k`` float32 ``(C_out,)``, with ``weight = sum_k s_k q_k + r`` and
    ``|r| <= s_3 / 2`` per channel. Computed in float64, where each remainder is exact (``q s`` has
    at most 7 + 24 significant bits). A channel with nothing left gets scale 1 and zeros."""
    rest = weight.detach().double().flatten(1)
    qs, scales = [], []
    for _ in range(PIECES):
        s = (rest.abs().amax(1) / 127).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(rest / s.double()[:, None]).clamp_(-127, 127)
        rest = rest - q * s.double()[:, None]
        qs.append(q.to(torch.int8).view(weight.shape))
        scales.append(s)
    return qs, scales


def spike_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`spike_conv2d` computes, in plain PyTorch: each piece's convolution of the spikes
    ``x`` in float64 (exact: integer sums well below 2^53), scaled and rounded to float32, the
    pieces' outputs added smallest first in float32, then the bias."""
    qs, scales = weight_pieces(weight)
    parts = [(torch.nn.functional.conv2d(x.double(), q.double(), padding=1) * s.double()[:, None, None]).float()
             for q, s in zip(qs, scales)]
    y = parts[-1]
    for part in reversed(parts[:-1]):
        y = y + part
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class PackedPieces:
    """The pieces of one weight tensor in oneDNN's packed form, for input maps ``(N, C_in, H, W)``."""

    def __init__(self, weight: torch.Tensor) -> None:
        qs, self.scales = weight_pieces(weight)
        self.packed = [torch.ops.onednn.qconv_prepack(q, s, 1.0, 0, _STRIDE, _PADDING, _DILATION, 1, None)
                       for q, s in zip(qs, self.scales)]
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)


NOT_SPIKES = ("spike_conv: the convolution's input holds a value that is not an integer from 0 to 255 "
              "(spikes are 0 or 1); only a spiking neuron's output may take this route")


def spike_conv2d(x: torch.Tensor, pieces: PackedPieces, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` (stride 1) for float32 spike maps ``x``
    ``(N, C_in, H, W)`` and the :class:`PackedPieces` of ``weight``: three int8 convolutions with
    float32 output, added smallest piece first, then the bias; the output channels-last. Integers up to 255 (as
    uint8 holds them) are exact as well; anything else raises a ``ValueError``."""
    xq = x.to(torch.uint8)
    if not torch.equal(xq.to(x.dtype), x):
        raise ValueError(NOT_SPIKES)
    y = None
    for k in reversed(range(PIECES)):
        part = torch.ops.onednn.qconv2d_pointwise(xq, 1.0, 0, pieces.packed[k], pieces.scales[k], pieces.zero_points,
                                                  None, _STRIDE, _PADDING, _DILATION, 1, 1.0, 0, torch.float32,
                                                  "none", [], "")
        y = part if y is None else y.add_(part)
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1))
