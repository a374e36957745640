"""Evaluate a saved model (this project's checkpoint or the authors') on a data set."""

from __future__ import annotations

from pathlib import Path

from spikingformer import checkpoints
from spikingformer.config import DataSection, current_names
from spikingformer.data import build_dataset, model_mismatch
from spikingformer.engine.distributed import alike_on_this_machine, setup, teardown
from spikingformer.engine.precision import autocast_dtype, tf32_switches
from spikingformer.engine.trainer import evaluate, make_loader
from spikingformer.models import model_from_checkpoint


def data_section_for(checkpoint: checkpoints.Checkpoint | None, dataset: str | None, data_dir: str | None,
                     time_steps: int | None) -> DataSection:
    """The data settings of the checkpoint's training run, with the given values taking precedence."""
    data = DataSection()
    recorded = checkpoint.recorded_data if checkpoint is not None else None
    if recorded is not None:
        for key, value in current_names(recorded).items():
            setattr(data, key, value)
    elif dataset is None:
        raise ValueError("this checkpoint does not record its data set; pass --dataset (and --data-dir)")
    if dataset is not None:
        data.dataset = dataset
        data.data_dir = data_dir
    elif data_dir is not None:
        data.data_dir = data_dir
    if time_steps is not None:
        data.time_steps = time_steps
    return data


def model_overrides(model_args: dict | None, time_steps: int | None) -> dict:
    """``--model-args`` with ``--time-steps`` (the model's T) in them; the two may not disagree."""
    overrides = dict(model_args or {})
    if time_steps is not None:
        if overrides.get("time_steps", time_steps) != time_steps:
            raise ValueError(f"--time-steps {time_steps} and --model-args time_steps {overrides['time_steps']} differ; "
                             "give the number of time steps once, with --time-steps")
        overrides["time_steps"] = time_steps
    return overrides


def _onnx_model(path: str | Path, model_name: str | None, device: str, amp: str, overrides: dict):
    """An exported ONNX file's description and :class:`~spikingformer.deploy.onnx_runtime.OnnxRuntimeModel`;
    the options a graph cannot follow are refused, naming what to do instead."""
    from spikingformer.deploy.onnx_export import require_packages
    from spikingformer.deploy.onnx_runtime import OnnxRuntimeModel

    require_packages()
    if device not in ("auto", "cpu") or amp != "off":
        raise ValueError("an ONNX file is evaluated in float32 on ONNX Runtime's CPU provider: drop --device and --amp")
    model = OnnxRuntimeModel(path)
    recorded = model.description.model_name
    if model_name and recorded and model_name != recorded:
        raise ValueError(f"{path} holds the graph of a {recorded} model, not {model_name}; drop --model or pick the matching file")
    graph_steps = model.config.time_steps
    if overrides.get("time_steps", graph_steps) != graph_steps or set(overrides) - {"time_steps"}:
        raise ValueError(f"{path} holds the graph of T = {graph_steps} and its model's configuration: export the checkpoint "
                         "again with --time-steps or --model-args to evaluate another")
    return model.description, model


def evaluate_checkpoint(path: str | Path, model_name: str | None = None, dataset: str | None = None,
                        data_dir: str | None = None, batch_size: int = 64, device: str = "auto", amp: str = "off",
                        time_steps: int | None = None, tf32: bool = False, model_args: dict | None = None,
                        workers: int | None = None) -> dict:
    """Top-1/top-5 of a checkpoint on its test split; returns the metrics with the model and data names.

    ``time_steps``: evaluate at T time steps (static images repeated T times, events integrated into T
    frames) instead of the training run's. ``model_args``: overrides of the model's configuration
    (an authors' checkpoint of a size outside the zoo). ``tf32``: on NVIDIA GPUs, float32 products and
    convolutions on TF32 tensor cores (as training's ``--tf32``); off, both in full float32. ``workers``:
    DataLoader worker processes (default: the training run's, else 0)."""
    overrides = model_overrides(model_args, time_steps)
    onnx = Path(path).suffix == ".onnx"
    if onnx:
        ckpt, model = _onnx_model(path, model_name, device, amp, overrides)
        overrides["time_steps"] = model.config.time_steps  # the graph's, also for the data
    else:
        ckpt = checkpoints.read(path)
        model = model_from_checkpoint(ckpt, model_name, **overrides)
    data = data_section_for(ckpt, dataset, data_dir, overrides.get("time_steps"))
    if workers is not None:
        data.workers = workers
    if data.time_steps is None:  # a checkpoint without a training configuration: the model's
        data.time_steps = model.config.time_steps
    runtime = setup("cpu" if onnx else device)
    try:
        model = model.to(runtime.device)
        c = model.config
        with alike_on_this_machine():
            if mismatch := model_mismatch(data.dataset, ckpt.model_name or model_name or "of the checkpoint",
                                          c.in_channels, c.img_size, fix="is this the right checkpoint for this data set?"):
                raise ValueError(mismatch)
            eval_set = build_dataset(data, c.img_size, train=False)
            if eval_set.num_classes != model.config.num_classes:
                raise ValueError(
                    f"the model has {model.config.num_classes} classes but {data.dataset} has {eval_set.num_classes}; "
                    "is this the right checkpoint for this data set?"
                )
        loader = make_loader(eval_set, batch_size, False, runtime, data.workers, 0)
        with tf32_switches(tf32, runtime.device):
            metrics = evaluate(model, loader, runtime, autocast_dtype(amp, runtime.device))
    finally:
        teardown()
    name = ckpt.model_name or model_name
    return {**metrics, "model": name, "dataset": data.dataset, "time_steps": data.time_steps}
