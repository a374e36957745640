"""The fused CPU LIF kernel, built for AVX2 and AVX-512, against today's CPU LIF neurons, side by side.

Forward + backward of one multi-step LIF layer on ``T x N`` float32 elements (default 1e6 in
total, T = 4 and 16), on one and two threads, timed by wall clock and by process CPU time (all
threads of this process; on a shared machine the CPU time is the steadier figure). Every row
computes the same neuron (tau = 2, V_th = 1, V_reset = 0, sigmoid surrogate with alpha = 4):

* ours: the ``spikingformer::lif`` operator (``-march=native`` build), and the same C++ source
  built with ``-march=x86-64-v3`` (AVX2) and ``-march=x86-64-v4`` (AVX-512) behind the same
  autograd;
* SpikingJelly 2.0 ``LIFNode(step_mode="m")``: on CPU tensors it dispatches to its registered
  operator ``sj_lif`` (a loop of torch ops), its only (and so fastest) CPU path;
* SpikingJelly 0.0.0.0.12 ``MultiStepLIFNode(backend="torch")`` (the authors' pin; its cupy
  backend is CUDA-only): run by this script in a subprocess with another Python (``--sj012-python``,
  a virtual environment where it is installed), on the same inputs;
* snnTorch ``Leaky(beta=1 - 1/tau, reset_mechanism="zero", spike_grad=sigmoid(slope=alpha))`` fed
  ``X / tau``: its membrane is our charged ``H`` (``H[t] = beta (1 - S[t-1]) H[t-1] + X[t] / tau``,
  reset detached as ours with ``detach_reset=True``); it fires on ``H - V_th > 0`` (ours ``>= 0``);
* Norse ``LIFBoxCell`` (looped over T) with ``dt = 1``, ``tau_mem_inv = 1/tau``, ``v_leak = 0``, ``method="tanh"``,
  ``alpha = alpha / 2``: the same charge (``V + (X - V) / tau``), and ``d/dx (1 + tanh(2x)) / 2``
  is exactly ``4 sig(4x) (1 - sig(4x))``; its reset is not detached, so it is compared with ours
  at ``detach_reset=False``; it fires on ``> 0``.

Before timing, each peer's spikes are compared with ours on the benchmark input (count of
differing spikes; snnTorch rounds the charge differently, ``beta*V + X/tau`` instead of
``V + (X - V)/tau``, so a few spikes on the threshold may differ) and its input gradient (max
abs difference).

On a GPU (``--device cuda``) the rows are our Triton kernel (through the same operator) and the
peers on CUDA tensors, where SpikingJelly 2.0 picks its own CUDA/Triton kernel automatically.

Fresh 4 MB tensors are page-faulted in anew on every call under glibc's default ``mmap`` threshold,
a cost of the allocator rather than of any neuron; raising the threshold in the environment (as in
the usage line) removes it for every row alike, the worker included.

Usage::

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000 \
        python benchmarks/bench_lif_peers.py --sj012-python /path/to/venv/bin/python
    python benchmarks/bench_lif_peers.py --device cuda --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from common import cpu_description

TAU, VTH, ALPHA = 2.0, 1.0, 4.0
DEVICE = torch.device("cpu")  # --device


def make_inputs(T: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * T + 7)
    x = torch.randn(T, total // T, generator=gen) * 1.5 + 0.8
    g = torch.randn(T, total // T, generator=gen)
    return x.to(DEVICE), g.to(DEVICE)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median (wall ms, process CPU ms) of forward+backward over ``reps`` calls after a warm-up."""
    xg = x.detach().requires_grad_(True)

    def call() -> None:
        xg.grad = None
        fn(xg).backward(g)
        sync()

    call()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def outputs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.detach().requires_grad_(True)
    s = fn(xg)
    (gx,) = torch.autograd.grad(s, xg, g)
    return s.detach(), gx


# ------------------------------------------------------------------------------- the peers ----

def sj_neuron() -> Callable[[torch.Tensor], torch.Tensor]:
    """SpikingJelly's multi-step LIF, whatever its release (0.0.0.0.12 in the worker, 2.x here)."""
    from sj_neurons import spikingjelly_function

    return spikingjelly_function(DEVICE, tau=TAU, v_threshold=VTH, alpha=ALPHA, detach_reset=True)


def snntorch_neuron() -> Callable[[torch.Tensor], torch.Tensor]:
    import snntorch as snn
    from snntorch import surrogate

    leaky = snn.Leaky(beta=1.0 - 1.0 / TAU, threshold=VTH, reset_mechanism="zero", spike_grad=surrogate.sigmoid(slope=ALPHA)).to(DEVICE)

    def run(x: torch.Tensor) -> torch.Tensor:
        current = x * (1.0 / TAU)
        mem = torch.zeros_like(current[0])  # V[-1] = V_reset = 0, on the input's device
        spikes = []
        for t in range(x.shape[0]):
            spk, mem = leaky(current[t], mem)
            spikes.append(spk)
        return torch.stack(spikes)

    return run


def norse_neuron() -> Callable[[torch.Tensor], torch.Tensor]:
    from norse.torch import LIFBoxCell, LIFBoxParameters

    def t(v: float) -> torch.Tensor:
        return torch.tensor(v, device=DEVICE)

    p = LIFBoxParameters(tau_mem_inv=t(1.0 / TAU), v_leak=t(0.0), v_th=t(VTH), v_reset=t(0.0), method="tanh", alpha=ALPHA / 2)
    cell = LIFBoxCell(p, dt=1.0)  # Norse 1.1 has the single-step cell only: loop over T, as its docs do

    def run(x: torch.Tensor) -> torch.Tensor:
        state, spikes = None, []
        for t in range(x.shape[0]):
            z, state = cell(x[t], state)
            spikes.append(z)
        return torch.stack(spikes)

    return run


def sj012_worker(args: argparse.Namespace) -> None:
    """Runs in the SpikingJelly 0.0.0.0.12 environment: times it, saves its outputs, prints JSON."""
    fn = sj_neuron()
    rows = []
    for T in args.T:
        x, g = make_inputs(T, args.elements)
        s, gx = outputs(fn, x, g)
        torch.save({"spikes": s.cpu(), "grad": gx.cpu()}, Path(args.worker_out) / f"sj012_T{T}.pt")
        for threads in args.threads:
            torch.set_num_threads(threads)
            best = min((time_fwd_bwd(fn, x, g, args.reps) for _ in range(args.rounds)), key=lambda r: r[1])
            rows.append({"T": T, "threads": threads, "wall_ms": best[0], "cpu_ms": best[1]})
    from sj_neurons import spikingjelly_version

    print(json.dumps({"version": spikingjelly_version(), "torch": torch.__version__, "rows": rows}))


# --------------------------------------------------------------------------------- ours ----

def ours_per_isa() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Our operator (native build) and the same kernel built for AVX2 and AVX-512, where this CPU runs them."""
    from spikingformer.kernels import cpu_backend as cpu
    from spikingformer.neuron import LIFParams, multistep_lif

    p = LIFParams(tau=TAU, v_threshold=VTH, alpha=ALPHA, detach_reset=True)
    if DEVICE.type == "cuda":
        return {"ours (MultiStepLIF: Triton)": lambda x: multistep_lif(x, p)}
    impls = {"ours (MultiStepLIF, -march=native)": lambda x: multistep_lif(x, p, backend="cpu")}
    for march, need, label in (("x86-64-v3", "avx2", "AVX2"), ("x86-64-v4", "avx512", "AVX-512")):
        # the CPUID as PyTorch reads it (an emulator's /proc/cpuinfo lists the host's flags)
        if not getattr(torch.cpu, f"_is_{need}_supported")():
            print(f"- skipping the {label} build: this CPU lacks {need}")
            continue
        lib = cpu.native_library(march).get()
        if lib is None:
            print(f"- skipping the {label} build: {cpu.native_library(march).error}")
            continue

        class IsaLIF(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, lib=lib):
                ctx.save_for_backward(x)
                return cpu.kernel_forward(lib, x, p)

            @staticmethod
            def backward(ctx, grad, lib=lib):
                (x,) = ctx.saved_tensors
                return cpu.kernel_backward(lib, x, grad, p)

        impls[f"ours ({label}, -march={march})"] = IsaLIF.apply
    return impls


def ours_reference(detach_reset: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    from spikingformer.neuron import LIFParams, multistep_lif

    p = LIFParams(tau=TAU, v_threshold=VTH, alpha=ALPHA, detach_reset=detach_reset)
    return lambda x: multistep_lif(x, p)


def tie_mask(x: torch.Tensor) -> torch.Tensor:
    """Where our charged membrane is exactly at threshold (ours fires there, ``> 0`` peers do not)."""
    from spikingformer.neuron import LIFParams, lif_membrane_reference

    h, _ = lif_membrane_reference(x, LIFParams(tau=TAU, v_threshold=VTH, alpha=ALPHA))
    return h == VTH


def run_sj012(args: argparse.Namespace, out_dir: str) -> dict | None:
    if not args.sj012_python:
        return None
    cmd = [args.sj012_python, __file__, "--worker-out", out_dir, "--device", str(DEVICE), "--elements", str(args.elements), "--reps", str(args.reps),
           "--rounds", str(args.rounds), "--T", *map(str, args.T), "--threads", *map(str, args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        print(f"- SpikingJelly 0.0.0.0.12 run failed: {proc.stderr.strip()[-500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=10**6, help="T x N per call")
    ap.add_argument("--T", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over all rows; the lowest CPU-time median is kept")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sj012-python", help="a Python with spikingjelly==0.0.0.0.12 and the same torch")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)  # internal: the SpikingJelly 0.0.0.0.12 worker
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.worker_out:
        sj012_worker(args)
        return

    import importlib.metadata as md

    load0 = os.getloadavg()
    print("# Multi-step LIF, forward+backward: ours per ISA against today's CPU peers\n")
    print(f"Command: `python benchmarks/bench_lif_peers.py {' '.join(sys.argv[1:])}`\n")
    print(f"- CPU: {cpu_description()}; torch {torch.__version__}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    print(f"- allocator environment (inherited by the SpikingJelly 0.0.0.0.12 worker): {malloc or 'glibc defaults'}")
    if DEVICE.type == "cuda":
        print(f"- GPU: {torch.cuda.get_device_name(DEVICE)} (wall time is the figure; CPU time is the host's)")
    versions = {}
    for pkg in ("spikingjelly", "snntorch", "norse"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    print("- peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))

    impls = ours_per_isa()
    peers: dict[str, tuple[Callable, bool]] = {}  # label -> (fn, detach_reset of the matching ours)
    if versions["spikingjelly"] and versions["spikingjelly"].startswith("2."):
        peers[f"SpikingJelly {versions['spikingjelly']} LIFNode (sj_lif operator)"] = (sj_neuron(), True)
    if versions["snntorch"]:
        peers[f"snnTorch {versions['snntorch']} Leaky"] = (snntorch_neuron(), True)
    if versions["norse"]:
        peers[f"Norse {versions['norse']} LIFBoxCell"] = (norse_neuron(), False)

    with tempfile.TemporaryDirectory() as out_dir:
        sj012 = run_sj012(args, out_dir)
        print("\nSame neuron? Each peer's spikes and input gradient against ours on the benchmark input:\n")
        print("| peer | T | spikes differing | of which at H == V_th exactly | max abs grad difference |")
        print("|---|---:|---:|---:|---:|")
        for T in args.T:
            x, g = make_inputs(T, args.elements)
            at_threshold = tie_mask(x)
            for label, (fn, detach) in peers.items():
                s, gx = outputs(fn, x, g)
                s_ours, gx_ours = outputs(ours_reference(detach), x, g)
                diff = s != s_ours
                print(f"| {label} | {T} | {int(diff.sum())} of {s.numel()} | {int((diff & at_threshold).sum())} | "
                      f"{(gx - gx_ours).abs().max().item():.2e} |")
            if sj012:
                ref = {k: v.to(DEVICE) for k, v in torch.load(Path(out_dir) / f"sj012_T{T}.pt").items()}
                s_ours, gx_ours = outputs(ours_reference(True), x, g)
                diff = ref["spikes"] != s_ours
                print(f"| SpikingJelly {sj012['version']} MultiStepLIFNode (torch) | {T} | "
                      f"{int(diff.sum())} of {s_ours.numel()} | {int((diff & at_threshold).sum())} | "
                      f"{(ref['grad'] - gx_ours).abs().max().item():.2e} |")

    results: dict[tuple, tuple[float, float]] = {}
    all_impls = {**impls, **{k: v[0] for k, v in peers.items()}}
    for _ in range(args.rounds):
        for T in args.T:
            x, g = make_inputs(T, args.elements)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for label, fn in all_impls.items():
                    wall, cpu_ms = time_fwd_bwd(fn, x, g, args.reps)
                    key = (label, T, threads)
                    if key not in results or cpu_ms < results[key][1]:
                        results[key] = (wall, cpu_ms)
    if sj012:
        for row in sj012["rows"]:
            results[(f"SpikingJelly {sj012['version']} MultiStepLIFNode (torch)", row["T"], row["threads"])] = (row["wall_ms"], row["cpu_ms"])

    labels = list(dict.fromkeys(k[0] for k in results))
    ours_labels = [lb for lb in labels if lb.startswith("ours")]
    peer_labels = [lb for lb in labels if not lb.startswith("ours")]
    print(f"\nForward+backward, {args.elements:.0e} float32 elements per call; median of {args.reps} calls, "
          f"best of {args.rounds} rounds; CPU = process CPU time (all threads). "
          "'x fastest peer' = the fastest peer's time / this row's (CPU time; wall in brackets).\n")
    print("| T | threads | implementation | wall ms | CPU ms | x fastest peer |")
    print("|---:|---:|---|---:|---:|---:|")
    for T in args.T:
        for threads in args.threads:
            rows = [(lb, results[(lb, T, threads)]) for lb in labels if (lb, T, threads) in results]
            peer_rows = [r for lb, r in rows if lb in peer_labels]
            best_cpu = min((r[1] for r in peer_rows), default=None)
            best_wall = min((r[0] for r in peer_rows), default=None)
            for lb, (wall, cpu_ms) in rows:
                ratio = f"{best_cpu / cpu_ms:.1f}x ({best_wall / wall:.1f}x)" if best_cpu and lb in ours_labels else ""
                print(f"| {T} | {threads} | {lb} | {wall:.2f} | {cpu_ms:.2f} | {ratio} |")
    print(f"\nLoad average (1, 5, 15 min) at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
