"""Progress bars: tqdm on standard error, cleared when done. On a terminal a bar is redrawn twice a
second; written into a file or a pipe (a batch job's log) at most once a minute, so that the log of
a long run stays small (a CIFAR epoch on a CPU takes about half an hour: 3,600 redraws otherwise)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

TERMINAL_REFRESH_S = 0.5
LOG_REFRESH_S = 60.0


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             disable: bool = False):
    """A ``tqdm`` bar over ``iterable`` (or updated by hand up to ``total``); use it in a ``with`` block,
    so that it is closed however the loop ends."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=TERMINAL_REFRESH_S if terminal else LOG_REFRESH_S)
