"""Start-up time of the ``spikingformer`` command: ``--help``, ``train --help`` and an argument error.

Each case runs ``python -m spikingformer ARGS`` in a fresh process, ``--repeats`` times, and reports the
median wall time, beside the interpreter's own start-up (``python -c pass``) and ``import torch`` for
scale. With ``--baseline-src DIR`` (the ``src`` folder of another checkout, e.g. an older commit) the
same cases run side by side against that code and the ratios are printed.

Usage::

    python benchmarks/startup.py
    python benchmarks/startup.py --baseline-src /tmp/old/src --repeats 7

Not a test: the numbers depend on the machine and its load (docs/performance.md records a run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
CASES = {
    "spikingformer --help": ["-m", "spikingformer", "--help"],
    "spikingformer train --help": ["-m", "spikingformer", "train", "--help"],
    "spikingformer energy --help": ["-m", "spikingformer", "energy", "--help"],
    "spikingformer train --learning-rate 3e-3 (argument error)": ["-m", "spikingformer", "train", "--learning-rate", "3e-3"],
}
REFERENCES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def wall_seconds(args: list[str], src: Path, repeats: int) -> float:
    """Median wall time of ``python ARGS`` with ``src`` first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per case; the median is reported (default: 5)")
    ap.add_argument("--baseline-src", type=Path, help="the src folder of another checkout to time side by side")
    args = ap.parse_args(argv)
    from common import cpu_description

    print("# Start-up time of the spikingformer command\n")
    print(f"Command: `python benchmarks/startup.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip() + "\n")
    print(f"- CPU: {cpu_description()}; load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"- python {sys.version.split()[0]}; median of {args.repeats} fresh processes per case\n")
    baseline = args.baseline_src
    print("| case | this tree (s) |" + (" baseline (s) | baseline / this |" if baseline else ""))
    print("|---|---:|" + ("---:|---:|" if baseline else ""))
    for name, case in {**CASES, **REFERENCES}.items():
        ours = wall_seconds(case, HERE, args.repeats)
        row = f"| {name} | {ours:.2f} |"
        if baseline:
            theirs = wall_seconds(case, baseline, args.repeats)
            row += f" {theirs:.2f} | {theirs / ours:.1f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
