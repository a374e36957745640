"""What this CPU computes natively, and a fixed thread count for reproducible runs.

:func:`vector_isa` names the vector ISA PyTorch's CPU kernels use here (the key of the per-ISA
route choice in :mod:`spikingformer.layers.routes`); :func:`onednn_cap` reads the one setting that
caps oneDNN below this CPU's ISA. :func:`native_bf16` says whether this CPU computes bfloat16 natively; everything that offers bf16
asks it (without native support bf16 is emulated and several times slower than float32).
:func:`native_int8` says whether it has 8-bit matrix tiles (AMX; the ``spike_conv`` route asks it),
:func:`bf16_matrix_tiles` whether its bf16 products run on them (the ``spike_linear`` route asks it).
:func:`mkl_generic` says whether MKL runs its generic (non-Intel) code here (the ``token_linear``
route asks it).
:func:`pin_threads` fixes the CPU thread count, so that two seeded runs compute alike.
:func:`usable_cpus` counts the CPUs this process may use: its affinity and its cgroup's CPU quota
(a container's ``--cpus``), which PyTorch's default thread count does not read.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
from pathlib import Path

# ONEDNN_MAX_CPU_ISA values that cap oneDNN below native bf16 (AVX512_CORE_BF16), with the vector
# ISA each still allows
_ONEDNN_CAPS = {"SSE41": "sse", "AVX": "sse", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
                "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512"}
# ONEDNN_MAX_CPU_ISA values that allow native bf16 on vector units but not oneDNN's matrix tiles (AMX)
_BELOW_AMX = {"AVX512_CORE_BF16", "AVX512_CORE_FP16"}


def onednn_cap(environ: dict | None = None) -> str | None:
    """The vector ISA (``"sse"``, ``"avx2"``, ``"avx512"``) that ``ONEDNN_MAX_CPU_ISA`` caps oneDNN to,
    when it caps it below native bf16; ``None`` when it does not."""
    env = os.environ if environ is None else environ
    return _ONEDNN_CAPS.get(env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper())


# the environment variables that choose the ISA of a process's arithmetic: oneDNN's, PyTorch's
# kernels', MKL's, and the project's kernel library's -march (spikingformer.native)
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "SPIKINGFORMER_NATIVE_ARCH")


def isa_variables_set() -> list[str]:
    """``NAME=value`` for each of :data:`ISA_VARIABLES` set in the environment."""
    return [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if os.environ.get(name)]


def vector_isa() -> str:
    """``"avx512"``, ``"avx2"`` or ``"other"``: the vector ISA PyTorch's CPU kernels use here, as capped
    by ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` (either cap below AVX-512 gives ``"avx2"``)."""
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    if aten == "AVX512" and onednn_cap() in (None, "avx512"):
        return "avx512"
    return "avx2" if aten in ("AVX512", "AVX2") else "other"


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively: x86 with AVX512-BF16 or AMX (and oneDNN not capped
    below them by ``ONEDNN_MAX_CPU_ISA``), other CPUs as oneDNN reports (Arm BF16). Elsewhere bf16
    is emulated in float32 arithmetic and slower than float32 itself."""
    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        if onednn_cap() is not None:
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amx_allowed(environ: dict | None = None) -> bool:
    """False where ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below its matrix tiles (AMX), True otherwise
    (whether the CPU has them or not)."""
    env = os.environ if environ is None else environ
    return onednn_cap(env) is None and env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() not in _BELOW_AMX


def _amx_tiles() -> bool:
    """x86 matrix tiles (AMX), with oneDNN not capped below them by ``ONEDNN_MAX_CPU_ISA``."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or not amx_allowed():
        return False
    return bool(torch.cpu._is_amx_tile_supported())


def bf16_matrix_tiles() -> bool:
    """True when this CPU's bfloat16 products run on matrix tiles (AMX; oneDNN not capped below
    them), not on vector units (AVX512-BF16): the ``spike_linear`` route keeps autocast's dense
    product there (on an Intel Xeon with AMX the tiles' product beat its sums at every firing rate
    measured, 0.05-0.50)."""
    return _amx_tiles()


def native_int8() -> bool:
    """True when this CPU has 8-bit integer matrix tiles (AMX) and oneDNN is not capped below them by
    ``ONEDNN_MAX_CPU_ISA``: where oneDNN's int8 convolution outpaces its float32 one several times.
    8-bit dot products alone (AVX512-VNNI) do not count: on an AMD EPYC (Zen 5) with them, the spike
    convolution's three int8 pieces ran 0.21-1.24x the float32 convolution's speed on the zoo's
    shapes, and a CIFAR inference batch 1.43x slower with them (docs/performance-log.md)."""
    import torch

    return _amx_tiles() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in ``/proc/cpuinfo`` (Linux), or ``""``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The x86 CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) from ``/proc/cpuinfo``,
    else from :func:`platform.processor`; ``""`` where neither names it (other CPUs, other systems)."""
    vendor = _cpuinfo("vendor_id")
    if vendor:
        return vendor
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), "")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else :func:`platform.processor` or the machine."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def mkl_generic() -> bool:
    """True on an x86 CPU that is not Intel's (AMD, Hygon, ...) with a PyTorch built with MKL and
    oneDNN: there MKL, which computes PyTorch's float32 CPU products, runs its generic code (at
    most AVX2) while oneDNN runs the CPU's own ISA (the ``token_linear`` route's rule)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    vendor = cpu_vendor()
    return bool(vendor and vendor != "GenuineIntel" and torch.backends.mkl.is_available()
                and torch.backends.mkldnn.is_available())


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


CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use: those of its affinity (``taskset``, a cpuset), at most its
    cgroup's CPU quota rounded up (Docker's ``--cpus``, a Kubernetes CPU limit: cgroup v2's
    ``cpu.max`` of its cgroup and every parent, or v1's ``cpu.cfs_quota_us``). A container limited to
    2 CPUs on a 64-core host sees 64 cores, and PyTorch's default threads would contend for the 2."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = _cgroup_quotas(CGROUP if cgroup is None else cgroup)
    return max(1, min([cpus, *(math.ceil(q) for q in quotas)]))


def _cgroup_quotas(root: Path, own: str | None = None) -> list[float]:
    """The CPU quotas (in CPUs) that bind this process: for each CPU controller of ``own`` (the text
    of ``/proc/self/cgroup``), cgroup v2's ``cpu.max`` or v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``, in its cgroup's folder and every parent's up to the mount."""
    if own is None:
        try:
            own = Path("/proc/self/cgroup").read_text()
        except OSError:
            own = ""
    pairs = []  # (quota, period) in microseconds, as read
    for line in own.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:  # v2: "0::/path"
            base, files = root, ("cpu.max",)  # "max 100000" or "200000 100000"
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            base, files = root / "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us")  # -1 for none
        else:
            continue
        folder = base / path.strip("/")
        for d in [folder, *folder.parents]:
            pairs.append([field for name in files for field in _read_fields(d / name)])
            if d == base:
                break
    quotas = []
    for pair in pairs:
        try:
            quota, period = int(pair[0]), int(pair[1])  # "max" (v2) or -1 (v1): no quota
        except (IndexError, ValueError):
            continue
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    return quotas


def fit_threads_to_quota() -> int | None:
    """Lower PyTorch's CPU threads to :func:`usable_cpus` where they exceed it and the user set no
    ``OMP_NUM_THREADS``; returns the new count, or ``None`` where nothing changed."""
    import torch

    usable = usable_cpus()
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= usable:
        return None
    torch.set_num_threads(usable)
    return usable


def _read_fields(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except (OSError, ValueError):
        return []
