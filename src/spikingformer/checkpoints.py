"""Checkpoint files: written atomically, self-describing, and loadable from any supported source.

This project's checkpoints are ``torch.save`` dicts holding only tensors and plain data::

    {"format": "spikingformer-checkpoint", "version": 1,
     "model": state_dict, "model_name": str, "model_config": dict (ModelConfig fields),
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int, "metrics": dict,
     "train_config": dict, "rng": {...}}

:func:`model_from_checkpoint` rebuilds the model from such a file alone, and loads the authors'
checkpoints too when told which zoo model they belong to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from spikingformer.models import ModelConfig, SpikingTransformer, create_model, load_weights
from spikingformer.models.official import extract_state_dict, torch_load

FORMAT = "spikingformer-checkpoint"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A reader (or a crash) never sees a half-written file: either the old checkpoint or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def is_native(checkpoint: object) -> bool:
    return isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file (tensors and plain data only)."""
    return torch_load(path)


def model_from_checkpoint(path: str | Path, model_name: str | None = None, **overrides) -> SpikingTransformer:
    """Rebuild a model with its weights from a checkpoint file.

    This project's checkpoints (training and fused ones) describe their model, so ``model_name``
    is not needed (if given, it must agree). The authors' checkpoints (or bare state dicts) need ``model_name``, a zoo
    name, plus any ``overrides`` of its config.
    """
    from spikingformer.deploy.fuse import is_fused_checkpoint, load_fused

    checkpoint = load_checkpoint(path)
    if is_fused_checkpoint(checkpoint):
        return load_fused(path)
    if is_native(checkpoint):
        saved = checkpoint["model_name"]
        if model_name and model_name != saved:
            raise ValueError(
                f"checkpoint {path} holds a {saved} model, not {model_name}; drop --model or pick the matching checkpoint"
            )
        config = ModelConfig.from_dict({**checkpoint["model_config"], **overrides})
        model = SpikingTransformer(config)
        model.load_state_dict(checkpoint["model"])
        return model
    if not model_name:
        raise ValueError(
            f"{path} is not a spikingformer checkpoint (it has no model description); name the zoo model "
            "it belongs to, e.g. --model spikingformer_8_768"
        )
    model = create_model(model_name, **overrides)
    load_weights(model, {"state_dict": extract_state_dict(checkpoint)})
    return model
