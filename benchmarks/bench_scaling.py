"""Scaling benchmark: training-step time and peak memory vs T, batch size and resolution (2-256 event model).

The benchmark lives in :mod:`spikingformer.benchmarking.scaling` (``spikingformer bench --what
scaling`` runs it from an installed package); this script is its command-line entry point.

Usage::

    python benchmarks/bench_scaling.py            # table on stdout, plots to docs/img/scaling_*.png
    python benchmarks/bench_scaling.py --quick    # tiny model, two points per factor, no plots
"""

from spikingformer.benchmarking.scaling import main

if __name__ == "__main__":
    main()
