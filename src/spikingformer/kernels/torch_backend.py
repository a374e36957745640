"""Fused multi-step LIF written with plain PyTorch ops and a hand-written backward.

Forward runs the T-step recurrence without building an autograd graph and saves only the charged
membrane ``H`` (float32); spikes are recomputed from it in backward (``S = H >= V_th``).
Backward walks the recurrence in reverse::

    dL/dH[t] = gS[t] * sg'(H[t] - V_th) + gV[t] * dV[t]/dH[t]
    dV[t]/dH[t] = (1 - S[t])                                  (detach_reset=True)
                = (1 - S[t]) + (V_reset - H[t]) * sg'(H[t] - V_th)   (detach_reset=False)
    dL/dX[t] = dL/dH[t] / tau,      gV[t-1] = dL/dH[t] * (1 - 1/tau)

This runs on any device and is the portable fallback for the compiled kernels.
"""

from __future__ import annotations

import torch

from spikingformer.kernels.params import LIFParams, sigmoid_surrogate_grad


def lif_forward(x: torch.Tensor, p: LIFParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (spikes in x.dtype, H in float32)."""
    h_all = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    v = torch.full(x.shape[1:], p.v_reset, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        h = h_all[t]
        torch.add(v, (x[t].float() - (v - p.v_reset)) / p.tau, out=h)
        s = (h >= p.v_threshold).float()
        v = h * (1.0 - s) + p.v_reset * s
    spikes = (h_all >= p.v_threshold).to(x.dtype)
    return spikes, h_all


def lif_backward(grad_spikes: torch.Tensor, h_all: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Gradient with respect to the input current, float32, shape of H."""
    grad_x = torch.empty_like(h_all)
    grad_v = torch.zeros_like(h_all[0])
    decay = 1.0 - 1.0 / p.tau
    for t in range(h_all.shape[0] - 1, -1, -1):
        h = h_all[t]
        sg = sigmoid_surrogate_grad(h - p.v_threshold, p.alpha)
        not_spiked = (h < p.v_threshold).float()
        dv_dh = not_spiked if p.detach_reset else not_spiked + (p.v_reset - h) * sg
        grad_h = grad_spikes[t].float() * sg + grad_v * dv_dh
        grad_x[t] = grad_h / p.tau
        grad_v = grad_h * decay
    return grad_x


class TorchLoopLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: LIFParams) -> torch.Tensor:
        spikes, h_all = lif_forward(x, p)
        ctx.save_for_backward(h_all)
        ctx.p = p
        ctx.in_dtype = x.dtype
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (h_all,) = ctx.saved_tensors
        return lif_backward(grad_spikes, h_all, ctx.p).to(ctx.in_dtype), None


def lif_torch_loop(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    return TorchLoopLIF.apply(x, p)
