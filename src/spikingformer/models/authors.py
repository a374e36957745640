"""The key names of the authors' checkpoints, translated to this project's.

The authors' repositories use several naming schemes for the same tensors:

* Spikingformer CIFAR: ``patch_embed.block{0..4}_{conv,bn}``, ``attn.{q,k,v,proj}_conv``, ``mlp.mlp{1,2}_conv``;
* Spikingformer ImageNet / event: ``patch_embed.proj_conv``, ``patch_embed.proj{1..4}_{conv,bn}``;
* Spikformer (and the Spikingformer checkpoint behind the 8-512 energy log):
  ``patch_embed.proj_{conv,bn}{,1,2,3}`` + ``patch_embed.rpe_{conv,bn}``, ``mlp.fc{1,2}_{conv,linear}``,
  ``attn.{q,k,v,proj}_linear`` (Spikformer CIFAR).

:func:`authors_to_native` translates any of them into this project's names with an explicit
alias table, reshapes Conv1d/Conv2d 1x1 weights to our ``(out, in)`` matrices, drops the tensors
the authors' models construct but never use (``norm1``/``norm2`` LayerNorms, the Spikformer-DVS
``pos_embed`` and ``norm``), and checks the key set strictly, naming every missing or unexpected key. The model
builder applies it openly (:func:`spikingformer.models.zoo.load_weights`); the model itself
accepts only its own names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from spikingformer.checkpoints import shorten

# (authors' pattern, native replacement). Applied to the whole key; first match wins.
_ALIASES: list[tuple[str, str]] = [
    (r"patch_embed\.block(\d)_(conv|bn)\.", r"tokenizer.stages.\1.\2."),
    (r"patch_embed\.proj_(conv|bn)\.", r"tokenizer.stages.0.\1."),
    (r"patch_embed\.proj(\d)_(conv|bn)\.", r"tokenizer.stages.\1.\2."),
    (r"patch_embed\.proj_(conv|bn)(\d)\.", r"tokenizer.stages.\2.\1."),
    (r"patch_embed\.rpe_(conv|bn)\.", r"tokenizer.stages.4.\1."),
    (r"block\.(\d+)\.attn\.(q|k|v|proj)_(?:conv|linear)\.", r"blocks.\1.attn.\2.linear."),
    (r"block\.(\d+)\.attn\.(q|k|v|proj)_bn\.", r"blocks.\1.attn.\2.bn."),
    (r"block\.(\d+)\.mlp\.(?:mlp|fc)([12])_(?:conv|linear)\.", r"blocks.\1.mlp.fc\2.linear."),
    (r"block\.(\d+)\.mlp\.(?:mlp|fc)([12])_bn\.", r"blocks.\1.mlp.fc\2.bn."),
    (r"head\.(weight|bias)$", r"head.fc.\1"),
]
_ALIASES_RE = [(re.compile(p), r) for p, r in _ALIASES]

# Tensors the authors' models construct but never use in forward.
_UNUSED_RE = re.compile(r"(block\.\d+\.norm[12]\.(weight|bias)|pos_embed|norm\.(weight|bias))$")


class CheckpointKeyError(KeyError):
    """A state dict does not match the model; the message lists the offending keys."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def is_authors_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True if the keys follow one of the authors' naming schemes (``patch_embed.*``, ``block.N.*``)."""
    return any(k.startswith(("patch_embed.", "block.")) for k in state_dict)


def _native_name(key: str) -> str | None:
    for pattern, replacement in _ALIASES_RE:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def _fit(tensor: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if tensor.shape == shape:
        return tensor
    if tensor.numel() == shape.numel() and tensor.shape[:2] == shape[:2] and all(s == 1 for s in tensor.shape[2:]):
        return tensor.reshape(shape)  # Conv1d (o, i, 1) / Conv2d (o, i, 1, 1) -> Linear (o, i)
    raise CheckpointKeyError(
        f"shape mismatch for {key}: checkpoint has {tuple(tensor.shape)}, model expects {tuple(shape)} "
        "(is the checkpoint for another model size, e.g. a different embed_dim or num_classes?)"
    )


def authors_to_native(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Translate an authors' state dict to ``model``'s key names and shapes, strictly.

    Raises :class:`CheckpointKeyError` naming the authors' keys that have no place in the model,
    the model keys the checkpoint lacks, and any shape mismatch.
    """
    expected = model.state_dict()
    native: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        if _UNUSED_RE.match(key):
            continue
        name = _native_name(key)
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        if name in native:
            raise CheckpointKeyError(f"checkpoint keys {source[name]} and {key} both map to {name}")
        native[name] = _fit(tensor, expected[name].shape, key)
        source[name] = key
    missing = [k for k in expected if k not in native]
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys in checkpoint: {shorten(unexpected)}")
        if missing:
            parts.append(f"model keys missing from checkpoint: {shorten(missing)}")
        raise CheckpointKeyError(
            "authors' checkpoint does not match this model (" + "; ".join(parts) + "). "
            "Check that the model name matches the checkpoint (family, depth, heads' dims, num_classes)."
        )
    return native
