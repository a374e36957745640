"""A 3x3 convolution of spike maps two ways, each with its plain PyTorch twin: in integer
arithmetic (oneDNN's int8 convolution), for wide inputs, and by accumulation of the weights of
each window's spikes (the spike linear's kernel), for sparse ones.

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

**Accumulation** (:func:`accumulate_conv2d`): a 3x3 convolution is a linear map of each output
pixel's window of ``9 C_in`` inputs; for spikes, the sum of the weights of the window's spikes.
``sf_spike_window_lists`` lists them per window from the maps' own spike lists (taps in row-major
order, channels within a tap) and the spike linear's forward adds those weight columns, bias
first, in that order: float32 additions, as many as the window's spikes times ``C_out``, so the
work falls with the firing rate. Its twin (:func:`accumulate_conv_reference`) unfolds the maps
and runs :func:`~spikingformer.kernels.spike_linear.spike_linear_reference`; the two agree bit for
bit. :mod:`spikingformer.layers.spike_conv` decides where each runs.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.kernels import spike_linear

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


# ----------------------------------------------------------------------------- accumulation

ROWS_PER_PASS = 8192  # windows listed per pass (9 C_in 16-bit slots each: 14 MB for C_in = 96)
NOT_BINARY = ("spike_conv: the convolution's input holds a value other than 0 and 1; only a spiking "
              "neuron's output may take this route")


def window_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weights ``(C_out, C_in, 3, 3)`` as the rows of a linear map of the unfolded windows,
    ``(C_out, 9 C_in)``: column ``(3 i + j) C_in + c`` is tap ``(i, j)`` of input channel ``c``."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def accumulate_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """What :func:`accumulate_conv2d` computes, in plain PyTorch: the maps ``x`` unfolded into one row
    per output pixel (taps row-major, channels within a tap), through
    :func:`~spikingformer.kernels.spike_linear.spike_linear_reference` (the bias, then the weight
    column of every spike in turn, float32 additions); ``(N, C_out, H, W)``."""
    n, c, h, w = x.shape
    rows = nn.functional.unfold(x, 3, padding=1).view(n, c, 9, h * w).permute(0, 3, 2, 1).reshape(-1, 9 * c)
    y = spike_linear.spike_linear_reference(rows, window_weight(weight), bias)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def accumulate_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_density: float
                      ) -> torch.Tensor | None:
    """``conv2d(x, weight, bias, padding=1)`` (stride 1) for float32 spike maps ``x`` ``(N, C_in, H, W)``
    by accumulation (see the module's description), its output channels-last; ``None`` (nothing
    computed) where more than ``max_density`` of ``x`` are ones, where ``9 C_in`` exceeds the
    kernels' 16-bit indices, or without the kernel library. Raises a ``ValueError`` if ``x`` holds
    anything but 0 and 1."""
    lib = spike_linear.get_library()
    n, c, h, w = x.shape
    if lib is None or 9 * c > 65536 or not x.numel():
        return None
    cout, m = weight.shape[0], n * h * w
    y = x.new_empty(m, cout)  # the output before the scratch (see kernel_spike_linear_forward)
    _, pidx, pcnt, count = spike_linear._gather_spikes(lib, x.permute(0, 2, 3, 1).reshape(m, c))
    if count == -1:
        raise ValueError(NOT_BINARY)
    if count > max_density * x.numel():
        return None
    w2 = window_weight(weight.detach())
    b = bias.detach().contiguous() if bias is not None else None
    per, threads = min(ROWS_PER_PASS, m), torch.get_num_threads()
    tiles = x.new_empty(-(-cout // 64) * 64 * 9 * c)
    idx, cnt = torch.empty(per * 9 * c, dtype=torch.int16), torch.empty(per, dtype=torch.int32)
    for m0 in range(0, m, per):
        rows = min(per, m - m0)
        lib.sf_spike_window_lists(pidx.data_ptr(), pcnt.data_ptr(), n, h, w, c, m0, rows, idx.data_ptr(),
                                  cnt.data_ptr(), threads)
        lib.sf_spike_linear_forward(idx.data_ptr(), cnt.data_ptr(), rows, 9 * c, w2.data_ptr(),
                                    b.data_ptr() if b is not None else None, cout, y[m0].data_ptr(),
                                    tiles.data_ptr(), threads)
    return y.view(n, h, w, cout).permute(0, 3, 1, 2)
