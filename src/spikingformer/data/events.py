"""Event-camera (DVS) file readers and event-to-frame integration, in vectorised numpy.

Events are a numpy structured array of dtype :data:`EVENT_DTYPE` with fields

* ``t`` (int64): timestamp in microseconds,
* ``x`` (int16): column, ``0 <= x < width``,
* ``y`` (int16): row, ``0 <= y < height``,
* ``p`` (uint8): polarity, 0 (OFF, brightness decrease) or 1 (ON, increase).

Build one with :func:`make_events`. Events keep their file order. Coordinates and polarity follow the
recording software's convention for the sensor (jAER's for DVS128 AEDAT 2.0, see :func:`read_aedat2`).

Readers
    :func:`read_aedat2` (AEDAT 2.0, the container of the original CIFAR10-DVS files and of jAER DVS128
    recordings), :func:`remap_cifar10dvs` (the authors'/SpikingJelly's CIFAR10-DVS remapping),
    :func:`read_aedat31` (DVS128 Gesture, AEDAT 3.1 packets), :func:`read_gesture_labels` and
    :func:`split_gesture_segments` (the gesture ``*_labels.csv`` files), :func:`read_nmnist` (N-MNIST
    ``.bin``/``.bs2``). A malformed file raises :class:`EventFileError` naming the file and the byte offset.
    Events outside the sensor (special/sync addresses, corrupt records) are dropped with one
    :class:`EventFileWarning` per file giving their count, never folded into the frame; a recording
    with no events gives an :class:`EventFileWarning` too. The readers' behaviour on damaged files is
    fuzzed (``tests/test_event_fuzz.py``): they raise :class:`EventFileError` or decode.

Frame integration
    :func:`integrate_frames_by_count` (SpikingJelly's ``integrate_events_by_fixed_frames_number`` with
    ``split_by='number'``, as used by the Spikingformer authors) and :func:`integrate_frames_by_time`
    (``split_by='time'``). Both return float32 ``(T, 2, H, W)`` per-pixel event counts, channel 0 holding the
    p=0 events and channel 1 the p=1 events.
"""

from __future__ import annotations

import csv
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

EVENT_DTYPE = np.dtype([("t", np.int64), ("x", np.int16), ("y", np.int16), ("p", np.uint8)])
"""Structured dtype of an event array: ``t`` (us, int64), ``x``/``y`` (int16), ``p`` (uint8, 0/1)."""

GESTURE_LABEL_DTYPE = np.dtype([("label", np.int64), ("start", np.int64), ("end", np.int64)])
"""Structured dtype of :func:`read_gesture_labels`: label 0..10, segment [start, end) in microseconds."""

DVS128_SENSOR = (128, 128)
NMNIST_SENSOR = (34, 34)

_AEDAT2_MAGIC = b"#!AER-DAT2.0"
_AEDAT31_END = b"#!END-HEADER\r\n"
_AEDAT31_PACKET_HEADER = struct.Struct("<HHIIIIII")  # 28 bytes
_AEDAT31_POLARITY_EVENT = 1
_NMNIST_OVERFLOW_Y = 240  # y value of the timestamp-overflow marker of Orchard's ATIS files


class EventFileError(ValueError):
    """An event or label file is malformed (truncated, corrupt header, inconsistent labels).

    The message names the file, the byte offset (where it applies) and what to do about it.
    """


class EventFileWarning(UserWarning):
    """An event file decoded, but not entirely: events outside the sensor were dropped, or it holds none."""


def _in_sensor(path: Path, t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, sensor: tuple[int, int],
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


# ----------------------------------------------------------------------------------------------------------------
# AEDAT 2.0


def _skip_hash_header(data: bytes) -> int | None:
    """The offset of the first byte after the leading '#' header lines of ``data``; None when the data ends
    inside a header line (no closing newline)."""
    pos = 0
    n = len(data)
    while pos < n and data[pos:pos + 1] == b"#":
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        pos = nl + 1
    return pos


_DVS128_PIXEL_BITS = 0x7FFF  # y (bits 8-14), x (bits 1-7), polarity (bit 0); bit 15 marks jAER sync events


def read_aedat2(path: PathLike) -> np.ndarray:
    """Read a jAER AEDAT 2.0 file of a DVS128 (128x128) sensor, e.g. an original CIFAR10-DVS recording.

    Layout: ASCII header lines starting with ``#`` (the first one ``#!AER-DAT2.0``), then big-endian uint32
    pairs (address, timestamp in us). The address is decoded as jAER's ``DVS128.Extractor`` does:
    x = 127 - ((a >> 1) & 0x7F) (jAER flips x), y = (a >> 8) & 0x7F, and p = 1 - (a & 1) (the sensor signals
    ON with address bit 0 = 0; jAER's extractor flips it so that 1 is ON, as :data:`EVENT_DTYPE`).
    Addresses with bit 15 or any higher bit set are not pixel events (jAER: external-input sync events,
    special events): they are dropped with an :class:`EventFileWarning` giving their count.
    CIFAR10-DVS needs :func:`remap_cifar10dvs` on top.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: missing ``#!AER-DAT2.0`` header, a file that ends inside its header, or a data
            section whose size is not a multiple of 8 bytes (truncated file).
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_AEDAT2_MAGIC):
        raise EventFileError(
            f"{path}: missing AEDAT 2.0 header: the file must start with '#!AER-DAT2.0' "
            f"(found {data[:16]!r}); is it an AEDAT 3.1 file (use read_aedat31) or not an AEDAT file?")
    start = _skip_hash_header(data)
    if start is None:
        raise EventFileError(
            f"{path}: truncated AEDAT 2.0 file: it ends inside its '#' header (byte offset {len(data)}, no "
            f"closing newline), before any event. Re-copy or re-download the file.")
    payload = len(data) - start
    if payload % 8:
        good = start + (payload // 8) * 8
        raise EventFileError(
            f"{path}: truncated AEDAT 2.0 file: the event data from byte offset {start} has {payload} bytes, "
            f"not a multiple of the 8-byte (address, timestamp) record; the last complete record ends at byte "
            f"offset {good} ({len(data) - good} trailing bytes). Re-copy or re-download the file.")
    words = np.frombuffer(data, dtype=">u4", offset=start)
    addr = words[0::2].astype(np.int64)
    ts = words[1::2].astype(np.int64)
    pixel = (addr & ~_DVS128_PIXEL_BITS) == 0
    x = np.where(pixel, 127 - ((addr >> 1) & 0x7F), -1)  # -1: outside the sensor, dropped with a count
    return _in_sensor(path, ts, x, (addr >> 8) & 0x7F, 1 - (addr & 1), DVS128_SENSOR,
                      "addresses with bit 15 or higher set: jAER sync/special events, not pixels")


def remap_cifar10dvs(events: np.ndarray) -> np.ndarray:
    """Apply the CIFAR10-DVS remapping of SpikingJelly (used by the Spikingformer authors).

    On the raw address fields SpikingJelly's ``load_origin_data`` (``spikingjelly/datasets/cifar10_dvs.py``)
    maps x' = 127 - y_raw, y' = 127 - x_raw, p' = 1 - p_raw, turning the recordings upright. On events in
    jAER's convention from :func:`read_aedat2` (x = 127 - x_raw, p = 1 - p_raw) the same mapping reads
    x' = 127 - y, y' = x, p' = p, which this function applies: the result equals SpikingJelly's, event for
    event.

    Args:
        events: events of dtype :data:`EVENT_DTYPE` read by :func:`read_aedat2`, shape (N,).

    Returns:
        A new event array, shape (N,).
    """
    out = events.copy()
    out["x"] = 127 - events["y"]
    out["y"] = events["x"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# AEDAT 3.1 (DVS128 Gesture)


def read_aedat31(path: PathLike) -> np.ndarray:
    """Read the polarity events of an AEDAT 3.1 file (DVS128 Gesture, 128x128).

    Layout: ASCII header lines starting with ``#`` and ending with ``#!END-HEADER\\r\\n``; then packets, each
    a 28-byte little-endian header (uint16 eventType, uint16 eventSource, uint32 eventSize, uint32
    eventTSOffset, uint32 eventTSOverflow, uint32 eventCapacity, uint32 eventNumber, uint32 eventValid)
    followed by eventCapacity * eventSize bytes of events. Only packets of eventType 1 (polarity) are
    decoded, the others are skipped. A polarity event is uint32 data + int32 timestamp (at byte
    eventTSOffset, normally 4); x = (data >> 17) & 0x1FFF, y = (data >> 2) & 0x1FFF, p = (data >> 1) & 1,
    timestamp = (eventTSOverflow << 31) | ts. Only the first eventNumber events of a packet are read, and of
    those only the valid ones (data & 1). Events outside the 128x128 sensor are dropped with an
    :class:`EventFileWarning` giving their count.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: no ``#!END-HEADER`` line, a truncated packet header, or a packet header whose
            eventSize/eventCapacity/eventNumber is inconsistent with the bytes left in the file (names the
            packet's byte offset).
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.find(_AEDAT31_END)
    if not data.startswith(b"#") or end < 0:
        raise EventFileError(
            f"{path}: not an AEDAT 3.1 file: no '#!END-HEADER' line closing a '#' header was found "
            f"(file starts with {data[:16]!r}); DVS128 Gesture files are AEDAT 3.1 (for AEDAT 2.0 use "
            f"read_aedat2).")
    pos = end + len(_AEDAT31_END)
    n = len(data)
    ts_parts: list[np.ndarray] = []
    addr_parts: list[np.ndarray] = []
    hsize = _AEDAT31_PACKET_HEADER.size
    while pos < n:
        if n - pos < hsize:
            raise EventFileError(
                f"{path}: truncated AEDAT 3.1 file: packet header at byte offset {pos} needs {hsize} bytes but "
                f"only {n - pos} remain. Re-copy the file.")
        (etype, _src, esize, ets_off, ets_ovf, ecap, enum, _evalid) = _AEDAT31_PACKET_HEADER.unpack_from(data, pos)
        body = pos + hsize
        nbytes = ecap * esize
        problem = None
        if enum > ecap:
            problem = f"eventNumber {enum} > eventCapacity {ecap}"
        elif nbytes > n - body:
            problem = (f"eventCapacity {ecap} x eventSize {esize} = {nbytes} bytes of events, but only "
                       f"{n - body} bytes remain")
        elif ecap > 0 and esize == 0:
            problem = f"eventSize 0 with eventCapacity {ecap}"
        elif etype == _AEDAT31_POLARITY_EVENT and enum > 0 and (esize < 8 or ets_off + 4 > esize):
            problem = f"polarity packet with eventSize {esize} and eventTSOffset {ets_off} (expected 8 and 4)"
        if problem is not None:
            raise EventFileError(
                f"{path}: corrupt AEDAT 3.1 packet header at byte offset {pos} (eventType {etype}): {problem}. "
                f"The file is truncated or damaged; re-copy it.")
        if etype == _AEDAT31_POLARITY_EVENT and enum > 0:
            raw = np.frombuffer(data, dtype=np.uint8, count=enum * esize, offset=body).reshape(enum, esize)
            addr = np.ascontiguousarray(raw[:, 0:4]).view("<u4").reshape(-1).astype(np.int64)
            ts = np.ascontiguousarray(raw[:, ets_off:ets_off + 4]).view("<u4").reshape(-1).astype(np.int64)
            ts |= np.int64(ets_ovf) << 31
            valid = (addr & 1).astype(bool)
            ts_parts.append(ts[valid])
            addr_parts.append(addr[valid])
        pos = body + nbytes
    if ts_parts:
        ts = np.concatenate(ts_parts)
        addr = np.concatenate(addr_parts)
    else:
        ts = np.zeros(0, np.int64)
        addr = np.zeros(0, np.int64)
    return _in_sensor(path, ts, (addr >> 17) & 0x1FFF, (addr >> 2) & 0x1FFF, (addr >> 1) & 1, DVS128_SENSOR,
                      "corrupt polarity events")


def read_gesture_labels(csv_path: PathLike) -> np.ndarray:
    """Read a DVS128 Gesture ``<trial>_labels.csv`` file.

    Format: header ``class,startTime_usec,endTime_usec``, then one line per gesture with the class 1..11 and
    the segment's start/end timestamps in microseconds.

    Returns:
        Structured array of dtype :data:`GESTURE_LABEL_DTYPE`, shape (S,): ``label`` = class - 1 (0..10),
        ``start``, ``end`` (the segment is [start, end)).

    Raises:
        EventFileError: bad header, a malformed line, a class outside 1..11, or start >= end (names the line).
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    expected = ["class", "startTime_usec", "endTime_usec"]
    if not rows or [c.strip() for c in rows[0]] != expected:
        got = rows[0] if rows else "an empty file"
        raise EventFileError(
            f"{csv_path}: bad DVS128 Gesture labels header: expected 'class,startTime_usec,endTime_usec', "
            f"got {got!r}. Is this a *_labels.csv file of the DvsGesture data set?")
    out = np.empty(len(rows) - 1, dtype=GESTURE_LABEL_DTYPE)
    for i, row in enumerate(rows[1:]):
        line = i + 2
        try:
            cls, start, end = (int(c) for c in row)
        except ValueError:
            raise EventFileError(
                f"{csv_path}: line {line}: expected three integers 'class,startTime_usec,endTime_usec', "
                f"got {row!r}") from None
        if not 1 <= cls <= 11:
            raise EventFileError(f"{csv_path}: line {line}: class {cls} outside 1..11")
        if start >= end:
            raise EventFileError(f"{csv_path}: line {line}: segment start {start} >= end {end}")
        out[i] = (cls - 1, start, end)
    return out


def split_gesture_segments(events: np.ndarray, labels: np.ndarray,
                           source: PathLike | None = None) -> list[tuple[int, np.ndarray]]:
    """Cut a recording into its labelled gesture segments.

    Segment k holds the events with ``labels['start'][k] <= t < labels['end'][k]`` (SpikingJelly's rule), in
    file order.

    Args:
        events: the recording, dtype :data:`EVENT_DTYPE`, shape (N,).
        labels: from :func:`read_gesture_labels`, shape (S,).
        source: the labels file, only used in error messages.

    Returns:
        A list of S ``(label, segment_events)`` pairs.

    Raises:
        EventFileError: a segment that does not overlap the recording's time range or holds no event (the
            labels file does not belong to this recording).
    """
    t = events["t"]
    if t.size:
        t_lo, t_hi = int(t.min()), int(t.max())
    segments: list[tuple[int, np.ndarray]] = []
    name = f"{source}: " if source is not None else ""
    for k, (label, start, end) in enumerate(labels.tolist()):
        mask = (t >= start) & (t < end)
        if t.size == 0 or end <= t_lo or start > t_hi or not mask.any():
            rng = f"[{t_lo}, {t_hi}] us" if t.size else "empty"
            raise EventFileError(
                f"{name}segment {k} (class {label + 1}, [{start}, {end}) us) lies outside the recording's time "
                f"range {rng} or holds no event: the labels file does not match its recording.")
        segments.append((int(label), events[mask]))
    return segments


# ----------------------------------------------------------------------------------------------------------------
# N-MNIST


def read_nmnist(path: PathLike) -> np.ndarray:
    """Read an N-MNIST recording (``.bin`` of the original release, ``.bs2`` of the small copy; 34x34 sensor).

    Layout: 5 bytes per event: byte 0 = x, byte 1 = y, bit 7 of byte 2 = polarity, bits 22..0 of bytes 2-4
    (big-endian) = timestamp in us. As in Orchard's reference reader (and tonic's), an event with y = 240 is a
    timestamp-overflow marker: it adds 2**13 us to all following timestamps and is dropped (N-MNIST files
    contain none). Other events outside the 34x34 sensor are dropped with an :class:`EventFileWarning`
    giving their count.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: a file size that is not a multiple of 5 bytes (names the last complete offset).
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        good = (raw.size // 5) * 5
        raise EventFileError(
            f"{path}: truncated N-MNIST file: {raw.size} bytes is not a multiple of the 5-byte event record; "
            f"the last complete record ends at byte offset {good} ({raw.size - good} trailing bytes). "
            f"Re-copy the file.")
    rec = raw.reshape(-1, 5).astype(np.int64)
    x = rec[:, 0]
    y = rec[:, 1]
    p = rec[:, 2] >> 7
    t = ((rec[:, 2] & 0x7F) << 16) | (rec[:, 3] << 8) | rec[:, 4]
    overflow = y == _NMNIST_OVERFLOW_Y
    if overflow.any():
        t = t + np.cumsum(overflow) * (1 << 13)
        keep = ~overflow
        t, x, y, p = t[keep], x[keep], y[keep], p[keep]
    return _in_sensor(path, t, x, y, p, NMNIST_SENSOR, "corrupt records")


# ----------------------------------------------------------------------------------------------------------------
# Frame integration


def _check_frame_args(events: np.ndarray, T: int, height: int, width: int) -> None:
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if events.size == 0:
        return
    x, y, p = events["x"], events["y"], events["p"]
    if x.min() < 0 or y.min() < 0 or x.max() >= width or y.max() >= height:
        raise ValueError(
            f"event coordinates out of the {height}x{width} frame: x in [{x.min()}, {x.max()}], "
            f"y in [{y.min()}, {y.max()}]; pass the sensor's height and width (e.g. 128x128 for DVS128, 34x34 for "
            f"N-MNIST)")
    if p.max() > 1:
        raise ValueError(f"polarities must be 0 or 1, found {p.max()}")


def _accumulate(events: np.ndarray, frame_idx: np.ndarray, T: int, height: int, width: int) -> np.ndarray:
    plane = height * width
    flat = (frame_idx.astype(np.int64) * (2 * plane) + events["p"].astype(np.int64) * plane
            + events["y"].astype(np.int64) * width + events["x"].astype(np.int64))
    counts = np.bincount(flat, minlength=T * 2 * plane)
    return counts.astype(np.float32).reshape(T, 2, height, width)


def integrate_frames_by_count(events: np.ndarray, T: int, height: int, width: int) -> np.ndarray:
    """Integrate events into T frames holding equal numbers of events (SpikingJelly ``split_by='number'``).

    Exactly ``integrate_events_by_fixed_frames_number(events, 'number', T, H, W)`` of SpikingJelly: with N
    events in their given order and di = N // T, frame j < T-1 takes events [j*di, (j+1)*di) and the last frame
    takes [(T-1)*di, N) (so it also gets the N mod T remainder; when N < T all events land in the last frame).
    ``frame[j, p, y, x]`` is the number of events of polarity p at pixel (x, y) in slice j.

    Args:
        events: dtype :data:`EVENT_DTYPE`, shape (N,).
        T: number of frames.
        height, width: frame size (the sensor size).

    Returns:
        float32 array of shape (T, 2, height, width) of event counts.
    """
    _check_frame_args(events, T, height, width)
    n = events.size
    di = n // T
    if di == 0:
        idx = np.full(n, T - 1, dtype=np.int64)
    else:
        idx = np.minimum(np.arange(n, dtype=np.int64) // di, T - 1)
    return _accumulate(events, idx, T, height, width)


def integrate_frames_by_time(events: np.ndarray, T: int, height: int, width: int) -> np.ndarray:
    """Integrate events into T frames of equal duration (SpikingJelly ``split_by='time'`` semantics).

    With t0 = t[0] and t1 = t[-1] (first and last event in the given order, which for a time-sorted stream
    are the earliest and latest) and dt = (t1 - t0) // T (integer microseconds, as in SpikingJelly), frame
    j < T-1 holds the events with t0 + j*dt <= t < t0 + (j+1)*dt (left-inclusive, right-exclusive) and the
    last frame holds every event with t >= t0 + (T-1)*dt, so t1 and the rounding remainder of the last
    window are included. This equals SpikingJelly for time-sorted streams, except that a window without
    events gives an all-zero frame here where SpikingJelly raises IndexError. When dt == 0 (duration shorter
    than T us) every event lands in the last frame, the same rule as :func:`integrate_frames_by_count` for
    N < T. Events earlier than t[0] (unsorted input) are counted in frame 0.

    Args:
        events: dtype :data:`EVENT_DTYPE`, shape (N,).
        T: number of frames.
        height, width: frame size.

    Returns:
        float32 array of shape (T, 2, height, width) of event counts.
    """
    _check_frame_args(events, T, height, width)
    n = events.size
    if n == 0:
        return np.zeros((T, 2, height, width), np.float32)
    t = events["t"].astype(np.int64)
    t0 = int(t[0])
    dt = (int(t[-1]) - t0) // T
    if dt <= 0:
        idx = np.full(n, T - 1, dtype=np.int64)
    else:
        idx = np.clip((t - t0) // dt, 0, T - 1)
    return _accumulate(events, idx, T, height, width)


def integrate_frames(events: np.ndarray, T: int, height: int, width: int, split_by: str = "number") -> np.ndarray:
    """Dispatch to :func:`integrate_frames_by_count` (``split_by='number'``) or
    :func:`integrate_frames_by_time` (``split_by='time'``). Returns float32 (T, 2, height, width)."""
    if split_by == "number":
        return integrate_frames_by_count(events, T, height, width)
    if split_by == "time":
        return integrate_frames_by_time(events, T, height, width)
    raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")


__all__ = [
    "EVENT_DTYPE", "GESTURE_LABEL_DTYPE", "DVS128_SENSOR", "NMNIST_SENSOR", "EventFileError", "EventFileWarning",
    "make_events",
    "read_aedat2", "remap_cifar10dvs", "read_aedat31", "read_gesture_labels", "split_gesture_segments",
    "read_nmnist", "integrate_frames_by_count", "integrate_frames_by_time", "integrate_frames",
]
