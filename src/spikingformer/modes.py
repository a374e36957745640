"""Eval mode for the length of a block, every module's own training flag put back after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` within the block; after it, each module's training flag as it was (where
    ``model.train(flag)`` would set them all alike: a frozen BatchNorm of a training model, kept in
    eval mode, would train again)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training
