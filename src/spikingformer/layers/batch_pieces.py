"""The ``batch_pieces`` route: a tokenizer in inference on pieces of the batch (see
:mod:`spikingformer.layers.routes`, which holds the switch)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spikingformer.layers import routes

PIECE_ELEMENTS = 1 << 24  # stem outputs of at most 16M elements (64 MB fp32) per piece on the CPU


def _hooked(module: nn.Module) -> bool:
    return (bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()))


def piece_elements(device: torch.device) -> int | None:
    """The most stem-output elements per piece on ``device``: :data:`PIECE_ELEMENTS` on the CPU; on
    CUDA (a piece costs a pass of launches) float32 elements for a sixteenth of its memory; else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // (16 * 4)
    return PIECE_ELEMENTS if device.type == "cpu" else None


def in_pieces(tokenizer: nn.Module, x: torch.Tensor, dim: int, stem_elements: int,
              fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` for a tokenizer's input ``x`` whose batch is dimension ``dim`` and whose stem
    output holds ``stem_elements`` elements; with ``batch_pieces`` in inference, ``fn`` of pieces of
    the batch joined along the tokens' batch dimension (1), each one's stem output at most
    :func:`piece_elements` of x's device."""
    bound = None if not routes.enabled("batch_pieces") or torch.is_grad_enabled() else piece_elements(x.device)
    pieces = 1 if bound is None else min(x.shape[dim], -(-stem_elements // bound))
    if pieces < 2 or any(m.training for m in tokenizer.modules()) or _hooked(tokenizer):
        return fn(x)
    return torch.cat([fn(part) for part in x.tensor_split(pieces, dim=dim)], dim=1)
