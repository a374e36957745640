"""Training under a container's CPU limit: PyTorch's default thread count against the one the
``spikingformer`` command fits to the cgroup's CPU quota (``cpu_features.usable_cpus``).

A container limited to fewer CPUs than the host has (Docker's ``--cpus``, a Kubernetes CPU limit)
still sees every core, and PyTorch starts a thread per core; the threads then contend for the
quota. This script makes such a limit itself: it creates a cgroup with a CPU quota (Linux, root,
cgroup v1's ``cpu`` controller or v2 with ``cpu`` enabled), runs ``spikingformer train`` on the
embedded digits inside it, alternating two contenders round by round, and prints the times and
their ratio. The contenders differ only in ``OMP_NUM_THREADS``: unset (the command fits its
threads to the quota) or set to the core count (the threads PyTorch would start).

    python benchmarks/bench_cpu_quota.py --cpus 1 --rounds 3     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CGROUP = Path("/sys/fs/cgroup")


def make_cgroup(cpus: float) -> tuple[Path, Path]:
    """A new cgroup limited to ``cpus`` CPUs: ``(its folder, the file a pid is written to)``."""
    name = f"spikingformer-bench-{os.getpid()}"
    period = 100_000
    v1 = CGROUP / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        folder = v1 / name
        folder.mkdir()
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        return folder, folder / "cgroup.procs"
    if "cpu" in (CGROUP / "cgroup.controllers").read_text().split():
        folder = CGROUP / name
        folder.mkdir()
        (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        return folder, folder / "cgroup.procs"
    raise SystemExit("no cgroup CPU controller to write here (needs Linux, root, and cgroup v1's cpu or v2's cpu)")


def run(procs: Path, env: dict, epochs: int, out: str) -> float:
    """Seconds of one ``spikingformer train`` run started inside the cgroup."""
    argv = [sys.executable, "-m", "spikingformer", "train", "--epochs", str(epochs), "--warmup-epochs", "0",
            "--tensorboard", "false", "--output", out, "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: procs.write_text(str(os.getpid())))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=float, default=1.0, help="the cgroup's CPU quota, in CPUs")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each contender, alternating")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the digits recipe per run")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    folder, procs = make_cgroup(args.cpus)
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    contenders = {"threads fitted to the quota (the command's default)": base,
                  f"PyTorch's default, {cores} threads (OMP_NUM_THREADS={cores})": {**base, "OMP_NUM_THREADS": str(cores)}}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.rounds):
                for name, env in contenders.items():
                    times[name].append(run(procs, env, args.epochs, out))
    finally:
        folder.rmdir()
    print("# Training under a cgroup CPU quota\n")
    print(f"Command: `{common.command(argv if argv is not None else sys.argv[1:])}`\n")
    print(f"- CPU: {common.cpu_description()}; quota {args.cpus:g} CPU(s); load average (1 min) {common.load_average():.2f}")
    print(f"- `spikingformer train --epochs {args.epochs}` on the digits, wall clock of the whole command\n")
    print("| contender | median | runs |")
    print("|---|---:|---|")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"| {name} | {medians[name]:.1f} s | {', '.join(f'{t:.1f}' for t in ts)} |")
    fitted, default = medians.values()
    print(f"\nPyTorch's default threads take {default / fitted:.2f}x the fitted threads' time.")


if __name__ == "__main__":
    main()
