"""Progress bars: tqdm on standard error, cleared when done. On a terminal a bar is redrawn twice a
second; written into a file or a pipe (a batch job's log) at most once a minute, so that the log of
a long run stays small (a CIFAR epoch on a CPU takes about half an hour: 3,600 redraws otherwise).
While a bar is drawn, a warning stands on a line of its own (:func:`line_start`), in a script as under
the command."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable

TERMINAL_REFRESH_S = 0.5
LOG_REFRESH_S = 60.0
_drawn: list[bool] = []  # the bars drawn in this process (a DataLoader worker inherits its parent's): on a terminal?


@contextlib.contextmanager
def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             disable: bool = False):
    """A ``tqdm`` bar over ``iterable`` (or updated by hand up to ``total``) for a ``with`` block, closed
    however the block ends."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    with tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True,
              file=sys.stderr, mininterval=TERMINAL_REFRESH_S if terminal else LOG_REFRESH_S) as bar:
        if not disable:
            _drawn.append(terminal)
            outermost = len(_drawn) == 1
            if outermost:
                formatter = warnings.formatwarning
                warnings.formatwarning = _on_own_line(formatter)
        try:
            yield bar
        finally:
            if not disable:
                _drawn.pop()
                if outermost and getattr(warnings.formatwarning, "wrapped", None) is formatter:
                    warnings.formatwarning = formatter  # unless the block set a formatter of its own


def line_start() -> str:
    """What a line written to standard error starts with so that it stands on a line of its own while a
    bar is drawn there: on a terminal it replaces the bar (redrawn at its next update), in a log it
    ends the bar's line; nothing while no bar is drawn."""
    if not _drawn:
        return ""
    return "\r\033[K" if _drawn[-1] else "\n"


def _on_own_line(formatter):
    """``warnings.formatwarning`` ``formatter`` with :func:`line_start` before each warning."""

    def format_on_own_line(message, category, filename, lineno, line=None) -> str:
        return line_start() + formatter(message, category, filename, lineno, line)

    format_on_own_line.wrapped = formatter
    return format_on_own_line
