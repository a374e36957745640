"""Host side of the spike linear's C++ kernels (``csrc/spike_linear_cpu.cpp``, built into the
library of :mod:`spikingformer.kernels.cpu_backend`), their plain PyTorch twins, and the dense
fallbacks: token linears on spikes as accumulations of weight columns (forward) and of
output-gradient rows (weight gradient), and spikes packed as bits for backward.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from spikingformer.kernels import cpu_backend, products


def get_library() -> ctypes.CDLL | None:
    """The kernel library (:func:`cpu_backend.get_library`; looked up at each call, so that a test
    can take it away)."""
    return cpu_backend.get_library()


def spike_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What :func:`kernel_spike_linear_forward` computes, in plain PyTorch: for rows ``x`` ``(M, K)`` of
    spikes, the bias plus weight column ``k`` for ``k = 0, 1, ...`` in turn (float32 additions in
    that order; ``x * w`` is exact for spikes, and adding ``0 * w`` changes nothing)."""
    wt = weight.t()
    y = (bias if bias is not None else weight.new_zeros(weight.shape[0])).expand(x.shape[0], -1).clone()
    for k in range(x.shape[1]):
        y += x[:, k:k + 1] * wt[k]
    return y


_SPIKES_PER_CHUNK_ROWS = 128  # kChunk of csrc/spike_linear_cpu.cpp: the weight gradient's row chunks
NOT_SPIKES = ("spike_linear with pack=True: the input holds a value other than 0 and 1; pack only the "
              "output of a spiking neuron (or pass pack=False)")


def packed_width(k: int) -> int:
    """64-bit words per row of packed spikes with ``k`` columns."""
    return (k + 63) // 64


def pack_spikes_reference(x: torch.Tensor) -> torch.Tensor:
    """Spikes ``x`` ``(M, K)`` as bits, ``(M, ceil(K / 64))`` int64: bit ``j`` of word ``w`` of row ``m``
    is ``x[m, 64 w + j] != 0`` (what ``sf_spike_gather`` writes), in plain PyTorch; raises where an
    element is neither 0 nor 1."""
    if not ((x == 0) | (x == 1)).all():
        raise ValueError(NOT_SPIKES)
    m, k = x.shape
    bits = nn.functional.pad(x.detach().to(torch.int64), (0, packed_width(k) * 64 - k)).view(m, -1, 64)
    return (bits << torch.arange(64)).sum(-1)  # distinct powers of two: the sum is the bitwise or


def unpack_spikes_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 spikes ``(M, K)`` of :func:`pack_spikes_reference`'s bits."""
    bits = (packed.unsqueeze(-1) >> torch.arange(64)) & 1
    return bits.view(packed.shape[0], -1)[:, :k].float()


def _gather_spikes(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor | None = None):
    """``(x contiguous, idx, cnt, count)`` of ``sf_spike_gather`` for ``x`` of a dtype of
    :data:`cpu_backend.DTYPE_CODES`: ``count`` spikes, -1 where ``x`` is not spikes (an element
    neither 0 nor 1), -2 for too many columns. With ``packed`` (``(M, packed_width(K))`` int64) the
    spikes' bits are written there too."""
    xk = x.contiguous()
    m, k = xk.shape
    idx = torch.empty(m * k, dtype=torch.int16)
    cnt = torch.empty(m, dtype=torch.int32)
    count = lib.sf_spike_gather(xk.data_ptr(), m, k, cpu_backend.DTYPE_CODES[xk.dtype], idx.data_ptr(), cnt.data_ptr(),
                                packed.data_ptr() if packed is not None else None, torch.get_num_threads())
    return xk, idx, cnt, count


def _gather_packed(lib: ctypes.CDLL, packed: torch.Tensor, k: int):
    """``(idx, cnt, count)`` as :func:`_gather_spikes` gives them, from packed bits."""
    m = packed.shape[0]
    idx = torch.empty(m * k, dtype=torch.int16)
    cnt = torch.empty(m, dtype=torch.int32)
    count = lib.sf_spike_gather_packed(packed.contiguous().data_ptr(), m, k, idx.data_ptr(), cnt.data_ptr(),
                                       torch.get_num_threads())
    return idx, cnt, count


def _sparse(count: int, numel: int, max_density: float) -> bool:
    """Whether the kernels take ``count`` spikes among ``numel`` elements (the caller checks the
    rest): spikes at all (``count`` >= 0) at a firing rate of at most ``max_density``."""
    return 0 <= count <= max_density * numel


def kernel_spike_linear_forward(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                max_density: float, packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x W^T + b`` for rows ``x`` ``(M, K)`` of spikes, as accumulations (``csrc/spike_linear_cpu.cpp``):
    ``x``, ``weight`` and ``bias`` of one dtype of :data:`cpu_backend.DTYPE_CODES`, summed in float32
    and rounded once to it; ``None`` (nothing computed) when an element of ``x`` is neither 0 nor 1,
    or more than ``max_density`` of them are ones, or ``K`` exceeds the kernel's 16-bit indices. With
    ``packed`` (``(M, packed_width(K))`` int64), ``x``'s bits are written there whatever the firing
    rate, and an ``x`` that is not spikes raises."""
    # the output first, then the kernel's scratch: a scratch block freed in front of the output
    # (which autograd may keep until backward) would leave a hole in the caching allocator's segment
    y = x.new_empty(x.shape[0], weight.shape[0])
    xk, idx, cnt, count = _gather_spikes(lib, x, packed)
    if packed is not None and count == -1:
        raise ValueError(NOT_SPIKES)
    if not _sparse(count, x.numel(), max_density):
        return None
    m, k = xk.shape
    n = weight.shape[0]
    w = weight.detach().contiguous()
    b = bias.detach().contiguous() if bias is not None else None
    # W^T in tiles of output columns, widened to float32 (the kernel's scratch)
    tiles = torch.empty(-(-n // 64) * 64 * k, dtype=torch.float32)
    lib.sf_spike_linear_forward(idx.data_ptr(), cnt.data_ptr(), m, k, w.data_ptr(), b.data_ptr() if b is not None else None,
                                n, y.data_ptr(), tiles.data_ptr(), cpu_backend.DTYPE_CODES[w.dtype],
                                torch.get_num_threads())
    return y


def spike_linear_weight_grad_reference(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What :func:`kernel_spike_linear_weight_grad` computes, in plain PyTorch: ``grad^T x`` for spikes
    ``x`` ``(M, K)``, each weight's gradient summed over the rows ``m = 0, 1, ...`` in turn."""
    gw = grad.new_zeros(grad.shape[1], x.shape[1])
    for m in range(x.shape[0]):
        gw += grad[m][:, None] * x[m]
    return gw


def _accumulate_weight_grad(lib: ctypes.CDLL, idx: torch.Tensor, cnt: torch.Tensor, count: int, k: int,
                            grad: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """``gw`` ``(N, K)``, allocated by the caller before the spike lists (as the forward's output)."""
    gk = grad.contiguous()
    m, n = gk.shape
    chunks = (m + _SPIKES_PER_CHUNK_ROWS - 1) // _SPIKES_PER_CHUNK_ROWS
    cols = torch.empty(max(count, 1), dtype=torch.int16)
    starts = torch.empty(chunks * (k + 1), dtype=torch.int64)
    lib.sf_spike_linear_weight_grad(idx.data_ptr(), cnt.data_ptr(), m, k, gk.data_ptr(), n, gw.data_ptr(),
                                    cols.data_ptr(), starts.data_ptr(), cpu_backend.DTYPE_CODES[gk.dtype],
                                    torch.get_num_threads())
    return gw


def kernel_spike_linear_weight_grad(lib: ctypes.CDLL, x: torch.Tensor, grad: torch.Tensor,
                                    max_density: float) -> torch.Tensor | None:
    """``grad^T x`` ``(N, K)`` for rows ``x`` ``(M, K)`` of spikes and the output gradient ``grad``
    ``(M, N)`` (both of one dtype of :data:`cpu_backend.DTYPE_CODES`), as accumulations in float32
    rounded once to that dtype; ``None`` where :func:`kernel_spike_linear_forward` declines."""
    gw = grad.new_empty(grad.shape[1], x.shape[1])
    _, idx, cnt, count = _gather_spikes(lib, x)
    sparse = _sparse(count, x.numel(), max_density)
    return _accumulate_weight_grad(lib, idx, cnt, count, x.shape[1], grad, gw) if sparse else None


def kernel_spike_linear_weight_grad_packed(lib: ctypes.CDLL, packed: torch.Tensor, k: int, grad: torch.Tensor,
                                           max_density: float) -> torch.Tensor | None:
    """:func:`kernel_spike_linear_weight_grad` from the packed bits of ``x`` (``K`` = ``k`` columns)."""
    gw = grad.new_empty(grad.shape[1], k)
    idx, cnt, count = _gather_packed(lib, packed, k)
    sparse = _sparse(count, packed.shape[0] * k, max_density)
    return _accumulate_weight_grad(lib, idx, cnt, count, k, grad, gw) if sparse else None


def pack_spikes(x: torch.Tensor) -> torch.Tensor:
    """Spikes ``x`` ``(M, K)`` (float32, float16 or bfloat16) as :func:`pack_spikes_reference`'s bits:
    the kernel, else that reference; raises where an element is neither 0 nor 1."""
    lib = get_library()
    if lib is None or x.dtype not in cpu_backend.DTYPE_CODES:
        return pack_spikes_reference(x)
    xk = x.contiguous()
    packed = torch.empty(xk.shape[0], packed_width(xk.shape[1]), dtype=torch.int64)
    if lib.sf_spike_pack(xk.data_ptr(), *xk.shape, cpu_backend.DTYPE_CODES[xk.dtype], packed.data_ptr(),
                         torch.get_num_threads()) != 0:
        raise ValueError(NOT_SPIKES)
    return packed


def unpack_spikes(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The spikes ``(M, K)`` of packed bits, in ``dtype``: the kernel, else :func:`unpack_spikes_reference`."""
    lib = get_library()
    if lib is None or dtype not in cpu_backend.DTYPE_CODES:
        return unpack_spikes_reference(packed, k).to(dtype)
    x = torch.empty(packed.shape[0], k, dtype=dtype)
    lib.sf_spike_unpack(packed.contiguous().data_ptr(), packed.shape[0], k, x.data_ptr(), cpu_backend.DTYPE_CODES[dtype],
                        torch.get_num_threads())
    return x


def _matmul_error(a: tuple[int, ...], b: tuple[int, ...]) -> RuntimeError:
    """The error ``a @ b`` raises for matrices that do not fit."""
    return RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({'x'.join(map(str, a))} and {'x'.join(map(str, b))})")


def check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise what ``F.linear`` raises for rows ``x`` ``(M, K)`` that ``weight`` ``(N, K)`` and
    ``bias`` ``(N,)`` do not fit (the kernels would read past them or sum the wrong weights)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise _matmul_error(tuple(x.shape), tuple(weight.shape[::-1]))
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"bias of shape {tuple(bias.shape)} does not fit a linear layer of {weight.shape[0]} outputs")


def check_weight_grad_shapes(m: int, k: int, grad: torch.Tensor, packed: torch.Tensor | None = None) -> None:
    """Raise what ``grad^T x`` raises unless ``grad`` ``(M, N)`` has x's ``m`` rows, and a
    ``ValueError`` unless ``packed`` holds ``m`` rows of ``k`` bits (the kernels read x's sizes)."""
    if packed is not None and tuple(packed.shape) != (m, packed_width(k)):
        raise ValueError(f"packed spikes of {m} rows x {k} columns are ({m}, {packed_width(k)}) int64; "
                         f"got {tuple(packed.shape)}")
    if grad.dim() != 2 or grad.shape[0] != m:
        raise _matmul_error(tuple(grad.shape[::-1]), (m, k))


def _kernel_dtype(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these operands: all (``None`` aside) of one dtype, float32 or 16-bit
    (:data:`cpu_backend.DTYPE_CODES`). Mixed dtypes go to the dense product, which raises as
    ``F.linear`` does."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= cpu_backend.DTYPE_CODES.keys()


def spike_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_density: float,
                         pack: bool = False, onednn: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.linear(x, weight, bias), packed)`` for rows ``x`` ``(M, K)``: by accumulation of weight
    columns (:func:`kernel_spike_linear_forward`) where ``x`` is spikes with a firing rate of at most
    ``max_density`` (``x``, ``weight`` and ``bias`` of one dtype, float32 or 16-bit: the caller
    passes that dtype's limit; a limit of 0 or below always takes the dense product), else the
    dense product (with ``onednn``, :func:`products.linear` where it takes it). ``packed``: with
    ``pack``, ``x`` as bits (``(M, packed_width(K))`` int64; ``x`` must be spikes), else an empty
    tensor."""
    check_shapes(x, weight, bias)
    lib = get_library()
    m, k = x.shape
    packed = torch.empty((m, packed_width(k)) if pack else (0,), dtype=torch.int64)
    dense = not _kernel_dtype(x, weight, bias) or max_density <= 0
    product = products.linear if onednn and products.takes(x, weight, bias) else nn.functional.linear
    if lib is None or dense or not x.numel() or k > 65536:
        return product(x, weight, bias), pack_spikes(x) if pack else packed
    y = kernel_spike_linear_forward(lib, x, weight, bias, max_density, packed if pack else None)
    return (y if y is not None else product(x, weight, bias)), packed


def spike_linear_weight_grad(x: torch.Tensor, grad: torch.Tensor, max_density: float) -> torch.Tensor:
    """The weight gradient ``grad^T x`` of :func:`spike_linear_forward`: by accumulation
    (:func:`kernel_spike_linear_weight_grad`) where ``x`` is spikes with a firing rate of at most
    ``max_density`` (``x`` and ``grad`` of one dtype, as the forward's), else the dense product."""
    check_weight_grad_shapes(x.shape[0], x.shape[1], grad)
    lib = get_library()
    dense = not _kernel_dtype(x, grad) or max_density <= 0
    gw = None if lib is None or dense or not x.numel() else kernel_spike_linear_weight_grad(lib, x, grad, max_density)
    return gw if gw is not None else grad.t() @ x


def spike_linear_weight_grad_packed(packed: torch.Tensor, k: int, grad: torch.Tensor, max_density: float,
                                    ) -> torch.Tensor:
    """:func:`spike_linear_weight_grad` for the input kept as packed bits (``K`` = ``k`` columns): by
    accumulation where it applies, else the dense product of the unpacked spikes."""
    check_weight_grad_shapes(packed.shape[0], k, grad, packed)
    lib = get_library()
    usable = lib is not None and _kernel_dtype(grad) and max_density > 0 and packed.numel() and k <= 65536
    gw = kernel_spike_linear_weight_grad_packed(lib, packed, k, grad, max_density) if usable else None
    return gw if gw is not None else grad.t() @ unpack_spikes(packed, k, grad.dtype)
