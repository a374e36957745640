"""An ONNX file of :func:`~spikingformer.deploy.onnx_export.export_onnx` run on ONNX Runtime's CPU
provider as a module (``spikingformer eval --checkpoint NAME.onnx`` evaluates it on a data set).

The file records the model it was exported from in its metadata (``metadata_props``: the format,
the zoo name, the model's configuration and, when known, the training run's), as a safetensors
export does, so that ``eval`` finds the data set and the input size without being told.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from spikingformer.checkpoints import Checkpoint

ONNX_FORMAT = "spikingformer-onnx"
VERSION = 1


def onnx_metadata(model: nn.Module, model_name: str | None, train_config: dict | None) -> dict[str, str]:
    """The metadata an exported file records (strings, as ONNX's ``metadata_props`` hold them)."""
    meta = {"format": ONNX_FORMAT, "version": str(VERSION), "model_name": model_name or "",
            "model_config": json.dumps(model.config.to_dict()) if hasattr(model, "config") else ""}
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config)
    return meta


def describe_onnx(path: str | Path) -> Checkpoint:
    """What an exported ONNX file records about its model, as a :class:`~spikingformer.checkpoints.Checkpoint`
    without weights (they are in the graph); a file without the record is refused, naming what to do."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # onnx raises DecodeError and others for a file that is not ONNX
        raise ValueError(f"{path} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    if meta.get("format") != ONNX_FORMAT or not meta.get("model_config"):
        raise ValueError(f"{path} was not written by spikingformer export (it does not record its model); export the "
                         "checkpoint with spikingformer export --output NAME.onnx")
    if int(meta.get("version", 1)) > VERSION:
        raise ValueError(f"{path} was written by a later spikingformer (version {meta['version']}): upgrade to read it")
    train = json.loads(meta["train_config"]) if meta.get("train_config") else None
    return Checkpoint(str(path), ONNX_FORMAT, {}, meta.get("model_name") or None, json.loads(meta["model_config"]),
                      train_config=train)


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session of the file at ``path`` on the CPU provider, all graph optimisations,
    ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    """The first output of ``session`` on the CPU float32 copy of ``x``, as a tensor."""
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})[0])


class OnnxRuntimeModel(nn.Module):
    """The ONNX file at ``path`` on ONNX Runtime's CPU provider (``threads`` intra-op threads,
    default: torch's), called like the model it was exported from: CPU float32 inputs, logits back
    as a tensor. ``config`` is that model's :class:`~spikingformer.models.ModelConfig`."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        from spikingformer.models import ModelConfig

        self.description = describe_onnx(path)
        self.config = ModelConfig.from_dict(self.description.model_config)
        self.session = onnx_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, x).to(x.device)
