"""spikingformer: spike-driven transformers (Spikingformer, Spikformer) in PyTorch.

Importing the package registers every zoo model with timm, so ``timm.create_model(name)`` works.
"""

__version__ = "0.1.0"

from spikingformer.models import (  # noqa: E402
    ModelConfig,
    SpikingTransformer,
    create_model,
    list_models,
    load_weights,
    register_with_timm,
)
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_reference, multistep_lif  # noqa: E402

register_with_timm()

__all__ = [
    "LIFParams",
    "ModelConfig",
    "MultiStepLIF",
    "SpikingTransformer",
    "__version__",
    "create_model",
    "lif_reference",
    "list_models",
    "load_weights",
    "multistep_lif",
]
