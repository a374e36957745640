"""The tokenizer's convolutions of spike maps: float32 (oneDNN, as the model runs them) against the
``spike_conv`` route's two ways, side by side on the zoo models' shapes: three int8 convolutions,
and the accumulation of each window's spikes' weights (in training too); in inference also the
``winograd`` route's F(2x2, 3x3), the dense alternative where that route runs, and the
accumulation's time against it.

For each case all three run alternately on the same spike maps (channels-last, as the tokenizer
hands them over, at the firing rate the benchmark models' neurons give that stage in inference,
or at each of ``--rates``); the table gives each one's best wall time, the median over the rounds
of float32 / that way (calls made back to back), and each one's largest difference from the
float64 convolution. The int8 way's packed weights are made once, as the route keeps them for a
model in inference. ``SPIKE_CONV_MIN_CHANNELS`` and ``SPIKE_CONV_MAX_DENSITY`` in
``spikingformer.layers.routes`` come from these tables. With ``--train``, a training step's
forward and backward: autograd's float32 convolution against the accumulation's training form (the
forward's sums, PyTorch's input gradient, the weight gradient summed at the windows' spikes), and
against the form that sums only the weight gradient (the float32 forward), and against its
forward for the maps the accumulation declines (the int8 pieces on a CPU with AMX) with PyTorch's
gradients, at the rates the benchmark models' neurons give each stage in training; with
``--winograd`` the route's dense convolutions in those three (its forward above the limit, the
input gradient, the weight gradient where it is not summed) run by F(2x2, 3x3), as on the layers
the ``winograd`` route takes. Usage::

    python benchmarks/bench_spike_conv.py --threads 2 --reps 15
    python benchmarks/bench_spike_conv.py --threads 2 --train --models cifar --rates 0.05 0.1 0.2 0.3
    python benchmarks/bench_spike_conv.py --threads 2 --train --winograd --rates 0.1 0.2 0.3   # beside Winograd
    python benchmarks/bench_spike_conv.py --threads 2 --rates 0.02 0.05 0.1 0.2   # the accumulation's limit
    python benchmarks/bench_spike_conv.py --threads 2 --whole --reps 11   # the int8 pieces in whole models
    python benchmarks/bench_spike_conv.py --threads 2 --whole --train --reps 10   # int8 pieces, weight gradient
    python benchmarks/bench_spike_conv.py --threads 2 --bf16 --train --rates 0.05 0.1 0.15 0.2   # the bf16 limits

With ``--whole``, the benchmark models' inference batches (``bench_model.py``'s models, weights,
batches and BatchNorm statistics), the route as it is, once with the int8 pieces for the maps above
the accumulation's limit and once with the float32 convolution there, alternating: whether the int8
pieces pay on this CPU (``cpu_features.native_int8`` decides; this measures both ways whatever it says).
With ``--whole --train``, their training steps, the route as it is against the same without the int8
pieces (on a CPU with AMX they take the training forward of the maps the accumulation declines) and
against the weight gradient summed only up to the training limit (``SPIKE_CONV_MAX_DENSITY``'s
``weight_grad`` against its ``train``, no int8 pieces).
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
# the same convolutions in a training step (BatchNorm with the batch's statistics: other rates; the
# event model's whole batch, 8 samples x T = 16)
TRAIN_CASES = {
    "event": [(name, (128, *shape[1:]), rate)
              for (name, shape, _), rate in zip(CASES["event"], (0.42, 0.41, 0.41, 0.40))],
    "cifar": [(name, shape, rate) for (name, shape, _), rate in zip(CASES["cifar"], (0.07, 0.047, 0.256, 0.201))],
}
QUICK = {"small": [("8 -> 16 at 8x8", (2, 8, 8, 16), 0.1)]}


def run_case(shape: tuple[int, int, int, int], rate: float, reps: int) -> dict:
    import torch

    from spikingformer.kernels import spike_conv, winograd

    n, cin, hw, cout = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, cin, hw, hw, generator=gen) < rate).float().contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
    pieces = spike_conv.PackedPieces(w)
    calls = {"fp32": lambda: torch.nn.functional.conv2d(x, w, padding=1),
             "int8": lambda: spike_conv.spike_conv2d(x, pieces),
             "sum": lambda: spike_conv.accumulate_conv2d(x, w, None, 1.0),
             "winograd": lambda: winograd.winograd_conv2d(x, w)}
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    errors = {k: float((f().double() - exact).abs().max()) for k, f in calls.items()}
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(times["fp32"], times[k])) for k in ("int8", "sum", "winograd")}
    ratios["sum_vs_winograd"] = statistics.median(a / b for a, b in zip(times["winograd"], times["sum"]))
    return dict(best={k: 1e3 * min(v) for k, v in times.items()}, ratios=ratios, errors=errors)


def run_train_case(shape: tuple[int, int, int, int], rate: float, reps: int, winograd: bool = False) -> dict:
    """Forward and backward (input and weight gradients) of autograd's float32 convolution against
    the route's training form (``spike_conv_ops.convolve_train``) three ways: summed throughout ("sum",
    as up to the ``train`` limit), only the weight gradient summed after the float32 forward
    ("wgrad", as up to the ``weight_grad`` limit without AMX), and the forward of the maps the
    accumulation declines with PyTorch's gradients of the unpacked bits ("dense": the int8 pieces on
    a CPU with AMX, above every limit; elsewhere the float32 convolution); alternately on the same
    maps and output gradient. With ``winograd``, the route's three ways as on the layers the
    ``winograd`` route takes: their dense convolutions (the forward above the accumulation's limit,
    the input gradient, the weight gradient where it is not summed) by F(2x2, 3x3); the float32
    column stays autograd's direct convolution.
    Errors are the weight gradients' largest differences from float64's (the summing ways sum it
    alike)."""
    import torch

    from spikingformer.kernels import spike_conv_ops as ops

    def float_forward(xi, wi):  # the float32 forward, whatever the CPU (as without AMX)
        kept, ops.native_int8 = ops.native_int8, lambda: False
        try:
            return ops.convolve_train(xi, wi, None, -1.0, 1.0, 1.0, winograd)
        finally:
            ops.native_int8 = kept

    n, cin, hw, cout = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, cin, hw, hw, generator=gen) < rate).float().contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
    g = torch.randn(n, cout, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    forwards = {"fp32": lambda xi, wi: torch.nn.functional.conv2d(xi, wi, padding=1),
                "sum": lambda xi, wi: ops.convolve_train(xi, wi, None, 1.0, 1.0, -1.0, winograd),
                "wgrad": float_forward,
                "dense": lambda xi, wi: ops.convolve_train(xi, wi, None, -1.0, -1.0, 1.0, winograd)}

    def step(forward):
        xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
        forward(xi, wi).backward(g)
        return wi.grad

    exact = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1],
                                                False, [0, 0], 1, [False, True, False])[1]
    errors = {k: float((step(f).double() - exact).abs().max()) for k, f in forwards.items()}
    times = {k: [] for k in forwards}
    for _ in range(reps):
        for k, f in forwards.items():
            t = time.perf_counter()
            step(f)
            times[k].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(times["fp32"], times[k])) for k in ("sum", "wgrad", "dense")}
    return dict(best={k: 1e3 * min(v) for k, v in times.items()}, ratios=ratios, errors=errors)


def _train_table(cases: dict, rates: list[float] | None, reps: int, winograd: bool) -> None:
    print("| case | rate | float32 fwd+bwd ms | sum fwd+bwd ms | sum ratio | weight gradient summed ms | its ratio "
          "| dense forward (int8 pieces where AMX) ms | its ratio | weight-gradient error: float32 | sum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, rows in cases.items():
        for name, shape, model_rate in rows:
            for rate in rates or [model_rate]:
                r = run_train_case(shape, rate, reps, winograd)
                b, q, e = r["best"], r["ratios"], r["errors"]
                print(f"| {model} {name} | {rate:.3f} | {b['fp32']:.2f} | {b['sum']:.2f} | {q['sum']:.2f}x | "
                      f"{b['wgrad']:.2f} | {q['wgrad']:.2f}x | {b['dense']:.2f} | {q['dense']:.2f}x | "
                      f"{e['fp32']:.1e} | {e['sum']:.1e} |", flush=True)


def run_bf16_case(shape: tuple[int, int, int, int], rate: float, reps: int, train: bool) -> dict:
    """Under CPU bf16 autocast, the route's layer call (``layers.spike_conv.convolve``, its bf16 limits
    lifted) against autocast's bf16 convolution, alternately on the same bf16 spike maps: inference
    (``train`` False), or forward and backward, summed throughout ("sum") and with only the weight
    gradient summed ("wgrad")."""
    import torch
    from torch import nn

    from spikingformer.layers import routes
    from spikingformer.layers import spike_conv as route

    n, cin, hw, cout = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, cin, hw, hw, generator=gen) < rate).bfloat16().contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    g = torch.randn(n, cout, hw, hw, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    every = {"min_channels": 1, "train": 1.0, "infer": 1.0, "weight_grad": 1.0}
    ways = {"bf16": None, "sum": every, **({"wgrad": dict(every, train=-1.0)} if train else {})}

    def call(limits):
        kept = routes._spike_conv_bf16
        routes._spike_conv_bf16 = limits
        try:
            with routes.configured("+spike_conv" if limits else "-spike_conv"), torch.autocast("cpu", dtype=torch.bfloat16):
                if not train:
                    with torch.no_grad():
                        return route.convolve(conv, x)
                y = route.convolve(conv, x.detach().requires_grad_())
            y.backward(g)
        finally:
            routes._spike_conv_bf16 = kept

    times = {k: [] for k in ways}
    for r in range(reps + 1):  # round 0: warm-up
        for k, limits in ways.items():
            conv.zero_grad(set_to_none=True)
            t = time.perf_counter()
            call(limits)
            if r:
                times[k].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(times["bf16"], times[k])) for k in list(ways)[1:]}
    return dict(best={k: 1e3 * min(v) for k, v in times.items()}, ratios=ratios)


def _bf16_table(cases: dict, rates: list[float] | None, reps: int, train: bool) -> None:
    print("| case | rate | bf16 convolution ms | sum ms | sum ratio |" + (" weight gradient summed ms | its ratio |" if train else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if train else ""))
    for model, rows in cases.items():
        for name, shape, model_rate in rows:
            for rate in rates or [model_rate]:
                r = run_bf16_case(shape, rate, reps, train)
                b, q = r["best"], r["ratios"]
                extra = f" {b['wgrad']:.2f} | {q['wgrad']:.2f}x |" if train else ""
                print(f"| {model} {name} | {rate:.3f} | {b['bf16']:.2f} | {b['sum']:.2f} | {q['sum']:.2f}x |{extra}", flush=True)


def whole_models(models: list[str], reps: int, quick: bool) -> None:
    """The benchmark models' inference batches (``quick``: its tiny ones) with the int8 pieces against
    the float32 convolution for the maps the accumulation declines, alternating; and whether both
    classify the batch alike."""
    import torch

    import bench_model
    from spikingformer.kernels import spike_conv_ops

    ways = {"int8 pieces": lambda: True, "float32": lambda: False}
    print("| model | int8 pieces ms | float32 ms | float32 / int8 | top-1 equal |")
    print("|---|---:|---:|---:|---|")
    for key in models:
        name, batch = bench_model.MODELS[key][:2]
        model, x, _ = bench_model.build(dict(name=name, batch=batch, build="ours",
                                             overrides=bench_model.QUICK[key] if quick else {}))
        bench_model.calibrate_bn(model, x)
        model.eval()
        times, top1 = {k: [] for k in ways}, {}
        kept = spike_conv_ops.native_int8
        try:
            for r in range(reps + 1):  # round 0: warm-up (packs the pieces, primes oneDNN's caches)
                for k in (list(ways) if r % 2 else list(ways)[::-1]):
                    spike_conv_ops.native_int8 = ways[k]
                    t = time.perf_counter()
                    with torch.inference_mode():
                        out = model(x)
                    if r:
                        times[k].append(time.perf_counter() - t)
                    top1[k] = out.argmax(-1)
        finally:
            spike_conv_ops.native_int8 = kept
        ratio = statistics.median(a / b for a, b in zip(times["float32"], times["int8 pieces"]))
        print(f"| {key} | {1e3 * statistics.median(times['int8 pieces']):.1f} | {1e3 * statistics.median(times['float32']):.1f} "
              f"| {ratio:.2f}x | {bool((top1['int8 pieces'] == top1['float32']).all())} |", flush=True)


def whole_training(models: list[str], reps: int, quick: bool) -> None:
    """The benchmark models' training steps (forward, loss, backward, AdamW), the route as it is (this
    ISA's limits; on a CPU with 8-bit matrix tiles the forward of the maps the accumulation declines
    by the int8 pieces) against the same without the int8 pieces, and against the weight gradient
    summed only up to the training limit with no int8 pieces (maps firing above it then take the
    float32 convolution throughout), in rotating order on one model and optimizer; each ratio is the
    median over rounds of that way's time / the route's."""
    import torch

    import bench_model
    from spikingformer.kernels import spike_conv_ops
    from spikingformer.layers import routes

    limits = dict(routes._spike_conv_max_density)
    ways = {"as is": (limits, spike_conv_ops.native_int8), "int8 pieces off": (limits, lambda: False),
            "float32 above the training limit": (dict(limits, weight_grad=limits["train"]), lambda: False)}
    print(f"Limits: {limits}\n")
    print("| model | as is ms | int8 pieces off ms | its time / as is | float32 above the training limit ms "
          "| its time / as is |")
    print("|---|---:|---:|---:|---:|---:|")
    kept = routes._spike_conv_max_density, spike_conv_ops.native_int8
    for key in models:
        name, batch = bench_model.MODELS[key][:2]
        model, x, y = bench_model.build(dict(name=name, batch=batch, build="ours",
                                             overrides=bench_model.QUICK[key] if quick else {}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = {k: [] for k in ways}
        try:
            for r in range(reps + 1):  # round 0: warm-up (the heap grows over the first steps)
                order = list(ways)[r % 3:] + list(ways)[:r % 3]
                for k in order:
                    routes._spike_conv_max_density, spike_conv_ops.native_int8 = ways[k]
                    t = time.perf_counter()
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if r:
                        times[k].append(time.perf_counter() - t)
        finally:
            routes._spike_conv_max_density, spike_conv_ops.native_int8 = kept
        base = times["as is"]
        cells = [f"{1e3 * statistics.median(base):.1f}"]
        for k in list(ways)[1:]:
            ratio = statistics.median(tb / ta for ta, tb in zip(base, times[k]))
            cells += [f"{1e3 * statistics.median(times[k]):.1f}", f"{ratio:.3f}"]
        print(f"| {key} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=15, help="alternating rounds per case")
    ap.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--rates", type=float, nargs="+", help="firing rates to run every case at (default: the models')")
    ap.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    ap.add_argument("--train", action="store_true",
                    help="forward and backward: autograd's float32 convolution against the accumulation")
    ap.add_argument("--winograd", action="store_true",
                    help="with --train: the route's dense convolutions by F(2x2, 3x3), as where the winograd route runs")
    ap.add_argument("--bf16", action="store_true",
                    help="under CPU bf16 autocast: autocast's bf16 convolution against the route's bf16 sums (with "
                         "--train: forward and backward)")
    ap.add_argument("--whole", action="store_true",
                    help="whole inference batches of the benchmark models: int8 pieces against float32 where dense; "
                         "with --train, whole training steps: the route as it is against the int8 pieces off, and "
                         "against the float32 convolution above the training limit")
    args = ap.parse_args(argv)
    if args.winograd and (not args.train or args.whole or args.bf16):
        ap.error("--winograd goes with --train alone (the inference table has a Winograd column already)")
    import torch

    from spikingformer import allocator
    from spikingformer.cpu_features import native_int8

    allocator.configure_allocator()  # as the command runs: outputs from reused blocks, not fresh pages
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else {m: (TRAIN_CASES if args.train else CASES)[m] for m in args.models}
    what = ("under bf16 autocast, the bf16 convolution against the route's sums" + (", forward and backward" if args.train else "")
            if args.bf16 else
            "whole training steps, the route as it is against the int8 pieces off and against the float32 "
            "convolution above the training limit (medians of rotating steps, wall clock)" if args.train and args.whole
            else "forward and backward, float32 against accumulation throughout or in the weight gradient"
            + (", the route's dense convolutions by F(2x2, 3x3)" if args.winograd else "") if args.train
            else "int8 pieces against float32 in whole models (median of alternating batches, wall clock)"
            if args.whole else "float32 against int8 pieces and accumulation")
    print(f"# Spike convolution: {what}\n")
    print(f"Command: `{common.command(argv if argv is not None else sys.argv[1:])}`\n")
    for line in common.machine_lines(torch.get_num_threads()):
        print(line)
    print(f"- 8-bit matrix tiles (AMX) usable by oneDNN, where the route takes the int8 pieces: {native_int8()}")
    ratio = ("that way's time / the route's" if args.whole and args.train
             else "bf16 convolution / that way" if args.bf16 else "float32 / that way")
    print(f"- {args.reps} rounds of alternating calls, wall clock; ratio: median over rounds of {ratio}"
          + ("\n" if args.whole or args.bf16 else
             f"; error: largest difference from the float64 {'weight gradient' if args.train else 'convolution'}\n"))
    if args.whole:
        (whole_training if args.train else whole_models)(args.models, args.reps, args.quick)
        return 0
    if args.bf16:
        from spikingformer.cpu_features import native_bf16

        if not native_bf16():
            print("bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16, AMX, Arm BF16): it would emulate them")
            return 0
        _bf16_table(cases, args.rates, args.reps, args.train)
        return 0
    if args.train:
        _train_table(cases, args.rates, args.reps, args.winograd)
        return 0
    print("| case | rate | float32 ms | int8 ms | int8 ratio | sum ms | sum ratio | Winograd ms | Winograd ratio "
          "| Winograd / sum | error: float32 | int8 | sum | Winograd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, rows in cases.items():
        for name, shape, model_rate in rows:
            for rate in args.rates or [model_rate]:
                r = run_case(shape, rate, args.reps)
                b, q, e = r["best"], r["ratios"], r["errors"]
                print(f"| {model} {name} | {rate:.3f} | {b['fp32']:.2f} | {b['int8']:.2f} | {q['int8']:.2f}x | "
                      f"{b['sum']:.2f} | {q['sum']:.2f}x | {b['winograd']:.2f} | {q['winograd']:.2f}x | "
                      f"{q['sum_vs_winograd']:.2f}x | {e['fp32']:.1e} | {e['int8']:.1e} | {e['sum']:.1e} | "
                      f"{e['winograd']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
