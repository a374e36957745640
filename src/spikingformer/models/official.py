"""Loading state dicts written by the authors' code into our models.

The official repositories use several naming schemes for the same tensors:

* Spikingformer CIFAR: ``patch_embed.block{0..4}_{conv,bn}``, ``attn.{q,k,v,proj}_conv``, ``mlp.mlp{1,2}_conv``;
* Spikingformer ImageNet / event: ``patch_embed.proj_conv``, ``patch_embed.proj{1..4}_{conv,bn}``;
* Spikformer (and the Spikingformer checkpoint behind the 8-512 energy log):
  ``patch_embed.proj_{conv,bn}{,1,2,3}`` + ``patch_embed.rpe_{conv,bn}``, ``mlp.fc{1,2}_{conv,linear}``,
  ``attn.{q,k,v,proj}_linear`` (Spikformer CIFAR).

:func:`official_to_native` translates any of them into this project's names with an explicit
alias table, reshapes Conv1d/Conv2d 1x1 weights to our ``(out, in)`` matrices, drops the tensors
the authors' models construct but never use (``norm1``/``norm2`` LayerNorms, the Spikformer-DVS
``pos_embed`` and ``norm``), and checks the key set strictly, naming every missing or unexpected key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# (official pattern, native replacement). Applied to the whole key; first match wins.
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

# Tensors the official models construct but never use in forward.
_UNUSED_RE = re.compile(r"(block\.\d+\.norm[12]\.(weight|bias)|pos_embed|norm\.(weight|bias))$")


class CheckpointKeyError(KeyError):
    """A state dict does not match the model; the message lists the offending keys."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def is_official_state_dict(state_dict: Mapping[str, object]) -> bool:
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


def shorten(keys: list[str], limit: int = 12) -> str:
    """The first ``limit`` of ``keys``, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def official_to_native(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Translate an official state dict to ``model``'s key names and shapes, strictly.

    Raises :class:`CheckpointKeyError` naming the official keys that have no place in the model,
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
            "official checkpoint does not match this model (" + "; ".join(parts) + "). "
            "Check that the model name matches the checkpoint (family, depth, heads' dims, num_classes)."
        )
    return native


def register_official_key_hook(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` (and timm's ``load_checkpoint``) accept the authors' key names."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix or not is_official_state_dict(state_dict):
            return
        translated = official_to_native(dict(state_dict), module)
        state_dict.clear()
        state_dict.update(translated)

    model.register_load_state_dict_pre_hook(hook)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove a DistributedDataParallel ``module.`` (or ``_orig_mod.`` from torch.compile) prefix."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The state dict inside any of the containers in use.

    Accepts a bare state dict, timm CheckpointSaver files (``state_dict``, ``state_dict_ema``),
    the authors' DVS files and this project's checkpoints (``model``).
    """
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                checkpoint = inner
                break
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state_dict = strip_prefix(checkpoint, "module.")
            return strip_prefix(state_dict, "_orig_mod.")
    raise ValueError(
        "no state dict found in checkpoint: expected a mapping of tensors, or a container with a "
        "'state_dict' (timm) or 'model' (authors' DVS code, this project) entry"
    )


def load_weights(model: nn.Module, checkpoint: str | Path | Mapping) -> nn.Module:
    """Load weights from a path or an already loaded checkpoint, in any supported naming scheme.

    A file that records its model (this project's checkpoints and exports) must record the same
    configuration as ``model``: a different one raises ValueError naming the differing fields.
    """
    from spikingformer.checkpoints import describes_model, load_checkpoint

    obj = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    where = checkpoint if isinstance(checkpoint, (str, Path)) else "the checkpoint"
    if describes_model(obj) and getattr(model, "config", None) is not None:
        _check_recorded_config(obj, model, where)
    try:
        state_dict = extract_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    model.load_state_dict(state_dict, strict=True)
    return model


_RUNTIME_FIELDS = ("lif_backend",)  # choices of how to compute, not part of the weights


def _check_recorded_config(checkpoint: Mapping, model: nn.Module, where: object) -> None:
    recorded, mine = checkpoint["model_config"], model.config.to_dict()
    diff = {k: (recorded.get(k), v) for k, v in mine.items() if k not in _RUNTIME_FIELDS and recorded.get(k) != v}
    if diff:
        fields = ", ".join(f"{k}: {a!r} in the file, {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"{where} holds a model with another configuration ({fields}); build it with those values, "
                         "or rebuild it from the file with spikingformer.checkpoints.model_from_checkpoint(path)")
    if checkpoint.get("fused") and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"{where} holds a fused model (no BatchNorm); rebuild it with "
                         "spikingformer.checkpoints.model_from_checkpoint(path)")


def route_timm_checkpoints() -> None:
    """Make ``timm.create_model(name, checkpoint_path=PATH)`` read files for this package's models
    with :func:`load_weights` (safe reading, one-line errors, recorded-config check); other models
    keep timm's loader. timm offers no hook for this, so its factory's loader is wrapped once."""
    from timm.models import _factory

    original = _factory.load_checkpoint
    if getattr(original, "spikingformer_route", False):
        return

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        from spikingformer.models.transformer import SpikingTransformer

        if isinstance(model, SpikingTransformer) and not args and not kwargs:
            load_weights(model, checkpoint_path)
            return None
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint.spikingformer_route = True
    _factory.load_checkpoint = load_checkpoint
