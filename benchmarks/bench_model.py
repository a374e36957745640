"""Model benchmark: this project's Spikingformer against the authors' code with SpikingJelly's neurons.

Two architectures, as in the performance issue:

* ``cifar``: Spikingformer-4-384 for CIFAR-10 (32x32 images, T = 4), batch 16;
* ``event``: the 2-256 event model for CIFAR10-DVS (128x128 event frames, T = 16), batch 8.

Contenders, all with the same weights, each in its own fresh process (so no allocator state leaks):

* ``ours``: this project's model (fused :class:`MultiStepLIF` neurons, the model-level changes, the
  allocator set up as ``spikingformer`` does at start-up:
  :func:`spikingformer.allocator.configure_allocator`);
* the baselines: the authors' model layer for layer (``benchmarks/authors_model.py``, which
  reproduces the logits of their code exactly) with ``functional.reset_net(model)`` after every
  batch, once per SpikingJelly release (``--sj-python``: one Python per release, the authors' pin
  0.0.0.0.12 and today's 2.x cannot share an environment), with that release's fastest neuron on
  the benchmark's device (timed there side by side first when it has more than one, see
  ``sj_neurons.lif_nodes``: on a GPU SpikingJelly 2.x's ``LIFNode`` runs its own CUDA kernel), and each
  under the allocator help a knowledgeable user would give it (:data:`ALLOCATORS`): as is, glibc's
  malloc tuned through ``GLIBC_TUNABLES`` (no ``mmap`` per large block, no trimming, huge pages),
  and our caching allocator. A release's baseline is its fastest allocator set-up.

The models are randomly initialised, but their BatchNorms' running statistics are those of the
timed batch (:func:`calibrate_bn`, computed once per model in a worker of its own and loaded by
every contender): with PyTorch's initial statistics (mean 0, variance 1) a random model's neurons
hardly fire in ``eval()`` mode, and inference would be timed on spike maps of zeros.

Each configuration -- model x contender x {training step, inference batch} x {fp32, bf16 autocast;
on CUDA also tf32} -- runs ``--warmup`` untimed steps, then ``--steps`` timed ones; ``--rounds``
repeats the whole set, contenders interleaved, and the median of all timed steps is reported.

* training step = forward, cross-entropy, ``zero_grad(set_to_none=True)``, backward, AdamW step
  (ours: PyTorch's fused AdamW, as ``spikingformer train`` builds it; the authors' code: PyTorch's
  per-parameter loop, as its ``train.py`` builds it through timm);
* inference batch = ``model.eval()`` forward under ``torch.inference_mode()``;
* peak memory = the process's peak resident set (``getrusage().ru_maxrss``) minus its resident set
  just before the first step (model and input already allocated; gradients and the AdamW state,
  created by the first step, count in it): the step's working set;
* valid limit (``dense_limit.py``): every convolution and matrix product our step dispatches,
  forward and backward, recorded on one real step and timed in isolation (best of ``--limit-reps`` rounds)
  on the same threads; their summed time is the least time the step's dense arithmetic needs at
  this machine's rate on exactly those shapes, and efficiency = that time / our step's median time
  (at most 100% but for timing noise). The theoretical FMA peak of the ISA in use is printed beside it.

The report and issue 12's targets are ``model_report.py``.

Usage::

    python benchmarks/bench_model.py --dtypes fp32 --sj-python sj012/bin/python --sj-python python
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        SPIKINGFORMER_NATIVE_ARCH=x86-64-v3 python benchmarks/bench_model.py ...   # as an AVX2 CPU
    python benchmarks/bench_model.py --quick               # tiny sizes, one thread: a smoke test
    python benchmarks/bench_model.py --profile --threads 1 # where a training step's time goes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import types

import common

MODELS = {
    # key: (zoo name, batch, time steps or None for static images, img_size override)
    "cifar": ("spikingformer_cifar10_4_384", 16, None, None),
    "event": ("spikingformer_cifar10dvs_2_256", 8, 16, None),
}
# --batch authors: the batch of the authors' training runs on one GPU (64 for CIFAR-10, 16 for
# CIFAR10-DVS), where a GPU step no longer waits on the host as it does at the CPU batches above
AUTHORS_BATCH = {"cifar": 64, "event": 16}
QUICK = {
    "cifar": dict(embed_dim=64, num_heads=4, depth=1, time_steps=2, batch=2),
    "event": dict(embed_dim=64, num_heads=4, depth=1, time_steps=2, batch=2, img_size=32),
}
# untimed steps before timing (and before --profile's step): our allocator maps nothing new from the
# event model's third training step on (docs/performance-log.md, "BN's input gradient in place")
WARMUP_STEPS = 3
DTYPES = ("fp32", "bf16", "tf32")  # tf32: CUDA only (check_dtypes)

# allocator set-ups of the baselines: label -> (environment of the worker, install our allocator)
GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184:"
                  "glibc.malloc.hugetlb=1")
ALLOCATORS = {
    "as is": ({"SPIKINGFORMER_ALLOCATOR": "0"}, False),
    "glibc tuned": ({"SPIKINGFORMER_ALLOCATOR": "0", "GLIBC_TUNABLES": GLIBC_TUNABLES}, False),
    "our allocator": ({}, True),
}


# ----------------------------------------------------------------------------- worker side


def calibrate_bn(model, x, reset=None) -> None:
    """Set every BatchNorm's running statistics of ``model`` to those of the batch ``x``: one forward
    in training mode without autograd, with momentum 1 (``reset(model)`` after it clears the
    neurons' state, for SpikingJelly's). The batch count and momentum are left as they were."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    if reset is not None:
        reset(model)
    for m, (momentum, count) in zip(bns, kept):
        m.momentum = momentum
        m.num_batches_tracked.copy_(count)


def _bn_statistics(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def build(job: dict):
    """The model of ``job["build"]`` (``"ours"`` or ``"authors"``), a batch of inputs and labels
    (deterministic: seed 0).

    Both get the same weights: those of the authors' model (``authors_model.py``) initialised with
    seed 0, loaded into ours through the authors' key translation, with BatchNorm's running
    statistics those of the batch (:func:`calibrate_bn`; read from ``job["bn_stats"]``, a file of
    :func:`_calibrate_worker`, where given). The authors' build needs only ``job["config"]`` (a
    ``ModelConfig`` as a dict) and SpikingJelly, not this package's models, so it runs in a Python
    with another SpikingJelly release.
    """
    import torch

    import authors_model
    import sj_neurons

    overrides = dict(job.get("overrides", {}))
    batch = overrides.pop("batch", job["batch"])
    if job.get("config") is None:
        from spikingformer.models.zoo import model_config

        job = dict(job, config=dataclasses.asdict(model_config(job["name"], **overrides)))
    c = types.SimpleNamespace(**job["config"])
    build_ = job.get("build", "ours")
    sj_backend = sj_neurons.spikingjelly_backend(job.get("device", "cpu"))

    def sj_neuron(tau, v_th):
        return authors_model.spikingjelly_neuron(tau, v_th, sj_backend, job.get("sj_node"))

    def ours_neuron(tau, v_th):
        from spikingformer.neuron import MultiStepLIF

        return MultiStepLIF(tau=tau, v_threshold=v_th, detach_reset=True)

    # job["authors_neuron"] = "ours" builds the authors' layers with our neurons (for tests without SpikingJelly)
    authors_in_sj = build_ == "authors" and job.get("authors_neuron", "spikingjelly") == "spikingjelly"
    torch.manual_seed(0)
    authors = authors_model.from_zoo_config(c, sj_neuron if authors_in_sj else ours_neuron)
    torch.manual_seed(1)
    if c.family == "event":
        t = overrides.get("time_steps", job.get("time_steps") or c.time_steps)
        # sparse event counts, as integrated DVS frames are (most pixels see no event)
        x = torch.poisson(torch.full((batch, t, c.in_channels, c.img_size, c.img_size), 0.15))
    else:
        x = torch.randn(batch, c.in_channels, c.img_size, c.img_size)
    y = torch.randint(0, c.num_classes, (batch,))
    if job.get("bn_stats"):
        unexpected = authors.load_state_dict(torch.load(job["bn_stats"]), strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{job['bn_stats']} holds statistics the model lacks: {unexpected}")
    else:
        calibrate_bn(authors, x, sj_neurons.reset_spikingjelly if authors_in_sj else None)
    if build_ == "authors":
        model = authors
    else:
        from spikingformer.models.zoo import create_model, load_weights

        model = create_model(job["name"], **overrides)
        load_weights(model, {"state_dict": authors.state_dict()})
    del authors
    return model, x, y


def _calibrate_worker(job: dict) -> dict:
    """The authors' model with our neurons, its BatchNorms calibrated on the batch (:func:`calibrate_bn`):
    saves their running statistics to ``job["path"]`` and reports the firing rate of our model's
    neurons in an inference batch (spikes over all neuron outputs)."""
    import torch

    from spikingformer.neuron import MultiStepLIF

    torch.set_num_threads(job["threads"])
    authors, _, _ = build(dict(job, build="authors", authors_neuron="ours", bn_stats=None))
    torch.save(_bn_statistics(authors), job["path"])
    del authors
    model, x, _ = build(dict(job, build="ours", bn_stats=job["path"]))
    counts = [0, 0]

    def count(module, inputs, out):
        counts[0] += int(out.count_nonzero())
        counts[1] += out.numel()

    for m in model.modules():
        if isinstance(m, MultiStepLIF):
            m.register_forward_hook(count)
    with torch.inference_mode():
        model.eval()(x)
    return dict(firing_rate=counts[0] / counts[1])


def step_function(model, x, y, mode: str, dtype: str, authors: bool):
    """One training step (``mode="train"``: forward, cross-entropy, ``zero_grad``, backward, AdamW
    step: fused for ours, as the trainer's, the per-parameter loop for the ``authors``) or inference
    batch (``"infer"``: ``eval()`` forward under ``inference_mode``) of ``model`` on ``x`` (labels
    ``y``), under bf16 autocast on x's device if ``dtype == "bf16"``; SpikingJelly's neurons reset
    after it (``authors``).

    Also sets the process's TF32 switches for ``dtype`` (on for ``"tf32"``, off otherwise, for
    products and convolutions alike: :func:`spikingformer.engine.precision.set_tf32`), so that every
    contender, and the dense limit's replay after the step, computes at the same precision."""
    import torch

    import sj_neurons
    from spikingformer.engine.precision import set_tf32

    set_tf32(dtype == "tf32")

    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not authors)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if authors:
                sj_neurons.reset_spikingjelly(model)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
            if authors:
                sj_neurons.reset_spikingjelly(model)
    return step


def _worker(job: dict) -> dict:
    if job["our_allocator"]:
        from spikingformer import allocator

        allocator.configure_allocator()
    import torch

    import sj_neurons

    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    model, x, y = build(job)
    model, x, y = model.to(device), x.to(device), y.to(device)
    memory = common.MemoryProbe(device)
    step = step_function(model, x, y, job["mode"], job["dtype"], authors=job["build"] == "authors")

    def timed_step(times: list, cpu_times: list) -> None:
        memory.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        memory.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)

    rss0 = memory.current()
    for _ in range(job["warmup"]):
        timed_step([], [])
    faults0 = common.minor_faults()
    times, cpu_times = [], []
    for _ in range(job["steps"]):
        timed_step(times, cpu_times)
    result = dict(
        times=times,
        cpu_times=cpu_times,
        rss_before=rss0,
        max_rss=memory.peak(),
        faults_per_step=(common.minor_faults() - faults0) / job["steps"],
        sj_version=sj_neurons.spikingjelly_version(),
    )
    if job.get("limit_reps"):  # after the timed steps, so that the replay's tensors do not count in the peak
        import dense_limit

        # one more step before each round of the replay: the pairs share a spell of the machine (and
        # one untimed before its warm-up, dense_limit.replay)
        paired, paired_cpu = [], []
        result["limit"], result["dense_model_limit"] = dense_limit.measure_with_dense_model(
            step, device, job["limit_reps"],
            before_round=lambda warm_up: step() if warm_up else timed_step(paired, paired_cpu))
        result.update(paired_times=paired, paired_cpu_times=paired_cpu)
    return result


def _sj_worker(job: dict) -> dict:
    """This Python's SpikingJelly: its version, and forward+backward times of each of its multi-step
    LIF neurons (:func:`sj_neurons.lif_nodes`) on ``T x 2^20`` float32 elements on ``job["device"]``,
    interleaved over ``rounds``."""
    import torch

    import sj_neurons

    torch.set_num_threads(job["threads"])
    device = job.get("device", "cpu")
    sync = common.MemoryProbe(device).synchronize
    out = dict(version=sj_neurons.spikingjelly_version(), nodes={})
    if out["version"] == "not installed":
        return out
    nodes = sj_neurons.lif_nodes()
    if len(nodes) == 1:
        out["nodes"] = {nodes[0]: {}}
        return out
    gen = torch.Generator().manual_seed(0)
    for t in job["time_steps"]:
        x = (torch.randn(t, 2**20 // t, generator=gen) * 1.5 + 0.8).to(device)
        g = torch.randn(t, 2**20 // t, generator=gen).to(device)
        neurons = {n: sj_neurons.spikingjelly_function(device, node=n) for n in nodes}
        times = {n: [] for n in nodes}
        for r in range(job["rounds"] + 1):
            for n, fn in neurons.items():
                xg = x.clone().requires_grad_(True)
                sync()
                t0 = time.perf_counter()
                fn(xg).backward(g)
                sync()
                if r:  # the first round warms up
                    times[n].append(time.perf_counter() - t0)
        for n in nodes:
            out["nodes"].setdefault(n, {})[str(t)] = statistics.median(times[n])
    return out


# Operator groups of the profile (torch.profiler self CPU time by aten op / autograd node name).
PROFILE_GROUPS = [
    ("convolution: tokenizer 3x3, token linears as 1x1 (fwd+bwd)", ("convolution",)),
    # the spike_conv route's operators (spikingformer::spike_conv, spike_conv_train and its backward,
    # whose input gradient is aten's convolution_backward, above), their autograd nodes
    # (_SpikeConvTrain) and the int8 pieces' operator
    ("spike convolutions: the tokenizer's convolutions of spikes (spike_conv route)",
     ("spike_conv", "SpikeConvTrain", "qconv2d")),
    # MKL's products, and oneDNN's matmul where the token_linear route runs it
    ("matmul: attention, head, linears off the CPU fp32 path (fwd+bwd)",
     ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")),
    # PyTorch's BatchNorm, and the fused routes' batch statistics (spikingformer::bn_batch_stats)
    ("BatchNorm (fwd+bwd; the fused routes' batch statistics)", ("batch_norm", "bn_batch_stats")),
    # the spike_linear route's operator (its forward kernel; the autograd node holds the backward's
    # dense products, which the profiler also lists as aten::mm under it)
    ("spike linears: token linears summing spikes (spike_linear route)", ("spike_linear",)),
    # the operators of spikingformer.kernels.ops (lif, lif_pool, bn_lif_pool and their backward), and
    # their autograd nodes, which time the forward kernel when it runs under autograd (for the
    # training BN -> SN [-> max-pool], _BNSpikeTrain and its backward)
    ("LIF neurons, fused [BN ->] SN [-> max-pool] kernels (fwd+bwd)",
     ("spikingformer::", "spikingformer_", "TorchFusedLIF", "Triton", "BNSpikeTrain")),
    ("max-pool (fwd+bwd)", ("max_pool",)),
    ("copies / layout changes", ("aten::copy_", "aten::clone", "aten::contiguous")),
    ("zero-fill", ("aten::fill_", "aten::zero_")),
]


def profile_step(key: str, dtype: str = "fp32", threads: int = 1, build_: str = "ours",
                 batch: int | None = None) -> list[tuple[str, float]]:
    """Self CPU time of one training step (after a warm-up) grouped as :data:`PROFILE_GROUPS`, in seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from spikingformer import allocator

    allocator.configure_allocator()
    torch.set_num_threads(threads)
    name = MODELS[key][0]
    model, x, y = build(dict(name=name, batch=batch or MODELS[key][1], build=build_))
    step = step_function(model, x, y, "train", dtype, authors=build_ == "authors")
    for _ in range(WARMUP_STEPS):  # the heap grows over the first steps
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


def batch_of(key: str, batch: str, quick: bool = False) -> int:
    """The batch timed for model ``key``: ``--quick``'s, the authors' training batch for ``--batch
    authors``, else the benchmark's (:data:`MODELS`)."""
    if quick:
        return QUICK[key]["batch"]
    return AUTHORS_BATCH[key] if batch == "authors" else MODELS[key][1]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The model benchmark's options."""
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="which models to time: cifar (Spikingformer-4-384), event (2-256 event model); default: both")
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"],
                    help="training step and/or inference batch; default: both")
    ap.add_argument("--batch", default="bench", choices=["bench", "authors"],
                    help="bench: batch 16 (CIFAR) / 8 (event), sized for a CPU; authors: 64 / 16, the authors' "
                         "training batch on one GPU")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round (median reported)")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                    help="untimed steps first (the heap grows over the first steps: our allocator maps nothing new "
                         "from the event model's third training step on)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every contender this many times, interleaved (each a fresh process)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: all cores; 1 with --quick or --clock cpu)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: wall-clock time; cpu: the worker's process CPU time on one thread, which other "
                         "processes on a loaded machine barely disturb (page faults count: they are system time)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES,
                    help="precisions to time (bf16: autocast; fp32: full float32; tf32, on CUDA: float32 products and "
                         "convolutions on TF32 tensor cores, for every contender alike); default: fp32 and bf16")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the models run; on cuda, SpikingJelly uses its cupy backend when CuPy imports, and "
                         "peak memory is torch.cuda.max_memory_allocated")
    ap.add_argument("--sj-python", action="append", default=None, metavar="PYTHON",
                    help="a Python whose SpikingJelly release gives one baseline (repeat for several releases; it "
                         "must import spikingformer.allocator, e.g. PYTHONPATH=src); default: this Python")
    ap.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS),
                    help="allocator set-ups tried for every baseline (the fastest counts); default: all")
    ap.add_argument("--limit-reps", type=int, default=5,
                    help="rounds timing each of the step's convolutions and products in isolation, in turn "
                         "(each one's best counts)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models (1 block, D=64, T=2, batch 2): checks the benchmark runs, times mean nothing")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the comparison: where one training step's time goes (torch.profiler, grouped)")


def check_dtypes(args: argparse.Namespace) -> None:
    """Refuse tf32 off CUDA (it names a GPU's tensor cores); on a CPU without native bf16
    (:func:`spikingformer.cpu_features.native_bf16`), drop bf16 from ``args.dtypes`` with one line
    on stderr: emulated bf16 times measure the emulation."""
    from spikingformer.cpu_features import BF16_EMULATED, native_bf16

    if "tf32" in args.dtypes and args.device != "cuda":
        raise ValueError("--dtypes tf32 times NVIDIA GPUs' TF32 tensor cores: use it with --device cuda")
    if args.device != "cpu" or "bf16" not in args.dtypes or native_bf16():
        return
    args.dtypes = [d for d in args.dtypes if d != "bf16"]
    if not args.dtypes:
        raise ValueError(f"--dtypes bf16: {BF16_EMULATED}; benchmark fp32 here (--dtypes fp32)")
    print(f"bf16 rows skipped: {BF16_EMULATED}", file=sys.stderr, flush=True)


def torch_cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device visible"


def _spikingjelly_releases(args: argparse.Namespace) -> list[dict]:
    """One baseline per ``--sj-python``: its SpikingJelly version and fastest neuron on ``--device``."""
    releases = []
    time_steps = sorted({(QUICK[k]["time_steps"] if args.quick else MODELS[k][2] or 4) for k in args.models})
    for python in args.sj_python:
        try:
            job = dict(kind="sj", threads=args.threads, time_steps=time_steps, device=args.device,
                       rounds=1 if args.quick else 3)
            res = common.run_worker(__file__, job, python=python)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"--sj-python {python}: it cannot run the benchmark's worker "
                             f"({str(err).strip().splitlines()[-1]})") from None
        if res["version"] == "not installed":
            raise ValueError(f"the model benchmark compares against SpikingJelly's neurons, which {python} lacks: "
                             "pip install \"spikingformer[bench]\" (or pass --sj-python PYTHON with it installed)")
        nodes = res["nodes"]
        node = min(nodes, key=lambda n: sum(nodes[n].values()))
        releases.append(dict(python=python, version=res["version"], node=node, nodes=nodes))
    return releases


def _contenders(args: argparse.Namespace, releases: list[dict]) -> list[dict]:
    allocators = args.allocators if args.device == "cpu" else ["as is"]
    out = [dict(id="ours", build="ours", allocator="our allocator", python=sys.executable, release=None)]
    for i, rel in enumerate(releases):
        for alloc in allocators:
            out.append(dict(id=f"sj{i}/{alloc}", build="authors", allocator=alloc, python=rel["python"], release=i,
                            sj_node=rel["node"]))
    return out


def run_benchmark(args: argparse.Namespace, command: str) -> dict:
    """Run every configuration (each in a fresh process) and print the report; returns the results."""
    import model_report
    from spikingformer.models.zoo import model_config

    if args.threads is None:
        args.threads = 1 if args.quick or args.clock == "cpu" else os.cpu_count()
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError("--clock cpu times one thread (a parallel region's CPU time is not its duration): "
                         "drop --threads or pass --threads 1")
    if args.device == "cuda" and torch_cuda_name() == "no CUDA device visible":
        raise ValueError("--device cuda: no CUDA device is visible to torch (run on a GPU machine, or use --device cpu)")
    check_dtypes(args)
    args.sj_python = args.sj_python or [sys.executable]
    load_start = common.load_average()
    start = time.perf_counter()
    releases = _spikingjelly_releases(args)
    contenders = _contenders(args, releases)
    scratch = tempfile.TemporaryDirectory(prefix="bench_model_")
    models = {}  # model -> the job fields every contender shares, and the firing rate of our inference
    for key in args.models:
        name, _, t, _ = MODELS[key]
        batch = batch_of(key, args.batch, args.quick)
        overrides = QUICK[key] if args.quick else {}
        config = dataclasses.asdict(model_config(name, **{k: v for k, v in overrides.items() if k != "batch"}))
        shared = dict(model=key, name=name, batch=batch, time_steps=t, overrides=overrides, config=config,
                      threads=args.threads, bn_stats=os.path.join(scratch.name, f"{key}.pt"))
        rate = common.run_worker(__file__, dict(shared, kind="calibrate", path=shared["bn_stats"]))["firing_rate"]
        models[key] = (shared, rate)
    results: dict = {}  # (model, mode, dtype, contender id) -> list of worker results, one per round
    for rnd in range(args.rounds):
        for key in args.models:
            shared = models[key][0]
            for mode in args.modes:
                for dtype in args.dtypes:
                    for con in contenders:
                        job = dict(shared, kind="model", warmup=args.warmup, steps=args.steps,
                                   device=args.device, mode=mode, dtype=dtype, build=con["build"],
                                   sj_node=con.get("sj_node"), our_allocator=ALLOCATORS[con["allocator"]][1],
                                   limit_reps=args.limit_reps if con["build"] == "ours" else 0)
                        res = common.run_worker(__file__, job, env=ALLOCATORS[con["allocator"]][0],
                                                python=con["python"])
                        results.setdefault((key, mode, dtype, con["id"]), []).append(res)
                        print(f"  [{time.perf_counter() - start:5.0f} s] round {rnd + 1} {key} {mode} {dtype} "
                              f"{model_report.label(con, releases)}: {statistics.median(res['times']) * 1e3:.0f} ms, "
                              f"CPU {statistics.median(res['cpu_times']) * 1e3:.0f} ms",
                              file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    scratch.cleanup()
    rows = _summarise(args, contenders, results)
    model_report.print_report(
        args, command, releases, contenders, rows, elapsed, load_start,
        models_note="BatchNorm running statistics of the timed batch (random weights); firing rate of our "
                    "model's neurons in inference: " + ", ".join(f"{k} {r:.1%}" for k, (_, r) in models.items()),
        names={k: v[0] for k, v in MODELS.items()},
        batches={k: batch_of(k, args.batch, args.quick) for k in MODELS},
        allocators_note=f"as is = C library malloc; glibc tuned = GLIBC_TUNABLES={GLIBC_TUNABLES}; "
                        "our allocator = spikingformer.allocator.configure_allocator()",
        device_note=args.device + (f" ({torch_cuda_name()})" if args.device == "cuda" else ""))
    return dict(releases=releases, rows=rows)


def _summarise(args, contenders, results) -> dict:
    """Per (model, mode, dtype): each contender's median time (``args.clock``), peak and faults, and ours's
    limits (the step's own dense ops, and the dense model's)."""
    cpu = args.clock == "cpu"
    for runs in results.values():
        for r in runs:
            for name in ("limit", "dense_model_limit"):
                if cpu and name in r:
                    r[name] = dict(r[name], seconds=r[name]["cpu_seconds"],
                                   ops=[dict(o, ms=o["cpu_ms"]) for o in r[name]["ops"]])
    rows = {}
    for (key, mode, dtype, cid), runs in results.items():
        row = rows.setdefault((key, mode, dtype), {})
        times = [t for r in runs for t in r["cpu_times" if cpu else "times"]]
        row[cid] = dict(
            median=statistics.median(times),
            peak=statistics.median(r["max_rss"] - r["rss_before"] for r in runs),
            max_rss=max(r["max_rss"] for r in runs),
            faults=statistics.median(r["faults_per_step"] for r in runs),
            **{name: min((r[name] for r in runs if name in r), key=lambda lim: lim["seconds"], default=None)
               for name in ("limit", "dense_model_limit")},
            paired=_paired_efficiency(runs, cpu),
        )
    return rows


def _paired_efficiency(runs: list[dict], cpu: bool) -> dict:
    """Per limit: each replay round's limit over the step timed just before that round, for every round
    of every run (two measurements of one spell of the machine), sorted; empty without a limit."""
    times, rounds = ("paired_cpu_times", "round_cpu_seconds") if cpu else ("paired_times", "round_seconds")
    return {name: sorted(lim / step for r in runs if name in r for lim, step in zip(r[name][rounds], r[times]))
            for name in ("limit", "dense_model_limit")}


def print_profile(args: argparse.Namespace, command: str) -> None:
    """Profile one training step per model and dtype (each in its own process) and print the groups."""
    threads = args.threads or 1
    check_dtypes(args)
    print("# Where a training step's time goes\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(threads)))
    print(f"- torch.profiler, self CPU time of one step after {WARMUP_STEPS} warm-up steps, this project's neurons, "
          f"load average (1 min) {common.load_average():.2f}\n")
    for key in args.models:
        batch = batch_of(key, args.batch)  # the full model: --quick does not apply here
        cols = []
        for dtype in args.dtypes:
            job = dict(kind="profile", model=key, dtype=dtype, threads=threads, batch=batch)
            cols.append((dtype, common.run_worker(__file__, job)))
        labels = [label for label, _ in cols[0][1]["groups"]]
        print(f"{MODELS[key][0]}, batch {batch}:\n")
        print("| operators | " + " | ".join(f"{d} s | {d} %" for d, _ in cols) + " |")
        print("|---|" + "---:|---:|" * len(cols))
        for i, label in enumerate(labels):
            cells = []
            for _, res in cols:
                t, total = res["groups"][i][1], res["groups"][-1][1]
                cells.append(f"{t:.2f} | {t / total:.0%}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()


def _any_worker(job: dict) -> dict:
    """A worker process's result, by the job's kind."""
    if job["kind"] == "profile":
        return dict(groups=profile_step(job["model"], job["dtype"], job["threads"], batch=job["batch"]))
    if job["kind"] == "calibrate":
        return _calibrate_worker(job)
    return _sj_worker(job) if job["kind"] == "sj" else _worker(job)


def main(argv: list[str] | None = None) -> None:
    argv = common.script_argv(argv, _any_worker)
    if argv is None:
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
