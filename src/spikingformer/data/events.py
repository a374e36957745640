"""Event arrays: the dtype every reader returns, and the errors of the file readers.

Events are a numpy structured array of dtype :data:`EVENT_DTYPE` with fields

* ``t`` (int64): timestamp in microseconds,
* ``x`` (int16): column, ``0 <= x < width``,
* ``y`` (int16): row, ``0 <= y < height``,
* ``p`` (uint8): polarity, 0 (OFF, brightness decrease) or 1 (ON, increase).

Build one with :func:`make_events`. Events keep their file order. Coordinates and polarity follow the
recording software's convention for the sensor (jAER's for DVS128 AEDAT 2.0, see
:func:`~spikingformer.data.event_files.read_aedat2`). The readers are in
:mod:`spikingformer.data.event_files`, the integration into frames in :mod:`spikingformer.data.frames`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

EVENT_DTYPE = np.dtype([("t", np.int64), ("x", np.int16), ("y", np.int16), ("p", np.uint8)])
"""Structured dtype of an event array: ``t`` (us, int64), ``x``/``y`` (int16), ``p`` (uint8, 0/1)."""

DVS128_SENSOR = (128, 128)
NMNIST_SENSOR = (34, 34)


class EventFileError(ValueError):
    """An event or label file is malformed (truncated, corrupt header, inconsistent labels).

    The message names the file, the byte offset (where it applies) and what to do about it.
    """


class EventFileWarning(UserWarning):
    """An event file decoded, but not entirely: events outside the sensor were dropped, or it holds none."""


def in_sensor(path: Path, t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, sensor: tuple[int, int],
              what: str) -> np.ndarray:
    """The events with ``0 <= x < width`` and ``0 <= y < height`` (``sensor`` = (height, width)); warns once
    with the count of the others (``what`` says what they are), which are dropped, never folded."""
    height, width = sensor
    keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    dropped = int(keep.size - np.count_nonzero(keep))
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} of {keep.size} events outside the {height}x{width} sensor "
                      f"({what})", EventFileWarning, stacklevel=3)
        t, x, y, p = t[keep], x[keep], y[keep], p[keep]
    if t.size == 0:
        warnings.warn(f"{path}: the recording holds no events; its frames will be all zero", EventFileWarning,
                      stacklevel=3)
    return make_events(t, x, y, p)


def make_events(t: np.ndarray | list, x: np.ndarray | list, y: np.ndarray | list,
                p: np.ndarray | list) -> np.ndarray:
    """Build an event array of dtype :data:`EVENT_DTYPE` from four equal-length 1-D sequences.

    Args:
        t: timestamps in microseconds, shape (N,).
        x: columns, shape (N,).
        y: rows, shape (N,).
        p: polarities 0/1 (bools accepted), shape (N,).

    Returns:
        Structured array of shape (N,).
    """
    t, x, y, p = (np.asarray(a).reshape(-1) for a in (t, x, y, p))
    n = t.shape[0]
    if not (x.shape[0] == y.shape[0] == p.shape[0] == n):
        raise ValueError(f"make_events: t, x, y, p must have equal lengths, got {n}, {x.shape[0]}, "
                         f"{y.shape[0]}, {p.shape[0]}")
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["t"] = t
    ev["x"] = x
    ev["y"] = y
    ev["p"] = p
    return ev


__all__ = ["EVENT_DTYPE", "DVS128_SENSOR", "NMNIST_SENSOR", "EventFileError", "EventFileWarning", "in_sensor",
           "make_events"]
