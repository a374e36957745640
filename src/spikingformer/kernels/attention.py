"""Spike attention's products on the CPU (``csrc/attention_cpu.cpp``, in the library of
:mod:`spikingformer.kernels.cpu_backend`) as the operator ``spikingformer::spike_attention``, and
their plain PyTorch twin.

For token rows ``q``, ``k``, ``v`` of shape ``(R, N, C)`` with ``heads`` heads of ``d = C / heads``
channels each (head ``h``: channels ``[h d, (h + 1) d)``), the operator returns the rows of
``(Q_h (K_h^T V_h)) * scale``: what :func:`~spikingformer.layers.blocks.spike_attention` computes
for ``N > d``, without the copies into head-major layouts that PyTorch's batched product needs
(route ``fused_attention``, :mod:`spikingformer.layers.routes`). Sums in float32; ``K^T V`` and its
product with ``Q`` rounded to the storage dtype (float32 or bfloat16) as PyTorch's products store
them, then the scale: for spikes (sums of integers, exact) the plain path's values bit for bit.

The operator is not differentiable (the route takes it only without autograd) and is registered
with a fake implementation, so ``torch.compile`` and ``torch.export`` keep it as one opaque call.
"""

from __future__ import annotations

import torch

from spikingformer.kernels import cpu_backend

HEAD_DIMS = (16, 32, 48, 64)  # those the kernel is built for
DTYPES = (torch.float32, torch.bfloat16)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """What the kernel computes, in plain PyTorch: the heads of the rows ``(R, N, C)`` as
    ``(R, heads, N, d)``, ``q @ (k^T @ v) * scale``, back to rows (contiguous)."""
    r, n, c = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(r, n, heads, c // heads).transpose(1, 2)

    y = split(q) @ (split(k).transpose(-2, -1) @ split(v)) * scale
    return y.transpose(1, 2).reshape(r, n, c)


def kernel_takes(q: torch.Tensor, heads: int) -> bool:
    """Whether the kernel computes rows like ``q`` (its dtype, its head dimension) with ``heads`` heads."""
    c = q.shape[-1]
    return q.dtype in DTYPES and c % heads == 0 and c // heads in HEAD_DIMS


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"spike_attention: q, k and v must be token rows (R, N, C) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"spike_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads <= 0 or q.shape[-1] % heads:
        raise ValueError(f"spike_attention: {q.shape[-1]} channels do not split into {heads} heads")


@torch.library.custom_op("spikingformer::spike_attention", mutates_args=(), device_types="cpu")
def spike_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The rows of ``(Q_h (K_h^T V_h)) * scale`` (see the module docstring); :func:`attention_reference`
    where the kernel does not take the rows (dtype, head dimension) or the library cannot be built."""
    _check(q, k, v, heads)
    lib = cpu_backend.get_library()
    if lib is None or not kernel_takes(q, heads):
        return attention_reference(q, k, v, heads, scale)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    y = torch.empty(q.shape, dtype=q.dtype)
    r, n, c = q.shape
    if q.numel():
        rc = lib.sf_spike_attention(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), y.data_ptr(), r, n, c, c // heads,
                                    cpu_backend.DTYPE_CODES[q.dtype], scale, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"sf_spike_attention failed with code {rc}")
    return y


@spike_attention.register_fake
def _spike_attention_fake(q, k, v, heads, scale):
    _check(q, k, v, heads)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
