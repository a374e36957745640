"""Fast multi-step LIF backends and the dispatcher that picks one.

Every backend computes exactly what :func:`spikingformer.neuron.lif_reference` computes (spikes
bit-for-bit, gradients to float32 rounding); ``tests/test_kernels.py`` holds them to it.
"""

from __future__ import annotations

from typing import Callable

import torch

from spikingformer.kernels.torch_loop import lif_torch_loop
from spikingformer.neuron import LIFParams

LIFKernel = Callable[[torch.Tensor, LIFParams], torch.Tensor]

_BACKENDS: dict[str, LIFKernel] = {"torch": lif_torch_loop}


def available_backends() -> list[str]:
    """Names accepted by ``multistep_lif(..., backend=NAME)`` besides "auto" and "reference"."""
    return sorted(_BACKENDS)


def select_backend(x: torch.Tensor) -> str:
    """The fastest backend for a tensor on its device."""
    return "torch"


def lif(x: torch.Tensor, p: LIFParams, backend: str = "auto") -> torch.Tensor:
    name = select_backend(x) if backend == "auto" else backend
    try:
        kernel = _BACKENDS[name]
    except KeyError:
        valid = ", ".join(["auto", "reference", *available_backends()])
        raise ValueError(f"unknown LIF backend {backend!r}; valid backends: {valid}") from None
    return kernel(x, p)
