"""Model benchmark: Spikingformer with this project's neurons against the same model with SpikingJelly's.

The benchmark lives in :mod:`spikingformer.benchmarking.model` (so that ``spikingformer bench
--what model`` runs it from an installed package); this script is its command-line entry point.

Usage::

    python benchmarks/bench_model.py                       # both models (~5 min on 2 idle cores)
    python benchmarks/bench_model.py --models event --steps 5
    python benchmarks/bench_model.py --quick               # tiny sizes, a smoke test
    python benchmarks/bench_model.py --profile --threads 1 # where a training step's time goes

Outputs a markdown report on stdout (pasted into docs/performance.md); progress goes to stderr.
"""

from spikingformer.benchmarking.model import main

if __name__ == "__main__":
    main()
