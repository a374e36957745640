"""Helpers shared by the model and scaling benchmarks: fresh worker processes, memory, the machine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys

import torch
from torch import nn

from spikingformer.neuron import MultiStepLIF

_RESULT_TAG = "@@RESULT "


def spikingjelly_version() -> str:
    try:
        return importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryProbe:
    """Current / peak memory and a clock barrier for one device: the process's resident set on the
    CPU, the CUDA caching allocator's allocated bytes on a GPU (whose kernels run asynchronously, so
    timings wait for them with ``synchronize``)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return rss_bytes()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else max_rss_bytes()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_description() -> str:
    model = platform.processor() or platform.machine()
    isa = "?"
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        model = next(line for line in lines if line.startswith("model name")).split(":", 1)[1].strip()
        flags = next(line for line in lines if line.startswith("flags")).split()
        isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except (OSError, StopIteration):
        pass
    return f"{model} ({isa}); {os.cpu_count()} logical cores"


def machine_lines(threads: int) -> list[str]:
    libc = " ".join(platform.libc_ver()) or "?"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f"; {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return [
        f"- CPU: {cpu_description()}{mem}; torch threads: {threads}",
        f"- torch {torch.__version__}, spikingjelly {spikingjelly_version()}, python {platform.python_version()}, "
        f"{libc}, {platform.system()} {platform.release()}",
    ]


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_worker(module: str, job: dict, env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``python -m module --worker JSON`` in a fresh process; return the dict it reports."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(job)],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    raise RuntimeError(f"benchmark worker failed ({module}, {job}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def report(result: dict) -> None:
    """Send a worker's result to the parent (see :func:`run_worker`)."""
    print(_RESULT_TAG + json.dumps(result), flush=True)


def spikingjelly_backend(device: str) -> str:
    """SpikingJelly's fastest multi-step LIF backend for ``device``: ``cupy`` on CUDA when CuPy
    imports (the authors' choice), else ``torch``."""
    if device == "cuda":
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "torch"
        return "cupy"
    return "torch"


class SpikingJellyLIF(nn.Module):
    """SpikingJelly's multi-step LIF (``MultiStepLIFNode``, torch backend) in place of ours.

    Same tau, threshold, reset and surrogate as the :class:`MultiStepLIF` it replaces; it keeps
    its membrane between calls, so ``spikingjelly...functional.reset_net(model)`` must run after
    every batch (:func:`reset_spikingjelly`), as in the authors' training loops.
    """

    def __init__(self, lif: MultiStepLIF, backend: str = "torch") -> None:
        super().__init__()
        p = lif.params
        try:  # 0.0.0.0.12 - 0.0.0.0.14, the releases the authors' code runs on
            from spikingjelly.clock_driven import neuron, surrogate

            self.node = neuron.MultiStepLIFNode(
                tau=p.tau, v_threshold=p.v_threshold, v_reset=p.v_reset, detach_reset=p.detach_reset,
                surrogate_function=surrogate.Sigmoid(alpha=p.alpha), backend=backend,
            )
        except ImportError:  # newer releases; 2.x has no backend argument (it picks by device)
            import inspect

            from spikingjelly.activation_based import neuron, surrogate

            extra = {"backend": backend} if "backend" in inspect.signature(neuron.LIFNode).parameters else {}
            self.node = neuron.LIFNode(
                tau=p.tau, v_threshold=p.v_threshold, v_reset=p.v_reset, detach_reset=p.detach_reset,
                surrogate_function=surrogate.Sigmoid(alpha=p.alpha), step_mode="m", **extra,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.node(x)


def use_spikingjelly_neurons(model: nn.Module, backend: str = "torch") -> int:
    """Replace every :class:`MultiStepLIF` in ``model`` by :class:`SpikingJellyLIF`; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, MultiStepLIF)]
    for parent, name, child in swaps:
        setattr(parent, name, SpikingJellyLIF(child, backend))
    return len(swaps)


def reset_spikingjelly(model: nn.Module) -> None:
    """``functional.reset_net(model)``: clear the membranes SpikingJelly's neurons keep between calls."""
    try:
        from spikingjelly.clock_driven import functional
    except ImportError:
        from spikingjelly.activation_based import functional
    functional.reset_net(model)
