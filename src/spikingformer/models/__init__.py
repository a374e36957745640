"""Spikingformer and Spikformer models, the named zoo, and loading of the authors' checkpoints.

Importing this package registers every zoo model with timm (``timm.create_model(name)``).
"""

from spikingformer.models.official import (
    CheckpointKeyError,
    extract_state_dict,
    load_weights,
    official_to_native,
)
from spikingformer.models.transformer import ModelConfig, NonFiniteInputError, SpikingTransformer, check_finite
from spikingformer.models.zoo import PAPER_PARAMS_M, ZOO, create_model, list_models, model_config, register_with_timm

__all__ = [
    "CheckpointKeyError",
    "ModelConfig",
    "NonFiniteInputError",
    "PAPER_PARAMS_M",
    "SpikingTransformer",
    "check_finite",
    "ZOO",
    "create_model",
    "extract_state_dict",
    "list_models",
    "load_weights",
    "model_config",
    "official_to_native",
    "register_with_timm",
]

register_with_timm()
