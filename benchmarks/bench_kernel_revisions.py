"""The CPU kernels (BN -> SN [-> max-pool], the plain LIF) of a git revision against the working tree's, side by side.

A change to ``csrc/`` is judged on the zoo models' own map shapes, both libraries in one process:
the library built from the C++ sources of ``--base`` (``git show REV:src/spikingformer/csrc/...``,
compiled as the package compiles its own, cached under its own name) and the working tree's. For
each case both run alternately (one warm-up each) on the same inputs, first checked to give equal
results bit for bit (a change meant only for speed must not change them). The table gives each
one's best wall time, and the median over the rounds of base / working tree: the ratio of two
calls made back to back, which a slow spell of a shared machine moves less than it moves the bests.

Passes: ``infer`` (BN with running statistics, SN, max-pool: inference), ``train`` (the training
forward, BN with the batch's statistics) and ``backward`` (the LIF backward behind a training BN,
with BN's two reductions). ``--models lif``: the plain LIF kernel's forward (``train``) and backward. Usage::

    python benchmarks/bench_kernel_revisions.py --base HEAD --threads 2 --reps 21
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        SPIKINGFORMER_NATIVE_ARCH=x86-64-v3 python benchmarks/bench_kernel_revisions.py   # as an AVX2 CPU
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]

# name, maps (T, B, H, W, C) (token rows: H = rows per image, W = 1), max-pool after the neuron.
# Inference runs the event model's tokenizer maps in pieces of 2 images (batch_pieces), training whole.
CASES = {
    "event": [("stage 1, 128x128x32, pool", (16, 8, 128, 128, 32), True),
              ("stage 2, 64x64x64, pool", (16, 8, 64, 64, 64), True),
              ("stage 3, 32x32x128, pool", (16, 8, 32, 32, 128), True),
              ("stage 4, 16x16x256, pool", (16, 8, 16, 16, 256), True),
              ("MLP tokens, 512 rows x 1024", (16, 8, 64, 1, 1024), False)],
    # the plain LIF kernel (csrc/lif_cpu.cpp) on time-first (T, N) arrays, the neuron benchmark's
    # 2^20 elements per step: pool None ("train" = its forward, "backward" = its backward)
    "lif": [("LIF, T = 4, 2^20 per step", (4, 2**20), None), ("LIF, T = 16, 2^20 per step", (16, 2**20), None)],
    "cifar": [("stage 1, 32x32x48", (4, 16, 32, 32, 48), False),
              ("stage 3, 32x32x192, pool", (4, 16, 32, 32, 192), True),
              ("stage 4, 16x16x384, pool", (4, 16, 16, 16, 384), True),
              ("MLP tokens, 1024 rows x 1536", (4, 16, 64, 1, 1536), False)],
}
INFER_PIECE = {"event": 2}  # images per inference piece (routes' batch_pieces), where the model uses pieces
QUICK = {"small": [("maps 16x40x16, pool", (2, 2, 16, 40, 16), True), ("tokens 32 rows x 64", (2, 2, 16, 1, 64), False),
                   ("LIF, T = 4, 1000 per step", (4, 1000), None)]}
PASSES = ("infer", "train", "backward")


def _show(rev: str, name: str) -> str:
    """``src/spikingformer/<name>`` at revision ``rev``."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/spikingformer/{name}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot read src/spikingformer/{name} at {rev!r} (a git checkout is needed): "
                         f"{proc.stderr.strip()}")
    return proc.stdout


def _source_files(rev: str) -> list[str]:
    """The library's C++ files at ``rev``, in order: its ``cpu_backend.SOURCE_FILE`` and ``SOURCE_FILES``
    (the list grew over time, so the revision's own)."""
    text = _show(rev, "kernels/cpu_backend.py")
    start = text.index("SOURCE_FILE = ")
    end = text.index(")", text.index("SOURCE_FILES = (", start))
    return re.findall(r'"(csrc/\w+\.cpp)"', text[start:end])


def base_library(rev: str):
    """The kernel library built from revision ``rev``'s sources, as one translation unit or, where the
    sources mark their parts (``SF_IN_PART``), in the package's parts."""
    from spikingformer.kernels import cpu_backend as cb
    from spikingformer.native import NativeLibrary

    text = "\n".join(_show(rev, name) for name in _source_files(rev))
    parts = cb.PARTS if "SF_IN_PART" in text else 1
    lib = NativeLibrary("spikingformer_lif_cpu_base", lambda: text, cb.CXX_FLAGS, key=cb._cpu_signature,
                        declare=cb._declare, parts=parts, openmp=True).get()
    if lib is None:
        raise SystemExit(f"the library of {rev} did not build")
    return lib


def case_calls(lib, pass_: str, shape, pool: bool, dtype):
    """A callable running one pass of the kernel of ``lib`` on fixed random maps of ``shape``."""
    import torch

    from spikingformer.kernels import cpu_backend as cb
    from spikingformer.kernels.params import LIFParams

    p = LIFParams()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(dtype)
    if pool is None:  # the plain LIF kernel
        if pass_ == "backward":
            grad = torch.randn(shape, generator=g).to(dtype)
            return lambda: cb.kernel_backward(lib, x, grad, p)
        return lambda: cb.kernel_forward(lib, x, p)
    channels = shape[-1]
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.1
    if pass_ == "infer":
        bn = (torch.randn(channels, generator=g) * 0.1, torch.rand(channels, generator=g) + 0.5, weight, bias, 1e-5)
        return lambda: cb.kernel_lif_pool_forward(lib, x, p, pool, bn)
    flat = x.float().flatten(0, 3)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    if pass_ == "train":
        return lambda: cb.kernel_lif_pool_forward(lib, x, p, pool, (mean, var, weight, bias, 1e-5), batch=True)
    grad = torch.randn(cb.pooled_shape(x) if pool else shape, generator=g).to(dtype)
    terms = (mean, cb.bn_invstd(var, 1e-5, True), weight, bias)

    def backward():
        sums = torch.zeros(2, channels, dtype=torch.float64)
        return cb.kernel_lif_pool_backward(lib, x, grad, p, terms, pool, sums), sums

    return backward


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision whose kernel sources are the baseline (default HEAD)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21, help="alternating rounds per case")
    ap.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="two small cases (a smoke test)")
    args = ap.parse_args(argv)
    from spikingformer import allocator

    allocator.configure_allocator()  # as the package's own runs: no page faults in the timings
    import torch

    from spikingformer.kernels import cpu_backend as cb

    torch.set_num_threads(args.threads)
    base, ours = base_library(args.base), cb.get_library()
    if ours is None:
        raise SystemExit(f"the working tree's library did not build: {cb.build_error()}")
    print(f"# Kernels: {args.base} against the working tree\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- {args.reps} rounds of alternating calls, wall clock; ratio: median over rounds of base / working tree\n")
    print("| case | pass | dtype | equal | base ms | working tree ms | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for model, cases in (QUICK if args.quick else {m: CASES[m] for m in args.models}).items():
        for name, shape, pool in cases:
            for pass_ in args.passes:
                if pool is None and pass_ == "infer":  # the plain LIF kernel's forward is one pass: "train"
                    continue
                run_shape = shape
                if pass_ == "infer" and model in INFER_PIECE and shape[3] > 1:
                    run_shape = (shape[0], INFER_PIECE[model], *shape[2:])
                for dt in args.dtypes:
                    pair = [case_calls(lib, pass_, run_shape, pool, dtypes[dt]) for lib in (base, ours)]
                    equal = _equal(pair[0](), pair[1]())  # also the warm-up
                    times = [[], []]
                    for _ in range(args.reps):
                        for i, fn in enumerate(pair):
                            t0 = time.perf_counter()
                            fn()
                            times[i].append(time.perf_counter() - t0)
                    ratio = statistics.median(a / b for a, b in zip(*times))
                    print(f"| {model} {name} {tuple(run_shape)} | {pass_} | {dt} | {'yes' if equal else 'NO'} | "
                          f"{min(times[0]) * 1e3:.2f} | {min(times[1]) * 1e3:.2f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
