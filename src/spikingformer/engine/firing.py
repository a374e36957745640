"""The firing rate the training and evaluation logs report: each LIF layer's spikes over its outputs,
averaged over the layers, read through forward hooks on the neurons and summable across processes."""

from __future__ import annotations

import torch
from torch import nn

from spikingformer.neuron import MultiStepLIF


class FiringRateMeter:
    """Mean firing rate over all LIF layers: each layer's spikes over its outputs, averaged over the
    layers (a layer's rate weighs every output it produced alike, whatever the batch it was in).

    It reads the spikes through forward hooks on the neurons, attached from construction until
    :meth:`close` (or between :meth:`attach` and :meth:`detach`). A neuron with a hook makes the
    tokenizer take its module calls instead of the fused SN -> max-pool kernel, which never holds
    the spike map; training therefore attaches the meter only for the steps it logs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.neurons = [m for m in model.modules() if isinstance(m, MultiStepLIF)]
        self.index = {id(m): i for i, m in enumerate(self.neurons)}
        self.counts: torch.Tensor | None = None  # (layers, 2): spikes and outputs, int64, on the outputs' device
        self.handles = []
        self.attach()

    def attach(self) -> None:
        if not self.handles:
            self.handles = [m.register_forward_hook(self._hook) for m in self.neurons]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, inputs, output) -> None:
        if self.counts is None:
            self.counts = torch.zeros(len(self.neurons), 2, dtype=torch.int64, device=output.device)
        row = self.counts[self.index[id(module)]]
        # summed in float32 (a float64 sum took 13x as long on a CPU; an Apple GPU has no float64), exact
        # below 2^24 spikes per call, and kept in int64, exact on every device; no host sync: the sums
        # stay on the device
        row[0] += output.detach().sum(dtype=torch.float32).to(torch.int64)
        row[1] += output.numel()

    def take(self) -> torch.Tensor:
        """The spike and output counts per layer since the last take (zeros if none), then zeroed;
        processes sum theirs before :func:`rate_of` reads them."""
        counts = self.counts if self.counts is not None else torch.zeros(len(self.neurons), 2, dtype=torch.int64)
        self.counts = None
        return counts

    def pop(self) -> float:
        return rate_of(self.take())

    def close(self) -> None:
        self.detach()


def rate_of(counts: torch.Tensor) -> float:
    """The mean over layers of spikes / outputs, from :meth:`FiringRateMeter.take`'s counts (NaN: no outputs)."""
    counts = counts.cpu().double()
    seen = counts[:, 1] > 0
    return float((counts[seen, 0] / counts[seen, 1]).mean()) if bool(seen.any()) else float("nan")
