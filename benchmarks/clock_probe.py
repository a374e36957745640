"""The clock a core of this machine runs at, measured: the theoretical FMA peak needs it, and in a
virtual machine ``/proc/cpuinfo`` reports the nominal clock, not the boost clock the cores run at
(an AMD EPYC reported 2.60 GHz while its convolutions ran at 1.2-1.4x the peak that clock allows).

:func:`measured_ghz` times a chain of dependent register additions, one per cycle on every x86-64
core (a register operand: no CPU folds these at rename, as some fold small immediates), compiled
from C with the system's ``cc`` into a temporary library; ``None`` where there is no x86-64 or no
compiler. Best of several runs, on the calling thread: the clock of one busy core.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ADDS_PER_ITERATION = 8
SOURCE = r"""
#include <stdint.h>
uint64_t sf_add_chain(uint64_t iterations, uint64_t step) {
  uint64_t x = 0;
  for (uint64_t i = 0; i < iterations; ++i)
    __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
                     "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(step));
  return x;
}
"""


def _library() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if platform.machine().lower() not in ("x86_64", "amd64") or compiler is None:
        return None
    with tempfile.TemporaryDirectory(prefix="sf_clock_") as tmp:  # the loaded library outlives its file
        folder = Path(tmp)
        (folder / "chain.c").write_text(SOURCE)
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(folder / "chain.so"),
                               str(folder / "chain.c")], capture_output=True, text=True)
        if done.returncode != 0:
            return None
        lib = ctypes.CDLL(str(folder / "chain.so"))
    lib.sf_add_chain.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.sf_add_chain.restype = ctypes.c_uint64
    return lib


def measured_ghz(iterations: int = 1 << 24, runs: int = 7) -> float | None:
    """The clock of the calling thread's core in GHz: additions per second of a dependent chain
    (best of ``runs``, after one warm-up that lets the core reach its boost clock); ``None`` where
    it cannot be measured."""
    lib = _library()
    if lib is None:
        return None
    if lib.sf_add_chain(iterations, 1) != iterations * ADDS_PER_ITERATION:
        return None
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        lib.sf_add_chain(iterations, 1)
        best = min(best, time.perf_counter() - t)
    return iterations * ADDS_PER_ITERATION / best / 1e9


if __name__ == "__main__":
    ghz = measured_ghz()
    print("not measurable here" if ghz is None else f"{ghz:.2f} GHz")
