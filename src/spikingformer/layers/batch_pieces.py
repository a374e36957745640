"""The ``batch_pieces`` route: a tokenizer in inference on pieces of the batch (see
:mod:`spikingformer.layers.routes`, which holds the switch)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spikingformer.layers import routes

PIECE_BYTES = 64 << 20  # stem outputs of at most 64 MB per piece on the CPU (2^24 float32 elements, 2^25 bf16)


def _hooked(module: nn.Module) -> bool:
    return (bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()))


def conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution computes with ``x`` in: under autocast on x's device (CPU or CUDA) a
    float32 ``x`` is cast to autocast's dtype."""
    device = x.device.type
    if device in ("cpu", "cuda") and x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def stem_itemsize(x: torch.Tensor) -> int:
    """Bytes per element of the stem convolution's output for the tokenizer's input ``x``."""
    return conv_dtype(x).itemsize


def piece_elements(device: torch.device, itemsize: int = 4) -> int | None:
    """The most stem-output elements of ``itemsize`` bytes per piece on ``device``: :data:`PIECE_BYTES`
    worth on the CPU; on CUDA (a piece costs a pass of launches) a sixteenth of its memory; else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // (16 * itemsize)
    return PIECE_BYTES // itemsize if device.type == "cpu" else None


def in_pieces(tokenizer: nn.Module, x: torch.Tensor, dim: int, stem_elements: int,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` for a tokenizer's input ``x`` whose batch is dimension ``dim`` and whose stem
    output holds ``stem_elements`` elements; with ``batch_pieces`` in inference, ``fn`` of pieces of
    the batch joined along the tokens' batch dimension (1), each one's stem output at most
    :func:`piece_elements` of x's device (in bytes: a bf16 piece holds twice the elements)."""
    bound = (None if not routes.enabled("batch_pieces") or torch.is_grad_enabled()
             else piece_elements(x.device, stem_itemsize(x)))
    pieces = 1 if bound is None else min(x.shape[dim], -(-stem_elements // bound))
    if pieces < 2 or any(m.training for m in tokenizer.modules()) or _hooked(tokenizer):
        return fn(x)
    return torch.cat([fn(part) for part in x.tensor_split(pieces, dim=dim)], dim=1)
