"""Each route of :mod:`spikingformer.layers.routes` on against off, side by side, on this CPU.

The routes are timed on the layers they change, with the zoo models' real shapes and the batch
sizes of ``benchmarks/bench_model.py``:

* ``cifar``: Spikingformer-4-384 (32x32 images, T = 4, batch 16: 4096 token rows, 64 tokens);
* ``event``: the 2-256 event model (128x128 event frames, T = 16, batch 8: 8192 token rows).

Cases: the token linears of each model and the whole models (``token_linear``), and smaller layers
on the CIFAR rows to place :data:`~spikingformer.layers.routes.ONEDNN_MIN_WEIGHTS`; the same
linears on spikes at firing rates of 5-50% (``spike_linear``, to place
:data:`~spikingformer.layers.routes.SPIKE_LINEAR_MAX_DENSITY`), and the whole models of
``benchmarks/bench_model.py`` with that limit in force; spike attention with each model's
heads (``attention_order``; ``fused_attention`` on heads that are views of token rows, and the
whole models); the MLP's first ConvBN -> SN and the whole models in training
(``fused_bn_spike``); the whole models and the whole Spiking Tokenizer (``spike_conv``,
``winograd``); the whole Spiking Tokenizer (``channels_last``, ``stem_once``,
``inplace_bn``, ``batch_pieces``, and ``recompute`` on every map, to place
:data:`~spikingformer.layers.routes.RECOMPUTE_MIN_ELEMENTS`). ``train`` = forward and backward
(gradients of the input and the weights), ``infer`` = forward under ``torch.inference_mode``.

Every case runs on and off alternately (the order swapped every repetition, so a change in the
machine's load falls on both), after one warm-up each; the table gives the median of each and the
ratio on / off (below 1: the route is faster). A last table sums up the whole-model cases per route
(geometric mean of on / off) and prints the ``SPIKINGFORMER_ROUTES`` value that would turn on the
routes faster there and off the slower ones, each by more than 3%: on a CPU whose ISA has no
measured rule (an Arm CPU, say), that value sets the routes by this machine's measurement. The
default clock is the calling thread's CPU time with one torch thread, which other processes on a
shared machine barely disturb.

Usage::

    python benchmarks/study_routes.py                                # this CPU as it is
    python benchmarks/study_routes.py --models cifar --reps 3 --quick  # a smoke test
    python benchmarks/study_routes.py --routes spike_linear --bf16   # under bf16 autocast (native bf16 only)
    python benchmarks/study_routes.py --routes spike_linear --bf16 --rates 0.125 0.15 0.175 0.2  # finer rates

As an AVX2 CPU (every library capped: MKL, oneDNN, ATen and the neuron kernel)::

    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 SPIKINGFORMER_NATIVE_ARCH=x86-64-v3 python benchmarks/study_routes.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import common

MODELS = {
    # key: (zoo name, batch, time steps or None for static images)
    "cifar": ("spikingformer_cifar10_4_384", 16, None),
    "event": ("spikingformer_cifar10dvs_2_256", 8, 16),
}
CAP_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "SPIKINGFORMER_NATIVE_ARCH")
THRESHOLD_PROBES = [(64, 64), (128, 128), (64, 256), (192, 192), (256, 256)]  # (in, out) on the CIFAR rows
SPIKE_RATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # input firing rates of the spike_linear cases


def _train(fn: Callable, params: list, inputs: list) -> Callable[[], None]:
    """One forward and backward of ``fn(*inputs)`` against a fixed upstream gradient."""
    import torch

    grad = []

    def run() -> None:
        for t in params + inputs:
            t.grad = None
        out = fn(*inputs)
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    return run


def _lifted(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with spike_linear's firing-rate (float32 and bf16) and size limits lifted: its kernels
    run at every rate and size (the study's linear cases place the limits)."""
    from spikingformer.layers import routes

    def go() -> None:
        saved = routes._spike_max_density, routes._spike_max_density_bf16, routes._spike_min_work
        routes._spike_max_density = routes._spike_max_density_bf16 = 1.0
        routes._spike_min_work = {"train": 0, "infer": 0}
        try:
            run()
        finally:
            routes._spike_max_density, routes._spike_max_density_bf16, routes._spike_min_work = saved

    return go


def _infer(fn: Callable, inputs: list) -> Callable[[], None]:
    import torch

    def run() -> None:
        with torch.inference_mode():
            fn(*inputs)

    return run


def cases(models: list[str], quick: bool, rates: tuple[float, ...] = SPIKE_RATES,
          ) -> list[tuple[str, str, str, str, Callable[[], None]]]:
    """``(route, model, case, pass, run)`` for every measurement; ``rates``: the spike_linear cases' firing rates."""
    import torch

    from spikingformer.layers import TokenConvBN, TokenLinear, spike_attention
    from spikingformer.models.zoo import create_model
    from spikingformer.neuron import MultiStepLIF

    out = []
    for key in models:
        name, batch, steps = MODELS[key]
        over = dict(embed_dim=64, num_heads=4, depth=1) if quick else {}
        model = create_model(name, **over)
        c = model.config
        t = steps or c.time_steps
        batch = 2 if quick else batch
        side = 32 if quick and steps else c.img_size
        n, d = (side // c.downsample) ** 2, c.embed_dim
        rows = t * batch * n
        torch.manual_seed(0)

        shapes = [(d, d), (d, int(d * c.mlp_ratio)), (int(d * c.mlp_ratio), d)]
        if key == "cifar" and not quick:
            shapes = THRESHOLD_PROBES + shapes
        for fan_in, fan_out in shapes:
            layer = TokenLinear(fan_in, fan_out)
            x = (torch.rand(t, batch, n, fan_in) < 0.2).float()
            label = f"linear {fan_in}x{fan_out}, {rows} rows"
            out.append(("token_linear", key, label, "train",
                        _train(layer, list(layer.parameters()), [x.requires_grad_()])))
            out.append(("token_linear", key, label, "infer", _infer(layer, [x.detach()])))
        for fan_in, fan_out in shapes[-3:]:
            layer = TokenLinear(fan_in, fan_out)
            for rate in rates[::3] if quick else rates:
                x = (torch.rand(t, batch, n, fan_in) < rate).float()
                label = f"linear {fan_in}x{fan_out}, {rows} rows, firing rate {rate:.2f}"
                out.append(("spike_linear", key, label, "train",
                            _lifted(_train(layer, list(layer.parameters()), [x.requires_grad_()]))))
                out.append(("spike_linear", key, label, "infer", _lifted(_infer(layer, [x.detach()]))))
        # and the whole model of bench_model.py (its weights, batch and inputs; the limit in force)
        import bench_model

        whole, images, _ = bench_model.build(dict(name=name, batch=batch, build="ours",
                                                  overrides=over if quick else {}))
        label = f"whole model, batch {batch}"
        out.append(("spike_linear", key, label, "train",
                    lambda whole=whole, images=images: (whole.train(), _train(whole, list(whole.parameters()), [images])())))
        out.append(("spike_linear", key, label, "infer",
                    lambda whole=whole, images=images: (whole.eval(), _infer(whole, [images])())))
        out.append(("fused_bn_spike", key, label, "train",
                    lambda whole=whole, images=images: (whole.train(), _train(whole, list(whole.parameters()), [images])())))
        out.append(("fused_bn_spike", key, label, "infer",
                    lambda whole=whole, images=images: (whole.eval(), _infer(whole, [images])())))
        for route in ("spike_conv", "token_linear", "winograd"):
            out.append((route, key, label, "train",
                        lambda whole=whole, images=images: (whole.train(),
                                                            _train(whole, list(whole.parameters()), [images])())))
            out.append((route, key, label, "infer",
                        lambda whole=whole, images=images: (whole.eval(), _infer(whole, [images])())))
        # and its largest ConvBN -> SN alone: the MLP's first layer and hidden neuron
        layer, lif = TokenConvBN(d, int(d * c.mlp_ratio), bias=True), MultiStepLIF()
        x = (torch.rand(t, batch, n, d) < 0.2).float()
        label = f"ConvBN {d}x{int(d * c.mlp_ratio)} -> SN, {rows} rows"
        segment = _train(lambda x, layer=layer, lif=lif: layer.spikes(lif, x), list(layer.parameters()),
                         [x.requires_grad_()])
        out.append(("fused_bn_spike", key, label, "train", lambda layer=layer, run=segment: (layer.train(), run())))
        segment = _infer(lambda x, layer=layer, lif=lif: layer.spikes(lif, x), [x.detach()])
        out.append(("fused_bn_spike", key, label, "infer", lambda layer=layer, run=segment: (layer.eval(), run())))

        h = c.num_heads
        qkv = [(torch.rand(t, batch, h, n, d // h) < 0.2).float() for _ in range(3)]
        label = f"Q K^T V, {h} heads, N={n}, d={d // h}"
        out.append(("attention_order", key, label, "train",
                    _train(lambda q, k, v: spike_attention(q, k, v, 0.125), [], [x.requires_grad_() for x in qkv])))
        out.append(("attention_order", key, label, "infer",
                    _infer(lambda q, k, v: spike_attention(q, k, v, 0.125), [x.detach() for x in qkv])))
        # the heads as the block makes them (views of token rows) and its hand-over back to rows
        heads = [(torch.rand(t, batch, n, d) < 0.2).float().view(t, batch, n, h, d // h).transpose(2, 3)
                 for _ in range(3)]
        label = f"Q (K^T V) from and to token rows, {h} heads, N={n}, d={d // h}"
        def attend(q, k, v):
            return spike_attention(q, k, v, 0.125).transpose(2, 3).flatten(3)

        out.append(("fused_attention", key, label, "train", _train(attend, [], [x.requires_grad_() for x in heads])))
        out.append(("fused_attention", key, label, "infer", _infer(attend, [x.detach() for x in heads])))
        label = f"whole model, batch {batch}"
        out.append(("fused_attention", key, label, "train",
                    lambda whole=whole, images=images: (whole.train(), _train(whole, list(whole.parameters()), [images])())))
        out.append(("fused_attention", key, label, "infer",
                    lambda whole=whole, images=images: (whole.eval(), _infer(whole, [images])())))

        tok = model.tokenizer
        if steps:
            x = torch.poisson(torch.full((t, batch, c.in_channels, side, side), 0.6))
            fn, label = tok, f"tokenizer, {t}x{batch} frames {side}x{side}"
        else:
            x = torch.randn(batch, c.in_channels, side, side)
            fn, label = (lambda images, tok=tok, t=t: tok.encode_static(images, t)), f"tokenizer, {batch} images x T={t}"
        params = list(tok.parameters())

        def train_mode(run, tok=tok):
            return lambda: (tok.train(), run())

        def eval_mode(run, tok=tok):
            return lambda: (tok.eval(), run())

        routes_here = (["channels_last", "recompute", "inplace_bn", "fused_spike_pool", "batch_pieces", "spike_conv",
                        "winograd"]
                       + ([] if steps else ["stem_once"]))
        for route in routes_here:
            if route not in ("inplace_bn", "batch_pieces"):  # inference-only routes
                out.append((route, key, label, "train", train_mode(_train(fn, params, [x]))))
            if route != "recompute":
                out.append((route, key, label, "infer", eval_mode(_infer(fn, [x]))))
    return out


def measure(run: Callable[[], None], route: str, reps: int, clock: Callable[[], float],
            bf16: bool = False) -> tuple[float, float]:
    """Median seconds of ``run`` with ``route`` on and off, alternating (under CPU bf16 autocast with ``bf16``)."""
    import torch

    from spikingformer.layers import routes

    times = {"+": [], "-": []}
    for rep in range(reps + 1):
        for sign in ("+-" if rep % 2 == 0 else "-+"):
            with routes.configured(sign + route), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                start = clock()
                run()
                if rep:  # the first round warms up
                    times[sign].append(clock() - start)
    return statistics.median(times["+"]), statistics.median(times["-"])


WHOLE_MODEL = "whole model"  # the cases whose ratios make a route's verdict
MARGIN = 0.03  # how far a route's geometric mean of on / off must lie from 1 to suggest a change


def suggestion(rows: list[tuple[str, str, float]], on_now: frozenset[str], kept: frozenset[str]
               ) -> list[tuple[str, float, str]]:
    """Per route with whole-model rows among ``rows`` (route, case label, on / off): ``(route,
    geometric mean of on / off, change)``, the change ``"+route"`` where the route is off
    (``on_now``) and was faster by more than :data:`MARGIN`, ``"-route"`` where it is on and was
    slower by more, else ``""``; routes in ``kept`` (on for memory or work, whatever their time)
    get no change."""
    ratios: dict[str, list[float]] = {}
    for route, label, ratio in rows:
        if label.startswith(WHOLE_MODEL):
            ratios.setdefault(route, []).append(ratio)
    out = []
    for route, rs in ratios.items():
        mean = statistics.geometric_mean(rs)
        faster, slower = mean < 1 - MARGIN, mean > 1 + MARGIN
        change = "" if route in kept else "+" + route if faster and route not in on_now else (
            "-" + route if slower and route in on_now else "")
        out.append((route, mean, change))
    return out


def print_suggestion(rows: list[tuple[str, str, float]], bf16: bool = False, quick: bool = False) -> None:
    """The whole-model verdicts (:func:`suggestion`) and the ``SPIKINGFORMER_ROUTES`` value they add up to
    (``bf16``: timed under bf16 autocast, which the variable cannot tell from float32; ``quick``: tiny
    models, from which no value is drawn)."""
    from spikingformer.layers import routes

    verdicts = suggestion(rows, routes.active(), routes.ALWAYS_ON)
    if not verdicts:
        return
    print(f"\nWhole models, each route's geometric mean of on / off over the passes and models timed (a "
          f"change where a route off ran more than {MARGIN:.0%} faster on, or a route on more than {MARGIN:.0%} slower):\n")
    print("| route | on now | on / off | change |")
    print("|---|---|---:|---|")
    for route, mean, change in verdicts:
        kept = " (kept on: memory or work)" if route in routes.ALWAYS_ON else ""
        print(f"| {route} | {'yes' if routes.enabled(route) else 'no'}{kept} | {mean:.3f} | {change or 'none'} |")
    if quick:
        print("\n--quick: tiny models; no value is drawn from them.")
        return
    changes = [c for _, _, c in verdicts if c]
    print("\n" + (f"Suggested on this CPU: `{routes.ENV}={','.join(changes)}` (set it in the environment of "
                   "training and inference)" if changes else "The defaults hold on this CPU for the routes timed.")
          + (" Timed under bf16 autocast: the variable sets the routes for float32 too." if bf16 else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per route state (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the calling thread's CPU time (needs --threads 1); wall: elapsed time")
    parser.add_argument("--routes", nargs="+", help="only these routes")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the script")
    parser.add_argument("--rates", nargs="+", type=float, default=list(SPIKE_RATES),
                        help="input firing rates of the spike_linear cases (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true",
                        help="every case under CPU bf16 autocast (only where this CPU has bf16 natively)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1, or --clock wall")

    import torch

    from spikingformer.allocator import configure_allocator
    from spikingformer.cpu_features import native_bf16
    from spikingformer.layers import routes

    if args.bf16 and not native_bf16():
        parser.error("--bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is emulated and no "
                     "route is chosen for it")
    configure_allocator()  # as the spikingformer command runs
    torch.set_num_threads(args.threads)
    routes.RECOMPUTE_MIN_ELEMENTS = 0  # the study times every map; the threshold comes from it
    routes.ONEDNN_MIN_WEIGHTS = 0  # likewise for the small layers
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load = common.load_average()
    began = time.perf_counter()

    caps = "".join(f"{k}={os.environ[k]} " for k in CAP_VARIABLES if k in os.environ)
    print(f"Command: `{caps}{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"- CPU: {common.cpu_description()}; torch threads: {args.threads}; clock: {args.clock}")
    print(f"- torch {torch.__version__}; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"oneDNN ISA cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}; routes' ISA key: {routes.cpu_isa()}")
    print(f"- median of {args.reps} alternating repetitions after one warm-up each"
          + ("; every case under CPU bf16 autocast" if args.bf16 else "") + "\n")
    print("| route | model | case | pass | on ms | off ms | on / off |")
    print("|---|---|---|---|---:|---:|---:|")
    timed = []
    for route, model, label, kind, run in cases(args.models, args.quick, tuple(args.rates)):
        if args.routes and route not in args.routes:
            continue
        on, off = measure(run, route, args.reps, clock, args.bf16)
        timed.append((route, label, on / off))
        print(f"| {route} | {model} | {label} | {kind} | {on * 1e3:.2f} | {off * 1e3:.2f} | {on / off:.2f} |", flush=True)
    print_suggestion(timed, args.bf16, args.quick)
    print(f"\nRun took {time.perf_counter() - began:.0f} s; load average (1 min) at start / end: "
          f"{load:.2f} / {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
