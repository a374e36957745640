"""SpikingJelly's multi-step LIF neuron for the benchmark scripts, whatever its release.

The one adapter of this folder: the neuron benchmark times it as a function, the model benchmark
builds the authors' model with it, ``bench_lif_peers.py`` compares it.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

import torch
from torch import nn

NO_SPIKINGJELLY = ("SpikingJelly is not installed, so there is no comparison column; "
                   "pip install \"spikingformer[bench]\" adds it")


def spikingjelly_version() -> str:
    """The installed SpikingJelly's version, or ``"not installed"`` when it does not import."""
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return "not installed"
    try:
        return importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        return getattr(spikingjelly, "__version__", "unknown version")


def spikingjelly_backend(device: str) -> str:
    """SpikingJelly's fastest multi-step LIF backend for ``device``: ``cupy`` on CUDA when CuPy
    imports (the authors' choice), else ``torch``."""
    if device == "cuda":
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "torch"
        return "cupy"
    return "torch"


def lif_nodes() -> list[str]:
    """The installed SpikingJelly's multi-step LIF classes, for :class:`SpikingJellyLIF`'s ``node``:
    ``MultiStepLIFNode`` in 0.0.0.0.x (its backend chosen by :func:`spikingjelly_backend`); in 2.x
    ``LIFNode`` (its registered ``sj_lif`` operator: on the CPU a loop of torch ops with a
    hand-written backward, on CUDA its Triton/CUDA kernel) and ``SimpleLIFNode`` (its pure-PyTorch
    charge-fire-reset loop, differentiated by autograd)."""
    try:
        import spikingjelly.clock_driven  # noqa: F401
    except ImportError:
        return ["LIFNode", "SimpleLIFNode"]
    return ["MultiStepLIFNode"]


class SpikingJellyLIF(nn.Module):
    """SpikingJelly's multi-step LIF, any release, with the given tau, threshold, reset and sigmoid
    surrogate: ``MultiStepLIFNode`` in 0.0.0.0.12 - 0.0.0.0.14 (the releases the authors' code runs
    on), ``LIFNode(step_mode="m")`` in newer ones (2.x has no ``backend`` argument: it picks by device),
    or another class of :func:`lif_nodes` named by ``node``.

    It keeps its membrane between calls, so ``functional.reset_net(model)`` must run after every
    batch (:func:`reset_spikingjelly`), as in the authors' training loops.
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: float = 0.0, alpha: float = 4.0,
                 detach_reset: bool = True, backend: str = "torch", node: str | None = None) -> None:
        super().__init__()
        kwargs = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset)
        if node not in (None, *lif_nodes()):
            raise ValueError(f"SpikingJelly {spikingjelly_version()} has no multi-step LIF node {node!r}; "
                             f"choose one of {', '.join(lif_nodes())}")
        try:
            from spikingjelly.clock_driven import neuron, surrogate

            self.node = neuron.MultiStepLIFNode(**kwargs, surrogate_function=surrogate.Sigmoid(alpha=alpha),
                                                backend=backend)
        except ImportError:
            import inspect

            from spikingjelly.activation_based import neuron, surrogate

            cls = getattr(neuron, node or "LIFNode")
            extra = {"backend": backend} if "backend" in inspect.signature(cls).parameters else {}
            if cls is neuron.SimpleLIFNode:
                extra["decay_input"] = True  # LIFNode's default; SimpleLIFNode has none
            self.node = cls(**kwargs, surrogate_function=surrogate.Sigmoid(alpha=alpha), step_mode="m", **extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.node(x)


def spikingjelly_function(device: torch.device | str = "cpu", **params) -> Callable[[torch.Tensor], torch.Tensor]:
    """:class:`SpikingJellyLIF` (``params``) on ``device`` as a function of its input alone: the
    membrane is reset before every call."""
    node = SpikingJellyLIF(**params).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        node.node.reset()
        return node(x)

    return run


def reset_spikingjelly(model: nn.Module) -> None:
    """``functional.reset_net(model)``: clear the membranes SpikingJelly's neurons keep between calls."""
    try:
        from spikingjelly.clock_driven import functional
    except ImportError:
        from spikingjelly.activation_based import functional
    functional.reset_net(model)


