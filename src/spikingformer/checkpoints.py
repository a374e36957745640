"""Checkpoint files: written atomically, self-describing, read safely in every supported format.

Formats this project writes (all describe their model, so they rebuild without a model name):

* training checkpoints (``last.pt`` / ``best.pt``), ``torch.save`` dicts of tensors and plain data::

    {"format": "spikingformer-checkpoint", "version": 1,
     "model": state_dict, "model_name": str, "model_config": dict (ModelConfig fields),
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int, "metrics": dict, "best": dict,
     "train_config": dict, "rng": {...}}

* fused checkpoints (:mod:`spikingformer.deploy.fuse`), the same without training state;
* safetensors exports (:func:`export_safetensors`): the model's state dict as tensors, and in the
  file's metadata (strings) ``format`` = ``spikingformer-safetensors``, ``model_name``,
  ``model_config`` (JSON), ``fused`` (``true``/``false``) and ``train_config`` (JSON, when known).

The authors' and timm's files (a state dict, bare or inside a container) load too, given the zoo
model they belong to. Reading never unpickles anything but tensors and plain data (``torch.load``
with ``weights_only=True``, plus the ``argparse.Namespace`` timm scripts store); a file that cannot
be read or written raises :class:`CheckpointError`, one line naming the file and what to do.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from spikingformer.models import ModelConfig, SpikingTransformer, create_model, load_weights
from spikingformer.models.official import extract_state_dict, shorten

FORMAT = "spikingformer-checkpoint"
EXPORT_FORMAT = "spikingformer-safetensors"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, written, or does not match its model."""


# ----------------------------------------------------------------------------------------------
# writing


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    A reader (or a crash) never sees a half-written file: either the old one or the new one. On any
    failure the temporary file is removed; a full disk or an unwritable folder raises
    :class:`CheckpointError` (the previous file at ``path`` is untouched).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_error(err, path) from err
        raise
    return path


def _write_error(err: OSError, path: Path) -> CheckpointError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"no space left on device while writing {path}; the previous file there (if any) is "
                               "intact: free some space and run the command again (training: add --resume auto)")
    reason = err.strerror or str(err)
    return CheckpointError(f"cannot write {path}: {reason}; choose a writable folder (training: --output)")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` atomically (see :func:`write_atomic`)."""
    with open(source, "rb") as src:
        return write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def export_safetensors(model: nn.Module, path: str | Path, model_name: str | None = None,
                       train_config: dict | None = None) -> Path:
    """Write ``model``'s weights as safetensors with its description in the metadata (see module doc)."""
    from safetensors.torch import save

    from spikingformer.deploy.fuse import is_fused

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("only SpikingTransformer models (with a .config) can be exported")
    metadata = {"format": EXPORT_FORMAT, "model_name": model_name or "", "model_config": json.dumps(config.to_dict()),
                "fused": "true" if is_fused(model) else "false"}
    if train_config is not None:
        metadata["train_config"] = json.dumps(train_config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda f: f.write(save(tensors, metadata)))


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None, model_name: str | None = None) -> Path:
    """Export any loadable checkpoint to safetensors (default: ``<name>.safetensors`` beside it),
    keeping its model description and training record (see :func:`export_safetensors`)."""
    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else checkpoint.with_name(checkpoint.name.split(".")[0] + ".safetensors")
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output} must end in .safetensors (the format is chosen by the name when read back)")
    stored = load_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint, model_name, loaded=stored)
    record = stored if describes_model(stored) else {}
    return export_safetensors(model, output, model_name or record.get("model_name"), record.get("train_config"))


# ----------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file (``.safetensors`` or ``torch.save``; tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the file
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors and plain data ({shorten(unsafe, 4)}); they are "
                "never loaded, for safety. Save the weights alone (torch.save(model.state_dict(), ...)) or use .safetensors"
            ) from err
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is damaged or "
                              "truncated; copy or download it again") from err


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a readable pickle at all
        return []


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({reason}); copy or export it again") from err
    if metadata.get("format") != EXPORT_FORMAT:
        return tensors  # a bare state dict
    try:
        return {"format": EXPORT_FORMAT, "model": tensors, "model_name": metadata.get("model_name") or None,
                "model_config": json.loads(metadata["model_config"]), "fused": metadata.get("fused") == "true",
                "train_config": json.loads(metadata.get("train_config", "null"))}
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: its spikingformer metadata is damaged ({err}); export it again") from err


def is_native(checkpoint: object) -> bool:
    """True for this project's training checkpoints."""
    return isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT


def describes_model(checkpoint: object) -> bool:
    """True for files that record their model (training, fused and exported checkpoints)."""
    from spikingformer.deploy.fuse import is_fused_checkpoint

    return is_native(checkpoint) or is_fused_checkpoint(checkpoint) or (
        isinstance(checkpoint, dict) and checkpoint.get("format") == EXPORT_FORMAT)


def recorded_data(checkpoint: object) -> dict | None:
    """The data section of the training run a checkpoint came from (None if it does not record one)."""
    if not describes_model(checkpoint):
        return None
    data = (checkpoint.get("train_config") or {}).get("data")
    return dict(data) if isinstance(data, Mapping) else None


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> nn.Module:
    """``model.load_state_dict(state_dict)`` after checking names and shapes; a mismatch is one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshapen:
        parts = [f"{label}: {shorten(keys, 3)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", misshapen)) if keys]
        raise CheckpointError(f"{path}: its weights do not match the model it records ({'; '.join(parts)}); the file "
                              "was altered or written for another model: use the checkpoint the run wrote")
    model.load_state_dict(state_dict)
    return model


def model_from_checkpoint(path: str | Path, model_name: str | None = None, *, loaded: Any = None,
                          **overrides) -> SpikingTransformer:
    """Rebuild a model with its weights from a checkpoint file (``loaded``: its contents, when the
    caller has already read them with :func:`load_checkpoint`, so the file is read once).

    This project's checkpoints (training, fused and exported ones) describe their model, so
    ``model_name`` is not needed (if given, it must agree). The authors' checkpoints (or bare
    state dicts) need ``model_name``, a zoo name, plus any ``overrides`` of its config.
    """
    from spikingformer.deploy.fuse import fuse_structure

    checkpoint = load_checkpoint(path) if loaded is None else loaded
    if describes_model(checkpoint):
        saved = checkpoint.get("model_name")
        if model_name and saved and model_name != saved:
            raise ValueError(
                f"checkpoint {path} holds a {saved} model, not {model_name}; drop --model or pick the matching checkpoint"
            )
        model = SpikingTransformer(ModelConfig.from_dict({**checkpoint["model_config"], **overrides}))
        if checkpoint.get("fused"):
            fuse_structure(model)
        return load_matching(model, checkpoint["model"], path)
    if not model_name:
        raise ValueError(
            f"{path} is not a spikingformer checkpoint (it has no model description); name the zoo model "
            "it belongs to, e.g. --model spikingformer_8_768"
        )
    model = create_model(model_name, **overrides)
    load_weights(model, {"state_dict": extract_state_dict(checkpoint)})
    return model
