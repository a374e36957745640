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
    under CPU autocast a neuron's spikes are kept as bits for backward (:meth:`_autocast_forward`).
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
            return self._autocast_forward(x, spikes and training and routes.enabled("spike_linear"))
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

    def _autocast_forward(self, x: torch.Tensor, keep_bits: bool) -> torch.Tensor:
        """Under CPU autocast: ``F.linear`` as autocast runs it (input, weight and bias cast to the
        autocast dtype, the dense product in it); with ``keep_bits``, through ``spike_linear``'s dense
        path with the same casts, the same product, and the input kept as bits for backward."""
        if not keep_bits:
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu")
        bias = self.bias.to(dtype) if self.bias is not None else None
        rows, _ = ops.spike_linear(x.reshape(-1, x.shape[-1]).to(dtype), self.weight.to(dtype), bias,
                                   routes._spike_max_density, True)
        return rows.view(*x.shape[:-1], self.out_features)

