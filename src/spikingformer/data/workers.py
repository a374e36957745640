"""DataLoader worker processes, as training, ``eval``, ``audit`` and ``energy`` start them (``--workers``)."""

from __future__ import annotations

import os
import signal
import warnings

from spikingformer.cpu_features import usable_cpus


def loader_workers(requested: int, warn: bool = True) -> int:
    """``--workers``, at most the CPUs this process may use (where PyTorch warns of slowness or a
    freeze); ``warn``: say so when capped (the first process of a torchrun job only)."""
    cpus = usable_cpus()
    if requested > cpus and warn:
        warnings.warn(f"spikingformer: --workers {requested} exceeds the {cpus} CPU(s) this process may use; "
                      f"loading with {cpus}", UserWarning, stacklevel=2)
    return min(requested, cpus)


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ends quietly on SIGTERM, which a batch scheduler sends to every process of
    the job: the main process says what it kept. Killed by the signal instead, it made PyTorch's
    main process print a traceback after that line; ignoring it hung an interpreter that exited on
    an uncaught error, whose workers Python's multiprocessing stops with SIGTERM and then waits for.
    PyTorch's workers leave Ctrl-C to the main process too."""
    signal.signal(signal.SIGTERM, _end_worker)


def _end_worker(signum, frame) -> None:
    os._exit(0)  # at once, with the success status PyTorch does not report as a worker's failure
