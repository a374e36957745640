"""The LIF neuron's parameters and the surrogate derivative, shared by the neuron and every kernel.

They sit below :mod:`spikingformer.kernels` and :mod:`spikingformer.neuron` (both import them,
this module imports neither), so the two never import each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LIFParams:
    """Parameters of the multi-step LIF neuron (SpikingJelly defaults, as the authors use them)."""

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float = 0.0
    alpha: float = 4.0
    detach_reset: bool = True

    def __post_init__(self) -> None:
        if not self.tau > 1.0:
            raise ValueError(f"LIF tau must be > 1 (got {self.tau}); tau=2.0 is the paper's value")
        if not self.alpha > 0:
            raise ValueError(f"surrogate alpha must be > 0 (got {self.alpha})")


def sigmoid_surrogate_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dx sigmoid(alpha x) = alpha * sig(alpha x) * (1 - sig(alpha x))."""
    sig = torch.sigmoid(alpha * x)
    return alpha * sig * (1.0 - sig)
