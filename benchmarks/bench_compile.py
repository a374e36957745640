"""``torch.compile`` against eager, side by side: a training step and an inference batch of zoo models.

For each model, in one process, one model and one optimizer: the eager module and
``torch.compile(model, fullgraph=True, mode=...)`` (Inductor) of it for each ``--compile-modes``
(``default``; ``reduce-overhead`` replays the compiled step as CUDA graphs on a GPU, one launch for
a whole graph instead of one per kernel), their steps alternating on the same inputs, so all see
the same machine state and the same weights. The project's operators
(the LIF neuron, the fused BN -> SN [-> max-pool] kernels, the spike linears and the spike
convolutions) stay opaque calls inside the compiled graph. Reported per row: the first compiled
call (compilation included), then the median wall and process CPU time of ``--steps`` steps of
each after ``--warmup`` of each, and compiled / eager ratios.

* training step = forward, cross-entropy, ``zero_grad(set_to_none=True)``, backward, AdamW step
  (only the model is compiled);
* inference batch = ``model.eval()`` forward under ``torch.no_grad()``.

Usage::

    python benchmarks/bench_compile.py                                   # digits, CIFAR 4-256, event 2-256
    python benchmarks/bench_compile.py --models spikingformer_digits --steps 5
    python benchmarks/bench_compile.py --device cuda --compile-modes default reduce-overhead
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

BATCH = {"spikingformer_digits": 64, "spikingformer_cifar10_4_256": 16, "spikingformer_cifar10dvs_2_256": 8}


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call of ``fn``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def inputs(name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for the model: images, or for event models sparse event counts ``(B, T, C, H, W)``."""
    cfg = model_config(name)
    g = torch.Generator().manual_seed(1)
    if cfg.family == "event":
        x = torch.poisson(torch.full((batch, cfg.time_steps, cfg.in_channels, cfg.img_size, cfg.img_size), 0.15),
                          generator=g)
    else:
        x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
    return x.to(device), torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)


def bench(name: str, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """``{"eager": (wall ms, cpu ms), <compile mode>: (...), "first_s": {<compile mode>: s}}`` of
    alternating steps."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    device = torch.device(args.device)
    model = create_model(name).to(device)
    x, y = inputs(name, batch, device)
    runs = {"eager": model, **{m: torch.compile(model, fullgraph=True, mode=m) for m in args.compile_modes}}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(mode == "train")

    def step(run):
        if mode == "train":
            loss = torch.nn.functional.cross_entropy(run(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                run(x)

    first = {m: timed(lambda: step(runs[m]), device)[0] for m in args.compile_modes}
    times = {k: [] for k in runs}
    names = list(runs)
    for i in range(args.warmup + args.steps):
        for k in names[i % len(names):] + names[:i % len(names)]:  # each in every position in turn
            t = timed(lambda: step(runs[k]), device)
            if i >= args.warmup:
                times[k].append(t)
    out = {k: tuple(1e3 * statistics.median(v[j] for v in times[k]) for j in (0, 1)) for k in runs}
    return dict(out, first_s=first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(BATCH))
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile-modes", nargs="+", default=["default"], choices=["default", "reduce-overhead"],
                    help="torch.compile modes, each a row against the same eager steps (reduce-overhead: CUDA graphs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    allocator.configure_allocator()
    load0 = os.getloadavg()
    print("# torch.compile against eager\n")
    print(f"Command: `python benchmarks/bench_compile.py {' '.join(sys.argv[1:])}`\n")
    for line in common.machine_lines(args.threads, args.device):
        print(line)
    print(f"- median of {args.steps} steps of each after {args.warmup} warm-up steps of each, alternating; "
          "CPU = process CPU time\n")
    print("| model | batch | step | compile mode | eager ms (CPU ms) | compiled ms (CPU ms) | compiled / eager (CPU) "
          "| first compiled call s |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for name in args.models:
        batch = BATCH.get(name, 16)
        for mode in args.modes:
            r = bench(name, batch, mode, args)
            ew, ec = r["eager"]
            for m in args.compile_modes:
                cw, cc = r[m]
                print(f"| {name} | {batch} | {mode} | {m} | {ew:.1f} ({ec:.1f}) | {cw:.1f} ({cc:.1f}) | {cw / ew:.2f} "
                      f"({cc / ec:.2f}) | {r['first_s'][m]:.0f} |", flush=True)
    print(f"\nLoad average (1, 5, 15 min) at start: {' '.join(f'{v:.2f}' for v in load0)}; "
          f"at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
