"""Multi-step LIF neuron benchmark: this project's backends against SpikingJelly, side by side.

Times, in one run and on the same tensors,

* ours: ``reference`` (plain loop + autograd), ``torch`` (fused torch ops, hand-written backward),
  ``cpu`` (fused C++ kernel, CPU tensors) and ``triton`` (CUDA tensors, when a GPU is present),
  in float32 and bfloat16;
* SpikingJelly's ``MultiStepLIFNode(tau=2., detach_reset=True, backend='torch')`` (float32),

for T = 4 and 16 and 1e5 .. 1e7 elements in total (T x N), forward only (no autograd) and
forward+backward, reporting the median milliseconds per call and the speed-up over SpikingJelly
(``x SJ`` = SpikingJelly's time / ours). It also reports the bytes each implementation keeps for
backward (summed with ``torch.autograd.graph.saved_tensors_hooks``; storage shared with the input
itself is listed separately, because it costs nothing when the caller keeps the input anyway).

Usage::

    python benchmarks/bench_lif.py                 # full run (< 5 min on 2 CPU cores)
    python benchmarks/bench_lif.py --quick         # 1e5 and 1e6 elements only
    python benchmarks/bench_lif.py --clock cpu     # one thread, CPU time: robust on a busy machine
    python benchmarks/bench_lif.py --device cuda   # GPU only (adds the Triton backend)

Outputs a markdown table on stdout (pasted into docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

import common
import sj_neurons


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(
    fn: Callable[[], object], device: torch.device, budget_s: float, max_reps: int, clock: Callable[[], float]
) -> float:
    """Median time of ``fn`` in ms on ``clock``: one warm-up call, then 3..max_reps calls within ~budget_s."""
    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def _saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, int]:
    """(bytes saved for backward that are not the input's storage, bytes that alias the input)."""
    seen: set[tuple[int, int]] = set()
    extra = aliased = 0
    x = x.detach().requires_grad_(True)
    in_ptr = x.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal extra, aliased
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            if storage.data_ptr() == in_ptr:
                aliased += storage.nbytes()
            else:
                extra += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return extra, aliased


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The neuron benchmark's options."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the benchmark runs (default: cpu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: the calling thread's CPU time with one torch thread (insensitive to "
        "other processes on a shared machine; implies --threads 1)",
    )
    ap.add_argument("--quick", action="store_true", help="1e5 and 1e6 elements only")
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of repetitions per measurement")
    ap.add_argument("--max-reps", type=int, default=25, help="most timed calls per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the whole matrix; the best round is shown")
    ap.add_argument("--max-seconds", type=float, default=240, help="skip further rounds that would end past this")


def run_benchmark(args: argparse.Namespace, command: str) -> None:
    """Run the benchmark with parsed ``args``; ``command`` is echoed in the report.

    The caller's torch thread count is restored afterwards (the tests run it in-process).
    """
    threads = torch.get_num_threads()
    try:
        _run_benchmark(args, command)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(args: argparse.Namespace, command: str) -> None:
    from spikingformer.kernels import cpu_backend as cpu_kernel
    from spikingformer.neuron import LIFParams, multistep_lif

    P = LIFParams(tau=2.0, v_threshold=1.0, v_reset=0.0, alpha=4.0, detach_reset=True)
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            raise ValueError("--clock cpu measures CPU kernels only")
        args.threads = 1
        clock = time.thread_time  # user + system CPU time of this thread (page faults included)
    else:
        clock = time.perf_counter
    torch.set_num_threads(args.threads)
    sj_version = sj_neurons.spikingjelly_version()
    sj = None if sj_version == "not installed" else sj_neurons.spikingjelly_function(
        device, tau=P.tau, v_threshold=P.v_threshold, v_reset=P.v_reset, alpha=P.alpha, detach_reset=P.detach_reset)
    totals = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]

    load_start = common.load_average()
    build_start = time.perf_counter()
    if device.type == "cpu":
        cpu_kernel.get_library()
    first_use_s = time.perf_counter() - build_start

    ours: list[tuple[str, str, torch.dtype]] = [("reference", "reference", torch.float32), ("torch", "torch", torch.float32)]
    fast = "cpu" if device.type == "cpu" else "triton"
    ours += [(fast, fast, torch.float32), ("torch", "torch", torch.bfloat16), (fast, fast, torch.bfloat16)]

    print("# LIF neuron benchmark\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(args.threads, device.type)))
    if sj is None:
        print(f"- {sj_neurons.NO_SPIKINGJELLY}")
    if device.type == "cpu":
        built = cpu_kernel.LIBRARY.build_seconds
        how = f"compiled in {built:.2f} s" if built is not None else "loaded from cache"
        print(f"- fused CPU kernel: {how} (first use {first_use_s:.2f} s); {cpu_kernel.library_path()}")
    print(
        f"- params: tau=2, V_th=1, V_reset=0, detach_reset=True, sigmoid surrogate alpha=4; "
        f"clock: {'thread CPU time' if args.clock == 'cpu' else 'wall'}; "
        f"median of 3..{args.max_reps} calls after a warm-up, best of {args.rounds} rounds; fwd = no autograd, fwd+bwd = forward, then "
        "backward of a fixed upstream gradient\n"
    )

    # Several rounds over the whole matrix, each measurement the median of its round; the table
    # shows the best round, so that a burst of load from another process spoils one round only.
    best: dict[tuple, float] = {}
    keys: list[tuple] = []
    checks = []
    bench_start = time.perf_counter()
    rounds_done = 0
    for rnd in range(args.rounds):
        elapsed = time.perf_counter() - bench_start
        if rnd and elapsed * (rnd + 1) / rnd > args.max_seconds:
            break  # another round would overrun the time cap (a loaded machine)
        rounds_done += 1
        for T in (4, 16):
            for total in totals:
                N = total // T
                gen = torch.Generator().manual_seed(T * 7 + total)
                x32 = (torch.randn(T, N, generator=gen) * 1.5 + 0.8).to(device)
                g32 = torch.randn(T, N, generator=gen).to(device)
                impls: list[tuple[str, torch.dtype, Callable[[torch.Tensor], torch.Tensor]]] = []
                if sj is not None:
                    impls.append(("spikingjelly", torch.float32, sj))
                for label, backend, dtype in ours:
                    impls.append((label, dtype, lambda x, b=backend: multistep_lif(x, P, backend=b)))
                for mode in ("fwd", "fwd+bwd"):
                    for label, dtype, fn in impls:
                        x = x32.to(dtype)
                        g = g32.to(dtype)
                        if mode == "fwd":
                            def call(fn=fn, x=x):
                                with torch.no_grad():
                                    fn(x)
                        else:
                            xg = x.detach().requires_grad_(True)

                            def call(fn=fn, xg=xg, g=g):
                                xg.grad = None
                                fn(xg).backward(g)
                        budget = args.budget if total < 10**7 else min(args.budget, 0.3)
                        ms = _time_ms(call, device, budget, args.max_reps, clock)
                        key = (T, total, mode, label, str(dtype).replace("torch.", ""))
                        if key not in best:
                            keys.append(key)
                        best[key] = min(ms, best.get(key, float("inf")))
                if rnd == 0 and sj is not None and total == 10**5:
                    with torch.no_grad():
                        ref = sj(x32)
                    for label, backend, dtype in ours:
                        if dtype == torch.float32:
                            same = torch.equal(multistep_lif(x32, P, backend=backend), ref)
                            checks.append(f"T={T}: {label} spikes == SpikingJelly's: {same}")

    print(f"Rounds run: {rounds_done} of {args.rounds} ({time.perf_counter() - bench_start:.0f} s)\n")
    compared = sj is not None
    print("| T | elements (T x N) | pass | implementation | dtype | ms / call |" + (" x SJ (fp32) |" if compared else ""))
    print("|---:|---:|---|---|---|---:|" + ("---:|" if compared else ""))
    for key in keys:
        T, total, mode, label, dtype = key
        ms = best[key]
        sj_ms = best.get((T, total, mode, "spikingjelly", "float32"))
        ratio = f"{sj_ms / ms:.1f}x" if sj_ms and label != "spikingjelly" else ""
        print(f"| {T} | {total:.0e} | {mode} | {label} | {dtype} | {ms:.3f} |" + (f" {ratio} |" if compared else ""))

    print("\nBytes kept for backward per element (T=4, 1e6 elements; 'input' = the input's own storage):\n")
    print("| implementation | dtype | saved, extra | saved, input |")
    print("|---|---|---:|---:|")
    total = 10**6
    x32 = (torch.randn(4, total // 4) * 1.5 + 0.8).to(device)
    mem_impls = ([("spikingjelly", torch.float32, sj)] if sj is not None else []) + [
        (label, dtype, lambda x, b=backend: multistep_lif(x, P, backend=b)) for label, backend, dtype in ours
    ]
    for label, dtype, fn in mem_impls:
        extra, aliased = _saved_bytes(fn, x32.to(dtype))
        print(f"| {label} | {str(dtype).replace('torch.', '')} | {extra / total:.2f} | {aliased / total:.2f} |")
    if checks:
        print("\nCross-check on the benchmark inputs: " + "; ".join(checks))
    if hasattr(os, "getloadavg"):
        print(f"\nLoad average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
              "(other processes on the machine inflate the times, most of all the 2-thread kernels')")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU kernels only")
    run_benchmark(args, common.command(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
