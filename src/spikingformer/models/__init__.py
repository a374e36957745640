"""Spikingformer and Spikformer models, the named zoo, and building them with weights from
checkpoint files (this project's and the authors').

Importing this package registers every zoo model with timm (``timm.create_model(name)``).
"""

from spikingformer.models.authors import CheckpointKeyError, authors_to_native
from spikingformer.models.transformer import ModelConfig, NonFiniteInputError, SpikingTransformer, check_finite
from spikingformer.models.zoo import (
    PAPER_PARAMS_M,
    ZOO,
    create_model,
    list_models,
    load_weights,
    model_config,
    model_from_checkpoint,
    register_with_timm,
)

__all__ = [
    "CheckpointKeyError",
    "ModelConfig",
    "NonFiniteInputError",
    "PAPER_PARAMS_M",
    "SpikingTransformer",
    "ZOO",
    "authors_to_native",
    "check_finite",
    "create_model",
    "list_models",
    "load_weights",
    "model_config",
    "model_from_checkpoint",
    "register_with_timm",
]

register_with_timm()
