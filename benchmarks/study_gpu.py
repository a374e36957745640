"""Where a GPU step's time goes, and each route on against off there.

The model benchmark (``bench_model.py --device cuda``) times whole steps; this study says why
they take what they take, on the models and batches of that benchmark (its ``build``: same
weights, inputs and BatchNorm statistics):

1. **Host or device?** For our model and the authors' (SpikingJelly's fastest CUDA neuron), per
   model, pass and dtype: the wall time of a step (synchronised before and after), the host's
   time to *issue* it (from the start until the step's Python returns, the GPU's queue empty at
   the start), and from one profiled step the CUDA kernels launched and the GPU's busy time (the
   sum of the kernels' durations). Issue time near the wall time with the GPU busy for less
   means the step waits on the host: fewer launches, not faster kernels, would shorten it.
   The operators that take most of the host's time are listed per model.
2. **Routes on the GPU.** Each route of :mod:`spikingformer.layers.routes` that acts on CUDA
   tensors (the others test for a CPU tensor and leave CUDA alone), on against off, alternating,
   for the whole training step (forward, cross-entropy, backward, AdamW) and inference batch:
   the ratio on / off (below 1: the route is faster there), with the peak CUDA memory of each.

Usage (on a machine with a CUDA device)::

    python benchmarks/study_gpu.py                   # both models, fp32 and bf16
    python benchmarks/study_gpu.py --models event --dtypes fp32 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import common

import bench_model

# the routes that act on CUDA tensors (the rest test for CPU tensors), and the passes they act in;
# batch_pieces is not timed: since this study measured its CPU-sized pieces 1.9-2.2x slower on an
# H200 (2026-12-04), it splits a CUDA batch only where the batch would crowd the device's memory
# (batch_pieces.piece_elements), never at these benchmark batches
CUDA_ROUTES = {"channels_last": ("train", "infer"), "stem_once": ("train", "infer"),
               "attention_order": ("train", "infer"), "recompute": ("train",), "inplace_bn": ("infer",)}


def _sync() -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def wall_and_issue(step: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median wall time of ``step`` (synchronised) and median time until its Python returned."""
    walls, issues = [], []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync()
        walls.append(time.perf_counter() - t0)
        issues.append(t1 - t0)
    return statistics.median(walls), statistics.median(issues)


def profiled(step: Callable[[], None]) -> tuple[int, float, list[tuple[str, float, int]], list[tuple[str, float, int]]]:
    """One profiled step: CUDA kernels launched, their summed duration (s), the operators with the
    most self CPU time and the kernels with the most GPU time (each: name, seconds, calls)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_initialized()
    _sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        _sync()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()
                  if e.self_cpu_time_total > 0), key=lambda r: -r[1])
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e6)
    gpu = sorted(((name[:60], sum(t), len(t)) for name, t in by_kernel.items()), key=lambda r: -r[1])
    return len(kernels), busy, ops, gpu


def on_off(step: Callable[[], None], route: str, reps: int) -> tuple[float, float, int, int]:
    """Median wall time of ``step`` with ``route`` on and off, alternating, and each one's peak CUDA
    bytes (0 on the CPU)."""
    import torch

    from spikingformer.layers import routes

    cuda = torch.cuda.is_initialized()

    times: dict[str, list[float]] = {"+": [], "-": []}
    peaks = {"+": 0, "-": 0}
    for rep in range(reps + 1):
        for sign in ("+-" if rep % 2 == 0 else "-+"):
            with routes.configured(sign + route):
                _sync()
                base = torch.cuda.memory_allocated() if cuda else 0
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()
                _sync()
                if rep:  # the first round warms up
                    times[sign].append(time.perf_counter() - t0)
                    if cuda:
                        peaks[sign] = max(peaks[sign], torch.cuda.max_memory_allocated() - base)
    return statistics.median(times["+"]), statistics.median(times["-"]), peaks["+"], peaks["-"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(bench_model.MODELS), default=list(bench_model.MODELS))
    ap.add_argument("--dtypes", nargs="+", choices=bench_model.DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--batch", default="bench", choices=["bench", "authors"],
                    help="as bench_model.py's: bench (16 / 8) or the authors' training batch on one GPU (64 / 16)")
    ap.add_argument("--reps", type=int, default=9, help="timed steps per contender or route state (median)")
    ap.add_argument("--top", type=int, default=8, help="operators listed per profiled step")
    ap.add_argument("--no-authors", action="store_true", help="leave out the authors' model (no SpikingJelly needed)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu only checks that the script runs (with --quick): the study is for a GPU")
    ap.add_argument("--quick", action="store_true", help="tiny models (bench_model's --quick sizes): a smoke test")
    args = ap.parse_args(argv)
    bench_model.check_dtypes(args)

    import torch

    import sj_neurons

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: the GPU study needs one")
        return 0
    torch.set_num_threads(1)
    authors = not args.no_authors and sj_neurons.spikingjelly_version() != "not installed"
    began = time.perf_counter()
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    for line in common.machine_lines(1, args.device):
        print(line)
    print(f"- SpikingJelly {sj_neurons.spikingjelly_version()}; the authors' model with its LIFNode"
          if authors else "- the authors' model left out")
    batches = ", ".join(f"{key} {bench_model.batch_of(key, args.batch, args.quick)}" for key in args.models)
    print(f"- batch: {batches}; medians of {args.reps} steps after {bench_model.WARMUP_STEPS} warm-up steps\n")

    host_rows, top_rows, kernel_rows, route_rows = [], [], [], []
    for key in args.models:
        name = bench_model.MODELS[key][0]
        batch = bench_model.batch_of(key, args.batch, args.quick)
        builds = ["ours"] + (["authors"] if authors else [])
        for build_ in builds:
            job = dict(name=name, batch=batch, build=build_, device=args.device, sj_node="LIFNode",
                       overrides=bench_model.QUICK[key] if args.quick else {})
            model, x, y = bench_model.build(job)
            model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
            for mode in ("train", "infer"):
                for dtype in args.dtypes:
                    step = bench_model.step_function(model, x, y, mode, dtype, authors=build_ == "authors")
                    for _ in range(bench_model.WARMUP_STEPS):
                        step()
                    wall, issue = wall_and_issue(step, args.reps)
                    launches, busy, ops, gpu = profiled(step)
                    host_rows.append(f"| {key} | {mode} | {dtype} | {build_} | {wall * 1e3:.1f} | {issue * 1e3:.1f} "
                                     f"| {launches} | {busy * 1e3:.1f} | {busy / wall:.0%} |")
                    top = ", ".join(f"{n} {t * 1e3:.1f} ms ({c})" for n, t, c in ops[:args.top])
                    top_rows.append(f"- {key} {mode} {dtype} {build_}: {top}")
                    top = ", ".join(f"{n} {t * 1e3:.2f} ms ({c})" for n, t, c in gpu[:args.top])
                    kernel_rows.append(f"- {key} {mode} {dtype} {build_}: {top}")
                    if build_ == "ours":
                        for route, passes in CUDA_ROUTES.items():
                            if mode not in passes or (route == "stem_once" and key == "event"):
                                continue
                            on, off, peak_on, peak_off = on_off(step, route, args.reps)
                            route_rows.append(f"| {route} | {key} | {mode} | {dtype} | {on * 1e3:.1f} | "
                                              f"{off * 1e3:.1f} | {on / off:.2f} | {peak_on / 2**20:.0f} | "
                                              f"{peak_off / 2**20:.0f} |")
                    print(f"  [{time.perf_counter() - began:5.0f} s] {key} {mode} {dtype} {build_} done", flush=True)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()

    print("\n## Host or device\n")
    print("wall = a step, synchronised; issue = until its Python returned; kernels = CUDA kernels of one "
          "profiled step; GPU busy = their summed duration, and its share of the wall time\n")
    print("| model | pass | dtype | contender | wall ms | issue ms | kernels | GPU busy ms | busy / wall |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(host_rows))
    print("\nOperators with the most self CPU time (name, time, calls) in one profiled step:\n")
    print("\n".join(top_rows))
    print("\nKernels with the most GPU time (name, time, launches) in one profiled step:\n")
    print("\n".join(kernel_rows))
    print("\n## Routes on the GPU (ours)\n")
    print("| route | model | pass | dtype | on ms | off ms | on / off | peak MB on | peak MB off |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(route_rows))
    print(f"\nRun took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
