"""Start a training run from another run's weights (timm's ``--initial-checkpoint``): fine-tuning.

The checkpoint may be this project's (a training checkpoint or a ``.safetensors`` export) or the
authors'. Its architecture must be the model's; its classifier head may have another number of
classes (fine-tuning on another data set), in which case the head keeps its fresh initialisation.
Settings that do not shape the weights (time steps, the neuron's backend, ...) may differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from spikingformer import checkpoints
from spikingformer.models.transformer import SpikingTransformer
from spikingformer.models.zoo import load_weights, model_from_checkpoint

HEAD = "head."  # the classifier's parameters (``head.fc.weight``, ``head.fc.bias``)


def load_initial_weights(model: SpikingTransformer, checkpoint: str | Path, what: str = "--initial-checkpoint") -> str:
    """Copy a checkpoint's weights and BatchNorm statistics into ``model``; returns a line saying what
    was taken. ``what``: how the caller named the file, for errors."""
    ckpt = checkpoints.read(checkpoint)
    if ckpt.fused:
        raise ValueError(f"{what} {ckpt.where} holds a fused model (its BatchNorm folded away); "
                         "start from the checkpoint it was fused from")
    source = model_from_checkpoint(ckpt) if ckpt.describes_model else _authors_or_plain(ckpt, model)
    mine, theirs = model.state_dict(), source.state_dict()
    taken = {k: v for k, v in theirs.items() if k in mine and v.shape == mine[k].shape}
    left = [k for k in mine if k not in taken]
    body = [k for k in left if not k.startswith(HEAD)]
    if body:
        shapes = "; ".join(f"{k} {tuple(theirs[k].shape) if k in theirs else 'absent'} in the file, {tuple(mine[k].shape)} here"
                           for k in body[:3])
        raise ValueError(f"{what} {ckpt.where} holds another architecture ({shapes}"
                         f"{f'; {len(body) - 3} more' if len(body) > 3 else ''}); the model and its arguments (--model-args) must "
                         "match the file's, except the number of classes")
    model.load_state_dict({**mine, **taken})
    said = f"initial weights from {ckpt.where}"
    if source.config.arch != model.config.arch:  # same tensors, other wiring (where the neurons sit)
        said += f" (a {source.config.arch} model's, into this {model.config.arch} model)"
    if left:
        said += (f"; the head ({', '.join(left)}) starts afresh: the file has {source.config.num_classes} classes, "
                 f"this model {model.config.num_classes}")
    return said


def _authors_or_plain(ckpt: checkpoints.Checkpoint, model: SpikingTransformer) -> nn.Module:
    """The model's architecture with the file's number of classes (read off its head), loaded strictly."""
    state = ckpt.state_dict
    head = state.get("head.fc.weight", state.get("head.weight"))  # ours / the authors' name
    classes = int(head.shape[0]) if head is not None and head.dim() >= 1 else model.config.num_classes
    return load_weights(SpikingTransformer(dataclasses.replace(model.config, num_classes=classes)), ckpt)
