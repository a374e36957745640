"""Build time of the fused CPU kernel library: its parts compiled at once against one translation unit.

Each round builds the library (``spikingformer.kernels.cpu_backend``'s source and flags) into fresh
temporary folders, once as ``cpu_backend.PARTS`` translation units compiled side by side and then
linked (what the package does on first use) and once as a single translation unit (``parts=1``),
the two interleaved, then checks that both builds export the same functions. It prints each
round's wall times, the medians and their ratio.

Usage::

    python benchmarks/bench_build.py
    python benchmarks/bench_build.py --rounds 3 --march x86-64-v3

Not a test: the times depend on the machine's cores and load (docs/performance.md records a run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common  # noqa: E402
from spikingformer.kernels import cpu_backend  # noqa: E402
from spikingformer.native import NativeLibrary  # noqa: E402


def build_seconds(parts: int, march: str) -> tuple[float, set[str]]:
    """Wall time of one build with ``parts`` translation units, and the ``sf_`` functions it exports."""
    template = cpu_backend.native_library(march)
    lib = NativeLibrary(template.name, cpu_backend.source, template.flags, parts=parts, openmp=template.openmp)
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = lib.compile(Path(tmp))
        symbols = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if line.split()[-1].startswith("sf_")}
    return lib.build_seconds, exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--march", default="native", help="-march of both builds (default: native)")
    args = parser.parse_args()
    print(f"Command: `python benchmarks/bench_build.py {' '.join(sys.argv[1:])}`")
    print(f"machine: {common.cpu_description()}, load average {os.getloadavg()[0]:.1f}; -march={args.march}")
    times: dict[int, list[float]] = {cpu_backend.PARTS: [], 1: []}
    exports = {}
    for r in range(args.rounds):
        for parts in times:
            seconds, exports[parts] = build_seconds(parts, args.march)
            times[parts].append(seconds)
            print(f"round {r + 1}: {parts} part(s): {seconds:.1f} s", flush=True)
    if exports[cpu_backend.PARTS] != exports[1]:
        raise SystemExit(f"the builds export different functions: {sorted(exports[cpu_backend.PARTS] ^ exports[1])}")
    split, whole = (statistics.median(times[p]) for p in (cpu_backend.PARTS, 1))
    print(f"\n| build | median s |\n|---|---:|\n| {cpu_backend.PARTS} parts at once, then a link | {split:.1f} |\n"
          f"| one translation unit | {whole:.1f} |\n\none unit / parts: {whole / split:.2f}x "
          f"(both export the same {len(exports[1])} functions)")


if __name__ == "__main__":
    main()
