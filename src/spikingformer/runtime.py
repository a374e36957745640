"""Process-wide runtime settings applied when the ``spikingformer`` command starts.

**The memory allocator.** A training step of a spiking transformer allocates and frees many large
temporaries (T x B x N x D activations, their spikes and gradients: tens to hundreds of MB each).
glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB by
default) with a fresh ``mmap`` and gives it back to the kernel with ``munmap`` on ``free``; memory
freed at the top of the heap is also returned once more than ``M_TRIM_THRESHOLD`` is free. Every
step therefore page-faults its working set in again, and the kernel zeroes each fresh 4 KiB page:
on the 2-core benchmark machine that cost more than the arithmetic (the 2-256 event model's
training step went from about 5.5 s to 2.2 s with the allocator kept from returning memory).

:func:`configure_allocator` sets, through ``mallopt``,

* ``M_MMAP_THRESHOLD`` = 1 GiB: blocks up to 1 GiB come from the heap, not from their own mapping;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1 (the largest ``int``): free memory at the heap top is kept,

(where a glibc refuses a threshold above 32 MiB, as some releases do, ``M_MMAP_MAX`` = 0 instead:
no block gets its own mapping),

so the pages of one step are reused by the next (the same as starting Python with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``). The price: the process
keeps its heap mapped after a step instead of shrinking between steps, and freed blocks are reused
rather than returned, so the peak resident memory can grow (measured in docs/performance.md: the
2-256 event model's training step 2.6 GB -> 4.0 GB, CIFAR 4-384 unchanged) in exchange for the
speed (event model 2.7 s -> 1.9 s per step).

It is a silent no-op when the C library is not glibc (musl, macOS, Windows), when the user already
tuned the allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or those keys in
``GLIBC_TUNABLES``: their values win), and when ``SPIKINGFORMER_MALLOC=0`` (or ``off``/``false``/
``no``) is set in the environment. Library users get the same behaviour by calling
``spikingformer.runtime.configure_allocator()`` at the start of their own script.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV_SWITCH = "SPIKINGFORMER_MALLOC"

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MMAP_THRESHOLD = 1 << 30  # 1 GiB: blocks above this still get their own mapping
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value it accepts

_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: str | None = None


def allocator_disabled(environ: dict | None = None) -> bool:
    """True when ``SPIKINGFORMER_MALLOC`` asks to leave the allocator alone."""
    env = os.environ if environ is None else environ
    return env.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def user_tuned_allocator(environ: dict | None = None) -> bool:
    """True when the environment already sets glibc's mmap/trim thresholds (the user's choice wins)."""
    env = os.environ if environ is None else environ
    if any(key in env for key in _USER_TUNABLES):
        return True
    tunables = env.get("GLIBC_TUNABLES", "")
    return "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables


def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def configure_allocator() -> str | None:
    """Keep glibc's malloc from unmapping and trimming large blocks (see the module docstring).

    Returns a short description of what was set, or ``None`` when nothing was changed (disabled,
    the user's own settings, or not glibc). Safe to call more than once.
    """
    global _applied
    if _applied is not None:
        return _applied
    if allocator_disabled() or user_tuned_allocator():
        return None
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return None
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        mmap = f"mmap_threshold={MMAP_THRESHOLD}"
    elif mallopt(M_MMAP_MAX, 0):  # a glibc that caps the threshold (32 MiB in some releases): no mmap at all
        mmap = "mmap_max=0"
    else:
        return None
    if not mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return None
    _applied = f"glibc malloc: {mmap}, trim_threshold={TRIM_THRESHOLD}"
    return _applied


def allocator_state() -> str:
    """One line saying how the allocator is set up in this process (for benchmark headers)."""
    if _applied is not None:
        return f"tuned by spikingformer.runtime ({_applied})"
    if user_tuned_allocator():
        keys = [k for k in _USER_TUNABLES if k in os.environ]
        if os.environ.get("GLIBC_TUNABLES"):
            keys.append("GLIBC_TUNABLES=" + os.environ["GLIBC_TUNABLES"])
        return "tuned by the environment (" + ", ".join(keys) + ")"
    if allocator_disabled():
        return f"C library defaults ({ENV_SWITCH}=0)"
    if _glibc_mallopt() is None:
        return "C library defaults (not glibc)"
    return "C library defaults"
