"""Whole-model steps with one of the routes' limits at two values, side by side, on this CPU.

``study_routes.py`` places a limit (a firing rate, a size) on single layers; this script checks
what moving it does to the whole training step and inference batch of ``bench_model.py`` (its
models, batches, inputs and BatchNorm statistics). The routes read their limits at each call, so
one process times both values, step by step in ABBA order (A B, then B A, ...), after ``--warmup``
untimed steps of each: the machine's spells and the process's own state (its heap, its caches)
fall on both alike, where pairs of fresh processes scattered by several percent. ``--processes``
fresh processes per case. The report gives each process's median ratio (first value / second,
over its pairs of neighbouring steps), the median over all pairs, and the token linears whose
input firing rate lies within their spike_linear limit under one value only (one untimed step per
value, counted by a forward pre-hook): the layers the change moves, so that a ratio of 1 where
none moves is read as such.

Usage::

    python benchmarks/study_limits.py --limit spike_linear_bf16_wide --values 0.20 none --dtypes bf16
    python benchmarks/study_limits.py --limit spike_linear --values 0.30 0.20 --models cifar --modes infer

``none`` is the limit's absence (for ``spike_linear_bf16_wide``: the flat bf16 limit for every shape).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bench_model
import common

# --limit name -> the attribute of spikingformer.layers.routes that holds it on this CPU
LIMITS = {
    "spike_linear": "_spike_max_density",
    "spike_linear_bf16": "_spike_max_density_bf16",
    "spike_linear_bf16_wide": "_spike_max_density_bf16_wide",
}


def _value(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _layer_limit(layer, dtype: str) -> float | None:
    """The spike_linear limit a token linear runs under in ``dtype`` with the routes' present values."""
    from spikingformer.layers import routes

    return routes.spike_limit_bf16(layer.in_features, layer.out_features) if dtype == "bf16" else routes._spike_max_density


def _worker(job: dict) -> dict:
    """One process: the model built; one untimed step per value with the token linears' input rates
    counted; the warm-up; then the timed steps of both values in ABBA order."""
    from spikingformer import allocator

    allocator.configure_allocator()
    import torch

    from spikingformer.layers import TokenLinear, routes

    torch.set_num_threads(job["threads"])
    model, x, y = bench_model.build(job)
    step = bench_model.step_function(model, x, y, job["mode"], job["dtype"], authors=False)
    rates: dict[str, tuple[float, float | None]] = {}

    def count(name: str, layer: TokenLinear, args: tuple) -> None:
        rates.setdefault(name, (float(args[0].detach().float().mean()), _layer_limit(layer, job["dtype"])))

    def timed(value: float | None) -> float:
        setattr(routes, LIMITS[job["limit"]], value)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    seen = []
    for value in job["values"]:
        rates.clear()
        hooks = [m.register_forward_pre_hook(lambda m, args, name=name: count(name, m, args))
                 for name, m in model.named_modules() if isinstance(m, TokenLinear)]
        timed(value)
        for h in hooks:
            h.remove()
        seen.append(dict(rates))
    for _ in range(job["warmup"]):
        for value in job["values"]:
            timed(value)
    times: list[list[float]] = [[], []]
    for i in range(job["steps"]):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[k].append(timed(job["values"][k]))
    return dict(times=times, rates=seen)


def _moved(rates: list[dict]) -> dict[str, list]:
    """The token linears that fire within their limit under one value only (so that the value moves
    them between the accumulation and the dense product), with each value's (rate, limit)."""
    def within(rate: float, limit: float | None) -> bool:
        return limit is not None and rate <= limit

    return {n: [r[n] for r in rates] for n in rates[0] if len({within(*r[n]) for r in rates}) > 1}


def main(argv: list[str] | None = None) -> int:
    argv = common.script_argv(argv, _worker)
    if argv is None:
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", choices=list(LIMITS), required=True)
    ap.add_argument("--values", nargs=2, type=_value, required=True, metavar="VALUE",
                    help="the two values to compare (a number, or none)")
    ap.add_argument("--models", nargs="+", choices=list(bench_model.MODELS), default=["event"])
    ap.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["infer", "train"])
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["bf16"])
    ap.add_argument("--processes", type=int, default=2, help="fresh processes per case")
    ap.add_argument("--warmup", type=int, default=bench_model.WARMUP_STEPS, help="untimed steps of each value")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each value per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the script")
    args = ap.parse_args(argv)
    if None in args.values and args.limit == "spike_linear":
        ap.error("--values none: the float32 spike_linear limit is always a number (0: never sum spikes)")
    args.device = "cpu"
    try:
        bench_model.check_dtypes(args)  # drops bf16 (one line) where this CPU emulates it
    except ValueError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    first, second = (("none" if v is None else f"{v:g}") for v in args.values)
    load, began = common.load_average(), time.perf_counter()
    print(f"Command: `{common.command(argv)}`\n")
    print(f"- CPU: {common.cpu_description()}; torch threads: {args.threads}; clock: wall")
    print(f"- {args.processes} fresh process(es) per case, each timing {args.steps} steps of each value in ABBA "
          f"order after {args.warmup + 1} untimed of each")
    print("- ratio: a step's time with the first value over its neighbouring step's with the second; medians\n")
    print(f"| model | pass | dtype | {args.limit} = {first} | = {second} | median ratio per process | median ratio |")
    print("|---|---|---|---:|---:|---|---:|")
    moved_all = {}
    for key in args.models:
        name = bench_model.MODELS[key][0]
        overrides = bench_model.QUICK[key] if args.quick else {}
        batch = overrides.get("batch", bench_model.MODELS[key][1])
        for mode in args.modes:
            for dtype in args.dtypes:
                job = dict(name=name, batch=batch, overrides=overrides, build="ours", mode=mode, dtype=dtype,
                           threads=args.threads, warmup=args.warmup, steps=args.steps, limit=args.limit,
                           values=list(args.values))
                runs = [common.run_worker(__file__, job) for _ in range(args.processes)]
                per_process = [[a / b for a, b in zip(*r["times"])] for r in runs]
                a, b = (statistics.median(t for r in runs for t in r["times"][k]) for k in (0, 1))
                overall = statistics.median(q for p in per_process for q in p)
                print(f"| {key} | {mode} | {dtype} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | "
                      f"{', '.join(f'{statistics.median(p):.3f}' for p in per_process)} | {overall:.3f} |", flush=True)
                moved_all[(key, mode, dtype)] = _moved(runs[0]["rates"])
    print(f"\nToken linears within their spike_linear limit under one value only (input firing rate, limit "
          f"with {first} / {second}; the size limit aside):")
    for (key, mode, dtype), moved in moved_all.items():
        cells = "; ".join(f"{n} {ra:.3f}, {la} / {lb}" for n, ((ra, la), (_, lb)) in moved.items())
        print(f"- {key} {mode} {dtype}: {cells or 'none'}")
    print(f"\nRun took {time.perf_counter() - began:.0f} s; load average (1 min) at start / end: "
          f"{load:.2f} / {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
