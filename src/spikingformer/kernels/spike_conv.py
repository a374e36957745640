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

On a CPU with 8-bit matrix tiles (AMX) the three int8 convolutions take less time than one float32
convolution for wide enough inputs; with 8-bit dot products alone (AVX512-VNNI) they were as often
slower as faster, and without either (AVX2 alone) they take longer.

**Accumulation** (:func:`accumulate_conv2d`): a 3x3 convolution is a linear map of each output
pixel's window of ``9 C_in`` inputs; for spikes, the sum of the weights of the window's spikes.
``sf_spike_window_lists`` lists them per window from the maps' own spike lists (taps in row-major
order, channels within a tap) and the spike linear's forward adds those weight columns, bias
first, in that order: float32 additions, as many as the window's spikes times ``C_out``, so the
work falls with the firing rate. Its twin (:func:`accumulate_conv_reference`) unfolds the maps
and runs :func:`~spikingformer.kernels.spike_linear.spike_linear_reference`; the two agree bit for
bit. In bf16 (maps, weights and bias all bf16, as CPU autocast casts them) the sums run in float32
and each is rounded once: the float32 twin of the widened operands, rounded once.
:mod:`spikingformer.kernels.spike_conv_ops` decides where each runs.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.kernels import cpu_backend, spike_linear

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


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float32 maps ``x`` as uint8 in the same layout, or a ``ValueError`` unless every element is an
    integer from 0 to 255: the library's ``sf_spike_to_u8`` (one pass) for contiguous or channels-last
    maps where it is built; else PyTorch's conversion and a comparison back, its twin."""
    lib = spike_linear.get_library()
    if lib is not None and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        xq = torch.empty_like(x, dtype=torch.uint8)  # the same strides: memory order is element order for both
        if lib.sf_spike_to_u8(x.data_ptr(), x.numel(), xq.data_ptr(), torch.get_num_threads()) != 0:
            raise ValueError(NOT_SPIKES)
        return xq
    xq = x.to(torch.uint8)
    if not torch.equal(xq.to(x.dtype), x):
        raise ValueError(NOT_SPIKES)
    return xq


def spike_conv2d(x: torch.Tensor, pieces: PackedPieces, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` (stride 1) for float32 spike maps ``x``
    ``(N, C_in, H, W)`` and the :class:`PackedPieces` of ``weight``: three int8 convolutions with
    float32 output, added smallest piece first, then the bias; the output channels-last. Integers up to 255 (as
    uint8 holds them) are exact as well; anything else raises a ``ValueError`` (:func:`as_uint8`)."""
    xq = as_uint8(x)
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


def _unfolded_rows(x: torch.Tensor) -> torch.Tensor:
    """Maps ``(N, C_in, H, W)`` as one row of ``9 C_in`` inputs per output pixel (of a 3x3
    convolution with padding 1): taps row-major, channels within a tap."""
    n, c, h, w = x.shape
    return nn.functional.unfold(x, 3, padding=1).view(n, c, 9, h * w).permute(0, 3, 2, 1).reshape(-1, 9 * c)


def accumulate_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """What :func:`accumulate_conv2d` computes, in plain PyTorch: the maps ``x`` unfolded into one row
    per output pixel (taps row-major, channels within a tap), through
    :func:`~spikingformer.kernels.spike_linear.spike_linear_reference` (the bias, then the weight
    column of every spike in turn, float32 additions); ``(N, C_out, H, W)``."""
    n, _, h, w = x.shape
    y = spike_linear.spike_linear_reference(_unfolded_rows(x), window_weight(weight), bias)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def _window_passes(lib, pidx: torch.Tensor, pcnt: torch.Tensor, shape: torch.Size):
    """``(m0, rows, idx, cnt)`` per pass of at most :data:`ROWS_PER_PASS` output pixels (rows
    ``m0 .. m0 + rows`` of the unfolded windows): each window's spikes listed by
    ``sf_spike_window_lists`` from the pixels' spike lists ``pidx``, ``pcnt`` of maps of ``shape``
    ``(N, C_in, H, W)``. The two buffers are the same in every pass."""
    n, c, h, w = shape
    m = n * h * w
    per, threads = min(ROWS_PER_PASS, m), torch.get_num_threads()
    idx, cnt = torch.empty(per * 9 * c, dtype=torch.int16), torch.empty(per, dtype=torch.int32)
    for m0 in range(0, m, per):
        rows = min(per, m - m0)
        lib.sf_spike_window_lists(pidx.data_ptr(), pcnt.data_ptr(), n, h, w, c, m0, rows, idx.data_ptr(),
                                  cnt.data_ptr(), threads)
        yield m0, rows, idx, cnt


def accumulate_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_density: float,
                      packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """``conv2d(x, weight, bias, padding=1)`` (stride 1) for spike maps ``x`` ``(N, C_in, H, W)`` by
    accumulation (see the module's description), its output channels-last: ``x``, ``weight`` and
    ``bias`` float32, or all 16-bit (the sums in float32, each rounded once to that dtype); ``None`` (nothing
    computed) where more than ``max_density`` of ``x`` are ones, where ``9 C_in`` exceeds the
    kernels' 16-bit indices, or without the kernel library. Raises a ``ValueError`` if ``x`` holds
    anything but 0 and 1. With ``packed`` (``(N H W, packed_width(C_in))`` int64), the spikes of
    each pixel (channels in order) are written there as bits whatever the firing rate (for
    :func:`accumulate_conv_weight_grad`)."""
    lib = spike_linear.get_library()
    n, c, h, w = x.shape
    if lib is None or 9 * c > 65536 or not x.numel():
        return None
    cout, m = weight.shape[0], n * h * w
    y = x.new_empty(m, cout)  # the output before the scratch (see kernel_spike_linear_forward)
    _, pidx, pcnt, count = spike_linear._gather_spikes(lib, x.permute(0, 2, 3, 1).reshape(m, c), packed)
    if count == -1:
        raise ValueError(NOT_BINARY)
    if count > max_density * x.numel():
        return None
    w2 = window_weight(weight.detach())
    b = bias.detach().contiguous() if bias is not None else None
    tiles = x.new_empty(-(-cout // 64) * 64 * 9 * c, dtype=torch.float32)  # the weight widened (the kernel's scratch)
    for m0, rows, idx, cnt in _window_passes(lib, pidx, pcnt, x.shape):
        lib.sf_spike_linear_forward(idx.data_ptr(), cnt.data_ptr(), rows, 9 * c, w2.data_ptr(),
                                    b.data_ptr() if b is not None else None, cout, y[m0].data_ptr(),
                                    tiles.data_ptr(), cpu_backend.DTYPE_CODES[w2.dtype], torch.get_num_threads())
    return y.view(n, h, w, cout).permute(0, 3, 1, 2)


def _grad_rows(grad: torch.Tensor) -> torch.Tensor:
    """An output gradient ``(N, C_out, H, W)`` as rows ``(N H W, C_out)`` (a view where channels-last)."""
    return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])


def _window_weight_grad(gw: torch.Tensor, c: int) -> torch.Tensor:
    """The weight gradient ``(C_out, C_in, 3, 3)`` of its unfolded-window form ``(C_out, 9 C_in)``."""
    return gw.view(gw.shape[0], 3, 3, c).permute(0, 3, 1, 2).contiguous()


def accumulate_conv_weight_grad_reference(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What :func:`accumulate_conv_weight_grad` computes, in plain PyTorch: the unfolded windows of
    the spike maps ``x`` as in :func:`accumulate_conv_reference`; per pass of :data:`ROWS_PER_PASS`
    output pixels, :func:`~spikingformer.kernels.spike_linear.spike_linear_weight_grad_reference` of
    its windows and output-gradient rows (each weight's gradient summed over the pass's pixels in
    order); the passes' sums added in order."""
    rows, g = _unfolded_rows(x), _grad_rows(grad)
    gw = None
    for m0 in range(0, rows.shape[0], ROWS_PER_PASS):
        part = spike_linear.spike_linear_weight_grad_reference(rows[m0:m0 + ROWS_PER_PASS], g[m0:m0 + ROWS_PER_PASS])
        gw = part if gw is None else gw + part
    return _window_weight_grad(gw, x.shape[1])


def accumulate_conv_weight_grad(packed: torch.Tensor, shape: torch.Size, grad: torch.Tensor,
                                max_density: float = 1.0) -> torch.Tensor | None:
    """The weight gradient ``(C_out, C_in, 3, 3)`` of the convolution (3x3, stride 1, padding 1) of the
    spike maps of ``shape`` ``(N, C_in, H, W)`` kept as ``packed`` bits (``(N H W, packed_width(C_in))``,
    channels in order, as :func:`accumulate_conv2d` or
    :func:`~spikingformer.kernels.spike_linear.pack_spikes` of the channels-last rows write them), for
    the output gradient ``grad`` ``(N, C_out, H, W)`` (float32, or 16-bit, widened after the rate is
    known: the gradient is float32 whatever its dtype): for every window's spike, the output
    gradient of its pixel added to the weight's (the spike linear's weight-gradient kernel) per pass
    of :data:`ROWS_PER_PASS` pixels, the passes' sums added in order (shorter running sums than one
    over every pixel: the event model's 2^19 pixels per map summed in one ran 4x further from
    float64 than the float32 convolution's gradient). ``None`` (nothing computed) where more than
    ``max_density`` of the spikes' places are ones, where ``9 C_in`` exceeds the kernels' 16-bit
    indices, or without the kernel library."""
    lib = spike_linear.get_library()
    c = shape[1]
    if lib is None or 9 * c > 65536:
        return None
    pidx, pcnt, count = spike_linear._gather_packed(lib, packed, c)
    if count > max_density * packed.shape[0] * c:
        return None
    g = _grad_rows(grad).float()
    gw, part = None, g.new_empty(g.shape[1], 9 * c)
    for m0, rows, idx, cnt in _window_passes(lib, pidx, pcnt, shape):
        spike_linear._accumulate_weight_grad(lib, idx, cnt, int(cnt[:rows].sum()), 9 * c, g[m0:m0 + rows], part)
        gw = part.clone() if gw is None else gw.add_(part)
    return _window_weight_grad(gw, c)
