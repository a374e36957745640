"""Input batches for the analysis tools, and BatchNorm calibration of untrained models.

``random_batches`` gives synthetic inputs of the model's shape: standard normal images
``(B, C, H, W)`` for static models, Poisson event counts ``(B, T, C, H, W)`` (mean 0.2 per pixel
and frame) for event models. ``dataset_batches`` reads a data set of
:func:`spikingformer.data.build_dataset` (its test split, in order).
"""

from __future__ import annotations

import torch
from torch import nn

RANDOM = "random"


def default_dataset(config) -> str | None:
    """The data set used when none is named: digits for the digits models, else none."""
    return "digits" if config.family == "digits" else None


def input_shape(config, batch_size: int) -> tuple[int, ...]:
    """The model input's shape: images ``(B, C, S, S)``, or event frames ``(B, T, C, S, S)``."""
    s, c = config.img_size, config.in_channels
    if config.family == "event":
        return (batch_size, config.time_steps, c, s, s)
    return (batch_size, c, s, s)


def random_batches(config, batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic model inputs: images ``(B, C, S, S)`` ~ N(0, 1), or event counts ``(B, T, C, S, S)`` ~ Poisson(0.2)."""
    g = torch.Generator().manual_seed(seed)
    shape = input_shape(config, batch_size)
    if config.family == "event":
        return [torch.poisson(torch.full(shape, 0.2), generator=g) for _ in range(batches)]
    return [torch.randn(shape, generator=g) for _ in range(batches)]


def dataset_batches(config, section, batches: int | None, batch_size: int) -> list[torch.Tensor]:
    """The first ``batches`` batches (``None``: all) of a data set's test split (``section``: a
    :class:`~spikingformer.config.DataSection`), shaped for the model."""
    from spikingformer.data import build_dataset, collate

    data = build_dataset(section, config.img_size, train=False)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out: list[torch.Tensor] = []
    for x, _ in loader:
        out.append(x.float())
        if len(out) == batches:
            break
    if not out:
        raise ValueError(f"dataset '{section.dataset}' gave no samples")
    return out


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over ``batches`` (train-mode
    forward passes, no gradient, no weight change), then return the model in eval mode.

    An untrained model has default statistics (mean 0, variance 1), which gives almost no spikes in
    eval mode; calibrating makes its activity representative of a trained network's BN behaviour.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return model
