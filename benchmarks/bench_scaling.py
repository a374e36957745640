"""Scaling benchmark: time and peak memory of a training step against T, batch size and resolution.

One model -- the Spikingformer 2-256 event model (``spikingformer_cifar10dvs_2_256``, this
project's neurons, fp32, the allocator as ``spikingformer`` sets it up) -- is trained for a few
steps in a fresh process per point, varying one factor at a time around a small base point
(T = 4, batch 4, 64x64 frames, i.e. 16 tokens after the x16 tokenizer):

* time steps T = 1, 2, 4, 8, 16;
* batch size 1, 2, 4, 8, 16;
* resolution 32, 64, 96, 128 (4 .. 64 tokens).

Per point: the median wall time of ``--steps`` steps after a warm-up, and the step's peak memory
(peak RSS of the worker minus its RSS before the first step). Prints a markdown table and writes
one PNG per factor (``--plot-dir``, default ``docs/img``: ``scaling_T.png``, ``scaling_batch.png``,
``scaling_resolution.png``; time and memory on two panels with a linear reference through the
first point).

Usage::

    python benchmarks/bench_scaling.py                  # ~3-5 min on 2 cores
    python benchmarks/bench_scaling.py --quick          # two points per factor, tiny model, no plots
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import common

NAME = "spikingformer_cifar10dvs_2_256"
BASE = dict(time_steps=4, batch=4, img_size=64)
SWEEPS = {
    "T": ("time_steps", [1, 2, 4, 8, 16]),
    "batch": ("batch", [1, 2, 4, 8, 16]),
    "resolution": ("img_size", [32, 64, 96, 128]),
}
QUICK_SWEEPS = {"T": ("time_steps", [1, 2]), "batch": ("batch", [1, 2]), "resolution": ("img_size", [32, 64])}
QUICK_MODEL = dict(embed_dim=64, num_heads=4, depth=1)


def _worker(job: dict) -> dict:
    from spikingformer import allocator

    allocator.configure_allocator()
    import torch

    from bench_model import build

    torch.set_num_threads(job["threads"])
    model, x, y = build(dict(name=NAME, batch=job["point"]["batch"], overrides=job["overrides"]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rss0 = common.rss_bytes()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    return dict(time=statistics.median(times), peak=common.max_rss_bytes() - rss0)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=3, help="timed steps per point (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: all cores; 1 with --quick)")
    ap.add_argument("--plot-dir", default="docs/img", help="where scaling_*.png go ('' for no plots)")
    ap.add_argument("--quick", action="store_true", help="tiny model, two points per factor, no plots")


def _plot(factor: str, xs: list, times: list, peaks: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, ys, label in ((ax_t, times, "training step, s"), (ax_m, peaks, "step peak memory, MB")):
        ax.plot(xs, ys, "o-", label="measured")
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", color="grey", label="linear from first point")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel({"T": "time steps T", "batch": "batch size", "resolution": "input side (pixels)"}[factor])
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    base = ", ".join(f"{k}={v}" for k, v in BASE.items() if k != SWEEPS[factor][0])
    fig.suptitle(f"{NAME} (fp32, ours): training step vs {factor} ({base})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(args: argparse.Namespace, command: str) -> dict:
    if args.threads is None:
        args.threads = 1 if args.quick else os.cpu_count()
    load_start = common.load_average()
    start = time.perf_counter()
    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    results: dict[str, list] = {}
    for factor, (key, values) in sweeps.items():
        rows = []
        for value in values:
            point = dict(BASE, **{key: value})
            overrides = dict(time_steps=point["time_steps"], img_size=point["img_size"])
            if args.quick:
                overrides.update(QUICK_MODEL)
            job = dict(point=point, overrides=overrides, threads=args.threads, warmup=args.warmup, steps=args.steps)
            res = common.run_worker(__file__, job)
            rows.append((value, res))
            print(f"  [{time.perf_counter() - start:5.0f} s] {factor}={value}: {res['time'] * 1e3:.0f} ms, "
                  f"{res['peak'] / 2**20:.0f} MB", file=sys.stderr, flush=True)
        results[factor] = rows

    print("# Scaling benchmark\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- model: {NAME}{' (--quick: ' + str(QUICK_MODEL) + ')' if args.quick else ''}, fp32, this project's "
          f"neurons; base point {BASE}; {args.warmup} warm-up step(s), median of {args.steps} steps, a fresh "
          f"process per point; peak = the step's peak RSS increase")
    print(f"- run took {time.perf_counter() - start:.0f} s; load average (1 min) at start / end: "
          f"{load_start:.2f} / {common.load_average():.2f}\n")
    print("| factor | value | ms / step | x time vs first | peak MB | x memory vs first |")
    print("|---|---:|---:|---:|---:|---:|")
    for factor, rows in results.items():
        t0, m0 = rows[0][1]["time"], max(rows[0][1]["peak"], 1)
        for value, res in rows:
            print(f"| {factor} | {value} | {res['time'] * 1e3:.0f} | {res['time'] / t0:.2f} | "
                  f"{res['peak'] / 2**20:.0f} | {res['peak'] / m0:.2f} |")
    if args.plot_dir and not args.quick:
        paths = []
        for factor, rows in results.items():
            path = Path(args.plot_dir) / f"scaling_{factor}.png"
            _plot(factor, [v for v, _ in rows], [r["time"] for _, r in rows], [r["peak"] / 2**20 for _, r in rows], path)
            paths.append(str(path))
        print("\nPlots: " + ", ".join(paths))
    return results


def main(argv: list[str] | None = None) -> None:
    argv = common.script_argv(argv, _worker)
    if argv is None:
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    run_benchmark(args, common.command(argv))


if __name__ == "__main__":
    main()
