"""DataLoader worker processes, as training, ``eval``, ``audit`` and ``energy`` start them (``--workers``)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
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
    PyTorch's workers leave Ctrl-C to the main process too. Nor does a worker print the error of a
    batch's hand-over that the main process dropped on its way out (:func:`_quiet_hand_over`)."""
    signal.signal(signal.SIGTERM, _end_worker)
    sys.excepthook = _quiet_hand_over(sys.excepthook)


def _end_worker(signum, frame) -> None:
    os._exit(0)  # at once, with the success status PyTorch does not report as a worker's failure


def _quiet_hand_over(excepthook):
    """``excepthook`` but for a connection error in multiprocessing's resource sharer, the thread
    through which a worker hands a batch's shared memory to the main process: the main process closed
    the connection mid-transfer (SIGTERM to the whole job reaches it while it fetches a batch), and
    the traceback the thread printed came after the main process's last line (once in about ten such
    terminations, seen in CI). Whatever the main process needed, its own error says."""
    def hook(exc_type, exc, tb) -> None:
        frames = traceback.extract_tb(tb)
        if issubclass(exc_type, (ConnectionError, EOFError)) and frames and frames[0].filename.endswith(
                os.path.join("multiprocessing", "resource_sharer.py")):
            return
        excepthook(exc_type, exc, tb)

    return hook
