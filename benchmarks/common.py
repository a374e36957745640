"""Helpers shared by the benchmark scripts: the machine, fresh worker processes, memory.

Not part of the installed package: the scripts in this folder import it (``python benchmarks/...``
puts this folder first on ``sys.path``; the tests add it in ``tests/conftest.py``). It imports no
torch at import time, so that a worker can set up the allocator before torch loads.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys


_RESULT_TAG = "@@RESULT "


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
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return rss_bytes()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else max_rss_bytes()

    def synchronize(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_info() -> dict:
    """The CPU as ``/proc/cpuinfo`` describes its first processor: ``model``, ``family`` (its family
    and model numbers), ``flags`` (a list) and ``mhz`` (its clock as the kernel reports it; ``None``
    where absent)."""
    info = dict(model=platform.processor() or platform.machine(), family=None, flags=[], mhz=None)
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        return info
    fields = {}
    for line in lines:
        if not line.strip():
            break  # the first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["model"] = fields.get("model name", info["model"])
    if fields.get("cpu family"):  # e.g. AMD's 25 (Zen 3 and 4) and 26 (Zen 5), where the name says only "AMD EPYC"
        info["family"] = f"family {fields['cpu family']}, model {fields.get('model', '?')}"
    info["flags"] = fields.get("flags", "").split()
    if fields.get("cpu MHz"):
        info["mhz"] = float(fields["cpu MHz"])
    return info


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` (``platform`` and no flags elsewhere)."""
    info = cpu_info()
    return info["model"], info["flags"]


def cpu_description() -> str:
    info = cpu_info()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in info["flags"]) or "?"
    family = f"{info['family']}; " if info["family"] else ""
    return f"{info['model']} ({family}{isa}); {os.cpu_count()} logical cores"


def machine_lines(threads: int, device: str = "cpu") -> list[str]:
    """The report's machine lines: CPU, memory and threads; versions; Triton and the GPU where present."""
    import torch

    from sj_neurons import spikingjelly_version

    libc = " ".join(platform.libc_ver()) or "?"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f"; {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    lines = [
        f"- CPU: {cpu_description()}{mem}; torch threads: {threads}",
        f"- torch {torch.__version__}, spikingjelly {spikingjelly_version()}, python {platform.python_version()}, "
        f"{libc}, {platform.system()} {platform.release()}",
    ]
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return lines


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_worker(script: str, job: dict, env: dict | None = None, timeout: float = 600,
               python: str | None = None) -> dict:
    """Run ``PYTHON SCRIPT --worker JSON`` in a fresh process (``python``: this interpreter unless
    given); return the dict it reports."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [python or sys.executable, os.path.abspath(script), "--worker", json.dumps(job)],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    raise RuntimeError(f"benchmark worker failed ({script}, {job}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def script_argv(argv: list[str] | None, worker) -> list[str] | None:
    """A benchmark script's arguments (``argv``, default ``sys.argv[1:]``); in a worker process
    (``SCRIPT --worker JSON``, see :func:`run_worker`) None, after running ``worker`` on the job and
    reporting its result."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--worker"]:
        return argv
    report(worker(json.loads(argv[1])))
    return None


def report(result: dict) -> None:
    """Send a worker's result to the parent (see :func:`run_worker`)."""
    print(_RESULT_TAG + json.dumps(result), flush=True)


def command(argv: list[str]) -> str:
    """The command line that ran a benchmark script, as its report echoes it."""
    return " ".join([os.path.basename(sys.executable), sys.argv[0], *argv])
