"""BatchNorm's batch statistics for the fused training routes: ``torch.batch_norm_update_stats``
bit for bit, by the kernel library's ``sf_bn_batch_stats`` (``csrc/bn_cpu.cpp``) where it
reproduces PyTorch's CPU kernel on this machine and thread count, else PyTorch's own.

PyTorch's kernel (channels-last rows of C channels) makes two passes, each summing the rows one at
a time into a float buffer per thread: on the event model's first stage (268 MB, 32 channels) 51 ms
on one thread, where one streaming pass takes 17. The library makes the same passes in the same
runs and order, faster (on two threads 28 ms against PyTorch's 43; docs/performance-log.md).
"""

from __future__ import annotations

import ctypes

import torch

from spikingformer.kernels.cpu_backend import get_library

# thread count -> the fma setting with which sf_bn_batch_stats reproduces PyTorch's batch statistics
# (None: neither does), probed once per count (PyTorch's kernel sums one run of rows per thread)
_STATS_FMA: dict[int, int | None] = {}


def _kernel_batch_stats(lib: ctypes.CDLL, flat: torch.Tensor, running_mean: torch.Tensor | None,
                        running_var: torch.Tensor | None, momentum: float, fma: int,
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, var)`` of float32 rows ``flat`` ``(N, C)`` (contiguous) by ``sf_bn_batch_stats``,
    which updates the running estimates (contiguous float32, or ``None``) in place; ``None`` if it
    refuses (fma = 1 on a build without FMA)."""
    mean, var = torch.empty(flat.shape[1]), torch.empty(flat.shape[1])
    running = [t.data_ptr() if t is not None else None for t in (running_mean, running_var)]
    threads = torch.get_num_threads()
    rc = lib.sf_bn_batch_stats(flat.data_ptr(), *flat.shape, threads, fma, momentum, mean.data_ptr(), var.data_ptr(),
                               *running, threads)
    return (mean, var) if rc == 0 else None


def _stats_fma(lib: ctypes.CDLL) -> int | None:
    """The ``fma`` setting with which the kernel's statistics equal PyTorch's bit for bit at this
    thread count (mean, variance and running estimates of a channels-last 4-D and a 2-D probe, two
    momentums), or ``None``: then :func:`batch_norm_update_stats` stays PyTorch's."""
    threads = torch.get_num_threads()
    if threads not in _STATS_FMA:
        g = torch.Generator().manual_seed(0)
        probes = [(torch.randn(3, 24, 5, 7, generator=g) * 2 + 0.5).contiguous(memory_format=torch.channels_last),
                  torch.randn(131, 20, generator=g) * 3 - 1]
        _STATS_FMA[threads] = None
        for fma in (1, 0):
            same = True
            for x, momentum in ((probes[0], 0.1), (probes[1], 1 / 3)):
                c = x.shape[1]
                running = (torch.rand(c, generator=g) * 2 - 1, torch.rand(c, generator=g) + 0.5)
                ours = [t.clone() for t in running]
                want = torch.batch_norm_update_stats(x, *running, momentum)
                got = _kernel_batch_stats(lib, x.movedim(1, -1).reshape(-1, c), *ours, momentum, fma)
                same = same and got is not None and all(torch.equal(a, b) for a, b in zip((*got, *ours),
                                                                                          (*want, *running)))
            if same:
                _STATS_FMA[threads] = fma
                break
    return _STATS_FMA[threads]


def batch_norm_update_stats(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                            momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.batch_norm_update_stats(x, running_mean, running_var, momentum)`` for BN's input ``x``
    (``(N, C)``, or ``(N, C, H, W)`` channels-last): the batch mean and biased variance, the running
    estimates updated in place, bit for bit. For float32 ``x`` the library's two passes over the
    rows where they reproduce PyTorch's kernel on this machine and thread count (:func:`_stats_fma`),
    else PyTorch's."""
    lib = get_library()
    c = x.shape[1]
    flat = x.movedim(1, -1).reshape(-1, c) if x.dim() in (2, 4) else None
    usable = (lib is not None and x.dtype == torch.float32 and flat is not None and flat.is_contiguous()
              and flat.data_ptr() == x.data_ptr() and flat.shape[0] > 1
              and all(t is None or (t.dtype == torch.float32 and t.is_contiguous())
                      for t in (running_mean, running_var)))
    fma = _stats_fma(lib) if usable else None
    stats = _kernel_batch_stats(lib, flat, running_mean, running_var, momentum, fma) if fma is not None else None
    return stats if stats is not None else torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
