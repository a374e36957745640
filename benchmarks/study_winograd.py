"""Would Winograd's F(2x2, 3x3) lift the dense limit of the tokenizers' 3x3 convolutions? Side by side.

The valid limit of issue 12 (``dense_limit.py``) times each of a step's convolutions and products as
PyTorch runs them: oneDNN's direct 3x3 convolutions, at 70-97% of the FMA peak on the CPUs measured.
A step can beat that limit only with less arithmetic. The spike routes do it with the sparsity of
spikes; Winograd's minimal filtering does it for any input: F(2x2, 3x3) computes each 2x2 block of
outputs from a 4x4 tile of inputs with 16 products per input and output channel instead of 36
(2.25x fewer), at the price of transforms of the input tiles (4x the input's size) and of the 16
products' sums back to outputs, and of rounding (its transforms add and subtract inputs before
the products).

For each 3x3 convolution of the zoo models' tokenizers, with the inputs, shapes and memory layout
they have in an inference batch of ``bench_model.py`` (captured from the model by hooks, which keep
the ``batch_pieces`` memory route off: the whole batch at once), with this package's CPU allocator
installed as the models run with it, this times alternately on the same tensors:

* ``direct``: ``F.conv2d`` (oneDNN's direct convolution: the limit's);
* ``Winograd``: F(2x2, 3x3) in plain PyTorch (the twin in :mod:`spikingformer.kernels.winograd`):
  the input transform (additions into a (16, tiles, C) array), 16 products of (tiles x C) by
  (C x K) in one ``bmm``, the output transform (additions into a channels-last output); the
  weights' transform is left out (it changes only with the weights);
* ``fused``: what the route ``winograd`` runs (``winograd_conv2d``): each transform one C++ pass
  over the maps (the same additions in the same order, so the same bits), the weights' transform
  included, the batch in pieces;
* ``products``: the 16 products alone, the ceiling of a Winograd convolution whose transforms were
  free;
* ``weight grad``: the weight gradient for a random output gradient, PyTorch's
  (``aten.convolution_backward``, the limit's) beside the route's (``winograd_weight_grad``: the
  input's tiles again, the output gradient's tiles, 16 products summed over tiles, the weight
  transform's adjoint);

and prints each one's median, the ratio of the direct convolution's to each other's (above 1: faster
than the direct convolution), and Winograd's rounding error against the float64 convolution beside the
direct one's (largest difference over the largest output). With ``--bf16`` the maps and weights are
bf16, as CPU bf16 autocast hands them to the convolution (where the CPU has bf16 natively), the
errors against the float64 convolution of those bf16 values.

Usage::

    python benchmarks/study_winograd.py                 # both models, all cores
    python benchmarks/study_winograd.py --quick         # tiny shapes: a smoke test
    python benchmarks/study_winograd.py --bf16          # in bf16 (native bf16 only)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common

MODELS = {"cifar": ("spikingformer_cifar10_4_384", 16), "event": ("spikingformer_cifar10dvs_2_256", 8)}
QUICK = [((2, 8, 8, 8), (16, 8, 3, 3), False), ((1, 3, 7, 5), (4, 3, 3, 3), True)]  # (input, weight, channels last)


def tokenizer_convolutions(key: str) -> list[tuple]:
    """The 3x3 stride-1 convolutions an inference batch of ``bench_model.py``'s model ``key`` runs:
    one (input, weight) per distinct shape, the input in the layout the model gives it."""
    import torch

    import bench_model

    name, batch = MODELS[key]
    model, x, _ = bench_model.build(dict(name=name, batch=batch, build="ours"))
    seen, found = set(), []

    def hook(module, inputs, _out):
        t = inputs[0]
        if module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1):
            key_ = (tuple(t.shape), tuple(module.weight.shape))
            if key_ not in seen:
                seen.add(key_)
                found.append((t.detach().clone(memory_format=torch.preserve_format), module.weight.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model.eval()
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return found


def relative_errors(x, w) -> tuple[float, float]:
    """(direct, Winograd): each float32 result's largest difference from the float64 convolution,
    over the latter's largest magnitude."""
    import torch.nn.functional as F

    from spikingformer.kernels import winograd as wk

    exact = F.conv2d(x.double(), w.double(), padding=1)
    scale = exact.abs().max().item()
    direct = (F.conv2d(x, w, padding=1).double() - exact).abs().max().item() / scale
    wino = (wk.winograd_reference(x, w).double() - exact).abs().max().item() / scale
    return direct, wino


def measure(x, w, reps: int) -> dict:
    """Median seconds of each contender, alternating on the same tensors (after one call each)."""
    import torch
    import torch.nn.functional as F

    from spikingformer.kernels import winograd as wk

    u = wk.weight_transform(w)
    v = wk.input_transform(x)
    m = torch.bmm(v, u)
    shape = (x.shape[0], w.shape[0], x.shape[2], x.shape[3])
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    g = g.contiguous(memory_format=torch.channels_last) if wk.channels_last(x) else g
    calls = {
        "direct": lambda: F.conv2d(x, w, padding=1),
        "Winograd": lambda: wk.output_transform(torch.bmm(wk.input_transform(x), u), shape),
        "fused": lambda: wk.winograd_conv2d(x, w),
        "products": lambda: torch.bmm(v, u, out=m),
        "weight grad": lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                                   1, (False, True, False)),
        "weight grad, Winograd": lambda: wk.winograd_weight_grad(x, g),
    }
    times = {k: [] for k in calls}
    for r in range(reps + 1):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=7, help="alternating timed rounds per convolution")
    ap.add_argument("--quick", action="store_true", help="tiny random shapes: checks the script runs")
    ap.add_argument("--bf16", action="store_true", help="bf16 maps and weights, as CPU bf16 autocast hands them over")
    args = ap.parse_args(argv)
    from spikingformer import allocator
    from spikingformer.cpu_features import native_bf16
    from spikingformer.kernels import winograd as wk

    if args.bf16 and not native_bf16():
        print("bf16: skipped, this CPU has no native bf16 (AVX512-BF16 or AMX)")
        return

    allocator.configure_allocator()  # as the models run: without it, the large maps' page faults dominate
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("# Winograd F(2x2, 3x3) against the direct 3x3 convolution\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(common.machine_lines(torch.get_num_threads())))
    print(f"- median of {args.reps} alternating rounds; CPU allocator: {allocator.allocator_state()}; "
          f"load average (1 min) {common.load_average():.2f}\n")
    if args.quick:
        g = torch.Generator().manual_seed(0)
        fmt = {True: torch.channels_last, False: torch.contiguous_format}
        cases = [("quick", torch.randn(xs, generator=g).contiguous(memory_format=fmt[cl]), torch.randn(ws, generator=g))
                 for xs, ws, cl in QUICK]
    else:
        cases = [(key, x, w) for key in args.models for x, w in tokenizer_convolutions(key)]
    if args.bf16:
        cases = [(key, x.to(torch.bfloat16), w.to(torch.bfloat16)) for key, x, w in cases]
    print(f"dtype: {'bf16' if args.bf16 else 'float32'}\n")
    print("| model | input (N, C, H, W) | K | layout | GFLOP (direct) | direct ms | Winograd ms | fused ms | products ms "
          "| direct / Winograd | direct / fused | direct / products | error: direct | error: Winograd "
          "| weight grad ms | weight grad, Winograd ms | weight grad: direct / Winograd |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, x, w in cases:
        n, c, h, wd = x.shape
        gflop = 2 * n * h * wd * c * w.shape[0] * 9 / 1e9
        t = measure(x, w, args.reps)
        e_direct, e_wino = relative_errors(x, w)
        layout = "channels last" if wk.channels_last(x) and not x.is_contiguous() else "NCHW"
        ms = " | ".join(f"{1e3 * t[k]:.3g}" for k in ("direct", "Winograd", "fused", "products"))  # tiny cases: < 0.01 ms
        ratios = " | ".join(f"{t['direct'] / t[k]:.2f}" for k in ("Winograd", "fused", "products"))
        grads = " | ".join(f"{1e3 * t[k]:.3g}" for k in ("weight grad", "weight grad, Winograd"))
        print(f"| {key} | {n}, {c}, {h}, {wd} | {w.shape[0]} | {layout} | {gflop:.2f} | {ms} | {ratios} "
              f"| {e_direct:.1e} | {e_wino:.1e} | {grads} | {t['weight grad'] / t['weight grad, Winograd']:.2f} |")


if __name__ == "__main__":
    main()
