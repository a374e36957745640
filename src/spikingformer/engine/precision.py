"""Numeric precision of a run: autocast's dtype for ``--amp`` and the TF32 switches for ``--tf32``.

Imports PyTorch only (and :mod:`spikingformer.cpu_features`), so that the benchmarks' workers in an
environment of their own, such as SpikingJelly 0.0.0.0.12's, can set the same precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from spikingformer.cpu_features import BF16_EMULATED, native_bf16


# --amp's names of the autocast dtypes (None: full float32)
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on this device (None: full fp32).

    ``auto`` means bf16 on CPUs with native bf16 support (AVX512-BF16 / AMX), fp16 on CUDA and full
    float32 on an Apple GPU (MPS), where the half-precision routes have not been measured.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else None
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 is for GPUs: on the CPU PyTorch emulates float16 (the digits model trained about "
                         "200x slower than in float32) and runs no gradient scaler; use --amp bf16 where the CPU has it "
                         "natively (`spikingformer info` says) or --amp off")
    if amp == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn(f"spikingformer: --amp bf16: {BF16_EMULATED} (--amp off is faster here)", RuntimeWarning, stacklevel=2)
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise ValueError(f"unknown amp mode '{amp}'; valid: auto, off, bf16, fp16")


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of a training run: on for float16 on a GPU (CUDA or MPS), where small gradients
    would underflow unscaled; off (it passes the loss through) otherwise. bf16 has float32's range."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type in ("cuda", "mps"))


def set_tf32(enabled: bool) -> None:
    """Whether float32 matrix products (cuBLAS) and convolutions (cuDNN) may run on TF32 tensor cores
    (NVIDIA Ampere and newer; products with 10 mantissa bits, sums in float32). Both or neither:
    PyTorch's own default allows it for convolutions only, so a model built from ``nn.Linear`` would
    compute at another precision than the same model built from 1x1 convolutions (the authors'
    ``Conv1d`` token layers). No effect on other devices."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32_switches(enabled: bool, device: torch.device | None = None) -> Iterator[None]:
    """:func:`set_tf32` within the ``with`` block; the caller's switches again after it (training and
    evaluation are library calls too, and must not change the precision of the process around them).
    Asked for on another ``device`` than a GPU, it says in one warning that it does nothing there."""
    if enabled and device is not None and device.type != "cuda":
        warnings.warn(f"spikingformer: --tf32 is for NVIDIA GPUs; on the {device.type} float32 products stay in full "
                      "float32 (it has no effect in this run)", UserWarning, stacklevel=3)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
