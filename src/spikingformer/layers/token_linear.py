"""The blocks' token linears and their two routes (``token_linear``, ``spike_linear``).

The switch, the per-ISA limits (``ONEDNN_MIN_WEIGHTS``, ``SPIKE_LINEAR_MAX_DENSITY``,
``SPIKE_LINEAR_MIN_WORK``) and the routes' descriptions are in :mod:`spikingformer.layers.routes`,
read at each call.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.kernels import ops, products
from spikingformer.layers import routes


class TokenLinear(nn.Linear):
    """``nn.Linear`` over the channel (last) dimension of tokens; with ``spike_linear``, spikes as
    accumulations (:func:`spikingformer.kernels.ops.spike_linear`); with ``token_linear``, the dense
    products through oneDNN.

    For float32 CPU tensors outside autocast, ``F.linear`` calls MKL's ``sgemm``; ``token_linear``
    computes the forward and the input gradient with oneDNN's matmul instead
    (:mod:`spikingformer.kernels.products`), here and inside ``spike_linear`` (its dense forward and
    its input gradient), for layers of at least :data:`~spikingformer.layers.routes.ONEDNN_MIN_WEIGHTS`
    weights. Elsewhere (CUDA, bf16/fp16, autocast, float64, ``torch.compile``) it is ``F.linear``;
    under CPU autocast ``spike_linear`` takes bf16 spikes where bf16 products run on vector units, and
    a neuron's spikes are kept as bits for backward (:meth:`_autocast_forward`).
    Weights, state dict and hooks are those of ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor, spikes: bool = False) -> torch.Tensor:
        """``F.linear(x, weight, bias)``. ``spikes``: the caller guarantees ``x`` is a spiking neuron's
        output (every element 0 or 1); ``spike_linear`` then keeps it as bits for backward (1/32 of
        the float32 input; anything but spikes raises there)."""
        if x.shape[-1] != self.in_features:  # F.linear's error, the same on every route
            return super().forward(x)
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return self._autocast_forward(x, training, spikes)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        onednn = routes.enabled("token_linear") and self.weight.numel() >= routes.ONEDNN_MIN_WEIGHTS
        if routes.enabled("spike_linear"):
            if x.numel() * self.out_features >= routes._spike_min_work["train" if training else "infer"]:
                rows, _ = ops.spike_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias, routes._spike_max_density,
                                           spikes and training, onednn)
                return rows.view(*x.shape[:-1], self.out_features)
        if not onednn or not products.takes(x, self.weight, self.bias):
            return super().forward(x)
        rows = products.linear_trainable(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return rows.view(*x.shape[:-1], self.out_features)

    def _autocast_forward(self, x: torch.Tensor, training: bool, spikes: bool) -> torch.Tensor:
        """Under CPU autocast: ``F.linear`` as autocast runs it (input, weight and bias cast to the
        autocast dtype, the dense product in it). With ``spike_linear`` on, through
        :func:`~spikingformer.kernels.ops.spike_linear` with the same casts: in bf16 where the route
        has a limit for it (:func:`~spikingformer.layers.routes.spike_limit_bf16`), spikes by
        accumulation, as in float32 (sums in float32, each rounded once to bf16); else the same
        dense product. In training, a neuron's output (``spikes``) is kept as bits for backward."""
        dtype = torch.get_autocast_dtype("cpu")
        on = routes.enabled("spike_linear") and x.dtype in (torch.float32, dtype)  # what autocast casts
        limit = (routes.spike_limit_bf16(self.in_features, self.out_features)
                 if on and dtype == torch.bfloat16 else None)
        accumulate = limit is not None and x.numel() * self.out_features >= routes._spike_min_work[
            "train" if training else "infer"]
        keep_bits = on and spikes and training
        if not (accumulate or keep_bits):
            return super().forward(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        rows, _ = ops.spike_linear(x.reshape(-1, x.shape[-1]).to(dtype), self.weight.to(dtype), bias,
                                   limit if accumulate else 0.0, keep_bits)
        return rows.view(*x.shape[:-1], self.out_features)
