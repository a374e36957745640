"""Deployment: ConvBN fusion (:mod:`~spikingformer.deploy.fuse`) and accumulate-only, event-driven
inference with measured operation counts (:mod:`~spikingformer.deploy.accumulate`)."""

from spikingformer.deploy.accumulate import (
    AccumulateModel,
    LayerCount,
    OperationCounts,
    accumulate_attention,
    accumulate_conv2d,
    accumulate_linear,
    run_accumulate,
)
from spikingformer.deploy.fuse import fuse_model, fuse_structure, is_fused

__all__ = [
    "AccumulateModel",
    "LayerCount",
    "OperationCounts",
    "accumulate_attention",
    "accumulate_conv2d",
    "accumulate_linear",
    "fuse_model",
    "fuse_structure",
    "is_fused",
    "run_accumulate",
]
