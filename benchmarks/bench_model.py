"""Model benchmark: this project's Spikingformer against the authors' code with SpikingJelly's neurons.

Two architectures, as in the performance issue:

* ``cifar``: Spikingformer-4-384 for CIFAR-10 (32x32 images, T = 4), batch 16;
* ``event``: the 2-256 event model for CIFAR10-DVS (128x128 event frames, T = 16), batch 8.

Each is built three times, with the same weights:

* ``ours``: this project's model (fused :class:`MultiStepLIF` neurons, the model-level changes, the
  allocator set up as ``spikingformer`` does at start-up:
  :func:`spikingformer.allocator.configure_allocator`);
* ``authors' code + SJ`` -- the baseline of the targets: the authors' model layer for layer
  (``benchmarks/authors_model.py``, which reproduces the logits of their code
  exactly) with SpikingJelly's ``MultiStepLIFNode(backend='torch')``, ``functional.reset_net(model)``
  after every batch and the C library's default allocator, as the authors' training scripts run;
* ``SJ neurons in our layers``: our model with every neuron replaced by SpikingJelly's (default
  allocator), which isolates what the neurons alone contribute.

Each configuration -- model x build x {training step, inference batch} x {fp32, bf16 autocast} --
runs in a fresh process: two warm-up steps, then the median wall time of ``--steps`` steps. Two
more training-step rows separate the allocator's share (``ours`` with the default allocator, the
authors' build with ours).

* training step = forward, cross-entropy, ``zero_grad(set_to_none=True)``, backward, AdamW step;
* inference batch = ``model.eval()`` forward under ``torch.inference_mode()``;
* peak memory = the process's peak resident set (``getrusage().ru_maxrss``) minus its resident set
  just before the first step (model and input already allocated; gradients and the AdamW state,
  created by the first step, count in it): the step's working set. The table also gives the
  process's peak RSS.
* efficiency = FLOPs of our fp32 training step (counted by ``torch.utils.flop_counter.
  FlopCounterMode`` over one forward+backward: every matmul / convolution in both passes; the
  neurons, BatchNorm and optimizer are elementwise work and are not counted) / its median time,
  as a fraction of the dense matmul rate measured in the same run (2048x2048 matrices, fp32 and
  bf16, on the same threads; the faster of ``torch.mm`` and the same product as a oneDNN 1x1
  convolution).

Usage::

    python benchmarks/bench_model.py                       # both models (~8 min on 2 idle cores)
    python benchmarks/bench_model.py --models event --steps 5
    python benchmarks/bench_model.py --quick               # tiny sizes, one thread: a smoke test
    python benchmarks/bench_model.py --profile --threads 1 # where a training step's time goes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common

MODELS = {
    # key: (zoo name, batch, time steps or None for static images, img_size override)
    "cifar": ("spikingformer_cifar10_4_384", 16, None, None),
    "event": ("spikingformer_cifar10dvs_2_256", 8, 16, None),
}
QUICK = {
    "cifar": dict(embed_dim=64, num_heads=4, depth=1, time_steps=2, batch=2),
    "event": dict(embed_dim=64, num_heads=4, depth=1, time_steps=2, batch=2, img_size=32),
}

# Targets of the performance issue: (model, pass, our dtype, SpikingJelly build's dtype, minimum
# speed-up); every one also asks for at most half the SpikingJelly build's peak memory.
TARGETS = [
    ("cifar", "train", "fp32", "fp32", 1.5),
    ("cifar", "train", "bf16", "fp32", 2.5),
    ("cifar", "train", "bf16", "bf16", 2.5),
    ("event", "train", "fp32", "fp32", 3.0),
    ("cifar", "infer", "fp32", "fp32", 2.0),
    ("event", "infer", "fp32", "fp32", 2.0),
]
MAX_MEMORY_RATIO = 0.5


# ----------------------------------------------------------------------------- worker side


BUILDS = {
    # build: (label, SpikingJelly neurons reset after every batch)
    "ours": ("ours", False),
    "authors": ("authors' code + SJ", True),
    "sj": ("SJ neurons in our layers", True),
}


def build(job: dict):
    """The model of ``job["build"]``, a batch of inputs and labels (deterministic: seed 0).

    All builds get the same weights: those of the authors' model
    (``authors_model.py``) initialised with seed 0, loaded into ours
    through the authors' key translation.
    """
    import torch

    import authors_model
    import sj_neurons
    from spikingformer.models.zoo import create_model, load_weights
    from spikingformer.neuron import MultiStepLIF

    overrides = dict(job.get("overrides", {}))
    batch = overrides.pop("batch", job["batch"])
    model = create_model(job["name"], **overrides)
    c = model.config
    build_ = job.get("build", "ours")
    sj_backend = sj_neurons.spikingjelly_backend(job.get("device", "cpu"))
    ours_neuron = lambda tau, v_th: MultiStepLIF(tau=tau, v_threshold=v_th, detach_reset=True)  # noqa: E731
    sj_neuron = lambda tau, v_th: authors_model.spikingjelly_neuron(tau, v_th, sj_backend)  # noqa: E731
    # job["authors_neuron"] = "ours" builds the authors' layers with our neurons (for tests without SpikingJelly)
    authors_in_sj = build_ == "authors" and job.get("authors_neuron", "spikingjelly") == "spikingjelly"
    torch.manual_seed(0)
    authors = authors_model.from_zoo_config(c, sj_neuron if authors_in_sj else ours_neuron)
    if build_ == "authors":
        model = authors
    else:
        load_weights(model, {"state_dict": authors.state_dict()})
        if build_ == "sj":
            sj_neurons.use_spikingjelly_neurons(model, sj_backend)
    del authors
    torch.manual_seed(1)
    if c.family == "event":
        t = overrides.get("time_steps", job.get("time_steps") or c.time_steps)
        # sparse event counts, as integrated DVS frames are (most pixels see no event)
        x = torch.poisson(torch.full((batch, t, c.in_channels, c.img_size, c.img_size), 0.15))
    else:
        x = torch.randn(batch, c.in_channels, c.img_size, c.img_size)
    y = torch.randint(0, c.num_classes, (batch,))
    return model, x, y


def _worker(job: dict) -> dict:
    from spikingformer import allocator

    if job["our_allocator"]:
        allocator.configure_allocator()
    import torch

    import sj_neurons

    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    model, x, y = build(job)
    model, x, y = model.to(device), x.to(device), y.to(device)
    sj = BUILDS[job["build"]][1]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=job["dtype"] == "bf16")
    memory = common.MemoryProbe(device)
    if job["mode"] == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sj:
                sj_neurons.reset_spikingjelly(model)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
            if sj:
                sj_neurons.reset_spikingjelly(model)

    rss0 = memory.current()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        if i == job["warmup"]:
            faults0 = common.minor_faults()
        memory.synchronize()
        t0 = time.perf_counter()
        step()
        memory.synchronize()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    result = dict(
        times=times,
        rss_before=rss0,
        max_rss=memory.peak(),
        faults_per_step=(common.minor_faults() - faults0) / job["steps"],
        allocator=allocator.allocator_state(),
    )
    if job.get("count_flops"):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, autocast:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        result["flops"] = counter.get_total_flops()
    return result


def _matmul_worker(job: dict) -> dict:
    """Dense n x n x n product rates: ``torch.mm`` (MKL on x86 CPUs) and the same product as a 1x1
    convolution (oneDNN, the route :class:`~spikingformer.layers.TokenLinear` takes); the faster of
    the two is the machine's dense rate."""
    import torch

    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    sync = common.MemoryProbe(device).synchronize
    n = job["n"]
    out = {}
    for dtype in job["dtypes"]:
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        image = a.view(1, n, 1, n).permute(0, 3, 1, 2)  # (1, K, M, 1) channels-last view of a
        kernel = b.t().contiguous().view(n, n, 1, 1)
        routes = {"mm": lambda: torch.mm(a, b), "onednn": lambda: torch.nn.functional.conv2d(image, kernel)}
        for route, fn in routes.items():
            fn()
            times = []
            for _ in range(job["reps"]):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            out[f"{dtype}_{route}"] = 2 * n**3 / statistics.median(times)
        out[dtype] = max(out[f"{dtype}_mm"], out[f"{dtype}_onednn"])
    return out


# Operator groups of the profile (torch.profiler self CPU time by aten op / autograd node name).
PROFILE_GROUPS = [
    ("convolution: tokenizer 3x3, token linears as 1x1 (fwd+bwd)", ("convolution",)),
    ("matmul: attention, head, linears off the CPU fp32 path (fwd+bwd)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("BatchNorm (fwd+bwd)", ("batch_norm",)),
    ("LIF neurons (fwd+bwd)", ("CPUFusedLIF", "TorchFusedLIF", "Triton")),
    ("max-pool (fwd+bwd)", ("max_pool",)),
    ("copies / layout changes", ("aten::copy_", "aten::clone", "aten::contiguous")),
    ("zero-fill", ("aten::fill_", "aten::zero_")),
]


def profile_step(key: str, dtype: str = "fp32", threads: int = 1, build_: str = "ours") -> list[tuple[str, float]]:
    """Self CPU time of one training step (after a warm-up) grouped as :data:`PROFILE_GROUPS`, in seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import sj_neurons
    from spikingformer import allocator

    allocator.configure_allocator()
    torch.set_num_threads(threads)
    name, batch, _, _ = MODELS[key]
    model, x, y = build(dict(name=name, batch=batch, build=build_))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if BUILDS[build_][1]:
            sj_neurons.reset_spikingjelly(model)

    for _ in range(2):  # the heap grows over the first steps
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    groups = {label: 0.0 for label, _ in PROFILE_GROUPS}
    other = total = 0.0
    for event in prof.key_averages():
        t = event.self_cpu_time_total / 1e6
        total += t
        label = next((lab for lab, keys in PROFILE_GROUPS if any(k in event.key for k in keys)), None)
        if label is None:
            other += t
        else:
            groups[label] += t
    return [*groups.items(), ("other (elementwise, optimizer, autograd)", other), ("total", total)]


# ----------------------------------------------------------------------------- driver side


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The model benchmark's options."""
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="which models to time: cifar (Spikingformer-4-384), event (2-256 event model); default: both")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the heap grows over the first steps)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: all cores; 1 with --quick)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="precisions to time (bf16: autocast); default: both")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the models run; on cuda, SpikingJelly uses its cupy backend when CuPy imports, and "
                         "peak memory is torch.cuda.max_memory_allocated")
    ap.add_argument("--no-allocator-rows", action="store_true",
                    help="skip the two extra rows that separate the allocator's share from the neurons'")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models (1 block, D=64, T=2, batch 2): checks the benchmark runs, times mean nothing")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the comparison: where one training step's time goes (torch.profiler, grouped)")


def drop_emulated_bf16(args: argparse.Namespace) -> None:
    """On a CPU without native bf16 (:func:`spikingformer.cpu_features.native_bf16`), drop bf16 from
    ``args.dtypes`` with one line on stderr: emulated bf16 times measure the emulation."""
    from spikingformer.cpu_features import BF16_EMULATED, native_bf16

    if args.device != "cpu" or "bf16" not in args.dtypes or native_bf16():
        return
    args.dtypes = [d for d in args.dtypes if d != "bf16"]
    if not args.dtypes:
        raise ValueError(f"--dtypes bf16: {BF16_EMULATED}; benchmark fp32 here (--dtypes fp32)")
    print(f"bf16 rows skipped: {BF16_EMULATED}", file=sys.stderr, flush=True)


def _jobs(args: argparse.Namespace) -> list[dict]:
    jobs = []
    for key in args.models:
        name, batch, t, _ = MODELS[key]
        base = dict(model=key, name=name, batch=batch, threads=args.threads, warmup=args.warmup, steps=args.steps,
                    device=args.device)
        if args.quick:
            base["overrides"] = QUICK[key]
        for mode in ("train", "infer"):
            for dtype in args.dtypes:
                for build_ in BUILDS:
                    jobs.append(dict(base, mode=mode, dtype=dtype, build=build_, our_allocator=build_ == "ours",
                                     count_flops=(build_ == "ours" and mode == "train" and dtype == "fp32")))
        if not args.no_allocator_rows and "fp32" in args.dtypes and args.device == "cpu":
            for build_, ours_alloc in (("ours", False), ("authors", True)):
                jobs.append(dict(base, mode="train", dtype="fp32", build=build_, our_allocator=ours_alloc))
    return jobs


def _row_name(job: dict) -> str:
    label = BUILDS[job["build"]][0]
    if job["our_allocator"] != (job["build"] == "ours"):  # the non-default allocator for this build
        label += ", default allocator" if job["build"] == "ours" else ", our allocator"
    return label


def torch_cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device visible"


def run_benchmark(args: argparse.Namespace, command: str) -> dict:
    """Run every configuration (each in a fresh process) and print the report; returns the results."""
    import sj_neurons

    if args.threads is None:
        args.threads = 1 if args.quick else os.cpu_count()
    if args.device == "cuda" and torch_cuda_name() == "no CUDA device visible":
        raise ValueError("--device cuda: no CUDA device is visible to torch (run on a GPU machine, or use --device cpu)")
    drop_emulated_bf16(args)
    sj_version = sj_neurons.spikingjelly_version()
    if sj_version == "not installed":
        raise ValueError("the model benchmark compares against SpikingJelly's neurons: pip install \"spikingformer[bench]\" (SpikingJelly 0.0.0.0.14)")
    load_start = common.load_average()
    start = time.perf_counter()
    env_default = {"SPIKINGFORMER_ALLOCATOR": "0"}  # workers decide themselves whether to tune
    mm = common.run_worker(__file__, dict(kind="matmul", n=512 if args.quick else 2048, reps=5, threads=args.threads,
                                        device=args.device, dtypes=args.dtypes), env_default)
    results = []
    for job in _jobs(args):
        job = dict(job, kind="model")
        res = common.run_worker(__file__, job, env={} if job["our_allocator"] else env_default)
        res["median"] = statistics.median(res["times"])
        results.append((job, res))
        print(f"  [{time.perf_counter() - start:5.0f} s] {job['model']} {job['mode']} {job['dtype']} "
              f"{_row_name(job)}: {res['median'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start

    print("# Model benchmark\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- device: {args.device}" + (f" ({torch_cuda_name()})" if args.device == "cuda" else ""))
    print(f"- dense matmul ({'512' if args.quick else '2048'}^3, median of 5; the faster route is the reference): "
          + ", ".join(f"{d} torch.mm {mm[d + '_mm'] / 1e9:.0f} / 1x1 conv {mm[d + '_onednn'] / 1e9:.0f} GFLOP/s"
                      for d in args.dtypes))
    print(f"- {args.warmup} warm-up step(s), then the median of {args.steps} steps, each configuration in a fresh "
          f"process; run took {elapsed:.0f} s; load average (1 min) at start / end: {load_start:.2f} / "
          f"{common.load_average():.2f}")
    if args.device == "cuda":
        print("- on cuda, 'peak' and 'max RSS' are torch.cuda.max_memory_allocated minus / and memory_allocated "
              "before the first step; SpikingJelly backend: " + sj_neurons.spikingjelly_backend("cuda"))
    print("- peak = peak RSS of the worker minus its RSS before the first step (the step's working set); "
          "max RSS = the worker's peak RSS; faults = minor page faults per timed step (4 KiB pages the kernel had to map and zero)\n")
    if args.quick:
        print("**--quick: tiny models, the numbers only show that the benchmark runs.**\n")

    def find(job, **kw):
        for j, r in results:
            if j["model"] == job["model"] and all(j[k] == v for k, v in kw.items()):
                return r
        return None

    print("| model | pass | dtype | build | ms / step | images/s | peak MB | max RSS MB | faults / step "
          "| authors' time / ours | ours peak / authors' peak | SJ-in-our-layers time / ours |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for job, res in results:
        batch = job.get("overrides", {}).get("batch", job["batch"])
        peak = res["max_rss"] - res["rss_before"]
        ratios = ["", "", ""]
        if job["build"] == "ours":
            authors = find(job, mode=job["mode"], dtype=job["dtype"], build="authors", our_allocator=False)
            sj = find(job, mode=job["mode"], dtype=job["dtype"], build="sj", our_allocator=False)
            if authors:
                ratios[0] = f"{authors['median'] / res['median']:.2f}x"
                ratios[1] = f"{peak / max(authors['max_rss'] - authors['rss_before'], 1):.2f}"
            if sj:
                ratios[2] = f"{sj['median'] / res['median']:.2f}x"
        label = f"{MODELS[job['model']][0]}, B={batch}"
        print(f"| {label} | {job['mode']} | {job['dtype']} | {_row_name(job)} | {res['median'] * 1e3:.0f} | "
              f"{batch / res['median']:.1f} | {peak / 2**20:.0f} | {res['max_rss'] / 2**20:.0f} | "
              f"{res['faults_per_step']:.0f} | {' | '.join(ratios)} |")

    print("\nEfficiency of our fp32 training step (FLOPs counted by FlopCounterMode over forward+backward; "
          "fraction of the dense fp32 / bf16 matmul rate measured above):\n")
    print("| model | dtype | GFLOP / step | ms / step | achieved GFLOP/s | fraction of dense matmul |")
    print("|---|---|---:|---:|---:|---:|")
    for job, res in results:
        if "flops" in res:
            for dtype in args.dtypes:
                r = find(job, mode="train", dtype=dtype, build="ours", our_allocator=True)
                if r is None:
                    continue
                rate = res["flops"] / r["median"]
                print(f"| {MODELS[job['model']][0]} | {dtype} | {res['flops'] / 1e9:.1f} | {r['median'] * 1e3:.0f} | "
                      f"{rate / 1e9:.1f} | {rate / mm[dtype]:.1%} |")
    print("\nTargets, against the authors' code with SpikingJelly's neurons (speed-up = its median time / ours; "
          f"memory = our step peak / its step peak, target <= {MAX_MEMORY_RATIO}); the last column compares with "
          "SpikingJelly's neurons in our own layers, which isolates the neurons' share:\n")
    print("| model | pass | ours | baseline | speed-up | target | met | memory ratio | met | speed-up vs SJ in our layers |")
    print("|---|---|---|---|---:|---:|---|---:|---|---:|")
    for key, mode, dtype, sj_dtype, minimum in TARGETS:
        def pick(build_, dt, ours_alloc):
            return next((r for j, r in results if j["model"] == key and j["mode"] == mode and j["dtype"] == dt
                         and j["build"] == build_ and j["our_allocator"] == ours_alloc), None)

        ours, authors, sj = pick("ours", dtype, True), pick("authors", sj_dtype, False), pick("sj", sj_dtype, False)
        if ours is None or authors is None:
            continue
        speed = authors["median"] / ours["median"]
        mem = (ours["max_rss"] - ours["rss_before"]) / max(authors["max_rss"] - authors["rss_before"], 1)
        vs_sj = f"{sj['median'] / ours['median']:.2f}x" if sj else ""
        print(f"| {MODELS[key][0]} | {mode} | {dtype} | {sj_dtype} | {speed:.2f}x | {minimum}x | "
              f"{'yes' if speed >= minimum else 'no'} | {mem:.2f} | {'yes' if mem <= MAX_MEMORY_RATIO else 'no'} | "
              f"{vs_sj} |")
    print("\nAllocator: " + "; ".join(sorted({f"{_row_name(j)}: {r['allocator']}" for j, r in results})))
    return dict(matmul=mm, results=results)


def print_profile(args: argparse.Namespace, command: str) -> None:
    """Profile one training step per model and dtype (each in its own process) and print the groups."""
    threads = args.threads or 1
    drop_emulated_bf16(args)
    print("# Where a training step's time goes\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(threads)))
    print("- torch.profiler, self CPU time of one step after two warm-up steps, this project's neurons, "
          f"load average (1 min) {common.load_average():.2f}\n")
    for key in args.models:
        cols = []
        for dtype in args.dtypes:
            cols.append((dtype, common.run_worker(__file__, dict(kind="profile", model=key, dtype=dtype, threads=threads))))
        labels = [label for label, _ in cols[0][1]["groups"]]
        print(f"{MODELS[key][0]}, batch {MODELS[key][1]}:\n")
        print("| operators | " + " | ".join(f"{d} s | {d} %" for d, _ in cols) + " |")
        print("|---|" + "---:|---:|" * len(cols))
        for i, label in enumerate(labels):
            cells = []
            for _, res in cols:
                t, total = res["groups"][i][1], res["groups"][-1][1]
                cells.append(f"{t:.2f} | {t / total:.0%}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        import json

        job = json.loads(argv[1])
        if job["kind"] == "profile":
            common.report(dict(groups=profile_step(job["model"], job["dtype"], job["threads"])))
        else:
            common.report(_matmul_worker(job) if job["kind"] == "matmul" else _worker(job))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        (print_profile if args.profile else run_benchmark)(args, common.command(argv))
    except ValueError as err:  # a user error: one line, exit status 2
        ap.exit(2, f"{ap.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
