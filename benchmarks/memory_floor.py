"""Is 90% of the dense model's limit within reach? The step's dense limit beside its memory floor.

The valid limit (``dense_limit.py``) is the time a step's convolutions and products need at this
machine's rates. Beside them every spiking neuron layer works on a map that a convolution or a
product wrote to memory (they are library calls: their output reaches memory before anything else
reads it; the large maps are far larger than any cache, and the small ones are priced at cache
speed, below). So, whatever the neuron kernels do, each layer whose input holds ``N`` elements of
``s`` bytes must at least

* in inference: read its input once (``N s`` bytes);
* in training: read it once in the forward, and in the backward write its input's gradient
  (``N s`` bytes, dense), which the convolution's or product's backward reads;

and in training the optimizer (AdamW) must read and write every parameter and its two moments
(float32). The **memory floor** is that traffic at this machine's best rates for a read pass (the
fastest of ``sum``, ``amax`` and ``dot``), a write pass (``fill_``, ``zero_``) and a copy
(``copy_``) over the same number of bytes, on the step's threads, each measured right after the
same bytes were touched (as warm as a cache can hold them). It leaves out everything else the
step does (BatchNorm's statistics, the backward's reading of each neuron's input or state for the
surrogate gradient, the layers without a neuron, residual adds, the optimizer's reading of the
gradients, the spike linears' own work), so it is less than what any implementation with library
convolutions needs, and a step takes at least its own dense limit plus this floor.

The report prints, per model, pass and dtype, with our step and the limits measured in the same
process (``bench_model.py``'s worker: the same model, batch, warm-up and pairing): the floor, the
time that 90% of the dense model's limit allows the step (``limit / 0.9``), and whether the step's
own dense limit plus the floor fits in it. Where it does not, no implementation that runs the
convolutions and products as library calls reaches 90% of that limit on this machine: only one
that fuses the neurons into the convolutions, or does less dense arithmetic, could.

Usage::

    python benchmarks/memory_floor.py --models event cifar --modes train infer --dtypes fp32 bf16
    python benchmarks/memory_floor.py --quick          # tiny models: a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common

TARGET = 0.9  # issue 12's share of the dense model's limit


def neuron_maps(model, x, dtype: str) -> list[tuple[int, int]]:
    """``(elements, bytes per element)`` of every spiking neuron's input in one inference forward of
    ``model`` on ``x`` (bf16 under autocast), through the plain module calls (every route off: each
    neuron is then called as a module, and the routes change how its input is computed, not its size)."""
    import torch

    from spikingformer.layers import routes
    from spikingformer.neuron import MultiStepLIF

    maps: list[tuple[int, int]] = []

    def record(module, inputs, output):
        maps.append((inputs[0].numel(), inputs[0].element_size()))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, MultiStepLIF)]
    training = model.training
    try:
        model.eval()
        with routes.configured("none"), torch.inference_mode(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(x)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return maps


PASSES = ("read", "write", "copy")


def traffic(maps: list[tuple[int, int]], parameters: int, mode: str) -> dict[str, list[int]]:
    """The floor's passes, as byte counts: ``read`` (each neuron map once), and in training ``write``
    (each map's gradient) and ``copy`` (AdamW's float32 parameters and two moments, ``parameters``
    elements each, read and written)."""
    sizes = [n * s for n, s in maps]
    if mode == "infer":
        return dict(read=sizes, write=[], copy=[])
    return dict(read=sizes, write=sizes, copy=[3 * 4 * parameters])


def pass_times(byte_counts: set[int], reps: int = 5) -> dict[str, dict[int, float]]:
    """This machine's best time (seconds) of a read pass, a write pass and a copy over each byte count
    (each the fastest of the ops named in the module's docstring), in rounds that take every size in
    turn (float32 tensors of that many bytes, touched just before; the caller's torch threads)."""
    import torch

    best: dict[str, dict[int, float]] = {kind: {} for kind in PASSES}
    for _ in range(reps):
        for nbytes in sorted(byte_counts):
            src = torch.ones(max(1, nbytes // 4))
            dst = torch.empty_like(src)
            src.sum(), dst.copy_(src)  # first touch, out of the timing
            runs = (("read", src.sum), ("read", src.amax), ("read", lambda: torch.dot(src, src)),
                    ("write", lambda: dst.fill_(1.0)), ("write", dst.zero_), ("copy", lambda: dst.copy_(src)))
            for kind, run in runs:
                t0 = time.perf_counter()
                run()
                dt = time.perf_counter() - t0
                best[kind][nbytes] = min(best[kind].get(nbytes, dt), dt)
            del src, dst
    return best


def floor_seconds(passes: dict[str, list[int]], times: dict[str, dict[int, float]]) -> float:
    """The floor: every pass of :func:`traffic` at its size's best time (:func:`pass_times`)."""
    return sum(times[kind][nbytes] for kind in PASSES for nbytes in passes[kind])


def verdict(own_limit: float, dense_model_limit: float, floor: float) -> dict:
    """Whether the step can reach :data:`TARGET` of the dense model's limit: it takes at least its own
    dense limit plus the floor, and may take at most ``dense_model_limit / TARGET``."""
    allowed = dense_model_limit / TARGET
    least = own_limit + floor
    return dict(allowed=allowed, least=least, reachable=least <= allowed,
                best_efficiency=dense_model_limit / least)


def _worker(job: dict) -> dict:
    import bench_model

    result = bench_model._worker(dict(job, kind="model", build="ours", our_allocator=True, device="cpu"))
    model, x, _ = bench_model.build(dict(job, build="ours"))
    maps = neuron_maps(model, x, job["dtype"])
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, x
    passes = traffic(maps, parameters, job["mode"])
    times = pass_times({n for kind in PASSES for n in passes[kind]})  # on the worker's torch threads
    return dict(result, maps=maps, parameters=parameters, floor=floor_seconds(passes, times),
                **{f"{kind}_bytes": sum(passes[kind]) for kind in PASSES})


def _row(key: str, name: str, batch: int, mode: str, dtype: str, res: dict) -> str:
    step = statistics.median(res["times"])
    own, dense = res["limit"]["seconds"], res["dense_model_limit"]["seconds"]
    v = verdict(own, dense, res["floor"])
    cells = [f"{name}, B={batch}", mode, dtype, f"{step * 1e3:.0f}", f"{dense * 1e3:.0f}", f"{own * 1e3:.0f}",
             f"{len(res['maps'])}: " + " / ".join(f"{res[k + '_bytes'] / 1e9:.2f}" for k in PASSES),
             f"{res['floor'] * 1e3:.0f}", f"{v['least'] * 1e3:.0f}", f"{v['allowed'] * 1e3:.0f}",
             "yes" if v["reachable"] else "**no**", f"{v['best_efficiency']:.1%}", f"{dense / step:.1%}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    argv = common.script_argv(argv, _worker)
    if argv is None:
        return
    import bench_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(bench_model.MODELS), choices=list(bench_model.MODELS))
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--warmup", type=int, default=bench_model.WARMUP_STEPS)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--limit-reps", type=int, default=5, help="rounds of the dense limit's replay")
    ap.add_argument("--quick", action="store_true", help="tiny models, one thread: a smoke test")
    args = ap.parse_args(argv)
    args.device = "cpu"
    try:
        bench_model.check_dtypes(args)
    except ValueError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    threads = args.threads or (1 if args.quick else os.cpu_count())
    load_start = common.load_average()
    print("# The dense limit beside the neuron maps' memory floor\n")
    print(f"Command: `{common.command(argv)}`\n")
    print("\n".join(common.machine_lines(threads)) + "\n")
    print("| model | pass | dtype | our step ms | dense model's limit ms | own dense limit ms | neuron maps: "
          "read / written / copied GB | memory floor ms | own limit + floor ms | allowed for 90% ms | 90% reachable | "
          "at best | now |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for key in args.models:
        name, batch, t, _ = bench_model.MODELS[key]
        overrides = bench_model.QUICK[key] if args.quick else {}
        for mode in args.modes:
            for dtype in args.dtypes:
                job = dict(kind="floor", model=key, name=name, batch=batch, time_steps=t, overrides=overrides,
                           threads=threads, warmup=args.warmup, steps=args.steps, mode=mode, dtype=dtype,
                           limit_reps=args.limit_reps)
                res = common.run_worker(__file__, job, timeout=3600)
                print(_row(key, name, overrides.get("batch", batch), mode, dtype, res), flush=True)
    print(f"\nLoad average (1 min) at start / end: {load_start:.2f} / {common.load_average():.2f}. "
          "\"at best\": the dense model's limit over our own limit plus the floor, the most any step "
          "with library convolutions could reach here; \"now\": over our step's median.")


if __name__ == "__main__":
    main()
