"""ONNX export of a model (plain or fused) for inference runtimes (ONNX Runtime is the one tested).

The graph is traced from the plain PyTorch computation the routes stand in for (``SPIKINGFORMER_ROUTES``
``none`` but ``stem_once`` and ``attention_order``, which are plain PyTorch too) with every
:class:`~spikingformer.neuron.MultiStepLIF` on its ``reference`` loop: the C++ and Triton kernels
are operators ONNX has no function for. The time loop is unrolled (the model's T is fixed in the
graph); the batch dimension stays free. The model's own state (training flag, neuron backends,
routes) is put back afterwards.

Needs the ``onnx`` and ``onnxscript`` packages (``pip install 'spikingformer[onnx]'``); with
``onnxruntime`` installed too, the written file is run on the example input and compared with the
PyTorch model (:class:`OnnxCheck`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# routes that are plain PyTorch operations (the others call the package's own operators)
PLAIN_ROUTES = "none,+stem_once,+attention_order"


@dataclass
class OnnxCheck:
    """ONNX Runtime's output on the example input against the PyTorch model's (the same graph's
    reference computation): float32 rounding differs between the two, so a membrane within rounding
    of the threshold may fire in one of them only."""

    batch: int
    max_abs_difference: float
    output_scale: float  # max |logit| of the PyTorch model
    same_predictions: int  # samples whose top-1 class agrees

    def __str__(self) -> str:
        return (f"ONNX Runtime on {self.batch} example input(s): max |logit difference| {self.max_abs_difference:.3g} "
                f"(logits up to {self.output_scale:.3g}), top-1 alike in {self.same_predictions}/{self.batch}")


def missing_packages(names: tuple[str, ...] = ("onnx", "onnxscript")) -> list[str]:
    """Which of ``names`` (default: the packages the export needs) are not installed."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def require_packages() -> None:
    """Raise a ValueError naming the packages ONNX export needs that are not installed, and how to install them."""
    if missing := missing_packages():
        raise ValueError(f"ONNX export needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                         "pip install 'spikingformer[onnx]' (onnx, onnxscript and onnxruntime, which checks the file)")


@contextlib.contextmanager
def plain_graph(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` in eval mode computes with plain PyTorch operations only (see the
    module doc); its modules' training flags and its neurons' backends are put back after."""
    from spikingformer.layers import routes
    from spikingformer.modes import evaluating
    from spikingformer.neuron import MultiStepLIF

    neurons = [m for m in model.modules() if isinstance(m, MultiStepLIF)]
    backends = [m.backend for m in neurons]
    try:
        for m in neurons:
            m.backend = "reference"
        with routes.configured(PLAIN_ROUTES), torch.no_grad(), evaluating(model):
            yield model
    finally:
        for m, backend in zip(neurons, backends):
            m.backend = backend


def example_input(model: nn.Module, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A synthetic input of the model's shape (:func:`spikingformer.analysis.inputs.random_batches`)."""
    from spikingformer.analysis.inputs import random_batches

    return random_batches(model.config, 1, batch_size, seed)[0]


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                opset: int | None = None, check: bool = True, model_name: str | None = None,
                train_config: dict | None = None) -> OnnxCheck | None:
    """Write ``model`` (a float32 CPU model of the zoo, plain or fused) as an ONNX file at ``path``
    (atomically: the previous file stays on any failure), with a free batch dimension, recording
    the model (``model_name``, its configuration) and ``train_config`` in the file's metadata
    (:mod:`~spikingformer.deploy.onnx_runtime`).

    ``example``: an input to trace with (default: :func:`example_input`); ``opset``: the ONNX opset
    (default: the exporter's). Returns ONNX Runtime's comparison on ``example`` where ``check`` and
    ``onnxruntime`` is installed, else None.
    """
    from spikingformer.checkpoints import write_atomic
    from spikingformer.deploy.onnx_runtime import onnx_metadata

    require_packages()
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("export a float32 model on the CPU (model.float().cpu()): ONNX Runtime runs the "
                         "convolutions in float32")
    if example is None and not hasattr(model, "config"):
        raise ValueError("pass an example input: this model has no zoo config to shape one from")
    x = example_input(model) if example is None else example
    if x.shape[0] == 1:  # torch.export fixes a dimension of size 1: trace with two copies, the batch stays free
        x = torch.cat([x, x])
    with plain_graph(model):
        expected = model(x)
        names = {"input_names": ["input"]} | ({"output_names": ["logits"]} if isinstance(expected, torch.Tensor) else {})
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
    proto = program.model_proto
    for key, value in onnx_metadata(model, model_name, train_config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    written = write_atomic(path, lambda f: f.write(proto.SerializeToString()))
    if not check or missing_packages(("onnxruntime",)):
        return None
    return compare_with_onnxruntime(written, x, expected)


def compare_with_onnxruntime(path: str | Path, x: torch.Tensor, expected: torch.Tensor) -> OnnxCheck:
    """Run the ONNX file at ``path`` on ``x`` with ONNX Runtime and compare its first output with
    ``expected`` (the model's output, or the first of its outputs)."""
    from spikingformer.deploy.onnx_runtime import onnx_session, run_session

    got = run_session(onnx_session(path), x)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected  # the logits come first
    return OnnxCheck(batch=x.shape[0], max_abs_difference=float((got - expected).abs().max()),
                     output_scale=float(expected.abs().max()),
                     same_predictions=int((got.argmax(1) == expected.argmax(1)).sum()))
