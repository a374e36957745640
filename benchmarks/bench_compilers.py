"""Compilers: this project's model step with the kernel library built by each C++ compiler, side by side.

The library builds with ``$CXX`` (else g++); a user's compiler may be another. Each contender is a
compiler (a name on PATH or a path), optionally with environment variables for its processes
(``clang++:KMP_BLOCKTIME=0``). Each compiler's library has a cache entry of its own (the first
worker builds it during its untimed warm-up steps), then ``bench_model.py``'s worker times the step
in a fresh process per contender and round, contenders interleaved; the report gives each one's
median and its time over the first contender's.

Usage::

    python benchmarks/bench_compilers.py --compilers g++ clang++ clang++:KMP_BLOCKTIME=0
    python benchmarks/bench_compilers.py --models cifar event --modes train infer --rounds 3
    python benchmarks/bench_compilers.py --quick          # tiny models, one thread: a smoke test

Not a test: the times depend on the machine and its load (docs/reliability.md records a run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_model
import common


def contender(spec: str) -> dict:
    """``COMPILER[:VAR=VALUE,...]`` as a contender: its label, compiler path and extra environment."""
    cxx, _, extra = spec.partition(":")
    path = shutil.which(cxx)
    if path is None:
        raise ValueError(f"compiler {cxx!r} not found (give a name on PATH or a path)")
    env = {}
    for item in filter(None, extra.split(",")):
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: expected VAR=VALUE after the compiler, got {item!r}")
        env[name] = value
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return dict(label=spec, cxx=path, env=env, version=(version or ["?"])[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compilers", nargs="+", default=["g++", "clang++"],
                    help="contenders, COMPILER[:VAR=VALUE,...]; the first is the reference of the ratios")
    ap.add_argument("--models", nargs="+", default=["event"], choices=list(bench_model.MODELS))
    ap.add_argument("--modes", nargs="+", default=["train"], choices=["train", "infer"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=bench_model.WARMUP_STEPS, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="processes per contender and configuration, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny models (bench_model.py's), one step: times mean nothing")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    try:
        contenders = [contender(spec) for spec in args.compilers]
    except ValueError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    if args.threads is None:
        args.threads = 1 if args.quick else os.cpu_count()
    load_start, start = common.load_average(), time.perf_counter()
    script = bench_model.__file__
    with tempfile.TemporaryDirectory(prefix="bench_compilers_") as scratch:
        times: dict = {}  # (model, mode, dtype, label) -> step times of every round
        for key in args.models:
            name, _, t, _ = bench_model.MODELS[key]
            shared = dict(model=key, name=name, batch=bench_model.batch_of(key, "bench", args.quick), time_steps=t,
                          overrides=bench_model.QUICK[key] if args.quick else {}, threads=args.threads,
                          bn_stats=os.path.join(scratch, f"{key}.pt"))
            common.run_worker(script, dict(shared, kind="calibrate", path=shared["bn_stats"]))
            for rnd in range(args.rounds):
                for mode in args.modes:
                    for dtype in args.dtypes:
                        for c in contenders:
                            job = dict(shared, kind="model", warmup=args.warmup, steps=args.steps, device="cpu",
                                       mode=mode, dtype=dtype, build="ours", our_allocator=True, limit_reps=0)
                            res = common.run_worker(script, job, env=dict(c["env"], CXX=c["cxx"]), timeout=1800)
                            times.setdefault((key, mode, dtype, c["label"]), []).extend(res["times"])
                            print(f"  [{time.perf_counter() - start:5.0f} s] round {rnd + 1} {key} {mode} {dtype} "
                                  f"{c['label']}: {statistics.median(res['times']) * 1e3:.0f} ms",
                                  file=sys.stderr, flush=True)
    print(f"Command: `python benchmarks/bench_compilers.py {' '.join(argv)}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- load average (1 min) {load_start:.2f} at the start, {common.load_average():.2f} at the end; "
          f"{time.perf_counter() - start:.0f} s")
    for c in contenders:
        print(f"- `{c['label']}`: {c['cxx']}, {c['version']}")
    ref = contenders[0]["label"]
    print(f"\n| model | pass | dtype | " + " | ".join(f"`{c['label']}`" for c in contenders) + " |")
    print("|---|---|---|" + "---:|" * len(contenders))
    for key in args.models:
        for mode in args.modes:
            for dtype in args.dtypes:
                base = statistics.median(times[(key, mode, dtype, ref)])
                cells = []
                for c in contenders:
                    med = statistics.median(times[(key, mode, dtype, c["label"])])
                    cells.append(f"{med * 1e3:.0f} ms" + ("" if c["label"] == ref else f" ({med / base:.2f}x)"))
                print(f"| {key} | {mode} | {dtype} | " + " | ".join(cells) + " |")
    print(f"\nMedian of every timed step over {args.rounds} round(s) of {args.steps}; in brackets each "
          f"contender's time over `{ref}`'s.")


if __name__ == "__main__":
    main()
