"""The fused training segment's BatchNorm work, PyTorch's against the library's, side by side.

The tokenizer's BN -> SN [-> max-pool] and the blocks' token BN -> SN in training (routes
``fused_spike_pool`` and ``fused_bn_spike``) need BN's batch statistics in the forward and BN's
backward after the kernel's LIF backward. Two ways, on the zoo models' real shapes:

* **PyTorch's**: ``torch.batch_norm_update_stats``, then the kernel's LIF backward
  (``cpu_backend.lif_pool_backward``), then ``native_batch_norm_backward``, which reads the maps
  twice more (its two reductions, then the input gradient);
* **the library's**: ``batch_stats.batch_norm_update_stats`` (the same sums in the same order, bit
  for bit), then ``cpu_backend.bn_lif_pool_backward``: the LIF backward pass also sums BN's two
  reductions, and one more pass gives the input gradient.

Each case runs both alternately (one warm-up each), on float32 maps and on bfloat16 ones (BN's
input under CPU bf16 autocast); the table gives each one's best wall time and the ratio. Usage::

    python benchmarks/bench_bn_segment.py --threads 2 --reps 7
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        SPIKINGFORMER_NATIVE_ARCH=x86-64-v3 python benchmarks/bench_bn_segment.py   # as an AVX2 CPU
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import common

# name, maps (T, B, H, W, C) (token rows: H = rows per image, W = 1), max-pool after the neuron
CASES = [
    ("event stage 1: T=16, B=8, 128x128x32, pool", (16, 8, 128, 128, 32), True),
    ("event stage 2: T=16, B=8, 64x64x64, pool", (16, 8, 64, 64, 64), True),
    ("event stage 3: T=16, B=8, 32x32x128, pool", (16, 8, 32, 32, 128), True),
    ("CIFAR stage 1: T=4, B=16, 32x32x48", (4, 16, 32, 32, 48), False),
    ("CIFAR stage 3: T=4, B=16, 32x32x192, pool", (4, 16, 32, 32, 192), True),
    ("CIFAR MLP tokens: 4096 rows x 1536", (4, 16, 64, 1, 1536), False),
]
QUICK = [("small maps: T=2, B=2, 16x16x32, pool", (2, 2, 16, 16, 32), True),
         ("small tokens: 64 rows x 64", (2, 2, 16, 1, 64), False)]


def segment_pair(shape, pool: bool, dtype: str = "fp32"):
    """``(pytorchs, ours)``: callables running the segment's BN work each way on random maps of
    ``dtype`` (``"fp32"`` or ``"bf16"``)."""
    import torch

    from spikingformer.kernels import batch_stats
    from spikingformer.kernels import cpu_backend as cb
    from spikingformer.kernels.params import LIFParams

    p = LIFParams()
    g = torch.Generator().manual_seed(0)
    storage = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    z = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(storage)
    grad = torch.randn(cb.pooled_shape(z) if pool else shape, generator=g).to(storage)
    images = z.permute(0, 1, 4, 2, 3).flatten(0, 1)  # (T x B, C, H, W) channels-last, as BN sees it
    channels = shape[-1]
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.1
    running = (torch.zeros(channels), torch.ones(channels))

    def pytorchs():
        mean, var = torch.batch_norm_update_stats(images, *running, 0.1)
        invstd = cb.bn_invstd(var, 1e-5, True)
        gz = cb.lif_pool_backward(z, grad, p, (mean, invstd, weight, bias), pool)
        return torch.ops.aten.native_batch_norm_backward(gz.permute(0, 1, 4, 2, 3).flatten(0, 1), images, weight,
                                                         None, None, mean, invstd, True, 1e-5, [True] * 3)

    def ours():
        mean, var = batch_stats.batch_norm_update_stats(images, *running, 0.1)
        invstd = cb.bn_invstd(var, 1e-5, True)
        return cb.bn_lif_pool_backward(z, grad, p, (mean, invstd, weight, bias), pool, 1e-5)

    return pytorchs, ours


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timed calls of each way per case (best reported)")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="two small cases (a smoke test)")
    args = ap.parse_args(argv)
    from spikingformer import allocator

    allocator.configure_allocator()  # as the benchmarks' own runs: no page faults in the timings
    import torch

    torch.set_num_threads(args.threads)
    print("# BatchNorm's work in the fused training segment: PyTorch's against the library's\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- best of {args.reps} alternating calls each, wall clock\n")
    print("| case | dtype | PyTorch's ms | library's ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for (name, shape, pool), dtype in itertools.product(QUICK if args.quick else CASES, args.dtypes):
        pair = segment_pair(shape, pool, dtype)
        best = [float("inf"), float("inf")]
        for rep in range(args.reps + 1):
            for i, fn in enumerate(pair):
                t0 = time.perf_counter()
                fn()
                if rep:  # the first call of each is the warm-up
                    best[i] = min(best[i], time.perf_counter() - t0)
        print(f"| {name} | {dtype} | {best[0] * 1e3:.1f} | {best[1] * 1e3:.1f} | {best[0] / best[1]:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
