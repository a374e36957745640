"""Checkpoint files: their formats, atomic writing, safe reading, and one parsed view of any of them.

Formats this project writes (all describe their model, so they rebuild without a model name):

* training checkpoints (``last.pt`` / ``best.pt``), ``torch.save`` dicts of tensors and plain data::

    {"format": "spikingformer-checkpoint", "version": 1,
     "model": state_dict, "model_name": str, "model_config": dict (ModelConfig fields),
     "train_config": dict, and the training state (:class:`TrainingState`):
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int, "metrics": dict, "best": dict, "rng": {...}}

* fused checkpoints (:func:`save_fused`), the same without the training state, and ``"fused": True``
  under the format ``spikingformer-fused-checkpoint``;
* safetensors exports (:func:`export_safetensors`): the model's state dict as tensors, and in the
  file's metadata (strings) ``format`` = ``spikingformer-safetensors``, ``model_name``,
  ``model_config`` (JSON), ``fused`` (``true``/``false``) and ``train_config`` (JSON, when known).

The authors' and timm's files hold a state dict, bare or inside a container (:func:`extract_state_dict`);
they load given the zoo model they belong to, their key names translated by the model builder
(:mod:`spikingformer.models.authors`). :func:`read` reads any of these once and returns a
:class:`Checkpoint`. Reading never unpickles anything but tensors and plain data (``torch.load``
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from spikingformer.deploy.fuse import is_fused

FORMAT = "spikingformer-checkpoint"
FUSED_FORMAT = "spikingformer-fused-checkpoint"
EXPORT_FORMAT = "spikingformer-safetensors"
VERSION = 1  # of the three formats; a file of a later version is refused with a word to upgrade
WEIGHTS = "weights"  # the kind of a file that holds weights alone (the authors', timm's, a bare state dict)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, written, or does not match its model."""


def shorten(keys: list[str], limit: int = 12) -> str:
    """The first ``limit`` of ``keys``, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------
# the training state and the parsed view of a file


@dataclass
class TrainingState:
    """What a training checkpoint holds besides the model: where the run stands after ``epoch``."""

    epoch: int
    metrics: dict  # the epoch's row of the metrics log
    best: dict  # {"top1", "top5", "epoch"} of the best evaluation so far ({"top1": -1.0, "epoch": -1}: none)
    optimizer: dict
    scheduler: dict  # timm's scheduler state: read by earlier releases' resume; now rebuilt from the settings
    scaler: dict
    rng: dict


def _described(fmt: str, model: nn.Module, model_name: str | None, train_config: dict | None) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("only SpikingTransformer models (with a .config) can be saved as spikingformer checkpoints")
    return {"format": fmt, "version": VERSION, "model": model.state_dict(), "model_name": model_name,
            "model_config": config.to_dict(), "train_config": train_config}


def training_checkpoint(model: nn.Module, model_name: str, train_config: dict, state: TrainingState) -> dict:
    """The dict a training checkpoint holds (see the module doc), ready for :func:`save_atomic`."""
    return {**_described(FORMAT, model, model_name, train_config), **vars(state)}


@dataclass
class Checkpoint:
    """A checkpoint file's contents, whatever its format (:func:`read`)."""

    where: str  # the file, for messages
    kind: str  # FORMAT, FUSED_FORMAT, EXPORT_FORMAT or WEIGHTS
    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    model_config: dict | None = None  # the ModelConfig fields (None: the file does not describe its model)
    fused: bool = False
    train_config: dict | None = None  # the configuration of the training run the weights come from
    training: TrainingState | None = None  # training checkpoints written by `spikingformer train`

    @property
    def describes_model(self) -> bool:
        """True for the files this project writes (training, fused and exported checkpoints)."""
        return self.model_config is not None

    @property
    def recorded_data(self) -> dict | None:
        """The data section of the training run (None if the file does not record one)."""
        data = (self.train_config or {}).get("data")
        return dict(data) if isinstance(data, Mapping) else None


def read(source: str | Path | Checkpoint | object) -> Checkpoint:
    """The :class:`Checkpoint` of a file (``str``/``Path``, read once with :func:`load_checkpoint`),
    or of contents already loaded; a :class:`Checkpoint` is returned as it is."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, Path)):
        return _parse(load_checkpoint(source), str(source))
    return _parse(source, "the checkpoint")


def _parse(raw: object, where: str) -> Checkpoint:
    """Dispatch the contents of a checkpoint file (:func:`load_checkpoint`) on their format."""
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt == FORMAT or (fmt == FUSED_FORMAT and raw.get("fused") is True) or fmt == EXPORT_FORMAT:
        if int(raw.get("version", 1)) > VERSION:
            raise CheckpointError(f"{where} was written by a later spikingformer ({fmt} version {raw['version']}; this "
                                  f"release reads version {VERSION}): upgrade spikingformer to read it")
        names = [f.name for f in fields(TrainingState)]
        training = TrainingState(**{k: raw[k] for k in names}) if fmt == FORMAT and all(k in raw for k in names) else None
        return Checkpoint(where, fmt, raw["model"], raw.get("model_name"), raw["model_config"], bool(raw.get("fused")),
                          raw.get("train_config"), training)
    try:
        return Checkpoint(where, WEIGHTS, extract_state_dict(raw))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


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


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], checkpoint: Checkpoint) -> nn.Module:
    """``model.load_state_dict(state_dict)`` after checking names and shapes; a mismatch is one line.

    ``state_dict`` is in ``model``'s key names (the authors' are translated before, by the builder).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshapen:
        parts = "; ".join(f"{label}: {shorten(keys, 3)}" for label, keys in
                          (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", misshapen)) if keys)
        if checkpoint.describes_model:
            raise CheckpointError(f"{checkpoint.where}: its weights do not match the model it records ({parts}); the file "
                                  "was altered or written for another model: use the checkpoint the run wrote")
        raise CheckpointError(f"{checkpoint.where}: its weights do not match this model ({parts}); check that the model "
                              "name matches the checkpoint (family, depth, embed_dim, num_classes)")
    model.load_state_dict(state_dict)
    return model


# ----------------------------------------------------------------------------------------------
# writing


def _new_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()  # read once, at import: os.umask can only be read by setting it


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync (``durable``: what a power cut
    must not lose; a cache skips it), then rename it over ``path``.

    A reader (or a crash) never sees a half-written file: either the old one or the new one. On any
    failure the temporary file is removed; a full disk or an unwritable folder raises
    :class:`CheckpointError` (the previous file at ``path`` is untouched), also where ``write``
    turned the file's error into one of its own (``torch.save`` reports a full disk as a
    ``RuntimeError`` about a zip position).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path) from err
    out = None
    try:
        with os.fdopen(fd, "wb") as f:
            out = _ErrorKeepingFile(f)
            write(out)
            f.flush()
            if hasattr(os, "fchmod"):  # not on Windows
                os.fchmod(f.fileno(), _NEW_FILE_MODE)  # mkstemp's 0600: the mode a plain open() would give
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = out.error if out is not None and out.error is not None else err
        if isinstance(cause, OSError):
            raise _write_error(cause, path) from cause  # the OS's error, whatever wrapped it
        raise
    return path


class _ErrorKeepingFile:
    """A binary file whose ``write`` keeps the first ``OSError`` it raised (``error``), for
    :func:`write_atomic` to report where a library's own error hid it; everything else is the file's."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _write_error(err: OSError, path: Path) -> CheckpointError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"no space left on device while writing {path}; the previous file there (if any) is "
                               "intact: free some space and run the command again (training: add --resume auto)")
    reason = err.strerror or str(err)
    return CheckpointError(f"cannot write {path}: {reason}; choose a writable folder (training: --output)")


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` atomically (see :func:`write_atomic`)."""
    with open(source, "rb") as src:
        return write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def beside(checkpoint: str | Path, ending: str) -> Path:
    """``<name><ending>`` beside ``checkpoint``, its name cut at the first dot (``best.pth.tar`` -> ``best``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name((checkpoint.name.split(".")[0] or checkpoint.stem) + ending)


def save_fused(model: nn.Module, path: str | Path, model_name: str | None = None, train_config: dict | None = None) -> Path:
    """Write a fused model (:func:`spikingformer.deploy.fuse.fuse_model`) as a self-describing checkpoint."""
    if not is_fused(model):
        raise ValueError("the model still has BatchNorm layers: fuse it first (fuse_model)")
    return save_atomic({**_described(FUSED_FORMAT, model, model_name, train_config), "fused": True}, path)


def export_safetensors(model: nn.Module, path: str | Path, model_name: str | None = None,
                       train_config: dict | None = None) -> Path:
    """Write ``model``'s weights as safetensors with its description in the metadata (see module doc)."""
    from safetensors.torch import save

    described = _described(EXPORT_FORMAT, model, model_name, train_config)
    metadata = {"format": EXPORT_FORMAT, "version": str(VERSION), "model_name": model_name or "",
                "model_config": json.dumps(described["model_config"]), "fused": "true" if is_fused(model) else "false"}
    if train_config is not None:
        metadata["train_config"] = json.dumps(train_config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in described["model"].items()}
    return write_atomic(path, lambda f: f.write(save(tensors, metadata)))


# ----------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file as it is stored (``.safetensors`` or ``torch.save``; tensors and plain data only)."""
    path = Path(path)
    if path.is_dir():  # a run folder, given for its checkpoint
        best = path / "best.pt"
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file" + (f"; pass {best}" if best.is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix == ".onnx":
        raise CheckpointError(f"{path} is an ONNX graph (spikingformer export), not a checkpoint: `spikingformer eval` "
                              "runs it on ONNX Runtime; the other commands and create_model need the checkpoint it was "
                              "exported from")
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
        return {"format": EXPORT_FORMAT, "version": int(metadata.get("version", "1")), "model": tensors,
                "model_name": metadata.get("model_name") or None, "model_config": json.loads(metadata["model_config"]),
                "fused": metadata.get("fused") == "true", "train_config": json.loads(metadata.get("train_config", "null"))}
    except (KeyError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: its spikingformer metadata is damaged ({err}); export it again") from err
