"""The caching CPU allocator, installed when the ``spikingformer`` command starts.

**Why.** A training step of a spiking transformer allocates and frees many large temporaries
(T x B x N x D activations, their spikes and gradients: tens to hundreds of MB each). PyTorch's
default CPU allocator is the C library's ``malloc``; glibc serves every block above its mmap
threshold (at most 32 MiB by default) with a fresh ``mmap`` and unmaps it on ``free``, so every
step page-faults its working set in again and the kernel zeroes each fresh 4 KiB page (a large
share of a training step; measurements in docs/performance.md). Keeping glibc from returning
memory (a huge mmap threshold) removes the faults but lets the heap fragment and grow.

**What.** :func:`configure_allocator` installs a caching allocator as PyTorch's CPU allocator
(``c10::SetCPUAllocator``; C++ in ``spikingformer/csrc/cpu_allocator.cpp``, compiled on first use
against the installed PyTorch's headers in about a second and cached, like the LIF kernel). Blocks
of 1 MiB and more are rounded to whole 2 MiB pages, mapped with ``MADV_HUGEPAGE`` and cached by
size when freed; a request takes the smallest cached block that holds it and is at most twice its
size. A training step allocates the same sizes every step, so after the first steps nothing new is
mapped: no page faults, no zeroing, and because each large block is its own mapping, no heap
fragmentation. Smaller blocks go to PyTorch's default path. Tensors allocated before the call keep
their original deleter. The cache is given back by :func:`empty_cache` (the trainer calls it
between training and evaluation) or when a mapping fails.

It is a no-op (with the reason in :func:`allocator_state`) when ``SPIKINGFORMER_ALLOCATOR=0`` (or
``off``/``false``/``no``) is set, off Linux, and when the library cannot be built (no compiler;
:class:`~spikingformer.native.NativeLibrary` then warns once); then PyTorch's default allocator
stays. Library users get the same behaviour by calling
``spikingformer.allocator.configure_allocator()`` after ``import torch`` in their own script.

"""

from __future__ import annotations

import ctypes
import os
import platform
import sysconfig
from importlib import resources

ENV_SWITCH = "SPIKINGFORMER_ALLOCATOR"
THRESHOLD = 1 << 20  # blocks from 1 MiB up are cached

_installed = False


def allocator_disabled(environ: dict | None = None) -> bool:
    """True when ``SPIKINGFORMER_ALLOCATOR`` asks to leave PyTorch's default allocator alone."""
    env = os.environ if environ is None else environ
    return env.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def _source() -> str:
    return resources.files("spikingformer").joinpath("csrc/cpu_allocator.cpp").read_text()


def _torch_build() -> str:
    import torch

    return f"{torch.__version__}|{torch.__file__}|{sysconfig.get_platform()}"


def _declare(lib: ctypes.CDLL) -> None:
    lib.sf_alloc_install.argtypes = [ctypes.c_int64]
    lib.sf_alloc_install.restype = ctypes.c_int
    lib.sf_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.sf_alloc_stats.restype = None
    lib.sf_alloc_empty_cache.argtypes = []
    lib.sf_alloc_empty_cache.restype = None


def _library():
    """The allocator's :class:`~spikingformer.native.NativeLibrary` (built against this PyTorch)."""
    import torch

    from spikingformer.native import NativeLibrary

    torch_dir = os.path.dirname(torch.__file__)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-std=c++17", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-I", os.path.join(torch_dir, "include")]
    lib_dir = os.path.join(torch_dir, "lib")
    link = ["-L", lib_dir, "-lc10", f"-Wl,-rpath,{lib_dir}"]
    return NativeLibrary("spikingformer_cpu_allocator", _source, flags, link, key=_torch_build, declare=_declare)


LIBRARY = None  # created on first use (needs torch imported)


def _get_library():
    global LIBRARY
    if LIBRARY is None:
        LIBRARY = _library()
    return LIBRARY


def configure_allocator() -> bool:
    """Install the caching CPU allocator (see the module docstring); True when PyTorch now uses it.

    Safe to call more than once. Never raises: when it cannot install, PyTorch's default stays and
    :func:`allocator_state` says why.
    """
    global _installed
    if _installed:
        return True
    if allocator_disabled() or platform.system() != "Linux":
        return False
    lib = _get_library().get()  # None: it could not be built or loaded, and it said so in one warning
    if lib is None:
        return False
    _installed = lib.sf_alloc_install(THRESHOLD) == 0
    return _installed


def cache_stats() -> dict[str, int]:
    """Counters of the caching allocator (all zero when it is not installed).

    ``mapped``/``cached``/``peak_mapped`` are bytes (the cache's share of ``mapped`` is idle);
    ``hits`` requests served from the cache, ``maps``/``unmaps`` fresh mappings and releases,
    ``live_blocks`` large blocks in use.
    """
    keys = ("mapped", "cached", "peak_mapped", "hits", "maps", "unmaps", "live_blocks")
    if not _installed:
        return dict.fromkeys(keys, 0)
    out = (ctypes.c_int64 * len(keys))()
    LIBRARY.lib.sf_alloc_stats(out)
    return dict(zip(keys, out))


def empty_cache() -> None:
    """Unmap every cached (idle) large block; a no-op when the allocator is not installed."""
    if _installed:
        LIBRARY.lib.sf_alloc_empty_cache()


def allocator_state() -> str:
    """One line saying which CPU allocator this process uses (for benchmark headers)."""
    if _installed:
        return (f"spikingformer caching allocator (blocks >= {THRESHOLD >> 20} MiB cached in 2 MiB pages, "
                "MADV_HUGEPAGE)")
    if allocator_disabled():
        return f"PyTorch default (C library malloc; {ENV_SWITCH}=0)"
    if platform.system() != "Linux":
        return "PyTorch default (C library malloc; the caching allocator is Linux-only)"
    if LIBRARY is not None and LIBRARY.error:
        return f"PyTorch default (C library malloc; the caching allocator did not build: {LIBRARY.error.splitlines()[0][:200]})"
    return "PyTorch default (C library malloc)"
