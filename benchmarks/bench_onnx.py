"""Inference on the CPU: this project's model against ONNX Runtime on its exported graph, side by side.

For each model, in one process, on one batch (its BatchNorm statistics calibrated on that batch, so
the neurons fire as in a trained model rather than barely at all), three contenders, their batches
alternating in turn:

* ``ours``: the model as ``spikingformer`` runs it (eval, ``torch.no_grad()``, float32, the routes on
  for this CPU and the fused C++ kernels);
* ``onnxruntime``: the file ``spikingformer export --output NAME.onnx`` writes
  (:func:`spikingformer.deploy.onnx_export.export_onnx`), on ONNX Runtime's CPU provider with all
  graph optimisations and ``--threads`` intra-op threads;
* ``plain PyTorch``: the computation that graph was traced from (every neuron on its reference
  loop, only the plain-PyTorch routes).

Reported: median wall time of ``--steps`` batches of each after ``--warmup``, the ratios to ours,
and the largest logit difference of ONNX Runtime to ours.

Usage::

    python benchmarks/bench_onnx.py                                 # digits, CIFAR 4-256, event 2-256
    python benchmarks/bench_onnx.py --models spikingformer_cifar10_4_384 --steps 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from spikingformer import allocator
from spikingformer.analysis.inputs import calibrate_batchnorm
from spikingformer.deploy.onnx_export import export_onnx, plain_graph
from spikingformer.deploy.onnx_runtime import onnx_session, run_session
from spikingformer.engine.firing import FiringRateMeter
from spikingformer.models.zoo import create_model

BATCH = {"spikingformer_digits": 64, "spikingformer_cifar10_4_256": 16, "spikingformer_cifar10dvs_2_256": 8}


def batch_for(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """Images in [0, 1), or for event models sparse event counts ``(B, T, C, H, W)``, as bench_compile.py."""
    c = model.config
    g = torch.Generator().manual_seed(1)
    if c.family == "event":
        return torch.poisson(torch.full((batch, c.time_steps, c.in_channels, c.img_size, c.img_size), 0.15), generator=g)
    return torch.rand(batch, c.in_channels, c.img_size, c.img_size, generator=g)


def firing_rate(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The model's firing rate on ``x`` as training and eval report it (each neuron's rate, averaged)."""
    meter = FiringRateMeter(model)
    try:
        with plain_graph(model):  # module calls, so that every neuron's hook sees its spikes
            model(x)
        return meter.pop()
    finally:
        meter.close()


def bench(name: str, batch: int, args: argparse.Namespace, folder: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(name)
    x = batch_for(model, batch)
    calibrate_batchnorm(model, [x])
    rate = firing_rate(model, x)
    t0 = time.perf_counter()
    export_onnx(model, folder / f"{name}.onnx", example=x, check=False)
    export_s = time.perf_counter() - t0
    session = onnx_session(folder / f"{name}.onnx", args.threads)

    def ours():
        with torch.no_grad():
            return model(x)

    def plain():
        with plain_graph(model):
            return model(x)

    runs = {"ours": ours, "onnxruntime": lambda: run_session(session, x), "plain PyTorch": plain}
    difference = float((runs["onnxruntime"]() - ours()).abs().max())
    names, times = list(runs), {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for k in names[i % len(names):] + names[:i % len(names)]:  # each in every position in turn
            w0 = time.perf_counter()
            runs[k]()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - w0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(ms=ms, rate=rate, difference=difference, export_s=export_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(BATCH))
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        sys.exit("bench_onnx.py needs onnx, onnxscript and onnxruntime: pip install -e '.[onnx]'")
    torch.set_num_threads(args.threads)
    allocator.configure_allocator()
    print("# Inference: ours against ONNX Runtime on the exported graph\n")
    print(f"Command: `python benchmarks/bench_onnx.py {' '.join(sys.argv[1:])}`\n")
    for line in common.machine_lines(args.threads):
        print(line)
    print(f"- onnxruntime {__import__('onnxruntime').__version__}; median wall time of {args.steps} batches of each "
          f"after {args.warmup} warm-up batches of each, alternating\n")
    print("| model | batch | firing rate | ours ms | onnxruntime ms | plain PyTorch ms | onnxruntime / ours "
          "| plain / ours | max logit difference | export s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            batch = BATCH.get(name, 16)
            r = bench(name, batch, args, Path(folder))
            ms = r["ms"]
            print(f"| {name} | {batch} | {r['rate']:.3f} | {ms['ours']:.1f} | {ms['onnxruntime']:.1f} "
                  f"| {ms['plain PyTorch']:.1f} | {ms['onnxruntime'] / ms['ours']:.2f}x "
                  f"| {ms['plain PyTorch'] / ms['ours']:.2f}x | {r['difference']:.2g} | {r['export_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
