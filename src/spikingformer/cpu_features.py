"""What this CPU computes natively, and a fixed thread count for reproducible runs.

:func:`native_bf16` says whether this CPU computes bfloat16 natively; everything that offers bf16
asks it (without native support bf16 is emulated and several times slower than float32).
:func:`pin_threads` fixes the CPU thread count, so that two seeded runs compute alike.
"""

from __future__ import annotations

import ctypes
import os
import platform

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 products are emulated under them
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively: x86 with AVX512-BF16 or AMX (and oneDNN not capped
    below them by ``ONEDNN_MAX_CPU_ISA``), other CPUs as oneDNN reports (Arm BF16). Elsewhere bf16
    is emulated in float32 arithmetic and slower than float32 itself."""
    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_ISAS_WITHOUT_BF16:
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


BF16_EMULATED = ("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and several times slower "
                 "than float32")


def pin_threads() -> int:
    """Fix the CPU thread count for the rest of the process, so that repeated runs round alike.

    Matrix products and reductions split across threads sum in another order with another number
    of threads. Two things may change that number while a run goes on: OpenMP's dynamic
    adjustment (``OMP_DYNAMIC=true`` lets GNU OpenMP size each team by the system's load average)
    and MKL's dynamic threading (on unless ``torch.set_num_threads`` was called, when MKL picks
    the thread count per call). This keeps torch's current count, calls ``torch.set_num_threads``
    with it (which also turns MKL's dynamic threading off) and ``omp_set_dynamic(0)``. Returns the
    thread count.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_dynamic(0)  # the GNU OpenMP runtime PyTorch has loaded
    except (OSError, AttributeError):
        pass  # another OpenMP runtime: its teams keep the size torch.set_num_threads gave
    return threads
