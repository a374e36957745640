"""The token linears' float32 products: MKL (PyTorch's ``mm``) against oneDNN's matmul, side by side.

For each zoo shape (rows x in x out of a token linear, at the batch sizes of ``bench_model.py``) and
each product a linear layer does, both libraries compute the same product alternately on the same
tensors; the table gives each one's rate (GFLOP/s of its best call) and the ratio of the medians,
MKL / oneDNN (above 1: oneDNN is faster). The ``token_linear`` route takes oneDNN's forward and
input gradient where MKL runs its generic code (``spikingformer.cpu_features.mkl_generic``).

* forward: ``x W^T`` (``x`` rows x in);
* input gradient: ``grad W`` (``W`` read through its transposed view by oneDNN);
* weight gradient: ``grad^T x`` (summed over the rows; the route leaves it to MKL).

Usage::

    python benchmarks/bench_products.py --threads 1 2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_products.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common

# (model, rows, in, out): the token linears of Spikingformer-4-384 (T = 4, batch 16, 64 tokens) and
# of the 2-256 event model (T = 16, batch 8, 64 tokens)
SHAPES = [("cifar", 4096, 384, 384), ("cifar", 4096, 384, 1536), ("cifar", 4096, 1536, 384),
          ("event", 8192, 256, 256), ("event", 8192, 256, 1024), ("event", 8192, 1024, 256)]


def calls(rows: int, fan_in: int, fan_out: int):
    """``{product: (mkl, onednn)}`` callables on fixed random tensors."""
    import torch

    from spikingformer.kernels import products

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g)
    grad = torch.randn(rows, fan_out, generator=g)
    onednn = torch.ops.mkldnn._linear_pointwise
    return {
        "forward": (lambda: x @ w.t(), lambda: products.linear(x, w)),
        "input gradient": (lambda: grad @ w, lambda: products.input_grad(grad, w)),
        "weight gradient": (lambda: grad.t() @ x, lambda: onednn(grad.t(), x.t(), None, "none", [], "")),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=9, help="alternating rounds per case")
    args = ap.parse_args(argv)
    import torch

    print("# Token-linear products: MKL against oneDNN\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(common.machine_lines(max(args.threads))))
    print(f"- {args.reps} rounds of alternating calls, wall clock; ratio: median MKL / median oneDNN\n")
    print("| threads | model | rows x in x out | product | MKL GFLOP/s | oneDNN GFLOP/s | MKL / oneDNN |")
    print("|---:|---|---|---|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model, rows, fan_in, fan_out in SHAPES:
            flops = 2 * rows * fan_in * fan_out
            for product, pair in calls(rows, fan_in, fan_out).items():
                times = [[], []]
                for fn in pair:
                    fn()  # warm-up
                for _ in range(args.reps):
                    for i, fn in enumerate(pair):
                        t0 = time.perf_counter()
                        fn()
                        times[i].append(time.perf_counter() - t0)
                rates = [flops / min(t) / 1e9 for t in times]
                ratio = statistics.median(times[0]) / statistics.median(times[1])
                print(f"| {threads} | {model} | {rows} x {fan_in} x {fan_out} | {product} | {rates[0]:.0f} | "
                      f"{rates[1]:.0f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
