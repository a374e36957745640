"""Fast multi-step LIF backends and the dispatcher that picks one.

Every backend computes exactly what :func:`spikingformer.neuron.lif_reference` computes (spikes
bit-for-bit, gradients to float32 rounding); ``tests/test_kernels.py`` holds them to it.

Backends:

* ``"torch"`` -- :mod:`~spikingformer.kernels.torch_backend`: plain PyTorch ops, any device.
* ``"cpu"`` -- :mod:`~spikingformer.kernels.cpu_backend`: a fused C++ kernel for CPU tensors, compiled on
  first use (15-23 s on a 2-core Xeon, once per machine) and cached; falls back to ``"torch"``
  with one warning if it cannot be built.
* ``"triton"`` -- :mod:`~spikingformer.kernels.triton_backend`: fused Triton kernels for CUDA tensors
  (also CPU tensors under ``TRITON_INTERPRET=1``); listed only when Triton imports.

The fused CPU and CUDA kernels are one PyTorch operator, ``spikingformer::lif``
(:mod:`~spikingformer.kernels.ops`), so ``torch.compile`` and ``torch.export`` trace through them.

Nothing is compiled at import time: the CPU library is built by the first CPU call (or by
:func:`select_backend` deciding whether it can be used), Triton kernels by their first launch.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from spikingformer import torch_release

torch_release.check(torch.__version__)  # before the operators below, which an older PyTorch cannot register

from spikingformer.kernels import cpu_backend as _cpu  # noqa: E402
from spikingformer.kernels.ops import lif_cpu, lif_triton  # noqa: E402 (lif_triton imports Triton on its first call)
from spikingformer.kernels.params import LIFParams  # noqa: E402
from spikingformer.kernels.torch_backend import lif_torch_loop  # noqa: E402

LIFKernel = Callable[[torch.Tensor, LIFParams], torch.Tensor]


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None

_BACKENDS: dict[str, LIFKernel] = {"torch": lif_torch_loop, "cpu": lif_cpu}
if _TRITON_IMPORTABLE:
    _BACKENDS["triton"] = lif_triton


def available_backends() -> list[str]:
    """Names accepted by ``multistep_lif(..., backend=NAME)`` besides "auto" and "reference"."""
    return sorted(_BACKENDS)


@torch.compiler.assume_constant_result  # the compiler evaluates it once, never traces the build
def _cpu_kernel_available() -> bool:
    return _cpu.is_available()


@torch.compiler.assume_constant_result
def _triton_usable() -> bool:
    if not _TRITON_IMPORTABLE:
        return False
    try:
        from spikingformer.kernels import triton_backend  # noqa: F401
    except Exception:  # a broken Triton install must not break the neuron
        return False
    return True


def select_backend(x: torch.Tensor) -> str:
    """The fastest backend for a tensor on its device.

    CPU tensors: ``"cpu"`` when the fused kernel builds (first call builds it), else ``"torch"``.
    CUDA tensors: ``"triton"`` when Triton imports, else ``"torch"``. Other devices: ``"torch"``.
    """
    if x.device.type == "cpu":
        return "cpu" if _cpu_kernel_available() else "torch"
    if x.device.type == "cuda" and _triton_usable():
        return "triton"
    return "torch"


def lif(x: torch.Tensor, p: LIFParams, backend: str = "auto") -> torch.Tensor:
    """Multi-step LIF spikes of ``x`` (time-first) with the named backend ("auto": :func:`select_backend`)."""
    name = select_backend(x) if backend == "auto" else backend
    try:
        kernel = _BACKENDS[name]
    except KeyError:
        valid = ", ".join(["auto", "reference", *available_backends()])
        raise ValueError(f"unknown LIF backend {backend!r}; valid backends: {valid}") from None
    return kernel(x, p)
