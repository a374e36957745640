"""Multi-step leaky integrate-and-fire (LIF) neuron with a sigmoid surrogate gradient.

The maths (paper Appendix A; SpikingJelly 0.0.0.0.12 ``MultiStepLIFNode``), for every element and
every time step ``t = 0 .. T-1`` starting from ``V[-1] = V_reset``::

    charge:  H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau
    fire:    S[t] = 1 if H[t] - V_th >= 0 else 0          (a neuron exactly at threshold fires)
    reset:   V[t] = H[t] * (1 - S[t]) + V_reset * S[t]      (hard reset; S detached if detach_reset)

Backward uses the derivative of ``sigmoid(alpha * x)`` in place of the Heaviside step's, with
``x = H - V_th`` and ``alpha = 4`` by default (paper Appendix D).

The neuron is *stateless*: every call starts every membrane at ``V_reset``, so there is no
``reset_net`` to forget between batches. Inputs are time-first, ``(T, ...)``. The membrane is
integrated in float32 whatever the input dtype (fp32, fp16, bf16); spikes come back in the input's
dtype.

Two implementations compute the same thing:

* :func:`lif_reference` -- a plain loop over T with ordinary tensor operations, differentiated by
  autograd through :class:`SigmoidSurrogateSpike`. It is the ground truth for every fast path.
* :func:`multistep_lif` -- the default path: a fused kernel (``spikingformer.kernels``: C++ on
  the CPU, Triton on CUDA) with a hand-written backward that keeps only the input and recomputes
  the membrane.
"""

from __future__ import annotations

import torch
from torch import nn

from spikingformer import kernels
from spikingformer.kernels.params import LIFParams, sigmoid_surrogate_grad

__all__ = [
    "LIFParams", "MultiStepLIF", "SigmoidSurrogateSpike", "lif_membrane_reference", "lif_reference",
    "multistep_lif", "sigmoid_surrogate_grad",
]


class SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside step ``x >= 0`` forward, sigmoid-surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * sigmoid_surrogate_grad(x, ctx.alpha), None


def _check_time_first(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"multi-step LIF expects a time-first tensor (T, ...) with at least 2 dims, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"LIF input must be a floating-point tensor, got {x.dtype}")


def lif_reference(x: torch.Tensor, p: LIFParams = LIFParams()) -> torch.Tensor:
    """Ground-truth multi-step LIF: a loop over T with plain tensor ops (autograd backward).

    Args:
        x: input current, shape ``(T, ...)``, any floating dtype.
    Returns:
        spikes of the same shape and dtype, values exactly 0 or 1.
    """
    _check_time_first(x)
    v = torch.full_like(x[0], p.v_reset, dtype=torch.float32)
    spikes = []
    for t in range(x.shape[0]):
        h = v + (x[t].float() - (v - p.v_reset)) / p.tau
        s = SigmoidSurrogateSpike.apply(h - p.v_threshold, p.alpha)
        s_reset = s.detach() if p.detach_reset else s
        v = h * (1.0 - s_reset) + p.v_reset * s_reset
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)


def lif_membrane_reference(x: torch.Tensor, p: LIFParams = LIFParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: the charged membrane H[t] and the post-reset membrane V[t], both float32."""
    _check_time_first(x)
    v = torch.full_like(x[0], p.v_reset, dtype=torch.float32)
    hs, vs = [], []
    for t in range(x.shape[0]):
        h = v + (x[t].float() - (v - p.v_reset)) / p.tau
        s = (h - p.v_threshold >= 0).float()
        v = h * (1.0 - s) + p.v_reset * s
        hs.append(h)
        vs.append(v)
    return torch.stack(hs), torch.stack(vs)


def multistep_lif(x: torch.Tensor, p: LIFParams = LIFParams(), backend: str = "auto") -> torch.Tensor:
    """Multi-step LIF on a time-first tensor ``(T, ...)``; returns spikes (same shape and dtype).

    ``backend``: ``"auto"`` (fastest available for the tensor's device), ``"reference"`` (the plain
    loop), or a kernel name from :func:`spikingformer.kernels.available_backends`.
    """
    _check_time_first(x)
    if backend == "reference":
        return lif_reference(x, p)
    return kernels.lif(x, p, backend)


class MultiStepLIF(nn.Module):
    """Multi-step LIF neuron layer. Input and output: ``(T, ...)`` (time first).

    Holds no membrane state between calls; every forward starts at ``V = v_reset``.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float = 0.0,
        alpha: float = 4.0,
        detach_reset: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.params = LIFParams(tau, v_threshold, v_reset, alpha, detach_reset)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multistep_lif(x, self.params, self.backend)

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, alpha={p.alpha}, "
            f"detach_reset={p.detach_reset}, backend={self.backend!r}"
        )
