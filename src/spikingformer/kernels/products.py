"""Float32 CPU products of the token linears through oneDNN's matmul instead of MKL's ``sgemm``.

PyTorch computes float32 CPU products (``F.linear``, ``@``) with MKL. On an x86 CPU that is not
Intel's, MKL runs its generic code, at most AVX2: on an AMD EPYC (Zen 5) with AVX-512, 74-97
GFLOP/s a core on the token linears' shapes, where oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the kernel PyTorch's compiler uses for CPU linears)
reached 110-224 (1.2-2.3x; capped at AVX2, 1.09-1.21x), on both kinds of product the
token linears do with a layer's width as the summed dimension: the forward ``x W^T + b`` and the
input gradient ``grad W`` (docs/performance.md, "Products through oneDNN"). A weight gradient
(``grad^T x``, summed over the rows) stays MKL's: oneDNN's was slower on some of those shapes.

:func:`linear` and :func:`input_grad` are the two products, :func:`takes` says where they run
(float32 CPU tensors, oneDNN built in, not under ``torch.compile``, whose CPU backend only lowers
that kernel for constant weights), and :func:`linear_trainable` is the forward with autograd. Each
sums in another order than MKL: float32 values differ from ``F.linear``'s by rounding.
"""

from __future__ import annotations

from typing import Optional

import torch


_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the call


def takes(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the oneDNN products can compute with ``tensors`` (``None`` entries are ignored):
    float32 CPU tensors, a PyTorch built with oneDNN, and no ``torch.compile`` tracing."""
    if torch.compiler.is_compiling() or not _ONEDNN:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (no autograd) through oneDNN: ``x`` ``(..., K)``, ``weight`` ``(N, K)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` through oneDNN: the input gradient of a linear layer, ``grad`` ``(M, N)``,
    ``weight`` ``(N, K)`` (read through its transposed view, no copy)."""
    return torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")


class _Linear(torch.autograd.Function):
    """:func:`linear` with autograd: the input gradient by :func:`input_grad`, the weight's as MKL's product."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = input_grad(grad, weight) if ctx.needs_input_grad[0] else None
        gw = grad.t() @ x if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear_trainable(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(rows, weight, bias)`` for rows ``(M, K)`` through oneDNN, with autograd."""
    return _Linear.apply(rows, weight, bias)
