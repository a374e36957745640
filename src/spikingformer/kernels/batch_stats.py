"""BatchNorm's batch statistics for the fused training routes: ``torch.batch_norm_update_stats``
bit for bit, by the kernel library's ``sf_bn_batch_stats`` (``csrc/bn_cpu.cpp``) where it
reproduces PyTorch's CPU kernel on this machine and thread count, else PyTorch's own.

PyTorch's kernel (channels-last rows of C channels) makes two passes, each summing the rows one at
a time into a float buffer per thread: on the event model's first stage (268 MB, 32 channels) 51 ms
on one thread, where one streaming pass takes 17. The library makes the same passes in the same
runs and order, faster (on two threads 28 ms against PyTorch's 43; docs/performance-log.md). For
bfloat16 maps (BN's input under CPU autocast) PyTorch's mixed-precision kernel reads them as float
and adds the runs' sums in float where the float32 one uses float64; the library does the same.
"""

from __future__ import annotations

import ctypes

import torch

from spikingformer.kernels.cpu_backend import DTYPE_CODES, get_library

# (thread count, dtype) -> the fma setting with which sf_bn_batch_stats reproduces PyTorch's batch
# statistics (None: none does), probed once per pair (PyTorch's kernel sums one run of rows per
# thread; its float32 and bfloat16 kernels are two): bit 0, the squares' sum rounds once; bit 1,
# the running variance's (PyTorch's x86 builds: float32 3, bfloat16 1)
_STATS_FMA: dict[tuple[int, torch.dtype], int | None] = {}
_FMA_SETTINGS = (3, 1, 2, 0)
DTYPES = (torch.float32, torch.bfloat16)


def _kernel_batch_stats(lib: ctypes.CDLL, flat: torch.Tensor, running_mean: torch.Tensor | None,
                        running_var: torch.Tensor | None, momentum: float, fma: int,
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, var)`` (float32) of float32 or bfloat16 rows ``flat`` ``(N, C)`` (contiguous) by
    ``sf_bn_batch_stats``, which updates the running estimates (contiguous float32, or ``None``) in
    place; ``None`` if it refuses (fma on a build without FMA)."""
    mean, var = torch.empty(flat.shape[1]), torch.empty(flat.shape[1])
    running = [t.data_ptr() if t is not None else None for t in (running_mean, running_var)]
    threads = torch.get_num_threads()
    rc = lib.sf_bn_batch_stats(flat.data_ptr(), *flat.shape, threads, fma, momentum, mean.data_ptr(), var.data_ptr(),
                               *running, DTYPE_CODES[flat.dtype], threads)
    return (mean, var) if rc == 0 else None


def _stats_fma(lib: ctypes.CDLL, dtype: torch.dtype) -> int | None:
    """The ``fma`` setting with which the kernel's statistics of ``dtype`` maps equal PyTorch's bit
    for bit at this thread count (mean, variance and running estimates of a channels-last 4-D and a
    2-D probe, two momentums, more rows than threads), or ``None``: then
    :func:`batch_norm_update_stats` stays PyTorch's."""
    threads = torch.get_num_threads()
    key = (threads, dtype)
    if key not in _STATS_FMA:
        g = torch.Generator().manual_seed(0)
        images = 3 + threads // 35  # 35 rows an image
        probes = [(torch.randn(images, 24, 5, 7, generator=g) * 2 + 0.5).to(dtype),
                  (torch.randn(131 + threads, 20, generator=g) * 3 - 1).to(dtype)]
        probes[0] = probes[0].contiguous(memory_format=torch.channels_last)
        runnings = [(torch.rand(x.shape[1], generator=g) * 2 - 1, torch.rand(x.shape[1], generator=g) + 0.5)
                    for x in probes]
        _STATS_FMA[key] = next((fma for fma in _FMA_SETTINGS if _reproduces(lib, probes, runnings, fma)), None)
    return _STATS_FMA[key]


def _reproduces(lib: ctypes.CDLL, probes: list[torch.Tensor], runnings: list, fma: int) -> bool:
    """Whether the kernel with setting ``fma`` gives PyTorch's statistics and running estimates of every probe."""
    for x, running, momentum in zip(probes, runnings, (0.1, 1 / 3)):
        c = x.shape[1]
        want_running, ours = [t.clone() for t in running], [t.clone() for t in running]
        want = torch.batch_norm_update_stats(x, *want_running, momentum)
        got = _kernel_batch_stats(lib, x.movedim(1, -1).reshape(-1, c), *ours, momentum, fma)
        if got is None or not all(torch.equal(a, b) for a, b in zip((*got, *ours), (*want, *want_running))):
            return False
    return True


def batch_norm_update_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                            momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.batch_norm_update_stats(x, running_mean, running_var, momentum)`` for BN's input ``x``
    (``(N, C)``, or ``(N, C, H, W)`` channels-last): the batch mean and biased variance, the running
    estimates updated in place, bit for bit. For float32 or bfloat16 ``x`` of more rows than threads
    the library's two passes over the rows where they reproduce PyTorch's kernel on this machine and
    thread count (:func:`_stats_fma`), else PyTorch's (with as many rows as threads or fewer, or maps
    that are NCHW-contiguous as well, one channel of more than one pixel, its kernel sums each
    channel's values in one sum, in another order)."""
    lib = get_library()
    c = x.shape[1]
    flat = x.movedim(1, -1).reshape(-1, c) if x.dim() in (2, 4) else None
    # maps that are NCHW-contiguous too (one channel) take PyTorch's NCHW kernel, not the channels-last one
    nchw = x.dim() == 4 and x.is_contiguous() and x.shape[2] * x.shape[3] > 1
    usable = (lib is not None and x.dtype in DTYPES and flat is not None and flat.is_contiguous() and not nchw
              and flat.data_ptr() == x.data_ptr() and flat.shape[0] > torch.get_num_threads()
              and all(t is None or (t.dtype == torch.float32 and t.is_contiguous())
                      for t in (running_mean, running_var)))
    fma = _stats_fma(lib, x.dtype) if usable else None
    stats = _kernel_batch_stats(lib, flat, running_mean, running_var, momentum, fma) if fma is not None else None
    return stats if stats is not None else torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
