"""Input batches for the analysis tools, and BatchNorm calibration of untrained models.

``random_batches`` gives synthetic inputs of the model's shape: standard normal images
``(B, C, H, W)`` for static models, Poisson event counts ``(B, T, C, H, W)`` (mean 0.2 per pixel
and frame) for event models. ``dataset_batches`` reads a data set of
:func:`spikingformer.data.build_dataset` (its test split, in order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


class InputBatches:
    """The first ``count`` batches of a data set's test split (or of synthetic inputs), in order, read again on each pass.

    The analysis commands go over their inputs two or three times (BatchNorm calibration, recording,
    the accumulate-only run); holding a whole split in memory instead would take 30 GB for
    ImageNet's 50,000 images at 224 x 224. Each pass shows a progress bar on standard error.
    """

    def __init__(self, data: torch.utils.data.Dataset, batch_size: int, count: int | None = None, name: str = "test",
                 workers: int = 0) -> None:
        if len(data) == 0:
            raise ValueError(f"the {name} split gave no samples")
        whole = -(-len(data) // batch_size)
        self.data, self.batch_size, self.name, self.workers = data, batch_size, name, workers
        self.count = whole if count is None else min(count, whole)

    def __len__(self) -> int:
        return self.count

    @property
    def images(self) -> int:
        """How many images the batches hold (an image a folder could not decode is left out, and warned about)."""
        return min(len(self.data), self.count * self.batch_size)

    def first(self, count: int) -> "InputBatches":
        return InputBatches(self.data, self.batch_size, min(count, self.count), self.name, self.workers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        from spikingformer.data import collate
        from spikingformer.data.workers import leave_sigterm_to_the_main_process, loader_workers
        from spikingformer.progress import progress

        # only the batches used: a worker reads ahead at most two batches (prefetch_factor) beyond them
        used = torch.utils.data.Subset(self.data, range(self.images))
        loader = torch.utils.data.DataLoader(used, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                                             num_workers=loader_workers(self.workers),
                                             worker_init_fn=leave_sigterm_to_the_main_process)
        with progress(total=self.count, desc=self.name, unit="batch") as bar:
            for _, (x, _labels) in zip(range(self.count), loader):
                yield x.float()
                bar.update()


def synthetic_batches(config, batches: int, batch_size: int, seed: int = 0) -> InputBatches:
    """:func:`random_batches` as :class:`InputBatches` (the same tensors, batch for batch)."""
    x = torch.cat(random_batches(config, batches, batch_size, seed))
    return InputBatches(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size, batches, "synthetic inputs")


def dataset_batches(config, section, batches: int | None, batch_size: int) -> InputBatches:
    """The first ``batches`` batches (``None``: all) of a data set's test split (``section``: a
    :class:`~spikingformer.config.DataSection`; its ``workers`` read them), shaped for the model."""
    from spikingformer.data import build_dataset

    return InputBatches(build_dataset(section, config.img_size, train=False), batch_size, batches,
                        f"{section.dataset} test split", section.workers)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
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
