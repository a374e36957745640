"""Multi-step LIF neuron benchmark: this project's backends against SpikingJelly, side by side.

The benchmark lives in :mod:`spikingformer.benchmarking.lif` (so that ``spikingformer bench --what
neuron`` runs it from an installed package); this script is its command-line entry point.

Usage::

    python benchmarks/bench_lif.py                 # full run (< 5 min on 2 CPU cores)
    python benchmarks/bench_lif.py --quick         # 1e5 and 1e6 elements only
    python benchmarks/bench_lif.py --clock cpu     # one thread, CPU time: robust on a busy machine
    python benchmarks/bench_lif.py --device cuda   # GPU only (adds the Triton backend)

Outputs a markdown table on stdout (pasted into docs/performance.md).
"""

from spikingformer.benchmarking.lif import main

if __name__ == "__main__":
    main()
