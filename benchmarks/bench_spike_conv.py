"""The tokenizer's convolutions of spike maps: float32 (oneDNN, as the model runs them) against the
``spike_conv`` route's two ways, side by side on the zoo models' inference shapes: three int8
convolutions, and the accumulation of each window's spikes' weights.

For each case all three run alternately on the same spike maps (channels-last, as the tokenizer
hands them over, at the firing rate the benchmark models' neurons give that stage in inference,
or at each of ``--rates``); the table gives each one's best wall time, the median over the rounds
of float32 / that way (calls made back to back), and each one's largest difference from the
float64 convolution. The int8 way's packed weights are made once, as the route keeps them for a
model in inference. ``SPIKE_CONV_MIN_CHANNELS`` and ``SPIKE_CONV_MAX_DENSITY`` in
``spikingformer.layers.routes`` come from these tables. Usage::

    python benchmarks/bench_spike_conv.py --threads 2 --reps 15
    python benchmarks/bench_spike_conv.py --threads 2 --rates 0.02 0.05 0.1 0.2   # the accumulation's limit
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 SPIKINGFORMER_NATIVE_ARCH=x86-64-v3 \\
        python benchmarks/bench_spike_conv.py   # as an AVX2 CPU (int8 without VNNI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common

# name, (maps N, input channels, H = W, output channels), the input's firing rate: the convolutions
# of tokenizer stages 1-4 in inference (event model: pieces of 2 samples x T = 16; CIFAR: batch 16
# x T = 4), rates as bench_model.py's models give them (BatchNorm statistics of the timed batch)
CASES = {
    "event": [("stage 1, 32 -> 64 at 64x64", (32, 32, 64, 64), 0.42), ("stage 2, 64 -> 128 at 32x32", (32, 64, 32, 128), 0.41),
              ("stage 3, 128 -> 256 at 16x16", (32, 128, 16, 256), 0.41),
              ("stage 4, 256 -> 256 at 8x8", (32, 256, 8, 256), 0.40)],
    "cifar": [("stage 1, 48 -> 96 at 32x32", (64, 48, 32, 96), 0.07), ("stage 2, 96 -> 192 at 32x32", (64, 96, 32, 192), 0.047),
              ("stage 3, 192 -> 384 at 16x16", (64, 192, 16, 384), 0.26),
              ("stage 4, 384 -> 384 at 8x8", (64, 384, 8, 384), 0.20)],
}
QUICK = {"small": [("8 -> 16 at 8x8", (2, 8, 8, 16), 0.1)]}


def run_case(shape: tuple[int, int, int, int], rate: float, reps: int) -> dict:
    import torch

    from spikingformer.kernels import spike_conv

    n, cin, hw, cout = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, cin, hw, hw, generator=gen) < rate).float().contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
    pieces = spike_conv.PackedPieces(w)
    calls = {"fp32": lambda: torch.nn.functional.conv2d(x, w, padding=1),
             "int8": lambda: spike_conv.spike_conv2d(x, pieces),
             "sum": lambda: spike_conv.accumulate_conv2d(x, w, None, 1.0)}
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    errors = {k: float((f().double() - exact).abs().max()) for k, f in calls.items()}
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(times["fp32"], times[k])) for k in ("int8", "sum")}
    return dict(best={k: 1e3 * min(v) for k, v in times.items()}, ratios=ratios, errors=errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=15, help="alternating rounds per case")
    ap.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--rates", type=float, nargs="+", help="firing rates to run every case at (default: the models')")
    ap.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    args = ap.parse_args(argv)
    import torch

    from spikingformer import allocator
    from spikingformer.cpu_features import native_int8

    allocator.configure_allocator()  # as the command runs: outputs from reused blocks, not fresh pages
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else {m: CASES[m] for m in args.models}
    print("# Spike convolution: float32 against int8 pieces and accumulation\n")
    print(f"Command: `{common.command(argv if argv is not None else sys.argv[1:])}`\n")
    for line in common.machine_lines(torch.get_num_threads()):
        print(line)
    print(f"- 8-bit dot products (AVX512-VNNI or AMX) usable by oneDNN: {native_int8()}")
    print(f"- {args.reps} rounds of alternating calls, wall clock; ratio: median over rounds of float32 / that way; "
          "error: largest difference from the float64 convolution\n")
    print("| case | rate | float32 ms | int8 ms | int8 ratio | sum ms | sum ratio | error: float32 | int8 | sum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, rows in cases.items():
        for name, shape, model_rate in rows:
            for rate in args.rates or [model_rate]:
                r = run_case(shape, rate, args.reps)
                b, q, e = r["best"], r["ratios"], r["errors"]
                print(f"| {model} {name} | {rate:.3f} | {b['fp32']:.2f} | {b['int8']:.2f} | {q['int8']:.2f}x | "
                      f"{b['sum']:.2f} | {q['sum']:.2f}x | {e['fp32']:.1e} | {e['int8']:.1e} | {e['sum']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
