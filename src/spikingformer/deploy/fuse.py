"""ConvBN fusion for deployment (paper Appendix B, Eq. 24-26).

In eval mode a BatchNorm is the affine map ``y = w_bn * x + b_bn`` with
``w_bn = gamma / sqrt(var + eps)`` and ``b_bn = beta - w_bn * mu``; folded into the preceding
convolution/linear layer ``x = W u + b`` it gives one layer::

    W' = w_bn * W        (scaled per output channel)
    b' = w_bn * b + b_bn (a bias is created where the layer had none)

Every :class:`~spikingformer.layers.ConvBN` (``conv`` + ``bn``) and
:class:`~spikingformer.layers.TokenConvBN` (``linear`` + ``bn``) is fused this way and its BN
replaced by ``nn.Identity``, so the model's forward code runs unchanged. A fused model has no BN
left: every synaptic layer's input goes straight into a weight sum (what the accumulate-only path
in :mod:`spikingformer.deploy.accumulate` needs).

Fused checkpoints are written by :func:`spikingformer.checkpoints.save_fused` and rebuilt by
:func:`spikingformer.models.model_from_checkpoint`: build the model from its config,
:func:`fuse_structure` (Identity BNs and zero biases), load the state dict.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# (attribute of the weight layer, attribute of the BN applied to its output)
FUSABLE_PAIRS = (("conv", "bn"), ("linear", "bn"))
_WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_BN_TYPES = nn.modules.batchnorm._BatchNorm


def fuse_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(W', b')`` of a layer with weight ``(C_out, ...)`` and optional bias ``(C_out,)``
    followed by an eval-mode BN over ``C_out`` channels. Computed in float64, returned in the weight's dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False)")
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else scale * bias.double() + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def _fusable_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, weight attr, bn attr)`` for every Conv/Linear + BN pair (ConvBN, TokenConvBN)."""
    pairs = []
    for module in model.modules():
        for w_attr, bn_attr in FUSABLE_PAIRS:
            layer, bn = getattr(module, w_attr, None), getattr(module, bn_attr, None)
            if isinstance(layer, _WEIGHT_TYPES) and isinstance(bn, _BN_TYPES):
                pairs.append((module, w_attr, bn_attr))
    return pairs


def _remaining_batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BN_TYPES)]


@torch.no_grad()
def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself) with every Conv/Linear+BN pair fused; in eval mode.

    Raises ValueError if a BatchNorm is left that does not follow a fusable layer.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for parent, w_attr, bn_attr in _fusable_pairs(model):
        layer, bn = getattr(parent, w_attr), getattr(parent, bn_attr)
        w, b = fuse_weights(layer.weight, layer.bias, bn)
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.copy_(b)
        setattr(parent, bn_attr, nn.Identity())
    left = _remaining_batchnorms(model)
    if left:
        raise ValueError(f"these BatchNorm layers do not follow a conv/linear layer and were not fused: {', '.join(left)}")
    return model


def fuse_structure(model: nn.Module) -> nn.Module:
    """Give ``model`` the fused layout without computing anything: Identity BNs, zero biases.

    Use it to load a fused state dict into a freshly built model.
    """
    for parent, w_attr, bn_attr in _fusable_pairs(model):
        layer = getattr(parent, w_attr)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        setattr(parent, bn_attr, nn.Identity())
    return model.eval()


def is_fused(model: nn.Module) -> bool:
    """True if the model holds no BatchNorm."""
    return not _remaining_batchnorms(model)
