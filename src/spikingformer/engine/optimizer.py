"""The training run's optimizer: timm's by name, with PyTorch's fused kernel where it has one.

PyTorch's ``Adam``, ``AdamW`` and ``SGD`` step every parameter in one fused kernel when built with
``fused=True``; without it, on the CPU, they loop over the parameters with several elementwise
operations each. On the zoo's parameters the fused step took 0.31-0.45 of the loop's time (CIFAR
4-384's 9.3 M parameters: AdamW 8.8 against 23.4 ms on 2 threads; docs/performance.md, "The
optimizer step") and updates the parameters to float32 rounding of the loop's. So where timm's
name resolves to one of those classes and every parameter is on the CPU or a CUDA device, the
optimizer is built fused; any other optimizer (LAMB, LARS, ...) as timm builds it.

Imports PyTorch and timm only, so that the benchmarks' workers build the same optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

# the classes measured faster fused; each takes ``fused=True`` for CPU and CUDA parameters
FUSED_CLASSES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICES = ("cpu", "cuda")


def fused_option(opt: str, params: list[torch.Tensor]) -> dict:
    """``{"fused": True}`` where timm's optimizer ``opt`` (``lookahead_`` prefix allowed) is one of
    :data:`FUSED_CLASSES` and every parameter is a floating-point tensor on one of
    :data:`FUSED_DEVICES`; else ``{}``."""
    from timm.optim import get_optimizer_info

    name = opt.lower().removeprefix("lookahead_")
    cls = get_optimizer_info(name).opt_class
    fits = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if isinstance(cls, type) and issubclass(cls, FUSED_CLASSES) and fits and params else {}


def build_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, eps: float,
                    momentum: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` for ``model`` (no weight decay on biases and norms), fused
    where :func:`fused_option` says so."""
    from timm.optim import create_optimizer_v2

    params = [p for p in model.parameters() if p.requires_grad]
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, eps=eps, momentum=momentum,
                               **fused_option(opt, params))
