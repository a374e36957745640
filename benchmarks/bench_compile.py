"""``torch.compile`` against eager, side by side: a training step and an inference batch of zoo models.

For each model, in one process and on the same weights and inputs: the eager model and
``torch.compile(model, fullgraph=True)`` (Inductor; the LIF neurons stay the fused
``spikingformer::lif`` operator inside the compiled graph). Reported per row: the first call
(compilation included), then the median wall and process CPU time of ``--steps`` steps after
``--warmup`` steps, and compiled / eager ratios.

* training step = forward, cross-entropy, ``zero_grad(set_to_none=True)``, backward, AdamW step
  (only the model is compiled);
* inference batch = ``model.eval()`` forward under ``torch.no_grad()``.

Usage::

    python benchmarks/bench_compile.py                                   # digits and CIFAR 4-256
    python benchmarks/bench_compile.py --models spikingformer_digits --steps 5
    python benchmarks/bench_compile.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import common
from spikingformer import allocator
from spikingformer.models.zoo import create_model, model_config

BATCH = {"spikingformer_digits": 64, "spikingformer_cifar10_4_256": 16}


def timed(fn, steps: int, device: torch.device) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def bench(name: str, batch: int, mode: str, compiled: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    device = torch.device(args.device)
    model = create_model(name).to(device)
    cfg = model_config(name)
    x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    run = torch.compile(model, fullgraph=True) if compiled else model
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.cross_entropy(run(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                run(x)
    first = timed(step, 1, device)[0] / 1e3
    for _ in range(args.warmup):
        step()
    wall, cpu = timed(step, args.steps, device)
    return {"first_s": first, "wall_ms": wall, "cpu_ms": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(BATCH))
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    allocator.configure_allocator()
    load0 = os.getloadavg()
    print("# torch.compile against eager\n")
    print(f"Command: `python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}`\n")
    for line in common.machine_lines(args.threads, args.device):
        print(line)
    print(f"- median of {args.steps} steps after {args.warmup} warm-up steps; CPU = process CPU time\n")
    print("| model | batch | step | eager ms (CPU ms) | compiled ms (CPU ms) | compiled / eager (CPU) | first compiled call s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models:
        batch = BATCH.get(name, 16)
        for mode in args.modes:
            eager = bench(name, batch, mode, False, args)
            comp = bench(name, batch, mode, True, args)
            print(f"| {name} | {batch} | {mode} | {eager['wall_ms']:.0f} ({eager['cpu_ms']:.0f}) | "
                  f"{comp['wall_ms']:.0f} ({comp['cpu_ms']:.0f}) | {comp['wall_ms'] / eager['wall_ms']:.2f} "
                  f"({comp['cpu_ms'] / eager['cpu_ms']:.2f}) | {comp['first_s']:.0f} |", flush=True)
    print(f"\nLoad average (1, 5, 15 min) at start: {' '.join(f'{v:.2f}' for v in load0)}; "
          f"at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
